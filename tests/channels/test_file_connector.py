"""file: connectors on real folders (pytest's tmp_path): polling, done/error moves, atomic writes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.file import SPEC, FileDestination, FileSource, folder_of
from ihehub.channels.registry import ConnectorContext, Registry

CORPUS = (Path(__file__).parents[2] / "../shared/corpus/ipf/hl7v2").resolve()
A01 = CORPUS / "pixsource-A01.hl7"  # MSH-10 "371601", ADT^A01, \r\n between segments
CTX = ConnectorContext()
OLD = time.time() - 3600  # an mtime well past any min_age

# HL7 v2.5 ADT^A01 in GB18030 without MSH-18: only the channel's charset option says how to read 张三.
GB_HL7 = (
    "MSH|^~\\&|HIS|H1|HUB|H0|20240101120000||ADT^A01^ADT_A01|GB-0001|P|2.5\rPID|1||P001^^^H1||张三^^^^^^L\r"
).encode("gb18030")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


class Hub:
    """A stand-in for the bus: records messages and answers with scripted outcomes (the last repeats)."""

    def __init__(self, *answers: Outcome | Exception) -> None:
        self.answers = list(answers) or [Outcome(code="AA")]
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> Outcome:
        self.messages.append(message)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def drop(folder: Path, name: str, data: bytes, mtime: float = OLD) -> Path:
    path = folder / name
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


@contextlib.asynccontextmanager
async def polling(folder: Path, hub: Hub, **options: Any) -> AsyncIterator[FileSource]:
    """A started source whose loop has finished its first poll; the tests drop files, then poll."""
    options.setdefault("poll_interval", 3600)  # the tests call poll_once themselves
    source = FileSource(name="inbox", url=folder.as_uri(), options=options, context=CTX)
    await source.start(hub)
    try:
        while source.polls == 0:
            await asyncio.sleep(0.005)
        yield source
    finally:
        await source.stop()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- URLs


def test_file_urls(tmp_path: Path) -> None:
    home = str(tmp_path)
    assert folder_of("file:///var/ihehub/in", home) == Path("/var/ihehub/in")
    assert folder_of("file://localhost/var/in", home) == Path("/var/in")
    assert folder_of("file:/var/in", home) == Path("/var/in")
    assert folder_of("file:inbox/adt", home) == tmp_path / "inbox/adt"
    assert folder_of("file:///srv/%E5%BD%B1%E5%83%8F%20in", home) == Path("/srv/影像 in")
    with pytest.raises(ConnectorError, match="file:inbox/adt for a folder under the hub home"):
        folder_of("file://inbox/adt", home)
    with pytest.raises(ConnectorError, match="no '\\?' or '#'"):
        folder_of("file:///in?x=1", home)
    with pytest.raises(ConnectorError, match="names no folder"):
        folder_of("file:", home)


# --------------------------------------------------------------------------- source


def test_accepted_files_move_to_done_oldest_first_with_their_labels(tmp_path: Path) -> None:
    hub = Hub()

    async def scenario() -> int:
        async with polling(tmp_path, hub, pattern="*.hl7", charset="gb18030") as source:
            drop(tmp_path, "b.hl7", A01.read_bytes(), OLD + 2)
            drop(tmp_path, "a.hl7", A01.read_bytes(), OLD + 2)  # same mtime: name decides
            drop(tmp_path, "z.hl7", GB_HL7, OLD)
            drop(tmp_path, ".partial.hl7", b"MSH|", OLD)  # dot files are never taken
            drop(tmp_path, "notes.txt", b"MSH|", OLD)  # does not match the pattern
            (tmp_path / "sub.hl7").mkdir()  # folders are never taken
            return await source.poll_once()

    assert run(scenario()) == 3
    assert [m.source for m in hub.messages] == ["z.hl7", "a.hl7", "b.hl7"]
    assert names(tmp_path / "done") == ["a.hl7", "b.hl7", "z.hl7"]
    assert names(tmp_path) == [".partial.hl7", "done", "notes.txt", "sub.hl7"]
    gb, a01 = hub.messages[0], hub.messages[1]
    assert (gb.charset, gb.control_id, gb.message_type) == ("gb18030", "GB-0001", "ADT^A01")
    assert "张三" in gb.text()
    assert a01.raw == A01.read_bytes()
    assert (a01.content_type, a01.control_id, a01.message_type) == ("application/hl7-v2", "371601", "ADT^A01")
    assert a01.headers["file.name"] == "a.hl7"
    assert a01.headers["file.path"] == str(tmp_path / "a.hl7")
    assert a01.headers["file.mtime"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(OLD + 2)))


def test_refused_files_move_to_error_with_the_reason(tmp_path: Path) -> None:
    refusal = Outcome(code="AE", error="PID-3 has no identifier", error_code="101", error_location="PID^1^3")
    hub = Hub(refusal)

    async def scenario() -> None:
        async with polling(tmp_path, hub) as source:
            drop(tmp_path, "bad.hl7", A01.read_bytes())
            assert await source.poll_once() == 1

    run(scenario())
    assert names(tmp_path / "error") == ["bad.hl7", "bad.hl7.error.txt"]
    reason = (tmp_path / "error/bad.hl7.error.txt").read_text(encoding="utf-8")
    assert "reason: PID-3 has no identifier" in reason
    assert "error code (HL7 table 0357): 101" in reason
    assert "location: PID^1^3" in reason
    assert f"message id: {hub.messages[0].id}" in reason
    assert not (tmp_path / "done").exists()


def test_files_stay_when_the_hub_cannot_take_them_and_keep_their_order(tmp_path: Path) -> None:
    hub = Hub(Outcome(code="AR", error="database down"), RuntimeError("bus crashed"), Outcome(code="AA"))

    async def scenario() -> list[int]:
        async with polling(tmp_path, hub) as source:
            drop(tmp_path, "1.hl7", A01.read_bytes(), OLD)
            drop(tmp_path, "2.hl7", A01.read_bytes(), OLD + 1)
            return [await source.poll_once() for _ in range(3)]

    assert run(scenario()) == [0, 0, 2]
    # 1.hl7 was offered three times (AR, crash, AA); 2.hl7 waited behind it.
    assert [m.source for m in hub.messages] == ["1.hl7", "1.hl7", "1.hl7", "2.hl7"]
    assert names(tmp_path / "done") == ["1.hl7", "2.hl7"]


def test_min_age_skips_files_still_being_written(tmp_path: Path) -> None:
    hub = Hub()

    async def scenario() -> list[int]:
        async with polling(tmp_path, hub, min_age=30) as source:
            fresh = drop(tmp_path, "fresh.hl7", A01.read_bytes(), time.time())
            first = await source.poll_once()
            os.utime(fresh, (OLD, OLD))
            return [first, await source.poll_once()]

    assert run(scenario()) == [0, 1]
    assert len(hub.messages) == 1


def test_name_clashes_in_done_get_a_timestamp_and_delete_after_removes(tmp_path: Path) -> None:
    inbox, other = tmp_path / "in", tmp_path / "other"
    inbox.mkdir()
    other.mkdir()
    (inbox / "done").mkdir()
    (inbox / "done/x.hl7").write_bytes(b"earlier")

    async def scenario() -> None:
        async with polling(inbox, Hub()) as source:
            drop(inbox, "x.hl7", A01.read_bytes())
            assert await source.poll_once() == 1
        async with polling(other, Hub(), delete_after=True) as source:
            drop(other, "y.hl7", A01.read_bytes())
            assert await source.poll_once() == 1

    run(scenario())
    done = names(inbox / "done")
    assert len(done) == 2 and "x.hl7" in done
    renamed = next(n for n in done if n != "x.hl7")
    assert renamed.startswith("x.") and renamed.endswith("Z.hl7")
    assert (inbox / "done/x.hl7").read_bytes() == b"earlier"
    assert (inbox / "done" / renamed).read_bytes() == A01.read_bytes()
    assert names(other) == []


def test_oversized_and_unreadable_files_go_to_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == "locked.hl7":
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    hub = Hub()

    async def scenario() -> None:
        async with polling(tmp_path, hub, max_file_bytes=100, error_dir="rejects") as source:
            drop(tmp_path, "big.bin", b"x" * 101)
            drop(tmp_path, "locked.hl7", b"MSH|^~\\&|small")
            assert await source.poll_once() == 2

    run(scenario())
    assert hub.messages == []
    assert names(tmp_path / "rejects") == [
        "big.bin",
        "big.bin.error.txt",
        "locked.hl7",
        "locked.hl7.error.txt",
    ]
    assert "over max_file_bytes (100)" in (tmp_path / "rejects/big.bin.error.txt").read_text()
    assert (
        "cannot read the file: Permission denied" in (tmp_path / "rejects/locked.hl7.error.txt").read_text()
    )


def test_the_poll_loop_runs_by_itself_and_stops(tmp_path: Path) -> None:
    hub = Hub()

    async def scenario() -> None:
        async with polling(tmp_path, hub, poll_interval=0.02, min_age=0):
            drop(tmp_path, "late.json", b'{"a": 1}', time.time())
            for _ in range(200):
                if names(tmp_path / "done"):
                    break
                await asyncio.sleep(0.01)

    run(scenario())
    assert names(tmp_path / "done") == ["late.json"]
    assert hub.messages[0].content_type == "application/json"


def test_source_lifecycle_and_options_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        missing = FileSource(name="s", url=(tmp_path / "nope").as_uri(), options={}, context=CTX)
        with pytest.raises(ConnectorError, match="does not exist"):
            await missing.start(Hub())
        source = FileSource(name="s", url=tmp_path.as_uri(), options={}, context=CTX)
        with pytest.raises(ConnectorError, match="not started"):
            await source.poll_once()
        await source.start(Hub())
        with pytest.raises(ConnectorError, match="already started"):
            await source.start(Hub())
        await source.stop()
        await source.stop()

    run(scenario())
    url = tmp_path.as_uri()
    with pytest.raises(ConnectorError, match="did you mean 'poll_interval'"):
        FileSource(name="s", url=url, options={"poll_intervall": 1}, context=CTX)
    with pytest.raises(ConnectorError, match="unknown charset 'klingon'"):
        FileSource(name="s", url=url, options={"charset": "klingon"}, context=CTX)
    with pytest.raises(ConnectorError, match="must differ from the polled folder"):
        FileSource(name="s", url=url, options={"error_dir": "."}, context=CTX)
    with pytest.raises(ConnectorError, match=r"options\.poll_interval"):
        FileSource(name="s", url=url, options={"poll_interval": 0}, context=CTX)


# --------------------------------------------------------------------------- destination


def gb_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "channel": "his-adt",
        "raw": GB_HL7,
        "content_type": "application/hl7-v2",
        "charset": "gb18030",
        "control_id": "GB-0001",
    }
    fields.update(changes)
    return Message(**fields)


def send(dest: FileDestination, message: Message) -> Any:
    return run(dest.send(message))


def test_destination_writes_each_message_atomically(tmp_path: Path) -> None:
    dest = FileDestination(
        name="out", url="file:outbox", options={}, context=ConnectorContext(home=str(tmp_path))
    )
    message = gb_message()
    response = send(dest, message)
    target = tmp_path / "outbox" / f"his-adt-{message.id}.hl7"
    assert (response.ok, response.status, response.body) == (True, "written", os.fsencode(target))
    assert target.read_bytes() == GB_HL7
    assert names(tmp_path / "outbox") == [target.name]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    run(dest.close())


def test_destination_never_overwrites_unless_told_to(tmp_path: Path) -> None:
    keep = FileDestination(
        name="out", url=tmp_path.as_uri(), options={"filename": "{control_id}.{ext}"}, context=CTX
    )
    send(keep, gb_message())
    with pytest.raises(DeliveryError, match="already exists") as caught:
        send(keep, gb_message(raw=b"MSH|second"))
    assert caught.value.retryable is False
    assert (tmp_path / "GB-0001.hl7").read_bytes() == GB_HL7
    replace = FileDestination(
        name="out",
        url=tmp_path.as_uri(),
        options={"filename": "{control_id}.{ext}", "overwrite": True},
        context=CTX,
    )
    send(replace, gb_message(raw=b"MSH|second"))
    assert (tmp_path / "GB-0001.hl7").read_bytes() == b"MSH|second"
    assert names(tmp_path) == ["GB-0001.hl7"]


def test_destination_filename_placeholders_are_sanitized(tmp_path: Path) -> None:
    template = "{date}/{message_type}-{control_id}-{timestamp}.{ext}"
    dest = FileDestination(name="out", url=tmp_path.as_uri(), options={"filename": template}, context=CTX)
    message = gb_message(
        control_id="../../etc/passwd", message_type="ADT^A01", content_type="application/json"
    )
    written = Path(os.fsdecode(send(dest, message).body))
    day = message.received_at.strftime("%Y%m%d")
    assert written.parent == tmp_path / day
    assert written.name.startswith("ADT_A01-_.._etc_passwd-" + day + "T")
    assert written.name.endswith("Z.json")
    kinds = {
        "application/xml": "xml",
        "application/fhir+json": "json",
        "application/dicom": "dcm",
        "x-application/hl7-v2+er7": "hl7",
        "application/pdf": "bin",
    }
    for content_type, ext in kinds.items():
        plain = FileDestination(
            name="out", url=tmp_path.as_uri(), options={"filename": "{id}.{ext}"}, context=CTX
        )
        message = gb_message(content_type=content_type, control_id=None)
        assert Path(os.fsdecode(send(plain, message).body)).name == f"{message.id}.{ext}"


def test_destination_folder_must_exist_without_mkdir_and_options_are_checked(tmp_path: Path) -> None:
    strict = FileDestination(
        name="out", url=(tmp_path / "absent").as_uri(), options={"mkdir": False}, context=CTX
    )
    with pytest.raises(DeliveryError, match="does not exist") as caught:
        send(strict, gb_message())
    assert caught.value.retryable is True
    url = tmp_path.as_uri()
    with pytest.raises(ConnectorError, match="unknown placeholder \\{patient\\}"):
        FileDestination(name="out", url=url, options={"filename": "{patient}.hl7"}, context=CTX)
    with pytest.raises(ConnectorError, match="must be a path inside"):
        FileDestination(name="out", url=url, options={"filename": "../{id}.hl7"}, context=CTX)
    with pytest.raises(ConnectorError, match=r"options\.filename"):
        FileDestination(name="out", url=url, options={"filename": "{id"}, context=CTX)
    with pytest.raises(ConnectorError, match="did you mean 'overwrite'"):
        FileDestination(name="out", url=url, options={"overwrite_": True}, context=CTX)


def test_spec_and_registry(tmp_path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(SPEC.options_schema)
    registry = Registry()
    assert registry.spec("file") is SPEC
    context = ConnectorContext(home=str(tmp_path))
    built: list[Callable[..., Any]] = [registry.build_source, registry.build_destination]
    source, dest = (build(name="f", url="file:in", options={}, context=context) for build in built)
    assert isinstance(source, FileSource) and source.folder == tmp_path / "in"
    assert source.done_dir == tmp_path / "in/done" and source.error_dir == tmp_path / "in/error"
    assert isinstance(dest, FileDestination) and dest.folder == tmp_path / "in"
