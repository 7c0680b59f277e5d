"""What every part of the store shares: its errors, clock, hashing and JSON."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

DB_FILENAME = "chatbot.db"
BUSY_TIMEOUT_S = 30.0
BASE_VERSION = "v0"


class StoreError(Exception):
    """A request the store cannot honour; the message says why."""


class RunInProgress(StoreError):
    """Another retrain is still running."""


class ResponseNotFound(StoreError):
    """Feedback named a response id that was never logged."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def prompt_hash(messages: list[dict]) -> str:
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


def dumps(value: Any) -> str:
    return json.dumps(value if value is not None else {}, ensure_ascii=False, sort_keys=True)
