"""Real identity: with logins or API keys, /v1 asks for one of them, and the
rater of a reply and of a thumb is its user whatever the body claims; the
page's rater is its login; without either, an API client's rater is what it
claims, else its address."""

import base64
import json
import logging

import httpx
import pytest

from chatbot import credentials
from chatbot.credentials import CredentialsError, Verified
from chatbot.identity import Caller
from chatbot.policy import Policy
from chatbot.server import BackgroundServer, create_app
from chatbot.ui import ChatUI, new_state

HELLO = [{"role": "user", "content": "Hello"}]
ANN_PASSWORD = "ann-s-password"
BOB_KEY = "sk-bob-0123456789abcdef"


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def keys_file(tmp_path, text):
    path = tmp_path / "api-keys"
    path.write_text(text)
    return str(path)


@pytest.fixture
def secured(tiny_loaded, store, chat_options, tmp_path):
    """The app with one login (ann) and one API key (bob's)."""
    creds = credentials.load(f"ann:{ANN_PASSWORD}", None,
                             keys_file(tmp_path, f"# OpenAI clients\n\nbob:{BOB_KEY}\n"))
    with BackgroundServer(create_app(Policy(tiny_loaded), store, chat_options, credentials=creds)) as server:
        yield server


REQUESTS = [
    ("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3}),
    ("POST", "/v1/feedback", {"response_id": "resp-x", "value": 1}),
    ("GET", "/v1/models", None),
]
WRONG = [
    ("none", {}),
    ("wrong password", basic("ann", "not-it")),
    ("unknown user", basic("eve", ANN_PASSWORD)),
    ("wrong key", bearer("sk-not-a-key-0123456789")),
    ("a key as a password", basic("bob", BOB_KEY)),
    ("a password as a key", bearer(ANN_PASSWORD)),
    ("not base64", {"Authorization": "Basic !!!"}),
    ("another scheme", {"Authorization": f"Token {BOB_KEY}"}),
]


@pytest.mark.parametrize("headers", [w[1] for w in WRONG], ids=[w[0] for w in WRONG])
@pytest.mark.parametrize("method,path,body", REQUESTS, ids=[r[1] for r in REQUESTS])
def test_v1_without_the_right_credentials_is_a_401_and_stores_nothing(secured, store, method, path, body, headers):
    r = httpx.request(method, secured.url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == ("invalid_api_key" if headers else "missing_credentials")
    challenge = r.headers["www-authenticate"]
    assert "Bearer" in challenge and "Basic" in challenge
    assert ANN_PASSWORD not in r.text and BOB_KEY not in r.text
    assert store.counts()["responses"] == store.counts()["feedback"] == 0


def test_health_metrics_and_the_api_docs_stay_open(secured):
    for path in ("/healthz", "/metrics", "/v1/openapi.json", "/v1/docs"):
        assert httpx.get(secured.url + path, timeout=30).status_code == 200, path
    schema = httpx.get(secured.url + "/v1/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/feedback", "/v1/models"):
        for operation in schema["paths"][path].values():
            assert "401" in operation["responses"], path  # the docs say what a request without credentials gets


@pytest.mark.parametrize("headers,user,how", [(basic("ann", ANN_PASSWORD), "ann", "login"),
                                              (bearer(BOB_KEY), "bob", "api_key")], ids=["basic", "bearer"])
def test_the_rater_is_the_login_or_the_keys_user_whatever_the_body_says(secured, store, headers, user, how):
    from online_rl.data import snapshot

    with httpx.Client(base_url=secured.url, headers=headers, timeout=60) as client:
        r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, "user": "someone-else"})
        assert r.status_code == 200, r.text
        plain = r.json()["id"]
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": HELLO, "max_tokens": 4, "stream": True, "user": "someone-else"}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"  # the reply is logged by then
        streamed = json.loads(lines[0][6:])["id"]
        for rid in (plain, streamed):
            r = client.post("/v1/feedback", json={"response_id": rid, "value": 1, "user": "someone-else"})
            assert r.status_code == 200, r.text
    for rid in (plain, streamed):
        row = store.get_response(rid)
        assert (row["user"], row["identified_by"], row["claimed_user"]) == (user, how, "someone-else")
    thumbs = store.feedback_since(0)
    assert [(f["user"], f["identified_by"], f["claimed_user"]) for f in thumbs] == [(user, how, "someone-else")] * 2
    assert {e.rater for e in snapshot(store).examples} == {f"user:{user}"}


