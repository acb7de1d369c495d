"""`ImageManager`: the hub's DICOM Application Entity (IHE RAD Image Manager/Archive, storage and query).

One AE (PS3.7; PS3.8 upper layer: pynetdicom's, and for storage-only associations on the plain listener
the native one of `ihehub.dicom.native`) offering:

* Verification SCP (PS3.4 Annex A, C-ECHO);
* Storage SCP for every storage SOP class (PS3.4 Annex B) in the usual transfer syntaxes, compressed ones
  accepted as proposed; the data set is written as received (`ihehub.dicom.storage`), answered, then
  indexed asynchronously (`ihehub.dicom.indexer`);
* Query/Retrieve C-FIND SCP (PS3.4 Annex C) for Patient Root and Study Root (`ihehub.dicom.query`);
* Modality Worklist C-FIND SCP (PS3.4 Annex K) on the scheduled steps of HL7 orders (`ihehub.dicom.worklist`);
* Query/Retrieve C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3) sending the files as stored to a registered node
  or back on the requesting association (`ihehub.dicom.retrieve`, `ihehub.dicom.scu`).

Every association socket gets TCP_NODELAY (without it each C-STORE response can wait ~40 ms for the
peer's delayed ACK) and SO_KEEPALIVE; associations stay open as long as the peer wants (``idle_timeout``).
With ``require_known_callers`` an unknown calling AE title, or a known one calling from another host, is
rejected with A-ASSOCIATE-RJ (rejected-permanent, service-user, calling-AE-title-not-recognized;
PS3.8 9.3.4).

Each association runs on threads of its own (pynetdicom's, or the connection's thread for a native one);
`start`/`stop` are async only so that the hub can await them beside its other listeners.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine

from ihehub.bus.db import Writer
from ihehub.dicom import query as q
from ihehub.dicom import worklist as mwl
from ihehub.dicom.audit import DimseAudit
from ihehub.dicom.commitment import StorageCommitment
from ihehub.dicom.indexer import Indexer, StudyComplete
from ihehub.dicom.native import NativeAcceptor
from ihehub.dicom.patients import EmpiLinkSettings, PatientDirectory, PatientLinker
from ihehub.dicom.retrieve import GET_MODELS, MOVE_MODELS, Retriever
from ihehub.dicom.routing import parse_routing_tags
from ihehub.dicom.settings import DicomSettings, ListenerConfig, parse_nodes
from ihehub.dicom.storage import PROCESSING_FAILURE, Incoming, InstanceStore, StoreFailure
from ihehub.dicom.transport import RequestHandler, SupportedContexts, tune_raw_socket, tune_socket

__all__ = ["ImageManager", "NodeDirectory", "StudyCompleteHandler"]

log = logging.getLogger("ihehub.dicom")

StudyCompleteHandler = Callable[[StudyComplete], Awaitable[None] | None]
STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)
_FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: q.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: q.STUDY_ROOT,
}


class ImageManager:
    """The DICOM AE of one hub node.

    ``config``: `DicomSettings`, the hub's ``actors.dicom`` value (AE title, port, nodes) or the YAML-shaped
    mapping of `DicomSettings.from_mapping`.  ``store``: an Engine (the manager then runs its own `Writer`)
    or the hub's Writer.  Files go to ``data_dir/dicom``.  ``on_study_complete`` (sync or async) is called
    for each study that went quiet; an async one runs on the loop that called `start`.
    ``client_ssl_context`` is used when a C-MOVE destination node has ``tls: true``.
    """

    def __init__(self, config: DicomSettings | ListenerConfig | Mapping[str, Any] | None, store: Engine | Writer,
                 data_dir: Path, *, on_study_complete: StudyCompleteHandler | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 client_ssl_context: ssl.SSLContext | None = None, audit: Any = None) -> None:
        self.settings = _settings(config)
        if self.settings.tls_port is not None and ssl_context is None:
            raise ValueError("tls_port is set but no ssl_context was given")
        self._own_writer = isinstance(store, Engine)
        self.writer = Writer(store, name="ihehub-dicom-writer") if isinstance(store, Engine) else store
        self.engine = self.writer.engine
        self.root = Path(data_dir) / "dicom"
        self.storage = InstanceStore(self.root, fsync=self.settings.fsync)
        self.on_study_complete = on_study_complete
        self.ssl_context = ssl_context
        # the DICOM audit trail (PS3.15 A.5.3.4, A.5.3.11) when the hub runs an AuditContext
        self.audit = DimseAudit(audit, self.settings.ae_title) if audit is not None else None
        self.retriever = Retriever(engine=self.engine, root=self.root, settings=self.settings,
                                   client_ssl_context=client_ssl_context,
                                   on_sent=self.audit.sent if self.audit is not None else None)
        self.commitment = StorageCommitment(engine=self.engine, settings=self.settings, flush=self.flush,
                                            client_ssl_context=client_ssl_context)
        self.indexer = Indexer(self.writer, fsync=self.settings.fsync,
                               quiet_seconds=self.settings.study_quiet_seconds, maxsize=self.settings.index_queue,
                               worker_process=self.settings.index_process, on_study_complete=self._study_complete,
                               root=self.root, routing_tags=parse_routing_tags(self.settings.routing_tags))
        self.patients: PatientLinker | None = None  # the EMPI link, when the hub runs an EMPI (link_patients)
        self._servers: list[ThreadedAssociationServer] = []
        self._native: NativeAcceptor | None = None  # the plain listener's native storage path
        self._ae: AE | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.stored = 0
        self.rejected = 0

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def ae_title(self) -> str:
        return self.settings.ae_title

    @property
    def port(self) -> int:
        """The bound port of the plain listener (the configured one, or the free one port 0 got)."""
        if not self._servers:
            raise RuntimeError("the image manager is not started")
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

    async def start(self) -> None:
        """Start the indexer and the listener(s); raises OSError when the port is taken."""
        self._loop = asyncio.get_running_loop()
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.clear_incoming()
        await asyncio.to_thread(self.indexer.start)  # waits for the index worker process to be ready
        self._ae = self._build_ae()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_N_ACTION, self.commitment.on_action),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        try:
            self._serve((self.settings.host, self.settings.port), None, handlers)
            if self.settings.tls_port is not None:
                self._serve((self.settings.host, self.settings.tls_port), self.ssl_context, handlers)
        except Exception:
            await self.stop()
            raise
        log.info("DICOM AE %s listening on port %d%s", self.ae_title, self.port,
                 f" and {self.tls_port} (TLS)" if self.tls_port else "")

    async def stop(self) -> None:
        """Abort open associations, close the listeners, index what is queued, stop the writer we own."""
        await asyncio.to_thread(self._stop_blocking)

    def _stop_blocking(self) -> None:
        ae = self._ae
        if ae is not None:
            for assoc in ae.active_associations:
                assoc.abort()
            for server in list(self._servers):
                server.shutdown()
        if self._native is not None:  # after the listeners closed: no new native association can start
            self._native.abort_all()
            self._native = None
        self._servers.clear()
        self._ae = None
        if self.patients is not None:
            self.indexer.on_batch = None
            self.retriever.patients = None
            self.patients.stop()
            self.patients = None
        self.indexer.stop()
        if self._own_writer:
            self.writer.close()

    def link_patients(self, directory: PatientDirectory, settings: EmpiLinkSettings) -> PatientLinker:
        """Link the index's patients to an EMPI (`ihehub.dicom.patients`): resolved after each index batch on
        the linker's thread, followed through merges; C-FIND, QIDO, C-MOVE and C-GET then match through it."""
        if self.patients is not None:
            raise RuntimeError("the image manager is already linked to an EMPI")
        linker = PatientLinker(self.writer, directory, settings)
        linker.start()
        self.patients = linker
        self.retriever.patients = linker.scope
        self.indexer.on_batch = linker.wake
        linker.wake()  # rows indexed while no EMPI ran
        return linker

    @property
    def patient_scope(self) -> q.ScopeLookup | None:
        """What C-FIND and QIDO hand to `query.find` (None without an EMPI link)."""
        return self.patients.scope if self.patients is not None else None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every stored instance is indexed (tests, benchmarks, orderly shutdown)."""
        return self.indexer.flush(timeout)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = self.settings.idle_timeout
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # roles as proposed: a C-GET requestor takes the SCP role
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for model in (*_FIND_MODELS, *MOVE_MODELS, *GET_MODELS, ModalityWorklistInformationFind):
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES[:4])  # uncompressed (and deflated) only
        ae.add_supported_context(StorageCommitmentPushModel, ALL_TRANSFER_SYNTAXES[:3])  # PS3.4 J, N-ACTION
        return ae

    def _serve(self, address: tuple[str, int], ssl_context: ssl.SSLContext | None,
               handlers: list[Any]) -> None:
        ae = self._ae
        if ae is None:
            raise RuntimeError("the AE is built by start()")
        server = ThreadedAssociationServer(ae, address, ae.ae_title, SupportedContexts(ae.supported_contexts),
                                           ssl_context, evt_handlers=handlers, request_handler=RequestHandler)
        server.store_handler = self._store  # type: ignore[attr-defined]  # read by transport.RequestHandler
        server.retrieve_handler = self.retriever  # type: ignore[attr-defined]
        if ssl_context is None and self.settings.native_store:
            self._native = server.native = NativeAcceptor(  # type: ignore[attr-defined]
                ae=ae, contexts=server.contexts, syntaxes=_native_syntaxes(ae), admit=self._admit,
                receive=self._receive, closed=self._closed, pynetdicom_acceptors=self._pynetdicom_acceptors,
                max_associations=self.settings.max_associations, max_pdu=self.settings.max_pdu,
                idle_timeout=self.settings.idle_timeout, acse_timeout=ae.acse_timeout, tune=tune_raw_socket)
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom's standard handlers format every PDU and DIMSE message for its log, logged or not
            for event, handler in STANDARD_LOG_HANDLERS:
                server.unbind(event, handler)
        ae._servers.append(server)  # AE.shutdown and server.shutdown keep this list; start_server does the same
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  name=f"ihehub-dicom-{address[1]}", daemon=True)
        thread.start()
        self._servers.append(server)

    # -- association events ---------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        tune_socket(event.assoc)

    def _on_conn_close(self, event: evt.Event) -> None:
        self._closed(event.assoc)

    def _closed(self, assoc: Any) -> None:
        """An association ended (pynetdicom's or a native one): its transfer audit."""
        if self.audit is not None:
            self.audit.closed(assoc)

    @property
    def native_associations(self) -> int:
        """Associations served by the native storage path (`ihehub.dicom.native`) since `start`."""
        native = self._native
        return native.accepted if native is not None else 0

    def _pynetdicom_acceptors(self) -> int:
        ae = self._ae
        return sum(1 for a in ae.active_associations if a.is_acceptor) if ae is not None else 0

    def _on_requested(self, event: evt.Event) -> None:
        """Reject unknown callers (PS3.8 7.1.1.3, A-ASSOCIATE-RJ result 1, source 1, reason 3), and callers
        over ``max_associations`` counting the native path's associations too (2/3/2, as pynetdicom does)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive  # the A-ASSOCIATE-RQ: requestor.ae_title is set only later
        title = str(primitive.calling_ae_title if primitive is not None else assoc.requestor.ae_title).strip()
        if not self._admit(title, str(assoc.requestor.address)):
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()  # waits until the A-ASSOCIATE-RJ is out and the peer closed (pynetdicom does the same)
            return
        native = self._native
        if native is not None and native.count() + self._pynetdicom_acceptors() > self.settings.max_associations:
            log.warning("association from %s rejected: %d associations open", title, self.settings.max_associations)
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            assoc.kill()

    def _admit(self, title: str, address: str) -> bool:
        """The caller check of ``require_known_callers`` (False: reject; counted in ``rejected`` and logged)."""
        if not self.settings.require_known_callers:
            return True
        node = self.settings.node(title)
        if node is not None and node.accepts_address(address):
            return True
        with self._lock:
            self.rejected += 1
        log.warning("association from %s (%s) rejected: %s", title, address,
                    "unknown AE title" if node is None else f"{title} is not expected from this host")
        return False

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """EVT_C_STORE, for associations without the fast path (see `ihehub.dicom.transport`)."""
        req = cast(C_STORE, event.request)
        return self._store(event.assoc, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                           cast(BytesIO, req.DataSet).getvalue(), str(event.context.transfer_syntax))

    def _store(self, assoc: Any, sop_class_uid: str, sop_instance_uid: str, dataset: bytes | memoryview,
               transfer_syntax: str) -> int | Dataset:
        """C-STORE (PS3.4 B.2.3) of a complete data set (the pynetdicom path's `transport.StoreHandler`):
        write the received bytes, queue them for the index, answer.  ``assoc`` is pynetdicom's Association;
        ``dataset`` may be a view valid only during this call."""
        reception = self._receive(assoc, sop_class_uid, sop_instance_uid, transfer_syntax)
        reception.write(dataset)
        return reception.finish(dataset)

    def _receive(self, assoc: Any, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> _Reception:
        """A C-STORE whose data set is about to arrive (the native path's `native.NativeStoreHandler`): written
        to its file fragment by fragment, checked and answered by `_Reception.finish`."""
        calling = str(assoc.requestor.ae_title)
        incoming = self.storage.begin(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                                      transfer_syntax=transfer_syntax, calling_ae=calling)
        return _Reception(self, assoc, incoming)

    def _finish_store(self, assoc: Any, incoming: Incoming, dataset: bytes | memoryview) -> int | Dataset:
        calling = incoming.calling_ae
        try:
            stored = incoming.finish(dataset)
        except StoreFailure as exc:
            log.warning("C-STORE of %s from %s refused (0x%04X): %s", incoming.sop_instance_uid, calling,
                        exc.status, exc.comment)
            return _status(exc.status, exc.comment)
        except Exception as exc:
            log.exception("C-STORE of %s failed", incoming.sop_instance_uid)
            return _status(PROCESSING_FAILURE, f"Processing failure: {type(exc).__name__}")
        if self.audit is not None:
            self.audit.stored(assoc, stored)  # reads the data set now (a view is only valid during this call)
        self.indexer.put(stored)  # keeps a copy of the data set if it keeps one at all
        with self._lock:
            self.stored += 1
        return 0x0000

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """C-FIND (PS3.4 C.4.1.3): one pending response per match, then success (or cancel/failure)."""
        if str(event.request.AffectedSOPClassUID) == ModalityWorklistInformationFind:
            yield from self._find_worklist(event)
            return
        root = _FIND_MODELS.get(str(event.request.AffectedSOPClassUID), q.STUDY_ROOT)
        try:
            query = q.FindQuery.parse(event.identifier, root=root)
        except q.FindError as exc:
            self._audit_query(event, 4)
            yield _status(exc.status, exc.comment), None
            return
        except Exception as exc:
            self._audit_query(event, 4)
            yield _status(0xC000, f"Cannot decode the identifier: {type(exc).__name__}"), None
            return
        self._audit_query(event, 0)
        try:
            with self.engine.connect() as conn:
                for values in q.find(conn, query, limit=self.settings.find_limit, patients=self.patient_scope):
                    if event.is_cancelled:
                        yield 0xFE00, None
                        return
                    yield 0xFF00, self._response(query, values)
        except Exception as exc:
            log.exception("C-FIND failed")
            yield _status(0xC001, f"Unable to process: {type(exc).__name__}"), None
            return
        yield 0x0000, None

    def _audit_query(self, event: evt.Event, outcome: int) -> None:
        if self.audit is None:
            return
        raw = cast(C_FIND, event.request).Identifier
        self.audit.queried(event.assoc, sop_class=str(event.request.AffectedSOPClassUID),
                           identifier=raw.getvalue() if isinstance(raw, BytesIO) else b"",
                           transfer_syntax=str(event.context.transfer_syntax), outcome=outcome)

    def _find_worklist(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Modality Worklist C-FIND (PS3.4 K.4.1.3, IHE RAD-5): the scheduled steps that match."""
        try:
            with self.engine.connect() as conn:
                for ds in mwl.find(conn, event.identifier, limit=self.settings.find_limit):
                    if event.is_cancelled:
                        yield 0xFE00, None
                        return
                    yield 0xFF00, ds
        except mwl.WorklistError as exc:
            yield _status(exc.status, exc.comment), None
            return
        except Exception as exc:
            log.exception("MWL C-FIND failed")
            yield _status(0xC001, f"Unable to process: {type(exc).__name__}"), None
            return
        yield 0x0000, None

    def _response(self, query: q.FindQuery, values: dict[str, Any]) -> Dataset:
        ds = Dataset()
        keywords = list(query.returned)
        for level in range(query.level + 1):  # the unique keys of this level and the ones above
            unique = q.UNIQUE[level]
            if (level > 0 or query.root == q.PATIENT_ROOT or "PatientID" in keywords) and unique not in keywords:
                keywords.append(unique)
        texts = [str(values[k]) for k in keywords if isinstance(values.get(k), str)]
        charset = q.response_charset(query.charset, texts)
        if charset:
            ds.SpecificCharacterSet = charset
        ds.QueryRetrieveLevel = q.LEVELS[query.level]
        ds.RetrieveAETitle = self.ae_title
        for keyword in keywords:
            value = values.get(keyword)
            try:
                setattr(ds, keyword, _dicom_value(value))
            except Exception:  # a requested keyword pydicom cannot hold: returned empty
                setattr(ds, keyword, None)
        return ds

    # -- study complete -------------------------------------------------------------------------
    def _study_complete(self, event: StudyComplete) -> None:
        handler = self.on_study_complete
        if handler is None:
            return
        loop = self._loop
        if inspect.iscoroutinefunction(handler) and loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(handler(event), loop)
            return
        result = handler(event)
        if inspect.isawaitable(result) and loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(_awaited(result), loop)


class _Reception:
    """One C-STORE data set being received by the image manager (`ImageManager._receive`)."""

    __slots__ = ("assoc", "incoming", "manager")

    def __init__(self, manager: ImageManager, assoc: Any, incoming: Incoming) -> None:
        self.manager = manager
        self.assoc = assoc
        self.incoming = incoming

    def write(self, data: bytes | memoryview) -> None:
        self.incoming.write(data)

    def finish(self, dataset: bytes | memoryview) -> int | Dataset:
        """Check and place the complete data set, index it, audit it; the C-STORE status to answer."""
        return self.manager._finish_store(self.assoc, self.incoming, dataset)

    def discard(self) -> None:
        self.incoming.discard()


async def _awaited(result: Awaitable[None]) -> None:
    await result


def _native_syntaxes(ae: AE) -> frozenset[str]:
    """The abstract syntaxes an association may propose to be served natively: Verification and storage."""
    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax is not None}
    return frozenset({str(Verification)} | {str(cx.abstract_syntax) for cx in ae.supported_contexts
                                            if str(cx.abstract_syntax) in storage})


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _dicom_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and "\\" in value:
        return value.split("\\")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class NodeDirectory:
    """What forwarding needs of the image manager — its nodes registry, AE title and storage folder — in a
    process that does not run it (an ``ihehub worker`` delivering ``dicom://NODE`` and STOW-RS forwards),
    read from the same ``actors.dicom`` configuration."""

    settings: DicomSettings
    root: Path

    @property
    def ae_title(self) -> str:
        return self.settings.ae_title

    @classmethod
    def from_config(cls, config: DicomSettings | ListenerConfig | Mapping[str, Any] | None,
                    data_dir: Path | str) -> NodeDirectory:
        return cls(settings=_settings(config), root=Path(data_dir) / "dicom")


def _settings(config: DicomSettings | ListenerConfig | Mapping[str, Any] | None) -> DicomSettings:
    if config is None:
        return DicomSettings()
    if isinstance(config, DicomSettings):
        return config
    if isinstance(config, Mapping):
        return DicomSettings.from_mapping(config)
    # the hub's typed actors.dicom: the listener and, when it has them, the nodes of the registry
    return DicomSettings(ae_title=config.ae_title, port=config.port, nodes=parse_nodes(getattr(config, "nodes", None)),
                         study_quiet_seconds=float(getattr(config, "study_quiet_seconds", 30.0)),
                         tls_port=getattr(config, "tls_port", None),
                         routing_tags=tuple(getattr(config, "routing_tags", ()) or ()))
