"""One server for people, programs and operators, on one FastAPI app and port:
the Gradio chat page at ``/``, the OpenAI-compatible API under ``/v1``, and,
with an admin token, the operator API under ``/v1/admin`` and the operator
console at ``/admin``.

With logins (``--auth``, ``--auth-file``) the chat page asks for one, and
``/v1`` asks for one of them or an API key (``--api-keys-file``;
`chatbot.credentials`); ``/healthz``, ``/metrics`` and the API's docs stay
open. One thumbs `RateLimit` is shared by the page and the API.

At start the server swaps in the version the registry says is active (or,
when its adapter is broken, falls back to the last version that loads), then
follows the registry (`chatbot.swap.VersionFollower`) and runs the retrain
schedule (`online_rl.scheduler`, built by ``app.py``) until it stops."""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

import gradio as gr
from fastapi import FastAPI

from fastapi.responses import HTMLResponse, RedirectResponse, Response

from chatbot.admin import Operations, admin_router, token_matches
from chatbot.api import api_router
from chatbot.browser_secret import browser_secret
from chatbot.credentials import Credentials
from chatbot.errors import add_api_not_found, document_errors, install_error_handlers
from chatbot.gradio_routes import UnknownEndpoints
from chatbot.limits import BodyLimit
from chatbot.live_trials import LiveJudge, TrialSettings
from chatbot.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from chatbot.metrics import Metrics
from chatbot.policy import Policy
from chatbot.rate_limit import RateLimit
from chatbot.swap import VersionFollower
from chatbot.ui import ChatOptions, ChatUI
from storage import Store


def create_app(policy: Policy, store: Store, options: ChatOptions, *,
               credentials: Credentials | None = None, ops: Operations | None = None,
               admin_token: str | None = None, page_secret: str | None = None) -> FastAPI:
    """The whole app. `credentials`: the logins the page asks for and the
    logins and keys ``/v1`` takes (none: both open). Without `ops` there is
    no operator surface at all; with `ops` but no `admin_token` it is there
    and answers that it is off. `page_secret` encrypts what the chat page
    saves in the browser (default: the store's data directory's,
    `chatbot.browser_secret`)."""
    credentials = credentials or Credentials()
    thumbs = RateLimit(options.max_thumbs_per_minute)
    app = FastAPI(title="Learning chatbot", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    install_error_handlers(app)
    document_errors(app)
    app.add_middleware(BodyLimit, limits=options.limits)
    app.include_router(api_router(policy, store, options, credentials=credentials, thumbs=thumbs))
    metrics = Metrics(store, lambda: policy.version, lambda: thumbs.refused, engine=policy.engine)
    policy.listeners.append(metrics.observe)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        """Ready: the model is loaded (this app exists only then) and serving."""
        loaded = policy.loaded
        return {"status": "ok", "ready": True, "version": policy.version, "model": loaded.name,
                "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch.")}

    @app.get("/metrics", include_in_schema=False)
    def prometheus():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    pages = {}
    if ops is not None:
        app.include_router(admin_router(ops, admin_token))
        if admin_token:
            from chatbot.console import build_console

            @app.get("/admin", include_in_schema=False)
            def console():
                return RedirectResponse("admin/")

            # Mounted before the chat page, whose mount at the root would
            # otherwise answer /admin too. Log in with any user name and the
            # admin token as the password.
            pages["/admin"] = build_console(ops)
            app = gr.mount_gradio_app(app, pages["/admin"], path="/admin",
                                      auth=lambda _user, password: token_matches(password, admin_token),
                                      auth_message="Operator console: the password is the admin token.",
                                      show_error=True)
        else:
            @app.get("/admin", include_in_schema=False)
            @app.get("/admin/{rest:path}", include_in_schema=False)
            def console_off():
                return HTMLResponse("<p>The operator console is off: start the server with --admin-token.</p>",
                                    status_code=403)
    add_api_not_found(app)  # after every router under /v1
    page_secret = page_secret or browser_secret(store.path.parent)
    pages[""] = ChatUI(policy, store, options, browser_secret=page_secret, thumbs=thumbs).build()
    # Requests queue in Gradio (people see their place in line); the model
    # events run as many at once as the serving batch has rows.
    pages[""].queue(default_concurrency_limit=4, max_size=64)
    app.add_middleware(UnknownEndpoints, pages=pages)
    return gr.mount_gradio_app(app, pages[""], path="", auth=credentials.check_login if credentials.logins else None,
                               show_error=True)