def test_an_openai_client_uses_its_api_key(secured, store):
    import openai

    client = openai.OpenAI(base_url=secured.url + "/v1", api_key=BOB_KEY)
    reply = client.chat.completions.create(model="v0", messages=HELLO, max_tokens=4, user="someone-else")
    assert store.get_response(reply.id)["user"] == "bob"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.url + "/v1", api_key="sk-wrong-0123456789", max_retries=0).models.list()


def test_the_pages_rater_is_its_login(secured, store):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="Please login"):
        Client(secured.url + "/", verbose=False)
    wrong = httpx.post(secured.url + "/login", data={"username": "ann", "password": "not-it"})
    assert wrong.status_code == 400 and "Incorrect credentials" in wrong.text
    client = Client(secured.url + "/", auth=("ann", ANN_PASSWORD), verbose=False)
    client.predict("Hello", 8, 1.0, "", api_name="/chat")
    with store.connection() as db:
        (row,) = list(db.query("SELECT * FROM responses"))
    assert (row["user"], row["identified_by"], row["claimed_user"]) == ("ann", "login", None)
    assert row["session_id"].startswith("web-")  # the browser session is kept beside the login


def test_the_page_and_the_api_name_a_logged_in_rater_the_same(tiny_loaded, store, chat_options):
    from types import SimpleNamespace

    ui = ChatUI(Policy(tiny_loaded), store, chat_options)
    page = ui.identity(new_state(), SimpleNamespace(session_hash="tab-1", username="ann"))
    api = Caller(Verified("ann", "login"), "10.0.0.7").identity(claimed="someone-else")
    key = Caller(Verified("ann", "api_key"), "10.0.0.8").identity()
    assert page.key == api.key == key.key == "user:ann"  # one bucket in the thumbs limit, one rater in training
    anonymous = ui.identity(new_state(), SimpleNamespace(session_hash="tab-1", username=None))
    assert (anonymous.how, anonymous.key) == ("session", "session:web-tab-1")


def test_api_keys_alone_protect_v1_and_leave_the_page_open(tiny_loaded, store, chat_options, tmp_path):
    from gradio_client import Client

    creds = credentials.load(api_keys_file=keys_file(tmp_path, f"bob:{BOB_KEY}\n"))
    with BackgroundServer(create_app(Policy(tiny_loaded), store, chat_options, credentials=creds)) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        r = httpx.get(server.url + "/v1/models", headers=basic("bob", BOB_KEY))
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(server.url + "/v1/models", headers=bearer(BOB_KEY)).status_code == 200
        Client(server.url + "/", verbose=False).predict("Hello", 8, 1.0, "", api_name="/chat")
    with store.connection() as db:
        (row,) = list(db.query("SELECT * FROM responses"))
    assert (row["user"], row["identified_by"]) == (None, "session") and row["session_id"].startswith("web-")


def test_without_logins_the_api_rater_is_the_claim_else_the_address(server, store):
    with httpx.Client(base_url=server.url, timeout=60, headers=bearer("unused")) as client:
        claimed = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3, "user": "carol"})
        anonymous = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        client.post("/v1/feedback", json={"response_id": anonymous.json()["id"], "value": -1})
        # Behind a proxy on this host, the client's address is the one it forwards.
        proxied = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3},
                              headers={"X-Forwarded-For": "203.0.113.9"})
    row = store.get_response(claimed.json()["id"])
    assert (row["user"], row["identified_by"], row["claimed_user"]) == ("carol", "claimed", "carol")
    row = store.get_response(anonymous.json()["id"])
    assert (row["user"], row["session_id"], row["identified_by"]) == (None, "address:127.0.0.1", "address")
    assert store.get_response(proxied.json()["id"])["session_id"] == "address:203.0.113.9"
    (thumb,) = store.feedback_since(0)
    assert (thumb["user"], thumb["session_id"], thumb["identified_by"]) == (None, "address:127.0.0.1", "address")


