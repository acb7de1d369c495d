"""What a study-complete message tells a router: the study's attributes, its series and configured tags.

`study_summary` is called once per study when its quiet period ends.  Study- and series-level attributes come
from the index (``dicom_studies``, ``dicom_series``, ``dicom_instances.calling_ae``); the rest from the first
instance of each series in that series' ``metadata.json`` (the DICOM JSON written at ingest, PS3.18 F), read
only up to the end of its first object, so no DICOM file is opened again (a series without metadata falls
back to the header of one of its files).

Routing tags (``actors.dicom.routing_tags``) name extra attributes by keyword (``BodyPartExamined``) or tag
(``"(0018,0015)"``, ``"0018,0015"``, ``"00180015"``, private tags too).  Each appears in the message under its
keyword, or under its 8 hex digits when the data dictionary has no keyword, as the list of distinct values of
the study's series (``tags``) and of each series (``series[i].tags``).  Sequences (SQ) carry no values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from ihehub.dicom import tables as t
from ihehub.dicom.dicomjson import METADATA_FILE
from ihehub.dicom.storage import uid_component

__all__ = ["RoutingTag", "first_instance", "parse_routing_tags", "series_messages", "study_summary"]

log = logging.getLogger("ihehub.dicom")

_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
INSTITUTION_NAME = "00080080"


@dataclasses.dataclass(frozen=True, slots=True)
class RoutingTag:
    """One configured routing tag: its key in the message and its DICOM JSON tag (8 upper-case hex digits)."""

    key: str
    tag: str


def parse_routing_tags(specs: Iterable[str]) -> tuple[RoutingTag, ...]:
    """Keywords or tags -> `RoutingTag`s; `ValueError` names an entry that is neither."""
    from pydicom.datadict import keyword_for_tag, tag_for_keyword

    out: dict[str, RoutingTag] = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"routing_tags: {spec!r} is not a keyword or a tag such as \"(0018,0015)\"")
        text = spec.strip()
        m = _TAG.match(text)
        if m:
            number = int(m.group(1) + m.group(2), 16)
            key = keyword_for_tag(number) or f"{number:08X}"
        elif _KEYWORD.match(text):
            found = tag_for_keyword(text)
            if found is None:
                raise ValueError(f"routing_tags: {text!r} is not a DICOM keyword (write the tag, e.g. "
                                 "\"(0019,100C)\", for a private or unknown attribute)")
            number, key = int(found), text
        else:
            raise ValueError(f"routing_tags: {spec!r} is not a keyword (BodyPartExamined) or a tag such as "
                             "\"(0018,0015)\"")
        if number >> 16 in (0x0002, 0xFFFE) or number & 0xFFFF0000 == 0x7FE00000:
            raise ValueError(f"routing_tags: {spec!r} is file meta, item or pixel data, not a routing attribute")
        out.setdefault(key, RoutingTag(key=key, tag=f"{number:08X}"))
    return tuple(out.values())


def study_summary(conn: Connection, study_uid: str, root: Path, tags: Sequence[RoutingTag] = ()) -> dict[str, Any]:
    """The routing fields of `ihehub.dicom.indexer.StudyComplete` for ``study_uid`` (empty when unknown)."""
    st, se, i = t.studies, t.series, t.instances
    study = conn.execute(
        select(st.c.study_date, st.c.study_time, st.c.description, st.c.referring_physician, st.c.modalities,
               st.c.sop_classes).where(st.c.study_uid == study_uid)
    ).first()
    if study is None:
        return {}
    series_rows = conn.execute(
        select(se.c.series_uid, se.c.modality, se.c.series_number, se.c.description, se.c.body_part,
               se.c.num_instances).where(se.c.study_uid == study_uid)
        .order_by(se.c.series_number, se.c.series_uid)
    ).all()
    aes: dict[str, set[str]] = {}
    for series_uid, ae in conn.execute(
            select(i.c.series_uid, i.c.calling_ae).where(i.c.study_uid == study_uid).distinct()):
        if ae:
            aes.setdefault(series_uid, set()).add(ae)
    study_folder = root / uid_component(study_uid)
    series: list[dict[str, Any]] = []
    study_tags: dict[str, list[Any]] = {tag.key: [] for tag in tags}
    institution: str | None = None
    for row in series_rows:
        try:
            first = first_instance(study_folder / uid_component(row.series_uid)) or {}
        except Exception:  # the study-complete goes out without this series' metadata rather than not at all
            log.exception("cannot read the metadata of series %s for routing", row.series_uid)
            first = {}
        own = {tag.key: _values(first.get(tag.tag)) for tag in tags}
        for key, values in own.items():
            _extend(study_tags[key], values)
        inst = next((str(v) for v in _values(first.get(INSTITUTION_NAME))), None)
        institution = institution or inst
        series.append({
            "series_uid": row.series_uid, "modality": row.modality, "series_number": row.series_number,
            "description": row.description, "body_part": row.body_part, "num_instances": int(row.num_instances),
            "institution_name": inst, "calling_aes": sorted(aes.get(row.series_uid, ())), "tags": own,
        })
    body_parts: list[Any] = []
    _extend(body_parts, [s["body_part"] for s in series if s["body_part"]])
    return {
        "modalities": tuple(_split(study.modalities)), "sop_classes": tuple(_split(study.sop_classes)),
        "study_description": study.description, "study_date": study.study_date, "study_time": study.study_time,
        "referring_physician": study.referring_physician, "institution_name": institution,
        "body_parts": tuple(body_parts), "series": tuple(series), "tags": study_tags,
    }


def series_messages(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``series-complete`` body per series of a study-complete body: the study's identifying keys and the
    series' own (``series_uid`` with ``study_uid``, so a ``dicom://`` or STOW-RS destination sends that series)."""
    common = {key: study.get(key) for key in _SERIES_COMMON}
    return [{**common, **series} for series in study.get("series") or () if isinstance(series, Mapping)]


