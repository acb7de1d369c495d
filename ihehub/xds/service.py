"""`XdsService`: the hub's XDS.b Document Registry and Repository behind two SOAP endpoints.

The registry endpoint serves ITI-42 Register Document Set-b and ITI-18 Registry Stored Query, the
repository endpoint ITI-41 Provide and Register Document Set-b and ITI-43 Retrieve Document Set (ITI TF-2a
3.18, TF-2b 3.41-3.43; the WS-Addressing actions of ITI TF-2x V.3.2 and Appendix V WSDLs).  Everything
here is synchronous (database and disk); the HTTP layer runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from ihehub.soap import WSA_NS, SoapFault, SoapRequest
from ihehub.soap.mtom import OutPart
from ihehub.xds import ebrim
from ihehub.xds.errors import FAILURE, SUCCESS, XdsFailure, registry_response
from ihehub.xds.repository import DocumentStore, Registrar, Repository

__all__ = ["ACTIONS", "DEFAULT_REPOSITORY_UNIQUE_ID", "ENDPOINTS", "Reply", "XdsService"]

ITI_18 = "urn:ihe:iti:2007:RegistryStoredQuery"
ITI_41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI_42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
ITI_43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
ACTIONS = {ITI_18: "ITI-18", ITI_41: "ITI-41", ITI_42: "ITI-42", ITI_43: "ITI-43"}
ENDPOINTS = {"registry": (ITI_42, ITI_18), "repository": (ITI_41, ITI_43)}
# ihehub's default repositoryUniqueId: the IHE connectathon test arc 1.3.6.1.4.1.21367.2017.2.3 (repositories)
# + ".4242.1" (ihehub); set actors.xds.repository_unique_id to your own OID in production.
DEFAULT_REPOSITORY_UNIQUE_ID = "1.3.6.1.4.1.21367.2017.2.3.4242.1"


@dataclass
class Reply:
    """A response payload, its MTOM parts (ITI-43) and what the audit of the transaction needs."""

    transaction: str  # "ITI-41", ...
    payload: etree._Element
    status: str
    parts: list[OutPart] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    submission_set: str | None = None
    documents: list[str] = field(default_factory=list)  # document uniqueIds (ITI-43)
    query_id: str | None = None
    studies: list[str] = field(default_factory=list)  # Study Instance UIDs (RAD-69)

    @property
    def outcome(self) -> int:
        """EventOutcomeIndicator: 0 success, 4 partial (minor failure), 8 failure (PS3.15 A.5.3)."""
        return 0 if self.status == SUCCESS else (8 if self.status == FAILURE else 4)


class XdsService:
    """The registry (``registry``), stored queries (``queries``) and repository (``repository``) of one hub."""

    def __init__(self, engine: Any, data_dir: Path, *, repository_unique_id: str = DEFAULT_REPOSITORY_UNIQUE_ID,
                 home_community_id: str | None = None, max_results: int = 1000,
                 patient_known: Callable[[str], bool] | None = None, registry_url: str | None = None,
                 registry_verify: Any = True) -> None:
        from ihehub.xds.query import StoredQueries
        from ihehub.xds.registry import XdsRegistry

        self.registry = XdsRegistry(engine, patient_known=patient_known)
        self.queries = StoredQueries(engine, max_results=max_results, home_community_id=home_community_id)
        self.store = DocumentStore(Path(data_dir) / "xds")
        registrar: Registrar = self.registry
        if registry_url:  # ITI-41 registers with an external Document Registry (ITI-42 over SOAP)
            from ihehub.xds.remote import RemoteRegistry

            registrar = RemoteRegistry(registry_url, verify=registry_verify)
        self.repository = Repository(self.store, registrar, repository_unique_id=repository_unique_id,
                                     home_community_id=home_community_id)

    @property
    def spool_dir(self) -> Path:
        """Where the SOAP layer spools large attachments (next to the store: moved in by rename)."""
        return self.store.tmp

    def handle(self, endpoint: str, request: SoapRequest) -> Reply:
        """Run the transaction of ``request.action`` at ``endpoint`` ("registry" | "repository");
        `SoapFault` wsa:ActionNotSupported for an action the endpoint does not serve."""
        action = request.action or ""
        if action not in ENDPOINTS.get(endpoint, ()):
            raise SoapFault("Sender", f"the {endpoint} endpoint does not support the action {action!r}",
                            subcode=(WSA_NS, "ActionNotSupported"))
        payload = request.payload
        if action == ITI_41:
            provided = self.repository.provide(payload, request.content)
            return Reply("ITI-41", provided.response, provided.status, submission_set=provided.submission_set_uid,
                         patients=[provided.patient_id] if provided.patient_id else [])
        if action == ITI_43:
            got = self.repository.retrieve(payload)
            return Reply("ITI-43", got.response, got.status, parts=got.parts,
                         documents=[d.unique_id for d in got.documents])
        if action == ITI_42:
            return self._register(payload)
        return self._query(payload)

    def _register(self, payload: etree._Element) -> Reply:
        try:
            ss_uid = ebrim.external_id(ebrim.parse_submission(payload).submission_set, ebrim.SS_UNIQUE_ID)
            result = self.registry.register(payload)
        except XdsFailure as exc:
            return Reply("ITI-42", registry_response(exc.errors), FAILURE)
        return Reply("ITI-42", result.to_xml(), result.status, submission_set=ss_uid,
                     patients=[result.patient_id] if result.patient_id else [])

    def _query(self, payload: etree._Element) -> Reply:
        response = self.queries.run(payload)
        query = payload.find(f"{{{ebrim.NS['rim']}}}AdhocQuery")
        patients: list[str] = []
        if query is not None:
            for slot in query.iterchildren(f"{{{ebrim.NS['rim']}}}Slot"):
                if slot.get("name", "").endswith("PatientId"):
                    for v in slot.iterfind(f"{{{ebrim.NS['rim']}}}ValueList/{{{ebrim.NS['rim']}}}Value"):
                        patients.append((v.text or "").strip().strip("'"))
        return Reply("ITI-18", response, response.get("status", FAILURE), patients=[p for p in patients if p],
                     query_id=query.get("id") if query is not None else None)
