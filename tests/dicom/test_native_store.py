"""The native upper layer for storage associations (`ihehub.dicom.native`) against real peers.

DCMTK storescu/echoscu, pynetdicom SCUs and a scripted raw-socket peer (PDUs encoded here, PS3.8 9.3) on
loopback: storage-only associations are served natively (counted by ``native_associations``), mixed ones
(C-FIND proposed too) and TLS ones by pynetdicom; protocol errors get an A-ABORT and the server goes on.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, pdu, pdu_primitives
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context
from sqlalchemy import Engine

from ihehub.atna import AuditContext
from ihehub.bus.db import make_engine
from ihehub.dicom import DicomNode, DicomSettings, ImageManager
from ihehub.dicom.scu import StorageSCU
from ihehub.dicom.tables import metadata
from ihehub.tls import client_ssl_context, server_ssl_context
from tests.channels.mllp_testkit import make_pki
from tests.dicom.conftest import ManagerFactory
from tests.dicom.dicomkit import LoopThread, dcmtk, make_instance, query, sample_file, store
from tests.dicom.test_store import COMPRESSED

SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def instance_files(manager: ImageManager) -> list[Path]:
    return sorted(p for p in manager.root.rglob("*.dcm") if ".incoming" not in p.parts)


def partial_files(manager: ImageManager) -> list[Path]:
    return list((manager.root / ".incoming").glob("*")) if (manager.root / ".incoming").exists() else []


# -- a scripted peer: PDUs of PS3.8 9.3 on a raw socket ------------------------------------------------
class RawPeer:
    """An association requestor speaking PDUs directly, to send what no toolkit would."""

    def __init__(self, port: int, *, calling: str = "RAWSCU", called: str = "IHEHUB") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title = calling
        primitive.called_ae_title = called
        cx_sc = build_context(SC, [EXPLICIT])
        cx_sc.context_id = 1
        cx_echo = build_context(VERIFICATION, [EXPLICIT])
        cx_echo.context_id = 3
        primitive.presentation_context_definition_list = [cx_sc, cx_echo]
        max_length = pdu_primitives.MaximumLengthNotification()
        max_length.maximum_length_received = 16384
        class_uid = pdu_primitives.ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.9999"
        primitive.user_information = [max_length, class_uid]
        rq = pdu.A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        self.sock.sendall(rq.encode())
        kind, body = self.read_pdu()
        assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {kind:#04x}"
        ac = pdu.A_ASSOCIATE_AC()
        ac.decode(bytes((kind, 0)) + struct.pack(">I", len(body)) + body)
        self.accepted = {cx.context_id for cx in ac.to_primitive().presentation_context_definition_results_list
                         if cx.result == 0}

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._exact(6)
        kind, length = struct.unpack(">BxI", head)
        return kind, self._exact(length)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def pdv(self, context_id: int, control: int, data: bytes) -> bytes:
        item = struct.pack(">IBB", 2 + len(data), context_id, control) + data
        return struct.pack(">BxI", 0x04, len(item)) + item

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def store(self, ds: Dataset, *, message_id: int = 1, last: bool = True) -> None:
        """C-STORE-RQ command and the data set (explicit VR little endian) in one fragment."""
        command = _command(0x0001, message_id, sop_class=str(ds.get("SOPClassUID", SC)),
                           sop_instance=str(ds.get("SOPInstanceUID", generate_uid())), has_dataset=True)
        self.send(self.pdv(1, 0x03, command) + self.pdv(1, 0x02 if last else 0x00, encode(ds)))

    def response_status(self) -> int:
        kind, body = self.read_pdu()
        assert kind == 0x04, f"expected P-DATA-TF, got PDU type {kind:#04x}"
        length, _cx, control = struct.unpack_from(">IBB", body)
        assert control == 0x03
        fields = _elements(body[6:4 + length])
        return int(struct.unpack("<H", fields[0x0900])[0])

    def close(self) -> None:
        self.sock.close()


def _command(field: int, message_id: int, *, sop_class: str, sop_instance: str | None = None,
             has_dataset: bool) -> bytes:
    def element(el: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, el, len(value)) + value

    def uid(value: str) -> bytes:
        raw = value.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    body = element(0x0002, uid(sop_class)) + element(0x0100, struct.pack("<H", field)) + \
        element(0x0110, struct.pack("<H", message_id)) + element(0x0700, struct.pack("<H", 0)) + \
        element(0x0800, struct.pack("<H", 0x0000 if has_dataset else 0x0101))
    if sop_instance is not None:
        body += element(0x1000, uid(sop_instance))
    return element(0x0000, struct.pack("<I", len(body))) + body


def _elements(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        _group, el, length = struct.unpack_from("<HHI", data, pos)
        out[el] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


def encode(ds: Dataset) -> bytes:
    """The data set in explicit VR little endian (no File Meta Information)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def sc_dataset(**overrides: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "RAW1"
    ds.Modality = "OT"
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


@pytest.fixture
def raw_peers() -> Iterator[list[RawPeer]]:
    opened: list[RawPeer] = []
    yield opened
    for peer in opened:
        peer.close()


# -- tests ---------------------------------------------------------------------------------------------
def test_storescu_files_go_the_native_path(start_manager: ManagerFactory, sqlite_engine: Engine,
                                          tmp_path: Path) -> None:
    """Uncompressed, compressed (each proposed in its own syntax) and Chinese (GB18030, ISO_IR 192) files over
    native associations; every file is byte for byte what the pynetdicom path stores from the same storescu."""
    manager = start_manager(sqlite_engine)
    reference = start_manager(sqlite_engine, native_store=False, data_dir=tmp_path / "reference")
    before = manager.native_associations
    plain = ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "chrX1.dcm", "chrX2.dcm")
    for target in (manager, reference):
        store(target, *[sample_file(n) for n in plain])
        for name, flag in COMPRESSED.items():
            store(target, sample_file(name), flags=(flag,))
    assert manager.native_associations == before + 1 + len(COMPRESSED)
    assert reference.native_associations == 0
    assert manager.stored == reference.stored == len(plain) + len(COMPRESSED)
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in instance_files(manager)}
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in instance_files(reference)}
    assert set(stored) == set(expected) and len(stored) >= 7  # compressed samples share SOP Instance UIDs
    for uid, path in stored.items():
        assert path.read_bytes() == expected[uid].read_bytes(), uid  # File Meta Information and data set
    for path in stored.values():
        assert pydicom.dcmread(path).file_meta.SourceApplicationEntityTitle == "TESTSCU"
    for name in ("chrX1.dcm", "chrX2.dcm"):
        chinese = pydicom.dcmread(sample_file(name))
        got = pydicom.dcmread(stored[str(chinese.SOPInstanceUID)])
        assert got.SpecificCharacterSet == chinese.SpecificCharacterSet
        assert str(got.PatientName) == str(chinese.PatientName) and "王" in str(got.PatientName)
    assert not partial_files(manager)


