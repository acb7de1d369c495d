"""A running hub with a PIX Manager and a PDQ Supplier channel on loopback MLLP, and message builders."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread
from tests.conftest import free_port, loopback_config

CORPUS_HL7 = (Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "ipf" / "hl7v2").resolve()

# the assigning authorities of the corpus samples (several namespaces share an OID there: they resolve by OID)
DOMAINS = [
    {"namespace": "MPI", "universal_id": "2.16.840.1.113883.3.37.4.1.1.2.1.1"},
    {"namespace": "KHKN", "universal_id": "2.16.840.1.113883.3.37.4.1.1.2.611.1"},
    {"namespace": "HZLN", "universal_id": "2.16.840.1.113883.3.37.4.1.1.2.411.1"},
    {"namespace": "CCC", "universal_id": "2.16.840.1.113883.3.37.4.1.1.2.711.1"},
    {"namespace": "HIMSS2005", "universal_id": "1.3.6.1.4.1.21367.2005.1.1"},
    {"namespace": "XREF2005", "universal_id": "1.3.6.1.4.1.21367.2005.1.2"},
    {"namespace": "D1000", "universal_id": "1.2.3.4.5.1000"},
    {"namespace": "domain1", "universal_id": "1.2.3.4.666"},
    {"namespace": "domain2"},
    {"namespace": "HOSPA", "universal_id": "1.2.156.1.1"},
    {"namespace": "HOSPB", "universal_id": "1.2.156.1.2"},
    {"namespace": "CNRIC", "type": "national"},
]
OPTIONS = {
    "domains": DOMAINS,
    "facility_domains": {"ENTERPRISE": "MPI", "ICW": "MPI", "HA": "HOSPA", "HB": "HOSPB"},
    "enterprise": {"namespace": "IHEHUB", "universal_id": "1.2.156.9"},
    "national_id_type": "SSN",  # PID-19 of the (US) corpus samples
}


@dataclasses.dataclass
class Running:
    hub: Hub
    pix_port: int
    pdq_port: int

    def pix(self, *messages: bytes) -> list[bytes]:
        return asyncio.run(mllp_send("127.0.0.1", self.pix_port, list(messages), timeout=20))

    def pdq(self, *messages: bytes) -> list[bytes]:
        return asyncio.run(mllp_send("127.0.0.1", self.pdq_port, list(messages), timeout=20))


@contextmanager
def running_hub(tmp_path: Path, database: str | None = None, options: dict[str, object] | None = None,
                *, http: bool = False) -> Iterator[Running]:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    pix_port, pdq_port = free_port(), free_port()
    opts = json.dumps(options or OPTIONS)
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{pix_port}", options: {{default_charset: "8859/1"}}}}\n'
        f'actor: {{name: pix-manager, options: {opts}}}\n',
        encoding="utf-8")
    (home / "channels" / "pdq.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{pdq_port}"}}\nactor: {{name: pdq-supplier, options: {opts}}}\n',
        encoding="utf-8")
    cfg: Any = loopback_config(load_home(home))  # HTTP and the audit repository on free ports
    if database is not None:
        cfg = dataclasses.replace(cfg, database=database)
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, serve_http=http)
    loop = LoopThread()
    loop.run(hub.start())
    try:
        yield Running(hub=hub, pix_port=pix_port, pdq_port=pdq_port)
    finally:
        loop.run(hub.stop())
        loop.close()


def corpus(name: str) -> bytes:
    return (CORPUS_HL7 / name).read_bytes()


def a01(cid: str, pid3: str, name: str, birth: str, sex: str = "M", *, facility: str = "HA", event: str = "A01",
        version: str = "2.3.1", charset: str = "", encoding: str = "ascii", extra_pid: str = "") -> bytes:
    msh18 = f"||||||{charset}" if charset else ""
    return (f"MSH|^~\\&|SRC|{facility}|HUB|HUB|20261127101500||ADT^{event}|{cid}|P|{version}{msh18}\r"
            f"EVN|{event}|20261127101500\r"
            f"PID|1||{pid3}||{name}||{birth}|{sex}{extra_pid}\rPV1|1|O\r").encode(encoding)


def qbp23(cid: str, qpd3: str, qpd4: str = "", tag: str | None = None) -> bytes:
    return (f"MSH|^~\\&|CONS|CF|HUB|HUB|20261127101500||QBP^Q23^QBP_Q21|{cid}|P|2.5\r"
            f"QPD|IHE PIX Query|{tag or 'T' + cid}|{qpd3}|{qpd4}\rRCP|I\r").encode()


def qbp22(cid: str, qpd3: str, *, tag: str, limit: str = "", qpd8: str = "", dsc: str = "", charset: str = "",
          encoding: str = "ascii") -> bytes:
    msh18 = f"||||||{charset}" if charset else ""
    qpd = f"QPD|IHE PDQ Query|{tag}|{qpd3}" + (f"|||||{qpd8}" if qpd8 else "")
    tail = f"\rDSC|{dsc}|I" if dsc else ""
    return (f"MSH|^~\\&|CONS|CF|HUB|HUB|20261127101500||QBP^Q22^QBP_Q21|{cid}|P|2.5{msh18}\r"
            f"{qpd}\rRCP|I|{limit}{tail}\r").encode(encoding)


def qcn(cid: str, tag: str) -> bytes:
    return (f"MSH|^~\\&|CONS|CF|HUB|HUB|20261127101500||QCN^J01^QCN_J01|{cid}|P|2.5\r"
            f"QID|{tag}|IHE PDQ Query\r").encode()


def segments(reply: bytes, encoding: str = "ascii") -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for s in reply.decode(encoding).split("\r"):
        if s:
            out.setdefault(s[:3], []).append(s.split("|"))
    return out
