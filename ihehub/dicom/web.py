"""DICOMweb over the image manager's files and index (PS3.18): the HTTP-free half of ``/dicomweb``.

* QIDO-RS search (PS3.18 10.6): query parameters → the C-FIND matching of `ihehub.dicom.query` (single
  value, wildcard ``*``/``?``, DA/TM ranges, UID lists with ``,`` or ``\\``, names by component group),
  ``includefield`` (``all``), ``limit``/``offset``; results in the DICOM JSON Model (PS3.18 Annex F) with the
  default attributes of Tables 10.6.3-3..5 and a Retrieve URL.
* WADO-RS (PS3.18 10.4): the instances of a study, series or instance as stored (bytes as received;
  Explicit VR Little Endian on request for uncompressed or decodable ones), metadata (the series'
  ``metadata.json`` written at ingest), bulk data, frames, and rendered images (`ihehub.dicom.render`,
  cached on disk, the rest of a series rendered ahead when its first frame is asked for).
* STOW-RS lives in `ihehub.dicom.stow`.

Errors are `WebError` (HTTP status, machine code, text); the HTTP binding is ``ihehub.api.routes_dicomweb``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import select

from ihehub.dicom import query as q
from ihehub.dicom import tables as t
from ihehub.dicom import wire
from ihehub.dicom.dicomjson import SeriesMetadata, instance_json
from ihehub.dicom.render import RenderCache, RenderError, RenderParams, render_frame
from ihehub.dicom.storage import StoredInstance, uid_component
from ihehub.dicom.websettings import DicomWebSettings

if TYPE_CHECKING:
    from ihehub.dicom.server import ImageManager

__all__ = ["BASE_PATH", "DicomWeb", "Located", "SearchResult", "WebError", "dicom_json"]

log = logging.getLogger("ihehub.dicom.web")

BASE_PATH = "/dicomweb"
LOCATED_MAX = 100_000
EXPLICIT_LITTLE = str(ExplicitVRLittleEndian)
UNCOMPRESSED = (wire.IMPLICIT_LITTLE, EXPLICIT_LITTLE, wire.EXPLICIT_BIG, wire.DEFLATED)
LEVELS = {"studies": 1, "series": 2, "instances": 3}
# PS3.18 Tables 10.6.3-3 (study), -4 (series), -5 (instance): returned by default
STUDY_DEFAULTS = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_DEFAULTS = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDate",
                   "SeriesTime", "BodyPartExamined", "NumberOfSeriesRelatedInstances")
INSTANCE_DEFAULTS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                     "ContentDate", "ContentTime")
CONTROL = ("includefield", "limit", "offset", "fuzzymatching")
NUMBER_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# PS3.18 Table 8.7.3-5: media types of compressed frames (transfer syntax -> media type)
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
}


class WebError(Exception):
    """A DICOMweb request that cannot be answered: HTTP ``status``, machine ``error`` code, ``detail``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Located:
    """One indexed instance and its file."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    frames: int | None

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax not in UNCOMPRESSED


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SearchResult:
    """QIDO-RS matches (DICOM JSON objects) and the Warning texts of the response (PS3.18 8.3.4.4)."""

    items: list[dict[str, Any]]
    warnings: list[str]


def dicom_json(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    """The tag (8 hex digits) and DICOM JSON element (PS3.18 F.2) of an index value."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    vr = dictionary_VR(tag)
    elem: dict[str, Any] = {"vr": vr}
    if value is None or value == "":
        return f"{tag:08X}", elem
    if vr == "PN":
        groups = str(value).split("=")
        elem["Value"] = [{name: g for name, g in zip(PN_GROUPS, groups, strict=False) if g}]
    elif vr in NUMBER_VRS:
        values = value if isinstance(value, list) else str(value).split("\\")
        numbers: list[int | float] = []
        for v in values:
            try:
                numbers.append(int(v) if vr in ("IS", "US", "UL", "SS", "SL", "SV", "UV") else float(v))
            except (TypeError, ValueError):
                continue
        elem["Value"] = numbers
    else:
        elem["Value"] = str(value).split("\\")
    return f"{tag:08X}", elem


