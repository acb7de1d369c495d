"""``file:`` connectors: a polling folder source and an atomic file-writing destination.

URLs (RFC 8089, "The file URI Scheme"): ``file:///abs/path`` (or ``file://localhost/abs/path``) is
an absolute folder; ``file:relative/path`` is a folder under the hub home
(``ConnectorContext.home``).  ``file://name/...`` names a host and is refused, because it reads
like a relative path but is not one.  Percent-escapes (``%20``) are decoded.

The source hands every matching file to the hub, oldest first.  It never loses a file: accepted
(``AA``) files move to ``done_dir`` (or are deleted with ``delete_after``), refused (``AE``) files
move to ``error_dir`` with a ``<name>.error.txt`` beside them, and when the hub cannot take a
message (``AR`` or an exception) the file stays where it is and is offered again on the next poll.

The destination writes each message to a new file: a temporary file in the target folder,
``fsync``, then an atomic ``link`` (no overwrite) or ``os.replace`` (``overwrite: true``), then an
``fsync`` of the folder (POSIX.1-2017 ``rename()``/``link()``: the name appears complete or not at
all).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import fnmatch
import logging
import os
import re
import secrets
import shutil
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ihehub.bus.message import Message, utcnow
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Inbound, Outcome, Response
from ihehub.channels.options import check_options, union_schema
from ihehub.channels.registry import ConnectorContext
from ihehub.channels.sniff import (
    codec_name,
    extension_for,
    guess_content_type,
    hl7_header,
    looks_like_hl7,
    parse_content_type,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
STOP_GRACE_SECONDS = 10.0

SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "pattern": {"type": "string", "minLength": 1, "default": "*", "description": "glob on file names"},
        "poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 1.0},
        "min_age": {"type": "number", "minimum": 0, "default": 0.5},
        "done_dir": {"type": "string", "minLength": 1, "default": "done"},
        "error_dir": {"type": "string", "minLength": 1, "default": "error"},
        "charset": {"type": "string", "minLength": 1},
        "content_type": {"type": "string", "minLength": 1},
        "max_file_bytes": {"type": "integer", "minimum": 1, "default": 50 * MiB},
        "delete_after": {"type": "boolean", "default": False},
    },
}
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "filename": {"type": "string", "minLength": 1, "default": "{channel}-{id}.{ext}"},
        "mkdir": {"type": "boolean", "default": True},
        "overwrite": {"type": "boolean", "default": False},
    },
}

PLACEHOLDERS = ("channel", "id", "control_id", "message_type", "timestamp", "date", "ext")


def folder_of(url: str, home: str) -> Path:
    """The folder a ``file:`` URL names (see the module docstring for the accepted forms)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise ConnectorError(f"{url!r} is not a file: URL")
    if parts.query or parts.fragment:
        raise ConnectorError(f"{url!r}: a file URL takes no '?' or '#'; write them as %3F and %23")
    if parts.netloc and parts.netloc.lower() != "localhost":
        raise ConnectorError(
            f"{url!r} names the host {parts.netloc!r}; write file:///absolute/path, "
            f"or file:{parts.netloc}{parts.path} for a folder under the hub home"
        )
    path = unquote(parts.path)
    if not path:
        raise ConnectorError(f"{url!r} names no folder (e.g. file:///var/ihehub/in or file:inbox)")
    folder = Path(path) if os.path.isabs(path) else Path(home) / path
    return Path(os.path.abspath(folder))


def _under(folder: Path, value: str) -> Path:
    return Path(os.path.abspath(folder / value))  # an absolute value replaces the folder


def stamp() -> str:
    """A UTC timestamp for file names that must not collide (done/ and error/ copies, uploads)."""
    return utcnow().strftime("%Y%m%dT%H%M%S%fZ")


# --------------------------------------------------------------------------- source


@dataclasses.dataclass(frozen=True, slots=True)
class _Candidate:
    path: Path
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (str(self.path), self.mtime_ns, self.size)


