"""ITI-41 with the hub's EMPI as the affinity domain's patient identity source (actors.xds.patient_check)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ihehub.actors.xds import cx_identifier, patient_check
from ihehub.bus import schema
from ihehub.bus.db import make_engine
from ihehub.empi import Empi, EmpiConfig, PatientRecord, PersonName
from ihehub.soap import Limits, read_request
from ihehub.xds.errors import FAILURE, SUCCESS
from ihehub.xds.service import XdsService

from .repository_support import RS, chunked, nist_document, nist_request


def provide(svc: XdsService, corpus: Path, name: str) -> tuple[str, list[str]]:
    ctype, body = nist_request(corpus, name)
    req = asyncio.run(read_request(ctype, chunked(body), limits=Limits(spool_dir=svc.spool_dir)))
    try:
        reply = svc.handle("repository", req)
    finally:
        req.discard()
    return reply.status, [e.get("errorCode") or "" for e in reply.payload.iter(f"{{{RS}}}RegistryError")]


def test_cx_identifier() -> None:
    assert cx_identifier("SR7^^^&1.2.260&ISO") == ("SR7", "1.2.260")
    assert cx_identifier("P1^^^HOSP_A") == ("P1", "HOSP_A")
    assert cx_identifier("P1") is None and cx_identifier("^^^&1.2&ISO") is None


def test_patients_known_to_the_empi(corpus: Path, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    schema.upgrade(engine)
    empi = Empi(engine, EmpiConfig())
    empi.add_domain("NIST", universal_id="1.2.260")
    empi.register("NIST", PatientRecord(pid="SR7", names=(PersonName(family="Seven", given="Sam"),),
                                        birth_date="19700101", sex="M"))
    services: dict[str, object] = {"empi": empi}
    svc = XdsService(engine, tmp_path / "data", patient_known=patient_check(services, None))
    assert provide(svc, corpus, "Xop") == (SUCCESS, [])
    # the dicom sample's patient is in a domain the EMPI does not know
    assert provide(svc, corpus, "dicom") == (FAILURE, ["XDSUnknownPatientId"])
    assert svc.store.get(nist_document(corpus, "dicom", nist_request(corpus, "dicom")[1])[0]) is None
    assert svc.store.get(nist_document(corpus, "Xop", nist_request(corpus, "Xop")[1])[0]) is not None
    known = patient_check(services, "empi")
    assert known is not None and known("SR7^^^&1.2.260&ISO") and not known("SR8^^^&1.2.260&ISO")


def test_patient_check_modes() -> None:
    assert patient_check({"empi": object()}, "none") is None
    accept_all = patient_check({}, None)  # no EMPI runs: every patient id is accepted
    assert accept_all is not None and accept_all("X^^^&1.2&ISO")
    strict = patient_check({}, "empi")  # configured to need one: nothing is known
    assert strict is not None and not strict("X^^^&1.2&ISO")
