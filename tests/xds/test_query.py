"""ITI-18 Registry Stored Query: every stored query of ITI TF-2a 3.18.4.1.2.3.7 against registry content
written into the XDS tables, on SQLite and PostgreSQL; every response validated against query.xsd."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import Engine, update

from ihehub.xds import tables as t
from ihehub.xds.errors import FAILURE, SUCCESS
from ihehub.xds.query import StoredQueries
from ihehub.xds.query_bench import bench_find_documents, load_documents, patient_id
from tests.xds.query_fixtures import (
    CONF,
    LOINC,
    Doc,
    E,
    RegistryContent,
    Slots,
    adhoc,
    by_tag,
    errors,
    ids,
    open_registry,
    own_pg_database,
    q,
    ql,
)

SCHEMA = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "nist" / "schema" / "query.xsd"
EV = "1.2.156.112604.77"  # event code system
FC = "1.2.156.112604.78"  # folder code system
DICOM_KOS = ("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1")


@pytest.fixture(scope="module")
def xsd() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMA.resolve())))


@dataclass
class Scenario:
    """Two patients' registry content (see :func:`build`)."""

    engine: Engine
    sq: StoredQueries
    a: str  # patient ids
    b: str
    docs: dict[str, Doc] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    assocs: dict[str, str] = field(default_factory=dict)

    def uuids(self, *names: str) -> set[str]:
        return {self.docs[n].entry_uuid for n in names}


def build(engine: Engine) -> Scenario:
    """Patient A: a1 (discharge summary, events E1+E2), a2 (KOS, events E1, confidentiality N+R), a3
    (deprecated, replaced by a4 through RPLC), a4 (creationTime at year precision), a5 (on-demand).
    Patient B: b1.  SubmissionSets s1 (a1, a2, folder f1 and f1's member link), s2 (a3), s3 (a4 + RPLC),
    sb (b1); folders f1 (codes C1, C2; holds a1), f2 (code C2), fb (patient B, code C1)."""
    tok = secrets.token_hex(4)
    a, b = f"A{tok}^^^&1.2.156.112604.1&ISO", f"B{tok}^^^&1.2.156.112604.1&ISO"
    rc = RegistryContent(engine)
    s = Scenario(engine=engine, sq=StoredQueries(engine), a=a, b=b)
    s.docs["a1"] = rc.document(Doc(a, title="出院小结（张三）", events=[("E1", EV), ("E2", EV)],
                                   authors=["^王^小明^^^^^^&1.2.156&ISO"], creation_time="20240115103000",
                                   service_start="20240110", service_stop="20240114",
                                   reference_ids=["ORD-1^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:order"]))
    s.docs["a2"] = rc.document(Doc(a, title="CT 胸部", class_code=("18748-4", LOINC), events=[("E1", EV)],
                                   confidentiality=[("N", CONF), ("R", CONF)], authors=["^李^四^^^"],
                                   creation_time="2024021208", format_code=DICOM_KOS, mime_type="application/dicom",
                                   service_start="20240201", service_stop="20240212",
                                   reference_ids=["ORD-2^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:order",
                                                  "ACC-9^^^&1.2.4&ISO^urn:ihe:iti:xds:2013:accession"]))
    s.docs["a3"] = rc.document(Doc(a, title="旧版", status=E.DEPRECATED, creation_time="20231231235959"))
    s.docs["a4"] = rc.document(Doc(a, title="新版", creation_time="2024", authors=["^O'Brien^Pat^^^"]))
    s.docs["a5"] = rc.document(Doc(a, title="按需文档", object_type=E.DE_OBJECT_TYPE_ON_DEMAND, creation_time=None))
    s.docs["b1"] = rc.document(Doc(b, title="病人乙", events=[("E1", EV)]))
    s.folders["f1"] = rc.folder(a, codes=[("C1", FC), ("C2", FC)], last_update="20240116080000")
    s.folders["f2"] = rc.folder(a, codes=[("C2", FC)], last_update="20240301")
    s.folders["fb"] = rc.folder(b, codes=[("C1", FC)])
    s.sets["s1"] = rc.submission_set(a, submission_time="20240115110000", authors=["^王^小明^^^"],
                                     source_id="1.2.156.112604.5.1")
    s.sets["s2"] = rc.submission_set(a, submission_time="20231231", nested=True, source_id="1.2.156.112604.5.2",
                                     content_type=("11488-4", LOINC))
    s.sets["s3"] = rc.submission_set(a, submission_time="20240120")
    s.sets["sb"] = rc.submission_set(b)
    hm = E.ASSOC_HAS_MEMBER
    for name in ("a1", "a2"):
        s.assocs[f"s1-{name}"] = rc.associate(hm, s.sets["s1"], s.docs[name].entry_uuid, member_status="Original")
    s.assocs["s1-f1"] = rc.associate(hm, s.sets["s1"], s.folders["f1"])
    s.assocs["f1-a1"] = rc.associate(hm, s.folders["f1"], s.docs["a1"].entry_uuid)
    s.assocs["s1-(f1-a1)"] = rc.associate(hm, s.sets["s1"], s.assocs["f1-a1"])
    s.assocs["s2-a3"] = rc.associate(hm, s.sets["s2"], s.docs["a3"].entry_uuid, member_status="Original")
    s.assocs["s3-a4"] = rc.associate(hm, s.sets["s3"], s.docs["a4"].entry_uuid, member_status="Original")
    s.assocs["a4-rplc-a3"] = rc.associate(E.ASSOC_RPLC, s.docs["a4"].entry_uuid, s.docs["a3"].entry_uuid)
    s.assocs["sb-b1"] = rc.associate(hm, s.sets["sb"], s.docs["b1"].entry_uuid, member_status="Original")
    s.assocs["s3-a5"] = rc.associate(hm, s.sets["s3"], s.docs["a5"].entry_uuid, member_status="Original")
    return s


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def reg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('xdsq')}/registry.sqlite"
        else:
            request.getfixturevalue("pg_url")  # fails with the start command when PostgreSQL is down
            url = stack.enter_context(own_pg_database())
        engine = open_registry(url)
        stack.callback(engine.dispose)
        yield build(engine)