def test_echo_is_native(start_manager: ManagerFactory, sqlite_engine: Engine) -> None:
    manager = start_manager(sqlite_engine)
    before = manager.native_associations
    res = dcmtk("echoscu", "-aet", "TESTSCU", "-aec", manager.ae_title, "127.0.0.1", str(manager.port))
    assert res.returncode == 0, res.stderr
    assert manager.native_associations == before + 1


def test_mixed_association_goes_to_pynetdicom(start_manager: ManagerFactory, sqlite_engine: Engine,
                                              tmp_path: Path) -> None:
    """Storage and C-FIND proposed together: pynetdicom serves the association, both services work."""
    manager = start_manager(sqlite_engine)
    path = tmp_path / "one.dcm"
    ds = make_instance(path, patient_id="MIX1")
    ae = AE(ae_title="MIXED")
    ae.add_requested_context(SC, [EXPLICIT])
    ae.add_requested_context(STUDY_FIND)
    before = manager.native_associations
    assoc = ae.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
        assert manager.flush(10)
        results = list(assoc.send_c_find(query("STUDY", PatientID="MIX1", StudyInstanceUID=""), STUDY_FIND))
    finally:
        assoc.release()
    assert [int(s.Status) for s, _ in results] == [0xFF00, 0x0000]
    assert str(results[0][1].StudyInstanceUID) == str(ds.StudyInstanceUID)
    assert manager.native_associations == before  # not served natively
    assert manager.stored == 1


