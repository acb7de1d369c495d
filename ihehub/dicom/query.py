"""C-FIND matching on the index: Patient Root and Study Root, PATIENT/STUDY/SERIES/IMAGE levels.

Implements the attribute matching of PS3.4 C.2.2.2: single value, universal (empty value), wildcard
(``*`` and ``?``), range (``a-b``, ``a-``, ``-b`` for DA and TM), list of UIDs (``uid1\\uid2``), and
multi-valued attributes (Modalities in Study matches when any value does).  Person names (PN) match case
insensitively, group by group: ``王*`` finds ``Wang^XiaoDong=王^小東`` through its ideographic group; a query
with ``=`` compares the groups it names.  Keys of the levels above the query level may be given as well
(the relational behaviour most SCUs expect); keys we do not index are returned empty.

SQL narrows (LIKE, ranges, IN), Python decides: every candidate row is checked exactly before it is
returned, so SQLite's case-insensitive LIKE and PostgreSQL's case-sensitive one give the same answers.

With the EMPI link (`ihehub.dicom.patients`, ``actors.dicom.empi.demographics``) a linked patient is answered
with the EMPI's Patient's Name, Birth Date and Sex of the identity the answer is given under, and those are
what the query's PatientName / PatientBirthDate / PatientSex match (the reconciled values, IHE RAD PIR); an
unlinked patient matches and answers with its files' values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Connection, Select, and_, func, or_, select

from ihehub.dicom import tables as t

__all__ = ["KEYS", "LEVELS", "Demographics", "FindError", "FindQuery", "PatientScope", "ScopeLookup", "find",
           "response_charset"]

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT_ROOT = "patient"
STUDY_ROOT = "study"


class FindError(ValueError):
    """The identifier cannot be answered; ``status`` is the C-FIND failure status (PS3.4 C.4.1.1.4)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Key:
    """One attribute C-FIND knows: its level, the column holding it and how it matches."""

    keyword: str
    level: int  # index in LEVELS
    column: str | None  # "table.column"; None for counts computed per row
    match: str  # "text", "pn", "uid", "date", "time", "int", "multi", "none" (return only)


def _k(keyword: str, level: int, column: str | None, match: str) -> Key:
    return Key(keyword=keyword, level=level, column=column, match=match)


KEYS: dict[str, Key] = {k.keyword: k for k in (
    _k("PatientName", 0, "p.name", "pn"),
    _k("PatientID", 0, "p.patient_id", "text"),
    _k("IssuerOfPatientID", 0, "p.issuer", "text"),
    _k("PatientBirthDate", 0, "p.birth_date", "date"),
    _k("PatientSex", 0, "p.sex", "text"),
    _k("NumberOfPatientRelatedStudies", 0, None, "none"),
    _k("NumberOfPatientRelatedSeries", 0, None, "none"),
    _k("NumberOfPatientRelatedInstances", 0, None, "none"),
    _k("StudyInstanceUID", 1, "st.study_uid", "uid"),
    _k("StudyDate", 1, "st.study_date", "date"),
    _k("StudyTime", 1, "st.study_time", "time"),
    _k("AccessionNumber", 1, "st.accession_number", "text"),
    _k("StudyID", 1, "st.study_id", "text"),
    _k("StudyDescription", 1, "st.description", "text"),
    _k("ReferringPhysicianName", 1, "st.referring_physician", "pn"),
    _k("ModalitiesInStudy", 1, "st.modalities", "multi"),
    _k("SOPClassesInStudy", 1, "st.sop_classes", "multi"),
    _k("NumberOfStudyRelatedSeries", 1, "st.num_series", "none"),
    _k("NumberOfStudyRelatedInstances", 1, "st.num_instances", "none"),
    _k("SeriesInstanceUID", 2, "se.series_uid", "uid"),
    _k("Modality", 2, "se.modality", "text"),
    _k("SeriesNumber", 2, "se.series_number", "int"),
    _k("SeriesDescription", 2, "se.description", "text"),
    _k("BodyPartExamined", 2, "se.body_part", "text"),
    _k("SeriesDate", 2, "se.series_date", "date"),
    _k("SeriesTime", 2, "se.series_time", "time"),
    _k("NumberOfSeriesRelatedInstances", 2, "se.num_instances", "none"),
    _k("SOPInstanceUID", 3, "i.sop_instance_uid", "uid"),
    _k("SOPClassUID", 3, "i.sop_class_uid", "uid"),
    _k("InstanceNumber", 3, "i.instance_number", "int"),
    _k("ContentDate", 3, "i.content_date", "date"),
    _k("ContentTime", 3, "i.content_time", "time"),
    _k("Rows", 3, "i.rows", "int"),
    _k("Columns", 3, "i.columns", "int"),
    _k("NumberOfFrames", 3, "i.frames", "int"),
)}
UNIQUE = {0: "PatientID", 1: "StudyInstanceUID", 2: "SeriesInstanceUID", 3: "SOPInstanceUID"}
_PN_SEARCH = {"p.name": "p.name_key", "p.empi_name": "p.empi_name_key",  # case-folded copies
              "st.referring_physician": "st.referring_key"}