class DicomWeb:
    """DICOMweb services over one `ImageManager` (its files, index and storage path)."""

    def __init__(self, manager: ImageManager, settings: DicomWebSettings | None = None,
                 *, cache_dir: Path | None = None) -> None:
        self.manager = manager
        self.settings = settings or DicomWebSettings()
        self.cache = RenderCache(cache_dir or manager.root.parent / "dicomweb-cache",
                                 self.settings.cache_mb * 1024 * 1024)
        self._prefetch = _Prefetcher(self)
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._located: dict[tuple[str, str, str], Located] = {}  # instance lookups of the rendered path
        self._luts: dict[Any, Any] = {}  # display lookup tables shared by the frames of a series
        Image.init()  # load Pillow's encoders now, not in the first viewer's request

    # -- QIDO-RS ---------------------------------------------------------------------------------------------
    def search(self, resource: str, params: Sequence[tuple[str, str]], *, base_url: str,
               study_uid: str | None = None, series_uid: str | None = None) -> SearchResult:
        """QIDO-RS (PS3.18 10.6) on ``resource`` (studies, series, instances) under the path's UIDs."""
        level = LEVELS[resource]
        warnings: list[str] = []
        conditions: list[q.Condition] = []
        include: list[str] = []
        limit: int | None = None
        offset = 0
        for name, value in params:
            if name == "includefield":
                include += [v.strip() for v in value.split(",") if v.strip()]
            elif name in ("limit", "offset"):
                try:
                    number = int(value)
                except ValueError:
                    raise WebError(400, "invalid_parameter", f"{name} must be a non-negative integer") from None
                if number < 0:
                    raise WebError(400, "invalid_parameter", f"{name} must be a non-negative integer")
                if name == "limit":
                    limit = number
                else:
                    offset = number
            elif name == "fuzzymatching":
                if value.strip().lower() == "true":
                    warnings.append("fuzzymatching is not supported; exact matching was used")
            else:
                key = self._key(name, level, warnings)
                if key is not None and value != "":
                    text = value.replace(",", "\\") if key.match == "uid" else value
                    conditions.append(q.Condition(key=key, value=text))
        for keyword, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
            if uid is not None:
                conditions.append(q.Condition(key=q.KEYS[keyword], value=uid))
        returned = self._returned(level, include, conditions, study_uid, series_uid, warnings)
        query = q.FindQuery(root=q.STUDY_ROOT, level=level, conditions=tuple(conditions), returned=(), charset=())
        most = self.manager.settings.find_limit
        if limit is None or limit > most:
            limit = most
        with self.manager.engine.connect() as conn:
            rows = list(q.find(conn, query, limit=offset + limit + 1, patients=self.manager.patient_scope))
        more = len(rows) > offset + limit
        rows = rows[offset:offset + limit]
        if more:
            warnings.append("There are additional results that can be requested (use offset)")
        items = [self._item(row, returned, level, base_url) for row in rows]
        return SearchResult(items=items, warnings=warnings)

    def _key(self, name: str, level: int, warnings: list[str]) -> q.Key | None:
        keyword = _keyword(name)
        key = q.KEYS.get(keyword)
        if key is None or key.column is None or key.match == "none":
            warnings.append(f"{name}: matching on this attribute is not supported; it was ignored")
            return None
        if key.level > level:
            raise WebError(400, "invalid_parameter",
                           f"{keyword} is an attribute of a lower level than {_level_name(level)}")
        return key

    def _returned(self, level: int, include: list[str], conditions: list[q.Condition], study_uid: str | None,
                  series_uid: str | None, warnings: list[str]) -> list[str]:
        names: list[str] = []
        if level == 1 or (level >= 2 and study_uid is None):
            names += STUDY_DEFAULTS
        if level >= 2:
            names.append("StudyInstanceUID")
            if level == 2 or series_uid is None:
                names += SERIES_DEFAULTS
        if level == 3:
            names += ["SeriesInstanceUID", *INSTANCE_DEFAULTS]
        names += [c.key.keyword for c in conditions]
        for name in include:
            if name.lower() == "all":
                names += [k.keyword for k in q.KEYS.values() if k.column and k.level <= level]
                continue
            keyword = _keyword(name)
            key = q.KEYS.get(keyword)
            if key is None or key.column is None or key.level > level:
                warnings.append(f"includefield {name}: not available at the {_level_name(level)} level")
                continue
            names.append(keyword)
        return list(dict.fromkeys(names))

    def _item(self, row: dict[str, Any], returned: list[str], level: int, base_url: str) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        texts = []
        for keyword in returned:
            value = row.get(keyword)
            if isinstance(value, str):
                texts.append(value)
            tag, elem = dicom_json(keyword, value)
            out[tag] = elem
        if not all(s.isascii() for s in texts):
            out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
        out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}  # Instance Availability
        url = f"{base_url}{BASE_PATH}/studies/{row['StudyInstanceUID']}"
        if level >= 2:
            url += f"/series/{row['SeriesInstanceUID']}"
        if level >= 3:
            url += f"/instances/{row['SOPInstanceUID']}"
        out["00081190"] = {"vr": "UR", "Value": [url]}
        return dict(sorted(out.items()))

    # -- locating --------------------------------------------------------------------------------------------
    def locate(self, study_uid: str, series_uid: str | None = None,
               sop_instance_uid: str | None = None) -> list[Located]:
        """The indexed instances of a study, series or instance, in series and instance number order;
        `WebError` 404 when there are none."""
        i = t.instances
        stmt = select(i.c.study_uid, i.c.series_uid, i.c.sop_instance_uid, i.c.sop_class_uid, i.c.transfer_syntax,
                      i.c.path, i.c.frames).where(i.c.study_uid == study_uid)
        if series_uid is not None:
            stmt = stmt.where(i.c.series_uid == series_uid)
        if sop_instance_uid is not None:
            stmt = stmt.where(i.c.sop_instance_uid == sop_instance_uid)
        stmt = stmt.order_by(i.c.series_uid, i.c.instance_number, i.c.sop_instance_uid)
        with self.manager.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        if not rows:
            what = (f"instance {sop_instance_uid}" if sop_instance_uid else
                    f"series {series_uid}" if series_uid else f"study {study_uid}")
            where = f" in study {study_uid}" if sop_instance_uid or series_uid else ""
            raise WebError(404, "not_found", f"no {what}{where} on this node")
        root = self.manager.root
        return [Located(study_uid=r.study_uid, series_uid=r.series_uid, sop_instance_uid=r.sop_instance_uid,
                        sop_class_uid=r.sop_class_uid, transfer_syntax=r.transfer_syntax, path=root / r.path,
                        frames=r.frames) for r in rows]

    def locate_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Located:
        """One instance, remembered: a viewer scrolling a series asks for each instance many times.  Only the
        file path is relied on (rendered images are keyed by the file's size and mtime); `forget` drops one."""
        key = (study_uid, series_uid, sop_instance_uid)
        loc = self._located.get(key)
        if loc is None:
            loc = self.locate(study_uid, series_uid, sop_instance_uid)[0]
            self._remember([loc])
        return loc

    def cached(self, study_uid: str, series_uid: str, sop_instance_uid: str, frame: int,
               params: RenderParams) -> bytes | None:
        """The rendered frame if it is in the cache and the instance was looked up before; no database, no
        decoding (a viewer scrolling a series is answered without leaving the event loop)."""
        loc = self._located.get((study_uid, series_uid, sop_instance_uid))
        if loc is None or not self.cache.enabled:
            return None
        try:
            params.check()
            return self.cache.get(self.cache.key(loc.path, frame, params))
        except (OSError, RenderError):
            return None

    def forget(self, instances: Sequence[StoredInstance]) -> None:
        """Drop remembered lookups of instances that were stored again."""
        for s in instances:
            self._located.pop((s.study_uid, s.series_uid, s.sop_instance_uid), None)

    def prerender(self, instances: Sequence[StoredInstance]) -> None:
        """Render the first frame of ``instances`` in the background with the default parameters (what a
        viewer asks for first), so that the study streams from the cache (``dicomweb.prerender``)."""
        if not self.cache.enabled:
            return
        located = [Located(study_uid=s.study_uid, series_uid=s.series_uid, sop_instance_uid=s.sop_instance_uid,
                           sop_class_uid=s.sop_class_uid, transfer_syntax=s.transfer_syntax, path=s.path, frames=None)
                   for s in instances]
        self._remember(located)
        self._prefetch.put(located, RenderParams(quality=self.settings.default_quality))

    def _remember(self, located: Sequence[Located]) -> None:
        """Keep the lookups of instances about to be pre-rendered: their first view needs no database."""
        if len(self._located) + len(located) > LOCATED_MAX:
            self._located.clear()
        for loc in located:
            self._located[(loc.study_uid, loc.series_uid, loc.sop_instance_uid)] = loc

    def prerender_study(self, study_uid: str) -> int:
        """Queue every instance of a study for pre-rendering (e.g. on the image manager's study-complete
        event); returns how many were queued."""
        if not self.cache.enabled:
            return 0
        try:
            located = self.locate(study_uid)
        except WebError:
            return 0
        self._remember(located)
        self._prefetch.put(located, RenderParams(quality=self.settings.default_quality))
        return len(located)

    # -- WADO-RS: instances ----------------------------------------------------------------------------------
    def check_transfer_syntax(self, located: Sequence[Located], transfer_syntax: str | None) -> None:
        """406 unless every instance can be sent in ``transfer_syntax`` (None and ``*``: as stored)."""
        for loc in located:
            if not self._sendable(loc, transfer_syntax):
                raise WebError(406, "not_acceptable",
                               f"instance {loc.sop_instance_uid} is stored in {_ts_name(loc.transfer_syntax)} and "
                               f"cannot be sent in {_ts_name(transfer_syntax or '')}; ask for transfer-syntax=* "
                               f"or {loc.transfer_syntax}")

    def _sendable(self, loc: Located, transfer_syntax: str | None) -> bool:
        if transfer_syntax in (None, "*", loc.transfer_syntax):
            return True
        if transfer_syntax != EXPLICIT_LITTLE or loc.transfer_syntax == wire.EXPLICIT_BIG:
            return False
        return not loc.compressed or _decodable(loc.transfer_syntax)

    def instance_bytes(self, loc: Located, transfer_syntax: str | None = None) -> bytes:
        """The PS3.10 file of ``loc``: its bytes as stored, or transcoded to Explicit VR Little Endian."""
        if transfer_syntax in (None, "*", loc.transfer_syntax):
            return loc.path.read_bytes()
        ds = pydicom.dcmread(loc.path)
        if loc.compressed:
            ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = io.BytesIO()
        ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
        return out.getvalue()

    # -- WADO-RS: metadata and bulk data ---------------------------------------------------------------------
    def metadata(self, located: Sequence[Located], *, base_url: str) -> bytes:
        """The DICOM JSON array of ``located`` (PS3.18 10.4.1.1.2), from the series files written at ingest;
        instances missing there are read from their files.  BulkDataURIs are made absolute."""
        by_series: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        items = []
        for loc in located:
            key = (loc.study_uid, loc.series_uid)
            if key not in by_series:
                folder = self.manager.root / uid_component(loc.study_uid) / uid_component(loc.series_uid)
                by_series[key] = {_sop_uid(it): it for it in SeriesMetadata.read(folder)}
            item = by_series[key].get(loc.sop_instance_uid)
            if item is None:
                item = self._read_metadata(loc)
            items.append(item)
        text = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
        return text.replace('"BulkDataURI":"/', f'"BulkDataURI":"{base_url}/').encode("utf-8")

    def _read_metadata(self, loc: Located) -> dict[str, Any]:
        ds = pydicom.dcmread(loc.path, stop_before_pixels=True)
        pixel_vr = None
        if loc.frames or "Rows" in ds:
            pixel_vr = "OB" if loc.compressed or int(ds.get("BitsAllocated", 16) or 16) <= 8 else "OW"
        return instance_json(ds, study_uid=loc.study_uid, series_uid=loc.series_uid,
                             sop_instance_uid=loc.sop_instance_uid, pixel_vr=pixel_vr, base=BASE_PATH)

    def bulkdata(self, loc: Located, tag_text: str) -> bytes:
        """The value of a top-level element (PS3.18 10.4.1.1.4), as the BulkDataURIs of the metadata name it."""
        try:
            tag = int(tag_text, 16)
        except ValueError:
            raise WebError(400, "invalid_parameter", f"{tag_text} is not a tag (8 hex digits)") from None
        ds = pydicom.dcmread(loc.path)
        if tag not in ds:
            raise WebError(404, "not_found", f"instance {loc.sop_instance_uid} has no element {tag:08X}")
        value = ds[tag].value
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        raise WebError(406, "not_acceptable", f"element {tag:08X} is not bulk data")

    # -- WADO-RS: frames -------------------------------------------------------------------------------------
    def frames(self, loc: Located, numbers: Sequence[int],
               accept: Sequence[tuple[str, str | None]]) -> list[tuple[str, bytes]]:
        """Frames ``numbers`` (1-based) of ``loc`` as ``(content type, bytes)`` parts (PS3.18 10.4.1.1.3).

        ``accept``: the acceptable ``(media type, transfer syntax)`` of the multipart parts.  Uncompressed
        pixel data goes as application/octet-stream (little endian, one frame per part); compressed frames
        go as they are stored when their media type (or octet-stream with ``transfer-syntax=*``) is
        acceptable, else decoded to octet-stream when pydicom can decode them; else 406."""
        mode, content_type = self._frame_mode(loc, accept)
        ds = pydicom.dcmread(loc.path)
        if "PixelData" not in ds:
            raise WebError(404, "not_found", f"instance {loc.sop_instance_uid} has no pixel data")
        count = int(ds.get("NumberOfFrames", 1) or 1)
        bad = [n for n in numbers if not 1 <= n <= count]
        if bad:
            raise WebError(404, "not_found", f"instance {loc.sop_instance_uid} has {count} frame(s), not {bad[0]}")
        if mode == "native":
            return [(content_type, f) for f in _native_frames(ds, loc, numbers, count)]
        if mode == "encapsulated":
            frames = list(generate_frames(ds.PixelData, number_of_frames=count))
            return [(content_type, frames[n - 1]) for n in numbers]
        try:
            return [(content_type, pixel_array(ds, index=n - 1, raw=True).tobytes()) for n in numbers]
        except Exception as exc:
            raise WebError(406, "not_acceptable", f"cannot decode the frames of {loc.sop_instance_uid}: {exc}") from exc

    def _frame_mode(self, loc: Located, accept: Sequence[tuple[str, str | None]]) -> tuple[str, str]:
        octet = [ts for mt, ts in accept if mt in ("application/octet-stream", "*/*", "*", "application/*")]
        if not loc.compressed:
            if any(ts in (None, "*", EXPLICIT_LITTLE) for ts in octet):
                return "native", f"application/octet-stream; transfer-syntax={EXPLICIT_LITTLE}"
        else:
            media = FRAME_MEDIA_TYPES.get(loc.transfer_syntax, "application/octet-stream")
            for mt, ts in accept:
                if (mt == media or mt in ("image/*", "*/*")) and ts in (None, "*", loc.transfer_syntax):
                    return "encapsulated", f"{media}; transfer-syntax={loc.transfer_syntax}"
            if any(ts in ("*", loc.transfer_syntax) for ts in octet):
                return "encapsulated", f"application/octet-stream; transfer-syntax={loc.transfer_syntax}"
            if any(ts in (None, EXPLICIT_LITTLE) for ts in octet) and _decodable(loc.transfer_syntax):
                return "decoded", f"application/octet-stream; transfer-syntax={EXPLICIT_LITTLE}"
        wanted = ", ".join(f"{mt}{f' ({ts})' if ts else ''}" for mt, ts in accept) or "nothing"
        raise WebError(406, "not_acceptable", f"the frames of {loc.sop_instance_uid} are stored in "
                       f"{_ts_name(loc.transfer_syntax)}; cannot send them as {wanted}")

    # -- WADO-RS: rendered -----------------------------------------------------------------------------------
    def rendered(self, loc: Located, frame: int, params: RenderParams, *, prefetch: bool = True) -> bytes:
        """Frame ``frame`` (1-based) of ``loc`` rendered (PS3.18 8.3.5.1), from the cache when there."""
        try:
            params.check()
            key = self.cache.key(loc.path, frame, params)
        except RenderError as exc:
            raise WebError(400, "invalid_parameter", str(exc)) from exc
        except OSError as exc:
            raise WebError(404, "not_found", f"the file of {loc.sop_instance_uid} is missing: {exc}") from exc
        data = self.cache.get(key)
        if data is not None:
            return data
        data = self._render_once(key, loc, frame, params)
        if prefetch and self.settings.prefetch and self.cache.enabled and frame == 1:
            self._prefetch.series(loc, params)
        return data

    def _render_once(self, key: str, loc: Located, frame: int, params: RenderParams) -> bytes:
        """Render unless another thread is rendering the same key: then wait for its cached result."""
        with self._lock:
            busy = self._inflight.get(key)
            if busy is None:
                mine = self._inflight[key] = threading.Event()
        if busy is not None:
            busy.wait(60)
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            return self._render(loc, frame, params)
        try:
            data = self._render(loc, frame, params)
            self.cache.put(key, data)
            return data
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            mine.set()

    def _render(self, loc: Located, frame: int, params: RenderParams) -> bytes:
        try:
            ds = pydicom.dcmread(loc.path)
        except Exception as exc:
            raise WebError(500, "unreadable", f"cannot read instance {loc.sop_instance_uid}: {exc}") from exc
        try:
            return render_frame(ds, frame - 1, params, self._luts)
        except RenderError as exc:
            error = {400: "invalid_parameter", 404: "not_found"}.get(exc.status, "not_acceptable")
            raise WebError(exc.status, error, str(exc)) from exc

    def close(self) -> None:
        self._prefetch.stop()


