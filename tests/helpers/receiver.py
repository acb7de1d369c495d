"""A real HTTP/1.1 receiver on loopback for delivery tests: keep-alive, records every request.

Runs its own event loop in a thread so tests (sync or async) and subprocess hubs can post to it.
``status_for`` decides the answer per request (e.g. 500 for a while, to exercise retries).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable

Request = dict[str, object]


class Receiver:
    def __init__(self, status_for: Callable[[Request], int] | None = None) -> None:
        self.status_for = status_for or (lambda _r: 200)
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-receiver")
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> Receiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def control_ids(self) -> Counter[str]:
        with self.lock:
            return Counter(str(r["headers"].get("x-control-id", "")) for r in self.requests)  # type: ignore[union-attr]

    def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in asyncio.all_tasks(self._loop):
            t.cancel()
        self._loop.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req: Request = {"method": method, "path": path, "headers": headers, "body": body}
                status = self.status_for(req)
                with self.lock:
                    req["status"] = status
                    self.requests.append(req)
                payload = b'{"ok": true}' if status < 300 else b'{"error": "test"}'
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                    .encode() + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ValueError):
            pass
        finally:
            writer.close()
