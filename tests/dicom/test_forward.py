"""Forwarding through the bus: the ``dicom://`` destination (Storage SCU, PS3.4 B.2) of a channel sends the
instances a message names to Orthanc and to DCMTK storescp, as stored; the image manager's study-complete
message reaches it through a channel named ``dicom-studies``; failure statuses raise a retryable
DeliveryError carrying the per-instance report; bad URLs and bodies are refused clearly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from ihehub.bus.db import make_engine
from ihehub.bus.message import Message
from ihehub.bus.store import MessageQuery
from ihehub.channels.base import ConnectorError, DeliveryError
from ihehub.channels.dicom import DicomDestination, instance_paths
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.config import DicomActorConfig, load_channels, load_home
from ihehub.dicom import DicomNode, DicomSettings, ImageManager, StudyComplete
from ihehub.dicom.scu import StorageSCU, read_stored
from ihehub.dicom.tables import metadata
from ihehub.hub import Hub
from ihehub.tls import client_ssl_context, server_ssl_context
from tests.api.api_support import wait_for
from tests.channels.mllp_testkit import make_pki
from tests.conftest import free_port, loopback_config
from tests.dicom.dicomkit import LoopThread, make_instance, sample_file, store
from tests.dicom.peers import Orthanc, StoreSCP, dataset_bytes

STUDY = "1.2.826.0.1.3680043.8.498.2002"
J2K = "JPEG2000.dcm"


class Source:
    """An image manager holding one study of three instances and a JPEG 2000 instance, with Orthanc and a
    storescp that takes uncompressed syntaxes only."""

    def __init__(self, tmp: Path) -> None:
        self.engine = make_engine(f"sqlite:///{tmp}/index.sqlite")
        metadata.create_all(self.engine)
        self.orthanc = Orthanc(tmp / "orthanc")
        self.plain = StoreSCP(tmp / "plain", "PLAIN", accept=())
        nodes = (DicomNode(name="pacs2", ae_title="ORTHANC", host="127.0.0.1", port=self.orthanc.port),
                 DicomNode(name="plain", ae_title="PLAIN", host="127.0.0.1", port=self.plain.port))
        self.loop = LoopThread()
        self.manager = ImageManager(DicomSettings(port=0, host="127.0.0.1", nodes=nodes), self.engine, tmp / "data")
        self.loop.run(self.manager.start())
        files = [tmp / f"i{n}.dcm" for n in range(3)]
        self.uids = [str(make_instance(f, study_uid=STUDY, series_uid=STUDY + ".1", instance_number=n + 1,
                                       patient_id="FWD1").SOPInstanceUID) for n, f in enumerate(files)]
        store(self.manager, *files)
        store(self.manager, sample_file(J2K), flags=("-xw",))
        assert self.manager.flush(20)
        self.j2k = read_stored(Path(sample_file(J2K))).sop_instance_uid
        self.stored = {read_stored(p).sop_instance_uid: p for p in self.manager.root.rglob("*.dcm")}

    def close(self) -> None:
        self.loop.run(self.manager.stop())
        self.loop.close()
        self.engine.dispose()
        self.orthanc.stop()
        self.plain.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    src = Source(tmp_path_factory.mktemp("forward"))
    yield src
    src.close()


def _destination(url: str, context: ConnectorContext, **options: Any) -> DicomDestination:
    dest = Registry().build_destination(name="ch.dest", url=url, options=options, context=context)
    assert isinstance(dest, DicomDestination)
    return dest


def test_study_complete_is_forwarded_to_orthanc_through_a_channel(source: Source, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "inbox").mkdir()
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    orthanc = source.orthanc
    (home / "channels" / "dicom-studies.yaml").write_text(
        f'source: {{url: "file://{home}/inbox", options: {{poll_interval: 0.2, min_age: 0}}}}\n'
        f'destinations:\n'
        f'  - name: pacs2\n'
        f'    url: "dicom://ORTHANC@127.0.0.1:{orthanc.port}"\n'
        f'    options: {{root: "{source.manager.root}", calling_ae: FORWARDER}}\n', encoding="utf-8")
    cfg = loopback_config(load_home(home))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
    loop = LoopThread()
    loop.run(hub.start())
    try:
        now = time.time()
        event = StudyComplete(study_uid=STUDY, patient_id="FWD1", issuer="", accession_number="A1", num_series=1,
                              num_instances=3, received=3, calling_aes=("TESTSCU",), first_received_at=now,
                              last_received_at=now)
        loop.run(hub._study_complete(event))  # what the image manager calls when the study went quiet
        (row,) = wait_for(lambda: hub.store.search(MessageQuery(channel="dicom-studies")), 10, "the message")
        (delivery,) = wait_for(lambda: [d for d in hub.store.deliveries_of(row["id"]) if d["state"] == "sent"], 20,
                               "the delivery to Orthanc")
        report = json.loads(delivery["attempt_log"][-1]["response"])
        assert report["sent"] == 3 and report["failed"] == 0
        assert {i["sop_instance_uid"] for i in report["instances"]} == set(source.uids)
        assert set(source.uids) <= orthanc.wait_instances(set(source.uids))
        for uid in source.uids:
            assert dataset_bytes(orthanc.file_of(uid)) == dataset_bytes(source.stored[uid])
        # a study notification dropped into the channel's folder by another system takes the same way
        (home / "inbox" / "j2k.json").write_text(json.dumps({"sop_instance_uid": source.j2k}), encoding="utf-8")
        assert source.j2k in orthanc.wait_instances({source.j2k})
    finally:
        loop.run(hub.stop())
        loop.close()


def test_node_names_failures_and_retries(source: Source) -> None:
    context = ConnectorContext(services={"dicom": source.manager})
    dest = _destination("dicom://plain", context)  # by node name, from the image manager's registry
    assert dest.root == source.manager.root and dest.calling_ae == source.manager.ae_title
    body = json.dumps({"study_uid": STUDY}).encode()
    response = asyncio.run(dest.send(Message(channel="c", raw=body)))
    assert response.ok and json.loads(response.body)["sent"] == 3
    # PLAIN takes uncompressed syntaxes only: the JPEG 2000 instance fails (0122), the bus is to retry
    both = json.dumps([{"sop_instance_uid": source.j2k}, {"sop_instance_uid": source.uids[0]}]).encode()
    with pytest.raises(DeliveryError) as err:
        asyncio.run(dest.send(Message(channel="c", raw=both)))
    assert err.value.retryable and "1 of 2 instances failed" in str(err.value)
    report = json.loads(err.value.response or b"{}")
    assert [(i["sop_instance_uid"], i["status"]) for i in report["instances"]] == [(source.j2k, "0122"),
                                                                                  (source.uids[0], "0000")]
    # nobody listening: retryable
    gone = _destination(f"dicom://NOBODY@127.0.0.1:{free_port()}", context, timeout=5)
    with pytest.raises(DeliveryError) as err:
        asyncio.run(gone.send(Message(channel="c", raw=body)))
    assert err.value.retryable
    # a body naming nothing stored goes to dead letters at once
    for raw in (b"", b"{not json", json.dumps({"study_uid": "1.2.3.404"}).encode(), b'{"nothing": 1}',
                b"../../etc/passwd"):
        with pytest.raises(DeliveryError) as err:
            asyncio.run(dest.send(Message(channel="c", raw=raw)))
        assert not err.value.retryable, raw


def test_urls_options_and_bodies_are_checked(source: Source, tmp_path: Path) -> None:
    context = ConnectorContext(services={"dicom": source.manager})
    for url, why in (("dicom://", "names no node"), ("dicom://NOWHERE", "no DICOM node 'NOWHERE'"),
                     ("dicom://A@h:99999", "port"), ("dicom://PACS/x", "no path"),
                     ("dicom://TOO_LONG_AE_TITLE_X@127.0.0.1:104", "not a valid AE title")):
        with pytest.raises(ConnectorError, match=why):
            _destination(url, context)
    orphan = _destination("dicom://pacs2", ConnectorContext())  # a worker process: no image manager
    with pytest.raises(DeliveryError, match="not running") as err:
        asyncio.run(orphan.send(Message(channel="c", raw=b'{"study_uid": "1.2.3"}')))
    assert err.value.retryable
    with pytest.raises(ConnectorError, match="unknown option 'rot'"):
        _destination("dicom://pacs2", context, rot="x")
    root = source.manager.root
    text = "\n".join(str(p.relative_to(root)) for p in list(source.stored.values())[:2]).encode()
    assert instance_paths(text, root) == [root / p for p in text.decode().splitlines()]
    assert len(instance_paths(json.dumps({"study_uid": STUDY, "num_instances": 3}).encode(), root)) == 3
    assert len(instance_paths(json.dumps({"series_uid": STUDY + ".1"}).encode(), root)) == 3
    assert len(instance_paths(json.dumps({"paths": [str(source.stored[source.j2k])]}).encode(), root)) == 1
    with pytest.raises(ValueError, match="outside"):
        instance_paths(json.dumps({"paths": ["/etc/passwd"]}).encode(), root)


def test_storage_scu_batch_on_one_association(source: Source) -> None:
    """The SCU alone: one association for the batch, per-instance status, a file that is not DICOM."""
    node = DicomNode(name="pacs2", ae_title="ORTHANC", host="127.0.0.1", port=source.orthanc.port)
    scu = StorageSCU(calling_ae="IHEHUB", node=node)
    paths = [*source.stored.values(), Path(sample_file(J2K)).with_name("no-such-file.dcm")]
    results = scu.send_all(paths)
    assert [r.success for r in results] == [True] * len(source.stored) + [False]
    assert results[-1].status == 0xC000 and results[-1].comment
    j2k = next(r for r in results if r.sop_instance_uid == source.j2k)
    assert j2k.transfer_syntax == read_stored(source.stored[source.j2k]).transfer_syntax and not j2k.converted
    with pytest.raises(ValueError, match="TLS"):
        StorageSCU(calling_ae="IHEHUB", node=DicomNode(name="s", ae_title="S", host="h", port=1, tls=True))


def test_tls_nodes_for_the_storage_scu_and_forwarding(source: Source, tmp_path: Path) -> None:
    """A node with ``tls: true`` (PS3.15 B.1): the Storage SCU (which C-MOVE uses with the manager's
    ``client_ssl_context``) and a ``dicom://`` destination with ``options.tls``, to another image manager
    whose TLS listener requires a client certificate; without TLS the destination fails and is retried."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server = server_ssl_context(pki["server"], pki["server_key"], pki["ca"], require_client_cert=True)
    engine = make_engine(f"sqlite:///{tmp_path}/secure.sqlite")
    metadata.create_all(engine)
    loop = LoopThread()
    secure = ImageManager(DicomSettings(port=0, host="127.0.0.1", tls_port=0, ae_title="SECURE"), engine,
                          tmp_path / "secure", ssl_context=server)
    loop.run(secure.start())
    try:
        client = client_ssl_context(pki["ca"], pki["client"], pki["client_key"])
        node = DicomNode(name="secure", ae_title="SECURE", host="127.0.0.1", port=secure.tls_port, tls=True)
        results = StorageSCU(calling_ae="IHEHUB", node=node, ssl_context=client).send_all(
            [source.stored[source.uids[0]]])
        assert [r.status for r in results] == [0x0000]
        dest = _destination(f"dicom://SECURE@127.0.0.1:{secure.tls_port}", ConnectorContext(home=str(tmp_path)),
                            root=str(source.manager.root),
                            tls={"ca": pki["ca"], "cert": pki["client"], "key": pki["client_key"]})
        response = asyncio.run(dest.send(Message(channel="c", raw=json.dumps({"study_uid": STUDY}).encode())))
        assert response.ok and json.loads(response.body)["sent"] == 3
        plain = _destination(f"dicom://SECURE@127.0.0.1:{secure.tls_port}", ConnectorContext(home=str(tmp_path)),
                             root=str(source.manager.root), timeout=5)  # no TLS to a TLS port: fails, retried
        with pytest.raises(DeliveryError) as err:
            asyncio.run(plain.send(Message(channel="c", raw=json.dumps({"study_uid": STUDY}).encode())))
        assert err.value.retryable
        assert secure.flush(10)
        assert {read_stored(p).sop_instance_uid for p in secure.root.rglob("*.dcm")} == set(source.uids)
    finally:
        loop.run(secure.stop())
        loop.close()
        engine.dispose()