class _Prefetcher:
    """Renders the other instances of a series after its first frame was asked for (one daemon thread that
    ends when idle).  Each (series, parameters) is warmed once per process."""

    def __init__(self, web: DicomWeb) -> None:
        self.web = web
        self._q: queue.Queue[tuple[Located, RenderParams] | None] = queue.Queue()
        self._warmed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def series(self, loc: Located, params: RenderParams) -> None:
        with self._lock:
            mark = (loc.series_uid, params.key)
            if mark in self._warmed:
                return
            self._warmed.add(mark)
        try:
            others = [o for o in self.web.locate(loc.study_uid, loc.series_uid) if o.sop_instance_uid !=
                      loc.sop_instance_uid]
        except WebError:
            return
        self.web._remember(others)  # the viewer's next requests need no database either
        self.put(others, params)

    def put(self, located: Sequence[Located], params: RenderParams) -> None:
        for loc in located:
            self._q.put((loc, params))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ihehub-dicomweb-prefetch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=5)
            except queue.Empty:
                return
            if item is None:
                return
            loc, params = item
            try:
                self.web.rendered(loc, 1, params, prefetch=False)
            except Exception as exc:  # an instance that cannot be rendered is skipped
                log.debug("prefetch of %s skipped: %s", loc.sop_instance_uid, exc)

    def stop(self) -> None:
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(None)


