"""sftp:// connectors against a real OpenSSH server on a loopback port (tests/channels/sshd_kit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.registry import ConnectorContext
from ihehub.channels.sftp import SFTPDestination, SFTPSource, parse_url
from tests.channels.sql_kit import GB_HL7, Status
from tests.channels.sshd_kit import Server, sshd
from tests.channels.test_file_connector import Hub, run
from tests.conftest import free_port

OLD = time.time() - 3600


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with sshd(tmp_path) as running:
        yield running


def drop(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    os.utime(folder / name, (OLD, OLD))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@contextlib.asynccontextmanager
async def polling(url: str, hub: Any, status: Status | None = None, **options: Any) -> AsyncIterator[SFTPSource]:
    options.setdefault("poll_interval", 3600)  # the tests call poll_once themselves
    source = SFTPSource(name="ris", url=url, options=options, context=ConnectorContext(on_source_status=status))
    await source.start(hub)
    try:
        while source.polls == 0:
            await asyncio.sleep(0.01)
        yield source
    finally:
        await source.stop()


def test_urls_and_options() -> None:
    target = parse_url("sftp://his:p%40ss@10.0.0.5:2222/~/out")
    assert (target.user, target.password, target.host, target.port, target.folder) == \
        ("his", "p@ss", "10.0.0.5", 2222, "out")
    assert target.shown == "sftp://his@10.0.0.5:2222/~/out"
    assert parse_url("sftp://his@h/srv/in").folder == "/srv/in"
    with pytest.raises(ConnectorError, match="needs a user and a host"):
        parse_url("sftp://h/srv")
    ctx = ConnectorContext()
    with pytest.raises(ConnectorError, match=r"give options\.key_file"):
        SFTPSource(name="x", url="sftp://u@h/in", options={"host_key": "SHA256:" + "a" * 43}, context=ctx)
    with pytest.raises(ConnectorError, match="unknown option 'patern' \\(did you mean 'pattern'\\?\\)"):
        SFTPSource(name="x", url="sftp://u@h/in", options={"patern": "*"}, context=ctx)
    with pytest.raises(ConnectorError, match=r"sftp destination .x.: options\.filename: unknown placeholder"):
        SFTPDestination(name="x", url="sftp://u@h/in", options={"filename": "{nope}", "password": "p",
                                                                "host_key": "SHA256:" + "a" * 43}, context=ctx)


def test_files_are_taken_and_moved_to_done_or_error(server: Server) -> None:
    inbox = server.root / "in"
    inbox.mkdir()
    hub = Hub(Outcome(code="AA"), Outcome(code="AE", error="PID-3 missing", error_code="101"))

    async def scenario() -> list[int]:
        async with polling(server.url(inbox), hub, key_file=str(server.key_file), host_key=server.host_key,
                           pattern="*.hl7", charset="gb18030") as source:
            drop(inbox, "a.hl7", GB_HL7)
            drop(inbox, "b.hl7", b"MSH|^~\\&|HIS|H1|||20261127||ADT^A08|B-1|P|2.5\r")
            drop(inbox, "c.txt", b"not mine")
            drop(inbox, ".d.hl7", b"being written")
            (inbox / "new.hl7").write_bytes(b"too young")
            os.utime(inbox / "new.hl7", (time.time() + 3600, time.time() + 3600))  # under min_age, however slow
            return [await source.poll_once(), await source.poll_once()]

    assert run(scenario()) == [2, 0]
    first = hub.messages[0]
    assert first.raw == GB_HL7 and "张三" in first.text() and first.charset == "gb18030"
    assert (first.control_id, first.message_type, first.content_type) == ("HIS-0001", "ADT^A01", "application/hl7-v2")
    assert first.headers["sftp.name"] == "a.hl7" and first.headers["sftp.path"] == f"{inbox}/a.hl7"
    assert names(inbox) == [".d.hl7", "c.txt", "done", "error", "new.hl7"]
    assert names(inbox / "done") == ["a.hl7"]
    assert names(inbox / "error") == ["b.hl7", "b.hl7.error.txt"]
    reason = (inbox / "error" / "b.hl7.error.txt").read_text(encoding="utf-8")
    assert "reason: PID-3 missing" in reason and "error code (HL7 table 0357): 101" in reason
    assert f"message id: {hub.messages[1].id}" in reason


def test_hub_unavailable_keeps_the_file_and_delete_after(server: Server) -> None:
    inbox = server.root / "in"
    hub = Hub(Outcome(code="AR", error="store down"), Outcome(code="AA"))

    async def scenario() -> list[int]:
        async with polling(server.url(inbox), hub, key_file=str(server.key_file),
                           known_hosts=str(server.known_hosts), delete_after=True) as source:
            drop(inbox, "x.json", b'{"a": 1}')
            drop(inbox, "x2.json", b'{"a": 2}')
            first = await source.poll_once()
            assert names(inbox) == ["x.json", "x2.json"]
            return [first, await source.poll_once()]

    assert run(scenario()) == [0, 2]
    assert [m.raw for m in hub.messages] == [b'{"a": 1}', b'{"a": 1}', b'{"a": 2}']
    assert hub.messages[0].content_type == "application/json"
    assert names(inbox) == []


def test_server_down_is_reported_then_polling_resumes(tmp_path: Path) -> None:
    port = free_port()
    with sshd(tmp_path, port=port) as server:  # keys and host key made; then the server goes away
        pass
    inbox = server.root / "in"
    status, hub = Status(), Hub()

    async def scenario() -> int:
        async with polling(server.url(inbox), hub, status, key_file=str(server.key_file),
                           host_key=server.host_key) as source:
            assert len(status.reports) == 1  # the first poll failed
            with pytest.raises(ConnectionRefusedError):
                await source.poll_once()
            assert len(status.reports) == 1 and source.failures == 2
            with sshd(tmp_path, port=port):
                drop(inbox, "a.hl7", GB_HL7)
                return await source.poll_once()

    assert run(scenario()) == 1
    (channel, error), cleared = status.reports
    assert channel == "ris" and error == (f"sftp source 'ris': sftp://{server.user}@127.0.0.1:{port}{inbox} "
                                          "unavailable: Connection refused")
    assert cleared == ("ris", None)
    assert [m.control_id for m in hub.messages] == ["HIS-0001"]


def test_a_missing_folder_is_named(server: Server) -> None:
    status = Status()

    async def scenario() -> None:
        async with polling(server.url(server.root / "nope"), Hub(), status, key_file=str(server.key_file),
                           host_key=server.host_key):
            pass

    run(scenario())
    missing = server.root / "nope"
    expected = f"sftp source 'ris': {server.url(missing)}: folder {missing} does not exist on 127.0.0.1"
    assert status.reports[0][1] == expected


def test_an_unexpected_host_key_is_refused(server: Server) -> None:
    status, hub = Status(), Hub()
    wrong = "SHA256:" + "A" * 43

    async def scenario() -> None:
        async with polling(server.url(server.root), hub, status, key_file=str(server.key_file), host_key=wrong):
            pass

    run(scenario())
    error = status.reports[0][1]
    assert error == (f"sftp source 'ris': sftp://{server.user}@127.0.0.1:{server.port}{server.root}: SSH: host key "
                     f"{server.host_key} of 127.0.0.1 is not options.host_key {wrong}: refusing to connect")
    assert hub.messages == []


def test_destination_uploads_atomically(server: Server) -> None:
    out = server.root / "out"
    options = {"key_file": str(server.key_file), "host_key": server.host_key, "filename": "{date}/{control_id}.{ext}"}
    dest = SFTPDestination(name="adt/archive", url=server.url(out), options=options, context=ConnectorContext())
    message = Message(channel="adt", raw=GB_HL7, content_type="application/hl7-v2", control_id="HIS-0001")

    async def scenario() -> list[Any]:
        results: list[Any] = [await dest.send(message)]
        with pytest.raises(DeliveryError) as taken:
            await dest.send(message)
        results.append(taken.value)
        await dest.close()
        return results

    response, taken = run(scenario())
    day = message.received_at.strftime("%Y%m%d")
    assert response.ok and response.body == f"{out}/{day}/HIS-0001.hl7".encode()
    assert (out / day / "HIS-0001.hl7").read_bytes() == GB_HL7
    assert names(out / day) == ["HIS-0001.hl7"]  # no temporary file left behind
    assert not taken.retryable and "already exists" in str(taken)

    again = SFTPDestination(name="adt/archive", url=server.url(out), options={**options, "overwrite": True},
                            context=ConnectorContext())
    newer = message.evolve(raw=b"MSH|newer")

    async def overwrite() -> None:
        await again.send(newer)
        await again.close()

    run(overwrite())
    assert (out / day / "HIS-0001.hl7").read_bytes() == b"MSH|newer"


def test_destination_server_down_is_retryable(server: Server) -> None:
    options = {"key_file": str(server.key_file), "host_key": server.host_key}
    dest = SFTPDestination(name="adt/archive", url=f"sftp://{server.user}@127.0.0.1:{free_port()}/out",
                           options=options, context=ConnectorContext())

    async def scenario() -> DeliveryError:
        with pytest.raises(DeliveryError) as info:
            await dest.send(Message(channel="adt", raw=b"x"))
        await dest.close()
        return info.value

    error = run(scenario())
    assert error.retryable and "unavailable" in str(error)