def run(reg: Scenario, xsd: etree.XMLSchema, query: str, params: Slots, *, status: str = SUCCESS,
        sq: StoredQueries | None = None, return_type: str = "LeafClass", home: str | None = None) -> etree._Element:
    response = (sq or reg.sq).run(adhoc(query, params, return_type=return_type, home=home))
    xsd.assertValid(response)
    assert response.get("status") == status, etree.tostring(response, encoding="unicode")[:2000]
    return response


def find_docs(reg: Scenario, xsd: etree.XMLSchema, *extra: tuple[str, str | list[str]],
              statuses: tuple[str, ...] = (E.APPROVED,), return_type: str = "ObjectRef") -> set[str]:
    params = [("$XDSDocumentEntryPatientId", q(reg.a)), ("$XDSDocumentEntryStatus", ql(*statuses)), *extra]
    return set(ids(run(reg, xsd, "FindDocuments", params, return_type=return_type)))


# ------------------------------------------------------------------ FindDocuments


def test_find_documents_status_and_return_types(reg: Scenario, xsd: etree.XMLSchema) -> None:
    assert find_docs(reg, xsd) == reg.uuids("a1", "a2", "a4")  # a3 deprecated, a5 on-demand
    assert find_docs(reg, xsd, statuses=(E.DEPRECATED,)) == reg.uuids("a3")
    assert find_docs(reg, xsd, statuses=(E.APPROVED, E.DEPRECATED)) == reg.uuids("a1", "a2", "a3", "a4")
    refs = run(reg, xsd, "FindDocuments", {"$XDSDocumentEntryPatientId": q(reg.a),
                                           "$XDSDocumentEntryStatus": ql(E.APPROVED)}, return_type="ObjectRef")
    assert set(by_tag(refs)) == {"ObjectRef"}
    leaf = run(reg, xsd, "FindDocuments", {"$XDSDocumentEntryPatientId": q(reg.a),
                                           "$XDSDocumentEntryStatus": ql(E.APPROVED)}, return_type="LeafClass")
    assert by_tag(leaf) == {"ExtrinsicObject": reg.uuids("a1", "a2", "a4")}
    titles = {e.get("value") for e in leaf.iter("{*}LocalizedString")}
    assert {"出院小结（张三）", "CT 胸部", "新版"} <= titles
    assert "出院小结（张三）".encode() in etree.tostring(leaf, encoding="utf-8")


