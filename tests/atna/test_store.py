"""The audit store: group-committed appends on a gapless hash chain, search, tamper detection, retention.
Runs on SQLite and (marked scaleout) on the machine's PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, func, insert, select, update

from ihehub.atna import AuditContext, AuditQuery, AuditRecord, AuditStore, Endpoint, Validator, examine, syslog_message
from ihehub.atna.store import GENESIS, chain_hash
from ihehub.atna.tables import audit_chain, audit_ids, audit_records
from tests.atna.conftest import close_store, open_store

T0 = dt.datetime(2026, 5, 1, 8, 0, tzinfo=dt.UTC)


def record(audit: AuditContext, peer: Endpoint, validator: Validator | None, i: int, *, key: str = "ITI-9",
           outcome: int = 0, received_at: float | None = None, patient: str | None = None) -> AuditRecord:
    cx = patient or f"P{i:04d}^^^HOSP-A&1.2.3&ISO"
    when = T0 + dt.timedelta(minutes=i)
    if key == "ITI-9":
        msg = audit.transaction("ITI-9", source=peer, destination=audit.me("HUB|B"), patients=[cx],
                                query=f"QBP {i}".encode(), message_id=f"Q{i}", outcome=outcome, time=when)
    else:
        msg = audit.transaction("LOGIN", user=Endpoint(user_id=f"user{i % 3}", host="10.0.0.7"), outcome=outcome,
                                time=when)
    return examine(syslog_message(msg, hostname="his"), validator=validator, transport="tls",
                   peer=f"10.0.0.9:{40000 + i}", received_at=received_at)


def fill(store: AuditStore, audit: AuditContext, peer: Endpoint, validator: Validator, n: int) -> list[int]:
    futures = [store.add(record(audit, peer, validator, i, key="LOGIN" if i % 4 == 3 else "ITI-9",
                                outcome=4 if i % 5 == 4 else 0)) for i in range(n)]
    return [f.result(timeout=30) for f in futures]


def test_appends_get_consecutive_seqs_and_a_verifiable_chain(store: AuditStore, audit: AuditContext,
                                                            peer: Endpoint, validator: Validator) -> None:
    seqs = fill(store, audit, peer, validator, 60)
    assert seqs == list(range(1, 61))
    head = store.head()
    assert head.last_seq == 60 and head.pruned_seq == 0 and head.pruned_hash == GENESIS
    report = store.verify()
    assert report.ok and report.checked == 60, report
    first = store.get(1)
    assert first is not None and first.raw is not None and first.valid and first.errors is None
    assert first.xml() is not None and first.xml().startswith(b"<?xml")  # type: ignore[union-attr]
    assert first.hash == chain_hash(GENESIS, {**_columns(store, 1)})
    assert store.backlog == 0 and store.stored == 60


def _columns(store: AuditStore, seq: int) -> dict[str, object]:
    with store.engine.connect() as conn:
        return dict(conn.execute(select(audit_records).where(audit_records.c.seq == seq)).one()._mapping)


def test_invalid_messages_are_stored_flagged(store: AuditStore) -> None:
    bad = examine(b"not syslog, not xml", validator=None, transport="udp", peer="10.9.9.9:514")
    seq = store.append_sync(bad)
    got = store.get(seq)
    assert got is not None and not got.valid and got.raw == b"not syslog, not xml"
    assert got.errors is not None and got.errors.startswith("syslog: not an RFC 5424 message")
    assert store.search(AuditQuery(valid=False)).records[0].seq == seq
    assert store.verify().ok


def test_search(store: AuditStore, audit: AuditContext, peer: Endpoint, validator: Validator) -> None:
    fill(store, audit, peer, validator, 40)
    shared = record(audit, peer, validator, 100, patient="SHARED^^^HOSP-B&9.9&ISO")
    store.append_sync(shared)

    def seqs(**kw: object) -> list[int]:
        return [r.seq for r in store.search(AuditQuery(limit=100, **kw)).records]  # type: ignore[arg-type]

    assert seqs(patient="P0005^^^HOSP-A&1.2.3&ISO") == [6]
    assert seqs(patient="P0005") == [6]  # the ID component finds the CX
    assert seqs(patient="SHARED") == [41] and seqs(patient="P000") == []
    assert seqs(user="user1") == [r for r in range(40, 0, -1) if (r - 1) % 4 == 3 and (r - 1) % 3 == 1]
    assert len(seqs(event_id="110114")) == 10 and len(seqs(event_type="ITI-9")) == 31
    assert seqs(event_type="110122") == seqs(event_id="110114")
    assert len(seqs(outcome=4)) == 8 and len(seqs(outcome=[0, 4])) == 41
    assert len(seqs(source="ihehub-test")) == 41 and seqs(source="nobody") == []
    assert len(seqs(address="10.0.0.9")) == 31  # the peer of the ITI-9 transfers
    assert seqs(entity="Q6") == [7]  # the query object's id (MSH-10)
    assert len(seqs(action="E")) == 41 and seqs(action="C") == []
    assert len(seqs(peer="10.0.0.9:4000")) == 10  # ports 40000..40009
    since = (T0 + dt.timedelta(minutes=10)).timestamp()
    until = (T0 + dt.timedelta(minutes=20)).timestamp()
    assert seqs(since=since, until=until) == list(range(20, 10, -1))
    assert store.count(AuditQuery(since=since, until=until)) == 10
    assert store.count(AuditQuery(valid=True)) == 41
    # paging: newest first, by offset or by keyset
    page1 = store.search(AuditQuery(limit=15))
    assert [r.seq for r in page1.records] == list(range(41, 26, -1)) and page1.next_before == 27
    page2 = store.search(AuditQuery(limit=15, before=page1.next_before))
    assert [r.seq for r in page2.records] == list(range(26, 11, -1))
    assert [r.seq for r in store.search(AuditQuery(limit=15, offset=15)).records] == list(range(26, 11, -1))
    last = store.search(AuditQuery(limit=15, before=12))
    assert [r.seq for r in last.records] == list(range(11, 0, -1)) and last.next_before is None
    row = page1.records[0].to_dict()
    assert row["ids"]["patient"] == ["SHARED^^^HOSP-B&9.9&ISO"] and "raw" not in row
    assert store.search(AuditQuery(limit=1), with_raw=True).records[0].to_dict()["raw"].startswith("<85>1 ")


def test_search_by_event_time_pages_newest_event_first(store: AuditStore, audit: AuditContext, peer: Endpoint,
                                                       validator: Validator) -> None:
    """ITI-81 order: EventDateTime, newest first, seq breaking ties; events received out of order and several
    with one time are each on exactly one page; the keyset cursor is (event time, seq)."""
    minutes = [5, 3, 9, 3, 7, 1, 9, 9, 2, 6, 30]  # received in this order: seq 1..11
    for i, m in enumerate(minutes):
        store.append_sync(record(audit, peer, validator, m, patient=f"T{i}^^^HOSP-A&1.2.3&ISO"))
    since, until = T0.timestamp(), (T0 + dt.timedelta(minutes=10)).timestamp()  # leaves out minute 30 (seq 11)
    expected = [seq for _m, seq in sorted(((m, i + 1) for i, m in enumerate(minutes) if m < 10), reverse=True)]
    assert expected[:4] == [8, 7, 3, 5]  # minute 9 three times (seqs 3, 7, 8), then minute 7
    got, q, pages = [], AuditQuery(since=since, until=until, limit=3, by_time=True), 0
    while True:
        page = store.search(q)
        got += [r.seq for r in page.records]
        pages += 1
        if page.next_before is None:
            assert page.next_before_time is None
            break
        assert page.next_before_time == page.records[-1].event_time
        q = AuditQuery(since=since, until=until, limit=3, by_time=True, before=page.next_before,
                       before_time=page.next_before_time)
    assert got == expected and pages == 4
    assert [r.seq for r in store.search(AuditQuery(until=until, limit=2, by_time=True, user="nobody")).records] == []
    # by user (driven by its index rows, which carry the event time) and by patient: the same order and pages
    got, q = [], AuditQuery(since=since, until=until, limit=4, by_time=True, user=peer.user_id)
    while True:
        page = store.search(q)
        got += [r.seq for r in page.records]
        if page.next_before is None:
            break
        q = dataclasses.replace(q, before=page.next_before, before_time=page.next_before_time)
    assert got == expected
    assert [r.seq for r in store.search(AuditQuery(since=since, until=until, by_time=True,
                                                   patient="T2^^^HOSP-A&1.2.3&ISO")).records] == [3]
    assert store.search(AuditQuery(since=since, until=until, by_time=True, patient="T10")).records == []  # minute 30
    with pytest.raises(ValueError, match="needs since or until"):
        store.search(AuditQuery(by_time=True))
    with pytest.raises(ValueError, match="needs before_time"):
        store.search(AuditQuery(since=since, by_time=True, before=3))


def test_tampering_is_found(store_url: str, audit: AuditContext, peer: Endpoint, validator: Validator) -> None:
    store, writer = open_store(store_url)
    try:
        fill(store, audit, peer, validator, 30)
        assert store.verify().ok
        c = audit_records.c
        cases = [
            (update(audit_records).where(c.seq == 7).values(raw=b"forged"), 7, "record 7 does not match its hash"),
            (update(audit_records).where(c.seq == 9).values(outcome=0, valid=True, errors=None, event_id="110100"),
             9, "record 9 does not match its hash"),
            (delete(audit_records).where(c.seq.in_([12, 13])), 12, "records 12..13 deleted"),
            (delete(audit_records).where(c.seq >= 29), 29, "records 29..30 at the end of the chain deleted"),
            (update(audit_chain).values(last_hash="f" * 64), 30, "chain head does not match"),
            (delete(audit_ids).where(audit_ids.c.seq == 5, audit_ids.c.kind == "patient"), 5,
             "search index lost patient"),
            (insert(audit_ids).values(kind="patient", value="VICTIM", seq=6), 6, "which the record does not name"),
            (update(audit_ids).where(audit_ids.c.seq == 8).values(event_time=0.0), 8, "another event time"),
        ]
        for stmt, first_bad, problem in cases:
            with store.engine.begin() as conn:
                saved_records = [dict(r._mapping) for r in conn.execute(select(audit_records))]
                saved_ids = [dict(r._mapping) for r in conn.execute(select(audit_ids))]
                saved_chain = [dict(r._mapping) for r in conn.execute(select(audit_chain))]
                conn.execute(stmt)
            report = store.verify()
            assert not report.ok and report.first_bad == first_bad, (problem, report)
            assert report.problem is not None and problem in report.problem, report.problem
            with store.engine.begin() as conn:  # put everything back
                conn.execute(delete(audit_records))
                conn.execute(delete(audit_ids))
                conn.execute(delete(audit_chain))
                conn.execute(insert(audit_records), saved_records)
                conn.execute(insert(audit_ids), saved_ids)
                conn.execute(insert(audit_chain), saved_chain)
            assert store.verify().ok
    finally:
        close_store(store, writer)


def test_retention_keeps_the_chain_verifiable(store: AuditStore, audit: AuditContext, peer: Endpoint,
                                              validator: Validator) -> None:
    now = time.time()
    old = [store.add(record(audit, peer, validator, i, received_at=now - 40 * 86400 + i)) for i in range(25)]
    new = [store.add(record(audit, peer, validator, 100 + i, received_at=now - 86400)) for i in range(5)]
    for f in old + new:
        f.result(timeout=30)
    assert store.prune(30, now=now, batch=10) == 25
    head = store.head()
    assert head.pruned_seq == 25 and head.pruned_at is not None and head.last_seq == 30
    report = store.verify()
    assert report.ok and report.checked == 5, report
    assert store.count(AuditQuery()) == 5
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_ids).where(audit_ids.c.seq <= 25)).scalar() == 0
    assert store.prune(30, now=now) == 0
    store.append_sync(record(audit, peer, validator, 200))  # appends go on after pruning
    assert store.head().last_seq == 31 and store.verify().ok
    with store.engine.begin() as conn:  # deleting the first kept record is still found
        conn.execute(delete(audit_records).where(audit_records.c.seq == 26))
    assert store.verify().first_bad == 26


def test_two_stores_on_one_database_share_one_chain(store_url: str, audit: AuditContext, peer: Endpoint,
                                                    validator: Validator) -> None:
    a, wa = open_store(store_url)
    b, wb = open_store(store_url)
    try:
        recs = [record(audit, peer, validator, i) for i in range(80)]
        futures: list = []

        def feed(st: AuditStore, part: list[AuditRecord]) -> None:
            for r in part:
                futures.append(st.add(r))

        threads = [threading.Thread(target=feed, args=(st, recs[k::2])) for k, st in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seqs = sorted(f.result(timeout=60) for f in futures)
        assert seqs == list(range(1, 81))
        report = a.verify()
        assert report.ok and report.checked == 80, report
    finally:
        close_store(a, wa)
        close_store(b, wb)


def test_a_database_outage_delays_but_loses_nothing(tmp_path: Path, audit: AuditContext, peer: Endpoint,
                                                    validator: Validator) -> None:
    store, writer = open_store(f"sqlite:///{tmp_path}/audit.sqlite")

    @event.listens_for(store.engine, "connect")
    def _impatient(dbapi_conn: Any, _record: Any) -> None:  # fail at once on a lock instead of waiting 30 s
        dbapi_conn.execute("PRAGMA busy_timeout=0")

    store.engine.pool.dispose()
    try:
        locker = sqlite3.connect(tmp_path / "audit.sqlite", timeout=0)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        futures = [store.add(record(audit, peer, validator, i)) for i in range(5)]
        time.sleep(0.5)
        assert not any(f.done() for f in futures) and store.backlog == 5
        locker.rollback()
        locker.close()
        assert [f.result(timeout=30) for f in futures] == [1, 2, 3, 4, 5]
        assert store.backlog == 0 and store.verify().ok
    finally:
        close_store(store, writer)
