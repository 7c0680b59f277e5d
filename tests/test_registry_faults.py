"""A registry that survives bad files: every kind of broken adapter is refused
by promote and rollback (HTTP 409, one line from the command line) with the
active version unchanged; a server restarted on one comes up on the last
version that loads and records the fallback; a follower told to serve one
logs why once and keeps serving."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

import app as cli
from conftest import greedy_reply, make_adapter
from tests.test_hot_swap import TOKEN, _Scheduler

PROMPT = "how are you"


def _rewrite_weights(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    weights = load_file(file)
    name = sorted(k for k in weights if "lora_A" in k)[0]
    weights[name] = change(weights[name])
    save_file(weights, file, metadata={"format": "pt"})


def _with_value(value):
    def change(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[3] = value
        return tensor

    return change


def _wider(tensor):
    import torch

    return torch.zeros(tensor.shape[0], tensor.shape[1] + 8)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:200])


# Each kind of broken adapter: how it is broken, and what the check says about it.
BREAKS = {
    "malformed adapter.json": (lambda p: (p / "adapter.json").write_text('{"version": "v3", "base_model": '),
                               "adapter.json is not readable JSON"),
    "malformed adapter_config.json": (lambda p: (p / "adapter_config.json").write_text("{r: 4"),
                                      "adapter_config.json is not readable JSON"),
    "missing weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "no weights file"),
    "truncated weights": (lambda p: _truncate(p / "adapter_model.safetensors"), "cannot read the weights"),
    "wrong shapes": (lambda p: _rewrite_weights(p, _wider), "weights do not fit the base"),
    "NaN weights": (lambda p: _rewrite_weights(p, _with_value(float("nan"))), "not all finite"),
    "inf weights": (lambda p: _rewrite_weights(p, _with_value(float("inf"))), "not all finite"),
}


def test_the_check_names_what_is_wrong(good, tmp_path, tiny_trained):
    import shutil

    from chatbot.adapters import AdapterLoadError, check_on_disk

    check = lambda path: check_on_disk("v9", path, base_model=str(tiny_trained), data_dir=tmp_path)  # noqa: E731
    assert check(good["v1"]).weights  # a sound adapter passes
    listed = shutil.copytree(good["v1"], tmp_path / "listed")
    (listed / "adapter.json").write_text("[]")
    with pytest.raises(AdapterLoadError, match="adapter.json holds list, not a JSON object"):
        check(listed)
    elsewhere = shutil.copytree(good["v1"], tmp_path / "elsewhere")
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(AdapterLoadError, match="its config does not fit the base"):
        check(elsewhere)
    with pytest.raises(AdapterLoadError, match="directory .* does not exist"):
        check(tmp_path / "nowhere")
    # The expected shapes are kept per adapter config: a config of another
    # rank is checked against its own, and the first one's still hold.
    ranked = shutil.copytree(good["v1"], tmp_path / "ranked")
    (ranked / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    with pytest.raises(AdapterLoadError, match="weights do not fit the base"):
        check(ranked)
    assert check(good["v1"]).weights


@pytest.fixture(scope="module")
def good(tiny_trained, tmp_path_factory):
    """Sound adapters v1-v3, copied into each test's data directory."""
    root = tmp_path_factory.mktemp("good-adapters")
    return {v: make_adapter(tiny_trained, root / v, seed, str(tiny_trained))
            for seed, v in ((1, "v1"), (2, "v2"), (3, "v3"))}


@pytest.fixture(scope="module")
def replies(tiny_trained, good):
    """Each version's greedy reply, from separate copies of the model loaded by peft itself."""
    from peft import PeftModel

    from chatbot.models import load_model

    out = {}
    for version in ("v0", "v1", "v2", "v3"):
        loaded = load_model(str(tiny_trained), tiny_trained, device="cpu")
        model = loaded.model
        if version != "v0":
            model = PeftModel.from_pretrained(model, str(good[version])).eval()
        out[version] = greedy_reply(model, loaded.tokenizer, PROMPT)
    assert len(set(out.values())) == 4, "each version must write its own reply"
    return out


@pytest.fixture
def registry(store, data_dir, good, tiny_trained):
    """v1, v2, v3 registered in the data directory and promoted in turn: v3 is active."""
    import shutil

    for version, path in good.items():
        copy = data_dir / "adapters" / version
        shutil.copytree(path, copy)
        store.register_adapter(version, path=str(copy), base_model=str(tiny_trained))
    for version in ("v1", "v2", "v3"):
        store.promote(version)
    return {v: data_dir / "adapters" / v for v in good}


def _restart(store, tiny_trained, chat_options):
    """A fresh serving process's objects over the data directory, as `app.py serve` builds them."""
    from chatbot.models import load_model
    from chatbot.server import build_serving

    loaded = load_model(str(tiny_trained), tiny_trained, device="cpu")
    return build_serving(store, loaded, _Scheduler(store), chat_options, admin_token=TOKEN)


def _served(serving):
    from chatbot.server import BackgroundServer

    with BackgroundServer(serving.app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                      "temperature": 0, "max_tokens": 12})
        r.raise_for_status()
        return r.json()["model"], r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("kind", BREAKS)
