"""The DICOM image manager's patients linked to the hub's EMPI (issue 7 "Storage and index", PIR of issue 4).

`EmpiDirectory` is the `ihehub.dicom.patients.PatientDirectory` of an `Empi`: it resolves a DICOM patient
(Patient ID + the domain of its Issuer of Patient ID) to its enterprise patient, follows A40 merges to the
survivor, registers a patient the EMPI does not know from the DICOM demographics when asked to (names with
their ideographic / phonetic groups, birth date, sex), and reads the EMPI's ``empi_events`` outbox as
`PatientChange`s, with its cursor in ``empi_event_cursors`` (name ``dicom-index``).  Asked for them, it reads
the demographics of the resolved record (`dicom_demographics`: the EMPI's names as a DICOM PN, birth date, sex)
that the image manager answers a linked patient with (PIR).  On PostgreSQL with
several writing processes an event id may commit after a higher one: ids missing below the cursor are looked
up again for ``gap_wait`` seconds, as the patient-event publisher does (`ihehub.actors.events.publisher`).

`link_image_manager` is what the hub calls once both the image manager and the EMPI run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select

from ihehub.actors.events.publisher import EventGaps, load_cursor, save_cursor
from ihehub.bus.db import Writer
from ihehub.dicom.patients import (
    Demographics,
    DicomPatient,
    EmpiLinkSettings,
    PatientChange,
    PatientLinker,
    Resolution,
)
from ihehub.dicom.server import ImageManager
from ihehub.empi import (
    DomainType,
    Empi,
    EmpiError,
    Identifier,
    PatientRecord,
    PersonName,
    SubsumedPatient,
    UnknownDomain,
    UnknownPatient,
)
from ihehub.empi import tables as empi_tables
from ihehub.empi.chinese import chinese_name, has_hanzi
from ihehub.empi.errors import InvalidData, UnknownValue
from ihehub.empi.normalize import parse_birth_date, parse_sex

__all__ = ["CURSOR", "EmpiDirectory", "dicom_demographics", "dicom_name", "link_image_manager", "person_names"]

log = logging.getLogger("ihehub.actors.dicom_empi")

CURSOR = "dicom-index"
MAX_CHAIN = 16  # merges followed from a subsumed record to its survivor


def person_names(value: str | None) -> tuple[PersonName, ...]:
    """A decoded DICOM PN (``family^given^middle^prefix^suffix``, groups ``=``-separated: alphabetic,
    ideographic, phonetic) as EMPI names, one per non-empty group (``Wang^XiaoMing=王^小明`` -> two)."""
    out: list[PersonName] = []
    for group in (value or "").split("="):
        parts = [p.strip() for p in group.split("^")] + [""] * 5
        if not (parts[0] or parts[1]):
            continue
        name = PersonName(family=parts[0], given=parts[1], middle=parts[2], prefix=parts[3], suffix=parts[4])
        if name not in out:
            out.append(name)
    return tuple(out)


def dicom_name(names: tuple[PersonName, ...]) -> str | None:
    """EMPI names as one decoded DICOM PN (PS3.5 6.2.1), the inverse of `person_names`: the first name without
    hanzi is the alphabetic group, the first with hanzi the ideographic group (a whole name in ``family``,
    ``王小明``, split on the surname tables).  A name known only in hanzi gets its pinyin as the alphabetic
    group, the way Chinese modalities write it (``Wang^XiaoMing=王^小明``, PS3.5 H.3), so viewers that show
    the first group show a name; legal and unmarked names (XPN-7 ``L`` / empty) come before the others."""
    ordered = sorted(names, key=lambda n: n.use not in ("", "L"))
    alphabetic = next((n for n in ordered if (n.family or n.given) and not has_hanzi(n.family + n.given)), None)
    ideographic = next((n for n in ordered if has_hanzi(n.family + n.given)), None)
    groups = ["", ""]
    if alphabetic is not None:
        groups[0] = _pn(alphabetic)
    if ideographic is not None:
        cn = chinese_name(ideographic.family, ideographic.given)
        groups[1] = _pn(dataclasses.replace(ideographic, family=cn.family, given=cn.given))
        if alphabetic is None:
            groups[0] = "^".join((cn.family_pinyin.capitalize(),
                                  "".join(s.capitalize() for s in cn.given_pinyin))).rstrip("^")
    text = "=".join(groups).rstrip("=")
    return text or None


def _pn(name: PersonName) -> str:
    return "^".join(c.strip().replace("=", " ").replace("\\", " ")
                    for c in (name.family, name.given, name.middle, name.prefix, name.suffix)).rstrip("^")


def dicom_demographics(record: PatientRecord) -> Demographics:
    """A record's demographics as DICOM values: Patient's Name (`dicom_name`), Birth Date (DA; a partial or
    unreadable date left out) and Sex (CS: M, F, O; unknown left out)."""
    try:
        birth = parse_birth_date(record.birth_date)
    except InvalidData:
        birth = None
    try:
        code = parse_sex(record.sex)
    except UnknownValue:
        code = None
    sex = None if code is None else code if code in ("M", "F") else "O"
    return Demographics(name=dicom_name(record.names), birth_date=birth if birth and len(birth) == 8 else None,
                        sex=sex)


class EmpiDirectory:
    """`PatientDirectory` on an `Empi`; ``writer`` stores the event cursor (the hub's group-commit writer)."""

    def __init__(self, empi: Empi, writer: Writer, *, cursor: str = CURSOR, gap_wait: float = 30.0) -> None:
        self.empi = empi
        self.writer = writer
        self.cursor = cursor
        self.gap_wait = gap_wait
        self._gaps = EventGaps(empi.engine, wait=gap_wait)

    def _aliases(self, namespace: str) -> tuple[str, ...]:
        dom = self.empi.domain(namespace)
        return (dom.namespace, dom.universal_id) if dom.universal_id else (dom.namespace,)

    def resolve(self, patient_id: str, domain: str, *, demographics: bool = False) -> Resolution:
        try:
            dom = self.empi.domain(domain)
        except UnknownDomain:
            return Resolution(state="no-domain")
        aliases = (dom.namespace, dom.universal_id) if dom.universal_id else (dom.namespace,)
        ident, merged_into = Identifier(value=patient_id, domain=dom.namespace), None
        for _ in range(MAX_CHAIN):
            try:
                xref = self.empi.cross_reference(ident)
            except SubsumedPatient as exc:  # A40: follow to the survivor (which may be merged again)
                ident = Identifier(value=exc.surviving[0], domain=exc.surviving[1] or dom.namespace)
                merged_into = exc.surviving[0]
                continue
            except UnknownPatient:
                return Resolution(state="unknown", aliases=aliases)
            enterprise = dom.type is DomainType.ENTERPRISE
            # the record the row is answered under: its own, or the survivor of its merges
            demo = dicom_demographics(self.empi.record(ident).record) if demographics and not enterprise else None
            if merged_into is not None:
                return Resolution(state="merged", enterprise_id=xref.patient, merged_into=merged_into,
                                  aliases=aliases, demographics=demo)
            return Resolution(state="linked", enterprise_id=xref.patient, aliases=aliases, enterprise=enterprise,
                              demographics=demo)
        log.warning("patient %s (%s): more than %d merges to follow", patient_id, domain, MAX_CHAIN)
        return Resolution(state="error", aliases=aliases)

    def register(self, patient: DicomPatient, *, demographics: bool = False) -> Resolution:
        """Register the DICOM patient as a source record of its domain (``unknown: register``): the EMPI
        matches it like a feed; a record it cannot take (no name, an impossible date) stays ``unknown``."""
        names = person_names(patient.name)
        if not names:
            return self.resolve(patient.patient_id, patient.domain, demographics=demographics)
        try:
            dom = self.empi.domain(patient.domain)
            if dom.type is not DomainType.SOURCE:
                return Resolution(state="no-domain")
            record = PatientRecord(pid=patient.patient_id, names=names, birth_date=patient.birth_date or None,
                                   sex=patient.sex or None)
            try:
                self.empi.register(dom.namespace, record, event="DICOM", by="dicom")
            except EmpiError as exc:
                if patient.birth_date or patient.sex:  # a value the EMPI refuses: the name alone still matches
                    log.info("patient %s (%s): %s; registered without birth date and sex", patient.patient_id,
                             dom.namespace, exc)
                    self.empi.register(dom.namespace, PatientRecord(pid=patient.patient_id, names=names),
                                       event="DICOM", by="dicom")
                else:
                    raise
        except UnknownDomain:
            return Resolution(state="no-domain")
        except EmpiError as exc:
            log.warning("patient %s (%s) could not be registered in the EMPI: %s", patient.patient_id,
                        patient.domain, exc)
            return Resolution(state="unknown")
        return self.resolve(patient.patient_id, patient.domain, demographics=demographics)

    def changes(self, after: int | None, limit: int) -> tuple[int, list[PatientChange]]:
        if after is None:
            with self.empi.engine.connect() as conn:
                newest = conn.execute(select(func.max(empi_tables.events.c.id))).scalar()
            return int(newest or 0), []
        events = self.empi.events(after=after, limit=limit)
        late = self._gaps.late(after, events)
        if not events and not late:
            return after, []
        aliases: dict[str, tuple[str, ...]] = {}
        out: list[PatientChange] = []
        for ev in late + events:
            idents: set[tuple[str, str]] = set()
            for ident in (*ev.identifiers, ev.record, ev.subsumed):
                if ident is None:
                    continue
                if ident.domain not in aliases:
                    try:
                        aliases[ident.domain] = self._aliases(ident.domain)
                    except UnknownDomain:
                        aliases[ident.domain] = (ident.domain,)
                idents.update((ident.value, name) for name in aliases[ident.domain])
            patients = tuple(pt for pt in (ev.patient, ev.other_patient) if pt)
            out.append(PatientChange(id=ev.id, identifiers=tuple(sorted(idents)), patients=patients))
        return (events[-1].id if events else after), out

    def load_cursor(self) -> int | None:
        with self.empi.engine.connect() as conn:
            return load_cursor(conn, self.cursor)

    def save_cursor(self, last: int) -> None:
        self.writer.run(lambda conn: save_cursor(conn, self.cursor, last))


def link_image_manager(manager: ImageManager, empi: Empi, options: Mapping[str, Any] | None,
                       writer: Writer) -> PatientLinker | None:
    """Link ``manager``'s patients to ``empi`` per ``actors.dicom.empi`` (None when ``enabled: false``)."""
    settings = EmpiLinkSettings.from_mapping(options)
    if not settings.enabled:
        return None
    if settings.default_issuer:
        try:
            empi.domain(settings.default_issuer)
        except UnknownDomain:
            log.warning("actors.dicom.empi.default_issuer %r is not a domain of the EMPI: DICOM patients without "
                        "an issuer stay unlinked (no-domain) until it is added", settings.default_issuer)
    return manager.link_patients(EmpiDirectory(empi, writer), settings)