def test_find_documents_object_type(reg: Scenario, xsd: etree.XMLSchema) -> None:
    on_demand = ("$XDSDocumentEntryType", ql(E.DE_OBJECT_TYPE_ON_DEMAND))
    assert find_docs(reg, xsd, on_demand) == reg.uuids("a5")
    both = ("$XDSDocumentEntryType", ql(E.DE_OBJECT_TYPE_STABLE, E.DE_OBJECT_TYPE_ON_DEMAND))
    assert find_docs(reg, xsd, both) == reg.uuids("a1", "a2", "a4", "a5")


def test_find_documents_codes_or_within_a_list(reg: Scenario, xsd: etree.XMLSchema) -> None:
    cls = "$XDSDocumentEntryClassCode"
    assert find_docs(reg, xsd, (cls, ql(f"18748-4^^{LOINC}"))) == reg.uuids("a2")
    assert find_docs(reg, xsd, (cls, ql(f"18748-4^^{LOINC}", f"11490-0^^{LOINC}"))) == reg.uuids("a1", "a2", "a4")
    # one list spread over several Value elements (ITI TF-2a 3.18.4.1.2.3.5)
    assert find_docs(reg, xsd, (cls, [f"('18748-4^^{LOINC}',", f"'11490-0^^{LOINC}')"])) == \
        reg.uuids("a1", "a2", "a4")
    assert find_docs(reg, xsd, (cls, [ql(f"18748-4^^{LOINC}"), ql(f"11490-0^^{LOINC}")])) == \
        reg.uuids("a1", "a2", "a4")
    # the coding scheme counts; code^^^scheme is read too; an empty code matches nothing
    assert find_docs(reg, xsd, (cls, ql("18748-4^^9.9.9"))) == set()
    assert find_docs(reg, xsd, (cls, ql(f"18748-4^^^{LOINC}"))) == reg.uuids("a2")
    assert find_docs(reg, xsd, (cls, ql(f"^^{LOINC}"))) == set()
    # several code parameters are ANDed
    kos = f"{DICOM_KOS[0]}^^{DICOM_KOS[1]}"
    assert find_docs(reg, xsd, (cls, ql(f"11490-0^^{LOINC}")), ("$XDSDocumentEntryFormatCode", ql(kos))) == set()
    assert find_docs(reg, xsd, ("$XDSDocumentEntryFormatCode", ql(kos))) == reg.uuids("a2")
    for name, code in (("$XDSDocumentEntryTypeCode", f"18842-5^^{LOINC}"),
                       ("$XDSDocumentEntryPracticeSettingCode", "394802001^^2.16.840.1.113883.6.96"),
                       ("$XDSDocumentEntryHealthcareFacilityTypeCode", "225732001^^2.16.840.1.113883.6.96")):
        assert find_docs(reg, xsd, (name, ql(code))) == reg.uuids("a1", "a2", "a4"), name


def test_find_documents_event_codes_and_or(reg: Scenario, xsd: etree.XMLSchema) -> None:
    ev = "$XDSDocumentEntryEventCodeList"
    assert find_docs(reg, xsd, (ev, ql(f"E2^^{EV}"))) == reg.uuids("a1")
    assert find_docs(reg, xsd, (ev, ql(f"E1^^{EV}", f"E2^^{EV}"))) == reg.uuids("a1", "a2")  # OR
    assert find_docs(reg, xsd, (ev, ql(f"E1^^{EV}")), (ev, ql(f"E2^^{EV}"))) == reg.uuids("a1")  # AND
    # (E2 or E9) and (E1): a1 only; (E9) and (E1): none
    assert find_docs(reg, xsd, (ev, ql(f"E2^^{EV}", f"E9^^{EV}")), (ev, ql(f"E1^^{EV}"))) == reg.uuids("a1")
    assert find_docs(reg, xsd, (ev, ql(f"E9^^{EV}")), (ev, ql(f"E1^^{EV}"))) == set()
    conf = "$XDSDocumentEntryConfidentialityCode"
    assert find_docs(reg, xsd, (conf, ql(f"N^^{CONF}"))) == reg.uuids("a1", "a2", "a4")
    assert find_docs(reg, xsd, (conf, ql(f"N^^{CONF}")), (conf, ql(f"R^^{CONF}"))) == reg.uuids("a2")


