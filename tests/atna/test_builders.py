"""Every entry of the transaction table builds, for each side, a message that passes the DICOM audit schema
and — where the connectathon has rules for it — the WUSTL Schematron of its transaction and EventID."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest

from ihehub.atna import (
    TRANSACTIONS,
    AuditBuildError,
    AuditContext,
    AuditMessage,
    DocumentRef,
    Endpoint,
    StudyRef,
    Validator,
)
from ihehub.atna.transactions import lookup

CX = "MRN-0042^^^HOSP-A&1.2.156.112604.1&ISO"
STUDY = StudyRef(uid="1.2.840.113619.2.55.3.1", accession="ACC-7",
                 sop_classes={"1.2.840.10008.5.1.4.1.1.2": ["1.2.840.113619.2.55.3.1.1", "1.2.840.113619.2.55.3.1.2"]})

# what each entry is given: only the objects its profile uses
ARGS: dict[str, dict[str, Any]] = {
    "ITI-8": {"patients": [CX], "message_id": "ADT0001", "trigger": "A01"},
    "ITI-9": {"patients": [CX], "query": b"MSH|^~\\&|HIS|A|HUB|B|||QBP^Q23|Q1|P|2.5\rQPD|...", "message_id": "Q1"},
    "ITI-10": {"patients": [CX, "P77^^^HOSP-B&1.2.3&ISO"], "message_id": "A31-1"},
    "ITI-21": {"query": b"QBP^Q22 QPD|IHE PDQ Query|Q2|@PID.5.1^ZHANG", "message_id": "Q2"},
    "ITI-22": {"query": b"QBP^ZV1 ...", "message_id": "Q3"},
    "ITI-83": {"patients": [CX], "query": "https://hub/fhir/Patient/$ihe-pix?sourceIdentifier=urn:oid:1.2|X"},
    "ITI-78": {"query": "https://hub/fhir/Patient?family=Zhang"},
    "ITI-18": {"patients": [CX], "query": b"<query:AdhocQueryRequest/>",
               "query_id": "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"},
    "ITI-41": {"patients": [CX], "submission_set": "1.2.3.4.5.6"},
    "ITI-42": {"patients": [CX], "submission_set": "1.2.3.4.5.6"},
    "ITI-43": {"patients": [CX], "documents": [DocumentRef(unique_id="1.2.3.9.1", repository_id="1.2.3.100")]},
    "RAD-68": {"patients": [CX], "submission_set": "1.2.3.4.5.7"},
    "RAD-69": {"patients": [CX], "studies": [STUDY]},
    "DICOM-STORE": {"patients": [CX], "studies": [STUDY]},
    "DICOM-QUERY": {"query": b"\x08\x00\x52\x00...", "query_id": "1.2.840.10008.5.1.4.1.2.2.1"},
    "APP-START": {"user": Endpoint(user_id="root")},
    "APP-STOP": {},
    "LOGIN": {"user": Endpoint(user_id="alice", host="10.0.0.7")},
    "LOGOUT": {"user": Endpoint(user_id="alice", host="10.0.0.7")},
    "SECURITY-ALERT": {"subject": "10.0.0.66:50123", "detail": "TLS handshake failed: unknown ca",
                       "alert": "node-authentication"},
    "EXPORT": {"user": Endpoint(user_id="dr.li"), "patients": [CX], "studies": [STUDY],
               "destination": Endpoint(user_id="https://film.example/share/abc")},
    "PATIENT-RECORD": {"user": Endpoint(user_id="dr.li"), "patients": [CX], "action": "R"},
    "AUDIT-LOG-USED": {"user": Endpoint(user_id="auditor"), "audit_log": "https://hub/api/audit"},
}


def build(audit: AuditContext, peer: Endpoint, key: str, side: str) -> AuditMessage:
    args = dict(ARGS[key])
    if TRANSACTIONS[key].participants == "transfer":
        me = audit.me("IHEHUB|HUB")
        args["source"], args["destination"] = (me, peer) if side == "source" else (peer, me)
    return audit.transaction(key, **args)


def cases() -> list[tuple[str, str]]:
    out = []
    for key, entry in TRANSACTIONS.items():
        for side in ("source", "destination") if entry.participants == "transfer" else ("node",):
            out.append((key, side))
    return out


def test_the_table_covers_the_issue() -> None:
    wanted = {"ITI-8", "ITI-9", "ITI-10", "ITI-21", "ITI-22", "ITI-83", "ITI-78", "ITI-18", "ITI-41", "ITI-42",
              "ITI-43", "RAD-68", "RAD-69", "DICOM-STORE", "DICOM-QUERY", "APP-START", "APP-STOP", "LOGIN",
              "LOGOUT", "SECURITY-ALERT", "EXPORT", "PATIENT-RECORD"}
    assert wanted <= set(TRANSACTIONS)
    assert set(ARGS) == set(TRANSACTIONS)


@pytest.mark.parametrize("key, side", cases())
def test_built_message_passes_schema_and_schematron(key: str, side: str, audit: AuditContext, peer: Endpoint,
                                                    validator: Validator) -> None:
    msg = build(audit, peer, key, side)
    xml = msg.to_xml()
    result = validator.validate(xml)
    assert result.valid, f"{key}/{side}: {result.errors}"
    entry = TRANSACTIONS[key]
    if entry.schematron:  # the connectathon's rules for this transaction ran, and one actor's rules passed
        assert result.rules is not None and result.rules.startswith(entry.schematron), result
    assert AuditMessage.from_xml(xml).to_xml() == xml  # nothing is lost but sub-millisecond time


@pytest.mark.parametrize("key", [k for k, e in TRANSACTIONS.items() if e.participants == "transfer"])
def test_event_id_and_action_follow_the_side(key: str, audit: AuditContext, peer: Endpoint) -> None:
    entry = TRANSACTIONS[key]
    as_source, as_destination = build(audit, peer, key, "source"), build(audit, peer, key, "destination")
    assert as_source.event.event_id == entry.side("source").event_id
    assert as_destination.event.event_id == entry.side("destination").event_id
    local = [p for p in as_source.participants if p.alt_user_id == str(os.getpid())]
    assert len(local) == 1 and local[0].roles[0].code == "110153"
    requestors = [p.roles[0].code for p in as_source.participants if p.requestor]
    assert requestors == (["110153"] if entry.requestor == "source" else ["110152"])


def test_xds_export_and_import(audit: AuditContext, peer: Endpoint) -> None:
    sent = build(audit, peer, "ITI-41", "source")
    received = build(audit, peer, "ITI-41", "destination")
    assert (sent.event.event_id.code, sent.event.action) == ("110106", "R")
    assert (received.event.event_id.code, received.event.action) == ("110107", "C")
    subset = next(o for o in sent.objects if o.role == 20)
    assert subset.id_type.code == "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
    doc = next(o for o in build(audit, peer, "ITI-43", "source").objects if o.role == 3)
    assert {d.type: d.value for d in doc.details} == {"Repository Unique Id": b"1.2.3.100",
                                                       "ihe:homeCommunityID": b"urn:oid:1.2.3.99"}


def test_pix_query_objects(audit: AuditContext, peer: Endpoint) -> None:
    msg = build(audit, peer, "ITI-9", "destination")
    query = next(o for o in msg.objects if o.role == 24)
    assert query.query == ARGS["ITI-9"]["query"]
    assert query.id_type.code == "ITI-9" and query.details[0].type == "MSH-10"
    assert b"<ParticipantObjectQuery>TVNIfF5" in msg.to_xml()  # base64 on the wire
    patient = next(o for o in msg.objects if o.role == 1)
    assert (patient.type_code, patient.object_id, patient.id_type.code) == (1, CX, "2")


def test_iti8_trigger_decides_the_action(audit: AuditContext, peer: Endpoint) -> None:
    me = audit.me()
    for trigger, action in (("A01", "C"), ("a04", "C"), ("A08", "U"), ("A40", "U")):
        msg = audit.transaction("ITI-8", source=peer, destination=me, patients=[CX], message_id="M1", trigger=trigger)
        assert msg.event.action == action
    merge = audit.transaction("ITI-8", source=peer, destination=me, patients=["OLD^^^A"], message_id="M2", action="D")
    assert merge.event.action == "D"
    with pytest.raises(AuditBuildError, match="no audit action for trigger 'A99'"):
        audit.transaction("ITI-8", source=peer, destination=me, patients=[CX], message_id="M1", trigger="A99")


@pytest.mark.parametrize("key, kwargs, match", [
    ("ITI-9", {"patients": [CX], "message_id": "Q"}, "requires: query"),
    ("ITI-8", {"patients": [CX]}, "message_id"),
    ("ITI-41", {"patients": [CX]}, "requires: submission_set"),
    ("ITI-18", {"query": b"q"}, "stored query id"),
    ("ITI-9", {"query": b"q", "patients": [CX], "message_id": "Q", "outcome": 3}, "0, 4, 8, 12"),
    ("ITI-9", {"query": b"q", "patients": [CX], "message_id": "Q", "action": "X"}, "EventActionCode"),
])
def test_missing_or_wrong_arguments_are_programming_errors(key: str, kwargs: dict[str, Any], match: str,
                                                           audit: AuditContext, peer: Endpoint) -> None:
    with pytest.raises(AuditBuildError, match=match):
        audit.transaction(key, source=peer, destination=audit.me(), **kwargs)


def test_the_local_side_must_be_known(audit: AuditContext, peer: Endpoint) -> None:
    with pytest.raises(AuditBuildError, match=r"AuditContext\.me"):
        audit.transaction("ITI-9", source=peer, destination=peer, query=b"q", message_id="Q")
    msg = audit.transaction("ITI-9", source=peer, destination=peer, query=b"q", message_id="Q", side="destination")
    assert msg.event.event_id.code == "110112"
    with pytest.raises(AuditBuildError, match="needs both"):
        audit.transaction("ITI-9", source=peer, query=b"q", message_id="Q")


def test_unknown_keys_suggest_close_ones() -> None:
    assert lookup("iti-09").key == "ITI-9"
    with pytest.raises(KeyError, match="did you mean LOGIN"):
        lookup("LOGN")


def test_emit_hands_the_message_to_every_sink_and_never_raises(peer: Endpoint) -> None:
    got: list[AuditMessage] = []

    def broken(_msg: AuditMessage) -> None:
        raise RuntimeError("repository down")

    audit = AuditContext(source_id="n1", sinks=(broken, got.append),
                         clock=lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    msg = audit.emit("ITI-9", source=peer, destination=audit.me(), query=b"q", message_id="Q", patients=[CX])
    assert msg is not None and got == [msg]  # the broken sink did not stop the next one
    assert msg.event.date_time == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert audit.emit("ITI-9", source=peer) is None  # a build error is logged, not raised
    assert len(got) == 1


def test_failed_login_and_security_alert(audit: AuditContext, validator: Validator) -> None:
    failed = audit.transaction("LOGIN", user=Endpoint(user_id="mallory", host="10.9.9.9"), outcome=4)
    assert failed.event.outcome == 4 and validator.validate(failed.to_xml()).valid
    alert = audit.transaction("SECURITY-ALERT", subject="CN=unknown", detail="certificate unknown", outcome=8,
                              alert="security-configuration")
    assert alert.event.type_codes[0].code == "110129"
    with pytest.raises(AuditBuildError, match="unknown security alert"):
        audit.transaction("SECURITY-ALERT", alert="nonsense")
