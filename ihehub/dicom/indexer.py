"""The asynchronous indexer: stored instances go on a bounded queue; one thread decodes them, writes the
series metadata, and commits their rows in batches through the group-committing `Writer`.

The C-STORE response is sent once the file is written (PS3.4 B.2.3); the row follows within milliseconds
(an instance is queryable well within a second).  The decoding and writing itself is `IndexWork`, run in
a worker process when ``worker_process`` is set (see `ihehub.dicom.indexwork`).  A full queue blocks the
storing association: back pressure instead of unbounded memory.  With the ``batch`` fsync policy the files
of a batch are synced before their rows commit, so whatever C-FIND finds is on disk.

A study is *complete* when no instance of it arrived for ``quiet_seconds``; the ``on_study_complete``
callback then gets a `StudyComplete` (from this thread: keep it short or hand it over), with what routing
rules need (`ihehub.dicom.routing`: modalities, descriptions, series, configured tags), read once per study.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, select

from ihehub.bus.db import Writer
from ihehub.dicom import tables as t
from ihehub.dicom.index import _upsert
from ihehub.dicom.indexwork import IndexWork, ProcessIndexWork
from ihehub.dicom.routing import RoutingTag, study_summary
from ihehub.dicom.storage import StoredInstance

__all__ = ["Indexer", "StudyComplete"]

log = logging.getLogger("ihehub.dicom")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StudyComplete:
    """A study that went quiet: what arrived in this burst and what the index holds now.

    The fields after ``last_received_at`` are for routing rules (`ihehub.dicom.routing.study_summary`):
    ``series`` holds one mapping per series (uid, modality, number, description, body part, instances,
    institution, calling AEs, tags), ``tags`` the configured routing tags' distinct values over the study."""

    study_uid: str
    patient_id: str
    issuer: str
    accession_number: str | None
    num_series: int
    num_instances: int
    received: int  # instances indexed in this burst
    calling_aes: tuple[str, ...]
    first_received_at: float
    last_received_at: float
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    study_description: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    referring_physician: str | None = None
    institution_name: str | None = None
    body_parts: tuple[str, ...] = ()
    series: tuple[dict[str, Any], ...] = ()
    tags: dict[str, list[Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class _Burst:
    first: float  # epoch seconds of the first and last instance received
    last: float
    touched: float  # clock() of the last index: the quiet period runs from here
    count: int = 0
    aes: set[str] = dataclasses.field(default_factory=set)


_STOP = object()


class Indexer:
    """One thread indexing `StoredInstance`s; `put` from any thread, `flush` to wait for the backlog."""

    def __init__(self, writer: Writer, *, fsync: str = "batch", quiet_seconds: float = 30.0,
                 maxsize: int = 256, batch: int = 200, worker_process: bool = False,
                 on_study_complete: Callable[[StudyComplete], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, root: Path | None = None,
                 routing_tags: Sequence[RoutingTag] = ()) -> None:
        self.writer = writer
        self.fsync = fsync
        self.quiet_seconds = quiet_seconds
        self.batch = batch
        self.worker_process = worker_process
        self.on_study_complete = on_study_complete
        self.on_batch: Callable[[], None] | None = None  # after each committed batch (the EMPI patient linker)
        self.clock = clock
        self.root = root  # the storage folder: series metadata for the study-complete's routing fields
        self.routing_tags = tuple(routing_tags)
        self.work: IndexWork | ProcessIndexWork | None = None
        self._q: queue.Queue[StoredInstance | object] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name="ihehub-dicom-indexer", daemon=True)
        self._cond = threading.Condition()
        self._queued = 0
        self._done = 0
        self._bursts: dict[str, _Burst] = {}
        self.indexed = 0
        self.failed = 0
        self.batches = 0

    # -- any thread -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (and the worker process, when asked for and the database is not in memory)."""
        in_memory = self.writer.engine.url.database in (None, "", ":memory:")
        if self.worker_process and not in_memory:
            self.work = ProcessIndexWork(self.writer, fsync=self.fsync)
        else:
            self.work = IndexWork(self.writer, fsync=self.fsync)
        self._resume()
        self._thread.start()

    def put(self, stored: StoredInstance) -> None:
        """Queue ``stored``; its data set may be a view valid only during this call (copied when kept)."""
        if self.worker_process:  # the worker reads the file back: do not hold the bytes in the queue
            stored = dataclasses.replace(stored, dataset=b"")
        elif isinstance(stored.dataset, memoryview):
            stored = dataclasses.replace(stored, dataset=bytes(stored.dataset))
        with self._cond:
            self._queued += 1
        self._q.put(stored)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every instance queued before this call is indexed (or failed); False on timeout."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Index what is queued, then end the thread (pending study-complete timers are kept in the database
        and resume at the next start)."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout=timeout)
        if self.work is not None:
            self.work.close()
            self.work = None

    @property
    def backlog(self) -> int:
        with self._cond:
            return self._queued - self._done

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=self._next_deadline())
            except queue.Empty:
                self._fire_due()
                continue
            if item is _STOP:
                return
            items = [item]
            stop = False
            while len(items) < self.batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            batch = [i for i in items if isinstance(i, StoredInstance)]
            try:
                self._index(batch)
            except Exception:  # never let one batch end the thread
                log.exception("indexing a batch of %d instances failed", len(batch))
                self.failed += len(batch)
            finally:
                with self._cond:
                    self._done += len(batch)
                    self._cond.notify_all()
            if stop:
                return
            self._fire_due()

    def _index(self, batch: Sequence[StoredInstance]) -> None:
        if self.work is None:
            raise RuntimeError("the indexer is not started")
        indexed, failed = self.work.run(batch)
        self.indexed += indexed
        self.failed += failed
        now = self.clock()
        for stored in batch:
            burst = self._bursts.get(stored.study_uid)
            if burst is None:
                burst = self._bursts[stored.study_uid] = _Burst(first=stored.received_at, last=stored.received_at,
                                                                touched=now)
            burst.last = max(burst.last, stored.received_at)
            burst.touched = now
            burst.count += 1
            if stored.calling_ae:
                burst.aes.add(stored.calling_ae)
        self.batches += 1
        self._persist({s.study_uid for s in batch})
        if self.on_batch is not None and indexed:
            self.on_batch()

    # -- the timers survive a restart (dicom_pending_studies) ------------------------------------
    def _persist(self, study_uids: set[str]) -> None:
        """Record the running quiet periods of ``study_uids``: handed to the writer without waiting, so the
        row joins the next group commit instead of costing the index thread a commit (and an fsync) per batch."""
        wall = time.time()
        rows = [{"study_uid": uid, "first_received_at": b.first, "last_received_at": b.last, "received": b.count,
                 "calling_aes": "\\".join(sorted(b.aes))[:1024], "updated_at": wall}
                for uid in study_uids if (b := self._bursts.get(uid)) is not None]

        def op(conn: Connection) -> None:
            _upsert(conn, t.pending_studies, rows, ["study_uid"], coalesce=False)

        def done(fut: Any) -> None:  # the study-complete still fires from memory; only a crash would lose it
            if fut.exception() is not None:
                log.error("cannot record the pending study-complete timers of %d studies: %s", len(rows),
                          fut.exception())

        self.writer.submit(op).add_done_callback(done)

    def _forget(self, study_uid: str) -> None:
        def op(conn: Connection) -> None:
            conn.execute(delete(t.pending_studies).where(t.pending_studies.c.study_uid == study_uid))

        try:
            self.writer.run(op)
        except Exception:
            log.exception("cannot remove the pending study-complete timer of %s", study_uid)

    def _resume(self) -> None:
        """The quiet periods that were running when the last process stopped go on where they were."""
        try:
            with self.writer.engine.connect() as conn:
                rows = conn.execute(select(t.pending_studies)).all()
        except Exception:
            log.exception("cannot read the pending study-complete timers")
            return
        now, wall = self.clock(), time.time()
        for row in rows:
            self._bursts[row.study_uid] = _Burst(
                first=row.first_received_at, last=row.last_received_at, touched=now - max(0.0, wall - row.updated_at),
                count=int(row.received), aes=set(filter(None, row.calling_aes.split("\\"))))
        if rows:
            log.info("resumed the quiet periods of %d studies", len(rows))

    # -- study complete -------------------------------------------------------------------------
    def _next_deadline(self) -> float | None:
        if not self._bursts:
            return None
        soonest = min(b.touched for b in self._bursts.values()) + self.quiet_seconds
        return max(0.0, soonest - self.clock())

    def _fire_due(self) -> None:
        if not self._bursts:
            return
        now = self.clock()
        due = [uid for uid, b in self._bursts.items() if now - b.touched >= self.quiet_seconds]
        for uid in due:
            burst = self._bursts.pop(uid)
            if self.on_study_complete is None:
                self._forget(uid)
                continue
            try:
                with self.writer.engine.connect() as conn:
                    event = _study_complete(conn, uid, burst, self.root, self.routing_tags)
            except Exception:
                log.exception("cannot read study %s for its study-complete event", uid)
                continue
            if event is None:
                self._forget(uid)
                continue
            try:
                self.on_study_complete(event)
            except Exception:
                log.exception("study-complete callback failed for %s", uid)
                continue  # the row stays: the next start fires it again
            self._forget(uid)


def _study_complete(conn: Connection, study_uid: str, burst: _Burst, root: Path | None = None,
                    routing_tags: Sequence[RoutingTag] = ()) -> StudyComplete | None:
    st, p = t.studies, t.patients
    row = conn.execute(
        select(st.c.accession_number, st.c.num_series, st.c.num_instances, p.c.patient_id, p.c.issuer)
        .select_from(st.join(p, p.c.id == st.c.patient_pk))
        .where(st.c.study_uid == study_uid)
    ).first()
    if row is None:
        return None
    return StudyComplete(
        study_uid=study_uid, patient_id=row.patient_id, issuer=row.issuer, accession_number=row.accession_number,
        num_series=int(row.num_series), num_instances=int(row.num_instances), received=burst.count,
        calling_aes=tuple(sorted(burst.aes)), first_received_at=burst.first, last_received_at=burst.last,
        **(study_summary(conn, study_uid, root, routing_tags) if root is not None else {}),
    )

