"""The durable message store and its lease-based delivery queue.

* ``append`` commits a received message together with one delivery row per destination; the source
  acknowledges only after that commit (group-committed by the `Writer`).
* Deliveries are the queue.  ``claim`` leases due rows (``state`` queued/error whose
  ``next_attempt_at`` has come, or ``sending`` whose lease expired because its worker died) and
  counts the attempt; ``settle`` records the outcome: sent, error (retry at ``now + backoff``) or dead.
  On SQLite the single writer makes a claim atomic; on PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets
  several processes claim from one queue.
* Every attempt is kept (``attempts``) so the message browser shows what was sent and answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ihehub.bus.db import Writer, is_sqlite
from ihehub.bus.message import Message
from ihehub.bus.retry import RetryPolicy
from ihehub.bus.tables import attempts, channel_state, dedup_keys, deliveries, messages

FINAL_STATES = ("sent", "dead")
DELIVERY_STATES = ("queued", "sending", "sent", "error", "dead")
MESSAGE_STATUSES = ("queued", "stored", "filtered", "duplicate", "error", "received", "processed")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AppendResult:
    message_id: str
    duplicate_of: str | None = None
    deliveries: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Claimed:
    delivery_id: int
    message_id: str
    queue: str
    destination: str
    attempt: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Settlement:
    """The outcome of one attempt, written by ``settle``."""

    delivery_id: int
    message_id: str
    queue: str
    attempt: int
    started_at: float
    ok: bool
    status: str = ""
    response: bytes | None = None
    error: str | None = None
    retryable: bool = True
    release: bool = False  # not attempted (e.g. FIFO stopped early): back to queued, attempt not counted


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MessageQuery:
    """A message-browser search.

    ``status``: a delivery state (queued = waiting to be sent, sending, sent, error = waiting for a retry,
    dead) matches messages with such a delivery; ``stored``, ``filtered``, ``duplicate`` match the ingest
    status; ``error`` matches an ingest error too.
    """

    channel: str | None = None
    status: str | None = None
    destination: str | None = None
    since: float | None = None
    until: float | None = None
    control_id: str | None = None
    message_type: str | None = None
    text: str | None = None
    limit: int = 50
    offset: int = 0


class MessageStore:
    def __init__(self, engine: Engine, writer: Writer, *, worker_id: str = "serve") -> None:
        self.engine = engine
        self.writer = writer
        self.worker_id = worker_id
        self.sqlite = is_sqlite(engine)
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._flush_scheduled = False

    # -- ingest ----------------------------------------------------------------------------
    def _append_op(
        self,
        msg: Message,
        destinations: Sequence[str],
        status: str,
        transformed: bytes | None,
        dedup: bool,
        error: str | None,
    ) -> Any:
        def op(conn: Connection) -> AppendResult:
            now = time.time()
            if dedup and msg.control_id:
                dup = self._claim_dedup_key(conn, msg, now)
                if dup is not None:
                    conn.execute(insert(messages), [_message_row(msg, "duplicate", None, f"duplicate of {dup}")])
                    return AppendResult(message_id=msg.id, duplicate_of=dup)
            conn.execute(insert(messages), [_message_row(msg, status, transformed, error)])
            if destinations:
                conn.execute(
                    insert(deliveries),
                    [_delivery_row(msg.id, msg.channel, d, now) for d in destinations],
                )
            return AppendResult(message_id=msg.id, deliveries=len(destinations))

        return op

    def _claim_dedup_key(self, conn: Connection, msg: Message, now: float) -> str | None:
        row = {"channel": msg.channel, "control_id": msg.control_id, "message_id": msg.id, "created_at": now}
        ins = (sqlite_insert if self.sqlite else pg_insert)(dedup_keys).values(**row).on_conflict_do_nothing()
        if conn.execute(ins.returning(dedup_keys.c.message_id)).first() is not None:
            return None
        existing: str | None = conn.execute(
            select(dedup_keys.c.message_id).where(
                dedup_keys.c.channel == msg.channel, dedup_keys.c.control_id == msg.control_id
            )
        ).scalar()
        return existing

    async def append(
        self,
        msg: Message,
        destinations: Sequence[str] = (),
        *,
        status: str | None = None,
        transformed: bytes | None = None,
        dedup: bool = False,
        error: str | None = None,
    ) -> AppendResult:
        """Persist ``msg`` and queue it for ``destinations``; returns once committed."""
        return await asyncio.wrap_future(
            self.append_future(msg, destinations, status=status, transformed=transformed, dedup=dedup, error=error)
        )

    def append_sync(self, msg: Message, destinations: Sequence[str] = (), **kw: Any) -> AppendResult:
        return self.append_future(msg, destinations, **kw).result()

    def append_future(
        self,
        msg: Message,
        destinations: Sequence[str] = (),
        *,
        status: str | None = None,
        transformed: bytes | None = None,
        dedup: bool = False,
        error: str | None = None,
    ) -> concurrent.futures.Future[AppendResult]:
        st = status or ("queued" if destinations else "stored")
        if dedup and msg.control_id:
            return self.writer.submit(self._append_op(msg, destinations, st, transformed, dedup, error))
        # Fast path: coalesce plain appends into one executemany per group commit.
        fut: concurrent.futures.Future[AppendResult] = concurrent.futures.Future()
        now = time.time()
        item = (
            _message_row(msg, st, transformed, error),
            [_delivery_row(msg.id, msg.channel, d, now) for d in destinations],
            fut,
        )
        with self._lock:
            self._pending.append(item)
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            flush = _Flush(self)
            self.writer.submit(flush).add_done_callback(flush.resolve)
        return fut

    async def complete(self, msg: Message, *, status: str, error: str | None = None,
                       destinations: Sequence[str] = ()) -> None:
        """Second step for a message an actor handled: record its status and queue its deliveries."""

        def op(conn: Connection) -> None:
            now = time.time()
            conn.execute(update(messages).where(messages.c.id == msg.id).values(status=status, error=error))
            if destinations:
                conn.execute(insert(deliveries), [_delivery_row(msg.id, msg.channel, d, now) for d in destinations])

        await self.writer.arun(op)

    # -- the lease queue -------------------------------------------------------------------
    def _due(self, queue: str, now: float) -> Any:
        return and_(
            deliveries.c.queue == queue,
            or_(
                and_(deliveries.c.state.in_(("queued", "error")), deliveries.c.next_attempt_at <= now),
                and_(deliveries.c.state == "sending", deliveries.c.lease_expires < now),
            ),
        )

    async def claim(
        self, queue: str, *, limit: int = 50, lease_seconds: float = 30.0, fifo: bool = False
    ) -> list[Claimed]:
        return await self.writer.arun(self._claim_op(queue, limit, lease_seconds, fifo, None))

    async def claim_ids(self, ids: Sequence[int], *, lease_seconds: float = 30.0) -> list[Claimed]:
        """Claim specific deliveries (scale-out: the broker said which); skips those not due."""
        return await self.writer.arun(self._claim_op(None, len(ids), lease_seconds, False, list(ids)))

    def _claim_op(
        self, queue: str | None, limit: int, lease_seconds: float, fifo: bool, ids: list[int] | None
    ) -> Any:
        owner = self.worker_id

        def op(conn: Connection) -> list[Claimed]:
            now = time.time()
            d = deliveries.c
            if ids is not None:
                cond = and_(
                    d.id.in_(ids),
                    or_(
                        d.state.in_(("queued", "error")),
                        and_(d.state == "sending", d.lease_expires < now),
                    ),
                )
                sel = select(d.id).where(cond)
            elif fifo:
                # Head of the line only: the oldest unfinished deliveries, up to the first that is not due.
                head = conn.execute(
                    select(d.id, d.state, d.next_attempt_at, d.lease_expires)
                    .where(d.queue == queue, d.state.not_in(FINAL_STATES))
                    .order_by(d.id)
                    .limit(limit)
                ).all()
                chosen = []
                for row in head:
                    due = (row.state in ("queued", "error") and row.next_attempt_at <= now) or (
                        row.state == "sending" and (row.lease_expires or 0) < now
                    )
                    if not due:
                        break
                    chosen.append(row.id)
                if not chosen:
                    return []
                sel = select(d.id).where(d.id.in_(chosen))
            else:
                sel = select(d.id).where(self._due(queue or "", now)).order_by(d.id).limit(limit)
            if not self.sqlite:
                sel = sel.with_for_update(skip_locked=True)
            stmt = (
                update(deliveries)
                .where(d.id.in_(sel.scalar_subquery()))
                .values(
                    state="sending",
                    lease_owner=owner,
                    lease_expires=now + lease_seconds,
                    attempts=d.attempts + 1,
                    updated_at=now,
                )
                .returning(d.id, d.message_id, d.queue, d.destination, d.attempts)
            )
            rows = sorted(conn.execute(stmt).all(), key=lambda r: r.id)
            return [
                Claimed(delivery_id=r.id, message_id=r.message_id, queue=r.queue, destination=r.destination,
                        attempt=r.attempts)
                for r in rows
            ]

        return op

    async def settle(self, results: Sequence[Settlement], policy: RetryPolicy | Mapping[str, RetryPolicy]) -> None:
        await self.writer.arun(self._settle_op(results, policy))

    def _settle_op(self, results: Sequence[Settlement], policy: RetryPolicy | Mapping[str, RetryPolicy]) -> Any:
        owner = self.worker_id

        def op(conn: Connection) -> None:
            now = time.time()
            d = deliveries.c
            guard = and_(d.id == bindparam("b_id"), d.state == "sending", d.lease_owner == owner)
            released = [{"b_id": r.delivery_id} for r in results if r.release]
            if released:
                conn.execute(
                    update(deliveries).where(guard).values(
                        state="queued", attempts=d.attempts - 1, lease_owner=None, lease_expires=None, updated_at=now,
                    ),
                    released,
                )
            params = []
            attempt_rows = []
            for r in results:
                if r.release:
                    continue
                next_at = now
                if r.ok:
                    state = "sent"
                else:
                    pol = policy if isinstance(policy, RetryPolicy) else policy.get(r.queue, RetryPolicy())
                    if r.retryable and not pol.exhausted(r.attempt):
                        state, next_at = "error", now + pol.delay(r.attempt)
                    else:
                        state = "dead"
                params.append({
                    "b_id": r.delivery_id, "b_state": state, "b_next": next_at, "b_error": None if r.ok else r.error,
                    "b_status": r.status or None, "b_response": r.response,
                })
                attempt_rows.append({
                    "delivery_id": r.delivery_id, "message_id": r.message_id, "number": r.attempt,
                    "started_at": r.started_at, "finished_at": now, "ok": r.ok, "status": r.status or None,
                    "response": r.response, "error": r.error, "worker": owner,
                })
            if params:
                # one executemany for the whole batch (per-row UPDATEs cost ~100 us each in the writer)
                conn.execute(
                    update(deliveries).where(guard).values(
                        state=bindparam("b_state"), next_attempt_at=bindparam("b_next"), error=bindparam("b_error"),
                        response_status=bindparam("b_status"), response=bindparam("b_response"),
                        lease_owner=None, lease_expires=None, updated_at=now,
                    ),
                    params,
                )
                conn.execute(insert(attempts), attempt_rows)

        return op

    def mark_dispatched(self, ids: Sequence[int]) -> Any:
        """The broker confirmed these ids.  Rows locked right now (a worker is claiming or settling
        them) are skipped rather than waited for: waiting deadlocked with ``settle`` on PostgreSQL,
        and a skipped row is at worst published once more (workers skip what is no longer due)."""

        def op(conn: Connection) -> None:
            d = deliveries.c
            sel = select(d.id).where(d.id.in_(list(ids)))
            if not self.sqlite:
                sel = sel.with_for_update(skip_locked=True)
            stmt = update(deliveries).where(d.id.in_(sel.scalar_subquery()))
            conn.execute(stmt.values(dispatched=True, updated_at=time.time()))

        return self.writer.submit(op)

    def undispatched(self, *, limit: int = 500, older_than: float = 0.0) -> list[tuple[int, str]]:
        """Deliveries waiting to be handed to the broker (scale-out outbox), as (id, queue)."""
        d = deliveries.c
        now = time.time()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(d.id, d.queue)
                .where(
                    d.dispatched.is_(False),
                    or_(
                        and_(d.state.in_(("queued", "error")), d.next_attempt_at <= now),
                        and_(d.state == "sending", d.lease_expires < now),  # its worker died
                    ),
                    d.updated_at <= now - older_than,
                )
                .order_by(d.id)
                .limit(limit)
            ).all()
        return [(r.id, r.queue) for r in rows]

    def requeue_for_dispatch(self, *, stale_after: float = 600.0) -> Any:
        """Scale-out: deliveries whose retry time came, or whose lease expired, go back to the outbox;
        so do deliveries published ``stale_after`` seconds ago and still not taken (their broker message
        was lost, e.g. a queue deleted by hand).  A duplicate publish is harmless: workers claim in the
        database and skip what is no longer due."""

        def op(conn: Connection) -> int:
            now = time.time()
            d = deliveries.c
            res = conn.execute(
                update(deliveries)
                .where(
                    d.dispatched.is_(True),
                    or_(
                        and_(d.state == "error", d.next_attempt_at <= now),
                        and_(d.state == "sending", d.lease_expires < now),
                        and_(d.state == "queued", d.updated_at < now - stale_after),
                    ),
                )
                .values(dispatched=False)
            )
            return int(res.rowcount or 0)

        return self.writer.submit(op)

    # -- reading ---------------------------------------------------------------------------
    def get_message(self, message_id: str, *, with_body: bool = True) -> dict[str, Any] | None:
        cols = list(messages.c) if with_body else [c for c in messages.c if c.name not in ("raw", "transformed")]
        with self.engine.connect() as conn:
            row = conn.execute(select(*cols).where(messages.c.id == message_id)).mappings().first()
        return dict(row) if row else None

    def body(self, message_id: str) -> bytes | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(messages.c.raw, messages.c.transformed).where(messages.c.id == message_id)
            ).first()
        if row is None:
            return None
        return row.transformed if row.transformed is not None else row.raw

    def load_message(self, message_id: str) -> Message | None:
        """The envelope as a destination sends it (transformed body when there is one)."""
        return self.load_messages([message_id]).get(message_id)

    def load_messages(self, ids: Iterable[str], *, received: bool = False) -> dict[str, Message]:
        """Envelopes by id (``received``: with the body as received, not the transformed one); messages whose
        body was pruned are left out."""
        ids = list(set(ids))
        out: dict[str, Message] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                for row in conn.execute(select(messages).where(messages.c.id.in_(ids[i:i + 500]))).mappings():
                    body = row["raw"] if received or row["transformed"] is None else row["transformed"]
                    if body is not None:
                        out[row["id"]] = Message(
                            id=row["id"], channel=row["channel"], raw=body,
                            content_type=row["content_type"] or "application/octet-stream", charset=row["charset"],
                            headers=json.loads(row["headers"] or "{}"), correlation_id=row["correlation_id"],
                            control_id=row["control_id"], message_type=row["message_type"], source=row["source"],
                            received_at=dt.datetime.fromtimestamp(row["received_at"], dt.UTC),
                        )
        return out

    def deliveries_of(self, message_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries).where(deliveries.c.message_id == message_id).order_by(deliveries.c.id)
            ).mappings().all()
            att = conn.execute(
                select(attempts).where(attempts.c.message_id == message_id).order_by(attempts.c.id)
            ).mappings().all()
        by_delivery: dict[int, list[dict[str, Any]]] = {}
        for a in att:
            by_delivery.setdefault(a["delivery_id"], []).append(dict(a))
        return [dict(r) | {"attempt_log": by_delivery.get(r["id"], [])} for r in rows]

    def _where(self, q: MessageQuery) -> list[Any]:
        m = messages.c
        conds: list[Any] = []
        if q.channel:
            conds.append(m.channel == q.channel)
        if q.since is not None:
            conds.append(m.received_at >= q.since)
        if q.until is not None:
            conds.append(m.received_at < q.until)
        if q.control_id:
            conds.append(m.control_id == q.control_id)
        if q.message_type:
            conds.append(m.message_type.like(q.message_type.replace("*", "%")))
        delivery_state = q.status in DELIVERY_STATES
        if q.status or q.destination:
            sub = select(deliveries.c.id).where(deliveries.c.message_id == m.id)
            if delivery_state:
                sub = sub.where(deliveries.c.state == q.status)
            if q.destination:
                sub = sub.where(deliveries.c.destination == q.destination)
            if q.status == "error" and not q.destination:
                # an ingest error (transformer) or a delivery waiting for its retry
                conds.append(or_(m.status == "error", sub.exists()))
            elif q.status in MESSAGE_STATUSES and not delivery_state:
                conds.append(m.status == q.status)
                if q.destination:
                    conds.append(sub.exists())
            else:
                conds.append(sub.exists())
        if q.text:
            needles = {q.text.encode("utf-8"), q.text.encode("gb18030", errors="ignore")}
            fn = func.instr if self.sqlite else (lambda col, n: func.position(n.op("IN")(col)))
            ors: list[Any] = [m.control_id == q.text]
            for n in needles:
                if not n:
                    continue
                lit = literal(n, type_=LargeBinary())
                ors.append(fn(m.raw, lit) > 0)
            conds.append(or_(*ors))
        return conds

    def search(self, q: MessageQuery) -> list[dict[str, Any]]:
        cols = [c for c in messages.c if c.name not in ("raw", "transformed", "headers")]
        stmt = select(*cols).where(*self._where(q)).order_by(messages.c.received_at.desc(), messages.c.id.desc())
        stmt = stmt.limit(max(1, min(q.limit, 1000))).offset(max(0, q.offset))
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
            if rows:
                states = conn.execute(
                    select(deliveries.c.message_id, deliveries.c.destination, deliveries.c.state,
                           deliveries.c.attempts)
                    .where(deliveries.c.message_id.in_([r["id"] for r in rows]))
                ).all()
                per: dict[str, dict[str, str]] = {}
                for s in states:
                    per.setdefault(s.message_id, {})[s.destination] = s.state
                for r in rows:
                    r["destinations"] = per.get(r["id"], {})
        return rows

    def matching_ids(self, q: MessageQuery, *, cap: int = 100_000) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(messages.c.id).where(*self._where(q)).order_by(messages.c.received_at).limit(cap)
                ).scalars()
            )

    # -- operator actions ------------------------------------------------------------------
    def undelivered(self, message_ids: Sequence[str]) -> set[str]:
        """Those of ``message_ids`` that exist and have no delivery at all (failed in the transformer,
        filtered, stored without destinations, or refused by an actor)."""
        out: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(message_ids), 500):
                chunk = list(message_ids[i:i + 500])
                had = set(conn.execute(select(deliveries.c.message_id).where(deliveries.c.message_id.in_(chunk))
                                       .distinct()).scalars())
                exist = conn.execute(select(messages.c.id).where(messages.c.id.in_(chunk))).scalars()
                out.update(m for m in exist if m not in had)
        return out

    def processed_again(self, msg: Message, *, status: str, transformed: bytes | None, error: str | None,
                        destinations: Sequence[str] = ()) -> None:
        """Record a message run through its channel again (`ihehub.engine.pipeline.reprocess`) on its own
        row — status, error, transformed body, headers (the mapping version) — and queue its deliveries
        (a destination it already has starts again with a fresh attempt budget)."""

        def op(conn: Connection) -> None:
            now = time.time()
            conn.execute(update(messages).where(messages.c.id == msg.id).values(
                status=status, error=error, transformed=transformed,
                headers=json.dumps(dict(msg.headers), ensure_ascii=False) if msg.headers else None))
            have = {r.destination: r.id for r in conn.execute(
                select(deliveries.c.id, deliveries.c.destination).where(deliveries.c.message_id == msg.id))}
            again = [have[d] for d in destinations if d in have]
            if again:
                conn.execute(update(deliveries).where(deliveries.c.id.in_(again)).values(
                    state="queued", attempts=0, next_attempt_at=now, lease_owner=None, lease_expires=None,
                    dispatched=False, updated_at=now))
            new = [_delivery_row(msg.id, msg.channel, d, now) for d in dict.fromkeys(destinations) if d not in have]
            if new:
                conn.execute(insert(deliveries), new)

        self.writer.run(op)

    def resend(self, message_ids: Sequence[str], destinations: Sequence[str] | None, *,
               channel_destinations: Mapping[str, Sequence[str]]) -> int:
        """Queue each message again to ``destinations``; when None, to the destinations it has deliveries
        for (those its routing chose), or — for a message that has none — to all of its channel's (callers
        run such messages through their channel again instead: `ihehub.engine.pipeline.reprocess`).

        A delivery that exists is reset to queued with a fresh attempt budget (its attempt log is
        kept); a destination the message never had gets a new delivery.  Returns deliveries queued.
        """

        def op(conn: Connection) -> int:
            now = time.time()
            count = 0
            for i in range(0, len(message_ids), 500):
                chunk = list(message_ids[i:i + 500])
                rows = conn.execute(
                    select(messages.c.id, messages.c.channel, messages.c.raw).where(messages.c.id.in_(chunk))
                ).all()
                existing = conn.execute(
                    select(deliveries.c.id, deliveries.c.message_id, deliveries.c.destination)
                    .where(deliveries.c.message_id.in_(chunk))
                ).all()
                have = {(e.message_id, e.destination): e.id for e in existing}
                routed: dict[str, list[str]] = {}
                for e in existing:
                    routed.setdefault(e.message_id, []).append(e.destination)
                new_rows = []
                reset_ids = []
                for r in rows:
                    if r.raw is None:
                        continue  # body pruned by retention: nothing to send
                    targets = destinations or routed.get(r.id) or channel_destinations.get(r.channel, ())
                    for dest in targets:
                        if (r.id, dest) in have:
                            reset_ids.append(have[(r.id, dest)])
                        else:
                            new_rows.append(_delivery_row(r.id, r.channel, dest, now))
                if reset_ids:
                    conn.execute(
                        update(deliveries).where(deliveries.c.id.in_(reset_ids)).values(
                            state="queued", attempts=0, next_attempt_at=now, lease_owner=None,
                            lease_expires=None, dispatched=False, updated_at=now,
                        )
                    )
                if new_rows:
                    conn.execute(insert(deliveries), new_rows)
                    conn.execute(
                        update(messages)
                        .where(messages.c.id.in_({r["message_id"] for r in new_rows}))
                        .values(status="queued")
                    )
                count += len(reset_ids) + len(new_rows)
            return count

        return int(self.writer.run(op))

    def prune_bodies(self, older_than_days: float) -> int:
        """Retention: drop bodies and responses of messages older than N days; keep the metadata."""
        cutoff = time.time() - older_than_days * 86400

        def op(conn: Connection) -> int:
            ids = select(messages.c.id).where(messages.c.received_at < cutoff, messages.c.pruned_at.is_(None))
            conn.execute(update(deliveries).where(deliveries.c.message_id.in_(ids)).values(response=None))
            conn.execute(update(attempts).where(attempts.c.message_id.in_(ids)).values(response=None))
            res = conn.execute(
                update(messages)
                .where(messages.c.received_at < cutoff, messages.c.pruned_at.is_(None))
                .values(raw=None, transformed=None, pruned_at=time.time())
            )
            conn.execute(delete(dedup_keys).where(dedup_keys.c.created_at < cutoff))
            return int(res.rowcount or 0)

        return int(self.writer.run(op))

    # -- statistics ------------------------------------------------------------------------
    def queue_depths(self) -> dict[tuple[str, str], int]:
        """(queue, state) -> count for unfinished deliveries."""
        d = deliveries.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(d.queue, d.state, func.count()).where(d.state.not_in(FINAL_STATES)).group_by(d.queue, d.state)
            ).all()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def channel_counts(self) -> dict[str, dict[str, int]]:
        m = messages.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(m.channel, m.status, func.count()).group_by(m.channel, m.status)).all()
            drows = conn.execute(
                select(deliveries.c.queue, deliveries.c.state, func.count())
                .group_by(deliveries.c.queue, deliveries.c.state)
            ).all()
        out: dict[str, dict[str, int]] = {}
        for ch, st, n in rows:
            out.setdefault(ch, {})
            out[ch][st] = int(n)
            out[ch]["received"] = out[ch].get("received", 0) + int(n)
        for queue, st, n in drows:
            ch = queue.split("/", 1)[0]
            out.setdefault(ch, {})
            key = f"delivery_{st}"
            out[ch][key] = out[ch].get(key, 0) + int(n)
        return out

    # -- channel start/stop persisted for every process ------------------------------------
    def set_channel_enabled(self, channel: str, enabled: bool, by: str = "") -> None:
        def op(conn: Connection) -> None:
            now = time.time()
            ins = (sqlite_insert if self.sqlite else pg_insert)(channel_state).values(
                channel=channel, enabled=enabled, updated_at=now, updated_by=by
            )
            conn.execute(ins.on_conflict_do_update(
                index_elements=["channel"], set_={"enabled": enabled, "updated_at": now, "updated_by": by}
            ))

        self.writer.run(op)

    def channel_overrides(self) -> dict[str, bool]:
        with self.engine.connect() as conn:
            return {r.channel: bool(r.enabled) for r in conn.execute(select(channel_state))}


class _Flush:
    """One group-commit of coalesced appends.  Idempotent: if the writer re-runs it alone after a
    failed batch, it inserts the same items again (the failed transaction was rolled back)."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self.items: list[Any] | None = None

    def _take(self) -> list[Any]:
        if self.items is None:
            with self.store._lock:
                self.items, self.store._pending = self.store._pending, []
                self.store._flush_scheduled = False
        return self.items

    def __call__(self, conn: Connection) -> list[Any]:
        items = self._take()
        if items:
            # exec_driver_sql: a driver-level executemany, ~40% less overhead than Core insert() here.
            _insert_many(conn, messages.name, [i[0] for i in items])
            rows = [r for i in items for r in i[1]]
            if rows:
                _insert_many(conn, deliveries.name, rows)
        return items

    def resolve(self, wfut: concurrent.futures.Future[list[Any]]) -> None:
        exc = wfut.exception()
        # _take() here too: if the transaction failed before this op ran (the database refused the
        # connection), the items are still pending and must get the error, or they would wait forever.
        for mrow, drows, fut in self._take():
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(AppendResult(message_id=mrow["id"], deliveries=len(drows)))