def test_find_documents_time_ranges(reg: Scenario, xsd: etree.XMLSchema) -> None:
    ct_from, ct_to = "$XDSDocumentEntryCreationTimeFrom", "$XDSDocumentEntryCreationTimeTo"
    # From inclusive, To exclusive, compared at the shorter precision
    assert find_docs(reg, xsd, (ct_from, "20240115103000"), (ct_to, "20240115103001")) == reg.uuids("a1")
    assert find_docs(reg, xsd, (ct_from, "20240115"), (ct_to, "20240115")) == set()
    assert find_docs(reg, xsd, (ct_from, "20240115"), (ct_to, "20240116")) == reg.uuids("a1")
    # a4's creationTime is 2024 (year precision): 2024 >= 202402 at year precision
    assert find_docs(reg, xsd, (ct_from, "202402")) == reg.uuids("a2", "a4")
    assert find_docs(reg, xsd, (ct_to, "2024"), statuses=(E.APPROVED, E.DEPRECATED)) == reg.uuids("a3")
    assert find_docs(reg, xsd, (ct_from, "2024"), (ct_to, "2025")) == reg.uuids("a1", "a2", "a4")
    # service times
    assert find_docs(reg, xsd, ("$XDSDocumentEntryServiceStartTimeFrom", "20240201")) == reg.uuids("a2")
    assert find_docs(reg, xsd, ("$XDSDocumentEntryServiceStartTimeTo", "20240201")) == reg.uuids("a1")
    assert find_docs(reg, xsd, ("$XDSDocumentEntryServiceStopTimeFrom", "20240114"),
                     ("$XDSDocumentEntryServiceStopTimeTo", "20240115")) == reg.uuids("a1")
    # a quoted time is read as well
    assert find_docs(reg, xsd, (ct_from, "'20240115'"), (ct_to, "'20240116'")) == reg.uuids("a1")


def test_find_documents_author_like(reg: Scenario, xsd: etree.XMLSchema) -> None:
    au = "$XDSDocumentEntryAuthorPerson"
    assert find_docs(reg, xsd, (au, ql("%王%"))) == reg.uuids("a1")
    assert find_docs(reg, xsd, (au, ql("^_^四%"))) == reg.uuids("a2")
    assert find_docs(reg, xsd, (au, ql("%王%", "%李%"))) == reg.uuids("a1", "a2")
    assert find_docs(reg, xsd, (au, ql("%O'Brien%"))) == reg.uuids("a4")  # a quote doubled inside a string
    assert find_docs(reg, xsd, (au, ql("王"))) == set()


def test_find_documents_ignores_unknown_parameters(reg: Scenario, xsd: etree.XMLSchema) -> None:
    # ITI TF-2a / NIST 11897: extra (e.g. the old ...CodeScheme) parameters are accepted and ignored
    assert find_docs(reg, xsd, ("$XDSDocumentEntryClassCodeScheme", ql("whatever"))) == reg.uuids("a1", "a2", "a4")


def test_find_documents_by_reference_id(reg: Scenario, xsd: etree.XMLSchema) -> None:
    ref1, ref2 = "ORD-1^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:order", "ORD-2^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:order"
    acc = "ACC-9^^^&1.2.4&ISO^urn:ihe:iti:xds:2013:accession"

    def find(*slots: tuple[str, str]) -> set[str]:
        params = [("$XDSDocumentEntryPatientId", q(reg.a)), ("$XDSDocumentEntryStatus", ql(E.APPROVED)), *slots]
        return set(ids(run(reg, xsd, "FindDocumentsByReferenceId", params)))

    assert find(("$XDSDocumentEntryReferenceIdList", ql(ref1))) == reg.uuids("a1")
    assert find(("$XDSDocumentEntryReferenceIdList", ql(ref1, ref2))) == reg.uuids("a1", "a2")
    assert find(("$XDSDocumentEntryReferenceIdList", ql(ref2)),
                ("$XDSDocumentEntryReferenceIdList", ql(acc))) == reg.uuids("a2")
    assert find(("$XDSDocumentEntryReferenceIdList", ql(ref1)),
                ("$XDSDocumentEntryReferenceIdList", ql(acc))) == set()
    assert find(("$XDSDocumentEntryReferenceIdList", ql(ref1, ref2)),
                ("$XDSDocumentEntryClassCode", ql(f"18748-4^^{LOINC}"))) == reg.uuids("a2")
    missing = run(reg, xsd, "FindDocumentsByReferenceId", {"$XDSDocumentEntryPatientId": q(reg.a),
                                                           "$XDSDocumentEntryStatus": ql(E.APPROVED)},
                  status=FAILURE)
    assert errors(missing) == [("XDSStoredQueryMissingParam", "$XDSDocumentEntryReferenceIdList")]


