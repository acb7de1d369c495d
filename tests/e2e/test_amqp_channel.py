"""A real channel in an in-process hub on this machine's RabbitMQ: a queue in, an exchange out.

Each message is stored before it is acked; a duplicate (same message_id) is acked but delivered once.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import kombu

from ihehub.bus.store import MessageQuery
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.channels.sql_kit import GB_HL7
from tests.channels.test_amqp_connector import depth, drain, publish
from tests.conftest import loopback_config


def test_queue_to_queue_through_the_hub(tmp_path: Path, broker_url: str) -> None:
    prefix = f"ihehub-e2e-{secrets.token_hex(4)}"
    inbox, outbox = f"{prefix}-in", f"{prefix}-out"
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "ihehub.yaml").write_text(
        "database: sqlite:///db/ihehub.sqlite\n"
        "delivery: {max_attempts: 5, initial_backoff: 0.05, max_backoff: 0.2, jitter: 0, lease_seconds: 5}\n",
        encoding="utf-8")
    (home / "channels" / "mq.yaml").write_text(f"""
source: {{url: "{broker_url}", options: {{queue: {inbox}, prefetch: 5, charset: gb18030}}}}
dedup: true
destinations:
  - {{name: out, url: "{broker_url}", options: {{declare_queue: {outbox}}}}}
""", encoding="utf-8")
    with kombu.Connection(broker_url) as conn:  # the destination declares it too, on its first publish
        conn.channel().queue_declare(outbox, durable=True, auto_delete=False)
    cfg = loopback_config(load_home(home))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
    loop = LoopThread()
    loop.run(hub.start())
    try:
        wait_for(lambda: hub.runtimes["mq"].source.consuming.is_set(), 15, "the consumer")  # type: ignore[attr-defined]
        second = GB_HL7.replace(b"|HIS-0001|", b"|HIS-0002|")
        publish(broker_url, inbox, (GB_HL7, {}), (second, {}), (GB_HL7, {}))  # the third is a duplicate
        out = drain(broker_url, outbox, 2, timeout=15)
        assert [m.body for m in out] == [GB_HL7, second]
        assert out[0].properties["content_type"] == "application/hl7-v2; charset=gb18030"
        wait_for(lambda: len(hub.store.search(MessageQuery(channel="mq"))) == 3, 15, "three stored")
        statuses = sorted(r["status"] for r in hub.store.search(MessageQuery(channel="mq")))
        assert statuses.count("duplicate") == 1
        assert depth(broker_url, inbox) == 0 and depth(broker_url, outbox) == 0
        assert hub.errors.get("mq") is None
    finally:
        loop.run(hub.stop())
        loop.close()
        with kombu.Connection(broker_url) as conn:
            channel = conn.channel()
            for queue in (inbox, outbox):
                channel.queue_delete(queue)
