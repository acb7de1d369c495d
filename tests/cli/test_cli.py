"""The ihehub command line, in process (click's runner) against a temporary home."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from ihehub.bus.message import Message
from ihehub.channels.mllp_wire import MLLPServer
from ihehub.cli import main
from ihehub.cli.common import open_store, parse_time
from ihehub.config import load_home
from tests.api.api_support import LoopThread

ADT = b"MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127||ADT^A01|C%d|P|2.5\rPID|1||MRN%d^^^H1||Wang^Wu\r"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("IHEHUB_HOME", str(h))
    return h


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*prefix, name))


def test_help_on_every_command_and_version() -> None:
    assert "integration engine" in run("--help").output
    assert run("--version").output.strip() == "ihehub, version 0.1.0"
    commands = list(all_commands(main))
    assert {("serve",), ("worker",), ("channels", "check"), ("messages", "resend"), ("token", "create"),
            ("db", "upgrade"), ("tls", "client"), ("send",)} <= set(commands)
    for cmd in commands:
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, cmd


def test_init_then_check_ok(home: Path) -> None:
    r = run("init")
    assert r.exit_code == 0 and "ihehub.yaml" in r.output and "ca.pem" in r.output
    assert run("init").output.strip().endswith("nothing written")
    r = run("channels", "check")
    assert r.exit_code == 0, r.output
    assert "channel file(s) are valid" in r.output


def test_check_reports_file_line_and_did_you_mean(home: Path) -> None:
    run("init")
    (home / "channels" / "bad.yaml").write_text(
        "name: bad\nsource:\n  url: mllp://0.0.0.0:2599\ndestinatons: []\n", encoding="utf-8")
    (home / "channels" / "worse.yaml").write_text(
        "source:\n  url: mlp://0.0.0.0:2598\nfilter: 'MSH-9.1 = \"ADT\"'\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["channels", "check"])
    assert r.exit_code == 2
    out = r.output
    assert "channels/bad.yaml:4:1" in out and "did you mean 'destinations'" in out
    assert "channels/worse.yaml:2" in out and "did you mean 'mllp'" in out
    assert "use == to compare" in out


def test_serve_refuses_invalid_yaml_with_file_line(home: Path) -> None:
    run("init")
    (home / "ihehub.yaml").write_text("http:\n  prot: 8080\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["serve", "--no-init"])
    assert r.exit_code == 2
    assert "ihehub.yaml:2:3" in r.output and "did you mean 'port'" in r.output


def test_worker_needs_a_broker(home: Path) -> None:
    run("init")
    r = CliRunner().invoke(main, ["worker"])
    assert r.exit_code == 2 and "needs a broker" in r.output


def test_tokens_create_list_revoke(home: Path) -> None:
    run("init")
    r = run("token", "create", "--role", "operator", "--name", "ris-team")
    token = r.output.strip().splitlines()[0]
    assert token.startswith("ihh_")
    listing = run("token", "list").output
    assert "operator" in listing and "ris-team" in listing and token not in listing
    token_id = listing.split()[0]
    assert run("token", "revoke", token_id).exit_code == 0
    assert "REVOKED" in run("token", "list").output
    bad = CliRunner().invoke(main, ["token", "create", "--role", "root"])
    assert bad.exit_code == 2 and "admin" in bad.output


def test_db_upgrade_and_current(home: Path) -> None:
    run("init")
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine

    engine = make_engine("sqlite://")
    heads = schema.head_revision(engine)
    engine.dispose()
    assert heads is not None and "0001" not in heads.split(",")  # every domain branches from the bus's 0001
    r = run("db", "upgrade")
    assert r.exit_code == 0 and f"empty -> {heads}" in r.output
    assert run("db", "upgrade").output.strip().endswith(f"{heads} -> {heads}")  # idempotent
    assert f"current: {heads}  head: {heads}" in run("db", "current").output


def test_tls_client_certificate(home: Path) -> None:
    run("init")
    r = run("tls", "client", "pacs-1")
    assert r.exit_code == 0
    assert (home / "tls" / "clients" / "pacs-1.pem").exists()


def test_messages_list_show_resend(home: Path) -> None:
    run("init")
    (home / "channels" / "adt.yaml").write_text(
        "source: {url: 'mllp://127.0.0.1:2599'}\ndestinations:\n  - {name: ris, url: 'http://127.0.0.1:9/x'}\n",
        encoding="utf-8")
    cfg = load_home(home)
    with open_store(cfg) as store:
        ids = [store.append_sync(Message(channel="adt", raw=ADT % (i, i), control_id=f"C{i}",
                                         message_type="ADT^A01", charset="ascii"), ["ris"]).message_id
               for i in range(3)]
    out = run("messages", "list", "-c", "adt").output
    assert all(i in out for i in ids) and "ris=queued" in out
    assert ids[1] in run("messages", "list", "-q", "MRN1").output
    assert ids[0] not in run("messages", "list", "-q", "MRN1").output
    shown = run("messages", "show", ids[0]).output
    assert "control id:   C0" in shown and "PID|1||MRN0" in shown and "-> ris: queued" in shown
    assert run("messages", "show", ids[0], "--raw").output.encode() == ADT % (0, 0)
    assert CliRunner().invoke(main, ["messages", "show", "nope"]).exit_code == 1
    r = run("messages", "resend", "-c", "adt", "--dry-run")
    assert "3 message(s) match" in r.output
    assert "3 message(s) matched, 3 deliveries queued" in run("messages", "resend", "-c", "adt").output
    r = CliRunner().invoke(main, ["messages", "resend"])
    assert r.exit_code == 1 and "give message ids" in r.output
    r = CliRunner().invoke(main, ["messages", "resend", ids[0], "--to", "rsi"])
    assert r.exit_code == 1 and "did you mean 'ris'" in r.output
    assert CliRunner().invoke(main, ["messages", "list", "--since", "yesterday"]).exit_code == 2


def test_channels_list_and_stop_start(home: Path) -> None:
    run("init")
    out = run("channels", "list").output
    assert "hl7-inbound" in out and "enabled" in out
    r = run("channels", "stop", "hl7-inbound")
    assert "stopped" in r.output
    assert "stopped" in run("channels", "list").output
    r = CliRunner().invoke(main, ["channels", "stop", "hl7-inbund"])
    assert r.exit_code == 1 and "did you mean 'hl7-inbound'" in r.output
    run("channels", "start", "hl7-inbound")
    assert '"enabled": true' in run("channels", "list", "--json").output


def test_send_prints_acks_and_exit_status(tmp_path: Path) -> None:
    async def handler(payload: bytes, peer: object) -> bytes:
        cid = payload.split(b"\r")[0].split(b"|")[9]
        code = b"AE" if cid == b"C2" else b"AA"
        return b"MSH|^~\\&|HUB|H|HIS|H1|20261127||ACK^A01^ACK|X|P|2.5\rMSA|" + code + b"|" + cid + b"\r"

    loop = LoopThread()
    server = MLLPServer(handler)
    loop.run(server.start())
    try:
        url = f"mllp://127.0.0.1:{server.port}"
        f = tmp_path / "two.hl7"
        f.write_bytes((ADT % (1, 1)).replace(b"\r", b"\r\n") + ADT % (3, 3))  # CRLF file with two messages
        r = run("send", url, str(f))
        assert r.exit_code == 0 and r.output.count("MSA|AA|") == 2
        r = CliRunner().invoke(main, ["send", url, "-t", (ADT % (2, 2)).decode()])
        assert r.exit_code == 1 and "MSA|AE|C2" in r.output
        r = CliRunner().invoke(main, ["send", "http://x", str(f)])
        assert r.exit_code == 1 and "expected mllp://" in r.output
    finally:
        loop.run(server.stop())
        loop.close()


def test_parse_time_formats() -> None:
    assert parse_time("1764234000") == 1764234000.0
    assert parse_time("2026-11-27T10:00:00Z") == 1795773600.0
    assert abs(parse_time("2h") - (time.time() - 7200)) < 5  # type: ignore[operator]
    with pytest.raises(click.BadParameter):
        parse_time("last tuesday")
