"""Database engines and the single writer thread that gives the bus group commit.

Every write of the bus goes through one `Writer` per process: callers submit a small function that
runs inside a transaction; the writer takes everything that is waiting, runs it in ONE transaction
and commits once.  While one commit (and its fsync) is in flight, the next batch gathers, so many
messages share one fsync without any timer (group commit).  A write that fails is retried alone so
that one bad row cannot fail its neighbours.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed message survives ``kill -9`` and a
power cut.  Readers use their own pooled connections and never block the writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

log = logging.getLogger("ihehub.bus")

T = TypeVar("T")
WriteOp = Callable[[Connection], T]


class StoreUnavailable(Exception):
    """The database cannot take writes right now (down, locked, disk full)."""


def make_engine(url: str, *, home: str | Path | None = None) -> Engine:
    """An engine for ``url``; relative SQLite paths are resolved against ``home``.

    ``postgresql://`` is taken to mean psycopg 3 (the driver ihehub ships with).
    """
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername.startswith("sqlite"):
        db = u.database or ""
        if db and db != ":memory:" and not Path(db).is_absolute() and home is not None:
            db = str(Path(home) / db)
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        u = u.set(database=db)
        engine = create_engine(u, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(u, pool_size=8, max_overflow=8, pool_pre_ping=True)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class Writer:
    """One thread that runs submitted write functions in batched transactions."""

    def __init__(self, engine: Engine, *, max_batch: int = 500, linger_ms: float = 0.0,
                 name: str = "ihehub-writer") -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.linger = linger_ms / 1000.0
        self._q: queue.SimpleQueue[tuple[WriteOp[Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self.batches = 0
        self.ops = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def close(self) -> None:
        if self._started:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._started = False

    def submit(self, op: WriteOp[T]) -> concurrent.futures.Future[T]:
        if not self._started:
            self.start()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._q.put((op, fut))
        return fut

    def run(self, op: WriteOp[T]) -> T:
        """Submit and wait (for synchronous callers: CLI, API handlers in threads)."""
        return self.submit(op).result()

    async def arun(self, op: WriteOp[T]) -> T:
        return await asyncio.wrap_future(self.submit(op))

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._q.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get(timeout=self.linger) if self.linger else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._execute(batch)

    def _execute(self, batch: list[tuple[WriteOp[Any], concurrent.futures.Future[Any]]]) -> None:
        live = [(op, fut) for op, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = []
            with self.engine.begin() as conn:
                for op, _ in live:
                    results.append(op(conn))
        except Exception as exc:  # one op (or the database) failed: isolate by running each alone
            if len(live) == 1:
                live[0][1].set_exception(_wrap(exc))
                return
            log.debug("batch of %d failed (%s); retrying one by one", len(live), exc)
            for op, fut in live:
                try:
                    with self.engine.begin() as conn:
                        res = op(conn)
                except Exception as one_exc:
                    fut.set_exception(_wrap(one_exc))
                else:
                    fut.set_result(res)
            return
        self.batches += 1
        self.ops += len(live)
        for (_, fut), res in zip(live, results, strict=True):
            fut.set_result(res)


def _wrap(exc: Exception) -> Exception:
    if isinstance(exc, OperationalError):
        return StoreUnavailable(str(exc.orig) if exc.orig else str(exc))
    return exc