def test_find_documents_for_multiple_patients(reg: Scenario, xsd: etree.XMLSchema) -> None:
    def find(*slots: tuple[str, str]) -> set[str]:
        params = [("$XDSDocumentEntryStatus", ql(E.APPROVED)), *slots]
        return set(ids(run(reg, xsd, "FindDocumentsForMultiplePatients", params)))

    ev = ("$XDSDocumentEntryEventCodeList", ql(f"E1^^{EV}"))
    assert find(("$XDSDocumentEntryPatientId", ql(reg.a, reg.b)), ev) == reg.uuids("a1", "a2", "b1")
    assert find(("$XDSDocumentEntryPatientId", ql(reg.b)), ev) == reg.uuids("b1")
    assert reg.uuids("a1", "a2", "b1") <= find(ev)  # no patient: every patient's
    response = run(reg, xsd, "FindDocumentsForMultiplePatients",
                   {"$XDSDocumentEntryPatientId": ql(reg.a), "$XDSDocumentEntryStatus": ql(E.APPROVED)},
                   status=FAILURE)
    assert errors(response)[0][0] == "XDSStoredQueryMissingParam"


# ------------------------------------------------------------------ SubmissionSets and Folders


def test_find_submission_sets(reg: Scenario, xsd: etree.XMLSchema) -> None:
    def find(*slots: tuple[str, str]) -> set[str]:
        params = [("$XDSSubmissionSetPatientId", q(reg.a)), ("$XDSSubmissionSetStatus", ql(E.APPROVED)), *slots]
        return set(ids(run(reg, xsd, "FindSubmissionSets", params)))

    s = reg.sets
    assert find() == {s["s1"], s["s2"], s["s3"]}
    assert find(("$XDSSubmissionSetSourceId", ql("1.2.156.112604.5.1", "1.2.156.112604.5.2"))) == {s["s1"], s["s2"]}
    assert find(("$XDSSubmissionSetSubmissionTimeFrom", "2024"),
                ("$XDSSubmissionSetSubmissionTimeTo", "20240120")) == {s["s1"]}
    assert find(("$XDSSubmissionSetAuthorPerson", q("%王%"))) == {s["s1"]}
    assert find(("$XDSSubmissionSetContentType", ql(f"11488-4^^{LOINC}"))) == {s["s2"]}


def test_find_folders(reg: Scenario, xsd: etree.XMLSchema) -> None:
    def find(*slots: tuple[str, str], query: str = "FindFolders", patient: str | None = None) -> set[str]:
        params = [("$XDSFolderPatientId", q(patient or reg.a)), ("$XDSFolderStatus", ql(E.APPROVED)), *slots]
        return set(ids(run(reg, xsd, query, params)))

    f = reg.folders
    assert find() == {f["f1"], f["f2"]}
    cl = "$XDSFolderCodeList"
    assert find((cl, ql(f"C2^^{FC}"))) == {f["f1"], f["f2"]}
    assert find((cl, ql(f"C1^^{FC}")), (cl, ql(f"C2^^{FC}"))) == {f["f1"]}  # AND
    assert find((cl, ql(f"C1^^{FC}", f"C9^^{FC}"))) == {f["f1"]}  # OR
    assert find(("$XDSFolderLastUpdateTimeFrom", "202403")) == {f["f2"]}
    assert find(("$XDSFolderLastUpdateTimeTo", "202403")) == {f["f1"]}
    multi = set(ids(run(reg, xsd, "FindFoldersForMultiplePatients", [
        ("$XDSFolderPatientId", ql(reg.a, reg.b)), ("$XDSFolderStatus", ql(E.APPROVED)), (cl, ql(f"C1^^{FC}"))])))
    assert multi == {f["f1"], f["fb"]}


# ------------------------------------------------------------------ GetAll and the Get queries