# the EMPI's copy of a patient attribute (dicom_patients.empi_*), answered and matched for a linked patient
_RECONCILED = {"PatientName": "p.empi_name", "PatientBirthDate": "p.empi_birth_date", "PatientSex": "p.empi_sex"}
_TABLES = {"p": t.patients, "st": t.studies, "se": t.series, "i": t.instances}
# keys that are never matched or returned as attributes of the identifier itself
_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC",
            "QueryRetrieveView", "InstanceAvailability"}
# Specific Character Set (0008,0005) term -> Python codec (PS3.3 C.12.1.1.2)
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8",
           "GB18030": "gb18030", "GBK": "gbk", "ISO_IR 101": "iso8859_2", "ISO_IR 144": "iso8859_5",
           "ISO_IR 13": "shift_jis", "ISO_IR 166": "tis_620"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Condition:
    key: Key
    value: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FindQuery:
    """A parsed identifier: the level, the conditions to match and the keys to return."""

    root: str
    level: int
    conditions: tuple[Condition, ...]
    returned: tuple[str, ...]  # keywords, in the identifier's order
    charset: tuple[str, ...]

    @classmethod
    def parse(cls, identifier: Dataset, *, root: str) -> FindQuery:
        """Read an identifier; raises `FindError` (A900) for a missing or unsupported level."""
        try:
            level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        except Exception as exc:
            raise FindError(0xC000, "Cannot read Query/Retrieve Level") from exc
        if level_name not in LEVELS:
            raise FindError(0xA900, f"Query/Retrieve Level {level_name or '(none)'} is not supported")
        level = LEVELS.index(level_name)
        if root == STUDY_ROOT and level == 0:
            raise FindError(0xA900, "Study Root has no PATIENT level")
        conditions: list[Condition] = []
        returned: list[str] = []
        for elem in identifier:
            keyword = elem.keyword
            if not keyword or keyword in _CONTROL:
                continue
            returned.append(keyword)
            key = KEYS.get(keyword)
            if key is None or key.match == "none" or key.level > level:
                continue
            try:
                value = _as_text(elem.value)
            except Exception as exc:
                raise FindError(0xC000, f"Cannot decode {keyword}") from exc
            if value:
                conditions.append(Condition(key=key, value=value))
        charset = identifier.get("SpecificCharacterSet") or ()
        charset = (charset,) if isinstance(charset, str) else tuple(str(c) for c in charset)
        return cls(root=root, level=level, conditions=tuple(conditions), returned=tuple(returned), charset=charset)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Demographics:
    """A patient's Patient's Name (a decoded PN, groups ``=``-separated), Birth Date (DA) and Sex (CS) as the
    EMPI knows them; None where the EMPI has no value."""

    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientScope:
    """The patient a query's Patient ID (and Issuer) names, as the EMPI sees it (`ihehub.dicom.patients`):
    rows linked to ``enterprise_id`` whose issuer is one of ``issuers`` (any issuer when None) match as well,
    and are returned under ``patient_id`` / ``issuer`` — with ``demographics`` (the EMPI's, of that identity)
    when given, else each with its own."""

    patient_id: str
    issuer: str
    enterprise_id: str
    issuers: tuple[str, ...] | None
    demographics: Demographics | None = None