def test_hub_nodes_from_ihehub_yaml_serve_c_move_and_dicom_node_urls(source: Source, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``actors.dicom.nodes`` of ihehub.yaml: the hub's image manager moves to them and a channel's
    ``dicom://NODE`` destination finds them (and the hub's storage folder)."""
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "inbox").mkdir()
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    (home / "ihehub.yaml").write_text(
        "actors:\n  dicom:\n    nodes:\n"
        f"      pacs2: {{ae_title: ORTHANC, host: 127.0.0.1, port: {source.orthanc.port}}}\n", encoding="utf-8")
    (home / "channels" / "fwd.yaml").write_text(
        f'source: {{url: "file://{home}/inbox", options: {{poll_interval: 0.2, min_age: 0}}}}\n'
        'destinations:\n  - {name: pacs2, url: "dicom://pacs2"}\n', encoding="utf-8")
    cfg: Any = load_home(home)
    assert cfg.actors.dicom.nodes["pacs2"]["ae_title"] == "ORTHANC"
    cfg = loopback_config(cfg)
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(
        cfg.actors, dicom=DicomActorConfig(port=0, nodes=load_home(home).actors.dicom.nodes)))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    loop = LoopThread()
    loop.run(hub.start())
    try:
        manager: ImageManager = hub.dicom
        files = [tmp_path / f"h{n}.dcm" for n in range(2)]
        uids = [str(make_instance(f, study_uid=STUDY + ".9", patient_id="HUB1").SOPInstanceUID) for f in files]
        store(manager, files[0])
        store(manager, files[1])
        assert manager.flush(20)
        ae = AE(ae_title="PYMOVE")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
        try:
            ident = Dataset()
            ident.QueryRetrieveLevel = "IMAGE"
            ident.SOPInstanceUID = uids[0]
            statuses = [s.Status for s, _ in assoc.send_c_move(ident, "ORTHANC",
                                                                 StudyRootQueryRetrieveInformationModelMove)]
        finally:
            assoc.release()
        assert statuses == [0x0000]
        assert uids[0] in source.orthanc.wait_instances({uids[0]})
        (home / "inbox" / "one.json").write_text(json.dumps({"sop_instance_uid": uids[1]}), encoding="utf-8")
        assert uids[1] in source.orthanc.wait_instances({uids[1]})
    finally:
        loop.run(hub.stop())
        loop.close()


