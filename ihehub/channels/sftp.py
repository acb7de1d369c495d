"""``sftp://`` connectors: poll a folder on an SSH server (source); upload files atomically (destination).

URL: ``sftp://user[:password]@host[:port]/absolute/folder`` (``/~/inbox`` is ``inbox`` under the login
folder).  The SSH File Transfer Protocol is draft-ietf-secsh-filexfer-02 (version 3, what OpenSSH
speaks), run by paramiko.  The server's host key is always checked (RFC 4251 §4.1): against
``host_key`` (an OpenSSH ``SHA256:...`` fingerprint) or a ``known_hosts`` file; an unknown key is
refused with its fingerprint in the error, so it can be checked out of band and pasted into the config.

**Source.**  Every ``poll_interval`` seconds, the files matching ``pattern`` (not dot files, older
than ``min_age``) are downloaded oldest first, each handed to the hub as one message, and only then
moved to ``done_dir`` (or deleted with ``delete_after``).  A file the channel refuses (``AE``) moves
to ``error_dir`` with ``<name>.error.txt`` beside it.  When the hub cannot take a message the file
stays and is offered again on the next poll.  A server that is down is reported in the channel
status and polled again.

**Destination.**  Each message is uploaded to a temporary name in the target folder
(``.<name>.<random>.tmp``) and then renamed (SSH_FXP_RENAME, which OpenSSH refuses when the target
exists, or ``posix-rename@openssh.com`` with ``overwrite: true``), so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import fnmatch
import io
import logging
import os
import posixpath
import secrets
import socket
import stat
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import paramiko

from ihehub.bus.message import Message, utcnow
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Inbound, Outcome, Response
from ihehub.channels.file import FileDestination, stamp
from ihehub.channels.options import check_options, union_schema
from ihehub.channels.polling import PollingSource
from ihehub.channels.registry import ConnectorContext
from ihehub.channels.sniff import codec_name, label, parse_content_type

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_ERRORS = (OSError, EOFError, paramiko.SSHException)

CONNECTION_OPTIONS: dict[str, Any] = {
    "password": {"type": "string", "description": "instead of a password in the URL"},
    "key_file": {"type": "string", "minLength": 1, "description": "private key (OpenSSH or PEM), under the home"},
    "passphrase": {"type": "string"},
    "known_hosts": {"type": "string", "minLength": 1, "description": "OpenSSH known_hosts file"},
    "host_key": {"type": "string", "pattern": "^SHA256:[A-Za-z0-9+/]{43}=?$",
                 "description": "the server's host key fingerprint, as ssh-keygen -lf prints it"},
    "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 15},
}
SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **CONNECTION_OPTIONS,
        "pattern": {"type": "string", "minLength": 1, "default": "*", "description": "glob on file names"},
        "poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 5.0},
        "min_age": {"type": "number", "minimum": 0, "default": 1.0},
        "done_dir": {"type": "string", "minLength": 1, "default": "done"},
        "error_dir": {"type": "string", "minLength": 1, "default": "error"},
        "delete_after": {"type": "boolean", "default": False},
        "charset": {"type": "string", "minLength": 1},
        "content_type": {"type": "string", "minLength": 1},
        "max_file_bytes": {"type": "integer", "minimum": 1, "default": 50 * MiB},
    },
}
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **CONNECTION_OPTIONS,
        "filename": {"type": "string", "minLength": 1, "default": "{channel}-{id}.{ext}"},
        "mkdir": {"type": "boolean", "default": True},
        "overwrite": {"type": "boolean", "default": False},
    },
}


# --------------------------------------------------------------------------- connection


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where an ``sftp://`` URL points: login, server and folder (never shown with its password)."""

    user: str
    password: str | None
    host: str
    port: int
    folder: str

    @property
    def shown(self) -> str:
        folder = self.folder if self.folder.startswith("/") else f"/~/{self.folder}"
        return f"sftp://{self.user}@{self.host}:{self.port}{folder}"


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme.lower() != "sftp":
        raise ConnectorError(f"{url!r} is not an sftp:// URL")
    try:
        port = parts.port or 22
    except ValueError as exc:
        raise ConnectorError(f"sftp URL: bad port ({exc})") from None
    if not parts.hostname or not parts.username:
        raise ConnectorError("an sftp URL needs a user and a host: sftp://user@host[:port]/folder")
    if parts.query or parts.fragment:
        raise ConnectorError("an sftp URL takes no '?' or '#'")
    path = unquote(parts.path) or "/"
    folder = (path[3:] or ".") if path.startswith("/~/") or path == "/~" else path
    password = unquote(parts.password) if parts.password is not None else None
    return Target(user=unquote(parts.username), password=password, host=parts.hostname, port=port, folder=folder)


