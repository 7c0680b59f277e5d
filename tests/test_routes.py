"""Addresses where the mounted Gradio pages alone would answer wrongly: the
console at /admin without its slash, and /gradio_api/call/<name> for a name
that no endpoint has (Gradio raises: a 500)."""

import httpx
import pytest

from chatbot.admin import Operations
from chatbot.policy import Policy
from chatbot.server import BackgroundServer, create_app
from chatbot.swap import VersionFollower

TOKEN = "routes-admin-token-0123456789"


class Scheduler:
    def state(self):
        return {"enabled": False, "paused": False}


def serve_with(tiny_loaded, store, chat_options, token):
    policy = Policy(tiny_loaded)
    ops = Operations(store, VersionFollower(policy, store), Scheduler())
    return BackgroundServer(create_app(policy, store, chat_options, ops=ops, admin_token=token))


def test_admin_without_the_slash_reaches_the_console(tiny_loaded, store, chat_options):
    with serve_with(tiny_loaded, store, chat_options, TOKEN) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.get("/admin")
        assert r.status_code in (301, 302, 307, 308) and r.headers["location"] == "admin/"
        r = client.get("/admin", follow_redirects=True)
        assert r.status_code == 200 and r.url.path == "/admin/" and "<html" in r.text.lower()
        assert client.get("/admin/config").status_code == 401  # the console's own login, not the chat page
        assert client.get("/").status_code == 200


def test_without_a_token_both_spellings_say_the_console_is_off(tiny_loaded, store, chat_options):
    with serve_with(tiny_loaded, store, chat_options, None) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/admin", "/admin/"):
            r = client.get(path)
            assert r.status_code == 403 and "--admin-token" in r.text


@pytest.mark.parametrize("method,path", [("POST", "/gradio_api/call/nope"), ("POST", "/gradio_api/call/nope/"),
                                         ("POST", "/gradio_api/call/v2/nope"),
                                         ("GET", "/gradio_api/call/nope/some-event")])
def test_an_unknown_page_endpoint_is_a_404(server, method, path):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.request(method, path, json={"data": []} if method == "POST" else None)
        assert r.status_code == 404 and "no endpoint named 'nope'" in r.json()["detail"]
        known = client.post("/gradio_api/call/new_chat", json={"data": []})
        assert known.status_code == 200 and known.json()["event_id"]


def test_an_unknown_console_endpoint_is_a_404(tiny_loaded, store, chat_options):
    with serve_with(tiny_loaded, store, chat_options, TOKEN) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/admin/gradio_api/call/nope", json={"data": []}).status_code == 404