ScopeLookup = Callable[[str, str], PatientScope | None]  # (Patient ID, Issuer as queried) -> scope
_PATIENT_KEYS = ("PatientID", "IssuerOfPatientID")
_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")


def find(conn: Connection, query: FindQuery, *, limit: int = 10_000,
         patients: ScopeLookup | None = None) -> Iterator[dict[str, Any]]:
    """The matching rows (keyword -> value) of ``query``, at most ``limit``.

    With ``patients`` (the EMPI link of `ihehub.dicom.patients`) a row merged away (A40) is returned under its
    surviving Patient ID, and a query naming one Patient ID (no wildcard) also matches the rows linked to the
    same enterprise patient, returned under the queried identity; PATIENT-level rows returned under the same
    identity are folded into one (their counts added).  A row the EMPI link gave demographics to (the queried
    identity's, or the row's own ``empi_*`` columns) is matched and answered with them (see the module)."""
    if patients is None:
        yield from _find(conn, query, limit)
        return
    scope = None
    given = {c.key.keyword: c.value for c in query.conditions if c.key.keyword in _PATIENT_KEYS}
    pid, issuer = given.get("PatientID", ""), given.get("IssuerOfPatientID", "")
    if pid and not any(ch in pid + issuer for ch in "*?\\"):
        scope = patients(pid, issuer)
    rows = _find_linked(conn, query, scope, issuer)
    if query.level != 0:
        for count, values in enumerate(rows, 1):
            yield values
            if count >= limit:
                return
        return
    folded: dict[tuple[Any, Any], dict[str, Any]] = {}
    for values in rows:
        key = (values.get("PatientID"), values.get("IssuerOfPatientID"))
        have = folded.get(key)
        if have is None:
            if len(folded) >= limit:
                break
            folded[key] = values
        else:
            for name in _COUNTS:
                have[name] = int(have.get(name) or 0) + int(values.get(name) or 0)
    yield from folded.values()


def _find(conn: Connection, query: FindQuery, limit: int) -> Iterator[dict[str, Any]]:
    stmt = _statement(query)
    count = 0
    for row in conn.execute(stmt):
        values = dict(row._mapping)
        if all(_matches(c, values.get(c.key.keyword)) for c in query.conditions):
            yield values
            count += 1
            if count >= limit:
                return


def _find_linked(conn: Connection, query: FindQuery, scope: PatientScope | None,
                 queried_issuer: str) -> Iterator[dict[str, Any]]:
    """Rows with the EMPI link applied (see `find`); the link columns are read and dropped."""
    p = t.patients
    given = scope.demographics if scope is not None else None
    # the rows of one patient (scope) answered with its EMPI demographics: matched in Python only; otherwise a
    # patient attribute narrows on the file's value or the EMPI's, whichever the row is answered with
    stmt = _statement(query, skip=(*_PATIENT_KEYS, *_RECONCILED) if given is not None
                      else _PATIENT_KEYS if scope is not None else (), reconciled=True)
    stmt = stmt.add_columns(p.c.empi_state.label("_state"), p.c.merged_into.label("_merged"),
                            p.c.empi_read_at.label("_read"), p.c.empi_name.label("_name"),
                            p.c.empi_birth_date.label("_birth"), p.c.empi_sex.label("_sex"))
    others = query.conditions
    if scope is not None:
        direct = and_(p.c.patient_id == scope.patient_id,
                      or_(p.c.empi_state.is_(None), p.c.empi_state != "merged"))
        if queried_issuer:
            direct = and_(direct, p.c.issuer == queried_issuer)
        linked = p.c.enterprise_id == scope.enterprise_id
        if scope.issuers is not None:
            linked = and_(linked, p.c.issuer.in_(scope.issuers))
        stmt = stmt.where(or_(direct, linked))
        others = tuple(c for c in query.conditions if c.key.keyword not in _PATIENT_KEYS)
    for row in conn.execute(stmt):
        values = dict(row._mapping)
        state, merged = values.pop("_state"), values.pop("_merged")
        read, name, birth, sex = values.pop("_read"), values.pop("_name"), values.pop("_birth"), values.pop("_sex")
        if given is not None:  # reconciled (PIR): the EMPI's values; the files keep theirs
            values["PatientName"], values["PatientBirthDate"], values["PatientSex"] = (
                given.name, given.birth_date, given.sex)
        elif read is not None:
            values["PatientName"], values["PatientBirthDate"], values["PatientSex"] = name, birth, sex
        if scope is not None:
            is_direct = (values.get("PatientID") == scope.patient_id and state != "merged"
                         and (not queried_issuer or values.get("IssuerOfPatientID") == queried_issuer))
            if not is_direct:  # linked through the EMPI: returned as the patient the query asked for
                values["PatientID"], values["IssuerOfPatientID"] = scope.patient_id, scope.issuer
        elif state == "merged" and merged:  # the surviving identity (PIR); the file keeps what it was sent with
            values["PatientID"] = merged
        if all(_matches(c, values.get(c.key.keyword)) for c in others):
            yield values


