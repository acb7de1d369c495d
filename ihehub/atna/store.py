"""The Audit Record Repository's store: append with a hash chain, search, verify, retention.

* ``add`` queues a record; the bus `Writer` commits every waiting record in one transaction (group
  commit, one executemany per table), assigning each its ``seq`` and ``hash = SHA-256(previous hash,
  record content)`` under a lock on the chain head row, so several processes (PostgreSQL) append to
  one gapless chain.  If the database is down the records wait and are retried (with backoff);
  receivers read `backlog` to stop reading from senders meanwhile.
* ``verify`` walks the chain and reports the first edited, deleted or re-ordered record, a removed
  tail, and search-index rows that were removed.
* ``prune`` (retention by age) deletes the oldest records and keeps the hash of the last one it
  removed, so the remaining chain still verifies.
* ``search`` backs ``/api/audit`` and ITI-81: patient, user, event id/type, action, outcome, source,
  address, entity, validity, event time range; newest first; offset or keyset (``before``) paging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, Select, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ihehub.atna.ingest import AuditRecord
from ihehub.atna.tables import ID_VALUE_SIZE, SIZES, audit_chain, audit_ids, audit_records
from ihehub.bus.db import StoreUnavailable, Writer, is_sqlite

__all__ = ["GENESIS", "AuditPage", "AuditQuery", "AuditStore", "ChainHead", "StoredAudit", "VerifyReport",
           "chain_hash"]

log = logging.getLogger("ihehub.atna")

GENESIS = "0" * 64
HASHED = (
    "seq", "received_at", "transport", "peer", "tls_subject", "syslog_host", "syslog_app", "syslog_procid",
    "syslog_msgid", "event_id", "event_type", "action", "outcome", "event_time", "source_id", "site_id", "ids",
    "valid", "errors", "body_at", "size",
)
_COLUMNS = (*HASHED, "raw", "hash")
_AFTER_SEQ = HASHED[1:]
_VALID_AT = _AFTER_SEQ.index("valid")
_RETRY_MAX = 5.0
# kinds of ids with rows in audit_ids (the rest, network addresses, are searched in the ids column)
INDEXED_KINDS = frozenset({"patient", "user", "study", "document", "object"})
_MAX_LIMIT = 1000
_JSON = json.JSONEncoder(separators=(",", ":"))  # canonical JSON (what json.dumps with these separators writes)


def chain_hash(prev: str, row: Mapping[str, Any] | RowMapping) -> str:
    """SHA-256 over the previous record's hash, this record's fields (canonical JSON) and its raw bytes."""
    fields = [int(row[c]) if c == "valid" else row[c] for c in HASHED]
    return _link(prev, _JSON.encode(fields), row["raw"])


def _link(prev: str, fields_json: str, raw: bytes) -> str:
    h = hashlib.sha256(prev.encode("ascii"))
    h.update(b"\n")
    h.update(fields_json.encode("ascii"))
    h.update(b"\n")
    h.update(raw)
    return h.hexdigest()


def _clean(value: str | None, size: int | None = None) -> str | None:
    if value is None:
        return None
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        value = value.replace("\x00", "\ufffd")
    return value[:size] if size is not None else value


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StoredAudit:
    """A stored record (``raw`` is None unless asked for)."""

    seq: int
    received_at: float
    transport: str
    peer: str | None
    tls_subject: str | None
    syslog_host: str | None
    syslog_app: str | None
    syslog_procid: str | None
    syslog_msgid: str | None
    event_id: str | None
    event_type: str | None
    action: str | None
    outcome: int | None
    event_time: float | None
    source_id: str | None
    site_id: str | None
    ids: tuple[tuple[str, str], ...]
    valid: bool
    errors: str | None
    body_at: int | None
    size: int
    hash: str
    raw: bytes | None = None

    def xml(self) -> bytes | None:
        """The audit message XML (the syslog MSG without its BOM), when raw was loaded and has one."""
        if self.raw is None or self.body_at is None:
            return None
        return self.raw[self.body_at:]

    def values(self, kind: str) -> list[str]:
        return [v for k, v in self.ids if k == kind]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (raw as text when it is UTF-8, else omitted; ids grouped by kind)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("raw", "ids")}
        grouped: dict[str, list[str]] = {}
        for k, v in self.ids:
            grouped.setdefault(k, []).append(v)
        out["ids"] = grouped
        if self.raw is not None:
            try:
                out["raw"] = self.raw.decode("utf-8")
            except UnicodeDecodeError:
                out["raw"] = None
        return out


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditQuery:
    """A search of the audit log.  Times are epoch seconds on EventDateTime (``since`` <= t < ``until``)."""

    patient: str | None = None  # a full CX or its ID component
    user: str | None = None  # UserID or UserName of any participant
    event_id: str | None = None  # EventID code (110112)
    event_type: str | None = None  # EventTypeCode code (ITI-9)
    action: str | None = None
    outcome: int | Sequence[int] | None = None
    source: str | None = None  # AuditSourceID
    address: str | None = None  # NetworkAccessPointID of any participant
    entity: str | None = None  # any participant object id (document, study, query, submission set, patient)
    peer: str | None = None  # the sender's address as the repository saw it (prefix match)
    valid: bool | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    offset: int = 0
    before: int | None = None  # keyset paging: records with seq < before
    # newest EventDateTime first (ITI-81) instead of newest received first; needs since or until, and pages
    # with (before_time, before): the event time and seq of the previous page's last record
    by_time: bool = False
    before_time: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditPage:
    records: list[StoredAudit]
    next_before: int | None  # pass as AuditQuery.before for the next page; None when this was the last
    next_before_time: float | None = None  # by_time searches: pass as AuditQuery.before_time too


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChainHead:
    last_seq: int
    last_hash: str
    pruned_seq: int
    pruned_hash: str
    pruned_at: float | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of `AuditStore.verify`: ``ok``, or the first bad record and what is wrong."""

    ok: bool
    checked: int
    first_bad: int | None = None
    problem: str | None = None
    head: ChainHead | None = None


