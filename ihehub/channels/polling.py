"""The loop every polling source shares (``sql://``, ``sftp://``): poll, report trouble, wait, poll again.

A poll that fails (the database or the server is down, a table is missing) never stops the
channel: the reason goes to the log once and to the channel status through
``ConnectorContext.on_source_status`` (``GET /api/channels`` shows it as ``error``), and the next
poll tries again.  The first poll that works clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ihehub.channels.base import ConnectorError, Inbound
from ihehub.channels.registry import ConnectorContext

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0


class PollingSource:
    """Base of a source that asks a remote system for work every ``poll_interval`` seconds.

    Subclasses implement ``_poll(inbound) -> int`` (how many items left the remote queue) and may
    override ``_close()``; ``kind`` names the connector in errors (``"sql source"``).
    """

    kind = "polling source"

    def __init__(self, *, name: str, url: str, poll_interval: float, context: ConnectorContext) -> None:
        self.name = name
        self.url = url
        self.poll_interval = poll_interval
        self._on_status = context.on_source_status
        self._inbound: Inbound | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self.polls = 0  # completed polls, for health checks and tests
        self.failures = 0  # failed polls in a row
        self.last_error: str | None = None
        self.more = False  # set by _poll when it stopped at the batch size, not for lack of work

    async def _poll(self, inbound: Inbound) -> int:
        raise ConnectorError(f"{type(self).__name__} does not say how to poll")

    async def _close(self) -> None:
        return None

    def _describe(self, exc: BaseException) -> str:
        """The text an operator sees in the channel status for a failed poll."""
        return f"{type(exc).__name__}: {exc}"

    # -- lifecycle

    async def start(self, inbound: Inbound) -> None:
        if self._task is not None:
            raise ConnectorError(f"{self.kind} {self.name!r} is already started")
        self._inbound = inbound
        self._stopping = asyncio.Event()  # bound to the loop that runs this source
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name=f"{self.kind}-{self.name}")

    async def stop(self) -> None:
        """Finish the item in hand (up to ``STOP_GRACE_SECONDS``), then stop polling."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, STOP_GRACE_SECONDS)
        await self._close()
        if self.last_error is not None:
            self._report(None)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self.more = False
            with contextlib.suppress(Exception):  # reported by poll_once
                await self.poll_once()
            if self.more:  # a full batch went through: there may be more right now
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.poll_interval)

    async def poll_once(self) -> int:
        """One poll; a failure is reported (status and log) and raised."""
        if self._inbound is None:
            raise ConnectorError(f"{self.kind} {self.name!r} is not started")
        async with self._lock:
            try:
                done = await self._poll(self._inbound)
            except Exception as exc:
                self.failures += 1
                text = f"{self.kind} {self.name!r}: {self._describe(exc)}"
                if text != self.last_error:
                    log.warning("channel %s: %s; polling again every %ss", self.name, text, self.poll_interval)
                    self._report(text)
                raise
            finally:
                self.polls += 1
            if self.last_error is not None:
                log.info("channel %s: %s works again after %d failed polls", self.name, self.kind, self.failures)
                self._report(None)
            self.failures = 0
            return done

    def _report(self, error: str | None) -> None:
        self.last_error = error
        if self._on_status is not None:
            try:
                self._on_status(self.name, error)
            except Exception:
                log.exception("channel %s: cannot report the source status", self.name)