def test_get_all(reg: Scenario, xsd: etree.XMLSchema) -> None:
    approved = ql(E.APPROVED)
    response = run(reg, xsd, "GetAll", {"$patientId": q(reg.a), "$XDSDocumentEntryStatus": ql(E.APPROVED, E.DEPRECATED),
                                        "$XDSSubmissionSetStatus": approved, "$XDSFolderStatus": approved})
    tags = by_tag(response)
    assert tags["ExtrinsicObject"] == reg.uuids("a1", "a2", "a3", "a4")
    assert tags["RegistryPackage"] == set(reg.sets.values()) - {reg.sets["sb"]} | {reg.folders["f1"], reg.folders["f2"]}
    a = reg.assocs
    assert tags["Association"] == {a[k] for k in ("s1-a1", "s1-a2", "s1-f1", "f1-a1", "s1-(f1-a1)", "s2-a3",
                                                  "s3-a4", "a4-rplc-a3")}
    # only deprecated documents, KOS format filter
    response = run(reg, xsd, "GetAll", {"$patientId": q(reg.a), "$XDSDocumentEntryStatus": approved,
                                        "$XDSSubmissionSetStatus": approved, "$XDSFolderStatus": approved,
                                        "$XDSDocumentEntryFormatCode": ql(f"{DICOM_KOS[0]}^^{DICOM_KOS[1]}")},
                   return_type="ObjectRef")
    got = set(ids(response))
    assert reg.docs["a2"].entry_uuid in got and reg.docs["a1"].entry_uuid not in got
    assert a["s1-a2"] in got and a["s1-a1"] not in got and a["f1-a1"] not in got


def test_leaf_class_shows_current_status_and_package_classification(reg: Scenario, xsd: etree.XMLSchema) -> None:
    with reg.engine.begin() as conn:  # a status changed after registration (as RPLC deprecates)
        conn.execute(update(t.objects).where(t.objects.c.entry_uuid == reg.docs["a4"].entry_uuid)
                     .values(status=E.DEPRECATED))
    try:
        response = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryEntryUUID": ql(reg.docs["a4"].entry_uuid)})
        [entry] = response.iterfind("{*}RegistryObjectList/{*}ExtrinsicObject")
        assert entry.get("status") == E.DEPRECATED
    finally:
        with reg.engine.begin() as conn:
            conn.execute(update(t.objects).where(t.objects.c.entry_uuid == reg.docs["a4"].entry_uuid)
                         .values(status=E.APPROVED))
    response = run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(reg.sets["s1"])})
    [package] = [p for p in response.iterfind("{*}RegistryObjectList/{*}RegistryPackage")
                 if p.get("id") == reg.sets["s1"]]
    nodes = [c.get("classificationNode") for c in package.iterfind("{*}Classification")]
    assert nodes.count(E.SS_CLASSIFICATION_NODE) == 1  # added: s1 was registered with a top-level one
    response = run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(reg.sets["s2"])})
    [package] = [p for p in response.iterfind("{*}RegistryObjectList/{*}RegistryPackage")]
    assert [c.get("classificationNode") for c in package.iterfind("{*}Classification")].count(
        E.SS_CLASSIFICATION_NODE) == 1  # nested already: not doubled


