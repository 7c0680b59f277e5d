"""A real browser: headless Chromium (Debian's package) driven by Playwright.

Without a browser installed the test is skipped with the command that
installs one, so that a newcomer's `python -m pytest` passes; under CI (the
`CI` environment variable set, as `.ci/run` runs) a missing browser fails it
instead, since `.ci/run` installs one.
"""

import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def need_a_browser() -> None:
    if not Path(CHROMIUM).exists():
        install = "apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"no browser at {CHROMIUM}: .ci/run installs one ({install})")
        pytest.skip(f"no browser installed: `{install}` (Debian's Chromium) to run this test")


def send(page, url: str, text: str):
    """Open the chat page and send `text`; the newest bot reply."""
    page.goto(url + "/")
    box = page.locator("#message textarea")
    box.wait_for(timeout=60_000)
    box.fill(text)
    box.press("Enter")
    return page.locator("#chat .message.bot, #chat [data-testid='bot']").last


def box_of(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def check_layout(page, width: int) -> None:
    """The message box spans the chat's width with Send beside it, on one
    line; Stop is hidden while nothing is being written; nothing overflows
    sideways (a phone's width included)."""
    chat, message, send_button = box_of(page, "#chat"), box_of(page, "#message"), box_of(page, "#send")
    assert message["width"] + send_button["width"] >= 0.85 * chat["width"], (width, chat, message, send_button)
    assert abs((message["y"] + message["height"] / 2) - (send_button["y"] + send_button["height"] / 2)) < 24
    assert send_button["x"] > message["x"] + message["width"] - 4
    assert not page.locator("#stop").first.is_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, (width, overflow)


@pytest.fixture
def trained_server(tiny_trained, store, chat_options):
    """The whole app on the tiny trained model, which writes word-like replies
    (the screenshots in docs/ show them)."""
    from chatbot.models import load_model
    from chatbot.policy import Policy
    from chatbot.server import BackgroundServer, create_app

    app = create_app(Policy(load_model(str(tiny_trained), tiny_trained, device="cpu")), store, chat_options)
    with BackgroundServer(app) as running:
        yield running


@pytest.mark.slow
def test_chat_in_a_real_browser(trained_server, store, tmp_path):
    from playwright.sync_api import sync_playwright

    need_a_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: (errors.append("dialog: " + dialog.message), dialog.dismiss()))
            server = trained_server
            bot = send(page, server.url,
                       "Hello <b>there</b> <img src=x onerror=alert(1)> [your bank](https://evil.example/login)")
            bot.wait_for(timeout=60_000)
            wait_for(lambda: "model v0" in bot.inner_text(), what="the finished reply with its version label")
            response = wait_for(lambda: store.counts()["responses"] == 1 and
                                _first_response(store), what="the response row")
            assert response["reply"].split()[0] in bot.inner_text()
            # What the person typed is shown as text, not run as HTML.
            user_text = page.locator("#chat .message.user, #chat [data-testid='user']").last.inner_text()
            assert "<img src=x onerror=alert(1)>" in user_text
            # A markdown link is shown as written: no link hides its address.
            assert "[your bank]" in user_text and "https://evil.example/login" in user_text
            links = page.eval_on_selector_all("#chat a[href]", "links => links.map(a => [a.textContent, a.href])")
            assert all(urlparse(href).netloc in text for text, href in links), links

            page.get_by_label("Dislike").last.click()
            row = wait_for(lambda: (store.feedback_since(0) or [None])[-1], what="the feedback row")
            assert (row["response_id"], row["value"]) == (response["id"], -1)
            assert row["session_id"] == response["session_id"] and row["session_id"].startswith("web-")

            # the comment box opens under the chat once a reply is rated
            wait_for(lambda: page.locator("#comment textarea, #comment input").first.is_visible(),
                     what="the comment box")
            # Screenshots at a desktop's and a phone's width: into docs/ with
            # CHATBOT_SCREENSHOTS=docs (how docs/chat.png is made), else a scratch directory.
            out = Path(os.environ.get("CHATBOT_SCREENSHOTS") or tmp_path)
            for name, width, height in (("chat.png", 1100, 900), ("chat-phone.png", 390, 844)):
                page.set_viewport_size({"width": width, "height": height})
                page.wait_for_timeout(500)
                check_layout(page, width)
                page.screenshot(path=str(out / name))
                assert (out / name).read_bytes().startswith(b"\x89PNG")
            assert errors == []
        finally:
            browser.close()


def _first_response(store) -> dict:
    with store.connection() as db:
        return list(db.query("SELECT * FROM responses"))[0]


@pytest.mark.slow
def test_a_saved_conversation_survives_a_restart(tiny_loaded, chat_options, data_dir):
    """The page saves its conversation in the browser, encrypted with the
    data directory's key: a restarted server on the same data directory
    reads it back on reload."""
    from playwright.sync_api import sync_playwright

    from chatbot.policy import Policy
    from chatbot.server import BackgroundServer, create_app
    from storage import Store

    need_a_browser()

    def start(port=0):
        return BackgroundServer(create_app(Policy(tiny_loaded), Store.in_data_dir(data_dir), chat_options),
                                port=port).__enter__()

    server = start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            bot = send(page, server.url, "Remember me")
            wait_for(lambda: "model v0" in bot.inner_text(), what="the reply")
            time.sleep(1)  # the browser saves the state after the reply
            server.__exit__(None, None, None)
            server = start(int(server.url.rsplit(":", 1)[1]))  # same address: same browser storage
            page.reload()
            page.locator("#message textarea").wait_for(timeout=60_000)
            user = page.locator("#chat .message.user, #chat [data-testid='user']")
            wait_for(lambda: user.count() and "Remember me" in user.first.inner_text(),
                     what="the conversation restored after the restart")
        finally:
            browser.close()
            server.__exit__(None, None, None)
