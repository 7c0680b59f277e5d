"""The operator surface: what operators can see and do, and its HTTP API.

`Operations` is the one place the operator's actions are implemented; the
HTTP routes under ``/v1/admin`` and the operator console (`chatbot.console`)
both call it. Every route needs ``Authorization: Bearer <token>`` with the
token the server was started with (``--admin-token`` or
``$CHATBOT_ADMIN_TOKEN``): a missing or wrong token is answered 401 and
nothing is done. With no token configured the operator surface is off:
every route answers 403 and the console is not mounted. A promote or rollback
to a version whose adapter fails its check against the served model
(`chatbot.promotion`) is answered 409 with the reason, and changes nothing.

The scheduler is passed in as an object with `retrain_now`, `pause`,
`resume` and `state` (`online_rl.scheduler.RetrainScheduler`); this module
imports nothing that trains.
"""

from __future__ import annotations

import contextlib
import hmac
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from chatbot import promotion
from chatbot.adapters import AdapterLoadError
from chatbot.api import ApiError
from online_rl import METHODS
from chatbot.swap import VersionFollower
from storage import RunInProgress, Store, StoreError

ADMIN_TOKEN_ENV = "CHATBOT_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


class OperationError(Exception):
    """An operator request that cannot be honoured; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


def check_token(token: str | None) -> str | None:
    """A configured token must be long enough to resist guessing; empty means off."""
    token = (token or "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token must be at least {MIN_TOKEN_CHARS} characters "
                         "(for example: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def token_matches(given: str | None, token: str | None) -> bool:
    if not token or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


class Operations:
    def __init__(self, store: Store, follower: VersionFollower, scheduler: Any):
        self.store = store
        self.follower = follower
        self.scheduler = scheduler

    def status(self, runs: int = 10) -> dict:
        status = self.store.status(recent_runs=runs)
        return {
            **status,
            "serving": self.follower.state(),
            "schedule": self.scheduler.state(),
            "approval_by_version": self.store.approval_by_version(),
        }

    def retrain(self, method: str = METHODS[0]) -> dict:
        try:
            return self.scheduler.retrain_now(method, trigger="operator")
        except RunInProgress as exc:
            raise OperationError(str(exc), 409, "run_in_progress") from None
        except ValueError as exc:
            raise OperationError(str(exc)) from None

    def promote(self, version: str, actor: str = "operator") -> dict:
        with _refusals():
            result = promotion.promote(self.store, version.strip(), self._check, actor=actor,
                                       reason=f"promoted by {actor}")
        return self._follow(result)

    def rollback(self, to: str | None = None, actor: str = "operator") -> dict:
        with _refusals():
            result = promotion.rollback(self.store, (to or "").strip() or None, self._check, actor=actor)
        return self._follow(result)

    def _check(self, version: str, row: dict) -> None:
        """A version is checked against the model this server serves."""
        self.follower.policy.check_adapter(version, row["path"])

    def schedule(self, action: str) -> dict:
        if action == "pause":
            self.scheduler.pause()
        elif action == "resume":
            self.scheduler.resume()
        else:
            raise OperationError("action is pause or resume")
        return self.scheduler.state()

    def _follow(self, result: dict) -> dict:
        """Swap now rather than at the next poll, so the answer says what
        serves, and how long the swap held the batch (``swap``: its timings,
        None when nothing was swapped)."""
        info = self.follower.sync()
        serving = self.follower.state()
        return {**result, "serving_version": serving["serving_version"], "serving_error": serving["error"],
                "swap": info}


@contextlib.contextmanager
def _refusals():
    """Why a promote or rollback is refused, as the HTTP status it maps to."""
    try:
        yield
    except AdapterLoadError as exc:  # the version exists but its adapter fails the check
        raise OperationError(str(exc), 409, "adapter_failed_check") from None
    except StoreError as exc:
        raise OperationError(str(exc), 404 if "no adapter" in str(exc) else 400, "bad_version") from None


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal[METHODS] = METHODS[0]  # type: ignore[valid-type]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=2, max_length=20)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(default=None, max_length=20)


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["pause", "resume"]


def admin_router(ops: Operations, token: str | None) -> APIRouter:
    def require_token(request: Request) -> None:
        if token is None:
            raise ApiError(403, f"the operator API is off: start the server with --admin-token or "
                                f"${ADMIN_TOKEN_ENV}", code="admin_disabled")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token_matches(given.strip(), token):
            raise ApiError(401, "operator routes need the header Authorization: Bearer <admin token>",
                           code="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_token)])

    def run(fn, *args):
        try:
            return fn(*args)
        except OperationError as exc:
            raise ApiError(exc.status, str(exc), code=exc.code) from None

    @router.get("/status")
    def status(runs: int = 10):
        return run(ops.status, max(1, min(runs, 200)))

    @router.post("/retrain", status_code=202)
    def retrain(req: RetrainRequest | None = None):
        return run(ops.retrain, (req or RetrainRequest()).method)

    @router.post("/promote")
    def promote(req: PromoteRequest):
        return run(ops.promote, req.version)

    @router.post("/rollback")
    def rollback(req: RollbackRequest | None = None):
        return run(ops.rollback, (req or RollbackRequest()).to)

    @router.post("/schedule")
    def schedule(req: ScheduleRequest):
        return run(ops.schedule, req.action)

    return router
