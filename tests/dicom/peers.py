"""Real DICOM peers on loopback for the retrieve and forwarding tests: DCMTK ``storescp`` and Orthanc.

Both run as child processes on free ports of 127.0.0.1 with ``TCP_NODELAY=1`` (DCMTK reads it from the
environment); each is stopped by its own process handle.  A missing binary fails the test with the package
to install.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on port {port} after {timeout} s")


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool, path=ENV["PATH"])
    if path is None:
        pytest.fail(f"{tool} is not installed; run: apt-get install {package}")
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class StoreSCP:
    """DCMTK storescp writing what it receives to ``folder`` (one file per instance, flat)."""

    def __init__(self, folder: Path, ae_title: str = "DEST", *, accept: tuple[str, ...] = ("+xa",)) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([_need("storescp", "dcmtk"), *accept, "-aet", ae_title, "-od", str(folder),
                                      str(self.port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def wait_files(self, n: int, timeout: float = 20.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while len(self.files()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.files()

    def stop(self) -> None:
        _stop(self.proc)


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc (Debian ``orthanc``) with its own storage, DICOM port and HTTP port on loopback; with
    ``dicomweb`` its DICOMweb plugin (Debian ``orthanc-dicomweb``) at ``/dicom-web/``."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", *, dicomweb: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        config = {
            "Name": "ihehub-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "DicomAet": ae_title, "DicomPort": self.port, "HttpPort": self.http_port,
            "DicomBindAddress": "127.0.0.1", "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": True,
            "StorageCompression": False, "ConcurrentJobs": 1,
        }
        if dicomweb:
            if not DICOMWEB_PLUGIN.exists():
                pytest.fail(f"{DICOMWEB_PLUGIN} is missing; run: apt-get install orthanc-dicomweb")
            config.update({"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115  # closed by stop()
        self.proc = subprocess.Popen([_need("Orthanc", "orthanc"), str(folder / "config.json")], cwd=folder, env=ENV,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.http_port, self.proc)
        wait_port(self.port, self.proc)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc holds."""
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances")}

    def wait_instances(self, uids: set[str], timeout: float = 20.0) -> set[str]:
        deadline = time.monotonic() + timeout
        have = self.instance_uids()
        while not uids <= have and time.monotonic() < deadline:
            time.sleep(0.1)
            have = self.instance_uids()
        return have

    def file_of(self, sop_instance_uid: str) -> bytes:
        (oid,) = [i for i in self.get("/instances")
                  if self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] == sop_instance_uid]
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{oid}/file", timeout=10) as rsp:
            return bytes(rsp.read())

    def stop(self) -> None:
        """SIGKILL: a throw-away instance; its graceful shutdown takes seconds."""
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def dataset_bytes(path: Path | bytes) -> bytes:
    """The data set of a Part 10 file, after its File Meta Information (to compare files byte for byte)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset, read_preamble

    fp = BytesIO(path if isinstance(path, bytes) else Path(path).read_bytes())
    read_preamble(fp, False)
    read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag.group != 2)
    return fp.read()


__all__ = ["ENV", "Orthanc", "StoreSCP", "dataset_bytes", "wait_port"]