@dataclass
class Serving:
    """The serving objects over one data directory."""

    app: FastAPI
    policy: Policy
    follower: VersionFollower
    ops: Operations


def build_serving(store: Store, loaded, scheduler, options: ChatOptions, *,
                  credentials: Credentials | None = None, admin_token: str | None = None,
                  follow_every: float = 2.0, page_secret: str | None = None, max_batch: int = 8,
                  max_waiting: int = 32, trials: TrialSettings | None = None) -> Serving:
    """The app on the version that loads: the active one, or, when its adapter
    is broken, the last one before it that loads (`VersionFollower.come_up`).
    Nothing in the registry can make this fail."""
    policy = Policy(loaded, max_batch=max_batch, max_waiting=max_waiting)
    judge = LiveJudge(store, lambda version, row: policy.check_adapter(version, row["path"]), trials)
    follower = VersionFollower(policy, store, interval_s=follow_every, judge=judge)
    follower.come_up()
    ops = Operations(store, follower, scheduler)
    app = create_app(policy, store, options, credentials=credentials, ops=ops, admin_token=admin_token,
                     page_secret=page_secret)
    return Serving(app, policy, follower, ops)


class BackgroundServer:
    """Run the app with uvicorn on a thread (tests and benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class ServeSettings:
    """Where and how the server runs, built by ``app.py`` from its flags."""

    host: str = "127.0.0.1"
    port: int = 7860
    admin_token: str | None = None
    follow_every: float = 2.0  # seconds between looks at the registry
    max_batch: int = 8  # rows of the serving batch
    max_waiting: int = 32  # requests waiting for a row before 503
    trials: TrialSettings = field(default_factory=TrialSettings)  # deciding canaries and watches

    def validate(self) -> "ServeSettings":
        self.trials.validate()
        if not 1 <= self.max_batch <= 4096:
            raise ValueError("--max-batch must be between 1 and 4096")
        if self.max_waiting < 0:
            raise ValueError("--max-waiting must be at least 0")
        if self.follow_every <= 0:
            raise ValueError("--follow-every must be above 0")
        return self


def serve(settings: ServeSettings, options: ChatOptions, store: Store, loaded, scheduler, *,
          page_secret: str, credentials: Credentials | None = None, before_listen=lambda: None) -> None:
    """Run until interrupted: follow the registry, run the schedule, serve.
    `before_listen` frees the port (the answerer used while loading);
    `credentials` are the logins and keys, read before the model loaded."""
    import uvicorn

    log = logging.getLogger("chatbot")
    credentials = credentials or Credentials()
    serving = build_serving(store, loaded, scheduler, options, credentials=credentials,
                            admin_token=settings.admin_token, follow_every=settings.follow_every,
                            page_secret=page_secret, max_batch=settings.max_batch,
                            max_waiting=settings.max_waiting, trials=settings.trials)
    app, follower = serving.app, serving.follower
    log.info("serving version %s; batch of up to %d rows, %d more waiting", serving.policy.version,
             settings.max_batch, settings.max_waiting)
    host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    log.info("chat: http://%s:%s/", host, settings.port)
    log.info("API: http://%s:%s/v1 (OpenAI-compatible; docs at /v1/docs); /healthz and /metrics", host, settings.port)
    if credentials.required:  # how many, never what
        log.info("logins: %d for the chat page and /v1, API keys: %d for /v1", len(credentials.logins),
                 len(credentials.keys))
    else:
        log.info("no logins or API keys: the page and /v1 are open; an API client's rater is the user it "
                 "claims, else its address")
    if settings.admin_token:
        log.info("operator console: http://%s:%s/admin (password: the admin token)", host, settings.port)
    else:
        log.info("operator API and console: off (no --admin-token)")
    state = scheduler.config
    if state.enabled:
        every = f"on cron {state.cron!r}" if state.cron else f"every {state.every_s:g} s"
        log.info("retrain schedule: %s, with at least %s new feedback rows (%s)", every, state.min_new_feedback,
                 "paused" if scheduler.paused else "running")
    else:
        log.info("retrain schedule: off (--retrain-every 0)")
    follower.start()
    scheduler.start()
    # Loading leaves garbage behind (Gradio's and the loader's spent event
    # loops, each holding a pair of sockets, and large temporary tensors):
    # collected now, the process starts serving at its resting size instead
    # of whenever the collector next happens to run.
    gc.collect()
    before_listen()
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", log_config=None)
    finally:
        scheduler.shutdown()
        follower.stop()