class Link:
    """One SSH connection and SFTP session, opened on first use and again after it broke.

    Used from worker threads (``asyncio.to_thread``), one call at a time (``lock``).
    """

    def __init__(self, target: Target, options: Mapping[str, Any], home: str, where: str) -> None:
        self.target = target
        self.where = where
        self.password: str | None = options.get("password", target.password)
        self.key_file = _resolve(options["key_file"], home) if options.get("key_file") else None
        self.passphrase: str | None = options.get("passphrase")
        self.known_hosts = _resolve(options["known_hosts"], home) if options.get("known_hosts") else None
        self.host_key: str | None = options.get("host_key")
        self.timeout = float(options.get("timeout", 15))
        if self.password is None and self.key_file is None:
            raise ConnectorError(f"{where}: give options.key_file (or a password) to log in as {target.user!r}")
        if self.host_key is None and self.known_hosts is None:
            default = os.path.expanduser("~/.ssh/known_hosts")
            if not os.path.exists(default):
                raise ConnectorError(f"{where}: options.host_key (SHA256:...) or options.known_hosts is needed to "
                                     f"check the server's key")
            self.known_hosts = default
        self.lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None

    def client(self) -> paramiko.SFTPClient:
        if self._sftp is not None and self._transport is not None and self._transport.is_active():
            return self._sftp
        self.reset()
        target = self.target
        sock = socket.create_connection((target.host, target.port), timeout=self.timeout)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=self.timeout)
            self._check_host_key(transport.get_remote_server_key())
            if self.key_file is not None:
                key = paramiko.PKey.from_path(self.key_file, self.passphrase)
                transport.auth_publickey(target.user, key)
            else:
                transport.auth_password(target.user, self.password or "")
            sftp = paramiko.SFTPClient.from_transport(transport)
            if sftp is None:
                raise paramiko.SSHException("the server refused the sftp subsystem")
            sftp.get_channel().settimeout(self.timeout)
        except BaseException:
            transport.close()
            raise
        self._transport, self._sftp = transport, sftp
        return sftp

    def _check_host_key(self, key: paramiko.PKey) -> None:
        """RFC 4251 §4.1: the client must check the server's host key, or man-in-the-middle is trivial."""
        fingerprint = key.fingerprint
        if self.host_key is not None:
            if fingerprint.rstrip("=") == self.host_key.rstrip("="):
                return
            raise paramiko.SSHException(f"host key {fingerprint} of {self.target.host} is not options.host_key "
                                        f"{self.host_key}: refusing to connect")
        known = paramiko.HostKeys()
        try:
            known.load(self.known_hosts or "")
        except OSError as exc:
            raise paramiko.SSHException(f"cannot read known_hosts {self.known_hosts}: {exc}") from None
        name = self.target.host if self.target.port == 22 else f"[{self.target.host}]:{self.target.port}"
        if known.check(name, key):
            return
        raise paramiko.SSHException(f"host key {key.get_name()} {fingerprint} of {name} is not in {self.known_hosts}: "
                                    f"refusing to connect (check it, then set options.host_key: {fingerprint})")

    def reset(self) -> None:
        transport, self._transport, self._sftp = self._transport, None, None
        if transport is not None:
            transport.close()


def _resolve(path: str, home: str) -> str:
    return path if os.path.isabs(path) else os.path.join(home, path)


