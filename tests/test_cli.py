import json
import subprocess
import sys
from pathlib import Path


import app

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    """Run app.py in a child process, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_status_on_an_empty_data_dir_creates_and_migrates(tmp_path):
    data_dir = tmp_path / "fresh"
    result = run_cli("status", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    status = json.loads(lines[0])
    assert status["active_version"] == "v0"
    for key in ("conversations", "responses", "feedback", "runs"):
        assert status[key] == 0
    assert (data_dir / "chatbot.db").is_file()


def test_status_reads_the_data_dir_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path / "from-env"))
    assert app.main(["status"]) == 0
    assert json.loads(capsys.readouterr().out)["database"] == str(tmp_path / "from-env" / "chatbot.db")


def test_status_counts_what_the_store_holds(data_dir, store, capsys):
    conv = store.start_conversation("s")
    rid = store.log_response(conversation_id=conv, prompt=[{"role": "user", "content": "Hi"}],
                             reply="Hello", model_version="v0")
    store.record_feedback(rid, 1, session_id="s")
    assert app.main(["status", "--data-dir", str(data_dir)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["conversations"], status["responses"], status["feedback"]) == (1, 1, 1)
    assert status["feedback_by_value"] == {"up": 1}


def test_status_shows_the_last_runs_rater_shares(data_dir, store, capsys):
    """A run records who holds the most of its data, before and after the
    rater bound, even one refused for too little feedback."""
    import pytest

    from online_rl.cycle import CycleConfig, NotEnoughFeedback, run_cycle

    assert app.main(["status", "--data-dir", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["rater_shares"] is None
    for session, n in (("loud", 12), ("quiet", 3)):
        for i in range(n):
            conv = store.start_conversation(session)
            rid = store.log_response(conversation_id=conv, prompt=[{"role": "user", "content": f"{session} {i}"}],
                                     reply="Hello", model_version="v0", session_id=session)
            store.record_feedback(rid, 1, session_id=session)
    config = CycleConfig(min_feedback=100, device="cpu")
    config.data.heldout_fraction = 0.0
    with pytest.raises(NotEnoughFeedback):
        run_cycle(store, data_dir=data_dir, config=config, progress=lambda line: None)
    assert app.main(["status", "--data-dir", str(data_dir)]) == 0
    shares = json.loads(capsys.readouterr().out)["rater_shares"]
    assert shares["run_id"] == store.runs(1)[0]["id"] and shares["max_rater_share"] == 0.05
    assert shares["thumbs"]["bound"] == 0.5 and shares["thumbs"]["raters"] == 2
    assert shares["thumbs"]["top"] == [
        {"rater": "session:loud", "rows": 12, "share_before": 0.8, "share_after": 0.5},
        {"rater": "session:quiet", "rows": 3, "share_before": 0.2, "share_after": 0.5}]
    assert [r["rater"] for r in shares["prompts"]["top"]] == ["session:loud", "session:quiet"]


def test_a_data_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    result = run_cli("status", "--data-dir", str(not_a_dir))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: --data-dir {str(not_a_dir)!r} is a file, not a directory"]


def test_a_corrupt_database_is_a_one_line_error(tmp_path):
    (tmp_path / "chatbot.db").write_bytes(b"this is not a database" * 100)
    result = run_cli("status", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot open the database")


def test_serve_with_an_unknown_model_is_a_one_line_error(tmp_path):
    result = run_cli("serve", "--data-dir", str(tmp_path), "--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot load model") and "does not exist" in line


def test_no_subcommand_means_serve(monkeypatch):
    parser = app.build_parser()
    assert parser.parse_args(["serve"]).model == "starter"
    seen = {}
    monkeypatch.setitem(app.COMMANDS, "serve", lambda args: seen.setdefault("args", args) and 0)
    app.main(["--port", "9999"])
    assert seen["args"].command == "serve" and seen["args"].port == 9999


def test_unknown_subcommand_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_export_writes_jsonl(data_dir, store, tmp_path, capsys):
    conv = store.start_conversation("s")
    rid = store.log_response(conversation_id=conv, prompt=[{"role": "user", "content": "Hi"}],
                             reply="Hello", model_version="v0")
    store.record_feedback(rid, -1, session_id="s")
    out = tmp_path / "out" / "fb.jsonl"
    assert app.main(["export", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 1
    assert json.loads(out.read_text())["label"] is False
