"""XDS.b Document Repository: the document store, ITI-41 Provide and Register and ITI-43 Retrieve Document Set.

Documents live on disk under ``<data_dir>/xds/documents/<aa>/<sha256(uniqueId)>`` (the bytes) with a
``.json`` sidecar (uniqueId, mimeType, SHA-1, size); each file is written to a temporary name, fsynced and
renamed into place, then the directory is fsynced.  MTOM attachments are spooled by the SOAP layer to
``<data_dir>/xds/tmp`` (the same file system), so a large document is *renamed* into the store, never copied.

ITI-41 (ITI TF-2b 3.41.4.1.3): every stable DocumentEntry has its ``xdsb:Document`` (XDSMissingDocument)
and every Document its entry (XDSMissingDocumentMetadata); the repository computes size and SHA-1 and
compares them (and a given repositoryUniqueId) with the metadata (XDSRepositoryMetadataError), adds the
``hash``, ``size`` and ``repositoryUniqueId`` slots and registers the submission with ITI-42; when the
registry refuses, the bytes stored for this submission are removed again.

ITI-43 (ITI TF-2b 3.43.4.2.3): several documents per request, ``PartialSuccess`` when only some are
found, XDSUnknownRepositoryId / XDSDocumentUniqueIdError per missing document, the mimeType as stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lxml import etree

from ihehub.soap.mtom import XOP_INCLUDE, Attachment, OutPart
from ihehub.xds import ebrim
from ihehub.xds.errors import (
    FAILURE,
    PARTIAL_SUCCESS,
    REGISTRY_METADATA_ERROR,
    SUCCESS,
    XdsError,
    XdsFailure,
    error_list,
    registry_response,
)

__all__ = ["DocumentStore", "Provided", "Registrar", "Repository", "Retrieved", "StoredDocument"]

log = logging.getLogger("ihehub.xds.repository")

XDS_NS = ebrim.NS["xds"]
XDS = f"{{{XDS_NS}}}"
LCM = ebrim.LCM
MISSING_DOCUMENT = "XDSMissingDocument"
MISSING_DOCUMENT_METADATA = "XDSMissingDocumentMetadata"
REPOSITORY_METADATA_ERROR = "XDSRepositoryMetadataError"
REPOSITORY_ERROR = "XDSRepositoryError"
NON_IDENTICAL_HASH = "XDSNonIdenticalHash"
DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"
UNKNOWN_COMMUNITY = "XDSUnknownCommunity"


class Registrar(Protocol):
    """What ITI-41 needs of a registry (`ihehub.xds.registry.XdsRegistry`)."""

    def register_submission(self, sub: ebrim.Submission) -> Any: ...


@dataclass(frozen=True)
class StoredDocument:
    unique_id: str
    mime_type: str
    sha1: str
    size: int
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DocumentStore:
    """The repository's bytes on disk, keyed by DocumentEntry.uniqueId."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.docs = root / "documents"
        self.tmp = root / "tmp"  # the SOAP layer spools attachments here (same file system: rename, no copy)
        self.docs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _paths(self, unique_id: str) -> tuple[Path, Path]:
        key = hashlib.sha256(unique_id.encode()).hexdigest()
        folder = self.docs / key[:2]
        return folder / key, folder / f"{key}.json"

    def get(self, unique_id: str) -> StoredDocument | None:
        data_path, meta_path = self._paths(unique_id)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        if meta.get("uniqueId") != unique_id or not data_path.is_file():
            return None
        return StoredDocument(unique_id=unique_id, mime_type=meta["mimeType"], sha1=meta["sha1"],
                              size=int(meta["size"]), path=data_path)

    def _write_tmp(self, chunks: Sequence[bytes] | Attachment) -> Path:
        fd, name = tempfile.mkstemp(prefix="doc-", dir=self.tmp)
        with os.fdopen(fd, "wb") as out:
            for chunk in (chunks.chunks() if isinstance(chunks, Attachment) else chunks):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return Path(name)

    def put(self, unique_id: str, content: Attachment, mime_type: str) -> StoredDocument:
        """Store ``content`` (moving its spill file when it has one) atomically; replaces an older copy."""
        data_path, meta_path = self._paths(unique_id)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        if content.path is not None and content.path.parent == self.tmp:
            _fsync_file(content.path)
            staged = content.path
        else:
            staged = self._write_tmp(content)
        meta = {"uniqueId": unique_id, "mimeType": mime_type, "sha1": content.sha1, "size": content.size}
        meta_tmp = self._write_tmp([json.dumps(meta).encode()])
        os.replace(staged, data_path)
        if staged == content.path:  # moved: the request's clean-up must not delete the stored document
            content.path, content.owned = data_path, False
        os.replace(meta_tmp, meta_path)
        _fsync_dir(data_path.parent)
        return StoredDocument(unique_id=unique_id, mime_type=mime_type, sha1=content.sha1, size=content.size,
                              path=data_path)

    def delete(self, unique_id: str) -> None:
        data_path, meta_path = self._paths(unique_id)
        meta_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(data_path.parent)