# -- helpers -------------------------------------------------------------------------------------------------


def _keyword(name: str) -> str:
    """A QIDO attribute id: a keyword, or a tag as 8 hex digits (PS3.18 8.3.4.1)."""
    if len(name) == 8:
        try:
            return keyword_for_tag(int(name, 16)) or name
        except ValueError:
            return name
    return name


def _level_name(level: int) -> str:
    return {1: "study", 2: "series", 3: "instance"}.get(level, "patient")


def _sop_uid(item: dict[str, Any]) -> str:
    value = item.get("00080018", {}).get("Value")
    return str(value[0]) if value else ""


def _ts_name(uid: str) -> str:
    if uid == "*":
        return "any transfer syntax"
    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else uid or "the default transfer syntax"


def _decodable(transfer_syntax: str) -> bool:
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except Exception:  # no decoder known for this transfer syntax
        return False


def _native_frames(ds: Dataset, loc: Located, numbers: Sequence[int], count: int) -> Iterator[bytes]:
    """Uncompressed frames as little endian bytes (PS3.5 8.1.1: frames follow each other in Pixel Data)."""
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if bits % 8:
        raise WebError(406, "not_acceptable", f"frames of {bits}-bit pixel data are not served; retrieve the "
                       "instance instead")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    size = rows * columns * samples * bits // 8
    data: bytes = ds.PixelData
    for n in numbers:
        chunk = data[(n - 1) * size:n * size]
        if len(chunk) < size:
            raise WebError(404, "not_found", f"frame {n} of {loc.sop_instance_uid} is cut off in the file")
        if loc.transfer_syntax == wire.EXPLICIT_BIG and bits > 8:
            chunk = np.frombuffer(chunk, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
        yield chunk
