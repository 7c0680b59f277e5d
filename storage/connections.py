"""A bounded pool of SQLite connections to one database file.

Whatever threads call the store (a Gradio worker, a thread per streamed
reply, the scheduler), at most `size` connections are ever open: a thread
borrows one for the length of one store call and gives it back. A call made
while the same thread already holds one (a transaction around several store
calls) reuses it. Nothing is left open when a thread ends, so open files and
memory stay flat however many threads come and go.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

import sqlite_utils


class PoolTimeout(RuntimeError):
    """No connection came free in time."""


class ConnectionPool:
    def __init__(self, path: str | Path, *, size: int = 8, busy_timeout_s: float = 30.0):
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self.path, self.size, self.busy_timeout_s = Path(path), size, busy_timeout_s
        self._idle: queue.LifoQueue[sqlite_utils.Database] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def _open(self) -> sqlite_utils.Database:
        # check_same_thread=False: a connection serves one thread at a time,
        # but not always the same thread.
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed row survives a crash of the process
        # (the case we design for); only a power cut can lose the last
        # commits. FULL would fsync on every thumb.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        with self._lock:
            self._opened.append(conn)
        return sqlite_utils.Database(conn, execute_plugins=False)

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite_utils.Database]:
        """Borrow a connection for the length of the block (this thread's own,
        if it already holds one)."""
        held = getattr(self._local, "held", None)
        if held is not None:
            yield held
            return
        if not self._slots.acquire(timeout=self.busy_timeout_s):
            raise PoolTimeout(f"no database connection came free within {self.busy_timeout_s:g} s")
        try:
            try:
                db = self._idle.get_nowait()
            except queue.Empty:
                db = self._open()
            self._local.held = db
            try:
                yield db
            finally:
                self._local.held = None
                if db.conn.in_transaction:  # never hand on an open transaction
                    db.conn.rollback()
                self._idle.put(db)
        finally:
            self._slots.release()

    def open_count(self) -> int:
        """Connections open now (at most `size`)."""
        with self._lock:
            return len(self._opened)

    def close(self) -> None:
        """Close every connection; the pool opens new ones if used again."""
        with self._lock:
            for conn in self._opened:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._opened.clear()
        self._idle = queue.LifoQueue()