def _insert_many(conn: Connection, table: str, rows: list[dict[str, Any]]) -> None:
    cols = list(rows[0])
    style = conn.dialect.paramstyle
    if style == "qmark":
        marks, params = ",".join("?" * len(cols)), [tuple(r.values()) for r in rows]
    elif style == "format":
        marks, params = ",".join(["%s"] * len(cols)), [tuple(r.values()) for r in rows]
    elif style == "pyformat":
        marks, params = ",".join(f"%({c})s" for c in cols), rows  # type: ignore[assignment]
    else:  # named
        marks, params = ",".join(f":{c}" for c in cols), rows  # type: ignore[assignment]
    conn.exec_driver_sql(f"INSERT INTO {table} ({','.join(cols)}) VALUES ({marks})", params)


def queue_name(channel: str, destination: str) -> str:
    return f"{channel}/{destination}"


def _message_row(msg: Message, status: str, transformed: bytes | None, error: str | None) -> dict[str, Any]:
    return {
        "id": msg.id, "channel": msg.channel, "received_at": msg.received_at.timestamp(),
        "content_type": msg.content_type, "charset": msg.charset, "control_id": msg.control_id,
        "message_type": msg.message_type, "correlation_id": msg.correlation_id, "source": msg.source,
        "headers": json.dumps(dict(msg.headers), ensure_ascii=False) if msg.headers else None,
        "size": len(msg.raw), "raw": msg.raw, "transformed": transformed, "status": status,
        "error": error, "pruned_at": None,
    }


def _delivery_row(message_id: str, channel: str, destination: str, now: float) -> dict[str, Any]:
    return {
        "message_id": message_id, "queue": queue_name(channel, destination), "destination": destination,
        "state": "queued", "attempts": 0, "next_attempt_at": now, "lease_owner": None, "lease_expires": None,
        "dispatched": False, "response_status": None, "response": None, "error": None,
        "created_at": now, "updated_at": now,
    }
