"""Routing rules on the wire: DCMTK storescu sends studies from two modalities' AE titles, the image manager
reports each complete with what routing needs (modalities, descriptions, calling AEs, series, configured tags),
a channel ``dicom-studies`` routes them with ``json.`` filters per destination: the CT chest study reaches one
DCMTK storescp and, over STOW-RS (``dicomweb+http://``), a second hub's /dicomweb; the MR study reaches the
other storescp only; a head CT goes nowhere.  Then the STOW-RS destination's outcomes (against the second hub
and Orthanc's DICOMweb plugin), the StudyComplete fields on SQLite and PostgreSQL, and the routing tags."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from ihehub.api import create_token
from ihehub.bus.message import Message
from ihehub.bus.store import MessageQuery
from ihehub.channels.base import ConnectorError, DeliveryError
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.channels.stowrs import StowDestination, stow_batches
from ihehub.config import DicomActorConfig, load_channels, load_home, validate_home
from ihehub.dicom import DicomSettings, StudyComplete
from ihehub.dicom.routing import first_instance, parse_routing_tags
from ihehub.dicom.settings import InvalidSettings
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import free_port, loopback_config
from tests.dicom.conftest import ManagerFactory
from tests.dicom.dicomkit import make_instance, store
from tests.dicom.peers import Orthanc, StoreSCP, dataset_bytes


def _instance(path: Path, *, body_part: str, protocol: str, institution: str = "区人民医院",
              referring: str = "Wang^Wei", **kw: Any) -> str:
    ds = make_instance(path, charset="ISO_IR 192", **kw)
    ds.BodyPartExamined = body_part
    ds.ProtocolName = protocol
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = referring
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


@dataclasses.dataclass
class Target:
    """A second hub: image manager and /dicomweb (auth required), the STOW-RS peer."""

    hub: Hub
    loop: LoopThread
    token: str
    readonly: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.hub.http_port}/dicomweb"

    def stored(self) -> dict[str, Path]:
        self.hub.dicom.flush(10)
        return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                for p in self.hub.dicom.root.rglob("*.dcm")}


def _start_hub(home: Path, dicom: DicomActorConfig) -> tuple[Hub, LoopThread]:
    cfg: Any = loopback_config(load_home(home, environ={"IHEHUB_HTTP_PORT": "0"}))
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(cfg.actors, dicom=dicom))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    loop = LoopThread()
    loop.run(hub.start(), timeout=60)
    return hub, loop


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("stow-target") / "home"
    (home / "channels").mkdir(parents=True)
    hub, loop = _start_hub(home, DicomActorConfig(enabled=True, port=0, ae_title="TARGET"))
    try:
        yield Target(hub=hub, loop=loop, token=create_token(hub.store, role="operator", name="router"),
                     readonly=create_token(hub.store, role="readonly", name="viewer"))
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()


def test_studies_are_routed_by_ae_modality_description_and_tags(tmp_path: Path, target: Target,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "inbox").mkdir()
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    ai, mr = StoreSCP(tmp_path / "ai", "AIBOX"), StoreSCP(tmp_path / "mr", "MRBOX")
    by_series = StoreSCP(tmp_path / "series", "SERIESBOX")
    (home / "ihehub.yaml").write_text(
        "actors:\n  dicom:\n    study_quiet_seconds: 1\n"
        '    routing_tags: [BodyPartExamined, "(0018,1030)", "0008,0080"]\n', encoding="utf-8")
    (home / "channels" / "dicom-studies.yaml").write_text(f"""\
source: {{url: "file://{home}/inbox", options: {{poll_interval: 0.2, min_age: 0}}}}
destinations:
  - name: ai
    url: "dicom://AIBOX@127.0.0.1:{ai.port}"
    filter:
      - 'json.modalities contains "CT" and json.calling_aes contains "CT01"'
      - 'json.study_description =~ "(?i)chest"'
      - 'json.tags.BodyPartExamined == "CHEST"'
  - name: mr
    url: "dicom://MRBOX@127.0.0.1:{mr.port}"
    filter: 'json.modalities contains "MR" and json.calling_aes contains "MR01"'
  - name: web
    url: "dicomweb+http://127.0.0.1:{target.hub.http_port}/dicomweb"
    filter: 'json.series.tags.ProtocolName == "LUNG" and json.institution_name == "区人民医院"'
    options: {{token: "{target.token}"}}
""", encoding="utf-8")
    (home / "channels" / "dicom-series.yaml").write_text(f"""\