NARROW_WINDOW = 2 * 86400.0  # seconds: a search window this short is read by event time (see `search`)


class AuditStore:
    """Audit records in SQL, written through the bus `Writer` (group commit)."""

    def __init__(self, engine: Engine, writer: Writer, *, chain: str = "main") -> None:
        self.engine = engine
        self.writer = writer
        self.chain = chain
        self.sqlite = is_sqlite(engine)
        self._lock = threading.Lock()
        self._pending: list[_Item] = []
        self._flush_scheduled = False
        self._inflight = 0
        self._retry_delay = 0.0
        self._retry_timer: threading.Timer | None = None
        self._closed = False
        self.stored = 0
        self.failures = 0

    # -- writing --------------------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        """Records accepted by `add` and not committed yet."""
        return self._inflight

    def add(self, record: AuditRecord) -> concurrent.futures.Future[int]:
        """Queue ``record``; the future gives its ``seq`` once committed."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue(_Item(record, future))
        return future

    def add_nowait(self, record: AuditRecord) -> None:
        """Queue ``record`` without a future (receivers: syslog has no acknowledgement to wait for);
        a record the database refuses for good is logged."""
        self._queue(_Item(record, None))

    def add_prepared(self, rows: Sequence[dict[str, Any]]) -> None:
        """Queue records already turned into rows by `prepare_row` (in a worker process), without futures."""
        items = [_Item(None, None, _row=row) for row in rows]
        with self._lock:
            self._pending.extend(items)
            self._inflight += len(items)
            schedule = not self._flush_scheduled and self._retry_timer is None
            if schedule:
                self._flush_scheduled = True
        if schedule:
            self._submit(_Flush(self))

    def _queue(self, item: _Item) -> None:
        with self._lock:
            self._pending.append(item)
            self._inflight += 1
            schedule = not self._flush_scheduled and self._retry_timer is None
            if schedule:
                self._flush_scheduled = True
        if schedule:
            self._submit(_Flush(self))

    async def append(self, record: AuditRecord) -> int:
        return await asyncio.wrap_future(self.add(record))

    def append_sync(self, record: AuditRecord) -> int:
        return self.add(record).result()

    def close(self) -> None:
        """Stop retrying (the writer itself belongs to the caller)."""
        with self._lock:
            self._closed = True
            timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.cancel()

    def _submit(self, flush: _Flush) -> None:
        self.writer.submit(flush).add_done_callback(flush.resolve)

    def _take(self) -> list[_Item]:
        with self._lock:
            items, self._pending = self._pending, []
            self._flush_scheduled = False
        return items

    def _done(self, items: Sequence[_Item], seqs: Sequence[int]) -> None:
        with self._lock:
            self._inflight -= len(items)
            self.stored += len(items)
            if self._retry_delay:
                log.info("atna: the audit store accepts writes again")
            self._retry_delay = 0.0
        for item, seq in zip(items, seqs, strict=True):
            if item.future is not None and not item.future.done():
                item.future.set_result(seq)

    def _failed(self, items: list[_Item], exc: BaseException) -> None:
        if isinstance(exc, StoreUnavailable):  # wait and retry: nothing is dropped
            with self._lock:
                self._pending[:0] = items
                first = self._retry_delay == 0.0
                self._retry_delay = min(max(self._retry_delay * 2, 0.1), _RETRY_MAX)
                if self._retry_timer is None and not self._closed:
                    self._retry_timer = threading.Timer(self._retry_delay, self._retry)
                    self._retry_timer.daemon = True
                    self._retry_timer.start()
            if first:
                log.warning("atna: cannot store %d audit records (%s); retrying", len(items), exc)
            return
        if len(items) > 1:  # isolate the record the database refuses
            for item in items:
                self._submit(_Flush(self, [item]))
            return
        item = items[0]
        if not item.degraded:
            log.error("atna: audit record from %s refused by the database (%s); storing it without its "
                      "parsed fields", item.row.get("peer"), exc)
            self._submit(_Flush(self, [_Item(None, item.future, degraded=True, _row=_degraded(item.row, exc))]))
            return
        with self._lock:
            self._inflight -= 1
            self.failures += 1
        log.error("atna: audit record from %s could not be stored: %s", item.row.get("peer"), exc)
        if item.future is not None and not item.future.done():
            item.future.set_exception(exc)

    def _retry(self) -> None:
        with self._lock:
            self._retry_timer = None
            if self._closed or not self._pending or self._flush_scheduled:
                return
            self._flush_scheduled = True
        self._submit(_Flush(self))

    def _lock_head(self, conn: Connection, now: float) -> tuple[int, str]:
        """Lock the chain head row (the UPDATE holds it until commit) and read it."""
        stmt = update(audit_chain).where(audit_chain.c.name == self.chain).values(updated_at=now)
        if conn.execute(stmt).rowcount == 0:
            ins = (sqlite_insert if self.sqlite else pg_insert)(audit_chain).values(
                name=self.chain, last_seq=0, last_hash=GENESIS, pruned_seq=0, pruned_hash=GENESIS,
                pruned_at=None, updated_at=now,
            ).on_conflict_do_nothing()
            conn.execute(ins)
            conn.execute(stmt)
        row = conn.execute(select(audit_chain.c.last_seq, audit_chain.c.last_hash)
                           .where(audit_chain.c.name == self.chain)).one()
        return int(row.last_seq), str(row.last_hash)

    # -- reading --------------------------------------------------------------------------------
    def head(self) -> ChainHead:
        with self.engine.connect() as conn:
            return self._head(conn)

    def _head(self, conn: Connection) -> ChainHead:
        row = conn.execute(select(audit_chain).where(audit_chain.c.name == self.chain)).first()
        if row is None:
            return ChainHead(last_seq=0, last_hash=GENESIS, pruned_seq=0, pruned_hash=GENESIS, pruned_at=None)
        return ChainHead(last_seq=int(row.last_seq), last_hash=row.last_hash, pruned_seq=int(row.pruned_seq),
                         pruned_hash=row.pruned_hash, pruned_at=row.pruned_at)

    def get(self, seq: int, *, with_raw: bool = True) -> StoredAudit | None:
        cols = _select_columns(with_raw)
        with self.engine.connect() as conn:
            row = conn.execute(select(*cols).where(audit_records.c.seq == seq)).first()
        return _stored(row._mapping) if row is not None else None

    def search(self, q: AuditQuery, *, with_raw: bool = False) -> AuditPage:
        """Records matching every given criterion, newest first."""
        limit = max(1, min(q.limit, _MAX_LIMIT))
        stmt = self._filter(select(*_select_columns(with_raw)), q)
        if q.by_time:
            return self._search_by_time(stmt, q, limit)
        if q.before is not None:
            stmt = stmt.where(audit_records.c.seq < q.before)
        # a narrow time window and nothing more selective: ``seq + 0`` keeps PostgreSQL from walking the
        # primary key backwards through millions of newer rows; it reads the window by the event_time index
        # and sorts it (10M records: a one-day search 4.3 s -> 42 ms).  Wide windows keep the key walk, which
        # stops early; a patient, user or entity is found through its own index (user + one day at 2M
        # records: p99 298 ms by event time, 97 ms by key).
        narrow = (q.since is not None and q.until is not None and q.until - q.since <= NARROW_WINDOW
                  and not (q.patient or q.user or q.entity))
        order = (audit_records.c.seq + 0) if narrow else audit_records.c.seq
        stmt = stmt.order_by(order.desc()).limit(limit + 1)
        if q.offset:
            stmt = stmt.offset(q.offset)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        records = [_stored(r._mapping) for r in rows[:limit]]
        return AuditPage(records=records, next_before=records[-1].seq if len(rows) > limit else None)

    def _search_by_time(self, stmt: Select[Any], q: AuditQuery, limit: int) -> AuditPage:
        """Newest event first: the event_time index is walked backwards from ``until`` and stops at the
        page's end, whatever the window's width (10M records: every ITI-81 search kind within 100 ms,
        docs/atna.md); a patient, user or entity search is driven by its own index when that is narrower."""
        c = audit_records.c
        if q.since is None and q.until is None:
            raise ValueError("a search by event time needs since or until")
        if q.before is not None and q.before_time is None:
            raise ValueError("paging a search by event time needs before_time with before")
        time_col, seq_col = c.event_time, c.seq
        if q.user:
            # a user has many records: walk its index rows (kind, value, event_time, seq) backwards from the
            # window's end and read only the page's records (one row per record: the key includes seq)
            u = audit_ids.alias("u")
            stmt = (self._filter(select(*stmt.selected_columns).select_from(
                        audit_records.join(u, u.c.seq == c.seq)), dataclasses.replace(q, user=None))
                    .where(u.c.kind == "user", u.c.value == q.user[:ID_VALUE_SIZE]))
            time_col, seq_col = u.c.event_time, u.c.seq
            if q.since is not None:
                stmt = stmt.where(time_col >= q.since)
            if q.until is not None:
                stmt = stmt.where(time_col < q.until)
        if q.before is not None:
            stmt = stmt.where(or_(time_col < q.before_time, and_(time_col == q.before_time, seq_col < q.before)))
        stmt = stmt.order_by(time_col.desc(), seq_col.desc()).limit(limit + 1)
        if q.offset:
            stmt = stmt.offset(q.offset)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        records = [_stored(r._mapping) for r in rows[:limit]]
        more = len(rows) > limit
        return AuditPage(records=records, next_before=records[-1].seq if more else None,
                         next_before_time=records[-1].event_time if more else None)

    def count(self, q: AuditQuery) -> int:
        stmt = self._filter(select(func.count()).select_from(audit_records), q)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def _filter(self, stmt: Select[Any], q: AuditQuery) -> Select[Any]:
        c = audit_records.c
        def within(sub: Select[Any]) -> Select[Any]:  # the time range on the index rows too (their own index)
            if q.since is not None:
                sub = sub.where(audit_ids.c.event_time >= q.since)
            if q.until is not None:
                sub = sub.where(audit_ids.c.event_time < q.until)
            return sub

        if q.patient:
            stmt = stmt.where(c.seq.in_(within(_patient_seqs(q.patient))))
        if q.user:
            stmt = stmt.where(c.seq.in_(within(select(audit_ids.c.seq).where(
                audit_ids.c.kind == "user", audit_ids.c.value == q.user[:ID_VALUE_SIZE]))))
        if q.address:
            stmt = stmt.where(c.ids.contains(f'["address",{json.dumps(q.address)}]', autoescape=True))
        if q.entity:
            stmt = stmt.where(c.seq.in_(within(select(audit_ids.c.seq).where(
                audit_ids.c.kind.in_(("document", "study", "object", "patient")),
                audit_ids.c.value == q.entity[:ID_VALUE_SIZE]))))
        if q.event_id:
            stmt = stmt.where(c.event_id == q.event_id)
        if q.event_type:
            stmt = stmt.where(c.event_type == q.event_type)
        if q.action:
            stmt = stmt.where(c.action == q.action)
        if q.outcome is not None:
            outcomes = [q.outcome] if isinstance(q.outcome, int) else list(q.outcome)
            stmt = stmt.where(c.outcome.in_(outcomes))
        if q.source:
            stmt = stmt.where(c.source_id == q.source)
        if q.peer:
            stmt = stmt.where(c.peer.startswith(q.peer, autoescape=True))
        if q.valid is not None:
            stmt = stmt.where(c.valid.is_(q.valid))
        if q.since is not None:
            stmt = stmt.where(c.event_time >= q.since)
        if q.until is not None:
            stmt = stmt.where(c.event_time < q.until)
        return stmt

    # -- tamper evidence --------------------------------------------------------------------------
    def verify(self, *, batch: int = 2000, check_index: bool = True) -> VerifyReport:
        """Walk the chain from the retention point to the head; report the first problem."""
        with self.engine.connect() as conn:
            head = self._head(conn)
        expected, prev, checked = head.pruned_seq + 1, head.pruned_hash, 0
        cols = _select_columns(True)
        while expected <= head.last_seq:
            with self.engine.connect() as conn:
                rows = conn.execute(select(*cols).where(audit_records.c.seq >= expected,
                                                        audit_records.c.seq <= head.last_seq)
                                    .order_by(audit_records.c.seq).limit(batch)).all()
                if not rows:
                    return self._gap(conn, head, checked, expected, head.last_seq, at_end=True)
                for r in rows:
                    row = r._mapping
                    seq = int(row["seq"])
                    if seq != expected:
                        return self._gap(conn, head, checked, expected, seq - 1)
                    if chain_hash(prev, row) != row["hash"]:
                        problem = (f"record {seq} does not match its hash: it was edited (or record {seq - 1} "
                                   "was edited and its hash recomputed)") if seq > head.pruned_seq + 1 else (
                                   f"record {seq} does not match its hash: it was edited")
                        return VerifyReport(ok=False, checked=checked, first_bad=seq, problem=problem, head=head)
                    prev = row["hash"]
                    expected = seq + 1
                    checked += 1
                if check_index:
                    mismatch = _index_mismatch(conn, rows)
                    if mismatch is not None:
                        return VerifyReport(ok=False, checked=checked, first_bad=mismatch[0], head=head,
                                            problem=mismatch[1])
        if prev != head.last_hash:
            return VerifyReport(ok=False, checked=checked, first_bad=head.last_seq, head=head,
                                problem="the chain head does not match the last record (audit_chain was edited)")
        return VerifyReport(ok=True, checked=checked, head=head)

    def _gap(self, conn: Connection, head: ChainHead, checked: int, first: int, last: int, *,
             at_end: bool = False) -> VerifyReport:
        now = self._head(conn)
        if now.pruned_seq >= first:  # retention ran meanwhile: not tampering; start again
            return self.verify()
        what = f"record {first}" if first == last else f"records {first}..{last}"
        where = " at the end of the chain" if at_end else ""
        return VerifyReport(ok=False, checked=checked, first_bad=first, head=head,
                            problem=f"{what}{where} deleted")

    # -- retention --------------------------------------------------------------------------------
    def prune(self, older_than_days: float, *, now: float | None = None, batch: int = 5000) -> int:
        """Delete records received more than ``older_than_days`` ago, oldest first; returns how many.

        The chain head remembers the last removed record's seq and hash, so `verify` still proves
        that nothing after it was changed.
        """
        cutoff = (now if now is not None else time.time()) - older_than_days * 86400.0
        total = 0
        while True:
            removed = self.writer.run(self._prune_op(cutoff, batch))
            total += removed
            if removed < batch:
                return total

    def _prune_op(self, cutoff: float, batch: int) -> Any:
        def op(conn: Connection) -> int:
            now = time.time()
            self._lock_head(conn, now)
            head = self._head(conn)
            rows = conn.execute(select(audit_records.c.seq, audit_records.c.received_at, audit_records.c.hash)
                                .where(audit_records.c.seq > head.pruned_seq)
                                .order_by(audit_records.c.seq).limit(batch)).all()
            old = []
            for r in rows:
                if r.received_at >= cutoff:
                    break
                old.append(r)
            if not old:
                return 0
            last = old[-1]
            conn.execute(audit_ids.delete().where(audit_ids.c.seq > head.pruned_seq, audit_ids.c.seq <= last.seq))
            conn.execute(audit_records.delete().where(audit_records.c.seq > head.pruned_seq,
                                                      audit_records.c.seq <= last.seq))
            conn.execute(update(audit_chain).where(audit_chain.c.name == self.chain).values(
                pruned_seq=int(last.seq), pruned_hash=last.hash, pruned_at=now))
            return len(old)

        return op


@dataclasses.dataclass(slots=True)
class _Item:
    record: AuditRecord | None
    future: concurrent.futures.Future[int] | None
    degraded: bool = False
    _row: dict[str, Any] | None = None

    @property
    def row(self) -> dict[str, Any]:
        """The column values (computed once, in the writer thread)."""
        if self._row is None:
            if self.record is None:
                raise ValueError("an item needs a record or a row")
            self._row = prepare_row(self.record)
            self.record = None
        return self._row


class _Flush:
    """One group commit: every waiting record (or the given ones) in seq order with their hashes.
    Idempotent: a re-run after a rolled-back transaction computes the same rows again."""

    def __init__(self, store: AuditStore, items: list[_Item] | None = None) -> None:
        self.store = store
        self.items = items
        self.seqs: list[int] = []

    def __call__(self, conn: Connection) -> None:
        if self.items is None:
            self.items = self.store._take()
        if not self.items:
            return
        now = time.time()
        seq, prev = self.store._lock_head(conn, now)
        values: list[tuple[Any, ...]] = []
        id_rows: list[tuple[Any, ...]] = []
        seqs: list[int] = []
        for item in self.items:
            seq += 1
            row = item.row
            # the canonical JSON of [seq, *fields]: the fields' part was written by prepare_row
            prev = _link(prev, f"[{seq},{row['_json']}", row["raw"])
            values.append((seq, *row["_values"], row["raw"], prev))
            seqs.append(seq)
            event_time = row.get("event_time")
            id_rows.extend((k, v, seq, event_time) for k, v in row["_index"])
        _insert_many(conn, audit_records.name, _COLUMNS, values)
        if id_rows:
            _insert_many(conn, audit_ids.name, ("kind", "value", "seq", "event_time"), id_rows)
        conn.execute(update(audit_chain).where(audit_chain.c.name == self.store.chain)
                     .values(last_seq=seq, last_hash=prev, updated_at=now))
        self.seqs = seqs

    def resolve(self, fut: concurrent.futures.Future[None]) -> None:
        if self.items is None:  # the transaction failed before this op ran
            self.items = self.store._take()
        if not self.items:
            return
        exc = fut.exception()
        if exc is None:
            self.store._done(self.items, self.seqs)
        else:
            self.store._failed(self.items, exc)


def _insert_many(conn: Connection, table: str, cols: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """A driver-level executemany (much cheaper per row than a Core insert in the writer thread)."""
    style = conn.dialect.paramstyle
    if style == "qmark":
        marks = ",".join("?" * len(cols))
        params: Any = rows
    elif style in ("format", "pyformat"):
        marks = ",".join(["%s"] * len(cols))
        params = rows
    else:  # named / numeric: fall back to dicts
        marks = ",".join(f":{c}" for c in cols)
        params = [dict(zip(cols, r, strict=True)) for r in rows]
    conn.exec_driver_sql(f"INSERT INTO {table} ({','.join(cols)}) VALUES ({marks})", params)


def _patient_seqs(patient: str) -> Select[Any]:
    """Records naming ``patient``: the full CX, or (an ID without ``^``) any CX with that ID component."""
    value = patient[:ID_VALUE_SIZE]
    k, v = audit_ids.c.kind, audit_ids.c.value
    if "^" in value:
        return select(audit_ids.c.seq).where(k == "patient", v == value)
    # CX values of this ID sort between "ID^" and "ID_" ('_' follows '^'): an index range scan
    return select(audit_ids.c.seq).where(k == "patient", or_(v == value, and_(v >= value + "^", v < value + "_")))


def _ids(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    try:
        return [(str(k), str(v)) for k, v in json.loads(text)]
    except (ValueError, TypeError):
        return []


def prepare_row(record: AuditRecord) -> dict[str, Any]:
    """Column values, cut to the column sizes, and what the writer needs besides (keys starting with
    ``_``): ``_index`` the audit_ids rows, ``_values`` the hashed fields after ``seq`` in column
    order and ``_json`` their canonical JSON (without its opening bracket), so that the writer
    thread only adds ``seq`` and hashes.  Runs in the writer thread, or in a worker process."""
    ids: dict[tuple[str, str], None] = {}
    for kind, value in record.ids:
        if len(value) > ID_VALUE_SIZE or "\x00" in value:
            value = (value.replace("\x00", "\ufffd"))[:ID_VALUE_SIZE]
        if value:
            ids[(kind[:8], value)] = None
    row: dict[str, Any] = {
        "received_at": float(record.received_at),
        "ids": _JSON.encode(list(ids)) if ids else None,
        "valid": bool(record.valid),
        "errors": _clean(record.errors),
        "body_at": record.body_at,
        "size": len(record.raw),
        "raw": bytes(record.raw),
        "outcome": record.outcome,
        "event_time": float(record.event_time) if record.event_time is not None else None,
        "_index": [k for k in ids if k[0] in INDEXED_KINDS],
    }
    for name, size in SIZES.items():
        text: str | None = getattr(record, name)
        if text is not None and (len(text) > size or "\x00" in text):
            text = _clean(text, size)
        row[name] = text
    return _hashed(row)


def _hashed(row: dict[str, Any]) -> dict[str, Any]:
    row["_values"] = values = tuple(map(row.__getitem__, _AFTER_SEQ))
    fields = list(values)
    fields[_VALID_AT] = int(fields[_VALID_AT])  # as chain_hash writes it
    row["_json"] = _JSON.encode(fields)[1:]
    return row


def _degraded(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    keep = {"received_at", "transport", "size", "raw", "peer"}
    out = {k: (v if k in keep else None) for k, v in row.items()}
    out["_index"] = []
    out["valid"] = False
    out["transport"] = row.get("transport") or "?"
    out["errors"] = _clean(f"stored without its parsed fields: {exc}\n{row.get('errors') or ''}".strip())
    return _hashed(out)


def _select_columns(with_raw: bool) -> list[Any]:
    cols = [audit_records.c[name] for name in (*HASHED, "hash")]
    if with_raw:
        cols.append(audit_records.c.raw)
    return cols


def _stored(row: Mapping[str, Any] | RowMapping) -> StoredAudit:
    return StoredAudit(
        seq=int(row["seq"]), received_at=row["received_at"], transport=row["transport"], peer=row["peer"],
        tls_subject=row["tls_subject"], syslog_host=row["syslog_host"], syslog_app=row["syslog_app"],
        syslog_procid=row["syslog_procid"], syslog_msgid=row["syslog_msgid"], event_id=row["event_id"],
        event_type=row["event_type"], action=row["action"], outcome=row["outcome"], event_time=row["event_time"],
        source_id=row["source_id"], site_id=row["site_id"], ids=tuple(_ids(row["ids"])), valid=bool(row["valid"]),
        errors=row["errors"], body_at=row["body_at"], size=row["size"], hash=row["hash"],
        raw=bytes(row["raw"]) if "raw" in row and row["raw"] is not None else None,
    )


def _index_mismatch(conn: Connection, rows: Sequence[Any]) -> tuple[int, str] | None:
    """The first record of ``rows`` whose audit_ids rows differ from its ``ids``: (seq, what)."""
    first, last = int(rows[0]._mapping["seq"]), int(rows[-1]._mapping["seq"])
    found: dict[int, set[tuple[str, str]]] = {}
    times: dict[int, set[float | None]] = {}
    for k, v, s, t in conn.execute(select(audit_ids.c.kind, audit_ids.c.value, audit_ids.c.seq,
                                          audit_ids.c.event_time)
                                   .where(audit_ids.c.seq >= first, audit_ids.c.seq <= last)):
        found.setdefault(int(s), set()).add((k, v))
        times.setdefault(int(s), set()).add(t)
    for r in rows:
        seq = int(r._mapping["seq"])
        event_time = r._mapping["event_time"]
        # rows written before migration 0011 may lack the time; any other time hides the record from ITI-81
        if any(t is not None and t != event_time for t in times.get(seq, ())):
            return seq, f"the search index has another event time for record {seq} (edited in audit_ids)"
        want = {(k, v) for k, v in _ids(r._mapping["ids"]) if k in INDEXED_KINDS}
        have = found.get(seq, set())
        if want - have:
            kind, value = sorted(want - have)[0]
            return seq, f"the search index lost {kind} {value!r} of record {seq} (deleted from audit_ids)"
        if have - want:
            kind, value = sorted(have - want)[0]
            return seq, f"the search index has {kind} {value!r} for record {seq}, which the record does not name"
    return None
