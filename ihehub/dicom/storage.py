"""Received SOP instances on disk: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

The data set is written exactly as it came over the wire (PS3.7 9.1.1 C-STORE, no re-encoding), behind
the File Meta Information of PS3.10 7.1, first to a hidden ``.part`` file that is renamed into place, so
a reader never sees half a file.  Before anything is written the data set's structure and its identifying
UIDs are checked; the answer of a failure is the C-STORE status of PS3.4 Annex B.2.3:

* ``0xC000`` cannot understand: the data set is not a well-formed element sequence (or cannot be inflated);
* ``0xA900`` data set does not match SOP class: SOP Class/Instance UID missing or different from the
  request's Affected SOP Class/Instance UID, or no Study/Series Instance UID to file it under;
* ``0xA700`` out of resources: the disk is full (ENOSPC, EDQUOT, EFBIG);
* ``0x0110`` processing failure: any other I/O error (permissions, read-only file system).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import threading
import time
from pathlib import Path

from ihehub.dicom import wire

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_MISMATCH",
    "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE",
    "SUCCESS",
    "InstanceStore",
    "StoreFailure",
    "StoredInstance",
    "sync_dirs",
    "sync_files",
    "uid_component",
]

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
_WANT = (SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)
_CLEAN_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StoreFailure(Exception):
    """The instance was not stored; ``status`` is the C-STORE failure status, the message its Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # (0000,0902) Error Comment is LO: 64 characters


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StoredInstance:
    """One stored instance: its UIDs, file and how it came (``dataset`` is the plain, inflated data set)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: Path
    relpath: str
    size: int
    calling_ae: str
    received_at: float
    replaced: bool
    dataset: bytes = dataclasses.field(repr=False)

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == wire.IMPLICIT_LITTLE

    @property
    def little_endian(self) -> bool:
        return self.transfer_syntax != wire.EXPLICIT_BIG


def uid_component(uid: str) -> str:
    """A UID as a path component: itself when it is a clean UID, else a hash (no ``..``, no separators)."""
    if len(uid) <= 64 and _CLEAN_UID.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", errors="replace")).hexdigest()[:40]


class InstanceStore:
    """Writes instances under ``root``; thread-safe (each association writes from its own thread)."""

    def __init__(self, root: Path, *, fsync: str = "batch") -> None:
        self.root = root
        self.fsync = fsync

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        folder = self.root / uid_component(study_uid) / uid_component(series_uid)
        return folder / f"{uid_component(sop_instance_uid)}.dcm"

    def store(self, dataset: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              calling_ae: str = "") -> StoredInstance:
        """Check and write one received data set; raises `StoreFailure` with the status to answer."""
        plain = wire.inflate(dataset) if transfer_syntax == wire.DEFLATED else dataset
        try:
            if transfer_syntax == wire.DEFLATED and not dataset:
                raise wire.MalformedDataset("empty deflated data set", 0)
            found = wire.scan_dataset(plain, implicit=transfer_syntax == wire.IMPLICIT_LITTLE,
                                      little=transfer_syntax != wire.EXPLICIT_BIG, want=_WANT)
        except wire.MalformedDataset as exc:
            raise StoreFailure(CANNOT_UNDERSTAND, f"Malformed data set: {exc}") from exc
        sop_class = _uid(found, SOP_CLASS_UID)
        sop_instance = _uid(found, SOP_INSTANCE_UID)
        study = _uid(found, STUDY_INSTANCE_UID)
        series = _uid(found, SERIES_INSTANCE_UID)
        if sop_instance is None:
            raise StoreFailure(DATASET_MISMATCH, "No SOP Instance UID (0008,0018)")
        if sop_instance != sop_instance_uid.strip():
            raise StoreFailure(DATASET_MISMATCH, "SOP Instance UID differs from the request's")
        if sop_class is None:
            raise StoreFailure(DATASET_MISMATCH, "No SOP Class UID (0008,0016)")
        if sop_class != sop_class_uid.strip():
            raise StoreFailure(DATASET_MISMATCH, "SOP Class UID differs from the request's")
        if study is None:
            raise StoreFailure(DATASET_MISMATCH, "No Study Instance UID (0020,000D)")
        if series is None:
            raise StoreFailure(DATASET_MISMATCH, "No Series Instance UID (0020,000E)")
        meta = wire.file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                              transfer_syntax=transfer_syntax, source_ae_title=calling_ae.strip() or None)
        path = self.path_for(study, series, sop_instance)
        replaced = self._write(path, meta, dataset)
        return StoredInstance(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, study_uid=study, series_uid=series,
            transfer_syntax=transfer_syntax, path=path, relpath=str(path.relative_to(self.root)),
            size=len(meta) + len(dataset), calling_ae=calling_ae.strip(), received_at=time.time(),
            replaced=replaced, dataset=plain,
        )

    def _write(self, path: Path, meta: bytes, dataset: bytes) -> bool:
        folder = path.parent
        tmp = folder / f".{path.name}.{threading.get_ident()}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:  # first instance of the series
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, flags, 0o644)
            try:
                _write_all(fd, meta)
                _write_all(fd, dataset)
                if self.fsync == "always":
                    os.fsync(fd)
            finally:
                os.close(fd)
            replaced = path.exists()
            os.replace(tmp, path)
            if self.fsync == "always":
                sync_dirs([folder])
        except OSError as exc:
            _discard(tmp)
            if exc.errno in _DISK_FULL:
                raise StoreFailure(OUT_OF_RESOURCES, f"Out of disk space: {exc.strerror}") from exc
            raise StoreFailure(PROCESSING_FAILURE, f"Cannot write the instance: {exc.strerror}") from exc
        return replaced


def sync_files(paths: list[Path]) -> None:
    """fsync written files and their folders (the ``batch`` policy, run by the indexer before its commit)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    sync_dirs(sorted({p.parent for p in paths}))


def sync_dirs(folders: list[Path]) -> None:
    for folder in folders:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        return


def _uid(found: dict[int, bytes], tag: int) -> str | None:
    return wire.text_value(found.get(tag))
