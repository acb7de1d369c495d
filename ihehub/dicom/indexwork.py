"""The work of indexing a batch of stored instances, in this process or in a worker process.

`IndexWork.run` decodes each instance (pydicom, pixel data left on disk), writes the series metadata
(`ihehub.dicom.dicomjson`), syncs the files (``batch`` fsync policy) and commits the rows through a
group-committing `Writer`; it returns how many instances were indexed and how many failed.

Decoding and JSON encoding are CPU work that would compete for the GIL with the threads that receive
instances, so by default the image manager runs them in one worker process (`ProcessIndexWork`, the
"several processes for throughput" of issue 7): the worker gets the batch's `StoredInstance` records
without their bytes, reads the files back (they are in the page cache) and writes to the same database
through its own engine.  If the worker dies, indexing continues in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from ihehub.bus.db import StoreUnavailable, Writer, make_engine
from ihehub.dicom import wire
from ihehub.dicom.dicomjson import SeriesMetadata, instance_json
from ihehub.dicom.elements import ElementCache
from ihehub.dicom.index import InstanceRecord, instance_record, write_batch
from ihehub.dicom.storage import StoredInstance, sync_files

__all__ = ["IndexWork", "ProcessIndexWork", "load_dataset"]

log = logging.getLogger("ihehub.dicom")
DATABASE_ENV = "IHEHUB_DICOM_INDEX_DATABASE"  # the worker's database URL (kept off its command line)
READY_TIMEOUT = 60.0


def load_dataset(stored: StoredInstance) -> StoredInstance:
    """``stored`` with its data set bytes read back from its file (inflated when deflated)."""
    raw = stored.path.read_bytes()
    if raw[128:132] != b"DICM":
        raise ValueError(f"{stored.path} is not a DICOM file")
    meta_length = struct.unpack_from("<I", raw, 140)[0]  # (0002,0000) UL right after the prefix
    body = raw[144 + meta_length:]
    if stored.transfer_syntax == wire.DEFLATED:
        body = wire.inflate(body)
    return dataclasses.replace(stored, dataset=body)


class IndexWork:
    """Indexes batches with ``writer``; used by the indexer thread or inside the worker process."""

    def __init__(self, writer: Writer, *, fsync: str = "batch") -> None:
        self.writer = writer
        self.fsync = fsync
        self.metadata = SeriesMetadata()
        self.elements = ElementCache()  # a series repeats most values byte for byte: convert them once

    def run(self, batch: Sequence[StoredInstance]) -> tuple[int, int]:
        records: list[InstanceRecord] = []
        failed = 0
        for stored in batch:
            try:
                if not stored.dataset:
                    stored = load_dataset(stored)
                records.append(instance_record(stored, cache=self.elements))
            except Exception:
                log.exception("cannot index %s", stored.path)
                failed += 1
        if self.fsync == "batch":
            sync_files([r.stored.path for r in records])
        self._write_metadata(records)
        indexed, bad = self._commit(records)
        return indexed, failed + bad

    def close(self) -> None:
        return None

    def _write_metadata(self, records: Sequence[InstanceRecord]) -> None:
        by_folder: dict[Path, list[tuple[dict[str, Any], bool]]] = defaultdict(list)
        for r in records:
            if r.dataset is None:
                continue
            s = r.stored
            try:
                item = instance_json(r.dataset, study_uid=s.study_uid, series_uid=s.series_uid,
                                     sop_instance_uid=s.sop_instance_uid, pixel_vr=r.pixel_vr,
                                     cache=self.elements)
            except Exception:
                log.exception("cannot encode the metadata of %s", s.path)
                continue
            by_folder[s.path.parent].append((item, s.replaced))
        for folder, items in by_folder.items():
            try:
                self.metadata.add_many(folder, items)
            except Exception:
                log.exception("cannot write the series metadata in %s", folder)

    def _commit(self, records: Sequence[InstanceRecord]) -> tuple[int, int]:
        """Write the rows; a database outage is waited out (the queue holds the senders back)."""
        if not records:
            return 0, 0
        delay = 0.2
        while True:
            try:
                self.writer.run(lambda conn: write_batch(conn, records))
                return len(records), 0
            except StoreUnavailable as exc:
                log.warning("index database unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                if len(records) == 1:
                    log.exception("cannot index %s", records[0].stored.path)
                    return 0, 1
                indexed = failed = 0
                for one in records:  # isolate the bad record
                    i, f = self._commit([one])
                    indexed, failed = indexed + i, failed + f
                return indexed, failed


def _worker_main(conn: Pipe, url: str, fsync: str) -> None:
    """The worker process: batches in, (indexed, failed) out, until ``None`` or a closed pipe."""
    engine = make_engine(url)
    writer = Writer(engine, name="ihehub-dicom-index-worker")
    work = IndexWork(writer, fsync=fsync)
    try:
        conn.send("ready")
        while True:
            try:
                batch = conn.recv()
            except EOFError:
                return
            if batch is None:
                return
            try:
                result = work.run(batch)
            except Exception:
                log.exception("index worker: batch failed")
                result = (0, len(batch))
            conn.send(result)
    finally:
        writer.close()
        engine.dispose()


class ProcessIndexWork:
    """`IndexWork` in a worker process (``python -m ihehub.dicom.indexwork``: a fresh interpreter, neither a
    fork of this threaded process nor a re-import of its main module); falls back to ``local``."""

    def __init__(self, writer: Writer, *, fsync: str = "batch") -> None:
        self.local = IndexWork(writer, fsync=fsync)
        parent, child = socket.socketpair()
        env = dict(os.environ, **{DATABASE_ENV: writer.engine.url.render_as_string(hide_password=False)})
        self._proc = subprocess.Popen([sys.executable, "-m", "ihehub.dicom.indexproc", str(child.fileno()), fsync],
                                      pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child.close()
        self._sock = parent
        self._conn = Pipe(parent.fileno())
        self._alive = False
        try:  # wait for the worker's imports and engine, so the first batch is not late
            self._alive = self._conn.poll(READY_TIMEOUT) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            self._alive = False
        if not self._alive:
            log.error("the index worker process did not start (exit code %s); indexing in the hub process",
                      self._proc.poll())

    @property
    def pid(self) -> int:
        return self._proc.pid

    def run(self, batch: Sequence[StoredInstance]) -> tuple[int, int]:
        if self._alive:
            try:
                self._conn.send([dataclasses.replace(s, dataset=b"") for s in batch])
                result: tuple[int, int] = self._conn.recv()
                return result
            except (EOFError, OSError):
                log.error("the index worker process ended (exit code %s); indexing in the hub process",
                          self._proc.poll())
                self._alive = False
        return self.local.run(batch)

    def close(self) -> None:
        if self._alive:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        self._conn.close()
        self._sock.detach()  # the Connection closed the descriptor
        self._alive = False


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the worker process: ``python -m ihehub.dicom.indexproc FD FSYNC``."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _worker_main(Pipe(int(args[0])), os.environ[DATABASE_ENV], args[1])

