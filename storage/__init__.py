"""SQLite storage for the learning chatbot.

One database file in the data directory, opened in WAL mode with a connection
per thread. Imports neither torch nor gradio, so the CLI and tests start fast.
"""

from storage.store import (
    DB_FILENAME,
    ResponseNotFound,
    RunInProgress,
    Store,
    StoreError,
)

__all__ = ["DB_FILENAME", "ResponseNotFound", "RunInProgress", "Store", "StoreError"]
