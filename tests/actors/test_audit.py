"""ATNA from the PIX Manager and PDQ Supplier (ITI TF-2a 3.8.5.1, 3.9.5.1, 3.21.5.1): a hub with the Audit
Record Repository on loopback ports; after a feed and the queries over MLLP, the repository holds the
audits, valid against the DICOM schema and the WUSTL Schematron, with the patient, the sender and MSH-10."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ihehub.atna import AuditMessage, AuditQuery, StoredAudit
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import AtnaConfig, load_channels, load_home
from ihehub.hub import Hub
from tests.actors.support import OPTIONS, a01, qbp22, qbp23, segments
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import CORPUS, free_port, loopback_config


@dataclasses.dataclass
class AuditedHub:
    hub: Hub
    pix_port: int
    pdq_port: int

    def send(self, port: int, *messages: bytes) -> list[bytes]:
        return asyncio.run(mllp_send("127.0.0.1", port, list(messages), timeout=20))

    def records(self, q: AuditQuery, n: int, what: str) -> list[StoredAudit]:
        store = self.hub.audit_store
        wait_for(lambda: len(store.search(q).records) >= n, 10, what)
        return list(store.search(q, with_raw=True).records)


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[AuditedHub]:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    pix_port, pdq_port = free_port(), free_port()
    opts = json.dumps(OPTIONS)
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{pix_port}"}}\nactor: {{name: pix-manager, options: {opts}}}\n',
        encoding="utf-8")
    (home / "channels" / "pdq.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{pdq_port}"}}\nactor: {{name: pdq-supplier, options: {opts}}}\n',
        encoding="utf-8")
    atna = AtnaConfig(schema=CORPUS / "ipf/audit/dicom2017c.xsd", schematron=CORPUS / "wustl/atna-schematron",
                      tcp_port=0)
    cfg = loopback_config(load_home(home), atna=atna)
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, serve_http=False)  # type: ignore[arg-type]
    loop = LoopThread()
    loop.run(hub.start(), timeout=60)
    try:
        yield AuditedHub(hub=hub, pix_port=pix_port, pdq_port=pdq_port)
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()


def _message(rec: StoredAudit) -> AuditMessage:
    xml = rec.xml()
    assert xml is not None
    return AuditMessage.from_xml(xml)


def test_feed_and_queries_are_audited_valid(audited: AuditedHub) -> None:
    feed = a01("F-1", "PA1^^^HOSPA", "WANG^LEI", "19800101")
    assert segments(audited.send(audited.pix_port, feed)[0])["MSA"][0][1] == "AA"
    rsp = audited.send(audited.pix_port, qbp23("Q-1", "PA1^^^HOSPA"))[0]
    assert segments(rsp)["QAK"][0][2] == "OK"
    rsp = audited.send(audited.pdq_port, qbp22("Q-2", "@PID.5.1^WANG", tag="T-2"))[0]
    assert segments(rsp)["QAK"][0][2] == "OK"

    # ITI-8: 110110 Patient Record, action C (A01), the patient and MSH-10, sender at its address
    rec = audited.records(AuditQuery(event_type="ITI-8"), 1, "the ITI-8 audit")[0]
    assert rec.valid and rec.event_id == "110110" and rec.action == "C" and rec.outcome == 0, rec.errors
    msg = _message(rec)
    assert msg.patient_ids() == ["PA1^^^HOSPA&1.2.156.1.1&ISO^PI"]
    assert msg.objects[0].details[0].value == b"F-1"
    src = next(p for p in msg.participants if p.user_id == "SRC|HA")
    assert src.requestor and src.network_id == "127.0.0.1"
    assert any(p.user_id == "HUB|HUB" and not p.requestor and p.alt_user_id for p in msg.participants)

    # ITI-9: 110112 Query with the patient asked for, the QBP in base64 and MSH-10
    rec = audited.records(AuditQuery(event_type="ITI-9"), 1, "the ITI-9 audit")[0]
    assert rec.valid and rec.event_id == "110112" and rec.action == "E", rec.errors
    msg = _message(rec)
    assert msg.patient_ids() == ["PA1^^^HOSPA"]
    query = next(o for o in msg.objects if o.role == 24)
    assert query.query is not None and b"QBP^Q23" in query.query and query.details[0].value == b"Q-1"

    # ITI-21: 110112 with the identifiers of the patient returned
    rec = audited.records(AuditQuery(event_type="ITI-21"), 1, "the ITI-21 audit")[0]
    assert rec.valid and rec.event_id == "110112", rec.errors
    assert "PA1^^^HOSPA&1.2.156.1.1&ISO^PI" in _message(rec).patient_ids()  # with the enterprise id

    # the patient finds all three
    patient = audited.records(AuditQuery(patient="PA1"), 3, "the audits of patient PA1")
    assert {r.event_type for r in patient} == {"ITI-8", "ITI-9", "ITI-21"}


def test_failed_transactions_are_audited_as_failures(audited: AuditedHub) -> None:
    reply = audited.send(audited.pix_port, a01("F-2", "X9^^^NOWHERE", "LI^NA", "19900101"))[0]
    assert segments(reply)["MSA"][0][1] == "AE"
    reply = audited.send(audited.pix_port, qbp23("Q-3", "UNKNOWN^^^HOSPA"))[0]
    assert segments(reply)["MSA"][0][1] == "AE"
    feed = audited.records(AuditQuery(event_type="ITI-8"), 1, "the failed ITI-8 audit")[0]
    assert feed.outcome == 4 and feed.valid, feed.errors
    assert _message(feed).patient_ids() == ["X9^^^NOWHERE"]
    query = audited.records(AuditQuery(event_type="ITI-9"), 1, "the failed ITI-9 audit")[0]
    assert query.outcome == 4 and query.valid, query.errors


class BrokenAudit:
    """An audit service that fails at every call: the transaction must not notice."""

    def me(self, *_a: object, **_k: object) -> object:
        raise RuntimeError("audit service down")

    def emit(self, *_a: object, **_k: object) -> object:
        raise RuntimeError("audit service down")


def test_a_failing_audit_never_fails_the_transaction(audited: AuditedHub, caplog: pytest.LogCaptureFixture) -> None:
    audited.hub.services["audit"] = BrokenAudit()  # the dict the actors' context.extras is
    pix, pdq = audited.pix_port, audited.pdq_port
    assert segments(audited.send(pix, a01("F-3", "PB1^^^HOSPA", "ZHAO^MIN", "19700101"))[0])["MSA"][0][1] == "AA"
    assert segments(audited.send(pix, qbp23("Q-4", "PB1^^^HOSPA"))[0])["QAK"][0][2] == "OK"
    assert segments(audited.send(pdq, qbp22("Q-5", "@PID.5.1^ZHAO", tag="T-5"))[0])["QAK"][0][2] == "OK"
    failures = [r.getMessage() for r in caplog.records if r.name == "ihehub.actors.audit"]
    assert len(failures) == 3 and "ITI-8 of message F-3 was not emitted" in failures[0], failures
