"""ITI-81 (ITI TF-2c 3.81): DICOM audit messages as FHIR R4 AuditEvent, and the search parameters."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest

from ihehub.atna import AuditContext, AuditMessage, Endpoint, StoredAudit
from ihehub.atna.fhir import (
    DCM,
    FhirSearchError,
    operation_outcome,
    parse_search,
    record_to_audit_event,
    searchset,
    to_audit_event,
)


def samples(corpus: Path) -> list[Path]:
    return sorted(p for p in (corpus / "ipf" / "audit").glob("*.xml"))


def test_every_corpus_message_converts(corpus: Path) -> None:
    paths = samples(corpus)
    assert len(paths) >= 18
    for path in paths:
        msg = AuditMessage.from_xml(path.read_bytes())
        res = to_audit_event(msg, id="7")
        assert res["resourceType"] == "AuditEvent" and res["id"] == "7", path.name
        assert res["type"]["code"] == msg.event.event_id.code, path.name
        assert res["outcome"] == str(msg.event.outcome)
        assert res["recorded"].endswith("Z") and res["recorded"][:4].isdigit(), path.name
        assert len(res["agent"]) == len(msg.participants) >= 1, path.name
        assert res["source"]["observer"]["identifier"]["value"] == msg.source.source_id
        assert len(res.get("entity", [])) == len(msg.objects), path.name
        for ent, obj in zip(res.get("entity", []), msg.objects, strict=True):
            if obj.query is not None:
                assert base64.b64decode(ent["query"]) == obj.query, path.name


def test_pix_query_sample_maps_field_by_field(corpus: Path) -> None:
    msg = AuditMessage.from_xml((corpus / "ipf" / "audit" / "pixquery.xml").read_bytes())
    res = to_audit_event(msg)
    assert "id" not in res
    assert res["type"] == {"system": DCM, "code": "110112", "display": "Query"}
    assert res["subtype"] == [{"system": "urn:ihe:event-type-code", "code": "ITI-9", "display": "PIX Query"}]
    assert res["action"] == "E" and res["recorded"] == "2020-03-19T12:34:06.367Z" and res["outcome"] == "0"
    src, dst = res["agent"]
    assert src["who"] == {"identifier": {"value": "MESA_DEPARTMENT|MESA_PIX_CLIENT"}} and src["requestor"] is True
    assert src["type"]["coding"][0]["code"] == "110153" and src["network"] == {"address": "127.0.0.1", "type": "2"}
    assert dst["altId"] == "18996" and dst["requestor"] is False
    assert res["source"]["site"] == "PI" and res["source"]["observer"]["identifier"]["value"] == "MPI"
    assert res["source"]["type"][0]["code"] == "9"
    query = res["entity"][0]
    assert query["type"]["code"] == "2" and query["role"]["code"] == "24"
    assert query["what"]["identifier"]["type"]["coding"][0]["code"] == "ITI-9"
    assert base64.b64decode(query["query"]).startswith(b"MSH|")
    assert query["detail"][0]["type"] == "MSH-10"


def test_built_feed_audit_converts_with_patient_and_msh10() -> None:
    audit = AuditContext(source_id="ihehub-test", enterprise_site="HOSP-A", host="10.0.0.5")
    msg = audit.transaction("ITI-8", trigger="A08", source=Endpoint(user_id="HIS|HA", host="10.0.0.9"),
                            destination=audit.me("HUB|HUB"), patients=["P1^^^HOSPA&1.2.156.1.1&ISO"],
                            message_id="MSG-1", time=dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC))
    res = to_audit_event(msg, id="1")
    assert res["type"]["code"] == "110110" and res["action"] == "U" and res["subtype"][0]["code"] == "ITI-8"
    assert res["recorded"] == "2026-11-27T10:00:00.000Z"
    assert [a["requestor"] for a in res["agent"]] == [True, False]
    assert res["agent"][1]["network"]["address"] == "10.0.0.5" and res["agent"][1]["altId"]
    patient = res["entity"][0]
    assert patient["what"]["identifier"]["value"] == "P1^^^HOSPA&1.2.156.1.1&ISO"
    assert patient["type"]["code"] == "1" and patient["role"]["code"] == "1"
    assert base64.b64decode(patient["detail"][0]["valueBase64Binary"]) == b"MSG-1"


def _stored(seq: int, raw: bytes, body_at: int | None = 0, patients: tuple[str, ...] = ()) -> StoredAudit:
    return StoredAudit(seq=seq, received_at=0.0, transport="local", peer=None, tls_subject=None, syslog_host=None,
                       syslog_app=None, syslog_procid=None, syslog_msgid=None, event_id=None, event_type=None,
                       action=None, outcome=None, event_time=None, source_id=None, site_id=None,
                       ids=tuple(("patient", p) for p in patients), valid=False, errors=None, body_at=body_at,
                       size=len(raw), hash="0" * 64, raw=raw)


def test_stored_records_convert_or_say_they_cannot(corpus: Path) -> None:
    xml = (corpus / "ipf" / "audit" / "pixfeed.xml").read_bytes()
    head = b"<14>1 - - - - - - \xef\xbb\xbf"  # the syslog header and the BOM; xml() starts after them
    res = record_to_audit_event(_stored(42, head + xml, body_at=len(head)))
    assert res is not None and res["id"] == "42" and res["type"]["code"] == "110110"
    assert record_to_audit_event(_stored(1, b"not xml at all")) is None
    assert record_to_audit_event(_stored(2, b"<x/>")) is None
    assert record_to_audit_event(_stored(3, b"<!DOCTYPE x [<!ENTITY a 'b'>]><AuditMessage/>")) is None
    assert record_to_audit_event(_stored(4, b"garbage", body_at=None)) is None


def test_search_needs_date_and_reads_its_prefixes() -> None:
    with pytest.raises(FhirSearchError, match="date search parameter is required"):
        parse_search([("outcome", "0")])
    day = dt.datetime(2026, 11, 27, tzinfo=dt.UTC).timestamp()
    q = parse_search([("date", "2026-11-27")]).query
    assert (q.since, q.until) == (day, day + 86400)
    q = parse_search([("date", "ge2026-11-27"), ("date", "lt2026-11-28T06:00:00Z")]).query
    assert (q.since, q.until) == (day, day + 86400 + 6 * 3600)
    q = parse_search([("date", "gt2026-11"), ("date", "le2027")]).query
    assert q.since == dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert q.until == dt.datetime(2028, 1, 1, tzinfo=dt.UTC).timestamp()
    q = parse_search([("date", "ge2026-12"), ("date", "lt2026-12-01T00:00:00.500+01:00")]).query
    assert q.until is not None and q.since is not None and q.until < q.since  # an empty range is not an error
    q = parse_search([("date", "le2026-11-27T10:00")]).query
    assert q.since is None and q.until == day + 10 * 3600 + 60
    for bad, why in [("ne2026-11-27", "prefix 'ne'"), ("2026-13-01", "not a FHIR date"), ("yesterday", "prefix"),
                     ("2026-11-27T25:00:00Z", "not a FHIR date"), ("ge", "not a FHIR date")]:
        with pytest.raises(FhirSearchError, match=why):
            parse_search([("date", bad)])


def test_search_parameters_map_to_the_store_query() -> None:
    fs = parse_search([
        ("date", "ge2026-01-01"), ("patient.identifier", "urn:oid:1.2.156.1.1|P1"), ("agent.identifier", "HIS|HA"),
        ("entity-id", "1.2.3.4"), ("outcome", "4"), ("source", "ihehub-1"),
        ("type", "http://dicom.nema.org/resources/ontology/DCM|110112"), ("subtype", "urn:ihe:event-type-code|ITI-9"),
        ("address", "10.0.0.9"), ("action", "E"), ("_count", "5"), ("_cursor", "1764201600.25:99"),
    ])
    q = fs.query
    assert (q.patient, fs.patient_system, q.user, q.entity) == ("P1", "urn:oid:1.2.156.1.1", "HA", "1.2.3.4")
    assert (q.outcome, q.source, q.event_id, q.event_type) == (4, "ihehub-1", "110112", "ITI-9")
    assert (q.address, q.action, q.limit, q.before, q.before_time) == ("10.0.0.9", "E", 5, 99, 1764201600.25)
    assert q.by_time  # ITI-81: newest event first
    assert ("_cursor", "1764201600.25:99") not in fs.params and ("_count", "5") in fs.params
    assert parse_search([("date", "2026"), ("agent", "alice")]).query.user == "alice"
    assert parse_search([("date", "2026"), ("entity", "P9")]).query.entity == "P9"
    assert parse_search([("date", "2026")]).query.limit == 50
    # FHIR escaping (R4 3.1.1.4.8): an HL7 "APP|FACILITY" user id, a comma inside a value
    assert parse_search([("date", "2026"), ("agent.identifier", "CONS\\|CF")]).query.user == "CONS|CF"
    assert parse_search([("date", "2026"), ("agent", "sys|A\\|B")]).query.user == "A|B"
    assert parse_search([("date", "2026"), ("source", "a\\,b")]).query.source == "a,b"


def test_patient_system_is_checked_on_each_record() -> None:
    fs = parse_search([("date", "2026"), ("patient.identifier", "urn:oid:1.2.156.1.1|P1")])
    assert fs.accepts(_stored(1, b"", patients=("P1^^^HOSPA&1.2.156.1.1&ISO",)))
    assert fs.accepts(_stored(1, b"", patients=("X^^^HOSPB", "P1^^^&1.2.156.1.1&ISO^PI")))
    assert not fs.accepts(_stored(1, b"", patients=("P1^^^HOSPB&1.2.156.1.2&ISO",)))
    assert not fs.accepts(_stored(1, b"", patients=("P1",)))
    by_namespace = parse_search([("date", "2026"), ("patient.identifier", "HOSPA|P1")])
    assert by_namespace.accepts(_stored(1, b"", patients=("P1^^^HOSPA&1.2.156.1.1&ISO",)))
    assert parse_search([("date", "2026"), ("patient.identifier", "P1")]).accepts(_stored(1, b"", patients=("P1",)))


@pytest.mark.parametrize(("items", "why"), [
    ([("date", "2026"), ("patient", "Patient/1")], "unknown search parameter 'patient'"),
    ([("date", "2026"), ("outcome", "3")], "not an AuditEventOutcome"),
    ([("date", "2026"), ("action", "X")], "not an AuditEventAction"),
    ([("date", "2026"), ("_count", "0")], "_count"),
    ([("date", "2026"), ("_count", "1001")], "_count"),
    ([("date", "2026"), ("_count", "ten")], "_count"),
    ([("date", "2026"), ("_cursor", "x")], "page cursor"),
    ([("date", "2026"), ("_cursor", "99")], "page cursor"),
    ([("date", "2026"), ("_cursor", "nan:99")], "page cursor"),
    ([("date", "2026"), ("source", "a"), ("source", "b")], "once"),
    ([("date", "2026"), ("outcome", "0,4")], "several values"),
    ([("date", "2026"), ("agent", "a"), ("agent.identifier", "b")], "not both"),
    ([("date", "2026"), ("entity", "a"), ("entity-id", "b")], "not both"),
    ([("date", "2026"), ("patient.identifier", "sys|")], "needs a value"),
    ([("date", "")], "date is empty"),
])
def test_searches_that_cannot_run_say_why(items: list[tuple[str, str]], why: str) -> None:
    with pytest.raises(FhirSearchError, match=why):
        parse_search(items)


def test_bundle_and_operation_outcome_shapes() -> None:
    b = searchset([{"resourceType": "AuditEvent", "id": "3"}], base="http://h/fhir", self_url="http://h/fhir/AuditEvent",
                  next_url="http://h/fhir/AuditEvent?_cursor=3", notes=["record 9 unreadable"])
    assert b["resourceType"] == "Bundle" and b["type"] == "searchset"
    assert [link["relation"] for link in b["link"]] == ["self", "next"]
    assert b["entry"][0]["fullUrl"] == "http://h/fhir/AuditEvent/3" and b["entry"][0]["search"]["mode"] == "match"
    assert b["entry"][1]["search"]["mode"] == "outcome"
    assert searchset([], base="b", self_url="s", next_url=None)["link"] == [{"relation": "self", "url": "s"}]
    oo = operation_outcome("no date")
    assert oo["resourceType"] == "OperationOutcome" and oo["issue"][0]["code"] == "invalid"
