"""The durable store and its lease queue, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

from ihehub.bus.message import Message
from ihehub.bus.retry import RetryPolicy
from ihehub.bus.store import MessageQuery, MessageStore, Settlement

ADT = b"MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127101010||ADT^A01|MSG%05d|P|2.5\rPID|1||MRN%05d^^^H1||Zhang^San\r"
GB = "MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127||ADT^A01|GB1|P|2.5|||||CHN|GB 18030-2000\rPID|1||MRN-GB^^^H1||张^三丰\r"


def msg(i: int, channel: str = "adt") -> Message:
    return Message(channel=channel, raw=ADT % (i, i), content_type="application/hl7-v2", control_id=f"MSG{i:05d}",
                   message_type="ADT^A01")


def settle_ok(c, status: str = "AA") -> Settlement:  # type: ignore[no-untyped-def]
    return Settlement(delivery_id=c.delivery_id, message_id=c.message_id, queue=c.queue, attempt=c.attempt,
                      started_at=time.time(), ok=True, status=status, response=b"ACK")


def settle_fail(c, *, retryable: bool = True) -> Settlement:  # type: ignore[no-untyped-def]
    return Settlement(delivery_id=c.delivery_id, message_id=c.message_id, queue=c.queue, attempt=c.attempt,
                      started_at=time.time(), ok=False, error="connection refused", retryable=retryable)


def test_append_then_claim_send_settle(store: MessageStore) -> None:
    async def run() -> None:
        results = await asyncio.gather(*(store.append(msg(i), ["ris", "pacs"]) for i in range(20)))
        assert all(r.deliveries == 2 for r in results)
        claimed = await store.claim("adt/ris", limit=100)
        assert [c.message_id for c in claimed] == [r.message_id for r in results]
        assert all(c.attempt == 1 for c in claimed)
        assert await store.claim("adt/ris", limit=100) == []  # leased: not claimable again
        await store.settle([settle_ok(c) for c in claimed], RetryPolicy())
        assert await store.claim("adt/ris", limit=100) == []
        assert len(await store.claim("adt/pacs", limit=100)) == 20  # the other queue is independent

    asyncio.run(run())
    m = store.search(MessageQuery(channel="adt", status="sent"))
    assert len(m) == 20 and all(r["destinations"]["ris"] == "sent" for r in m)
    detail = store.deliveries_of(m[0]["id"])
    ris = next(d for d in detail if d["destination"] == "ris")
    assert ris["attempt_log"][0]["ok"] and ris["attempt_log"][0]["response"] == b"ACK"


def test_retry_backoff_then_dead_letter(store: MessageStore) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.05, jitter=0)

    async def run() -> None:
        await store.append(msg(1), ["ris"])
        for attempt in (1, 2, 3):
            claimed = await store.claim("adt/ris")
            assert len(claimed) == 1 and claimed[0].attempt == attempt
            await store.settle([settle_fail(claimed[0])], policy)
            assert await store.claim("adt/ris") == []  # not due yet (or dead)
            await asyncio.sleep(0.07)
        assert await store.claim("adt/ris") == []

    asyncio.run(run())
    rows = store.search(MessageQuery(status="dead"))
    assert len(rows) == 1
    d = store.deliveries_of(rows[0]["id"])[0]
    assert d["state"] == "dead" and d["attempts"] == 3 and len(d["attempt_log"]) == 3
    assert d["error"] == "connection refused"


def test_non_retryable_goes_dead_at_once(store: MessageStore) -> None:
    async def run() -> None:
        await store.append(msg(1), ["ris"])
        c = (await store.claim("adt/ris"))[0]
        await store.settle([settle_fail(c, retryable=False)], RetryPolicy(max_attempts=10))

    asyncio.run(run())
    assert len(store.search(MessageQuery(status="dead"))) == 1


def test_expired_lease_is_redelivered(store: MessageStore) -> None:
    """A worker that died mid-send (kill -9) leaves a lease; when it expires the item comes back."""

    async def run() -> None:
        await store.append(msg(1), ["ris"])
        first = await store.claim("adt/ris", lease_seconds=0.2)
        assert len(first) == 1
        assert await store.claim("adt/ris") == []
        await asyncio.sleep(0.3)
        again = await store.claim("adt/ris")
        assert [c.delivery_id for c in again] == [first[0].delivery_id] and again[0].attempt == 2

    asyncio.run(run())


def test_fifo_claims_head_of_line_only(store: MessageStore) -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, jitter=0)

    async def run() -> None:
        for i in range(5):
            await store.append(msg(i), ["ris"])
        batch = await store.claim("adt/ris", limit=10, fifo=True)
        assert len(batch) == 5
        # first fails; the others are released without counting an attempt
        rel = [Settlement(delivery_id=c.delivery_id, message_id=c.message_id, queue=c.queue, attempt=c.attempt,
                          started_at=time.time(), ok=False, release=True) for c in batch[1:]]
        await store.settle([settle_fail(batch[0]), *rel], policy)
        assert await store.claim("adt/ris", limit=10, fifo=True) == []  # head not due: nothing behind it moves
        await asyncio.sleep(0.15)
        again = await store.claim("adt/ris", limit=10, fifo=True)
        assert [c.message_id for c in again] == [c.message_id for c in batch]
        assert [c.attempt for c in again] == [2, 1, 1, 1, 1]

    asyncio.run(run())


def test_dedup_on_channel_and_control_id(store: MessageStore) -> None:
    async def run() -> None:
        a = await store.append(msg(7), ["ris"], dedup=True)
        b = await store.append(msg(7), ["ris"], dedup=True)
        c = await store.append(msg(7, channel="other"), ["ris"], dedup=True)
        assert a.duplicate_of is None and b.duplicate_of == a.message_id and c.duplicate_of is None
        assert len(await store.claim("adt/ris", limit=10)) == 1

    asyncio.run(run())
    assert len(store.search(MessageQuery(status="duplicate"))) == 1


def test_search_filters_and_free_text(store: MessageStore) -> None:
    gb = Message(channel="adt", raw=GB.encode("gb18030"), charset="gb18030", control_id="GB1", message_type="ADT^A01")
    store.append_sync(gb)
    for i in range(3):
        store.append_sync(msg(i), ["ris"])
    assert [r["control_id"] for r in store.search(MessageQuery(text="MRN00001"))] == ["MSG00001"]
    assert [r["control_id"] for r in store.search(MessageQuery(text="张"))] == ["GB1"]
    assert [r["control_id"] for r in store.search(MessageQuery(text="GB1"))] == ["GB1"]
    assert len(store.search(MessageQuery(status="stored"))) == 1
    assert len(store.search(MessageQuery(status="queued"))) == 3
    assert len(store.search(MessageQuery(message_type="ADT*"))) == 4
    assert len(store.search(MessageQuery(destination="ris"))) == 3
    page = store.search(MessageQuery(limit=2, offset=2))
    assert len(page) == 2
    assert store.search(MessageQuery(since=time.time() + 60)) == []


def test_resend_resets_and_adds_deliveries(store: MessageStore) -> None:
    async def run() -> tuple[str, str]:
        a = await store.append(msg(1), ["ris"])
        b = await store.append(msg(2))  # stored only (no destination then)
        c = (await store.claim("adt/ris"))[0]
        await store.settle([settle_fail(c, retryable=False)], RetryPolicy())
        return a.message_id, b.message_id

    a, b = asyncio.run(run())
    assert store.undelivered([a, b, "nope"]) == {b}
    n = store.resend([a, b], None, channel_destinations={"adt": ["ris", "pacs"]})
    assert n == 3  # a: reset ris (where it was routed, not pacs); b (never routed): new ris + new pacs
    d = {x["destination"]: x for x in store.deliveries_of(a)}
    assert d["ris"]["state"] == "queued" and d["ris"]["attempts"] == 0 and len(d["ris"]["attempt_log"]) == 1
    assert "pacs" not in d
    assert store.get_message(b)["status"] == "queued"  # type: ignore[index]
    assert store.resend([a], ["pacs"], channel_destinations={"adt": ["ris", "pacs"]}) == 1  # asked: a new one
    assert {x["destination"] for x in store.deliveries_of(a)} == {"ris", "pacs"}


def test_retention_prunes_bodies_keeps_metadata(store: MessageStore) -> None:
    old = msg(1).evolve(received_at=msg(1).received_at.fromtimestamp(time.time() - 40 * 86400,
                                                                      tz=msg(1).received_at.tzinfo))
    store.append_sync(old)
    store.append_sync(msg(2))
    assert store.prune_bodies(30) == 1
    row = store.get_message(old.id)
    assert row is not None and row["raw"] is None and row["pruned_at"] is not None and row["control_id"] == "MSG00001"
    assert store.load_message(old.id) is None
    assert store.resend([old.id], ["ris"], channel_destinations={}) == 0  # nothing left to send


def test_group_commit_batches_concurrent_appends(store: MessageStore) -> None:
    async def run() -> None:
        await asyncio.gather(*(store.append(msg(i), ["ris"]) for i in range(300)))

    before = store.writer.batches
    asyncio.run(run())
    assert store.writer.batches - before < 300  # many messages per commit
    assert len(store.search(MessageQuery(limit=1000))) == 300


def test_channel_state_persisted(store: MessageStore) -> None:
    store.set_channel_enabled("adt", False, "test")
    store.set_channel_enabled("adt", True, "test")
    store.set_channel_enabled("orm", False, "test")
    assert store.channel_overrides() == {"adt": True, "orm": False}


def test_status_error_matches_failed_delivery_and_ingest_error(store: MessageStore) -> None:
    async def run() -> str:
        a = await store.append(msg(1), ["ris", "pacs"])
        c = (await store.claim("adt/ris"))[0]
        await store.settle([settle_fail(c)], RetryPolicy(max_attempts=5))
        return a.message_id

    failed = asyncio.run(run())
    bad = msg(2)
    store.append_sync(bad, status="error", error="transformer: boom")
    assert {r["id"] for r in store.search(MessageQuery(status="error"))} == {failed, bad.id}
    assert [r["id"] for r in store.search(MessageQuery(status="error", destination="ris"))] == [failed]
    assert store.search(MessageQuery(status="error", destination="pacs")) == []
    assert {r["id"] for r in store.search(MessageQuery(status="queued"))} == {failed}  # pacs still waiting