def _col(path: str) -> Any:
    alias, name = path.split(".")
    return _TABLES[alias].c[name]


def _statement(query: FindQuery, *, skip: tuple[str, ...] = (), reconciled: bool = False) -> Select[Any]:
    p, st, se, i = t.patients, t.studies, t.series, t.instances
    level = query.level
    columns = [_col(k.column).label(k.keyword) for k in KEYS.values() if k.column and k.level <= level]
    if level == 0:
        columns += [
            select(func.count()).where(st.c.patient_pk == p.c.id).scalar_subquery()
            .label("NumberOfPatientRelatedStudies"),
            select(func.coalesce(func.sum(st.c.num_series), 0)).where(st.c.patient_pk == p.c.id).scalar_subquery()
            .label("NumberOfPatientRelatedSeries"),
            select(func.coalesce(func.sum(st.c.num_instances), 0)).where(st.c.patient_pk == p.c.id)
            .scalar_subquery().label("NumberOfPatientRelatedInstances"),
        ]
    source: Any = p
    if level >= 1:
        source = st.join(p, p.c.id == st.c.patient_pk)
    if level >= 2:
        source = se.join(source, st.c.study_uid == se.c.study_uid)
    if level >= 3:
        source = i.join(source, se.c.series_uid == i.c.series_uid)
    stmt = select(*columns).select_from(source)
    for cond in query.conditions:
        if cond.key.keyword in skip:
            continue
        clause = _narrow(cond)
        if reconciled and clause is not None and cond.key.keyword in _RECONCILED:
            other = _narrow(cond, column=_RECONCILED[cond.key.keyword])
            clause = or_(clause, other) if other is not None else None
        if clause is not None:
            stmt = stmt.where(clause)
    # PATIENT level in name order: the name answered (the EMPI's for a linked patient, see _find_linked)
    name_order: Any = func.coalesce(p.c.empi_name_key, p.c.name_key) if reconciled else p.c.name_key
    order: list[Any] = {0: [name_order, p.c.patient_id], 1: [st.c.study_date, st.c.study_uid],
             2: [st.c.study_uid, se.c.series_number, se.c.series_uid],
             3: [se.c.series_uid, i.c.instance_number, i.c.sop_instance_uid]}[level]
    return stmt.order_by(*order)


