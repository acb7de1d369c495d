"""ITI-18 parameter syntax (ITI TF-2a 3.18.4.1.2.3.4-6) and the stored query errors (3.18.4.1.3): each bad
request gets status Failure with the IHE error code and the parameter named; responses valid per query.xsd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from ihehub.bus.db import make_engine
from ihehub.xds.errors import FAILURE, XdsFailure
from ihehub.xds.query import QUERY_IDS, StoredQueries
from ihehub.xds.query_params import join_split_lists, parse_code, split_values
from tests.xds.query_fixtures import E, adhoc, errors, ids, open_registry, q, ql

SCHEMA = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "nist" / "schema" / "query.xsd"
PID = q("P1^^^&1.2.156.112604.1&ISO")
APPROVED = ql(E.APPROVED)


@pytest.fixture(scope="module")
def xsd() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMA.resolve())))


@pytest.fixture(scope="module")
def sq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoredQueries]:
    engine = open_registry(f"sqlite:///{tmp_path_factory.mktemp('xdsp')}/registry.sqlite")
    yield StoredQueries(engine)
    engine.dispose()


def test_split_values() -> None:
    assert split_values("'abc'", "$p") == ["abc"]
    assert split_values(" ('a', 'b' ,'c') ", "$p") == ["a", "b", "c"]
    assert split_values("('it''s', 'x,y')", "$p") == ["it's", "x,y"]
    assert split_values("200412252300", "$p") == ["200412252300"]
    assert split_values("(1, 2)", "$p") == ["1", "2"]
    assert split_values("'a)'", "$p") == ["a)"]
    assert split_values("('患者甲')", "$p") == ["患者甲"]
    for bad in ("('a'", "'a", "('a' 'b')", "('a',)", "'a' 'b'", "(abc)", "a)", ""):
        with pytest.raises(XdsFailure) as info:
            split_values(bad, "$p")
        assert info.value.errors[0].code == "XDSRegistryError" and info.value.errors[0].location == "$p", bad


def test_join_split_lists() -> None:
    assert join_split_lists(["('a',", "'b')", "('c')", "'d'"]) == ["('a','b')", "('c')", "'d'"]
    assert join_split_lists(["('a',", "'b',", "'c')"]) == ["('a','b','c')"]
    assert join_split_lists(["('a',"]) == ["('a',"]


def test_parse_code() -> None:
    assert parse_code("11490-0^^2.16.840.1.113883.6.1", "$c") == ("11490-0", "2.16.840.1.113883.6.1")
    assert parse_code("11490-0^Discharge^LOINC", "$c") == ("11490-0", "LOINC")
    assert parse_code("11490-0^^^LOINC", "$c") == ("11490-0", "LOINC")
    assert parse_code("^^blah", "$c") == ("", "blah")
    for bad in ("Dialysis", "a^^", "a^b"):
        with pytest.raises(XdsFailure):
            parse_code(bad, "$c")


def check(sq: StoredQueries, xsd: etree.XMLSchema, request: etree._Element) -> list[tuple[str, str]]:
    response = sq.run(request)
    xsd.assertValid(response)
    assert response.get("status") == FAILURE
    assert ids(response) == []
    return errors(response)


def test_unknown_stored_query(sq: StoredQueries, xsd: etree.XMLSchema) -> None:
    bad = "urn:uuid:00000000-0000-0000-0000-000000000000"
    assert check(sq, xsd, adhoc(bad, {"$XDSDocumentEntryPatientId": PID})) == [("XDSUnknownStoredQuery", bad)]


def test_missing_parameters(sq: StoredQueries, xsd: etree.XMLSchema) -> None:
    assert check(sq, xsd, adhoc("FindDocuments", {"$XDSDocumentEntryStatus": APPROVED})) == \
        [("XDSStoredQueryMissingParam", "$XDSDocumentEntryPatientId")]
    assert check(sq, xsd, adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": PID})) == \
        [("XDSStoredQueryMissingParam", "$XDSDocumentEntryStatus")]
    assert sorted(check(sq, xsd, adhoc("GetAll", {"$patientId": PID}))) == [
        ("XDSStoredQueryMissingParam", "$XDSDocumentEntryStatus"), ("XDSStoredQueryMissingParam", "$XDSFolderStatus"),
        ("XDSStoredQueryMissingParam", "$XDSSubmissionSetStatus")]
    # either $XDSDocumentEntryEntryUUID or $XDSDocumentEntryUniqueId
    assert check(sq, xsd, adhoc("GetDocuments", {})) == [("XDSStoredQueryMissingParam", "$XDSDocumentEntryEntryUUID")]
    assert check(sq, xsd, adhoc("GetRelatedDocuments", {"$XDSDocumentEntryUniqueId": q("1.2")})) == \
        [("XDSStoredQueryMissingParam", "$AssociationTypes")]
    assert check(sq, xsd, adhoc("GetAssociations", {})) == [("XDSStoredQueryMissingParam", "$uuid")]


def test_param_number(sq: StoredQueries, xsd: etree.XMLSchema) -> None:
    # a single-valued parameter: a list of two, two Values, two Slots
    for params in ({"$XDSDocumentEntryPatientId": ql("P1", "P2"), "$XDSDocumentEntryStatus": APPROVED},
                   {"$XDSDocumentEntryPatientId": [q("P1"), q("P2")], "$XDSDocumentEntryStatus": APPROVED},
                   [("$XDSDocumentEntryPatientId", PID), ("$XDSDocumentEntryPatientId", PID),
                    ("$XDSDocumentEntryStatus", APPROVED)]):
        assert check(sq, xsd, adhoc("FindDocuments", params)) == \
            [("XDSStoredQueryParamNumber", "$XDSDocumentEntryPatientId")]
    times = {"$XDSDocumentEntryPatientId": PID, "$XDSDocumentEntryStatus": APPROVED,
             "$XDSDocumentEntryCreationTimeFrom": "(2004, 2005)"}
    assert check(sq, xsd, adhoc("FindDocuments", times)) == \
        [("XDSStoredQueryParamNumber", "$XDSDocumentEntryCreationTimeFrom")]
    # a multi-valued parameter without AND/OR semantics repeated as Slots
    repeated = [("$XDSDocumentEntryPatientId", PID), ("$XDSDocumentEntryStatus", APPROVED),
                ("$XDSDocumentEntryClassCode", ql("a^^b")), ("$XDSDocumentEntryClassCode", ql("c^^d"))]
    assert check(sq, xsd, adhoc("FindDocuments", repeated)) == \
        [("XDSStoredQueryParamNumber", "$XDSDocumentEntryClassCode")]
    both = {"$XDSDocumentEntryEntryUUID": ql("urn:uuid:1"), "$XDSDocumentEntryUniqueId": ql("1.2")}
    assert check(sq, xsd, adhoc("GetDocuments", both)) == [("XDSStoredQueryParamNumber", "$XDSDocumentEntryUniqueId")]
    one = {"$XDSSubmissionSetEntryUUID": ql("urn:uuid:1", "urn:uuid:2")}
    assert check(sq, xsd, adhoc("GetSubmissionSetAndContents", one)) == \
        [("XDSStoredQueryParamNumber", "$XDSSubmissionSetEntryUUID")]


def test_malformed_values(sq: StoredQueries, xsd: etree.XMLSchema) -> None:
    base = {"$XDSDocumentEntryPatientId": PID, "$XDSDocumentEntryStatus": APPROVED}
    cases = {
        "$XDSDocumentEntryPracticeSettingCode": ql("Dialysis"),  # old format: no coding scheme
        "$XDSDocumentEntryClassCode": ql("Communication^^Connect-a-thon classCodes", "a^^"),
        "$XDSDocumentEntryCreationTimeFrom": "2004-01-01",
        "$XDSDocumentEntryServiceStopTimeTo": "20041",
        "$XDSDocumentEntryType": ql("urn:uuid:not-a-type"),
        "$XDSDocumentEntryAuthorPerson": "('%Smith%'",
        "$XDSDocumentEntryEventCodeList": ql(""),
    }
    for name, value in cases.items():
        assert check(sq, xsd, adhoc("FindDocuments", {**base, name: value})) == [("XDSRegistryError", name)], name
    # several problems are all reported
    got = check(sq, xsd, adhoc("FindDocuments", {"$XDSDocumentEntryStatus": APPROVED,
                                                 "$XDSDocumentEntryCreationTimeTo": "'x'"}))
    assert sorted(got) == [("XDSRegistryError", "$XDSDocumentEntryCreationTimeTo"),
                           ("XDSStoredQueryMissingParam", "$XDSDocumentEntryPatientId")]


def test_bad_requests(sq: StoredQueries, xsd: etree.XMLSchema) -> None:
    request = adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": PID, "$XDSDocumentEntryStatus": APPROVED},
                    return_type="Everything")
    assert check(sq, xsd, request) == [("XDSRegistryError", "returnType")]
    not_a_query = etree.Element("{urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0}SubmitObjectsRequest")
    assert check(sq, xsd, not_a_query)[0][0] == "XDSRegistryError"
    empty = etree.Element("{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}AdhocQueryRequest")
    assert check(sq, xsd, empty)[0][0] == "XDSRegistryError"


def test_request_id_and_empty_result(sq: StoredQueries, xsd: etree.XMLSchema) -> None:
    request = adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": PID, "$XDSDocumentEntryStatus": APPROVED})
    request.set("id", "urn:uuid:req-1")
    response = sq.run(request)
    xsd.assertValid(response)
    assert response.get("requestId") == "urn:uuid:req-1"
    assert response.get("status") == "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    assert ids(response) == []


def test_sixteen_queries() -> None:
    assert len(QUERY_IDS) == 16 and len(set(QUERY_IDS.values())) == 16
    assert StoredQueries.QUERY_IDS is QUERY_IDS


def test_database_error_is_a_registry_error(tmp_path: Path, xsd: etree.XMLSchema) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/empty.sqlite")  # no tables at all
    try:
        request = adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": PID, "$XDSDocumentEntryStatus": APPROVED})
        assert check(StoredQueries(engine), xsd, request)[0][0] == "XDSRegistryError"
    finally:
        engine.dispose()
