"""Blocking keys, graded comparisons, Fellegi–Sunter weights, EM estimation, the tenders' profile, settings."""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pytest

from ihehub.empi import (
    DEFAULT_PARAMETERS,
    EmpiConfig,
    FellegiSunter,
    FieldParams,
    FSParameters,
    InvalidData,
    PatientRecord,
    PersonName,
    Weighted,
    estimate,
)
from ihehub.empi.blocking import blocking_keys, soundex
from ihehub.empi.compare import FIELDS, LEVELS, MISSING, compare
from ihehub.empi.normalize import NormRecord, normalize
from tests.empi.conftest import make_ric


def norm(family: str, given: str = "", birth: str | None = "19800101", **kw: object) -> NormRecord:
    rec = PatientRecord(pid="x", names=(PersonName(family=family, given=given),), birth_date=birth,
                        **kw)  # type: ignore[arg-type]
    return normalize(rec)[0]


def levels(a: NormRecord, b: NormRecord) -> dict[str, str]:
    c = compare(a, b)
    return {f: c.level_name(i) for i, f in enumerate(FIELDS) if c.levels[i] != MISSING}


def test_comparators_follow_fields() -> None:
    n, _ = normalize(PatientRecord(pid="1", names=(PersonName(family="Li", given="Ming"),), birth_date="19800102"))
    c = compare(n, n)
    assert len(c.levels) == len(c.similarities) == len(FIELDS)
    assert [c.level_name(i) for i in range(3)] == ["exact", "exact", "exact"]
    assert all(len(DEFAULT_PARAMETERS.fields[f].m) == len(LEVELS[f]) for f in FIELDS)


@pytest.mark.parametrize(("word", "code"), [("Robert", "R163"), ("Rupert", "R163"), ("Ashcraft", "A261"),
                                            ("Tymczak", "T522"), ("Pfister", "P236"), ("Lee", "L000"), ("", "")])
def test_soundex(word: str, code: str) -> None:
    assert soundex(word) == code


def test_blocking_keys_bridge_hanzi_pinyin_swaps_and_identifiers() -> None:
    hanzi = norm("张三", national_id=make_ric("19800101", "011"), phones=("13812345678",))
    pinyin = norm("ZHANG", "SAN")
    swapped = norm("SAN", "ZHANG")
    keys = set(blocking_keys(hanzi))
    assert keys & set(blocking_keys(pinyin))
    assert keys & set(blocking_keys(swapped))
    assert f"i:{make_ric('19800101', '011')}" in keys and "p:13812345678" in keys and "h:张三" in keys
    no_birth = norm("张三", birth=None)
    assert blocking_keys(no_birth) == ["h:张三"]
    wrong_year = norm("张三", birth="19810101")
    assert set(blocking_keys(wrong_year)) & keys  # the hanzi name key still brings them together


def test_graded_name_comparisons() -> None:
    assert levels(norm("张三丰"), norm("张三丰"))["given"] == "exact"
    assert levels(norm("张三丰"), norm("张丰三"))["given"] == "close"  # swapped characters
    assert levels(norm("张晓明"), norm("章晓明"))["family"] == "close"  # homophone surname
    assert levels(norm("王晓明"), norm("王晓鸣"))["given"] == "close"  # homophone given name
    assert levels(norm("王晓明"), norm("王晓光"))["given"] == "similar"  # one character differs
    assert levels(norm("张三"), norm("ZHANG", "SAN")) == {"family": "exact", "given": "exact",
                                                           "birth_date": "exact"}
    assert levels(norm("JOHNSON", "JOHN"), norm("JOHNSTON", "JON"))["family"] == "close"
    assert levels(norm("SMITH", "JOHN"), norm("SMYTH", "JON"))["family"] == "similar"
    assert levels(norm("SMITH", "J"), norm("SMITH", "JOHN"))["given"] == "similar"  # an initial
    got = levels(norm("MASON", "LEON"), norm("LEON", "MASON"))
    assert got["family"] == got["given"] == "close"  # surname and given name swapped


def test_graded_dates_and_identifiers() -> None:
    assert levels(norm("A", birth="19800102"), norm("A", birth="19800201"))["birth_date"] == "transposed"
    assert levels(norm("A", birth="19800102"), norm("A", birth="19800103"))["birth_date"] == "transposed"
    assert levels(norm("A", birth="19800102"), norm("A", birth="19801102"))["birth_date"] == "transposed"
    assert levels(norm("A", birth="19800102"), norm("A", birth="19800617"))["birth_date"] == "different"
    assert levels(norm("A", birth="19800315"), norm("A", birth="19801215"))["birth_date"] == "partial"
    assert levels(norm("A", birth="1980"), norm("A", birth="19800602"))["birth_date"] == "partial"
    a = norm("A", national_id="1234567", national_id_type="X")
    b = norm("A", national_id="1234576", national_id_type="X")
    assert levels(a, b)["national_id"] == "typo"
    assert levels(norm("A", phones=("13812345678",)), norm("A", phones=("13912345678",)))["phone"] == "close"
    assert "sex" not in levels(norm("A"), norm("A", sex="M"))  # missing on one side: no weight