def test_unknown_caller_rejected_natively(start_manager: ManagerFactory, sqlite_engine: Engine,
                                          tmp_path: Path) -> None:
    from ihehub.dicom.settings import parse_nodes

    manager = start_manager(sqlite_engine, require_known_callers=True,
                            nodes=parse_nodes({"ct": {"ae_title": "MODALITY1", "host": "127.0.0.1"}}))
    make_instance(tmp_path / "a.dcm")
    refused = dcmtk("storescu", "-aet", "STRANGER", "-aec", manager.ae_title, "127.0.0.1", str(manager.port),
                    str(tmp_path / "a.dcm"))
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr, refused.stderr
    assert manager.rejected == 1 and manager.native_associations == 0 and not instance_files(manager)
    store(manager, tmp_path / "a.dcm", aet="MODALITY1")
    assert manager.native_associations == 1 and len(instance_files(manager)) == 1


def test_bad_data_sets_answered_and_the_association_goes_on(start_manager: ManagerFactory,
                                                             sqlite_engine: Engine,
                                                             raw_peers: list[RawPeer]) -> None:
    """Corrupt data set -> C000, no SOP Instance UID -> A900, each on the same association as a good one."""
    manager = start_manager(sqlite_engine)
    peer = RawPeer(manager.port)
    raw_peers.append(peer)
    assert peer.accepted == {1, 3}
    good = sc_dataset()
    bad = sc_dataset()
    corrupt = encode(bad) + b"\x10\x00\x10\x00PN\x40\x00ab"  # a last element of 64 bytes with 2 of them
    command = _command(0x0001, 1, sop_class=SC, sop_instance=str(bad.SOPInstanceUID), has_dataset=True)
    peer.send(peer.pdv(1, 0x03, command) + peer.pdv(1, 0x02, corrupt))
    assert peer.response_status() == 0xC000
    peer.store(sc_dataset(SOPInstanceUID=None), message_id=2)
    assert peer.response_status() == 0xA900
    peer.store(good, message_id=3)
    assert peer.response_status() == 0x0000
    peer.send(peer.pdv(3, 0x03, _command(0x0030, 4, sop_class=VERIFICATION, has_dataset=False)))
    assert peer.response_status() == 0x0000
    peer.send(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-RELEASE-RQ
    assert peer.read_pdu() == (0x06, b"\0\0\0\0")  # A-RELEASE-RP
    assert manager.native_associations == 1 and manager.stored == 1
    assert [p.stem for p in instance_files(manager)] == [str(good.SOPInstanceUID)]
    assert not partial_files(manager)


def test_peer_aborts_mid_data_set(start_manager: ManagerFactory, sqlite_engine: Engine,
                                  raw_peers: list[RawPeer]) -> None:
    """The first fragment of a data set, then A-ABORT (or a vanished peer): nothing is stored or left."""
    manager = start_manager(sqlite_engine)
    for ending in (bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)), b""):
        peer = RawPeer(manager.port)
        raw_peers.append(peer)
        peer.store(sc_dataset(), last=False)  # a first fragment only
        if ending:
            peer.send(ending)
        peer.close()
    res = dcmtk("echoscu", "-aec", manager.ae_title, "127.0.0.1", str(manager.port))
    assert res.returncode == 0, res.stderr  # the server goes on
    assert manager.native_associations == 3 and manager.stored == 0
    assert not instance_files(manager) and not partial_files(manager)


@pytest.mark.parametrize(("send", "reason"), [
    (bytes((0x09, 0, 0, 0, 0, 2, 0, 0)), 0x01),  # unrecognized PDU type
    (bytes((0x01, 0, 0, 0, 0, 2, 0, 0)), 0x02),  # A-ASSOCIATE-RQ on an established association
    (struct.pack(">BxI", 0x04, 6) + struct.pack(">IBB", 100, 1, 0x03), 0x06),  # PDV longer than its PDU
    (struct.pack(">BxI", 0x04, 8) + struct.pack(">IBB", 4, 9, 0x03) + b"ab", 0x06),  # context 9 not accepted
    (struct.pack(">BxI", 0x04, 8) + struct.pack(">IBB", 4, 1, 0x02) + b"ab", 0x06),  # data set without command
])
def test_malformed_pdus_get_an_abort(start_manager: ManagerFactory, sqlite_engine: Engine,
                                     raw_peers: list[RawPeer], send: bytes, reason: int) -> None:
    manager = start_manager(sqlite_engine)
    peer = RawPeer(manager.port)
    raw_peers.append(peer)
    peer.send(send)
    assert peer.read_pdu() == (0x07, bytes((0, 0, 0x02, reason)))  # A-ABORT, service provider, reason
    assert peer.sock.recv(1) == b""  # and the connection is closed
    res = dcmtk("echoscu", "-aec", manager.ae_title, "127.0.0.1", str(manager.port))
    assert res.returncode == 0, res.stderr


