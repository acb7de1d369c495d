"""Helpers of the DICOMweb tests: a real hub (HTTP and DICOM on ephemeral loopback ports, bearer tokens),
multipart bodies built and read by hand for byte-level checks, and pydicom's bundled sample files."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient

from ihehub.api import create_token
from ihehub.api.routes_dicomweb import parse_media_type, parse_multipart
from ihehub.channels.registry import Registry
from ihehub.config import DicomActorConfig, init_home, load_channels, load_home
from ihehub.dicom.stow import read_part10
from ihehub.hub import Hub
from tests.api.api_support import LoopThread
from tests.conftest import loopback_config
from tests.dicom.dicomkit import sample_file

ORIGIN = "https://viewer.example"
# pydicom's bundled files, each with its own SOP Instance UID: explicit VR LE, JPEG 2000 (lossless and
# lossy), RLE colour, and Chinese names in UTF-8 (ISO_IR 192) and GB18030
SAMPLES = ("CT_small.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "chrX1.dcm", "chrX2.dcm")


@dataclasses.dataclass
class WebHub:
    hub: Hub
    tokens: dict[str, str]
    http: httpx.Client

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.hub.http_port}"

    def auth(self, role: str = "readonly") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str = "readonly", headers: dict[str, str] | None = None,
            **kw: Any) -> httpx.Response:
        return self.http.get(self.base + path, headers={**self.auth(role), **(headers or {})}, **kw)

    def stow(self, files: list[bytes], path: str = "/dicomweb/studies", role: str = "operator",
             content_type: str | None = None, part_type: str = "application/dicom") -> httpx.Response:
        boundary = secrets.token_hex(8)
        body = multipart_body(files, boundary, part_type)
        ctype = content_type or f'multipart/related; type="application/dicom"; boundary={boundary}'
        return self.http.post(self.base + path, content=body, headers={**self.auth(role), "Content-Type": ctype})

    def client(self, role: str = "readonly") -> DICOMwebClient:
        return DICOMwebClient(url=f"{self.base}/dicomweb", headers=self.auth(role))


def multipart_body(files: list[bytes], boundary: str, part_type: str = "application/dicom") -> bytes:
    out = b""
    for data in files:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def parts_of(response: httpx.Response) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related response, read by hand (no client library in between)."""
    media, params = parse_media_type(response.headers["content-type"])
    assert media == "multipart/related", response.headers["content-type"]
    return parse_multipart(response.content, params["boundary"], params.get("type", ""))


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a PS3.10 file without its File Meta Information (which the hub writes itself)."""
    return read_part10(part10).dataset


def sample_bytes(name: str) -> bytes:
    return Path(sample_file(name)).read_bytes()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebHub]:
    """A started hub with the image manager and DICOMweb (CORS for ORIGIN), auth required, one token per role."""
    home = tmp_path_factory.mktemp("dicomweb") / "home"
    (home / "channels").mkdir(parents=True)
    init_home(home)
    cfg: Any = loopback_config(load_home(home, environ={"IHEHUB_HTTP_PORT": "0"}))
    dicom = DicomActorConfig(enabled=True, port=0, ae_title="IHEHUB", dicomweb={"cors_origins": [ORIGIN]})
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(cfg.actors, dicom=dicom))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    loop = LoopThread()
    loop.run(hub.start(), timeout=60)
    try:
        tokens = {role: create_token(hub.store, role=role, name=f"test-{role}")
                  for role in ("admin", "operator", "readonly", "auditor")}
        with httpx.Client(timeout=30) as http:
            yield WebHub(hub=hub, tokens=tokens, http=http)
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()