def test_credentials_files_take_comments_and_blank_lines(tmp_path):
    auth = tmp_path / "logins"
    auth.write_text("# people\n\nann:pw:with:colons\n  carl : secret  \n")
    creds = credentials.load("dora:x", str(auth), keys_file(tmp_path, f"# keys\n\nbob:{BOB_KEY}\n"))
    assert creds.logins == (("dora", "x"), ("ann", "pw:with:colons"), ("carl", "secret"))
    assert creds.check_login("ann", "pw:with:colons") and not creds.check_login("ann", "pw")
    assert creds.key_user(BOB_KEY) == "bob" and creds.key_user(BOB_KEY[:-1]) is None
    assert not credentials.load().required


@pytest.mark.parametrize("text,needle", [
    ("bob:" + BOB_KEY + "\njust-a-key-0123456789abcdef\n", "line 2: expected user:secret"),
    ("bob:\n", "line 1: expected user:secret"),
    (":" + BOB_KEY + "\n", "line 1: expected user:secret"),
    ("bob:short-key\n", "line 1: a key must be at least 16 characters"),
    (f"bob:{BOB_KEY}\ncarl:{BOB_KEY}\n", "line 2: the same key as"),
])
def test_a_malformed_keys_file_is_refused_without_showing_a_key(tmp_path, text, needle):
    with pytest.raises(CredentialsError) as caught:
        credentials.load(api_keys_file=keys_file(tmp_path, text))
    message = str(caught.value)
    assert needle in message and "\n" not in message
    assert BOB_KEY not in message and "short-key" not in message and "0123456789abcdef" not in message


def test_serve_with_a_malformed_keys_file_is_a_one_line_error_before_loading_a_model(tmp_path):
    from tests.test_cli import run_cli

    path = keys_file(tmp_path, f"# keys\nbob {BOB_KEY}\n")
    result = run_cli("serve", "--data-dir", str(tmp_path / "data"), "--api-keys-file", path,
                     "--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: --api-keys-file {path} line 2: expected user:secret"
    assert BOB_KEY not in result.stdout + result.stderr
    missing = run_cli("serve", "--data-dir", str(tmp_path / "data"), "--api-keys-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: cannot read --api-keys-file")


def test_serve_passes_the_logins_and_keys_it_read_to_the_server(tiny_loaded, tmp_path, monkeypatch):
    import app
    import chatbot.models
    import chatbot.server
    from tests.test_serve_process import _free_port

    seen = {}

    def serve(settings, options, store, loaded, scheduler, *, page_secret, credentials, before_listen):
        before_listen()  # frees the port
        seen["credentials"] = credentials

    monkeypatch.setattr(chatbot.models, "load_model", lambda *args, **kwargs: tiny_loaded)
    monkeypatch.setattr(chatbot.server, "serve", serve)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # serve sets up logging on stderr
        code = app.main(["serve", "--data-dir", str(tmp_path / "data"), "--port", str(_free_port()),
                         "--no-memory-check", "--retrain-every", "0", "--auth", f"ann:{ANN_PASSWORD}",
                         "--api-keys-file", keys_file(tmp_path, f"bob:{BOB_KEY}\n")])
    finally:
        root.handlers[:], root.level = handlers, level
    assert code == 0
    assert seen["credentials"].check_login("ann", ANN_PASSWORD) and seen["credentials"].key_user(BOB_KEY) == "bob"
