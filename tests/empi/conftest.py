"""An EMPI on SQLite (through the bus's Writer, as the hub runs it) and on the machine's PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stdnum.cn import ric

from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.empi import Empi, EmpiConfig, PatientRecord, PersonName


def make_ric(birth: str, seq: str = "001", region: str = "110105") -> str:
    """A valid 18-digit resident ID: region + birth date + sequence (odd last digit = male) + check digit."""
    body = region + birth + seq
    return body + ric.calc_check_digit(body + "0")


def person(pid: str, family: str, given: str = "", birth: str | None = "19800101", sex: str | None = "M",
           **kw: Any) -> PatientRecord:
    return PatientRecord(pid=pid, names=(PersonName(family=family, given=given),), birth_date=birth, sex=sex,
                         **kw)


def _build(url: str, config: EmpiConfig | None, use_writer: bool) -> tuple[Empi, Writer | None]:
    engine = make_engine(url)
    schema.upgrade(engine)
    writer = Writer(engine) if use_writer else None
    empi = Empi(engine, config or EmpiConfig(), writer=writer)
    empi.add_domain("HOSP_A", universal_id="1.2.156.1.1")
    empi.add_domain("HOSP_B", universal_id="1.2.156.1.2")
    empi.add_domain("HOSP_C", universal_id="1.2.156.1.3")
    return empi, writer


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def empi(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Empi]:
    """SQLite runs every write through a Writer; PostgreSQL through engine transactions."""
    if request.param == "sqlite":
        service, writer = _build(f"sqlite:///{tmp_path}/empi.sqlite", None, True)
    else:
        _, url = request.getfixturevalue("pg_database")
        service, writer = _build(url, None, False)
    yield service
    if writer is not None:
        writer.close()
    service.engine.dispose()


@pytest.fixture
def sqlite_empi(tmp_path: Path) -> Iterator[Empi]:
    service, _ = _build(f"sqlite:///{tmp_path}/empi.sqlite", None, False)
    yield service
    service.engine.dispose()