def test_c_find_on_a_storage_only_association_is_aborted(start_manager: ManagerFactory, sqlite_engine: Engine,
                                                         raw_peers: list[RawPeer]) -> None:
    manager = start_manager(sqlite_engine)
    peer = RawPeer(manager.port)
    raw_peers.append(peer)
    peer.send(peer.pdv(1, 0x03, _command(0x0020, 1, sop_class=SC, has_dataset=False)))
    assert peer.read_pdu() == (0x07, bytes((0, 0, 0x02, 0x06)))


def test_audit_and_concurrent_associations(tmp_path: Path, sqlite_engine: Engine) -> None:
    """Four storescu at once, each its own native association; one DICOM Instances Transferred audit per
    association (PS3.15 A.5.3.4) naming the caller and its instances."""
    audits: list[Any] = []
    manager = ImageManager(DicomSettings(port=0, host="127.0.0.1"), sqlite_engine, tmp_path / "data",
                           audit=AuditContext(source_id="archive", sinks=(audits.append,)))
    loop = LoopThread()
    loop.run(manager.start())
    try:
        folders = []
        for n in range(4):
            folder = tmp_path / f"in{n}"
            folder.mkdir()
            study = generate_uid()
            for i in range(5):
                make_instance(folder / f"{i}.dcm", study_uid=study, patient_id=f"CONC{n}", instance_number=i + 1)
            folders.append(folder)
        procs = [subprocess.Popen(["storescu", "+sd", "-aet", f"CALLER{n}", "-aec", manager.ae_title, "127.0.0.1",
                                   str(manager.port), str(folder)], env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for n, folder in enumerate(folders)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        assert manager.native_associations == 4 and manager.stored == 20
        assert len(instance_files(manager)) == 20
        deadline = time.monotonic() + 5  # the audit of an association follows its close
        while len([m for m in audits if m.event.event_id.code == "110104"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        transferred = [m for m in audits if m.event.event_id.code == "110104"]
        assert len(transferred) == 4
        assert all(m.event.action == "C" for m in transferred)
        callers = {p.user_id for m in transferred for p in m.participants if p.user_id.startswith("CALLER")}
        assert callers == {"CALLER0", "CALLER1", "CALLER2", "CALLER3"}
        assert sorted(pid for m in transferred for pid in m.patient_ids()) == ["CONC0", "CONC1", "CONC2", "CONC3"]
    finally:
        loop.run(manager.stop())
        loop.close()


def test_tls_listener_stays_on_pynetdicom(tmp_path: Path) -> None:

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    engine = make_engine(f"sqlite:///{tmp_path}/tls.sqlite")
    metadata.create_all(engine)
    manager = ImageManager(DicomSettings(port=0, host="127.0.0.1", tls_port=0), engine, tmp_path / "data",
                           ssl_context=server_ssl_context(pki["server"], pki["server_key"], pki["ca"]))
    loop = LoopThread()
    loop.run(manager.start())
    try:
        path = tmp_path / "one.dcm"
        make_instance(path)
        node = DicomNode(name="hub", ae_title=manager.ae_title, host="127.0.0.1", port=manager.tls_port, tls=True)
        client = client_ssl_context(pki["ca"], pki["client"], pki["client_key"])
        results = StorageSCU(calling_ae="TLSSCU", node=node, ssl_context=client).send_all([path])
        assert [r.status for r in results] == [0x0000]
        assert manager.stored == 1 and manager.native_associations == 0
        store(manager, path)  # the plain listener of the same manager: native
        assert manager.native_associations == 1 and manager.stored == 2
    finally:
        loop.run(manager.stop())
        loop.close()
        engine.dispose()


def test_native_store_off(start_manager: ManagerFactory, sqlite_engine: Engine, tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine, native_store=False)
    make_instance(tmp_path / "a.dcm")
    store(manager, tmp_path / "a.dcm")
    assert manager.stored == 1 and manager.native_associations == 0


def test_idle_association_is_aborted(start_manager: ManagerFactory, sqlite_engine: Engine,
                                     raw_peers: list[RawPeer]) -> None:
    """``idle_timeout``: a native association silent for that long gets an A-ABORT and is closed."""
    manager = start_manager(sqlite_engine, idle_timeout=0.5)
    peer = RawPeer(manager.port)
    raw_peers.append(peer)
    started = time.monotonic()
    assert peer.read_pdu() == (0x07, bytes((0, 0, 0x02, 0x00)))
    assert 0.4 < time.monotonic() - started < 5
    assert peer.sock.recv(1) == b""


def test_large_association_request_goes_to_pynetdicom(start_manager: ManagerFactory, sqlite_engine: Engine,
                                                      tmp_path: Path) -> None:
    """An A-ASSOCIATE-RQ too large to peek at whole (120 storage contexts x 45 syntaxes, ~150 KB) is left
    to pynetdicom, which serves it."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

    manager = start_manager(sqlite_engine)
    ds = make_instance(tmp_path / "a.dcm")
    ae = AE(ae_title="BIGRQ")
    ae.add_requested_context(SC, [EXPLICIT])
    for cx in AllStoragePresentationContexts[:119]:
        if cx.abstract_syntax != SC:
            ae.add_requested_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    assoc = ae.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    assert manager.stored == 1 and manager.native_associations == 0


def test_max_associations_counts_both_paths(start_manager: ManagerFactory, sqlite_engine: Engine,
                                            raw_peers: list[RawPeer]) -> None:
    """``max_associations: 1``: an open native association refuses a pynetdicom one and the other way round
    (A-ASSOCIATE-RJ rejected-transient, local limit exceeded)."""
    manager = start_manager(sqlite_engine, max_associations=1)
    peer = RawPeer(manager.port)  # native, stays open
    raw_peers.append(peer)
    mixed = AE(ae_title="MIXED")
    mixed.add_requested_context(STUDY_FIND)
    refused = mixed.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
    assert refused.is_rejected
    peer.send(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    assert peer.read_pdu()[0] == 0x06
    deadline = time.monotonic() + 5  # the native association and pynetdicom's refused acceptor thread end
    while ((manager._native is not None and manager._native.count()) or manager._pynetdicom_acceptors()) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    held = mixed.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)  # pynetdicom, stays open
    assert held.is_established
    try:
        res = dcmtk("echoscu", "-aec", manager.ae_title, "127.0.0.1", str(manager.port))
        assert res.returncode != 0 and "Local Limit Exceeded" in res.stderr, res.stderr
    finally:
        held.release()


def test_pynetdicom_requestors_get_every_fast_response(start_manager: ManagerFactory, sqlite_engine: Engine) -> None:
    """The native path answers within pynetdicom's reactor pause race (issue #875 there): `keep_responses` hands
    a response the reactor took back to the waiting ``send_*`` call.  The hub's own SCU (forwarding, C-MOVE)
    installs it at connection time; 300 echoes and 100 stores on one association all get their answers."""
    from pydicom.dataset import FileMetaDataset
    from pynetdicom.dimse_primitives import C_ECHO

    from ihehub.dicom.transport import keep_responses

    manager = start_manager(sqlite_engine)
    ae = AE(ae_title="FASTSCU")
    ae.add_requested_context(SC, [EXPLICIT])
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
    assert assoc.is_established
    keep_responses(assoc)
    try:
        # the rule itself: a response taken while a send_* call holds the checkpoint goes back on the queue
        rsp = C_ECHO()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0x0000
        assoc._reactor_checkpoint.clear()
        try:
            assoc._serve_request(rsp, 1)
            assert assoc.dimse.msg_queue.get_nowait() == (1, rsp)
        finally:
            assoc._reactor_checkpoint.set()
        statuses = [int(assoc.send_c_echo(msg_id=i % 65536).Status) for i in range(1, 301)]
        for _ in range(100):
            ds = sc_dataset(PatientID="FAST")
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = EXPLICIT
            statuses.append(int(assoc.send_c_store(ds).Status))
    finally:
        assoc.release()
    assert statuses == [0x0000] * 400
    assert manager.native_associations >= 1
