"""The real server process: it follows promotions made from the command line,
and after SIGKILL it comes back on the recorded version with every
acknowledged thumb and its schedule state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "process-test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir, model, port, log):
    env = {**os.environ, "CHATBOT_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "serve", "--data-dir", str(data_dir), "--model", str(model),
         "--port", str(port), "--device", "cpu", "--retrain-every", "3600", "--follow-every", "0.5",
         "--max-new-tokens", "8"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("the server did not start: " + Path(log.name).read_text()[-3000:])


def _cli(*args, data_dir):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)


def _version(url) -> str:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.mark.slow
def test_server_follows_the_command_line_and_survives_sigkill(data_dir, tiny_model_dir, tmp_path):
    from storage import Store

    from conftest import make_adapter

    store = Store.in_data_dir(data_dir)
    for seed, version in ((1, "v1"), (2, "v2")):
        path = make_adapter(tiny_model_dir, data_dir / "adapters" / version, seed, str(tiny_model_dir))
        store.register_adapter(version, path=str(path), base_model=str(tiny_model_dir))
    store.promote("v1")
    port = _free_port()
    with open(tmp_path / "server.log", "wb") as log:
        proc, url = _start(data_dir, tiny_model_dir, port, log)
        try:
            assert _version(url) == "v1"  # came up on the recorded version
            # A promotion from the command line reaches the running server.
            assert _cli("promote", "v2", data_dir=data_dir).returncode == 0
            deadline = time.monotonic() + 10
            while _version(url) != "v2":
                assert time.monotonic() < deadline, "the server did not pick up the promotion"
                time.sleep(0.2)
            # Chat, thumbs, pause: each acknowledged, then the server is killed.
            acknowledged = []
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(5):
                    reply = client.post("/v1/chat/completions",
                                        json={"messages": [{"role": "user", "content": f"hi {i}"}]}).json()
                    assert reply["model"] == "v2"
                    r = client.post("/v1/feedback", json={"response_id": reply["id"], "value": 1 if i % 2 else -1})
                    assert r.status_code == 200
                    acknowledged.append(r.json()["id"])
                r = client.post("/v1/admin/schedule", json={"action": "pause"},
                                headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.status_code == 200 and r.json()["paused"] is True
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

        proc, url = _start(data_dir, tiny_model_dir, port, log)
        try:
            assert _version(url) == "v2"
            status = httpx.get(url + "/v1/admin/status", headers={"Authorization": f"Bearer {TOKEN}"},
                               timeout=10).json()
            assert status["schedule"]["paused"] is True and status["schedule"]["next_check_at"]
            assert status["feedback_by_value"] == {"up": 2, "down": 3}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    rows = [r["id"] for r in Store.in_data_dir(data_dir).feedback_since(0)]
    assert rows == acknowledged
    assert json.loads(_cli("status", data_dir=data_dir).stdout)["active_version"] == "v2"


@pytest.mark.slow
def test_a_server_restarted_on_a_broken_active_adapter_comes_up_on_the_last_version_that_loads(
        data_dir, tiny_model_dir, tmp_path):
    from storage import Store

    from conftest import make_adapter

    store = Store.in_data_dir(data_dir)
    for seed, version in ((1, "v1"), (2, "v2")):
        path = make_adapter(tiny_model_dir, data_dir / "adapters" / version, seed, str(tiny_model_dir))
        store.register_adapter(version, path=str(path), base_model=str(tiny_model_dir))
        store.promote(version)
    (data_dir / "adapters" / "v2" / "adapter.json").write_text('{"version": "v2",')  # a disk that filled up
    with open(tmp_path / "server.log", "wb") as log:
        proc, url = _start(data_dir, tiny_model_dir, _free_port(), log)
        try:
            assert _version(url) == "v1"
            serving = httpx.get(url + "/v1/admin/status", headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=10).json()["serving"]
            assert serving["fallback"]["active"] == "v1" and serving["error"] is None
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    logged = (tmp_path / "server.log").read_text()
    assert "adapter.json is not readable JSON" in logged and "came up on v1" in logged
    assert "Traceback" not in logged
    assert json.loads(_cli("status", data_dir=data_dir).stdout)["active_version"] == "v1"
    fallback = store.activations()[0]
    assert (fallback["action"], fallback["version"], fallback["previous"]) == ("fallback", "v1", "v2")
