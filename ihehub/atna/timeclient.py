"""Consistent Time (IHE ITI-1, ITI TF-1 7; ITI TF-2a 3.1): this node's NTP client view of its clock.

`TimeClient` asks the configured NTP servers (SNTP, RFC 4330, through ``ntplib``) every ``interval``
seconds and keeps, from the answer with the shortest round trip: the clock offset (server time minus
this node's time; RFC 5905 8 θ), the round-trip delay, the jitter (RFC 5905 10: the RMS of the
differences between the newest offset and each of the last ``samples`` offsets), the server and the
time of the last success.  ITI-1 requires a node's clock within 1 s of the time server's; an offset
beyond ``threshold`` (default 1 s) calls ``on_alert`` once when it is first seen (the hub logs it and
audits a Security Alert), and once more, with ``recovered=True``, when the offset is back within.

The client only measures: setting the system clock is the operating system's NTP daemon's job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["TimeClient", "TimeSample", "parse_ntp_server"]

log = logging.getLogger("ihehub.atna.time")

NTP_PORT = 123


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TimeSample:
    """One NTP answer: offset and delay in seconds, ``at`` epoch seconds (this node's clock)."""

    server: str
    offset: float
    delay: float
    at: float


def parse_ntp_server(server: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` → (host, port); the port defaults to 123."""
    server = server.strip()
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = rest.lstrip(":") or str(NTP_PORT)
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    else:
        host, port = server, str(NTP_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"NTP server {server!r} must be host or host:port")
    return host, int(port)


def _query(server: str, timeout: float) -> TimeSample:
    import ntplib  # imported only when a time server is configured

    host, port = parse_ntp_server(server)
    answer = ntplib.NTPClient().request(host, version=3, port=port, timeout=timeout)
    if answer.leap == 3 or answer.stratum == 0 or answer.stratum > 15:
        raise ValueError(f"{server} is not synchronised (leap {answer.leap}, stratum {answer.stratum})")
    return TimeSample(server=server, offset=float(answer.offset), delay=float(answer.delay), at=time.time())


class TimeClient:
    """The CT time client of one node (`start`, `stop`, `poll`, `status`, `health`, `collect`)."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        interval: float = 64.0,
        threshold: float = 1.0,
        samples: int = 8,
        timeout: float = 2.0,
        on_alert: Callable[[str, bool], None] | None = None,
    ) -> None:
        for s in servers:
            parse_ntp_server(s)  # a bad entry fails at start, with its name
        self.servers = list(servers)
        self.interval = interval
        self.threshold = threshold
        self.timeout = timeout
        self.on_alert = on_alert
        self.offsets: collections.deque[float] = collections.deque(maxlen=max(1, samples))
        self.last: TimeSample | None = None
        self.last_error: str | None = None
        self.last_attempt: float | None = None
        self.alerting = False
        self._task: asyncio.Task[None] | None = None

    # -- measuring ------------------------------------------------------------------------------
    async def poll(self) -> TimeSample | None:
        """Ask every server once (in parallel); keep the answer with the shortest delay."""
        self.last_attempt = time.time()
        results = await asyncio.gather(*(asyncio.to_thread(_query, s, self.timeout) for s in self.servers),
                                       return_exceptions=True)
        good = [r for r in results if isinstance(r, TimeSample)]
        if not good:
            errors = "; ".join(f"{s}: {type(r).__name__}: {r}" for s, r in zip(self.servers, results, strict=True))
            self.last_error = errors or "no NTP server configured"
            log.warning("time: no NTP server answered: %s", self.last_error)
            return None
        best = min(good, key=lambda r: r.delay)
        self.last, self.last_error = best, None
        self.offsets.append(best.offset)
        self._check(best)
        return best

    def _check(self, sample: TimeSample) -> None:
        beyond = abs(sample.offset) > self.threshold
        if beyond == self.alerting:
            return
        self.alerting = beyond
        if beyond:
            text = (f"clock offset {sample.offset:+.3f} s from NTP server {sample.server} is beyond the "
                    f"{self.threshold:g} s threshold (ITI-1)")
            log.error("time: %s", text)
        else:
            text = f"clock offset {sample.offset:+.3f} s from NTP server {sample.server} is back within " \
                   f"the {self.threshold:g} s threshold"
            log.warning("time: %s", text)
        if self.on_alert is not None:
            try:
                self.on_alert(text, not beyond)
            except Exception:
                log.exception("time: on_alert hook failed")

    @property
    def jitter(self) -> float | None:
        """RFC 5905 10: sqrt(mean((θ_0 - θ_j)^2)) over the kept offsets, θ_0 the newest."""
        if len(self.offsets) < 2:
            return None
        newest = self.offsets[-1]
        others = list(self.offsets)[:-1]
        return math.sqrt(sum((newest - o) ** 2 for o in others) / len(others))

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Poll now and then every ``interval`` seconds in the background."""
        self._task = asyncio.create_task(self._run(), name="ct-time-client")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("time: poll failed")
            await asyncio.sleep(self.interval)

    # -- reporting ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What ``/healthz`` shows under ``time``."""
        last = self.last
        return {
            "status": self.health(),
            "servers": list(self.servers),
            "server": last.server if last else None,
            "offset_s": round(last.offset, 6) if last else None,
            "delay_s": round(last.delay, 6) if last else None,
            "jitter_s": round(j, 6) if (j := self.jitter) is not None else None,
            "last_success": last.at if last else None,
            "last_error": self.last_error,
            "threshold_s": self.threshold,
            "interval_s": self.interval,
        }

    def health(self) -> str:
        """``ok``, or why the clock cannot be trusted (the ``time`` check of ``/healthz``)."""
        last = self.last
        if last is None:
            return f"no NTP answer yet: {self.last_error}" if self.last_error else "no NTP answer yet"
        if self.alerting:
            return f"clock offset {last.offset:+.3f} s beyond the {self.threshold:g} s threshold"
        stale = 3 * self.interval + 3 * self.timeout
        if time.time() - last.at > stale:
            return f"no NTP answer for {time.time() - last.at:.0f} s: {self.last_error}"
        return "ok"

    def collect(self) -> Iterator[Any]:
        """Prometheus metric families (a custom collector's ``collect``): offset, jitter, delay, last sync."""
        from prometheus_client.core import GaugeMetricFamily

        last = self.last
        values = (
            ("ihehub_time_offset_seconds", "Clock offset to the NTP server (server - local), ITI-1",
             last.offset if last else None),
            ("ihehub_time_jitter_seconds", "RMS of the offset differences (RFC 5905 jitter)", self.jitter),
            ("ihehub_time_delay_seconds", "Round-trip delay of the last NTP answer", last.delay if last else None),
            ("ihehub_time_last_sync_timestamp", "When an NTP server last answered (epoch seconds)",
             last.at if last else None),
        )
        for name, doc, value in values:
            g = GaugeMetricFamily(name, doc, labels=["server"])
            if value is not None and last is not None:
                g.add_metric([last.server], value)
            yield g