@dataclass
class Provided:
    """The outcome of ITI-41: the ``rs:RegistryResponse`` and what the audit needs."""

    response: etree._Element
    status: str
    submission_set_uid: str | None = None
    patient_id: str | None = None
    document_unique_ids: list[str] = field(default_factory=list)


@dataclass
class Retrieved:
    """The outcome of ITI-43: the response payload (with ``xop:Include``s) and its MTOM parts."""

    response: etree._Element
    parts: list[OutPart]
    status: str
    documents: list[StoredDocument] = field(default_factory=list)


def _errors(result: Any) -> list[XdsError]:
    return list(getattr(result, "errors", []) or [])


def document_response(response: etree._Element, *, home_community_id: str | None, repository_unique_id: str,
                      unique_id: str, mime_type: str, cid: str) -> None:
    """Append one ``xdsb:DocumentResponse`` whose ``xdsb:Document`` is an ``xop:Include`` of MTOM part ``cid``
    (ITI TF-2b 3.43.4.2.2; RAD-69 answers with the same element, RAD TF-3 4.69.4.2.2)."""
    dr = etree.SubElement(response, f"{XDS}DocumentResponse")
    if home_community_id:
        etree.SubElement(dr, f"{XDS}HomeCommunityId").text = home_community_id
    etree.SubElement(dr, f"{XDS}RepositoryUniqueId").text = repository_unique_id
    etree.SubElement(dr, f"{XDS}DocumentUniqueId").text = unique_id
    etree.SubElement(dr, f"{XDS}mimeType").text = mime_type
    document = etree.SubElement(dr, f"{XDS}Document")
    etree.SubElement(document, XOP_INCLUDE, nsmap={"xop": ebrim.NS["xop"]}).set("href", f"cid:{cid}")


