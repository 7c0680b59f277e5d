"""The key the chat page's saved conversations are encrypted with.

The page keeps each browser's session id and conversation in the browser
(`gr.BrowserState`), encrypted with this key. A key made anew at each start
would make every saved conversation unreadable after a restart, so it is
made once and kept in the data directory, readable by its owner only (0600),
or taken from ``$CHATBOT_BROWSER_SECRET`` (the same value on every replica
behind a load balancer).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_ENV = "CHATBOT_BROWSER_SECRET"
SECRET_FILE = "browser-secret"


def browser_secret(data_dir: str | os.PathLike) -> str:
    """The environment's secret if set, else the data directory's, made on first use."""
    from_env = os.environ.get(SECRET_ENV, "").strip()
    if from_env:
        return from_env
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        _create(path)
    if path.stat().st_mode & 0o077:  # copied in with looser permissions
        path.chmod(0o600)
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise ValueError(f"{path} is empty: remove it and a new secret is made at the next start")
    return secret


def _create(path: Path) -> None:
    """Write a new secret to a private file, then link it into place: two
    servers starting at once on one data directory end up with the same one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            fp.write(secrets.token_urlsafe(32) + "\n")
        os.link(scratch, path)
    except FileExistsError:
        pass  # another process made it first: theirs is the one
    finally:
        scratch.unlink(missing_ok=True)
