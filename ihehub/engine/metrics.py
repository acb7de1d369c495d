"""Prometheus metrics of one hub (its own registry: no global state, tests can build several hubs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _QueueDepth(Collector):
    def __init__(self, depths: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._depths = depths

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "ihehub_queue_depth", "Unfinished deliveries per destination queue and state",
            labels=["channel", "destination", "state"],
        )
        try:
            depths = self._depths()
        except Exception:  # the store is down: report nothing rather than fail the scrape
            depths = {}
        for (queue, state), n in sorted(depths.items()):
            ch, _, dest = queue.partition("/")
            g.add_metric([ch, dest, state], n)
        yield g


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received_total = Counter(
            "ihehub_messages_received", "Messages received per channel and reply code", ["channel", "code"], registry=r
        )
        self.ack_latency = Histogram(
            "ihehub_ack_latency_seconds", "Time from message received to reply (persisted)", ["channel"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.sent_total = Counter(
            "ihehub_messages_sent", "Deliveries that succeeded", ["channel", "destination"], registry=r
        )
        self.errors_total = Counter(
            "ihehub_delivery_errors", "Delivery attempts that failed", ["channel", "destination"], registry=r
        )
        self.dead_total = Counter(
            "ihehub_messages_dead", "Deliveries given up (dead letters)", ["channel", "destination"], registry=r
        )
        self.delivery_latency = Histogram(
            "ihehub_delivery_latency_seconds", "Duration of one delivery attempt", ["channel", "destination"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )

    def watch_queues(self, depths: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.registry.register(_QueueDepth(depths))

    def received(self, channel: str, code: str, seconds: float) -> None:
        self.received_total.labels(channel, code).inc()
        self.ack_latency.labels(channel).observe(seconds)

    def delivered(self, queue: str, *, ok: bool, dead: bool, seconds: float) -> None:
        ch, _, dest = queue.partition("/")
        if ok:
            self.sent_total.labels(ch, dest).inc()
        else:
            self.errors_total.labels(ch, dest).inc()
            if dead:
                self.dead_total.labels(ch, dest).inc()
        self.delivery_latency.labels(ch, dest).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