source: {{url: "file://{home}/series-inbox", options: {{poll_interval: 0.2, min_age: 0}}}}
destinations:
  - name: mr-only
    url: "dicom://SERIESBOX@127.0.0.1:{by_series.port}"
    filter: 'json.modality == "MR" and json.calling_aes contains "MR01" and json.modalities contains "OT"'
""", encoding="utf-8")
    (home / "series-inbox").mkdir()
    yaml_dicom = load_home(home).actors.dicom
    assert yaml_dicom.routing_tags == ("BodyPartExamined", "(0018,1030)", "0008,0080")
    hub, loop = _start_hub(home, dataclasses.replace(yaml_dicom, enabled=True, port=0))
    try:
        chest, brain, head, chest_series = generate_uid(), generate_uid(), generate_uid(), generate_uid()
        ct = [_instance(tmp_path / f"ct{n}.dcm", study_uid=chest, series_uid=chest_series, modality="CT",
                        description="Chest CT 胸部平扫", body_part="CHEST", protocol="LUNG", instance_number=n + 1,
                        patient_id="R1") for n in range(2)]
        mri = [_instance(tmp_path / "mr0.dcm", study_uid=brain, modality="MR", description="Brain MR",
                         body_part="HEAD", protocol="T2", patient_id="R2", institution="Other Hospital"),
               _instance(tmp_path / "mr1.dcm", study_uid=brain, modality="OT", description="Brain MR",  # a localizer
                         body_part="HEAD", protocol="LOC", patient_id="R2", institution="Other Hospital",
                         series_number=2)]
        skull = [_instance(tmp_path / "head0.dcm", study_uid=head, modality="CT", description="Head CT",
                           body_part="HEAD", protocol="BRAIN", patient_id="R3")]
        store(hub.dicom, tmp_path / "ct0.dcm", tmp_path / "ct1.dcm", aet="CT01")
        store(hub.dicom, tmp_path / "mr0.dcm", tmp_path / "mr1.dcm", aet="MR01")
        store(hub.dicom, tmp_path / "head0.dcm", aet="CT01")

        def settled(channel: str = "dicom-studies", count: int = 3) -> list[dict[str, Any]]:
            rows = hub.store.search(MessageQuery(channel=channel))
            if len(rows) < count:
                return []
            out = []
            for r in rows:
                deliveries = hub.store.deliveries_of(r["id"])
                if any(d["state"] != "sent" for d in deliveries):
                    return []
                out.append({"body": json.loads(hub.store.body(r["id"]) or b"{}"),
                            "to": sorted(d["destination"] for d in deliveries)})
            return out

        routed = {m["body"]["study_uid"]: m for m in wait_for(settled, 40, "three studies routed and sent")}
        assert routed[chest]["to"] == ["ai", "web"]
        assert routed[brain]["to"] == ["mr"]
        assert routed[head]["to"] == []

        got = {pydicom.dcmread(p).SOPInstanceUID for p in ai.wait_files(2)}
        assert got == set(ct)
        assert {pydicom.dcmread(p).SOPInstanceUID for p in mr.wait_files(2)} == set(mri)
        # routing by series (channel dicom-series): only the MR series of the MR study, not its localizer
        series_routed = wait_for(lambda: settled("dicom-series", 4), 20, "four series routed")
        assert sorted((m["body"]["modality"], m["to"]) for m in series_routed) == [
            ("CT", []), ("CT", []), ("MR", ["mr-only"]), ("OT", [])]
        assert {pydicom.dcmread(p).SOPInstanceUID for p in by_series.wait_files(1)} == {mri[0]}
        mr_series = next(m["body"] for m in series_routed if m["body"]["modality"] == "MR")
        assert mr_series["study_uid"] == brain and mr_series["study_description"] == "Brain MR"
        assert mr_series["tags"]["ProtocolName"] == ["T2"] and mr_series["num_instances"] == 1
        # STOW-RS: the second hub holds the CT chest study, data sets byte for byte as first stored
        def copies() -> dict[str, Path] | None:
            held = target.stored()
            return held if set(ct) <= set(held) else None

        there = wait_for(copies, 20, "the STOW-RS copies")
        assert not set(mri + skull) & set(there)
        here = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in hub.dicom.root.rglob("*.dcm")}
        for uid in ct:
            assert dataset_bytes(there[uid]) == dataset_bytes(here[uid])

        # what the study-complete message carries (the existing fields stay)
        body = routed[chest]["body"]
        assert body["patient_id"] == "R1" and body["num_instances"] == 2 and body["received"] == 2
        assert body["calling_aes"] == ["CT01"] and body["modalities"] == ["CT"]
        assert body["study_description"] == "Chest CT 胸部平扫" and body["study_date"] == "20240115"
        assert body["referring_physician"] == "Wang^Wei" and body["institution_name"] == "区人民医院"
        assert body["body_parts"] == ["CHEST"] and body["accession_number"] == "A1"
        assert body["tags"] == {"BodyPartExamined": ["CHEST"], "ProtocolName": ["LUNG"],
                                "InstitutionName": ["区人民医院"]}
        (series,) = body["series"]
        assert series["series_uid"] == chest_series and series["modality"] == "CT" and series["num_instances"] == 2
        assert series["calling_aes"] == ["CT01"] and series["tags"]["ProtocolName"] == ["LUNG"]
        assert routed[brain]["body"]["calling_aes"] == ["MR01"]
        assert routed[brain]["body"]["institution_name"] == "Other Hospital"
        assert routed[brain]["body"]["sop_classes"] == ["1.2.840.10008.5.1.4.1.1.7"]
        # the STOW-RS delivery's report
        chest_row = next(r for r in hub.store.search(MessageQuery(channel="dicom-studies"))
                         if r["control_id"] == chest)
        web = next(d for d in hub.store.deliveries_of(chest_row["id"]) if d["destination"] == "web")
        report = json.loads(web["attempt_log"][-1]["response"])
        assert report["sent"] == 2 and report["failed"] == 0 and sorted(report["instances"]) == sorted(ct)
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()
        ai.stop()
        mr.stop()
        by_series.stop()


def _stow(target: Target, tmp: Path, url: str | None = None, **options: Any) -> StowDestination:
    options.setdefault("root", str(tmp))
    dest = Registry().build_destination(name="dicom-studies.web", url=url or "dicomweb+" + target.base,
                                        options=options, context=ConnectorContext(home=str(tmp)))
    assert isinstance(dest, StowDestination)
    return dest


def _send(dest: StowDestination, body: Any) -> Any:
    async def go() -> Any:
        try:
            return await dest.send(Message(channel="c", raw=json.dumps(body).encode()))
        finally:
            await dest.close()
    return asyncio.run(go())


def test_stow_rs_destination_outcomes(target: Target, tmp_path: Path) -> None:
    """200 sent (in several requests when over max_request_mb); 202 partial → retryable with the Failed SOP
    Sequence in the report; 409 none stored and 401 bad token → dead letter; nobody listening → retryable."""
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / study / series
    folder.mkdir(parents=True)
    uids = [_instance(folder / f"{n}.dcm", study_uid=study, series_uid=series, body_part="CHEST",
                      protocol="LUNG", instance_number=n + 1) for n in range(3)]
    for n, uid in enumerate(uids):
        (folder / f"{n}.dcm").rename(folder / f"{uid}.dcm")
    response = _send(_stow(target, tmp_path, token=target.token, max_request_mb=0.0005), {"study_uid": study})
    report = json.loads(response.body)
    assert response.ok and report["requests"] == 3 and report["sent"] == 3 and sorted(report["instances"]) == \
        sorted(uids)
    assert set(uids) <= set(target.stored())
    # tag morphing on the way (options.mapping): the peer gets the coerced Patient ID, our file stays
    (tmp_path / "morph.yaml").write_text("name: morph\ninput: {kind: dicom}\noutput: {kind: dicom, base: input}\n"
                                         'rules:\n  - PatientID <- concat("S-", PatientID)\n', encoding="utf-8")
    assert _send(_stow(target, tmp_path, token=target.token, mapping="morph.yaml"), {"sop_instance_uid": uids[0]}).ok
    assert pydicom.dcmread(target.stored()[uids[0]]).PatientID == "S-P1"
    assert pydicom.dcmread(folder / f"{uids[0]}.dcm").PatientID == "P1"

    bad_study = generate_uid()
    bad = tmp_path / bad_study / "x"
    bad.mkdir(parents=True)
    (bad / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a data set")
    with pytest.raises(DeliveryError) as err:  # 409: nothing stored, the body will never do
        _send(_stow(target, tmp_path, token=target.token), {"study_uid": bad_study})
    assert not err.value.retryable and "409" in str(err.value)
    assert json.loads(err.value.response or b"{}")["failures"][0]["reason"] == "C000"
    (bad / f"{uids[0]}.dcm").write_bytes((folder / f"{uids[0]}.dcm").read_bytes())
    with pytest.raises(DeliveryError) as err:  # 202: one stored, one failed: retried
        _send(_stow(target, tmp_path, token=target.token), {"study_uid": bad_study})
    assert err.value.retryable and "202" in str(err.value) and "1 of 2 instances failed" in str(err.value)
    partial = json.loads(err.value.response or b"{}")
    assert partial["instances"] == [uids[0]] and partial["failed"] == 1
    for opts, retryable, why in (({"token": "wrong"}, False, "401"), ({"token": target.readonly}, False, "403")):
        with pytest.raises(DeliveryError) as err:
            _send(_stow(target, tmp_path, **opts), {"study_uid": study})
        assert err.value.retryable is retryable and why in str(err.value)
    with pytest.raises(DeliveryError) as err:
        _send(_stow(target, tmp_path, f"dicomweb+http://127.0.0.1:{free_port()}/dicomweb", connect_timeout=2),
              {"study_uid": study})
    assert err.value.retryable and "cannot STOW-RS" in str(err.value)
    with pytest.raises(DeliveryError) as err:  # names nothing stored: dead letter before any request
        _send(_stow(target, tmp_path, token=target.token), {"study_uid": "1.2.3.404"})
    assert not err.value.retryable


def test_stow_rs_to_orthanc_dicomweb(tmp_path: Path) -> None:
    """Another vendor's DICOMweb server: Orthanc's DICOMweb plugin stores the study, data sets as we hold them."""
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True)
    try:
        study, series = generate_uid(), generate_uid()
        folder = tmp_path / "store" / study / series
        folder.mkdir(parents=True)
        uids = [_instance(folder / f"{n}.dcm", study_uid=study, series_uid=series, body_part="CHEST",
                          protocol="LUNG", instance_number=n + 1) for n in range(2)]
        dest = Registry().build_destination(
            name="d", url=f"dicomweb+http://127.0.0.1:{orthanc.http_port}/dicom-web",
            options={"root": str(tmp_path / "store")}, context=ConnectorContext(home=str(tmp_path)))
        assert isinstance(dest, StowDestination)
        response = _send(dest, {"study_uid": study})
        assert response.ok and sorted(json.loads(response.body)["instances"]) == sorted(uids)
        assert set(uids) <= orthanc.instance_uids()
        for n, uid in enumerate(uids):
            assert dataset_bytes(orthanc.file_of(uid)) == dataset_bytes(folder / f"{n}.dcm")
    finally:
        orthanc.stop()


def test_stow_rs_urls_and_options_are_checked(tmp_path: Path) -> None:
    ctx = ConnectorContext(home=str(tmp_path))
    for url, options, why in (
            ("dicomweb+http://", {}, "write dicomweb\\+http://host"),
            ("dicomweb+http://u:p@h/dicomweb", {}, "credentials go in options"),
            ("dicomweb+http://h:99999/x", {}, "port"),
            ("dicomweb+http://h/x?y=1", {}, "no query"),
            ("dicomweb+http://h/x", {"tls": {"verify": False}}, "needs a dicomweb\\+https"),
            ("dicomweb+http://h/x", {"password": "p"}, "needs options.username"),
            ("dicomweb+http://h/x", {"token": "t", "username": "u"}, "not both"),
            ("dicomweb+http://h/x", {"max_request": 1}, "unknown option 'max_request'.*max_request_mb"),
            ("dicomweb+http://h/x", {"mapping": "nosuch.yaml"}, "mapping 'nosuch.yaml'")):
        with pytest.raises(ConnectorError, match=why):
            Registry().build_destination(name="d", url=url, options=options, context=ctx)
    dest = Registry().build_destination(name="d", url="dicomweb+https://pacs.example:8443/dicom-web", options={
        "username": "orthanc", "password": "secret", "headers": {"X-Site": "A"}}, context=ctx)
    assert isinstance(dest, StowDestination)
    assert dest.endpoint == "https://pacs.example:8443/dicom-web/studies"
    assert dest.headers["Authorization"] == "Basic b3J0aGFuYzpzZWNyZXQ=" and dest.headers["X-Site"] == "A"
    sizes = []
    for n, size in enumerate((10, 10, 30, 5)):
        (tmp_path / f"{n}.bin").write_bytes(b"x" * size)
        sizes.append(tmp_path / f"{n}.bin")
    assert [[s for _, s in b] for b in stow_batches(sizes, 20)] == [[10, 10], [30], [5]]


def test_study_complete_routing_fields(start_manager: ManagerFactory, engine: Engine, tmp_path: Path) -> None:
    """The image manager alone (SQLite and PostgreSQL): two series from two AE titles, a private routing tag,
    a person name tag; the fields of the StudyComplete event."""
    events: list[StudyComplete] = []
    manager = start_manager(engine, study_quiet_seconds=0.3, on_study_complete=events.append, index_process=False,
                            routing_tags=("BodyPartExamined", "(0019,0010)", "OperatorsName",
                                          "ReferencedImageSequence"))
    study, ct_series, sr_series = generate_uid(), generate_uid(), generate_uid()
    ct, sr = tmp_path / "ct.dcm", tmp_path / "sr.dcm"
    _instance(ct, study_uid=study, series_uid=ct_series, modality="CT", body_part="CHEST", protocol="LUNG",
              series_number=2, description="胸部")
    ds = pydicom.dcmread(ct)
    ds.add_new(0x00190010, "LO", "ACME 1.0")  # a private creator: a tag without keyword
    ds.OperatorsName = ["Li^Na=李^娜", "Zhao^Lei"]
    ds.ReferencedImageSequence = [pydicom.Dataset()]
    ds.save_as(ct, enforce_file_format=True)
    _instance(sr, study_uid=study, series_uid=sr_series, modality="SR", body_part="", protocol="",
              institution="", series_number=1, description="胸部")
    store(manager, ct, aet="CT01")
    store(manager, sr, aet="REPORTS")
    ev = wait_for(lambda: events, 10, "the study-complete event")[0]
    assert ev.study_uid == study and ev.num_series == 2 and sorted(ev.calling_aes) == ["CT01", "REPORTS"]
    assert sorted(ev.modalities) == ["CT", "SR"] and ev.body_parts == ("CHEST",)
    assert ev.study_description == "胸部" and ev.institution_name == "区人民医院"
    assert [(s["modality"], s["calling_aes"], s["series_number"]) for s in ev.series] == [("SR", ["REPORTS"], 1),
                                                                                         ("CT", ["CT01"], 2)]
    assert ev.tags == {"BodyPartExamined": ["CHEST"], "00190010": ["ACME 1.0"],
                       "OperatorsName": ["Li^Na=李^娜", "Zhao^Lei"], "ReferencedImageSequence": []}
    assert ev.series[0]["tags"]["BodyPartExamined"] == [] and ev.series[0]["institution_name"] is None


def test_routing_tags_and_the_series_metadata_fallback(tmp_path: Path) -> None:
    tags = parse_routing_tags(["BodyPartExamined", "(0018,1030)", "0008,0080", "00191010", " (0010,0010) "])
    assert [(t.key, t.tag) for t in tags] == [("BodyPartExamined", "00180015"), ("ProtocolName", "00181030"),
                                             ("InstitutionName", "00080080"), ("00191010", "00191010"),
                                             ("PatientName", "00100010")]
    for bad, why in (("BodyPartExamine", "not a DICOM keyword"), ("(0018,00", "not a keyword"),
                     ("(7FE0,0010)", "pixel data"), ("0002,0010", "file meta")):
        with pytest.raises(ValueError, match=why):
            parse_routing_tags([bad])
    with pytest.raises(InvalidSettings, match="BodyPartExamine"):
        DicomSettings.from_mapping({"routing_tags": ["BodyPartExamine"]})
    with pytest.raises(InvalidSettings, match="a list of keywords"):
        DicomSettings.from_mapping({"routing_tags": "BodyPartExamined"})
    assert DicomSettings.from_mapping({"routing_tags": ["Modality"]}).routing_tags == ("Modality",)
    # ihehub.yaml: checked at load, at the entry's line and column
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "ihehub.yaml").write_text(
        'actors:\n  dicom:\n    routing_tags: [Modality, BodyPartExamine, "(0018 0015)"]\n', encoding="utf-8")
    problems = [str(p) for p in validate_home(tmp_path / "home", Registry())]
    assert problems == [
        "ihehub.yaml:3:30: actors.dicom.routing_tags[1]: 'BodyPartExamine' is not a DICOM keyword (write the tag, "
        'e.g. "(0019,100C)", for a private or unknown attribute)',
        "ihehub.yaml:3:47: actors.dicom.routing_tags[2]: '(0018 0015)' is not a DICOM keyword (BodyPartExamined) "
        'or a tag such as "(0018,0015)"']
    # metadata.json: only the first object is decoded (a truncated tail does not matter)
    first = {"00180015": {"vr": "CS", "Value": ["CHEST"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "A"}]}}
    (tmp_path / "metadata.json").write_text("[" + json.dumps(first) + ',{"0018' + "x" * 200_000, encoding="utf-8")
    assert first_instance(tmp_path) == first
    # no metadata.json: the header of the series' first file
    (tmp_path / "metadata.json").unlink()
    _instance(tmp_path / "1.dcm", body_part="KNEE", protocol="P")
    got = first_instance(tmp_path)
    assert got is not None and got["00180015"]["Value"] == ["KNEE"] and "7FE00010" not in got
    assert first_instance(tmp_path / "nothing") is None

