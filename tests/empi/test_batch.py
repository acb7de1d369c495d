"""Bulk import (one savepoint per record), EM training, batch de-duplication, concurrent feeds, schema, public API."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import ihehub.empi as api
from ihehub.empi import Empi, EmpiConfig, FellegiSunter, Identifier, PatientRecord, dedupe, import_records, train
from ihehub.empi import errors as errors_mod
from ihehub.empi import model as model_mod
from ihehub.empi.tables import metadata
from tests.empi.conftest import _build, make_ric, person

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华"


def population(n: int, seed: int = 3) -> list[PatientRecord]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        birth = f"{rng.randint(1940, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        name = rng.choice(SURNAMES) + rng.choice(GIVEN) + rng.choice(GIVEN)
        phone = f"139{rng.randint(0, 99999999):08d}"
        out.append(person(f"P{i}", name, birth=birth, sex=rng.choice("MF"), phones=(phone,),
                          national_id=make_ric(birth, f"{rng.randint(0, 999):03d}")))
    return out


def corrupt(rec: PatientRecord, i: int) -> PatientRecord:
    """A duplicate of ``rec`` in another hospital: new id, and one field mistyped or missing."""
    kind = i % 3
    if kind == 0:
        return PatientRecord(pid=f"Q{rec.pid}", names=rec.names, birth_date=rec.birth_date, sex=rec.sex)
    if kind == 1:  # day and month swapped (when the day can be a month)
        b = str(rec.birth_date)
        swapped = b[:4] + b[6:8] + b[4:6] if int(b[6:8]) <= 12 else b
        return PatientRecord(pid=f"Q{rec.pid}", names=rec.names, birth_date=swapped, sex=rec.sex, phones=rec.phones)
    return PatientRecord(pid=f"Q{rec.pid}", names=rec.names, birth_date=None, sex=rec.sex, phones=rec.phones,
                         national_id=rec.national_id)


def test_import_reports_bad_records_and_keeps_the_rest(sqlite_empi: Empi) -> None:
    empi = sqlite_empi
    empi.register("HOSP_A", person("M1", "赵六", birth="19700101", sex="F"))
    empi.register("HOSP_A", person("M2", "赵六", birth="19700101", sex="F"))
    empi.merge(Identifier(value="M1", domain="HOSP_A"), Identifier(value="M2", domain="HOSP_A"))
    recs = population(20)
    recs[5] = person("BAD", "李四", birth="19801340")  # refused before the transaction
    recs[9] = person("M2", "赵六", birth="19700101", sex="F")  # refused inside it (subsumed id): a savepoint
    seen: list[int] = []
    report = import_records(empi, "HOSP_A", recs, batch_size=8, progress=seen.append)
    assert report.total == 20 and sum(report.outcomes.values()) == 18
    assert [(e.index, e.field, e.code) for e in report.errors] == [(5, "birth_date", "102"),
                                                                   (9, "identifier.value", "204")]
    assert sum(seen) == 20 and report.events == 18
    assert empi.record(Identifier(value="P10", domain="HOSP_A")).status == "active"


def test_train_estimates_parameters_and_dedupe_fills_the_review_queue(sqlite_empi: Empi) -> None:
    empi = sqlite_empi
    base = population(300)
    import_records(empi, "HOSP_A", base, match=False)
    import_records(empi, "HOSP_B", [corrupt(r, i) for i, r in enumerate(base[:150])], match=False)
    rep = train(empi, sample=450)
    assert rep.pairs > 150 and rep.params.source == "em" and 0.05 < rep.params.prior < 0.95
    assert empi.parameters() is not None
    assert isinstance(empi.profile, FellegiSunter) and empi.profile.params.source == "em"
    # a new service on the same database picks the stored estimate up
    again = Empi(empi.engine, EmpiConfig())
    assert isinstance(again.profile, FellegiSunter) and again.profile.params.prior == rep.params.prior
    result = dedupe(empi, batch_size=100)
    assert result.records == 450 and result.pairs > 0
    queue = empi.review_queue(limit=1000)
    assert result.reviews == len(queue) >= 140
    pairs = {(q.record.value, q.candidate.value) for q in queue}
    assert sum(1 for r in base[:150] if (r.pid, f"Q{r.pid}") in pairs) >= 140
    assert dedupe(empi).reviews == 0  # open items are not duplicated


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def test_concurrent_feeds_of_one_person_make_one_patient(backend: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    """Three hospitals register the same person at the same moment: one enterprise patient, never three
    (the Writer serialises SQLite; advisory locks on the blocking keys serialise PostgreSQL)."""
    if backend == "sqlite":
        empi, writer = _build(f"sqlite:///{tmp_path}/c.sqlite", None, True)
    else:
        empi, writer = _build(request.getfixturevalue("pg_database")[1], None, False)
    try:
        for round_ in range(4):
            barrier = threading.Barrier(3)
            results: dict[str, str] = {}

            def feed(domain: str, round_: int = round_, barrier: threading.Barrier = barrier,
                     results: dict[str, str] = results) -> None:
                name = ("欧阳娜娜", "司马光", "单雄信", "诸葛亮")[round_]
                rec = person(f"R{round_}", name, birth=f"19{50 + 7 * round_}0{round_ + 1}1{round_}", sex="F")
                barrier.wait()
                results[domain] = empi.register(domain, rec).patient

            threads = [threading.Thread(target=feed, args=(d,)) for d in ("HOSP_A", "HOSP_B", "HOSP_C")]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert len(set(results.values())) == 1, results
    finally:
        if writer is not None:
            writer.close()
        empi.engine.dispose()


def test_migration_matches_the_tables(sqlite_empi: Empi) -> None:
    with sqlite_empi.engine.connect() as conn:
        def ours(name: str | None, type_: str, parent: dict[str, str | None]) -> bool:  # not other domains' tables
            if type_ == "schema":
                return True
            table = name if type_ == "table" else parent.get("table_name")
            return bool(table and table in metadata.tables)  # the EMPI's own, not the event publisher's

        diff = compare_metadata(MigrationContext.configure(conn, opts={"include_name": ours}), metadata)
    assert diff == []


def test_public_api_is_complete() -> None:
    public = {n for mod in (model_mod, errors_mod) for n, obj in vars(mod).items()
              if inspect.isclass(obj) and obj.__module__ == mod.__name__ and not n.startswith("_")}
    assert public <= set(api.__all__)
    assert all(hasattr(api, n) for n in api.__all__)


def test_train_keeps_relatives_out_of_the_match_class(sqlite_empi: Empi) -> None:
    """Blocked candidate pairs hold many strangers that agree on blocking fields (relatives sharing a surname
    and the family phone, namesakes born the same year).  EM must count them as non-matches: u estimated on
    those pairs, not held at the population's (which put ~90 % of them in the match class and linked
    relatives).  Scoring keeps the population u, so an exact duplicate still scores far above the threshold."""
    import random

    empi = sqlite_empi
    rng = random.Random(11)
    base = population(400, seed=5)
    relatives = []
    for i, rec in enumerate(base[:300]):  # a parent or child: same surname and phone, born within 3 years
        year = int(str(rec.birth_date)[:4]) + rng.choice((-3, -2, -1, 1, 2, 3))
        birth = f"{year}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        name = rec.names[0].family[0] + rng.choice(GIVEN) + rng.choice(GIVEN)
        relatives.append(person(f"R{i}", name, birth=birth, sex=rng.choice("MF"), phones=rec.phones,
                                national_id=make_ric(birth, f"{rng.randint(0, 999):03d}")))
    dups = [corrupt(r, i) for i, r in enumerate(base[:60])]
    import_records(empi, "HOSP_A", base + relatives, match=False)
    import_records(empi, "HOSP_B", dups, match=False)
    rep = train(empi, sample=10_000)  # every record: the sample holds every blocked pair
    true_share = 60 / rep.pairs
    assert rep.pairs > 400 and true_share < 0.2
    assert abs(rep.params.prior - true_share) < 0.05, (rep.params.prior, true_share)
    w = rep.params.weights()
    assert w["phone"][0] < w["national_id"][0]  # a shared phone says less than a shared resident ID
    profile = empi.profile
    assert isinstance(profile, FellegiSunter)
    mother, child = base[0], relatives[0]
    from ihehub.empi.compare import compare
    from ihehub.empi.normalize import normalize

    def score(a: PatientRecord, b: PatientRecord) -> float:
        na, nb = normalize(a)[0], normalize(b)[0]
        return profile.score(compare(na, nb), na, nb).score

    assert score(mother, child) < profile.review_threshold < profile.link_threshold < score(mother, dups[0])
