"""STOW-RS (PS3.18 10.5): PS3.10 files from an HTTP request stored through the image manager's C-STORE path.

Each part is split into its File Meta Information (PS3.10 7.1) and data set; the data set goes to
`InstanceStore.store` exactly as a C-STORE data set would (same checks, same bytes-as-received file, same
failure statuses of PS3.4 B.2.3) and then to the indexer.  The response (PS3.18 10.5.3, Table 10.5.3-1)
lists stored instances in the Referenced SOP Sequence (0008,1199) with their Retrieve URL and refused ones
in the Failed SOP Sequence (0008,1198) with a Failure Reason (0008,1197):

* ``0xC000`` cannot understand: not a PS3.10 file, no transfer syntax, malformed data set;
* ``0xA900`` data set does not match: UIDs missing or different from the file meta, or a Study Instance UID
  other than the request path's;
* ``0xA700`` out of resources (disk full); ``0x0110`` processing failure (other I/O errors).

HTTP status: 200 when all were stored, 202 when some were, 409 when none were (PS3.18 10.5.3).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ihehub.dicom import wire
from ihehub.dicom.storage import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    StoredInstance,
    StoreFailure,
)

if TYPE_CHECKING:
    from ihehub.dicom.server import ImageManager

__all__ = ["DICOM_MEDIA_TYPE", "Part10", "StowResult", "read_part10", "stow"]

DICOM_MEDIA_TYPE = "application/dicom"
_META_TS = 0x00020010
_META_CLASS = 0x00020002
_META_INSTANCE = 0x00020003


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Part10:
    """A PS3.10 file split into what the store needs: transfer syntax, media storage UIDs, the data set."""

    transfer_syntax: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    dataset: bytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StowResult:
    """The HTTP status and the DICOM JSON body of a STOW-RS response; ``stored`` as indexed."""

    status: int
    body: dict[str, Any]
    stored: tuple[StoredInstance, ...]


def read_part10(data: bytes) -> Part10:
    """Split a PS3.10 file (128-byte preamble, ``DICM``, group 0002 in Explicit VR Little Endian);
    `StoreFailure` 0xC000 when it is not one."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise StoreFailure(CANNOT_UNDERSTAND, "Not a DICOM PS3.10 file (no DICM prefix)")
    pos, end = 132, len(data)
    meta: dict[int, bytes] = {}
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in wire.LONG_VRS:
            if pos + 12 > end:
                break
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if pos + header + length > end:
            raise StoreFailure(CANNOT_UNDERSTAND, "File meta information runs past the end")
        meta[group << 16 | element] = data[pos + header:pos + header + length]
        pos += header + length
    ts = wire.text_value(meta.get(_META_TS))
    if ts is None:
        raise StoreFailure(CANNOT_UNDERSTAND, "No Transfer Syntax UID (0002,0010) in the file meta")
    return Part10(transfer_syntax=ts, sop_class_uid=wire.text_value(meta.get(_META_CLASS)),
                  sop_instance_uid=wire.text_value(meta.get(_META_INSTANCE)), dataset=data[pos:])


def stow(manager: ImageManager, parts: Sequence[tuple[str, bytes]], *, study_uid: str | None, base_url: str,
         wait: float = 10.0) -> StowResult:
    """Store ``parts`` (``(media type, body)``) through ``manager``; then wait up to ``wait`` seconds for the
    index, so that a QIDO-RS search right after the response finds them."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    stored: list[StoredInstance] = []
    for media_type, data in parts:
        uids: tuple[str | None, str | None] = (None, None)
        try:
            if media_type != DICOM_MEDIA_TYPE:
                raise StoreFailure(CANNOT_UNDERSTAND, f"Part of type {media_type or '(none)'}, not application/dicom")
            part = read_part10(data)
            found = _scan(part)
            uids = (part.sop_class_uid or found.get(SOP_CLASS_UID),
                    part.sop_instance_uid or found.get(SOP_INSTANCE_UID))
            if study_uid is not None and found.get(STUDY_INSTANCE_UID) != study_uid:
                raise StoreFailure(DATASET_MISMATCH, "Study Instance UID differs from the request's")
            instance = manager.storage.store(part.dataset, sop_class_uid=uids[0] or "", sop_instance_uid=uids[1] or "",
                                             transfer_syntax=part.transfer_syntax)
        except StoreFailure as exc:
            failed.append(_item(*uids, FailureReason=exc.status))
            continue
        manager.indexer.put(instance)
        stored.append(instance)
        url = (f"{base_url}/dicomweb/studies/{instance.study_uid}/series/{instance.series_uid}"
               f"/instances/{instance.sop_instance_uid}")
        referenced.append(_item(instance.sop_class_uid, instance.sop_instance_uid, RetrieveURL=url))
    if stored:
        manager.flush(wait)
    body: dict[str, Any] = {}
    studies = {s.study_uid for s in stored} | ({study_uid} if study_uid else set())
    if len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/dicomweb/studies/{studies.pop()}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 409 if not stored else 202 if failed else 200
    return StowResult(status=status, body=body, stored=tuple(stored))


def _scan(part: Part10) -> dict[int, str]:
    """The SOP Class/Instance and Study Instance UIDs of the data set (0xC000 when it is malformed)."""
    plain = wire.inflate(part.dataset) if part.transfer_syntax == wire.DEFLATED else part.dataset
    try:
        found = wire.scan_dataset(plain, implicit=part.transfer_syntax == wire.IMPLICIT_LITTLE,
                                  little=part.transfer_syntax != wire.EXPLICIT_BIG,
                                  want=(SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID))
    except wire.MalformedDataset as exc:
        raise StoreFailure(CANNOT_UNDERSTAND, f"Malformed data set: {exc}") from exc
    return {tag: text for tag, raw in found.items() if (text := wire.text_value(raw)) is not None}


def _item(sop_class_uid: str | None, sop_instance_uid: str | None, **extra: Any) -> dict[str, Any]:
    """One item of the Referenced/Failed SOP Sequence (PS3.18 Table 10.5.3-2/-3)."""
    item: dict[str, Any] = {}
    if sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [sop_class_uid]}
    if sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance_uid]}
    if "RetrieveURL" in extra:
        item["00081190"] = {"vr": "UR", "Value": [extra["RetrieveURL"]]}
    if "FailureReason" in extra:
        item["00081197"] = {"vr": "US", "Value": [extra["FailureReason"]]}
    return item
