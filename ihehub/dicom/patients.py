"""DICOM patients linked to the hub's EMPI: studies follow merges (IHE RAD Patient Information Reconciliation).

Every row of ``dicom_patients`` — a (Patient ID, Issuer of Patient ID) as received in the files — is resolved
to the enterprise patient of the EMPI record with that identifier in the issuer's domain (an empty issuer
means ``default_issuer``).  The files and the ``patient_id`` / ``issuer`` columns are never rewritten; the
row gets ``enterprise_id``, ``empi_state`` and, after an A40, ``merged_into`` (the surviving Patient ID):

====================  ==========================================================================================
``empi_state``        meaning
====================  ==========================================================================================
NULL                  not looked at yet (a new row from the indexer)
``linked``            the EMPI knows the record; ``enterprise_id`` is its patient
``merged``            the record was merged away (A40); ``merged_into`` is the survivor, ``enterprise_id`` its patient
``unknown``           the EMPI does not know the record (yet): linked when a feed registers it (``unknown: wait``)
``no-domain``         no issuer and no ``default_issuer``, or an issuer the EMPI has no domain for
``error``             the EMPI could not be asked; retried every ``retry_seconds``
====================  ==========================================================================================

`PatientLinker` does this on a thread of its own, never on the association threads: the indexer wakes it
after each committed batch, it resolves the new rows (one EMPI read each, one commit for all), and it follows
the EMPI's patient events (`PatientDirectory.changes`, from a cursor stored in the database) to resolve
again the rows an event concerns — merges, unmerges, links, a record registered after its images arrived.

C-FIND, QIDO, C-MOVE and C-GET ask `PatientLinker.scope` once per request (not per row) when it names one
Patient ID: the studies of every row linked to the same enterprise patient in the queried domain (every
domain with ``cross_domain``, or when the query names an enterprise id) match, and are returned under the
queried identity.  The EMPI itself is reached through the `PatientDirectory` protocol, wired in by the hub
(`ihehub.actors.dicom_empi`), so this package does not depend on the EMPI's.

Demographics (``demographics: true``, the default; IHE RAD PIR): with each resolution of a ``linked`` or
``merged`` row the linker also reads the EMPI's Patient's Name, Birth Date and Sex of the record the row is
answered under (its own, or the survivor's after an A40) into ``empi_name`` / ``empi_birth_date`` /
``empi_sex`` (``empi_read_at`` set), so an A08, A40, unmerge or link reaches them through the events it
already follows.  C-FIND and QIDO answer and match such a row with them (read with the row: no EMPI call per
answer row); a query naming one Patient ID is answered with the demographics of that identity, read once with
its scope.  Other rows, and every row with ``demographics: false``, keep the files' values; the files are never
rewritten.  When the setting changes, the linker's first turn fills (or clears) the columns of the rows
linked before.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, or_, select, update

from ihehub.bus.db import Writer
from ihehub.dicom import tables as t
from ihehub.dicom.query import Demographics, PatientScope

__all__ = ["Demographics", "DicomPatient", "EmpiLinkSettings", "PatientChange", "PatientDirectory", "PatientLinker",
           "Resolution"]

log = logging.getLogger("ihehub.dicom.patients")

STATES = ("linked", "merged", "unknown", "no-domain", "error")
UNKNOWN_POLICIES = ("wait", "register")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EmpiLinkSettings:
    """``actors.dicom.empi``: whether to link, the domain of an empty issuer, what to do with a patient the
    EMPI does not know (``wait`` for a feed, or ``register`` it from the DICOM demographics), whether a query
    in one domain also returns the studies of the patient's records in other domains, whether a linked
    patient is answered with the EMPI's demographics (``demographics``) or its files'."""

    enabled: bool = True
    default_issuer: str = ""
    unknown: str = "wait"
    cross_domain: bool = False
    retry_seconds: float = 60.0
    demographics: bool = True

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> EmpiLinkSettings:
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(raw) - known)
        if extra:
            raise ValueError(f"actors.dicom.empi: unknown key(s) {', '.join(extra)} "
                             f"(known: {', '.join(sorted(known))})")
        for key in ("enabled", "cross_domain", "demographics"):
            if key in raw and not isinstance(raw[key], bool):
                raise ValueError(f"actors.dicom.empi.{key} must be true or false, not {raw[key]!r}")
        issuer = raw.get("default_issuer", "")
        if not isinstance(issuer, str) or len(issuer) > 64 or "\\" in issuer:
            raise ValueError(f"actors.dicom.empi.default_issuer must be a domain namespace or OID (at most 64 "
                             f"characters, no backslash), not {issuer!r}")
        unknown = raw.get("unknown", "wait")
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"actors.dicom.empi.unknown must be 'wait' or 'register', not {unknown!r}")
        retry = raw.get("retry_seconds", 60.0)
        if isinstance(retry, bool) or not isinstance(retry, int | float) or retry <= 0:
            raise ValueError(f"actors.dicom.empi.retry_seconds must be a positive number, not {retry!r}")
        return cls(enabled=raw.get("enabled", True), default_issuer=issuer.strip(), unknown=unknown,
                   cross_domain=raw.get("cross_domain", False), retry_seconds=float(retry),
                   demographics=raw.get("demographics", True))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DicomPatient:
    """The demographics of one DICOM patient row (names decoded: ``Wang^XiaoMing=王^小明``)."""

    patient_id: str
    domain: str
    name: str | None
    birth_date: str | None
    sex: str | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Resolution:
    """Where an identifier stands in the EMPI: ``state`` (see the module table), the enterprise patient, the
    surviving id of a merged record, whether the identifier is itself an enterprise id, the spellings of
    its domain (namespace, OID) that an Issuer of Patient ID may use, and — when asked for — the EMPI's
    demographics of the record (the survivor's when merged; None for an enterprise id)."""

    state: str
    enterprise_id: str | None = None
    merged_into: str | None = None
    enterprise: bool = False
    aliases: tuple[str, ...] = ()
    demographics: Demographics | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientChange:
    """One patient event: the identifiers it concerns (each as (id, domain namespace or OID)) and the
    enterprise patients it concerns (DICOM rows linked to those are resolved again)."""

    id: int
    identifiers: tuple[tuple[str, str], ...]
    patients: tuple[str, ...]


class PatientDirectory(Protocol):
    """What the linker needs of an EMPI (implemented by `ihehub.actors.dicom_empi.EmpiDirectory`)."""

    def resolve(self, patient_id: str, domain: str, *, demographics: bool = False) -> Resolution:
        """Where the identifier stands; with ``demographics`` a linked or merged one carries the EMPI's
        demographics of its record (one more read)."""
        ...

    def register(self, patient: DicomPatient, *, demographics: bool = False) -> Resolution: ...

    def changes(self, after: int | None, limit: int) -> tuple[int, list[PatientChange]]:
        """Events after ``after`` in order and the cursor after them; ``None``: start at the newest event."""
        ...

    def load_cursor(self) -> int | None: ...

    def save_cursor(self, last: int) -> None: ...


class PatientLinker:
    """Links ``dicom_patients`` rows to the EMPI on its own thread (`start`, `wake`, `stop`)."""

    def __init__(self, writer: Writer, directory: PatientDirectory, settings: EmpiLinkSettings, *,
                 poll: float = 0.25, batch: int = 500) -> None:
        self.writer = writer
        self.engine = writer.engine
        self.directory = directory
        self.settings = settings
        self.poll = poll
        self.batch = batch
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ihehub-dicom-empi-linker", daemon=True)
        self._cursor: int | None = None
        self._next_retry = 0.0
        self._backoff = 1.0  # a failed lookup is tried again after 1, 2, 4 ... up to retry_seconds
        self.resolved = 0  # rows resolved (new or again)
        self.registered = 0  # patients registered in the EMPI (``unknown: register``)
        self.errors = 0

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        pending = True  # rows indexed while no linker ran
        synced = False  # demographics of rows linked before (a new column, the setting changed): once
        while not self._stopping.is_set():
            try:
                if not synced:
                    self.sync_demographics()
                    synced = True
                # the cursor first: an event written while rows are being resolved is applied after them
                self.follow()
                if pending or time.monotonic() >= self._next_retry:
                    self.link_pending()
                # woken by an index batch: new rows to resolve.  Cleared only when seen (before the rows are read),
                # so a wake that comes after the wait timed out is not lost
                pending = self._wake.wait(self.poll)
                if pending:
                    self._wake.clear()
            except Exception:  # the EMPI or the database is away: the next turn tries again
                self.errors += 1
                log.exception("linking DICOM patients to the EMPI failed")
                self._stopping.wait(min(5.0, self.settings.retry_seconds))

    # -- the work (also callable from tests) -----------------------------------------------------------
    def domain_of(self, issuer: str) -> str:
        return issuer or self.settings.default_issuer

    def link_pending(self) -> int:
        """Resolve the rows not looked at yet and, when due, those that failed (``error``: after 1 s, 2 s, 4 s
        ... up to ``retry_seconds``; ``no-domain``: every ``retry_seconds``); how many."""
        p = t.patients
        states: list[Any] = [p.c.empi_state.is_(None)]
        now = time.monotonic()
        if now >= self._next_retry:
            self._next_retry = now + self.settings.retry_seconds
            states.append(p.c.empi_state.in_(("error", "no-domain")))
        done, last_id = 0, 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(select(p.c.id, p.c.patient_id, p.c.issuer, p.c.name, p.c.birth_date, p.c.sex)
                                    .where(or_(*states), p.c.id > last_id).order_by(p.c.id)
                                    .limit(self.batch)).all()
            if not rows:
                return done
            results = [(row.id, self._resolve_row(row, register=True)) for row in rows]
            self._store(results)
            if any(r.state == "error" for _, r in results):  # a transient failure (a busy database): soon again
                self._next_retry = min(self._next_retry, time.monotonic() + self._backoff)
                self._backoff = min(self._backoff * 2, self.settings.retry_seconds)
            else:
                self._backoff = 1.0
            done += len(rows)
            last_id = int(rows[-1].id)
            if len(rows) < self.batch:
                return done

    def follow(self) -> int:
        """Apply the patient events after the cursor; how many were read."""
        if self._cursor is None:
            cursor = self.directory.load_cursor()
            if cursor is None:  # first start: the rows are resolved as they are now, no history to replay
                cursor, _ = self.directory.changes(None, 1)
                self.directory.save_cursor(cursor)
            self._cursor = cursor
        count = 0
        while True:
            cursor, changes = self.directory.changes(self._cursor, self.batch)
            if not changes:
                return count
            self.refresh(changes)
            self.directory.save_cursor(cursor)
            self._cursor = cursor
            count += len(changes)

    def refresh(self, changes: Sequence[PatientChange]) -> int:
        """Resolve again the rows the changes concern: rows of their identifiers, rows linked to their patients."""
        idents = {(value, domain) for c in changes for value, domain in c.identifiers}
        patients = {pt for c in changes for pt in c.patients}
        values = sorted({value for value, _ in idents})
        p = t.patients
        found: dict[int, Any] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(values):
                for row in conn.execute(_row_select().where(p.c.patient_id.in_(chunk))):
                    if (row.patient_id, self.domain_of(row.issuer)) in idents:
                        found[int(row.id)] = row
            for chunk in _chunks(sorted(patients)):
                for row in conn.execute(_row_select().where(p.c.enterprise_id.in_(chunk))):
                    found[int(row.id)] = row
        if found:
            # a record registered after its images: linked now, not registered a second time from DICOM
            self._store([(pk, self._resolve_row(row, register=False)) for pk, row in sorted(found.items())])
        return len(found)

    def sync_demographics(self) -> int:
        """Bring ``empi_*`` in line with the ``demographics`` setting for rows linked before: read them for the
        linked and merged rows that have none (on), or clear them (off); how many rows."""
        p = t.patients
        if not self.settings.demographics:
            def clear(conn: Connection) -> int:
                return int(conn.execute(update(p).where(p.c.empi_read_at.is_not(None)).values(
                    empi_name=None, empi_name_key=None, empi_birth_date=None, empi_sex=None,
                    empi_read_at=None)).rowcount or 0)

            return int(self.writer.run(clear))
        done, last_id = 0, 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(_row_select().where(p.c.empi_state.in_(("linked", "merged")),
                                                        p.c.empi_read_at.is_(None), p.c.id > last_id)
                                    .order_by(p.c.id).limit(self.batch)).all()
            if not rows:
                return done
            self._store([(int(row.id), self._resolve_row(row, register=False)) for row in rows])
            done += len(rows)
            last_id = int(rows[-1].id)

    def _resolve_row(self, row: Any, *, register: bool) -> Resolution:
        domain = self.domain_of(row.issuer)
        if not domain or not row.patient_id:
            return Resolution(state="no-domain")
        demographics = self.settings.demographics
        try:
            res = self.directory.resolve(row.patient_id, domain, demographics=demographics)
            if res.state == "unknown" and register and self.settings.unknown == "register":
                res = self.directory.register(DicomPatient(patient_id=row.patient_id, domain=domain, name=row.name,
                                                           birth_date=row.birth_date, sex=row.sex),
                                              demographics=demographics)
                if res.state == "linked":
                    self.registered += 1
        except Exception as exc:
            self.errors += 1
            log.warning("cannot resolve DICOM patient %s (issuer %r) in the EMPI: %s", row.patient_id, row.issuer, exc)
            return Resolution(state="error")
        return res

    def _store(self, results: Sequence[tuple[int, Resolution]]) -> None:
        if not results:
            return
        now = time.time()
        params = [{"b_id": pk, "b_eid": r.enterprise_id, "b_state": r.state, "b_merged": r.merged_into,
                   **_demographics_params(r, now)} for pk, r in results]

        def op(conn: Connection) -> None:
            p = t.patients
            conn.execute(update(p).where(p.c.id == bindparam("b_id")).values(
                enterprise_id=bindparam("b_eid"), empi_state=bindparam("b_state"),
                merged_into=bindparam("b_merged"), empi_name=bindparam("b_name"),
                empi_name_key=bindparam("b_name_key"), empi_birth_date=bindparam("b_birth"),
                empi_sex=bindparam("b_sex"), empi_read_at=bindparam("b_read")), params)

        self.writer.run(op)
        self.resolved += len(results)

    # -- query time -------------------------------------------------------------------------------
    def scope(self, patient_id: str, issuer: str) -> PatientScope | None:
        """What a query for (``patient_id``, ``issuer``) covers: None when the EMPI does not know the identifier
        (the query then matches the rows received under it, as without the EMPI)."""
        domain = self.domain_of(issuer)
        if not domain:
            return None
        try:
            res = self.directory.resolve(patient_id, domain, demographics=self.settings.demographics)
        except Exception as exc:
            log.warning("C-FIND: cannot ask the EMPI about %s (%s): %s", patient_id, domain, exc)
            return None
        if res.state != "linked" or res.enterprise_id is None:
            return None
        issuers: tuple[str, ...] | None = None
        if not (res.enterprise or self.settings.cross_domain):
            names = set(res.aliases) | {domain}
            if domain == self.settings.default_issuer or self.settings.default_issuer in names:
                names.add("")
            issuers = tuple(sorted(names))
        return PatientScope(patient_id=patient_id, issuer=issuer or domain, enterprise_id=res.enterprise_id,
                            issuers=issuers, demographics=res.demographics if self.settings.demographics else None)

    def state_counts(self) -> dict[str, int]:
        """Rows per ``empi_state`` (``pending`` for NULL): what /healthz-style checks and tests look at."""
        from sqlalchemy import func

        p = t.patients
        with self.engine.connect() as conn:
            rows = conn.execute(select(p.c.empi_state, func.count()).group_by(p.c.empi_state)).all()
        return {(state or "pending"): int(n) for state, n in rows}


def _demographics_params(res: Resolution, now: float) -> dict[str, Any]:
    """The ``empi_*`` values of a resolution: its demographics for a linked or merged row, else none (the files'
    demographics answer), cut to the column sizes."""
    d = res.demographics if res.state in ("linked", "merged") else None
    if d is None:
        return {"b_name": None, "b_name_key": None, "b_birth": None, "b_sex": None, "b_read": None}
    p = t.patients
    row = t.fit(p, {"empi_name": d.name, "empi_name_key": d.name.casefold() if d.name else None,
                    "empi_birth_date": d.birth_date, "empi_sex": d.sex})
    return {"b_name": row["empi_name"], "b_name_key": row["empi_name_key"], "b_birth": row["empi_birth_date"],
            "b_sex": row["empi_sex"], "b_read": now}


def _row_select() -> Any:
    p = t.patients
    return select(p.c.id, p.c.patient_id, p.c.issuer, p.c.name, p.c.birth_date, p.c.sex)


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
