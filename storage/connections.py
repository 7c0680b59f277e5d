"""A bounded pool of SQLite connections to one database file.

Whatever threads call the store (a Gradio worker, a thread per streamed
reply, the scheduler), at most `size` connections are ever open: a thread
borrows one for the length of one store call and gives it back. A call made
while the same thread already holds one (a transaction around several store
calls) reuses it. Nothing is left open when a thread ends, so open files and
memory stay flat however many threads come and go.

The first borrow opens all `size` connections at once, and they stay open
until `close()`. Opening them as needed would leave the process's open files
growing to its busiest moment and never coming back: on Unix, SQLite cannot
release the descriptor of a connection closed while another connection of
the same process holds a lock on the file (in WAL mode an open connection
always does), so it parks it until the last connection closes. Opened up
front, the count is the same from the first request to the millionth.
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
        self._fill_lock = threading.Lock()
        self._filled = False

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
        # A first read opens the WAL file, which the connection then keeps:
        # opened now, not at the connection's first use.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        with self._lock:
            self._opened.append(conn)
        return sqlite_utils.Database(conn, execute_plugins=False)

    def _fill(self) -> None:
        if self._filled:
            return
        with self._fill_lock:
            if not self._filled:
                for _ in range(self.size):
                    self._idle.put(self._open())
                self._filled = True

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
            self._fill()
            try:
                db = self._idle.get_nowait()  # a slot is held, so one is idle
            except queue.Empty:  # unless close() ran in between
                db = self._open()
            self._local.held = db
            try:
                yield db
            finally:
                self._local.held = None
                if db.conn.in_transaction:  # never hand on an open transaction
                    db.conn.rollback()
                with self._lock:
                    current = any(c is db.conn for c in self._opened)
                if current:
                    self._idle.put(db)
                else:  # the pool was closed while this one was out
                    with contextlib.suppress(sqlite3.Error):
                        db.conn.close()
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
            self._filled = False
