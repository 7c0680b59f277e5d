"""Take docs/chat.png: the chat page on the starter model, in headless Chromium.

    python docs/screenshot.py [--data-dir data]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatbot.models import load_model  # noqa: E402
from chatbot.policy import GenerationSettings, Policy  # noqa: E402
from chatbot.server import BackgroundServer, create_app  # noqa: E402
from chatbot.ui import ChatOptions  # noqa: E402
from storage import Store  # noqa: E402

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    loaded = load_model("starter", args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.in_data_dir(tmp)
        options = ChatOptions(defaults=GenerationSettings(temperature=0.7))
        with BackgroundServer(create_app(Policy(loaded), store, options)) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1000, "height": 820})
            page.goto(server.url + "/")
            box = page.locator("#message textarea")
            for i, text in enumerate(("Hello", "How are you doing?", "What is AI?")):
                box.fill(text)
                box.press("Enter")
                deadline = time.monotonic() + 60
                while store.counts()["responses"] < i + 1 and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(0.5)
            page.get_by_label("Like").first.click()
            time.sleep(0.5)
            page.screenshot(path=str(ROOT / "docs" / "chat.png"))
            browser.close()
    print("wrote docs/chat.png")


if __name__ == "__main__":
    main()