def test_get_documents(reg: Scenario, xsd: etree.XMLSchema) -> None:
    a1, a3 = reg.docs["a1"], reg.docs["a3"]
    by_uuid = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryEntryUUID": ql(a1.entry_uuid, a3.entry_uuid)})
    assert set(ids(by_uuid)) == {a1.entry_uuid, a3.entry_uuid}  # any status
    by_uid = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryUniqueId": [ql(a1.unique_id), ql(a3.unique_id)]},
                 return_type="ObjectRef")
    assert set(ids(by_uid)) == {a1.entry_uuid, a3.entry_uuid}
    assert ids(run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryUniqueId": ql("9.9.9.9")})) == []
    with_assocs = run(reg, xsd, "GetDocumentsAndAssociations", {"$XDSDocumentEntryEntryUUID": ql(a3.entry_uuid)})
    assert set(ids(with_assocs)) == {a3.entry_uuid, reg.assocs["s2-a3"], reg.assocs["a4-rplc-a3"]}


def test_get_folders_and_contents(reg: Scenario, xsd: etree.XMLSchema) -> None:
    f1 = reg.folders["f1"]
    assert ids(run(reg, xsd, "GetFolders", {"$XDSFolderEntryUUID": ql(f1)})) == [f1]
    contents = run(reg, xsd, "GetFolderAndContents", {"$XDSFolderEntryUUID": q(f1)})
    assert set(ids(contents)) == {f1, reg.docs["a1"].entry_uuid, reg.assocs["f1-a1"]}
    filtered = run(reg, xsd, "GetFolderAndContents", {"$XDSFolderEntryUUID": q(f1),
                                                      "$XDSDocumentEntryFormatCode": ql(f"x^^{FC}")})
    assert ids(filtered) == [f1]
    for_doc = run(reg, xsd, "GetFoldersForDocument", {"$XDSDocumentEntryUniqueId": q(reg.docs["a1"].unique_id)})
    assert ids(for_doc) == [f1]
    assert ids(run(reg, xsd, "GetFoldersForDocument", {"$XDSDocumentEntryEntryUUID": q(reg.docs["a2"].entry_uuid)})) \
        == []


def test_get_folders_by_unique_id(reg: Scenario, xsd: etree.XMLSchema) -> None:
    with reg.engine.connect() as conn:
        uid = conn.execute(t.objects.select().where(t.objects.c.entry_uuid == reg.folders["f2"])).one().unique_id
    assert ids(run(reg, xsd, "GetFolders", {"$XDSFolderUniqueId": ql(uid)}, return_type="ObjectRef")) == \
        [reg.folders["f2"]]
    contents = run(reg, xsd, "GetFolderAndContents", {"$XDSFolderUniqueId": q(uid)})
    assert ids(contents) == [reg.folders["f2"]]


def test_get_associations_and_submission_sets(reg: Scenario, xsd: etree.XMLSchema) -> None:
    a = reg.assocs
    a1 = reg.docs["a1"].entry_uuid
    assert set(ids(run(reg, xsd, "GetAssociations", {"$uuid": ql(a1)}))) == {a["s1-a1"], a["f1-a1"]}
    sets = run(reg, xsd, "GetSubmissionSets", {"$uuid": ql(a1, reg.docs["a4"].entry_uuid)})
    assert set(ids(sets)) == {reg.sets["s1"], reg.sets["s3"], a["s1-a1"], a["s3-a4"]}
    assert set(ids(run(reg, xsd, "GetSubmissionSets", {"$uuid": ql(reg.folders["f1"])}))) == \
        {reg.sets["s1"], a["s1-f1"]}


def test_get_submission_set_and_contents(reg: Scenario, xsd: etree.XMLSchema) -> None:
    a = reg.assocs
    s1 = reg.sets["s1"]
    everything = {s1, reg.docs["a1"].entry_uuid, reg.docs["a2"].entry_uuid, reg.folders["f1"],
                  a["s1-a1"], a["s1-a2"], a["s1-f1"], a["f1-a1"], a["s1-(f1-a1)"]}
    assert set(ids(run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(s1)}))) == everything
    with reg.engine.connect() as conn:
        uid = conn.execute(t.objects.select().where(t.objects.c.entry_uuid == s1)).one().unique_id
    by_uid = run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetUniqueId": q(uid)},
                 return_type="ObjectRef")
    assert set(ids(by_uid)) == everything
    # a1 filtered out by confidentiality R: its links go too
    kept = run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(s1),
                                                         "$XDSDocumentEntryConfidentialityCode": ql(f"R^^{CONF}")})
    assert set(ids(kept)) == {s1, reg.docs["a2"].entry_uuid, reg.folders["f1"], a["s1-a2"], a["s1-f1"]}
    # on-demand a5 of s3 only with $XDSDocumentEntryType
    s3 = reg.sets["s3"]
    assert set(ids(run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(s3)}))) == \
        {s3, reg.docs["a4"].entry_uuid, a["s3-a4"]}
    both = ql(E.DE_OBJECT_TYPE_STABLE, E.DE_OBJECT_TYPE_ON_DEMAND)
    assert set(ids(run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(s3),
                                                                 "$XDSDocumentEntryType": both}))) == \
        {s3, reg.docs["a4"].entry_uuid, reg.docs["a5"].entry_uuid, a["s3-a4"], a["s3-a5"]}
    assert ids(run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q("urn:uuid:none")})) == []