class Repository:
    """ITI-41 and ITI-43 for one repositoryUniqueId, registering through ``registry`` (ITI-42)."""

    def __init__(self, store: DocumentStore, registry: Registrar, *, repository_unique_id: str,
                 home_community_id: str | None = None) -> None:
        self.store = store
        self.registry = registry
        self.repository_unique_id = repository_unique_id
        self.home_community_id = home_community_id
        self._lock = threading.Lock()  # commit + register of one submission at a time (same uniqueId races)

    # -- ITI-41 ------------------------------------------------------------------------------------
    def provide(self, request: etree._Element, content: Callable[[etree._Element], Attachment]) -> Provided:
        """Handle ``xdsb:ProvideAndRegisterDocumentSetRequest``; ``content`` resolves an ``xdsb:Document``
        to its bytes (xop:Include or inline base64; it raises `SoapFault` for a missing MIME part)."""
        try:
            return self._provide(request, content)
        except XdsFailure as exc:
            return Provided(response=registry_response(exc.errors), status=FAILURE)

    def _provide(self, request: etree._Element, content: Callable[[etree._Element], Attachment]) -> Provided:
        if request.tag != f"{XDS}ProvideAndRegisterDocumentSetRequest":
            raise XdsFailure(XdsError(REGISTRY_METADATA_ERROR,
                                      f"expected xdsb:ProvideAndRegisterDocumentSetRequest, got {request.tag}"))
        sor = request.find(f"{LCM}SubmitObjectsRequest")
        if sor is None:
            raise XdsFailure(XdsError(REGISTRY_METADATA_ERROR, "no lcm:SubmitObjectsRequest in the request"))
        sub = ebrim.parse_submission(sor)
        documents: dict[str, etree._Element] = {}
        errors: list[XdsError] = []
        for doc in request.iterchildren(f"{XDS}Document"):
            doc_id = doc.get("id") or ""
            if doc_id in documents:
                errors.append(XdsError(REGISTRY_METADATA_ERROR, f"two xdsb:Document elements with id {doc_id}"))
            documents[doc_id] = doc
        entries = {e.entry_uuid: e for e in sub.documents}
        for doc_id in documents:
            if doc_id not in entries:
                errors.append(XdsError(MISSING_DOCUMENT_METADATA,
                                       f"xdsb:Document {doc_id} has no DocumentEntry", location=doc_id))
        pairs: list[tuple[ebrim.DocumentEntry, Attachment]] = []
        for entry in sub.documents:
            if entry.object_type == ebrim.DE_OBJECT_TYPE_ON_DEMAND:
                continue
            doc = documents.get(entry.entry_uuid)
            if doc is None:
                errors.append(XdsError(MISSING_DOCUMENT, f"DocumentEntry {entry.entry_uuid} "
                                       f"(uniqueId {entry.unique_id}) has no xdsb:Document", location=entry.entry_uuid))
                continue
            att = content(doc)
            errors.extend(self._check(entry, att))
            pairs.append((entry, att))
        if errors:
            raise XdsFailure(errors)
        for entry, att in pairs:  # ITI TF-2b 3.41.4.1.3: the repository adds hash, size, repositoryUniqueId
            ebrim.set_slot(entry.element, "hash", [att.sha1])
            ebrim.set_slot(entry.element, "size", [str(att.size)])
            ebrim.set_slot(entry.element, "repositoryUniqueId", [self.repository_unique_id])
            entry.hash, entry.size, entry.repository_unique_id = att.sha1, att.size, self.repository_unique_id
        return self._store_and_register(sub, pairs)

    def _check(self, entry: ebrim.DocumentEntry, att: Attachment) -> list[XdsError]:
        where = f"DocumentEntry {entry.entry_uuid} (uniqueId {entry.unique_id})"
        errors = []
        if not entry.unique_id:
            errors.append(XdsError(REGISTRY_METADATA_ERROR, f"{where} has no uniqueId", location=entry.entry_uuid))
        if entry.hash is not None and entry.hash.strip().lower() != att.sha1:
            errors.append(XdsError(REPOSITORY_METADATA_ERROR,
                                   f"{where}: hash {entry.hash} differs from the document's SHA-1 {att.sha1}",
                                   location=entry.entry_uuid))
        if entry.size is not None and entry.size != att.size:
            errors.append(XdsError(REPOSITORY_METADATA_ERROR,
                                   f"{where}: size {entry.size} differs from the document's {att.size} bytes",
                                   location=entry.entry_uuid))
        if entry.repository_unique_id is not None and entry.repository_unique_id != self.repository_unique_id:
            errors.append(XdsError(REPOSITORY_METADATA_ERROR,
                                   f"{where}: repositoryUniqueId {entry.repository_unique_id} is not this "
                                   f"repository's ({self.repository_unique_id})", location=entry.entry_uuid))
        return errors

    def _store_and_register(self, sub: ebrim.Submission,
                            pairs: list[tuple[ebrim.DocumentEntry, Attachment]]) -> Provided:
        stored: list[str] = []
        with self._lock:
            try:
                for entry, att in pairs:
                    uid = entry.unique_id or ""
                    old = self.store.get(uid)
                    if old is not None:
                        if old.sha1 != att.sha1:  # ITI TF-3 4.2.4.1: same uniqueId, different content
                            raise XdsFailure(XdsError(NON_IDENTICAL_HASH, f"document {uid} is already stored "
                                                      f"with SHA-1 {old.sha1}, not {att.sha1}", location=uid))
                        continue  # identical resubmission: keep the stored copy
                    self.store.put(uid, att, entry.mime_type or "application/octet-stream")
                    stored.append(uid)
                result = self.registry.register_submission(sub)
            except XdsFailure:
                self._remove(stored)
                raise
            except Exception as exc:
                self._remove(stored)
                log.exception("ITI-41: registering submission %s failed", sub.submission_set_uuid)
                raise XdsFailure(XdsError(REPOSITORY_ERROR, f"the registry could not be reached: {exc}")) from None
            status = getattr(result, "status", FAILURE)
            if status == FAILURE:
                self._remove(stored)
        to_xml = getattr(result, "to_xml", None)
        response = to_xml() if callable(to_xml) else registry_response(_errors(result), status=status)
        return Provided(response=response, status=status,
                        submission_set_uid=ebrim.external_id(sub.submission_set, ebrim.SS_UNIQUE_ID),
                        patient_id=sub.patient_id,
                        document_unique_ids=[e.unique_id or "" for e, _ in pairs])

    def _remove(self, unique_ids: Sequence[str]) -> None:
        for uid in unique_ids:
            self.store.delete(uid)

    # -- ITI-43 ------------------------------------------------------------------------------------
    def retrieve(self, request: etree._Element) -> Retrieved:
        """Handle ``xdsb:RetrieveDocumentSetRequest``: the response with one ``xdsb:DocumentResponse`` per
        document found, each ``xdsb:Document`` an ``xop:Include`` of an MTOM part."""
        response = etree.Element(f"{XDS}RetrieveDocumentSetResponse", nsmap={"xdsb": XDS_NS})
        errors: list[XdsError] = []
        found: list[StoredDocument] = []
        parts: list[OutPart] = []
        requests = list(request.iterchildren(f"{XDS}DocumentRequest")) \
            if request.tag == f"{XDS}RetrieveDocumentSetRequest" else []
        if not requests:
            errors.append(XdsError(REGISTRY_METADATA_ERROR,
                                   "expected xdsb:RetrieveDocumentSetRequest with at least one DocumentRequest"))
        for n, req in enumerate(requests):
            home = (req.findtext(f"{XDS}HomeCommunityId") or "").strip()
            repo = (req.findtext(f"{XDS}RepositoryUniqueId") or "").strip()
            uid = (req.findtext(f"{XDS}DocumentUniqueId") or "").strip()
            if home and self.home_community_id and home != self.home_community_id:
                errors.append(XdsError(UNKNOWN_COMMUNITY, f"homeCommunityId {home} is not this community's",
                                       location=home))
                continue
            if repo != self.repository_unique_id:
                errors.append(XdsError(UNKNOWN_REPOSITORY_ID, f"repositoryUniqueId {repo!r} is not this "
                                       f"repository ({self.repository_unique_id})", location=repo))
                continue
            doc = self.store.get(uid) if uid else None
            if doc is None:
                errors.append(XdsError(DOCUMENT_UNIQUE_ID_ERROR, f"no document with uniqueId {uid!r} in "
                                       f"repository {repo}", location=uid))
                continue
            found.append(doc)
            cid = f"doc{n}.{hashlib.sha1(uid.encode()).hexdigest()[:16]}@ihehub"
            parts.append(OutPart(cid=cid, content_type=doc.mime_type, source=doc.path))
        status = SUCCESS if not errors else (PARTIAL_SUCCESS if found else FAILURE)
        rr = registry_response([], status=status)
        if errors:
            rr.append(error_list(errors))
        response.append(rr)
        for doc, part in zip(found, parts, strict=True):
            document_response(response, home_community_id=self.home_community_id,
                              repository_unique_id=self.repository_unique_id, unique_id=doc.unique_id,
                              mime_type=doc.mime_type, cid=part.cid)
        return Retrieved(response=response, parts=parts, status=status, documents=found)
