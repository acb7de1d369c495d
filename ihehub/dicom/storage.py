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
import itertools
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
    "Incoming",
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
    """One stored instance: its UIDs, file and how it came (``dataset`` is the plain, inflated data set; a
    view of the receive buffer when `InstanceStore.store` was given one, valid only while the store handler
    runs: whoever keeps it copies it, as `ihehub.dicom.indexer.Indexer.put` does)."""

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
    dataset: bytes | memoryview = dataclasses.field(repr=False)

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
    """Writes instances under ``root``; thread-safe (each association writes from its own thread).

    `store` writes a complete data set; `begin` starts an `Incoming` file that the data set is written
    to as its fragments arrive (the native upper layer, `ihehub.dicom.native`), checked and moved into
    place by `Incoming.finish` — the same checks, the same file, the same statuses as `store`."""

    INCOMING = ".incoming"  # under root: files being received (never acknowledged; emptied at start)

    def __init__(self, root: Path, *, fsync: str = "batch") -> None:
        self.root = root
        self.fsync = fsync
        self._seq = itertools.count()

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        folder = self.root / uid_component(study_uid) / uid_component(series_uid)
        return folder / f"{uid_component(sop_instance_uid)}.dcm"

    def clear_incoming(self, older_than: float = 3600.0) -> None:
        """Remove what a killed process left half received (nothing of it was acknowledged): files not
        written to for ``older_than`` seconds (another process sharing the folder may be receiving)."""
        folder = self.root / self.INCOMING
        if not folder.is_dir():
            return
        limit = time.time() - older_than
        for p in folder.iterdir():
            try:
                if p.stat().st_mtime < limit:
                    _discard(p)
            except OSError:
                continue

    def store(self, dataset: bytes | memoryview, *, sop_class_uid: str, sop_instance_uid: str,
              transfer_syntax: str, calling_ae: str = "") -> StoredInstance:
        """Check and write one received data set (bytes, or a view of a receive buffer: written as is, not
        copied); raises `StoreFailure` with the status to answer."""
        incoming = self.begin(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                              transfer_syntax=transfer_syntax, calling_ae=calling_ae)
        incoming.write(dataset)
        return incoming.finish(dataset)

    def begin(self, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              calling_ae: str = "") -> Incoming:
        """Start receiving an instance announced by a C-STORE request; see `Incoming`."""
        return Incoming(self, sop_class_uid=sop_class_uid.strip(), sop_instance_uid=sop_instance_uid.strip(),
                        transfer_syntax=transfer_syntax, calling_ae=calling_ae.strip())


class Incoming:
    """One instance being received: its data set is written, as it arrives, behind the File Meta Information
    of the request's UIDs into ``<root>/.incoming/<n>.part``; `finish` checks the complete data set exactly as
    `InstanceStore.store` does (a data set whose UIDs differ from the request's is refused, so the header is
    the one `store` would write) and renames the file into place.  An I/O error while writing is kept and
    reported by `finish` after the data set checks.  `discard` drops a partial instance."""

    def __init__(self, store: InstanceStore, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 calling_ae: str) -> None:
        self.store = store
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.size = 0
        self.error: OSError | None = None
        self.fd = -1
        folder = store.root / InstanceStore.INCOMING
        self.tmp = folder / f"{os.getpid()}.{threading.get_ident()}.{next(store._seq)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.meta = wire.file_meta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                                       transfer_syntax=transfer_syntax, source_ae_title=calling_ae or None)
        except UnicodeError:  # a request UID that is no UID: refused by finish (it cannot match the data set)
            self.meta = b""
            return
        try:
            try:
                self.fd = os.open(self.tmp, flags, 0o644)
            except FileNotFoundError:  # the first instance since the folder was made
                folder.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.tmp, flags, 0o644)
            _write_all(self.fd, self.meta)
            self.size = len(self.meta)
        except OSError as exc:
            self.error = exc

    def write(self, data: bytes | memoryview) -> None:
        """Append a fragment of the data set (as received)."""
        if self.fd < 0 or self.error is not None:
            return
        try:
            _write_all(self.fd, data)
            self.size += len(data)
        except OSError as exc:
            self.error = exc

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _discard(self.tmp)

    def finish(self, dataset: bytes | memoryview) -> StoredInstance:
        """Check the complete data set (everything given to `write`) and move the file into place; raises
        `StoreFailure` with the status to answer (the partial file is then gone)."""
        try:
            return self._finish(dataset)
        except BaseException:
            self.discard()
            raise

    def _finish(self, dataset: bytes | memoryview) -> StoredInstance:
        transfer_syntax = self.transfer_syntax
        try:
            if transfer_syntax == wire.DEFLATED and not dataset:
                raise wire.MalformedDataset("empty deflated data set", 0)
            plain = wire.inflate(dataset) if transfer_syntax == wire.DEFLATED else dataset
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
        if sop_instance != self.sop_instance_uid:
            raise StoreFailure(DATASET_MISMATCH, "SOP Instance UID differs from the request's")
        if sop_class is None:
            raise StoreFailure(DATASET_MISMATCH, "No SOP Class UID (0008,0016)")
        if sop_class != self.sop_class_uid:
            raise StoreFailure(DATASET_MISMATCH, "SOP Class UID differs from the request's")
        if study is None:
            raise StoreFailure(DATASET_MISMATCH, "No Study Instance UID (0020,000D)")
        if series is None:
            raise StoreFailure(DATASET_MISMATCH, "No Series Instance UID (0020,000E)")
        folder = f"{uid_component(study)}/{uid_component(series)}"  # as `InstanceStore.path_for`, in strings
        relpath = f"{folder}/{uid_component(sop_instance)}.dcm"
        root = os.fspath(self.store.root)
        replaced = self._place(f"{root}/{folder}", f"{root}/{relpath}")
        return StoredInstance(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, study_uid=study, series_uid=series,
            transfer_syntax=transfer_syntax, path=self.store.root / relpath, relpath=relpath,
            size=self.size, calling_ae=self.calling_ae, received_at=time.time(), replaced=replaced, dataset=plain,
        )

    def _place(self, folder: str, path: str) -> bool:
        """Close (and with ``fsync: always`` sync) the file and rename it to ``path``; True if it replaced one."""
        try:
            if self.error is not None:
                raise self.error
            fd, self.fd = self.fd, -1
            if fd < 0:
                raise OSError(errno.EINVAL, "the request's UIDs cannot name a file")
            try:
                if self.store.fsync == "always":
                    os.fsync(fd)
            finally:
                os.close(fd)
            replaced = os.path.exists(path)
            try:
                os.replace(self.tmp, path)
            except FileNotFoundError:  # first instance of the series
                os.makedirs(folder, exist_ok=True)
                os.replace(self.tmp, path)
            if self.store.fsync == "always":
                sync_dirs([Path(folder)])
        except OSError as exc:
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


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        return


def _uid(found: dict[int, bytes], tag: int) -> str | None:
    return wire.text_value(found.get(tag))
