"""Examining received audit messages in worker processes (the Audit Record Repository's CPU work).

Parsing, schema and Schematron validation and field extraction (`ihehub.atna.ingest.inspect`) take
most of the CPU time of ingest and hold the GIL; `ParallelExaminer` runs them in a pool of worker
processes (``spawn``), each with its own compiled `Validator`, so ingest uses every core while the
event loop keeps reading TLS and the writer thread keeps committing.

Nothing is weakened: every message is still validated (schema + its event's Schematron rules) by
the same code, and records reach the store in the order they were received (batches are delivered
in submission order whatever order the workers finish in).  The durability contract stays the
store's: a record is in memory until its group commit, in a worker or in the store's queue alike
(syslog has no acknowledgement; `pending` counts both for flow control and for a graceful stop).

A worker that dies (killed, out of memory, a crash in libxml2) breaks the pool: it is restarted and
the batches that were in flight are examined again one at a time, so a batch that crashes a worker
alone is known to hold the culprit; its messages are then examined one by one, and a message that
crashes a worker by itself is stored flagged invalid ("the validator process crashed on this
message") with its syslog header, never dropped.  Messages arriving meanwhile wait their turn.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ihehub.atna.ingest import inspect, record_from, unexamined
from ihehub.atna.store import prepare_row
from ihehub.atna.validate import Validator

__all__ = ["ParallelExaminer"]

log = logging.getLogger("ihehub.atna")

Frame = tuple[bytes, str, str | None, str | None, float]  # raw, transport, peer, TLS subject, received at
Row = dict[str, Any]  # `ihehub.atna.store.prepare_row` without "raw"
Worker = Callable[[list[Frame]], list[Row]]
_CRASHED = "the validator process crashed on this message; stored without validation"

_validator: Validator | None = None  # in a worker process: its own compiled rules


def _init_worker(xsd: str | None, schematron: str | None, cache_size: int) -> None:
    global _validator
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the hub, which then stops its workers
    _validator = Validator(xsd, schematron, cache_size=cache_size) if xsd is not None else None


def examine_batch(frames: list[Frame]) -> list[Row]:
    """The worker's job: examine every frame with this process's validator and prepare its row (the
    raw bytes, which the caller has, are not sent back)."""
    return [_prepared(frame, inspect(frame[0], _validator)) for frame in frames]


def _prepared(frame: Frame, result: tuple[object, ...]) -> Row:
    row = prepare_row(record_from(frame[0], result, transport=frame[1], peer=frame[2], tls_subject=frame[3],
                                  received_at=frame[4]))
    del row["raw"]
    return row


def _ping() -> int:
    return os.getpid()


@dataclasses.dataclass(slots=True)
class _Batch:
    frames: list[Frame]
    results: list[Row] | None = None


class ParallelExaminer:
    """Examine frames in ``workers`` processes and hand their store rows (`prepare_row`, for
    `AuditStore.add_prepared`) to ``deliver``, a list at a time, in arrival order.

    `take` and everything else run on the event loop that called `start`.  ``worker`` is the
    function a worker runs on a batch of frames (`examine_batch`; tests give one that crashes).
    """

    def __init__(self, validator: Validator | None, deliver: Callable[[list[Row]], None], *, workers: int = 2,
                 batch_size: int = 128, worker: Worker = examine_batch) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.validator = validator
        self.deliver = deliver
        self.workers = workers
        self.batch_size = batch_size
        self.worker = worker
        self.pending = 0  # frames taken and not delivered yet
        self.restarts = 0
        self.crashed = 0  # messages stored unvalidated because a worker died on them
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: list[Frame] = []
        self._flush_scheduled = False
        self._order: collections.deque[_Batch] = collections.deque()
        self._suspects: collections.deque[_Batch] = collections.deque()
        self._held: list[_Batch] = []
        self._recovery: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker processes (and wait until each has compiled its validator)."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._new_executor)

    async def close(self, grace: float = 5.0) -> None:
        """Examine and deliver what was taken (up to ``grace`` s), then stop the workers."""
        self._flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes' ids (for monitoring)."""
        executor = self._executor
        procs = getattr(executor, "_processes", None) or {}
        return sorted(int(pid) for pid in procs)

    def _new_executor(self) -> None:
        """A fresh pool, warmed up: every worker started and its validator compiled."""
        old, self._executor = self._executor, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        v = self.validator
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(str(v.xsd_path) if v else None,
                      str(v.schematron_dir) if v and v.schematron_dir else None, v.cache_size if v else 0))
        try:
            for fut in [executor.submit(_ping) for _ in range(self.workers)]:
                fut.result(timeout=120)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._executor = executor

    # -- taking frames ------------------------------------------------------------------------------
    def take(self, raw: bytes, transport: str, peer: str | None, tls_subject: str | None) -> None:
        """Queue one frame; it is examined with the next batch (at once when a batch is full, else at
        the end of this event-loop iteration)."""
        self._open.append((raw, transport, peer, tls_subject, time.time()))
        self.pending += 1
        if len(self._open) >= self.batch_size:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None, "start() first"
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._open:
            return
        batch = _Batch(self._open)
        self._open = []
        self._order.append(batch)
        self._dispatch(batch)

    def _dispatch(self, batch: _Batch) -> None:
        if self._recovery is not None or self._executor is None:
            self._held.append(batch)  # a crash is being sorted out: wait (and keep the order)
            self._recover_soon()
            return
        try:
            fut = self._executor.submit(self.worker, batch.frames)
        except (BrokenProcessPool, RuntimeError):
            self._crashed(batch)
            return
        loop = self._loop
        assert loop is not None
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, batch, f))

    def _finished(self, batch: _Batch, fut: concurrent.futures.Future[list[Row]]) -> None:
        if fut.cancelled():
            exc: BaseException | None = BrokenProcessPool("cancelled")
        else:
            exc = fut.exception()
        if exc is None:
            batch.results = fut.result()
            self._drain()
        elif isinstance(exc, BrokenProcessPool):
            self._crashed(batch)
        else:  # the worker function failed (a bug): the messages are still stored, flagged
            log.error("atna: examining %d audit messages failed: %r", len(batch.frames), exc)
            batch.results = [_prepared(f, unexamined(f[0], f"the validator failed: {exc!r}"))
                             for f in batch.frames]
            self._drain()

    def _drain(self) -> None:
        """Deliver finished batches from the head of the queue (arrival order)."""
        order = self._order
        while order and order[0].results is not None:
            batch = order.popleft()
            results = batch.results
            assert results is not None
            for frame, row in zip(batch.frames, results, strict=True):
                row["raw"] = frame[0]
            try:
                self.deliver(results)
            except Exception:
                log.exception("atna: could not hand over %d audit records", len(results))
            self.pending -= len(batch.frames)

    # -- worker crashes -----------------------------------------------------------------------------
    def _crashed(self, batch: _Batch) -> None:
        self._suspects.append(batch)
        self._recover_soon()

    def _recover_soon(self) -> None:
        if self._recovery is None and self._loop is not None:
            self._recovery = self._loop.create_task(self._recover())

    async def _recover(self) -> None:
        """Restart the pool; examine the batches that were in flight alone, then release the held ones."""
        try:
            log.error("atna: a validator process died; restarting the pool and re-examining %d batches",
                      len(self._suspects))
            await self._restart()
            await asyncio.sleep(0)  # let the other in-flight batches report their failure
            while self._suspects:
                suspects = sorted(self._suspects, key=self._order.index)
                self._suspects.clear()
                for batch in suspects:
                    results = await self._alone(batch.frames)
                    if results is None:  # the culprit is in this batch: one by one
                        results = [await self._one(f) for f in batch.frames]
                    batch.results = results
                    self._drain()
        finally:
            self._recovery = None
        held, self._held = self._held, []
        for batch in held:
            self._dispatch(batch)

    async def _one(self, frame: Frame) -> Row:
        results = await self._alone([frame])
        if results is not None:
            return results[0]
        self.crashed += 1
        log.error("atna: a validator process crashed on an audit message (%d bytes) from %s; stored unvalidated",
                  len(frame[0]), frame[2])
        return _prepared(frame, unexamined(frame[0], _CRASHED))

    async def _alone(self, frames: list[Frame]) -> list[Row] | None:
        """Examine ``frames`` with nothing else in flight; None if a worker died (the pool is restarted)."""
        if self._executor is None:
            await self._restart()
        assert self._executor is not None
        try:
            return await asyncio.wrap_future(self._executor.submit(self.worker, frames))
        except BrokenProcessPool:
            await self._restart()
            return None

    async def _restart(self) -> None:
        """A new pool; if processes cannot be started, retry with backoff (frames wait, readers pause)."""
        self.restarts += 1
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(self._new_executor)
                return
            except Exception:
                log.exception("atna: cannot start the validator processes; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def stats(self) -> dict[str, Any]:
        return {"workers": self.workers, "pending": self.pending, "restarts": self.restarts, "crashed": self.crashed}