def _describe(exc: BaseException, target: Target) -> str:
    if isinstance(exc, ConnectorError):
        return f"{target.shown}: {exc}"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"{target.shown}: login as {target.user!r} refused ({exc})"
    if isinstance(exc, paramiko.SSHException):
        return f"{target.shown}: SSH: {exc}"
    if isinstance(exc, OSError):
        return f"{target.shown} unavailable: {exc.strerror or exc}"
    return f"{target.shown}: {type(exc).__name__}: {exc}"


def _ensure_folder(sftp: paramiko.SFTPClient, folder: str) -> None:
    try:
        sftp.stat(folder)
    except FileNotFoundError:
        sftp.mkdir(folder)


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
    except FileNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- source


@dataclasses.dataclass(frozen=True, slots=True)
class _Remote:
    name: str
    size: int
    mtime: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.name, self.mtime, self.size)


class SFTPSource(PollingSource):
    """Poll a folder on an SSH server for files matching ``pattern``; each file is one message."""

    kind = "sftp source"

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"sftp source {name!r}"
        check_options(options, SOURCE_OPTIONS_SCHEMA, where)
        super().__init__(name=name, url=url, poll_interval=float(options.get("poll_interval", 5.0)),
                         context=context)
        self.target = parse_url(url)
        self.link = Link(self.target, options, context.home, where)
        self.folder = self.target.folder
        self.pattern: str = options.get("pattern", "*")
        self.min_age = float(options.get("min_age", 1.0))
        self.done_dir = posixpath.join(self.folder, options.get("done_dir", "done"))
        self.error_dir = posixpath.join(self.folder, options.get("error_dir", "error"))
        self.delete_after = bool(options.get("delete_after", False))
        self.max_file_bytes = int(options.get("max_file_bytes", 50 * MiB))
        media, params = parse_content_type(options.get("content_type"))
        self.content_type = media
        charset_label = options.get("charset") or params.get("charset")
        self.charset = codec_name(charset_label) if charset_label else None
        if charset_label and self.charset is None:
            raise ConnectorError(f"{where}: unknown charset {charset_label!r}")
        folders = {posixpath.normpath(p) for p in (self.folder, self.error_dir)}
        if len(folders) < 2 or (posixpath.normpath(self.done_dir) == posixpath.normpath(self.folder)
                                and not self.delete_after):
            raise ConnectorError(f"{where}: done_dir and error_dir must differ from the polled folder")
        self._accepted: set[tuple[str, int, int]] = set()  # taken by the hub, but the move failed

    async def start(self, inbound: Inbound) -> None:
        await super().start(inbound)
        log.info("channel %s: polling %s/%s every %ss", self.name, self.target.shown, self.pattern,
                 self.poll_interval)

    async def _close(self) -> None:
        await asyncio.to_thread(self._locked, self.link.reset)

    def _describe(self, exc: BaseException) -> str:
        return _describe(exc, self.target)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self.link.lock:
            return fn(*args)

    async def _remote(self, fn: Any, *args: Any) -> Any:
        """Run one SFTP step in a thread; a broken connection is dropped (the next poll opens a new one)."""
        try:
            return await asyncio.to_thread(self._locked, fn, *args)
        except _ERRORS:
            await asyncio.to_thread(self._locked, self.link.reset)
            raise

    async def _poll(self, inbound: Inbound) -> int:
        done = 0
        for remote in await self._remote(self._scan):
            if self.stopping:
                break
            verdict = await self._take(remote, inbound)
            if verdict == "retry":
                break
            done += verdict == "moved"
        return done

    def _scan(self) -> list[_Remote]:
        sftp = self.link.client()
        now = time.time()
        found = []
        try:
            entries = sftp.listdir_attr(self.folder)
        except FileNotFoundError:
            raise ConnectorError(f"folder {self.folder} does not exist on {self.target.host}") from None
        for entry in entries:
            name = entry.filename
            if name.startswith(".") or not fnmatch.fnmatchcase(name, self.pattern):
                continue
            if entry.st_mode is None or not stat.S_ISREG(entry.st_mode):
                continue
            mtime = int(entry.st_mtime or 0)
            if now - mtime < self.min_age:
                continue
            found.append(_Remote(name, int(entry.st_size or 0), mtime))
        found.sort(key=lambda r: (r.mtime, r.name))
        return found

    def _read(self, remote: _Remote) -> bytes | None:
        sftp = self.link.client()
        try:
            with sftp.open(posixpath.join(self.folder, remote.name), "rb") as handle:
                handle.prefetch(remote.size)
                data: bytes = handle.read()
        except FileNotFoundError:
            return None  # taken by someone else meanwhile
        return data if len(data) == remote.size else None  # still being written: next poll

    async def _take(self, remote: _Remote, inbound: Inbound) -> str:
        """``moved`` (left the folder), ``kept`` (skipped this time) or ``retry`` (hub unavailable)."""
        if remote.key in self._accepted:
            return await self._finish(remote)
        if remote.size > self.max_file_bytes:
            reason = f"file is {remote.size} bytes, over max_file_bytes ({self.max_file_bytes})"
            return await self._refuse(remote, reason)
        raw = await self._remote(self._read, remote)
        if raw is None:
            return "kept"
        labels = label(raw, content_type=self.content_type, charset=self.charset, name=remote.name)
        path = posixpath.join(self.folder, remote.name)
        message = Message(
            channel=self.name,
            raw=raw,
            content_type=labels.content_type,
            charset=labels.charset,
            headers={"sftp.name": remote.name, "sftp.path": path, "sftp.host": self.target.host,
                     "sftp.mtime": dt.datetime.fromtimestamp(remote.mtime, dt.UTC).isoformat()},
            control_id=labels.control_id,
            message_type=labels.message_type,
            source=f"{self.target.host}:{path}",
        )
        try:
            outcome = await inbound(message)
        except Exception:
            log.warning("channel %s: the hub failed on %s; will retry", self.name, path, exc_info=True)
            return "retry"
        if outcome.accepted:
            self._accepted.add(remote.key)
            return await self._finish(remote)
        if outcome.code.upper() in ("AE", "CE"):
            return await self._refuse(remote, outcome.error or "refused by the hub", outcome, message.id)
        log.warning("channel %s: %s not taken (%s); will retry", self.name, path, outcome.error or outcome.code)
        return "retry"

    async def _finish(self, remote: _Remote) -> str:
        await self._remote(self._move_or_delete, remote.name)
        self._accepted.discard(remote.key)
        return "moved"

    def _move_or_delete(self, name: str) -> None:
        sftp = self.link.client()
        path = posixpath.join(self.folder, name)
        try:
            if self.delete_after:
                sftp.remove(path)
            else:
                self._rename_into(sftp, name, self.done_dir)
        except FileNotFoundError:
            return

    async def _refuse(self, remote: _Remote, reason: str, outcome: Outcome | None = None,
                      message_id: str | None = None) -> str:
        lines = [f"file: {posixpath.join(self.folder, remote.name)}", f"time: {utcnow().isoformat()}",
                 f"reason: {reason}"]
        if outcome is not None:
            lines.append(f"code: {outcome.code}")
            lines += [f"error code (HL7 table 0357): {outcome.error_code}"] if outcome.error_code else []
            lines += [f"location: {outcome.error_location}"] if outcome.error_location else []
        lines += [f"message id: {message_id}"] if message_id else []
        await self._remote(self._move_to_error, remote.name, "\n".join(lines) + "\n")
        log.warning("channel %s: %s moved to %s: %s", self.name, remote.name, self.error_dir, reason)
        return "moved"

    def _move_to_error(self, name: str, text: str) -> None:
        sftp = self.link.client()
        try:
            moved = self._rename_into(sftp, name, self.error_dir)
        except FileNotFoundError:
            return
        sftp.putfo(io.BytesIO(text.encode("utf-8")), f"{moved}.error.txt", confirm=False)

    def _rename_into(self, sftp: paramiko.SFTPClient, name: str, folder: str) -> str:
        _ensure_folder(sftp, folder)
        target = posixpath.join(folder, name)
        while _exists(sftp, target):
            stem, ext = posixpath.splitext(name)
            target = posixpath.join(folder, f"{stem}.{stamp()}{ext}")
        sftp.rename(posixpath.join(self.folder, name), target)
        return target