def test_fellegi_sunter_weights_and_explanation() -> None:
    prof = FellegiSunter(DEFAULT_PARAMETERS, link=16, review=8)
    a, b = norm("张三", sex="M"), norm("ZHANG", "SAN", sex="M")
    s = prof.score(compare(a, b), a, b)
    assert s.score > 16 and s.probability > 0.99
    assert {f.field for f in s.fields} == {"family", "given", "birth_date", "sex"}
    assert all(f.weight > 0 for f in s.fields)
    other = norm("李四", birth="19990909", sex="F")
    bad = prof.score(compare(a, other), a, other)
    assert bad.score < 0 and all(f.weight < 0 for f in bad.fields)
    with pytest.raises(InvalidData):
        FellegiSunter(DEFAULT_PARAMETERS, link=5, review=8)


def test_em_recovers_known_parameters() -> None:
    rng = random.Random(7)
    true_m = {f: DEFAULT_PARAMETERS.fields[f].m for f in FIELDS}
    true_u = {f: DEFAULT_PARAMETERS.fields[f].u for f in FIELDS}
    rows = []
    for i in range(20000):
        match = i % 5 == 0  # prior 0.2
        probs = true_m if match else true_u
        rows.append(tuple(rng.choices(range(len(LEVELS[f])), weights=probs[f])[0] if rng.random() > 0.1 else -1
                          for f in FIELDS))
    def flat(n: int) -> tuple[float, ...]:
        return tuple([0.5] + [0.5 / (n - 1)] * (n - 1))

    start = FSParameters(fields={f: FieldParams(m=flat(len(LEVELS[f])), u=tuple([1 / len(LEVELS[f])] * len(LEVELS[f])))
                                 for f in FIELDS}, prior=0.1)
    got = estimate(np.array(rows), start)
    assert got.source == "em" and abs(got.prior - 0.2) < 0.02
    for f in ("family", "given", "birth_date"):
        assert abs(got.fields[f].m[0] - true_m[f][0]) < 0.05
        assert abs(got.fields[f].u[0] - true_u[f][0]) < 0.02
    with pytest.raises(InvalidData):
        estimate([])


def test_parameters_round_trip_and_overrides() -> None:
    p = DEFAULT_PARAMETERS.with_overrides({"sex": {"m": [0.9, 0.1]}})
    assert p.fields["sex"].m == (0.9, 0.1) and p.source == "config"
    assert FSParameters.from_json(p.to_json()).fields["sex"] == p.fields["sex"]
    with pytest.raises(InvalidData) as unknown:
        DEFAULT_PARAMETERS.with_overrides({"shoe_size": {"m": [1.0]}})
    assert unknown.value.field == "matching.shoe_size"
    with pytest.raises(InvalidData, match="3 probabilities"):
        DEFAULT_PARAMETERS.with_overrides({"phone": {"u": [0.5, 0.5]}})


def test_tenders_profile() -> None:
    prof = Weighted(today=dt.date(2026, 1, 1))
    a = norm("张三", sex="M", department="Cardiology")
    same = prof.score(compare(a, a), a, a)
    assert same.score == 1.0
    assert {f.field: round(f.weight, 2) for f in same.fields} == {"name": 0.4, "birth_date": 0.2, "age": 0.2,
                                                                  "sex": 0.1, "department": 0.1}
    b = norm("张三", sex="M")  # no department: the other weights are rescaled
    assert prof.score(compare(a, b), a, b).score == 1.0
    c = norm("张三", birth="19830615", sex="M", department="Cardiology")
    s = prof.score(compare(a, c), a, c)
    assert 0.6 < s.score < 0.9  # a suspected duplicate (review), not a link
    cfg = EmpiConfig(profile="tenders", link_threshold=0.95)
    built = cfg.build_profile()
    assert built.name == "tenders" and built.link_threshold == 0.95 and built.review_threshold == 0.6


def test_config_is_checked() -> None:
    with pytest.raises(InvalidData) as exc:
        EmpiConfig(profile="magic")
    assert exc.value.field == "empi.profile"
    with pytest.raises(InvalidData, match="unknown EMPI setting"):
        EmpiConfig.from_mapping({"profil": "tenders"})
    assert EmpiConfig.from_mapping({"profile": "tenders", "max_block": 50}).max_block == 50
    with pytest.raises(InvalidData):
        EmpiConfig(max_block=0)
    fs = EmpiConfig(m_u={"sex": {"m": [0.97, 0.03]}}).build_profile()
    assert isinstance(fs, FellegiSunter) and fs.params.fields["sex"].m == (0.97, 0.03)
