"""ITI-42 associations between submissions: RPLC / XFRM_RPLC lifecycle, APND, XFRM, signs, folders.

ITI TF-3 4.2.2: the replaced DocumentEntry becomes Deprecated and its folder membership carries over
to the replacement (ITI TF-2b 3.42.4.1.3.5); a Folder's lastUpdateTime follows new members.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Row, select

from ihehub.xds import ebrim as E
from ihehub.xds import tables as t
from ihehub.xds.errors import SUCCESS
from ihehub.xds.registry import XdsRegistry
from tests.xds.registry_builders import Builder, counts, cx, refused
from tests.xds.registry_builders import registry_engine as _registry_engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    eng = _registry_engine(request.param, tmp_path, request)
    yield eng
    eng.dispose()


class Clock:
    """A registry clock the test moves forward."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def entry(engine: Engine, unique_id: str) -> Row[Any]:
    """The newest registered object of ``unique_id``."""
    with engine.connect() as conn:
        return conn.execute(select(t.objects).where(t.objects.c.unique_id == unique_id)
                            .order_by(t.objects.c.id.desc()).limit(1)).one()


def first_submission(registry: XdsRegistry, patient: str | None = None) -> tuple[str, str]:
    """A document in a folder; returns (document uniqueId, folder uniqueId)."""
    b = Builder(patient)
    uid = b.document("Document01", title="首次报告")
    folder = b.folder("Folder01", members=["Document01"])
    result = registry.register(b.request())
    assert result.status == SUCCESS, result.errors
    return uid, folder


@pytest.mark.parametrize("kind", [E.ASSOC_RPLC, E.ASSOC_XFRM_RPLC])
def test_replacement_deprecates_original_and_inherits_folders(engine: Engine, kind: str) -> None:
    clock = Clock()
    registry = XdsRegistry(engine, clock=clock)
    original_uid, folder_uid = first_submission(registry)
    original = entry(engine, original_uid)
    folder_before = entry(engine, folder_uid)
    clock.now += 3600
    b = Builder()
    new_uid = b.document("Document02", title="更正报告")
    b.association(kind, "Document02", original.entry_uuid)
    result = registry.register(b.request())
    assert result.status == SUCCESS, result.errors
    replaced, replacement, folder = entry(engine, original_uid), entry(engine, new_uid), entry(engine, folder_uid)
    assert replaced.status == E.DEPRECATED and replacement.status == E.APPROVED
    assert E.parse_xml(replaced.xml.encode()).get("status") == E.DEPRECATED  # xml follows the column
    with engine.connect() as conn:
        assocs = conn.execute(select(t.associations)).all()
    assert any(a.type == kind and a.source_uuid == replacement.entry_uuid and a.target_uuid == original.entry_uuid
               for a in assocs)
    # folder membership carried over, made by the registry; the folder's lastUpdateTime moved on
    carried = [a for a in assocs if a.source_uuid == folder.entry_uuid and a.target_uuid == replacement.entry_uuid]
    assert len(carried) == 1 and carried[0].type == E.ASSOC_HAS_MEMBER and carried[0].status == E.APPROVED
    assert folder.last_update_time == "20231114231320" > folder_before.last_update_time
    assert E.slot_values(E.parse_xml(folder.xml.encode()), "lastUpdateTime") == ["20231114231320"]
    assert registry.document(original_uid).status == E.DEPRECATED  # type: ignore[union-attr]
    # a deprecated entry cannot be replaced again
    before = counts(engine)
    again = Builder()
    again.document("Document03")
    again.association(E.ASSOC_RPLC, "Document03", original.entry_uuid)
    refused(registry.register(again.request()), "XDSRegistryMetadataError", original.entry_uuid, "not Approved")
    assert counts(engine) == before


@pytest.mark.parametrize("kind", [E.ASSOC_APND, E.ASSOC_XFRM, E.ASSOC_SIGNS])
def test_other_relationships_keep_the_original(engine: Engine, kind: str) -> None:
    registry = XdsRegistry(engine)
    original_uid, _ = first_submission(registry)
    original = entry(engine, original_uid)
    b = Builder()
    b.document("Document02")
    b.association(kind, "Document02", original.entry_uuid)
    assert registry.register(b.request()).status == SUCCESS
    assert entry(engine, original_uid).status == E.APPROVED