def _like(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch in "%_!":
            out.append("!" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _narrow(cond: Condition, *, column: str | None = None) -> ColumnElement[bool] | None:
    """A SQL condition that keeps every matching row (and perhaps a few more); None to check in Python only.
    ``column``: narrow on that column ("table.column") instead of the key's."""
    key, value = cond.key, cond.value
    column = column or key.column
    if column is None:
        return None
    col = _col(column)
    if key.match == "uid":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        return col.in_(uids) if uids else None
    if key.match == "date":
        lo, hi = _date_range(value)
        return _between(col, lo, hi)
    if key.match == "time":
        lo, hi = _time_range(value)
        return _between(col, lo, hi)
    if key.match == "int":
        try:
            return col == int(value)
        except ValueError:
            return col.is_(None) & col.is_not(None)  # a non-number matches nothing
    if key.match == "pn":
        keycol = _col(_PN_SEARCH.get(column, column))
        parts = [part for part in re.split(r"[=*?]", value.casefold()) if part]
        if not parts:
            return None
        return keycol.like("%" + "%".join(_like(part) for part in parts) + "%", escape="!")
    if key.match == "multi":
        options = [v for v in value.split("\\") if v]
        return or_(*[col.like("%" + _like(v) + "%", escape="!") for v in options]) if options else None
    if "*" in value or "?" in value:
        return col.like(_like(value), escape="!")
    return col == value


def _between(col: Any, lo: str | None, hi: str | None) -> ColumnElement[bool] | None:
    clauses = []
    if lo is not None:
        clauses.append(col >= lo)
    if hi is not None:
        clauses.append(col <= hi)
    if not clauses:
        return None
    out = clauses[0]
    for c in clauses[1:]:
        out = out & c
    return out


def _date_range(value: str) -> tuple[str | None, str | None]:
    """DA single value or range (PS3.4 C.2.2.2.5); ``.`` of old ACR-NEMA dates ignored."""
    value = value.replace(".", "").strip()
    if "-" not in value:
        return value, value
    lo, hi = (v.strip() for v in value.split("-", 1))
    return lo or None, hi or None


def _time_range(value: str) -> tuple[str | None, str | None]:
    """TM single value or range; an upper bound covers the whole of its last unit (``-08`` is to 08:59:59)."""
    value = value.replace(":", "").strip()
    if "-" not in value:
        lo, hi = value, value
    else:
        lo, hi = (v.strip() for v in value.split("-", 1))
    return (lo or None), (_time_ceiling(hi) if hi else None)


def _time_ceiling(hi: str) -> str:
    digits, _, frac = hi.partition(".")
    if len(digits) == 2:
        digits += "5959"
    elif len(digits) == 4:
        digits += "59"
    return digits + "." + (frac + "999999")[:6]


def _matches(cond: Condition, stored: Any) -> bool:
    key, value = cond.key, cond.value
    if key.match in ("uid",):
        return stored is not None and str(stored) in {u.strip() for u in value.split("\\")}
    if key.match == "date":
        lo, hi = _date_range(value)
        return stored is not None and (lo is None or stored >= lo) and (hi is None or stored <= hi)
    if key.match == "time":
        lo, hi = _time_range(value)
        s = str(stored or "").replace(":", "")
        return bool(s) and (lo is None or s >= lo) and (hi is None or s <= hi)
    if key.match == "int":
        try:
            return stored is not None and int(stored) == int(value)
        except ValueError:
            return False
    if stored is None:
        return False
    if key.match == "pn":
        return _pn_matches(value, str(stored))
    if key.match == "multi":
        have = str(stored).split("\\")
        return any(_wild(v, h, fold=False) for v in value.split("\\") if v for h in have)
    return _wild(value, str(stored), fold=False)


def _pn_matches(query: str, stored: str) -> bool:
    """PS3.4 C.2.2.2.1 with PS3.5 6.2.1 component groups: any group, or the groups the query names."""
    groups = stored.split("=")
    if "=" in query:
        wanted = query.split("=")
        return all(not q or (i < len(groups) and _wild(q, groups[i], fold=True)) for i, q in enumerate(wanted))
    return any(_wild(query, g, fold=True) for g in groups if g)


def _wild(pattern: str, value: str, *, fold: bool) -> bool:
    if "*" not in pattern and "?" not in pattern:
        return pattern.casefold() == value.casefold() if fold else pattern == value
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, value, flags=(re.IGNORECASE | re.DOTALL) if fold else re.DOTALL) is not None


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def response_charset(query_charset: tuple[str, ...], texts: list[str]) -> str | None:
    """The Specific Character Set of a response: the query's when it encodes every value, else ISO_IR 192."""
    if all(t.isascii() for t in texts):
        return query_charset[0] if len(query_charset) == 1 and query_charset[0] in _CODECS else None
    if len(query_charset) == 1 and query_charset[0] in _CODECS:
        codec = _CODECS[query_charset[0]]
        try:
            for text in texts:
                text.encode(codec)
        except UnicodeEncodeError:
            return "ISO_IR 192"
        return query_charset[0]
    return "ISO_IR 192"