class FileSource:
    """Poll a folder for files matching ``pattern`` and hand each to the hub as one message."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"file source {name!r}"
        check_options(options, SOURCE_OPTIONS_SCHEMA, where)
        self.name = name
        self.url = url
        self.folder = folder_of(url, context.home)
        self.pattern: str = options.get("pattern", "*")
        self.poll_interval = float(options.get("poll_interval", 1.0))
        self.min_age = float(options.get("min_age", 0.5))
        self.done_dir = _under(self.folder, options.get("done_dir", "done"))
        self.error_dir = _under(self.folder, options.get("error_dir", "error"))
        self.max_file_bytes = int(options.get("max_file_bytes", 50 * MiB))
        self.delete_after = bool(options.get("delete_after", False))
        media, params = parse_content_type(options.get("content_type"))
        self.content_type = media
        label = options.get("charset") or params.get("charset")
        self.charset = codec_name(label) if label else None
        if label and self.charset is None:
            raise ConnectorError(f"{where}: unknown charset {label!r}")
        if self.error_dir == self.folder or (self.done_dir == self.folder and not self.delete_after):
            raise ConnectorError(f"{where}: done_dir and error_dir must differ from the polled folder")
        self._inbound: Inbound | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self.polls = 0  # completed polls, for health checks (and tests that wait for the first one)
        self._noted: set[str] = set()  # problems already logged, so a stuck file logs once
        self._accepted: set[tuple[str, int, int]] = set()  # accepted files whose move failed

    # -- lifecycle

    async def start(self, inbound: Inbound) -> None:
        if self._task is not None:
            raise ConnectorError(f"file source {self.name!r} is already started")
        if not await asyncio.to_thread(self.folder.is_dir):
            raise ConnectorError(f"file source {self.name!r}: folder {self.folder} does not exist")
        self._inbound = inbound
        self._stopping = asyncio.Event()  # bound to the loop that runs this source
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name=f"file-source-{self.name}")
        text = "channel %s: polling %s/%s every %ss"
        log.info(text, self.name, self.folder, self.pattern, self.poll_interval)

    async def stop(self) -> None:
        """Finish the file in hand (up to ``STOP_GRACE_SECONDS``), then stop polling."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, STOP_GRACE_SECONDS)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.poll_once()
                self._noted.discard("poll")
            except Exception:
                self._note("poll", "channel %s: polling %s failed", self.name, self.folder, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.poll_interval)

    def _note(self, key: str, text: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.warning(text, *args, exc_info=exc_info)

    # -- one poll

    async def poll_once(self) -> int:
        """Offer every ready file to the hub, oldest first; returns how many left the folder.

        Stops at the first file the hub could not take (``AR``), so files keep their order.
        """
        if self._inbound is None:
            raise ConnectorError(f"file source {self.name!r} is not started")
        inbound = self._inbound
        async with self._lock:
            done = 0
            for candidate in await asyncio.to_thread(self._scan):
                if self._stopping.is_set():
                    break
                verdict = await self._take(candidate, inbound)
                if verdict == "retry":
                    break
                if verdict == "moved":
                    done += 1
            self.polls += 1
            return done

    def _scan(self) -> list[_Candidate]:
        now_ns = time.time_ns()
        found: list[_Candidate] = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not fnmatch.fnmatchcase(entry.name, self.pattern):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    info = entry.stat()
                except OSError:
                    continue
                if now_ns - info.st_mtime_ns < self.min_age * 1e9:
                    continue
                found.append(_Candidate(Path(entry.path), info.st_size, info.st_mtime_ns))
        found.sort(key=lambda c: (c.mtime_ns, c.path.name))
        return found

    async def _take(self, candidate: _Candidate, inbound: Inbound) -> str:
        """``moved`` (left the folder), ``kept`` (skipped this time) or ``retry`` (hub unavailable)."""
        path = candidate.path
        if candidate.key in self._accepted:  # the hub has it; only the move is left to do
            return await self._finish(candidate)
        if candidate.size > self.max_file_bytes:
            reason = f"file is {candidate.size} bytes, over max_file_bytes ({self.max_file_bytes})"
            return await self._refuse(candidate, reason)
        try:
            raw = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return "kept"  # taken by someone else meanwhile
        except OSError as exc:
            return await self._refuse(candidate, f"cannot read the file: {exc.strerror or exc}")
        if len(raw) != candidate.size:
            return "kept"  # still being written: next poll
        message = self._message(path, raw, candidate.mtime_ns)
        try:
            outcome = await inbound(message)
        except Exception:
            text = "channel %s: the hub failed on %s; will retry"
            self._note(f"retry:{path}", text, self.name, path, exc_info=True)
            return "retry"
        code = outcome.code.upper()
        if outcome.accepted:
            self._accepted.add(candidate.key)
            return await self._finish(candidate)
        if code in ("AE", "CE"):
            return await self._refuse(candidate, outcome.error or "refused by the hub", outcome, message.id)
        reason = outcome.error or f"outcome {code}"
        self._note(f"retry:{path}", "channel %s: %s not taken (%s); will retry", self.name, path, reason)
        return "retry"

    def _message(self, path: Path, raw: bytes, mtime_ns: int) -> Message:
        content_type = self.content_type or guess_content_type(raw, path.name)
        charset, control_id, message_type = self.charset, None, None
        if looks_like_hl7(raw, content_type):
            header = hl7_header(raw, charset)
            if header is not None:
                control_id, message_type = header.control_id, header.message_type
                charset = header.charset  # MSH-18 when set, else the charset option
        mtime = dt.datetime.fromtimestamp(mtime_ns / 1e9, dt.UTC).isoformat()
        return Message(
            channel=self.name,
            raw=raw,
            content_type=content_type,
            charset=charset,
            headers={"file.name": path.name, "file.path": str(path), "file.mtime": mtime},
            control_id=control_id,
            message_type=message_type,
            source=path.name,
        )

    async def _finish(self, candidate: _Candidate) -> str:
        path = candidate.path
        try:
            if self.delete_after:
                await asyncio.to_thread(path.unlink)
            else:
                await asyncio.to_thread(_move, path, self.done_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            text = "channel %s: %s was accepted but cannot leave the folder: %s"
            self._note(f"move:{path}", text, self.name, path, exc)
            return "kept"
        self._accepted.discard(candidate.key)
        self._noted.discard(f"move:{path}")
        self._noted.discard(f"retry:{path}")
        return "moved"

    async def _refuse(
        self,
        candidate: _Candidate,
        reason: str,
        outcome: Outcome | None = None,
        message_id: str | None = None,
    ) -> str:
        path = candidate.path
        try:
            moved = await asyncio.to_thread(_move, path, self.error_dir)
        except FileNotFoundError:
            return "kept"
        except OSError as exc:
            text = "channel %s: %s was refused (%s) but cannot be moved to %s: %s"
            self._note(f"move:{path}", text, self.name, path, reason, self.error_dir, exc)
            return "kept"
        log.warning("channel %s: %s moved to %s: %s", self.name, path.name, self.error_dir, reason)
        try:
            await asyncio.to_thread(_write_reason, path, moved, reason, outcome, message_id)
        except OSError as exc:
            log.error("channel %s: cannot write the reason next to %s: %s", self.name, moved, exc)
        self._noted.discard(f"retry:{path}")
        return "moved"


def _move(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder``; a name already there gets a UTC timestamp appended."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    while target.exists():
        target = folder / f"{path.stem}.{stamp()}{path.suffix}"
    return Path(shutil.move(path, target))


def _write_reason(
    path: Path, moved: Path, reason: str, outcome: Outcome | None, message_id: str | None
) -> None:
    """``<name>.error.txt`` beside the refused file: why, and what the hub said."""
    lines = [f"file: {path}", f"time: {utcnow().isoformat()}", f"reason: {reason}"]
    if outcome is not None:
        lines += [f"code: {outcome.code}"]
        lines += [f"error code (HL7 table 0357): {outcome.error_code}"] if outcome.error_code else []
        lines += [f"location: {outcome.error_location}"] if outcome.error_location else []
    lines += [f"message id: {message_id}"] if message_id else []
    (moved.parent / f"{moved.name}.error.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- destination


_UNSAFE = re.compile(r"[^\w.\-]+")


def _safe(value: str) -> str:
    """A value usable inside a file name: no separators, no leading dots."""
    return _UNSAFE.sub("_", value).lstrip(".") or "_"


class FileDestination:
    """Write each message to its own file in a folder, atomically."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"file destination {name!r}"
        check_options(options, DESTINATION_OPTIONS_SCHEMA, where)
        self.name = name
        self.url = url
        self.folder = folder_of(url, context.home)
        self.template: str = options.get("filename", "{channel}-{id}.{ext}")
        self.mkdir = bool(options.get("mkdir", True))
        self.overwrite = bool(options.get("overwrite", False))
        self._check_template(where)

    def _check_template(self, where: str) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ConnectorError(f"{where}: options.filename {self.template!r}: {exc}") from None
        for field in fields:
            if field not in PLACEHOLDERS:
                raise ConnectorError(
                    f"{where}: options.filename: unknown placeholder {{{field}}}; "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                )
        sample = os.path.normpath(self.template.format(**dict.fromkeys(PLACEHOLDERS, "x")))
        if os.path.isabs(sample) or sample == ".." or sample.startswith(".." + os.sep) or sample == ".":
            raise ConnectorError(f"{where}: options.filename must be a path inside {self.folder}")

    def filename(self, message: Message) -> str:
        """The relative path ``message`` is written to (the ``filename`` template filled in)."""
        values = {
            "channel": message.channel,
            "id": message.id,
            "control_id": message.control_id or message.id,
            "message_type": message.message_type or "unknown",
            "timestamp": message.received_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ"),
            "date": message.received_at.astimezone(dt.UTC).strftime("%Y%m%d"),
            "ext": extension_for(message.content_type),
        }
        return self.template.format(**{k: _safe(v) for k, v in values.items()})

    async def send(self, message: Message) -> Response:
        target = self.folder / self.filename(message)
        written = await asyncio.to_thread(self._write, target, message.raw)
        return Response(ok=True, status="written", body=os.fsencode(written))

    async def close(self) -> None:
        return None

    def _write(self, target: Path, raw: bytes) -> Path:
        folder = target.parent
        if not folder.is_dir():
            if not self.mkdir:
                raise DeliveryError(f"{self.name}: folder {folder} does not exist (options.mkdir is false)")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DeliveryError(f"{self.name}: cannot create {folder}: {exc.strerror or exc}") from exc
        if not self.overwrite and target.exists():
            raise self._exists(target)
        temp = folder / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            self._publish(temp, target)
            _fsync_folder(folder)
        except DeliveryError:
            raise
        except OSError as exc:
            raise DeliveryError(f"{self.name}: cannot write {target}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return target

    def _publish(self, temp: Path, target: Path) -> None:
        if self.overwrite:
            os.replace(temp, target)
            return
        try:
            os.link(temp, target)  # atomic and never replaces an existing file
        except FileExistsError:
            raise self._exists(target) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if target.exists():  # filesystem without hard links: check, then rename
                raise self._exists(target) from None
            os.replace(temp, target)

    def _exists(self, target: Path) -> DeliveryError:
        text = f"{self.name}: {target} already exists (set options.overwrite: true to replace it)"
        return DeliveryError(text, retryable=False)


def _fsync_folder(folder: Path) -> None:
    """Make the new name durable (POSIX: fsync on the directory); not possible everywhere."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


SPEC = ConnectorSpec(
    schemes=("file",),
    description="Poll a folder for files (source); write each message to its own file, atomically",
    source="ihehub.channels.file:FileSource",
    destination="ihehub.channels.file:FileDestination",
    options_schema=union_schema(SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA),
    example="""\
source:
  url: file:///var/ihehub/inbox
  options: {pattern: "*.hl7", poll_interval: 2, min_age: 1, charset: gb18030}
destinations:
  - url: file:outbox
    options: {filename: "{date}/{channel}-{control_id}.{ext}"}
""",
)
