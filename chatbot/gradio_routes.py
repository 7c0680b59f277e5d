"""Where Gradio's own routes would answer a client's mistake with a 500.

``POST /gradio_api/call/<name>`` (and ``/call/v2/<name>``) for a name that
no event of the page has makes Gradio raise, and the client gets "Internal
Server Error". `UnknownEndpoints` answers it with a 404 instead, in Gradio's
own error shape (``{"detail": ...}``).
"""

from __future__ import annotations

import json
import re

CALL = re.compile(r"^/gradio_api/call/(?:v2/)?(?P<name>[^/]+)")


def api_names(blocks) -> set[str]:
    return {fn.api_name for fn in blocks.fns.values() if getattr(fn, "api_name", None)}


class UnknownEndpoints:
    """ASGI middleware in front of the Gradio pages: `pages` maps each page's
    mount path ("" for the root) to its `gr.Blocks`."""

    def __init__(self, app, *, pages: dict):
        self.app = app
        self.pages = sorted(pages.items(), key=lambda item: -len(item[0]))  # /admin before the root

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            for prefix, blocks in self.pages:
                if not path.startswith(prefix + "/gradio_api/call/"):
                    continue
                match = CALL.match(path[len(prefix):])
                if match and match["name"] not in api_names(blocks):
                    return await _not_found(send, match["name"])
                break
        await self.app(scope, receive, send)


async def _not_found(send, name: str) -> None:
    payload = json.dumps({"detail": f"no endpoint named {name!r}"}).encode()
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