def test_get_related_documents(reg: Scenario, xsd: etree.XMLSchema) -> None:
    a3, a4 = reg.docs["a3"], reg.docs["a4"]
    rplc = ql(E.ASSOC_RPLC, E.ASSOC_XFRM)
    for ref in ({"$XDSDocumentEntryEntryUUID": q(a3.entry_uuid)}, {"$XDSDocumentEntryUniqueId": q(a4.unique_id)}):
        response = run(reg, xsd, "GetRelatedDocuments", {**ref, "$AssociationTypes": rplc})
        assert set(ids(response)) == {a3.entry_uuid, a4.entry_uuid, reg.assocs["a4-rplc-a3"]}
    # no relation of these types: empty (not even the document itself)
    response = run(reg, xsd, "GetRelatedDocuments", {"$XDSDocumentEntryEntryUUID": q(a3.entry_uuid),
                                                     "$AssociationTypes": ql(E.ASSOC_APND)})
    assert ids(response) == []
    response = run(reg, xsd, "GetRelatedDocuments", {"$XDSDocumentEntryEntryUUID": q(reg.docs["a1"].entry_uuid),
                                                     "$AssociationTypes": rplc})
    assert ids(response) == []


# ------------------------------------------------------------------ errors


def test_result_not_single_patient(reg: Scenario, xsd: etree.XMLSchema) -> None:
    both = ql(reg.docs["a1"].entry_uuid, reg.docs["b1"].entry_uuid)
    response = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryEntryUUID": both}, status=FAILURE)
    assert errors(response)[0][0] == "XDSResultNotSinglePatient"
    assert ids(response) == []
    response = run(reg, xsd, "GetSubmissionSets", {"$uuid": both}, status=FAILURE)
    assert errors(response)[0][0] == "XDSResultNotSinglePatient"


def test_too_many_results(reg: Scenario, xsd: etree.XMLSchema) -> None:
    small = StoredQueries(reg.engine, max_results=2)
    params = {"$XDSDocumentEntryPatientId": q(reg.a), "$XDSDocumentEntryStatus": ql(E.APPROVED)}
    response = run(reg, xsd, "FindDocuments", params, status=FAILURE, sq=small)
    assert errors(response)[0][0] == "XDSTooManyResults" and ids(response) == []
    response = run(reg, xsd, "GetSubmissionSetAndContents", {"$XDSSubmissionSetEntryUUID": q(reg.sets["s1"])},
                   status=FAILURE, sq=small)
    assert errors(response)[0][0] == "XDSTooManyResults"
    assert len(ids(run(reg, xsd, "FindDocuments", params, sq=StoredQueries(reg.engine, max_results=3)))) == 3


def test_home_community(reg: Scenario, xsd: etree.XMLSchema) -> None:
    home = "urn:oid:1.2.156.112604.100"
    sq = StoredQueries(reg.engine, home_community_id=home)
    a1 = reg.docs["a1"].entry_uuid
    response = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryEntryUUID": ql(a1), "$homeCommunityId": q(home)},
                   sq=sq, return_type="ObjectRef")
    assert [(e.get("id"), e.get("home")) for e in response.iterfind("{*}RegistryObjectList/*")] == [(a1, home)]
    leaf = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryEntryUUID": ql(a1)}, sq=sq, home=home)
    assert leaf.find("{*}RegistryObjectList/{*}ExtrinsicObject").get("home") == home
    other = run(reg, xsd, "GetDocuments", {"$XDSDocumentEntryEntryUUID": ql(a1),
                                           "$homeCommunityId": q("urn:oid:9.9")}, sq=sq, status=FAILURE)
    assert errors(other) == [("XDSUnknownCommunity", "$homeCommunityId")]


# ------------------------------------------------------------------ the bench helpers (ihehub/xds/query_bench.py)


def test_bench_helpers(reg: Scenario) -> None:
    """The synthetic load (COPY on PostgreSQL, executemany on SQLite) and the FindDocuments bench, on a
    small scale: 150 entries of 20 per patient, loaded in two steps."""
    assert load_documents(reg.engine, 120, docs_per_patient=20) == 120
    assert load_documents(reg.engine, 120) == 0  # already there
    assert load_documents(reg.engine, 150, docs_per_patient=20) == 30
    for patient, count in ((0, 20), (5, 20), (7, 10)):  # the second load goes on with patient 6
        response = reg.sq.run(adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": q(patient_id(patient)),
                                                      "$XDSDocumentEntryStatus": ql(E.APPROVED)}))
        assert response.get("status") == SUCCESS
        assert len(by_tag(response)["ExtrinsicObject"]) == count, patient
    stats = bench_find_documents(reg.engine, queries=30)
    assert stats["entries"] == 150 and stats["queries"] == 30
    assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["mean_hits"] > 0
