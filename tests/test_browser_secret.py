"""The key of the conversations the chat page saves in the browser is made
once per data directory (0600) or taken from $CHATBOT_BROWSER_SECRET, so a
restart does not make saved conversations unreadable."""

import stat
import threading

import gradio as gr
import pytest
from starlette.routing import Mount

from chatbot.browser_secret import SECRET_ENV, SECRET_FILE, browser_secret
from chatbot.policy import Policy
from chatbot.server import create_app
from storage import Store


@pytest.fixture(autouse=True)
def _no_secret_in_the_environment(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


def page_secret(app) -> str:
    """The key the chat page's BrowserState encrypts with."""
    (page,) = [route.app for route in app.routes if isinstance(route, Mount) and route.path == ""]
    (saved,) = [b for b in page.get_blocks().blocks.values() if isinstance(b, gr.BrowserState)]
    return saved.secret


def app_on(data_dir, tiny_loaded, chat_options):
    store = Store.in_data_dir(data_dir)
    try:
        return page_secret(create_app(Policy(tiny_loaded), store, chat_options))
    finally:
        store.close()


def test_two_apps_on_one_data_directory_share_the_secret(data_dir, tmp_path, tiny_loaded, chat_options):
    first, second = (app_on(data_dir, tiny_loaded, chat_options) for _ in range(2))
    assert first == second and len(first) >= 32
    assert app_on(tmp_path / "elsewhere", tiny_loaded, chat_options) != first
    path = data_dir / SECRET_FILE
    assert path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_environment_wins(data_dir, tiny_loaded, chat_options, monkeypatch):
    made = browser_secret(data_dir)
    monkeypatch.setenv(SECRET_ENV, "from-the-environment-0123456789")
    assert app_on(data_dir, tiny_loaded, chat_options) == "from-the-environment-0123456789" != made


def test_a_copied_file_is_made_private_again(data_dir):
    made = browser_secret(data_dir)
    (data_dir / SECRET_FILE).chmod(0o644)
    assert browser_secret(data_dir) == made
    assert stat.S_IMODE((data_dir / SECRET_FILE).stat().st_mode) == 0o600


def test_servers_starting_at_once_agree_on_one_secret(tmp_path):
    start, found = threading.Barrier(8), []

    def make():
        start.wait()
        found.append(browser_secret(tmp_path / "fresh"))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == [SECRET_FILE]  # no scratch files left