def test_a_worker_delivers_dicom_node_urls_from_ihehub_yaml(source: Source, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``ihehub worker`` runs no image manager: its ``dicom://NODE`` destinations find the node, the AE
    title and the storage folder in the same ``actors.dicom`` configuration (before, each delivery failed
    and was retried until a serve process took it)."""
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    (home / "ihehub.yaml").write_text(
        "actors:\n  dicom:\n    ae_title: HUBW\n    nodes:\n"
        f"      plain: {{ae_title: PLAIN, host: 127.0.0.1, port: {source.plain.port}}}\n", encoding="utf-8")
    (home / "channels" / "fwd.yaml").write_text(
        'source: {url: "http://127.0.0.1:0/fwd"}\ndestinations:\n  - {name: plain, url: "dicom://plain"}\n',
        encoding="utf-8")
    cfg: Any = loopback_config(load_home(home))
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(
        cfg.actors, dicom=dataclasses.replace(load_home(home).actors.dicom, port=0)))  # a worker listens on none
    stored = source.stored[source.uids[2]]
    target = cfg.data_dir / "dicom" / stored.relative_to(source.manager.root)
    target.parent.mkdir(parents=True)
    target.write_bytes(stored.read_bytes())
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, role="worker")
    loop = LoopThread()
    loop.run(hub.start())
    try:
        assert hub.dicom is None and hub.services["dicom_nodes"].ae_title == "HUBW"
        msg = Message(channel="fwd", raw=json.dumps({"sop_instance_uid": source.uids[2]}).encode(),
                      content_type="application/json")
        # what the worker's broker consumer does with a claimed delivery: its destination sends it
        response = loop.run(hub.destinations["fwd/plain"].connector.send(msg))
        assert response.ok and json.loads(response.body)["sent"] == 1
        assert any(p.name.endswith(source.uids[2]) or source.uids[2] in p.name
                   for p in source.plain.folder.rglob("*")), "storescp did not write the instance"
    finally:
        loop.run(hub.stop())
        loop.close()


def test_tag_morphing_through_a_mapping(source: Source, tmp_path: Path) -> None:
    """options.mapping: each instance goes through a DICOM mapping (base: input) before C-STORE; the peer
    gets the coerced Patient ID and a Chinese Institution Name, pixel data untouched; the stored file is
    unchanged.  A mapping that fails is a permanent error naming the instance."""
    import pydicom

    (tmp_path / "morph.yaml").write_text(
        "name: morph\ninput: {kind: dicom}\noutput: {kind: dicom, base: input}\nrules:\n"
        '  - PatientID <- concat("R-", PatientID)\n  - InstitutionName <- "区人民医院"\n', encoding="utf-8")
    context = ConnectorContext(home=str(tmp_path), services={"dicom": source.manager})
    for f in source.plain.files():
        f.unlink()
    dest = _destination("dicom://plain", context, mapping="morph.yaml")
    body = json.dumps({"sop_instance_uid": source.uids[0]}).encode()
    assert asyncio.run(dest.send(Message(channel="c", raw=body))).ok
    (got,) = source.plain.wait_files(1)
    sent, stored = pydicom.dcmread(got), pydicom.dcmread(source.stored[source.uids[0]])
    assert sent.PatientID == "R-FWD1" and sent.InstitutionName == "区人民医院"
    assert sent.SOPInstanceUID == stored.SOPInstanceUID and sent.PixelData == stored.PixelData
    assert stored.PatientID == "FWD1"  # the archive keeps what came
    (tmp_path / "bad.yaml").write_text("name: bad\ninput: {kind: dicom}\noutput: {kind: dicom}\nrules:\n"
                                       "  - PatientID <- nosuch(PatientID)\n", encoding="utf-8")
    with pytest.raises(ConnectorError, match=r"bad\.yaml"):
        _destination("dicom://plain", context, mapping="bad.yaml")
