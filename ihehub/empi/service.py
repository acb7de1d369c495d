"""`Empi`: the master patient index service — the one entry point of the PIX Manager, PDQ Supplier, API and CLI.

Transport-free: callers hand in typed records (`PatientRecord`, `Identifier`) and get typed results with
the `PatientEvent` list each change produced.  Errors are `EmpiError` subclasses naming the field and the
HL7 table 0357 code (`ihehub.empi.errors`).

Transactions: every state-changing call (one ITI-8 feed message, one merge, one review decision) is ONE
database transaction: the record, its history, index, links, reviews and events are committed together or
not at all.  With a `Writer` (the bus's group-commit thread) the call is run there, so on SQLite the EMPI
and the bus share the single writer and its batched fsync; without one, an engine transaction is used
(serialised by a lock on SQLite, where two writers would only wait on each other's file lock).  On
PostgreSQL concurrent feeds that share a blocking key are serialised by advisory locks, so two processes
never both create a patient for the same person.  Reads (queries, views) use their own connections and
never wait for the writer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from sqlalchemy import Connection, Engine, insert, select

from ihehub.bus.db import Writer, is_sqlite
from ihehub.empi import changes, feed, queries, store, visits
from ihehub.empi import tables as t
from ihehub.empi.blocking import blocking_keys
from ihehub.empi.compare import compare as compare_records
from ihehub.empi.config import EmpiConfig
from ihehub.empi.context import Ctx, load_estimated
from ihehub.empi.errors import DuplicateIdentifier, InvalidData, UnknownDomain, UnknownPatient
from ihehub.empi.matching import candidates as find_candidates
from ihehub.empi.model import (
    HD,
    ChangeResult,
    CrossReference,
    Domain,
    DomainType,
    FeedResult,
    FindResult,
    Identifier,
    MatchScore,
    PatientEvent,
    PatientQuery,
    PatientRecord,
    PatientView,
    RecordVersion,
    ReviewItem,
    SourceRecord,
    Visit,
    VisitQuery,
    VisitResult,
)
from ihehub.empi.normalize import NormRecord, normalize_feed
from ihehub.empi.scoring import FSParameters, Profile, decide

T = TypeVar("T")


class Empi:
    """The EMPI on an engine whose schema is migrated (``ihehub.bus.schema.upgrade``, branch ``empi``).

    ``Empi(engine, EmpiConfig(...), writer=hub_writer)``; every method is synchronous (call it through
    ``asyncio.to_thread`` from an event loop).  The enterprise identifier domain of the configuration is
    created on first use; source domains are added with `add_domain` (from the hub configuration).
    """

    def __init__(self, engine: Engine, config: EmpiConfig | None = None, *, writer: Writer | None = None) -> None:
        self.engine = engine
        self.config = config or EmpiConfig()
        self._writer = writer
        self._lock = threading.Lock() if writer is None and is_sqlite(engine) else None
        self._domains: dict[int, Domain] = {}
        self._profile: Profile | None = None
        self._setup_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------
    def _write(self, op: Callable[[Connection], T]) -> T:
        if self._writer is not None:
            return self._writer.run(op)
        if self._lock is not None:
            with self._lock, self.engine.begin() as conn:
                return op(conn)
        with self.engine.begin() as conn:
            return op(conn)

    def _read(self, fn: Callable[[Connection], T], *, autocommit: bool = False) -> T:
        """``fn`` on a connection of its own; ``autocommit`` for a read of one statement (no BEGIN and
        ROLLBACK round trips around it)."""
        with self.engine.connect() as conn:
            if autocommit:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            return fn(conn)

    def _ctx(self) -> Ctx:
        profile = self._profile or self.setup()
        return Ctx(config=self.config, profile=profile, domains=dict(self._domains))

    def setup(self) -> Profile:
        """Create the enterprise domain if missing; load domains and estimated parameters; the profile."""
        with self._setup_lock:
            cfg = self.config
            domains = self._read(store.load_domains)
            if not any(d.namespace == cfg.enterprise_namespace for d in domains):
                def op(conn: Connection) -> None:
                    if not any(d.namespace == cfg.enterprise_namespace for d in store.load_domains(conn)):
                        store.insert_domain(conn, cfg.enterprise_namespace, cfg.enterprise_oid,
                                            "ISO" if cfg.enterprise_oid else None, DomainType.ENTERPRISE,
                                            "enterprise master patient index")
                self._write(op)
                domains = self._read(store.load_domains)
            ent = next(d for d in domains if d.namespace == cfg.enterprise_namespace)
            if ent.type is not DomainType.ENTERPRISE:
                raise InvalidData(f"domain {ent.namespace!r} exists as a {ent.type.value} domain, it cannot be the "
                                  "enterprise domain", field="empi.enterprise_namespace")
            self._domains = {d.id: d for d in domains}
            est = self._read(load_estimated)
            self._profile = profile = cfg.build_profile(FSParameters.from_json(est) if est else None)
            return profile

    def _resolve(self, key: str | HD, field: str = "identifier.domain") -> Domain:
        ctx = self._ctx()
        try:
            return ctx.domain(key, field=field)
        except UnknownDomain:  # another process may have added it
            self._domains = {d.id: d for d in self._read(store.load_domains)}
            return self._ctx().domain(key, field=field)

    @property
    def profile(self) -> Profile:
        return self._ctx().profile

    # -- identifier domains ---------------------------------------------------------------------
    def add_domain(self, namespace: str, *, universal_id: str | None = None, universal_id_type: str | None = "ISO",
                   type: DomainType = DomainType.SOURCE, description: str = "") -> Domain:
        """Register an identifier domain (assigning authority); idempotent for the same namespace and OID."""
        namespace = (namespace or "").strip()
        if not namespace or len(namespace) > 64 or "^" in namespace or "&" in namespace:
            raise InvalidData(f"domain namespace {namespace!r} must be 1-64 characters without ^ or &",
                              field="domain.namespace")
        self._ctx()

        def op(conn: Connection) -> None:
            for d in store.load_domains(conn):
                if d.namespace == namespace or (universal_id and d.universal_id == universal_id):
                    if d.namespace == namespace and d.universal_id == universal_id and d.type is type:
                        return
                    raise DuplicateIdentifier(f"domain {namespace!r} ({universal_id}) conflicts with {d.namespace!r} "
                                              f"({d.universal_id}, {d.type.value})", field="domain.namespace")
            store.insert_domain(conn, namespace, universal_id, universal_id_type if universal_id else None, type,
                                description)

        self._write(op)
        self._domains = {d.id: d for d in self._read(store.load_domains)}
        return self._resolve(namespace)

    def domains(self) -> tuple[Domain, ...]:
        self._ctx()
        self._domains = {d.id: d for d in self._read(store.load_domains)}
        return tuple(self._domains.values())

    def domain(self, key: str | HD) -> Domain:
        """The domain of a namespace, an OID or an HD; `UnknownDomain` (204) otherwise."""
        return self._resolve(key)

    # -- feed (ITI-8) ---------------------------------------------------------------------------
    def _source_domain(self, key: str | HD) -> Domain:
        dom = self._resolve(key)
        if dom.type is not DomainType.SOURCE:
            raise InvalidData(f"records are fed in a source domain; {dom.namespace!r} is the {dom.type.value} "
                              "domain", field="identifier.domain")
        return dom

    def _normalize(self, record: PatientRecord) -> tuple[NormRecord, tuple[str, ...]]:
        return normalize_feed(record, strict_national_id=self.config.strict_national_id)

    def register(self, domain: str | HD, record: PatientRecord, *, event: str = "A01", message_id: str | None = None,
                 by: str = "feed", match: bool = True, visit: Visit | None = None) -> FeedResult:
        """Register (or, if known, update) a source record: match, link or found a patient, open reviews;
        ``visit`` (the feed's PV1) is kept with the record in the same transaction (ITI-22)."""
        dom = self._source_domain(domain)
        norm, warnings = self._normalize(record)
        ctx = self._ctx()

        def op(conn: Connection) -> FeedResult:
            result = feed.register(conn, ctx, dom, record, norm, warnings, event=event, message_id=message_id,
                                   by=by, match=match)
            self._keep_visit(conn, dom, record.pid, visit)
            return result

        return self._write(op)

    @staticmethod
    def _keep_visit(conn: Connection, dom: Domain, pid: str, visit: Visit | None) -> None:
        if visit is None:
            return
        row = store.record_row(conn, dom.id, pid)
        if row is not None:
            visits.upsert(conn, row.id, visit, store.now())

    def update(self, domain: str | HD, record: PatientRecord, *, event: str = "A08", message_id: str | None = None,
               by: str = "feed", create: bool = False, match: bool = True, visit: Visit | None = None) -> FeedResult:
        """Update a known record (A08); an unknown one is `UnknownPatient` unless ``create``."""
        dom = self._source_domain(domain)
        norm, warnings = self._normalize(record)
        ctx = self._ctx()

        def op(conn: Connection) -> FeedResult:
            row = store.record_row(conn, dom.id, record.pid)
            if row is None or row.status == "merged":
                if row is None and create:
                    result = feed.register(conn, ctx, dom, record, norm, warnings, event=event,
                                           message_id=message_id, by=by, match=match)
                    self._keep_visit(conn, dom, record.pid, visit)
                    return result
                ctx.resolve_record(conn, Identifier(value=record.pid, domain=dom.namespace))
                raise UnknownPatient(record.pid, dom.namespace)
            result = feed.update(conn, ctx, dom, row, record, norm, warnings, event=event, message_id=message_id,
                                 by=by, match=match)
            self._keep_visit(conn, dom, record.pid, visit)
            return result

        return self._write(op)

    def delete(self, identifier: Identifier, *, by: str = "feed") -> ChangeResult:
        """Mark a record deleted (A23/A29): it leaves its patient; its rows stay."""
        self._resolve(identifier.domain)
        ctx = self._ctx()
        return self._write(lambda conn: feed.delete(conn, ctx, identifier, by=by))

    # -- merge, link, review ----------------------------------------------------------------------
    def merge(self, surviving: Identifier, subsumed: Identifier, *, by: str = "feed", event: str = "A40",
              message_id: str | None = None) -> ChangeResult:
        """A40 (two records of one domain) or manual (two enterprise ids) merge; see `ihehub.empi.changes`."""
        self._resolve(surviving.domain)
        self._resolve(subsumed.domain, field="subsumed.domain")
        ctx = self._ctx()
        return self._write(lambda conn: changes.merge(conn, ctx, surviving, subsumed, by=by, event=event,
                                                      message_id=message_id))

    def unmerge(self, merge: int | Identifier, *, by: str) -> ChangeResult:
        """Undo a merge, given its id or the subsumed identifier."""
        if isinstance(merge, Identifier):
            self._resolve(merge.domain, field="subsumed.domain")
        ctx = self._ctx()
        return self._write(lambda conn: changes.unmerge(conn, ctx, merge, by=by))

    def link(self, record: Identifier, target: Identifier, *, by: str, reason: str = "") -> ChangeResult:
        """Move a record to the patient of ``target`` (an enterprise id or another record)."""
        self._resolve(record.domain)
        self._resolve(target.domain, field="target.domain")
        ctx = self._ctx()
        return self._write(lambda conn: changes.link(conn, ctx, record, target, by=by, reason=reason))

    def unlink(self, record: Identifier, *, by: str, reason: str = "") -> ChangeResult:
        """Take a record out of its patient into a new one, and keep it apart from the others."""
        self._resolve(record.domain)
        ctx = self._ctx()
        return self._write(lambda conn: changes.unlink(conn, ctx, record, by=by, reason=reason))

    def review_queue(self, *, state: str = "open", limit: int = 100, offset: int = 0) -> list[ReviewItem]:
        """Review items in ``state`` (open, accepted, rejected, obsolete), highest score first."""
        if state not in ("open", "accepted", "rejected", "obsolete"):
            raise InvalidData(f"review state {state!r} is not open, accepted, rejected or obsolete", field="state")
        ctx = self._ctx()
        return self._read(lambda conn: queries.review_list(conn, ctx, state=state, limit=limit, offset=offset))

    def accept(self, review_id: int, *, by: str) -> ChangeResult:
        ctx = self._ctx()
        return self._write(lambda conn: changes.accept(conn, ctx, review_id, by=by))

    def reject(self, review_id: int, *, by: str) -> ChangeResult:
        ctx = self._ctx()
        return self._write(lambda conn: changes.reject(conn, ctx, review_id, by=by))

    # -- queries (ITI-9, ITI-21) ------------------------------------------------------------------
    def cross_reference(self, identifier: Identifier,
                        target_domains: Sequence[str | HD] | None = None) -> CrossReference:
        """PIX query: the patient's identifiers in ``target_domains`` (all when None), the queried one left out."""
        self._resolve(identifier.domain)
        for d in target_domains or ():
            self._resolve(d, field="what_domains")
        ctx = self._ctx()
        return self._read(lambda conn: queries.cross_reference(conn, ctx, identifier, target_domains), autocommit=True)

    def find(self, query: PatientQuery, *, domains: Sequence[str | HD] | None = None, limit: int = 100,
             offset: int = 0) -> FindResult:
        """PDQ query: patients whose record matches every given field (``*`` wildcards), one entry per patient."""
        if limit < 1 or offset < 0:
            raise InvalidData(f"limit {limit} / offset {offset} out of range", field="query")
        for d in domains or ():
            self._resolve(d, field="what_domains")
        if query.identifier is not None:
            self._resolve(query.identifier.domain)
        ctx = self._ctx()
        return self._read(lambda conn: queries.find(conn, ctx, query, domains, limit=limit, offset=offset))

    def find_visits(self, query: PatientQuery, visit: VisitQuery, *, domains: Sequence[str | HD] | None = None,
                    limit: int = 100, offset: int = 0) -> VisitResult:
        """PDQ with visits (ITI-22): one match per visit fitting the demographics and the visit fields."""
        if limit < 1 or offset < 0:
            raise InvalidData(f"limit {limit} / offset {offset} out of range", field="query")
        for d in domains or ():
            self._resolve(d, field="what_domains")
        if query.identifier is not None:
            self._resolve(query.identifier.domain)
        ctx = self._ctx()
        return self._read(lambda conn: visits.find(conn, ctx, query, visit, domains, limit=limit, offset=offset))

    def visits(self, identifier: Identifier) -> list[Visit]:
        """The visits kept for a source record, newest first."""
        self._resolve(identifier.domain)
        ctx = self._ctx()

        def fn(conn: Connection) -> list[Visit]:
            _, rec = ctx.resolve_record(conn, identifier)
            return visits.of_record(conn, rec.id)

        return self._read(fn)

    def patient(self, identifier: Identifier) -> PatientView:
        """An enterprise patient (by enterprise id or any of its records) with records, links, merges, events."""
        self._resolve(identifier.domain)
        ctx = self._ctx()
        return self._read(lambda conn: queries.patient_view(conn, ctx, identifier))

    def record(self, identifier: Identifier) -> SourceRecord:
        self._resolve(identifier.domain)
        ctx = self._ctx()
        return self._read(lambda conn: queries.record_view(conn, ctx, identifier))

    def history(self, identifier: Identifier) -> list[RecordVersion]:
        """Every version of a record's demographics as received, oldest first."""
        self._resolve(identifier.domain)
        ctx = self._ctx()
        return self._read(lambda conn: queries.history(conn, ctx, identifier))

    def events(self, *, after: int = 0, limit: int = 1000) -> list[PatientEvent]:
        """Patient events with id > ``after`` in order (the ``empi_events`` outbox)."""
        return self._read(lambda conn: store.events_after(conn, after, limit))

    def compare(self, a: Identifier, b: Identifier) -> MatchScore:
        """Score record ``a`` against record ``b`` with the current profile (the "why" of a link)."""
        self._resolve(a.domain)
        self._resolve(b.domain, field="target.domain")
        ctx = self._ctx()

        def fn(conn: Connection) -> MatchScore:
            _, ra = ctx.resolve_record(conn, a, active=False)
            _, rb = ctx.resolve_record(conn, b, field="target", active=False)
            na, nb = store.norm_of(ra), store.norm_of(rb)
            s = ctx.profile.score(compare_records(na, nb), na, nb)
            return MatchScore(record=ctx.ident(rb), patient=ctx.epid(conn, rb.patient_id), score=s.score,
                              probability=s.probability, decision=decide(ctx.profile, s.score), fields=s.fields)

        return self._read(fn)

    def candidates(self, identifier: Identifier) -> list[MatchScore]:
        """The blocking candidates of a record, scored, best first (one per patient, own patient included)."""
        self._resolve(identifier.domain)
        ctx = self._ctx()

        def fn(conn: Connection) -> list[MatchScore]:
            _, row = ctx.resolve_record(conn, identifier)
            norm = store.norm_of(row)
            cands, _ = find_candidates(conn, ctx, row.id, norm, blocking_keys(norm))
            return [MatchScore(record=ctx.ident(c.row), patient=c.epid, score=c.scored.score,
                               probability=c.scored.probability, decision=c.decision, fields=c.scored.fields)
                    for c in cands]

        return self._read(fn)

    # -- parameters ---------------------------------------------------------------------------------
    def save_parameters(self, params: FSParameters, *, pairs: int) -> None:
        """Store estimated Fellegi–Sunter parameters; the profile uses them from now on (config overrides win)."""
        self._write(lambda conn: conn.execute(insert(t.parameters).values(
            profile="fellegi-sunter", params=json.dumps(params.to_json()), pairs=pairs, created_at=store.now()))
                    .rowcount)
        self._profile = self.config.build_profile(params)

    def parameters(self) -> FSParameters | None:
        """The newest estimated parameters, if any."""
        est = self._read(load_estimated)
        return FSParameters.from_json(est) if est else None

    def record_count(self) -> int:
        return self._read(lambda conn: store.count(conn, t.records, t.records.c.status == "active"))

    def active_record_ids(self, *, after: int = 0, limit: int = 1000) -> list[int]:
        q = (select(t.records.c.id).where(t.records.c.status == "active", t.records.c.id > after)
             .order_by(t.records.c.id).limit(limit))
        return [int(i) for i in self._read(lambda conn: conn.execute(q).scalars().all())]
