"""Series metadata in the DICOM JSON Model (PS3.18 Annex F), written at ingest so viewers load fast.

One file per series, ``<series folder>/metadata.json``: a JSON array with one object per instance, exactly
what WADO-RS ``.../series/{uid}/metadata`` returns (PS3.18 10.4.1.1.2).  Bulk data (pixel data, other
binary values over `BULK_THRESHOLD` bytes) is replaced by a ``BulkDataURI`` under ``/dicomweb``.

An instance is appended in place (the closing ``]`` is overwritten by ``,{...}]``), so each write costs
O(instance) and the file is a valid array after every write; a resent instance replaces its object by
rewriting the file atomically.  Only the indexer thread writes these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from ihehub.dicom.elements import ElementCache

__all__ = ["BULK_THRESHOLD", "METADATA_FILE", "SeriesMetadata", "instance_json"]

METADATA_FILE = "metadata.json"
BULK_THRESHOLD = 1024
SOP_INSTANCE_UID = "00080018"
PIXEL_TAGS = ("7FE00008", "7FE00009", "7FE00010")  # Float, Double Float and Pixel Data


def instance_json(ds: Dataset, *, study_uid: str, series_uid: str, sop_instance_uid: str,
                  pixel_vr: str | None = None, base: str = "/dicomweb",
                  cache: ElementCache | None = None) -> dict[str, Any]:
    """The DICOM JSON object of one instance; binary values above the threshold become BulkDataURIs.
    ``pixel_vr``: the instance has Pixel Data (with this VR) that ``ds`` was read without.  ``cache``:
    elements encoded as in an earlier instance get that instance's JSON (shared objects: read only)."""
    prefix = f"{base}/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"

    def bulk(elem: DataElement) -> str:
        if f"{int(elem.tag):08X}" in PIXEL_TAGS:
            return f"{prefix}/frames"  # PS3.18 10.4.1.1.3: pixel data is retrieved as frames
        return f"{prefix}/bulkdata/{int(elem.tag):08X}"

    if cache is None:
        out = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
    else:
        out = cache.dataset_json(ds, bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
    for tag in PIXEL_TAGS:  # pixel data is never inline in metadata, however small (PS3.18 F.2.7)
        if tag in out and "BulkDataURI" not in out[tag]:
            out[tag] = {"vr": out[tag].get("vr", "OB"), "BulkDataURI": f"{prefix}/frames"}
    if pixel_vr is not None and "7FE00010" not in out:
        out["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": f"{prefix}/frames"}
    return out


class SeriesMetadata:
    """Appends instances to the ``metadata.json`` of their series folder."""

    def add(self, folder: Path, item: dict[str, Any], *, replaced: bool) -> None:
        self.add_many(folder, [(item, replaced)])

    def add_many(self, folder: Path, items: list[tuple[dict[str, Any], bool]]) -> None:
        """Add instances of one series; ``(item, replaced)`` pairs, replaced ones take their old one's place."""
        path = folder / METADATA_FILE
        if not any(replaced for _, replaced in items):
            encoded = b",".join(json.dumps(it, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                                for it, _ in items)
            if self._append(path, encoded):
                return
        self._rewrite(path, [it for it, _ in items])

    @staticmethod
    def read(folder: Path) -> list[dict[str, Any]]:
        path = folder / METADATA_FILE
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def _append(self, path: Path, encoded: bytes) -> bool:
        """Append in place; False when the file is not a well-formed array we can extend."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.write(fd, b"[" + encoded + b"]")
                return True
            if os.pread(fd, 1, size - 1) != b"]":
                return False
            os.pwrite(fd, (b"," if size > 2 else b"") + encoded + b"]", size - 1)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _rewrite(self, path: Path, new: list[dict[str, Any]]) -> None:
        uids = {_uid_of(it) for it in new}
        items = [it for it in self.read(path.parent) if _uid_of(it) not in uids]
        items.extend(new)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        os.replace(tmp, path)


def _uid_of(item: dict[str, Any]) -> str | None:
    value = item.get(SOP_INSTANCE_UID, {}).get("Value")
    return str(value[0]) if value else None
