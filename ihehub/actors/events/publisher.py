"""`PatientEventPublisher`: follows the EMPI's ``empi_events`` outbox and turns each event into bus messages.

The EMPI writes every change and its events in one transaction (`ihehub.empi.service`), whoever made it:
an ITI-8 feed, the API, the CLI (``ihehub empi review``), a bulk import in another process.  This
publisher reads the events after its cursor, in id order, and for each batch

* appends one message per event on channel ``empi-events`` (the event JSON; MSH-10-like control id = the
  event id, de-duplicated by the bus) with one delivery per listener that wants the event type — the
  listeners' destinations render it as JSON, SOAP, a table row, an AMQP message or an A31/A40;
* appends the ITI-10 ADT^A31 update notifications of the PIX Manager's consumers (`UpdateNotifier`), so
  manual links, merges and accepted reviews are notified like feeds;
* then stores the cursor (``empi_event_cursors``).

Delivery guarantee: at-least-once into the bus, exactly-once per listener in practice.  A crash (``kill -9``)
after the appends and before the cursor write re-reads the batch on restart: the ``empi-events`` messages
come again with the same control ids and are stored as ``duplicate`` (counted, not delivered), the A31s
are queued again (an A31 is a full state, so a receiver applying it twice ends in the same state).

PostgreSQL with several writing processes: an event id can commit after a higher one.  Ids missing below
the cursor are kept as gaps and looked up again for ``gap_wait`` seconds (a rolled-back feed leaves a gap
that never fills; it expires).  SQLite commits in id order (one writer at a time), so it has no gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, insert, select, update

from ihehub.actors.events.config import CHANNEL, Listener
from ihehub.actors.events.tables import cursors
from ihehub.actors.iti10 import UpdateNotifier
from ihehub.bus.db import is_sqlite
from ihehub.bus.message import Message
from ihehub.bus.store import AppendResult, MessageStore, queue_name
from ihehub.empi import Empi, PatientEvent
from ihehub.empi import tables as empi_tables
from ihehub.empi.store import event_from_row

log = logging.getLogger("ihehub.actors.events")

MAX_GAPS = 10_000


class EventGaps:
    """The ids a cursor over ``empi_events`` skipped that may still commit: on PostgreSQL a sequence hands
    out ids before their transactions commit, so a reader can see 12 before 11.  Each gap is looked up
    again for ``wait`` seconds (a rolled-back feed leaves one for good); SQLite commits in id order, so
    there it does nothing.  Shared by every reader of the events (publisher, the DICOM index linker)."""

    def __init__(self, engine: Any, *, wait: float = 30.0) -> None:
        self.engine = engine
        self.wait = wait
        self.enabled = not is_sqlite(engine)
        self._gaps: dict[int, float] = {}  # ids missing below the cursor -> when first missed

    def __len__(self) -> int:
        return len(self._gaps)

    def late(self, after: int, events: Sequence[PatientEvent]) -> list[PatientEvent]:
        """Events of earlier gaps that have committed since (to handle before ``events``); the gaps that
        ``events`` (read after the cursor ``after``) leaves are noted."""
        if not self.enabled:
            return []
        now = time.time()
        for gid, seen in list(self._gaps.items()):
            if now - seen > self.wait:
                del self._gaps[gid]
        late: list[PatientEvent] = []
        if self._gaps:
            ev = empi_tables.events
            with self.engine.connect() as conn:
                rows = conn.execute(select(ev).where(ev.c.id.in_(list(self._gaps))).order_by(ev.c.id)).all()
            late = [event_from_row(r) for r in rows]
            for e in late:
                self._gaps.pop(e.id, None)
        expected = after + 1
        for e in events:
            if e.id > expected and len(self._gaps) < MAX_GAPS:
                self._gaps.update(dict.fromkeys(range(expected, min(e.id, expected + MAX_GAPS)), now))
            expected = e.id + 1
        return late


def event_message(event: PatientEvent) -> Message:
    """The bus message of one event: its JSON, control id = the event id, type ``patient-<type>``."""
    return Message(channel=CHANNEL, raw=json.dumps(event.to_json(), ensure_ascii=False).encode("utf-8"),
                   content_type="application/json", charset="utf-8", control_id=str(event.id),
                   message_type=f"patient-{event.type.value}", source="empi",
                   headers={"empi.event": str(event.id), "empi.type": event.type.value, "empi.patient": event.patient})


def load_cursor(conn: Connection, name: str) -> int | None:
    value = conn.execute(select(cursors.c.last_id).where(cursors.c.name == name)).scalar()
    return None if value is None else int(value)


def save_cursor(conn: Connection, name: str, last_id: int) -> None:
    now = time.time()
    res = conn.execute(update(cursors).where(cursors.c.name == name).values(last_id=last_id, updated_at=now))
    if not res.rowcount:
        conn.execute(insert(cursors).values(name=name, last_id=last_id, updated_at=now))


class PatientEventPublisher:
    """One per PIX Manager channel with listeners or ITI-10 consumers; ``name`` keys its cursor."""

    def __init__(self, *, name: str, empi: Empi, store: MessageStore, listeners: Sequence[Listener],
                 notifier: UpdateNotifier | None, wake: Callable[[Sequence[str]], None] | None,
                 batch: int = 500, poll: float = 1.0, gap_wait: float = 30.0) -> None:
        self.name = name
        self.empi = empi
        self.store = store
        self.listeners = tuple(listeners)
        self.notifier = notifier
        self.wake_queues = wake
        self.batch = batch
        self.poll = poll
        self.gap_wait = gap_wait
        self.cursor = 0
        self.published = 0  # events turned into empi-events messages
        self.duplicates = 0  # of those, already on the bus (a batch read again after a crash)
        self.notifications = 0  # ITI-10 A31s queued
        self._gaps = EventGaps(empi.engine, wait=gap_wait)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the cursor (a first start begins at the newest event: history is not replayed) and run."""
        def init(conn: Connection) -> int:
            last = load_cursor(conn, self.name)
            if last is None:
                newest = conn.execute(select(empi_tables.events.c.id).order_by(empi_tables.events.c.id.desc())
                                      .limit(1)).scalar()
                last = int(newest or 0)
                save_cursor(conn, self.name, last)
            return last

        self.cursor = await self.store.writer.arun(init)
        self._task = asyncio.create_task(self._run(), name=f"empi-events-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def wake(self) -> None:
        """A change was committed: look now rather than at the next poll."""
        self._wakeup.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wakeup.clear()
            try:
                n = await self.publish_once()
                failures = 0
            except Exception as exc:  # the database is away: keep the cursor, try again with a backoff
                failures += 1
                log.error("patient events %s: publishing after event %d failed: %s", self.name, self.cursor, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if n >= self.batch:
                continue  # more are waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.poll)

    # -- one round ------------------------------------------------------------------------------------
    def _read(self) -> list[PatientEvent]:
        events = self.empi.events(after=self.cursor, limit=self.batch)
        return self._gaps.late(self.cursor, events) + events

    async def publish_once(self) -> int:
        """Publish the events after the cursor (one batch); returns how many were read."""
        events = await asyncio.to_thread(self._read)
        if not events:
            return 0
        futures = []
        queues: set[str] = set()
        for event in events:
            dests = [x.name for x in self.listeners if x.wants(event.type.value)]
            if dests:
                futures.append(self.store.append_future(event_message(event), dests, dedup=True))
                queues.update(queue_name(CHANNEL, d) for d in dests)
        a31 = self.notifier.messages(events) if self.notifier is not None else []
        for msg, consumer in a31:
            futures.append(self.store.append_future(msg, [consumer.name]))
            queues.add(f"{msg.channel}/{consumer.name}")
        results: list[AppendResult] = [await asyncio.wrap_future(f) for f in futures]  # all committed, or raise
        dup = sum(1 for r in results if r.duplicate_of is not None)
        if dup:
            log.warning("patient events %s: %d event(s) were on the bus already (read again after a restart); "
                        "stored as duplicates, not delivered again", self.name, dup)
        last = max(self.cursor, max(e.id for e in events))
        await self.store.writer.arun(lambda conn: save_cursor(conn, self.name, last))
        self.cursor = last
        self.published += len(futures) - len(a31) - dup
        self.duplicates += dup
        self.notifications += len(a31)
        if queues and self.wake_queues is not None:
            self.wake_queues(sorted(queues))
        return len(events)

    def stats(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "published": self.published, "duplicates": self.duplicates,
                "notifications": self.notifications, "gaps": len(self._gaps)}