# --------------------------------------------------------------------------- destination


class SFTPDestination:
    """Upload each message as its own file: a temporary name, then a rename."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"sftp destination {name!r}"
        check_options(options, DESTINATION_OPTIONS_SCHEMA, where)
        self.name = name
        self.url = url
        self.target = parse_url(url)
        self.link = Link(self.target, options, context.home, where)
        self.mkdir = bool(options.get("mkdir", True))
        self.overwrite = bool(options.get("overwrite", False))
        try:  # the same file names as a file: destination (placeholders, checks)
            self.names = FileDestination(name=name, url="file:///", context=context,
                                         options={"filename": options.get("filename", "{channel}-{id}.{ext}")})
        except ConnectorError as exc:
            raise ConnectorError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None

    def _upload(self, relative: str, raw: bytes) -> str:
        with self.link.lock:
            sftp = self.link.client()
            target = posixpath.join(self.target.folder, relative)
            folder = posixpath.dirname(target)
            if not _exists(sftp, folder):
                if not self.mkdir:
                    raise DeliveryError(f"{self.name}: folder {folder} does not exist on {self.target.host} "
                                        "(options.mkdir is false)", retryable=False)
                self._makedirs(sftp, folder)
            if not self.overwrite and _exists(sftp, target):
                raise self._taken(target)
            temp = posixpath.join(folder, f".{posixpath.basename(target)}.{secrets.token_hex(6)}.tmp")
            try:
                sftp.putfo(io.BytesIO(raw), temp, file_size=len(raw), confirm=True)
                if self.overwrite:
                    sftp.posix_rename(temp, target)
                else:
                    try:
                        sftp.rename(temp, target)  # OpenSSH: fails when the target exists, never replaces it
                    except OSError:
                        if _exists(sftp, target):
                            raise self._taken(target) from None
                        raise
            except BaseException:
                try:
                    sftp.remove(temp)
                except _ERRORS:
                    log.debug("%s: cannot remove the temporary %s", self.name, temp)
                raise
            return target

    def _makedirs(self, sftp: paramiko.SFTPClient, folder: str) -> None:
        parts = folder.split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and not _exists(sftp, path):
                sftp.mkdir(path)

    def _taken(self, target: str) -> DeliveryError:
        return DeliveryError(f"{self.name}: {target} already exists on {self.target.host} "
                             "(set options.overwrite: true to replace it)", retryable=False)

    async def send(self, message: Message) -> Response:
        relative = self.names.filename(message)
        try:
            written = await asyncio.to_thread(self._upload, relative, message.raw)
        except DeliveryError:
            raise
        except _ERRORS as exc:
            await asyncio.to_thread(self._reset)
            raise DeliveryError(f"{self.name}: {_describe(exc, self.target)}") from exc
        return Response(ok=True, status="written", body=written.encode())

    def _reset(self) -> None:
        with self.link.lock:
            self.link.reset()

    async def close(self) -> None:
        await asyncio.to_thread(self._reset)


SPEC = ConnectorSpec(
    schemes=("sftp",),
    description="Poll a folder on an SSH server (source); upload each message as a file, atomically",
    source="ihehub.channels.sftp:SFTPSource",
    destination="ihehub.channels.sftp:SFTPDestination",
    options_schema=union_schema(SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA),
    example="""\
source:
  url: sftp://hub@ris.example.org/srv/export/orders
  options:
    key_file: keys/hub_ed25519
    host_key: "SHA256:3mN0bG3wX2pQ8xk0o4n7k3Yy1t1cJb8m6Yl7rZkq2dE"
    pattern: "*.hl7"
    charset: gb18030
destinations:
  - name: archive
    url: sftp://hub@archive.example.org:2222/~/inbox
    options: {key_file: keys/hub_ed25519, known_hosts: keys/known_hosts, filename: "{date}/{control_id}.{ext}"}
""",
)
