"""The repository with its validation in worker processes (`ParallelExaminer`): the same verdicts as
in-process validation, arrival order kept, a killed worker survived, a message that crashes its
worker stored flagged instead of lost."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from ihehub.atna import AuditContext, AuditQuery, AuditStore, Endpoint, Validator, examine, octet_frame
from ihehub.atna.pool import Frame, ParallelExaminer, Row, examine_batch
from tests.atna.test_receiver import client_ctx, messages, running, send_raw, server_ctx, stored

POISON = b"POISON-PILL"


def crashing_worker(frames: list[Frame]) -> list[Row]:
    """A worker that dies (as on a crash in libxml2) on any batch holding the poison marker."""
    if any(POISON in f[0] for f in frames):
        os._exit(70)
    return examine_batch(frames)


def _bad_messages(audit: AuditContext, peer: Endpoint) -> list[bytes]:
    good = messages(audit, peer, 1)[0]
    return [
        good.replace(b'EventActionCode="E"', b'EventActionCode="Q"'),  # schema: not an action code
        b"<85>1 - his app - IHE+RFC-3881 - \xef\xbb\xbfthis is no XML",
        b"<85>1 - evil app - IHE+RFC-3881 - <!DOCTYPE a [<!ENTITY a 'x'>]><a>&a;</a>",
        good.replace(b'EventActionCode="E"', b'EventActionCode="R"'),  # the ITI-9 Schematron wants E
    ]


def test_workers_give_the_same_verdicts_in_arrival_order(store: AuditStore, validator: Validator,
                                                         audit: AuditContext, peer: Endpoint,
                                                         pki: dict[str, str]) -> None:
    good = messages(audit, peer, 60)
    bad = _bad_messages(audit, peer)
    sent = good[:20] + bad[:2] + good[20:40] + bad[2:] + good[40:]

    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki), workers=2) as repo:
            assert repo.examiner is not None and len(repo.examiner.pids()) == 2
            assert repo.tls_port
            await send_raw(repo.tls_port, b"".join(octet_frame(m) for m in sent), client_ctx(pki), pause=0.2)
            await stored(store, len(sent), timeout=60)
            assert repo.stats["frames"] == len(sent)
            assert repo.stats["invalid"] == len(bad)
            assert repo.backlog == 0

    asyncio.run(main())
    records = sorted(store.search(AuditQuery(limit=200), with_raw=True).records, key=lambda r: r.seq)
    assert [r.raw for r in records] == sent  # the order of arrival
    for r in records:
        local = examine(r.raw or b"", validator=validator, transport="tls")
        assert (r.valid, r.errors, r.event_id, r.event_type, r.ids, r.body_at) == (
            local.valid, local.errors, local.event_id, local.event_type, local.ids, local.body_at)
        assert r.tls_subject and "audit-sender" in r.tls_subject
    assert not any(r.valid for r in records if r.raw in bad)
    assert store.verify().ok


def test_a_killed_worker_is_replaced_and_nothing_is_lost(store: AuditStore, validator: Validator,
                                                         audit: AuditContext, peer: Endpoint) -> None:
    first, second = messages(audit, peer, 30), messages(audit, peer, 30, start=30)

    async def main() -> None:
        async with running(store, validator, workers=1) as repo:
            examiner = repo.examiner
            assert examiner is not None and repo.tcp_port
            await send_raw(repo.tcp_port, b"".join(octet_frame(m) for m in first))
            await stored(store, 30, timeout=60)
            (pid,) = examiner.pids()
            os.kill(pid, signal.SIGKILL)
            await send_raw(repo.tcp_port, b"".join(octet_frame(m) for m in second))
            await stored(store, 60, timeout=90)
            assert examiner.restarts >= 1 and examiner.crashed == 0
            assert examiner.pids() and pid not in examiner.pids()

    asyncio.run(main())
    records = sorted(store.search(AuditQuery(limit=100), with_raw=True).records, key=lambda r: r.seq)
    assert [r.raw for r in records] == first + second
    assert all(r.valid for r in records)
    assert store.verify().ok


def test_a_message_that_crashes_its_worker_is_stored_flagged(validator: Validator, audit: AuditContext,
                                                            peer: Endpoint, tmp_path: Path) -> None:
    good = messages(audit, peer, 4)
    poison = b"<85>1 - his app - IHE+RFC-3881 - <AuditMessage>" + POISON + b"</AuditMessage>"
    got: list[dict[str, Any]] = []

    async def main() -> ParallelExaminer:
        examiner = ParallelExaminer(validator, got.extend, workers=1, worker=crashing_worker)
        await examiner.start()
        try:
            for raw in (good[0], poison, good[1]):  # one batch: it crashes, then it is taken apart
                examiner.take(raw, "tcp", "10.0.0.9:1234", None)
            await asyncio.sleep(0)
            examiner.take(good[2], "tcp", "10.0.0.9:1234", None)  # held while the crash is sorted out
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while examiner.pending and loop.time() < deadline:
                await asyncio.sleep(0.02)
            examiner.take(good[3], "tcp", "10.0.0.9:1234", None)  # the pool works again
            while examiner.pending and loop.time() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await examiner.close()
        return examiner

    examiner = asyncio.run(main())
    assert [r["raw"] for r in got] == [good[0], poison, good[1], good[2], good[3]]
    assert [r["valid"] for r in got] == [True, False, True, True, True]
    crashed = got[1]
    assert crashed["errors"] and "validator process crashed" in crashed["errors"]
    assert crashed["syslog_app"] == "app" and crashed["peer"] == "10.0.0.9:1234" and crashed["body_at"] is not None
    assert got[0]["event_id"] == "110112" and got[0]["_index"]
    assert examiner.crashed == 1 and examiner.restarts >= 2