def test_signature_of_a_document_in_the_same_submission(engine: Engine) -> None:
    b = Builder()
    b.document("Document01")
    b.document("Signature01", title="数字签名")
    b.association(E.ASSOC_SIGNS, "Signature01", "Document01")
    assert XdsRegistry(engine).register(b.request()).status == SUCCESS


def test_relationship_errors(engine: Engine) -> None:
    registry = XdsRegistry(engine)
    original_uid, folder_uid = first_submission(registry, cx("P-1"))
    original, folder = entry(engine, original_uid), entry(engine, folder_uid)
    before = counts(engine)
    unknown = "urn:uuid:00000000-0000-4000-8000-000000000001"
    b = Builder(cx("P-1"))
    b.document("Document02")
    b.association(E.ASSOC_RPLC, "Document02", unknown)
    refused(registry.register(b.request()), "UnresolvedReferenceException", unknown)
    b = Builder(cx("P-2"))
    b.document("Document02")
    b.association(E.ASSOC_RPLC, "Document02", original.entry_uuid)
    refused(registry.register(b.request()), "XDSPatientIdDoesNotMatch", original.entry_uuid, cx("P-1"))
    b = Builder(cx("P-1"))
    b.document("Document02")
    b.association(E.ASSOC_RPLC, "Document02", folder.entry_uuid)
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "is a Folder, not a DocumentEntry")
    b = Builder(cx("P-1"))
    b.document("Document02")
    b.document("Document03")
    b.association(E.ASSOC_RPLC, "Document02", original.entry_uuid)
    b.association(E.ASSOC_RPLC, "Document03", original.entry_uuid)
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "replaced twice")
    b = Builder(cx("P-1"))
    b.document("Document02")
    b.association(E.ASSOC_APND, "SubmissionSet01", original.entry_uuid)
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "must be a DocumentEntry of this submission")
    assert counts(engine) == before
    assert entry(engine, original_uid).status == E.APPROVED


def test_existing_document_added_to_existing_folder(engine: Engine) -> None:
    clock = Clock()
    registry = XdsRegistry(engine, clock=clock)
    _, folder_uid = first_submission(registry)
    lone = Builder()
    lone_uid = lone.document("Document01", title="独立报告")
    assert registry.register(lone.request()).status == SUCCESS
    folder, doc = entry(engine, folder_uid), entry(engine, lone_uid)
    clock.now += 60
    b = Builder()  # a SubmissionSet holding only the new Folder membership (ITI TF-3 4.2.1.3)
    b.member(folder.entry_uuid, doc.entry_uuid)
    b.association(E.ASSOC_HAS_MEMBER, "SubmissionSet01", doc.entry_uuid, status="Reference")
    result = registry.register(b.request())
    assert result.status == SUCCESS, result.errors
    assert entry(engine, folder_uid).last_update_time == "20231114221420"
    with engine.connect() as conn:
        assert conn.execute(select(t.associations).where(t.associations.c.source_uuid == folder.entry_uuid,
                                                         t.associations.c.target_uuid == doc.entry_uuid)).first()
    other = Builder(cx("P-9"))
    other_uid = other.document("Document01")
    assert registry.register(other.request()).status == SUCCESS
    b = Builder(cx("P-9"))
    b.member(folder.entry_uuid, entry(engine, other_uid).entry_uuid)
    refused(registry.register(b.request()), "XDSPatientIdDoesNotMatch", folder.entry_uuid)


def test_concurrent_replacements_of_one_entry(engine: Engine) -> None:
    """Eight submissions replace the same entry at once: exactly one wins, the others see it Deprecated."""
    registry = XdsRegistry(engine)
    original_uid, folder_uid = first_submission(registry)
    original = entry(engine, original_uid).entry_uuid
    requests = []
    for i in range(8):
        b = Builder()
        b.document("Document02", title=f"更正 {i}")
        b.association(E.ASSOC_RPLC, "Document02", original)
        requests.append(b.request())
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(registry.register, requests))
    assert sorted(r.status for r in results).count(SUCCESS) == 1, [r.errors for r in results]
    for r in results:
        if r.status != SUCCESS:
            refused(r, "XDSRegistryMetadataError", original, "not Approved")
    with engine.connect() as conn:
        folder_members = conn.execute(select(t.associations.c.target_uuid).where(
            t.associations.c.source_uuid == entry(engine, folder_uid).entry_uuid)).scalars().all()
    assert len(folder_members) == 2  # the original and its one replacement