def test_a_restart_on_a_broken_active_adapter_serves_the_last_good_version(
        kind, registry, store, tiny_trained, chat_options, replies, caplog):
    breaker, reason = BREAKS[kind]
    breaker(registry["v3"])
    with caplog.at_level(logging.WARNING, logger="chatbot.swap"):
        serving = _restart(store, tiny_trained, chat_options)
    assert serving.policy.version == "v2" and store.active_version() == "v2"
    assert _served(serving) == ("v2", replies["v2"])
    fallback = store.activations()[0]
    assert (fallback["action"], fallback["version"], fallback["previous"]) == ("fallback", "v2", "v3")
    assert reason in fallback["reason"] and fallback["reason"].startswith("v3 does not load")
    assert reason in store.get_adapter("v3")["reason"]
    assert any(reason in r.getMessage() and "came up on v2" in r.getMessage() for r in caplog.records)
    # The next restart finds the registry and what serves in agreement: nothing more is recorded.
    again = _restart(store, tiny_trained, chat_options)
    assert again.policy.version == "v2" and again.follower.fallback is None
    assert [a["action"] for a in store.activations()].count("fallback") == 1


def test_a_fallback_walks_back_past_every_version_that_does_not_load(
        registry, store, tiny_trained, chat_options, replies):
    BREAKS["NaN weights"][0](registry["v3"])
    BREAKS["missing weights"][0](registry["v2"])
    serving = _restart(store, tiny_trained, chat_options)
    assert serving.policy.version == "v1" and store.active_version() == "v1"
    assert _served(serving) == ("v1", replies["v1"])
    BREAKS["wrong shapes"][0](registry["v1"])
    serving = _restart(store, tiny_trained, chat_options)
    assert serving.policy.version == "v0" and store.active_version() == "v0"
    assert [(a["action"], a["version"], a["previous"]) for a in store.activations()][:2] == [
        ("fallback", "v0", "v1"), ("fallback", "v1", "v3")]


def test_rollback_after_a_fallback_skips_the_version_that_broke(registry, store, tiny_trained, chat_options):
    BREAKS["malformed adapter.json"][0](registry["v3"])
    _restart(store, tiny_trained, chat_options)
    assert store.active_version() == "v2"
    assert store.rollback_target() == "v1"  # what was active before v2 was promoted, not the broken v3


def test_a_server_on_another_base_falls_back_without_changing_the_registry(
        registry, store, tiny_trained, tiny_model_dir, chat_options):
    from chatbot.models import load_model
    from chatbot.server import build_serving

    loaded = load_model(str(tiny_model_dir), tiny_model_dir, device="cpu")
    serving = build_serving(store, loaded, _Scheduler(store), chat_options)
    assert serving.policy.version == "v0"
    assert store.active_version() == "v3" and store.activations()[0]["action"] == "promote"
    assert "was trained on base" in serving.follower.state()["error"]["error"]


@pytest.mark.parametrize("kind", BREAKS)
def test_promote_or_rollback_to_a_broken_adapter_is_409_and_changes_nothing(
        kind, registry, store, tiny_trained, chat_options):
    from chatbot.server import BackgroundServer

    store.rollback(to="v1")
    serving = _restart(store, tiny_trained, chat_options)
    breaker, reason = BREAKS[kind]
    breaker(registry["v3"])
    before = store.activations()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with BackgroundServer(serving.app) as server, httpx.Client(base_url=server.url, timeout=60,
                                                               headers=headers) as client:
        for path, body in (("/v1/admin/promote", {"version": "v3"}), ("/v1/admin/rollback", {"to": "v3"})):
            r = client.post(path, json=body)
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert error["code"] == "adapter_failed_check"
            assert reason in error["message"] and error["message"].endswith("v1 stays active")
        assert client.post("/v1/admin/promote", json={"version": "v2"}).json()["serving_version"] == "v2"
    assert store.activations()[1:] == before and store.active_version() == "v2"


@pytest.mark.parametrize("kind", BREAKS)
def test_the_command_line_refuses_a_broken_adapter_in_one_line(kind, registry, store, data_dir, capsys):
    store.rollback(to="v1")
    breaker, reason = BREAKS[kind]
    breaker(registry["v3"])
    before = store.activations()
    for args in (["promote", "v3"], ["rollback", "--to", "v3"]):
        assert cli.main([*args, "--data-dir", str(data_dir)]) == 1
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith("error: adapter v3") and reason in line and line.endswith("v1 stays active")
        assert captured.out == ""
    assert store.activations() == before and store.active_version() == "v1"
    # A sound adapter still goes through, checked against its base's config.
    assert cli.main(["promote", "v2", "--data-dir", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "v2"


@pytest.mark.parametrize("kind", ["malformed adapter.json", "NaN weights"])
def test_a_follower_told_to_serve_a_broken_adapter_logs_once_and_keeps_serving(
        kind, registry, store, tiny_trained, chat_options, good, replies, caplog):
    import shutil
    import time

    store.rollback(to="v2")
    serving = _restart(store, tiny_trained, chat_options)
    breaker, reason = BREAKS[kind]
    breaker(registry["v3"])
    follower = serving.follower
    follower.interval_s = 0.02
    polls, sync = [], follower.sync
    follower.sync = lambda: polls.append(1) or sync()  # counts the polling thread's checks
    with caplog.at_level(logging.INFO, logger="chatbot.swap"):
        store.promote("v3")  # by another process, which did not check
        follower.start()
        try:
            deadline = time.monotonic() + 30
            while len(polls) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(polls) >= 20
            assert serving.policy.version == "v2" and follower.state()["error"]["version"] == "v3"
            assert _served(serving) == ("v2", replies["v2"])
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and reason in errors[0] and "still serving v2" in errors[0]
            # Sound files written in place are picked up at the next poll.
            shutil.rmtree(registry["v3"])
            shutil.copytree(good["v3"], registry["v3"])
            deadline = time.monotonic() + 10
            while serving.policy.version != "v3" and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            follower.stop()
    assert serving.policy.version == "v3" and follower.state()["error"] is None
    assert _served(serving) == ("v3", replies["v3"])
    assert store.active_version() == "v3"