_SERIES_COMMON = ("study_uid", "patient_id", "issuer", "accession_number", "modalities", "study_description",
                  "study_date", "study_time", "referring_physician")


def first_instance(folder: Path) -> dict[str, Any] | None:
    """The DICOM JSON object of the first instance in ``folder``'s ``metadata.json``, decoding only that object
    (the file grows with the series); else the header of the folder's first file; None when neither reads."""
    path = folder / METADATA_FILE
    decoder = json.JSONDecoder()
    try:
        with path.open("rb") as f:
            buf, size = b"", 1 << 16
            while True:
                chunk = f.read(size)
                buf += chunk
                text = buf.decode("utf-8", errors="ignore").lstrip()
                if text.startswith("["):
                    try:
                        item, _ = decoder.raw_decode(text, len(text) - len(text[1:].lstrip()))
                    except json.JSONDecodeError:
                        if not chunk:
                            break
                        size *= 2
                        continue
                    if isinstance(item, dict):
                        return item
                break
    except OSError:
        pass
    return _from_file(folder)


def _from_file(folder: Path) -> dict[str, Any] | None:
    from pydicom import dcmread

    try:
        path = min(p for p in folder.glob("*.dcm") if not p.name.startswith("."))
    except ValueError:
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True)
        out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
        return out
    except Exception as exc:
        log.warning("cannot read the routing attributes of %s: %s", path, exc)
        return None


def _values(element: Any) -> list[Any]:
    """The values of a DICOM JSON element: text stripped, person names as ``=``-joined groups, no sequences."""
    if not isinstance(element, dict) or element.get("vr") == "SQ":
        return []
    out: list[Any] = []
    for v in element.get("Value") or ():
        if isinstance(v, dict):  # PN: {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}
            v = "=".join(str(v.get(k) or "") for k in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
        elif isinstance(v, str):
            v = v.strip()
        if v is not None and v != "":
            out.append(v)
    return out


def _extend(into: list[Any], values: Iterable[Any]) -> None:
    for v in values:
        if v not in into:
            into.append(v)


def _split(text: str | None) -> list[str]:
    return [v for v in (text or "").split("\\") if v]
