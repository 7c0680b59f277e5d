"""Hot-swap into the live bot, following the registry, restart on the active
version, and the operator API's token."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

TOKEN = "test-admin-token-0123456789"
from conftest import PROMPTS, make_adapter


def _register(store, adapters, base_model):
    for version, path in adapters.items():
        store.register_adapter(version, path=str(path), base_model=base_model)


class _Scheduler:
    """Stands in for the retrain scheduler: records what it was asked."""

    def __init__(self, store):
        self.store, self.asked = store, []

    def retrain_now(self, method, trigger="operator"):
        self.asked.append(method)
        return {"started": True, "pid": 1, "method": method}

    def pause(self):
        self.store.set_setting("schedule_paused", True)

    def resume(self):
        self.store.set_setting("schedule_paused", False)

    def state(self):
        return {"paused": bool(self.store.get_setting("schedule_paused", False))}


@pytest.fixture
def live(tiny_trained, store, chat_options, adapters):
    """A served app with the operator surface on, following the registry."""
    from chatbot.admin import Operations
    from chatbot.models import load_model
    from chatbot.policy import Policy
    from chatbot.server import BackgroundServer, create_app
    from chatbot.swap import VersionFollower

    _register(store, adapters, str(tiny_trained))
    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))
    follower = VersionFollower(policy, store, interval_s=0.2)
    follower.sync()
    scheduler = _Scheduler(store)
    app = create_app(policy, store, chat_options, ops=Operations(store, follower, scheduler), admin_token=TOKEN)
    follower.start()
    with BackgroundServer(app) as server:
        yield server, policy, follower, scheduler
    follower.stop()


def _chat(client, prompt, stream):
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12,
            "stream": stream}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return data["model"], data["choices"][0]["message"]["content"]
    text, model = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            assert model in (None, chunk["model"]), "every chunk names the version that writes the reply"
            model = chunk["model"]
            text += chunk["choices"][0]["delta"].get("content") or ""
    return model, text.strip()


def _page_chat(client, prompt):
    """One greedy reply through the chat page (Gradio's client), in a new chat."""
    import html

    client.predict(api_name="/new_chat")
    _box, chat = client.predict(prompt, 12, 0.0, "", api_name="/chat")
    shown = chat["value"][-1]["content"][0]["text"]
    text, _, label = shown.rpartition("\n\n<sub>model ")
    return label.removesuffix("</sub>"), html.unescape(text).replace("\u200b", "").strip()


def _hang_up(client, prompt):
    """A streamed reply the client leaves after its first piece."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return


def test_swaps_under_concurrent_chat_fail_no_request_and_label_every_reply_right(live, expected, store):
    """API clients (streaming and not), a client that hangs up mid-stream and
    a person on the page share the batch while versions are promoted."""
    from gradio_client import Client

    server, policy, follower, _ = live
    results, errors, done = [], [], threading.Event()

    def client_loop(worker: int):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            page = Client(server.url + "/", verbose=False) if worker == 4 else None
            i = 0
            while not done.is_set():
                prompt = PROMPTS[(worker + i) % len(PROMPTS)]
                try:
                    if page is not None:
                        results.append((prompt, *_page_chat(page, prompt)))
                    elif worker == 5:
                        _hang_up(client, prompt)
                    else:
                        results.append((prompt, *_chat(client, prompt, stream=(worker + i) % 2 == 0)))
                except Exception as exc:  # noqa: BLE001 - counted as a failed request
                    errors.append(repr(exc))
                i += 1

    workers = [threading.Thread(target=client_loop, args=(w,)) for w in range(6)]
    for w in workers:
        w.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=server.url, timeout=60, headers=headers) as admin:
            for i, version in enumerate(["v1", "v2", "v0", "v2", "v1", "v0", "v1", "v2"]):
                time.sleep(0.3)
                if i % 2:  # half through the operator API (swaps at once) ...
                    r = admin.post("/v1/admin/promote", json={"version": version})
                    assert r.status_code == 200 and r.json()["serving_version"] == version, r.text
                else:  # ... half through the database alone, as the command line does
                    store.promote(version)
                    deadline = time.monotonic() + 10
                    while policy.version != version and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert policy.version == version
        time.sleep(0.3)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=60)
    assert errors == []
    assert len(results) >= 20
    seen = {version for _, version, _ in results}
    assert seen == {"v0", "v1", "v2"}
    # Every reply is exactly what its labelled version writes: it was written
    # start to finish by that version, and labelled with it.
    wrong = [(p, v, t) for p, v, t in results if t != expected[v][p]]
    assert wrong == []
    assert follower.state()["swaps"] == 8
    # The reply rows in the database carry the same labels.
    with store.connection() as db:
        rows = list(db.query("SELECT model_version, COUNT(*) AS n FROM responses GROUP BY model_version"))
    assert {r["model_version"] for r in rows} == {"v0", "v1", "v2"}


def test_restart_comes_up_on_the_recorded_active_version(tiny_trained, store, adapters, expected):
    from chatbot.models import load_model
    from chatbot.policy import GenerationSettings, Policy
    from chatbot.swap import VersionFollower

    _register(store, adapters, str(tiny_trained))
    store.promote("v2")
    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))  # a fresh process's model
    VersionFollower(policy, store).sync()
    assert policy.version == "v2"
    reply = policy.generate([{"role": "user", "content": PROMPTS[0]}], GenerationSettings(temperature=0, max_new_tokens=12))
    assert reply.version == "v2" and reply.text == expected["v2"][PROMPTS[0]]


def test_an_adapter_that_cannot_load_leaves_the_old_version_serving(tiny_trained, store, adapters, tmp_path):
    from chatbot.models import load_model
    from chatbot.policy import Policy
    from chatbot.swap import VersionFollower

    _register(store, adapters, str(tiny_trained))
    foreign = make_adapter(tiny_trained, tmp_path / "v3", 3, base_model="some/other-model")
    store.register_adapter("v3", path=str(foreign), base_model="some/other-model")
    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))
    follower = VersionFollower(policy, store)
    store.promote("v1")
    follower.sync()
    store.promote("v3")
    assert follower.sync() is None
    assert policy.version == "v1"
    assert "trained on base 'some/other-model'" in follower.state()["error"]["error"]
    # A half-written adapter directory (what a killed training run leaves) is
    # never registered, so never loaded; the next promotion clears the error.
    (tmp_path / ".run-9.partial").mkdir()
    store.promote("v2")
    follower.sync()
    assert policy.version == "v2" and follower.state()["error"] is None


def test_a_promotion_reads_the_adapter_once_unless_its_files_change_in_between(tiny_trained, adapters, tmp_path,
                                                                               monkeypatch):
    import os
    import shutil

    from chatbot.models import load_model
    from chatbot.policy import Policy

    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))
    reads = []
    read = policy._read_adapter
    monkeypatch.setattr(policy, "_read_adapter", lambda v, p: reads.append(v) or read(v, p))
    policy.check_adapter("v1", str(adapters["v1"]))  # the operator API checks before it promotes ...
    policy.swap_to("v1", str(adapters["v1"]))  # ... and the swap loads what the check read
    assert reads == ["v1"] and policy.version == "v1"
    # Files rewritten between the check and the swap are read again.
    copy = shutil.copytree(adapters["v2"], tmp_path / "v2")
    policy.check_adapter("v2", str(copy))
    weights = next(f for f in copy.iterdir() if f.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    policy.swap_to("v2", str(copy))
    assert reads == ["v1", "v2", "v2"] and policy.version == "v2"


def test_later_promotions_copy_into_the_spare_adapter_and_write_what_each_version_writes(
        tiny_trained, adapters, expected, tmp_path, monkeypatch):
    """The first promotions add an adapter; once a version is replaced, its
    adapter is kept as the spare and the next versions are copied into it
    off the step lock: no adapter is added again, each slot ends up holding
    other versions' weights, and every reply is still what that version
    writes alone. Back to v0, nothing stays loaded."""
    from peft import PeftModel

    from chatbot.models import GenerationSettings, load_model
    from chatbot.policy import Policy
    from conftest import greedy_reply

    paths = {**adapters, "v3": make_adapter(tiny_trained, tmp_path / "v3", 3, str(tiny_trained))}
    alone = load_model(str(tiny_trained), tiny_trained, device="cpu")
    v3 = PeftModel.from_pretrained(alone.model, str(paths["v3"])).eval()
    replies = {**expected, "v3": {p: greedy_reply(v3, alone.tokenizer, p) for p in PROMPTS[:2]}}
    assert replies["v3"][PROMPTS[0]] not in (expected["v1"][PROMPTS[0]], expected["v2"][PROMPTS[0]])

    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))
    greedy = GenerationSettings(temperature=0, max_new_tokens=12)
    infos = [policy.swap_to("v1", str(paths["v1"])), policy.swap_to("v2", str(paths["v2"]))]
    added = []
    add = policy.model.add_adapter
    monkeypatch.setattr(policy.model, "add_adapter", lambda *a, **k: added.append(a[0]) or add(*a, **k))
    for version in ("v3", "v1", "v2"):
        infos.append(policy.swap_to(version, str(paths[version])))
        for prompt in PROMPTS[:2]:
            reply = policy.generate([{"role": "user", "content": prompt}], greedy)
            assert (reply.version, reply.text) == (version, replies[version][prompt])
        assert policy.loaded_versions() == [version] and len(policy.model.peft_config) == 2  # serving + spare
    assert added == [] and [i["into_spare"] for i in infos] == [False, False, True, True, True]
    policy.swap_to("v0")
    assert policy.loaded_versions() == [] and not hasattr(policy.model, "peft_config")
    assert policy.generate([{"role": "user", "content": PROMPTS[0]}], greedy).text == expected["v0"][PROMPTS[0]]


ROUTES = [("GET", "/v1/admin/status", None), ("POST", "/v1/admin/retrain", {"method": "kto"}),
          ("POST", "/v1/admin/promote", {"version": "v1"}), ("POST", "/v1/admin/rollback", {}),
          ("POST", "/v1/admin/schedule", {"action": "pause"})]


def test_operator_routes_refuse_without_the_right_token_and_do_nothing(live, store):
    server, policy, _, scheduler = live
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            for method, path, body in ROUTES:
                r = client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
        # the console asks for a login too
        assert client.get("/admin/config").status_code in (401, 403)
    assert scheduler.asked == [] and store.active_version() == "v0" and policy.version == "v0"
    assert store.get_setting("schedule_paused") is None and store.activations() == []


def test_operator_routes_work_with_the_token(live, store):
    server, policy, _, scheduler = live
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as client:
        status = client.get("/v1/admin/status").json()
        assert status["active_version"] == "v0" and status["serving"]["serving_version"] == "v0"
        assert {"feedback", "feedback_by_value", "recent_runs", "schedule"} <= set(status)
        assert client.post("/v1/admin/retrain", json={"method": "kto"}).status_code == 202
        assert scheduler.asked == ["kto"]
        assert client.post("/v1/admin/retrain", json={"method": "sft"}).status_code == 400
        r = client.post("/v1/admin/promote", json={"version": "v2"})
        assert r.json()["serving_version"] == "v2" and policy.version == "v2"
        swap = r.json()["swap"]  # how long the swap held the batch, for the operator
        assert swap["version"] == "v2" and 0 <= swap["wait_s"] + swap["switch_s"] <= swap["total_s"]
        r = client.post("/v1/admin/promote", json={"version": "v9"})
        assert r.status_code == 404 and "no adapter 'v9'" in r.json()["error"]["message"]
        assert client.post("/v1/admin/rollback", json={}).json()["serving_version"] == "v0"
        assert client.post("/v1/admin/rollback", json={"to": "v1"}).json()["active"] == "v1"
        assert client.post("/v1/admin/schedule", json={"action": "pause"}).json()["paused"] is True
        assert client.get("/v1/admin/status").json()["schedule_paused"] is True
        assert client.post("/v1/admin/schedule", json={"action": "resume"}).json()["paused"] is False
        assert client.post("/v1/admin/schedule", json={"action": "stop"}).status_code == 400


def test_without_a_token_the_operator_surface_is_off(tiny_loaded, store, chat_options):
    from chatbot.admin import Operations
    from chatbot.policy import Policy
    from chatbot.server import BackgroundServer, create_app
    from chatbot.swap import VersionFollower

    policy = Policy(tiny_loaded)
    ops = Operations(store, VersionFollower(policy, store), _Scheduler(store))
    with BackgroundServer(create_app(policy, store, chat_options, ops=ops, admin_token=None)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for method, path, body in ROUTES:
                r = client.request(method, path, json=body, headers={"Authorization": "Bearer anything-at-all-x"})
                assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
            assert client.get("/admin").status_code == 403
            assert client.get("/").status_code == 200  # the chat is unaffected
    assert store.get_setting("schedule_paused") is None


def test_admin_token_must_be_long_enough():
    from chatbot.admin import check_token

    assert check_token(None) is None and check_token("  ") is None
    with pytest.raises(ValueError, match="at least 16 characters"):
        check_token("short")
