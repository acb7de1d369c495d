"""A channel with `mapping:`: the mapping file transforms each message on its way to the destination;
a broken message is an AE naming the rule; `ihehub map test|check` work on the same files."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.cli import main
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import free_port, loopback_config
from tests.helpers.receiver import Receiver

DATA = Path(__file__).resolve().parents[1] / "mappings" / "data"


def test_mapping_channel_end_to_end(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    shutil.copytree(DATA, home / "mappings")
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    port = free_port()
    raw = (DATA / "adt-a01-gb18030.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    with Receiver() as rx:
        (home / "channels" / "his.yaml").write_text(
            f'source: {{url: "mllp://127.0.0.1:{port}"}}\nmapping: mappings/adt-to-pacs.yaml\n'
            f'destinations:\n  - {{name: pacs, url: "{rx.url}/pacs"}}\n', encoding="utf-8")
        cfg = loopback_config(load_home(home))
        registry = Registry()
        hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
        loop = LoopThread()
        loop.run(hub.start())
        try:
            (ack,) = asyncio.run(mllp_send("127.0.0.1", port, [raw], timeout=10))
            assert b"MSA|AA|" in ack
            wait_for(lambda: rx.requests, 10, "the mapped delivery")
            body = rx.requests[0]["body"]
            assert isinstance(body, bytes) and b"|PACS|" in body and b"UNICODE UTF-8" in body
            (row,) = hub.store.search(MessageQuery(channel="his"))
            full = hub.store.get_message(row["id"])
            assert full is not None and full["raw"] == raw and full["transformed"] == body
            # the message records which mapping, in which version, produced its output
            version = hub.mappings.get("mappings/adt-to-pacs.yaml").version
            headers = json.loads(full["headers"])
            assert headers["mapping"] == "mappings/adt-to-pacs.yaml" and headers["mapping_version"] == version
            assert headers["hl7.sending_application"] == "HIS"  # the source's headers are kept beside them
        finally:
            loop.run(hub.stop())
            loop.close()
    r = CliRunner().invoke(main, ["map", "test", str(home / "mappings/adt-to-pacs.yaml"),
                                  str(DATA / "adt-a01-gb18030.hl7")])
    assert r.exit_code == 0 and "PACS" in r.output and "# trace" in r.output
    assert CliRunner().invoke(main, ["map", "check", str(home / "mappings/adt-to-pacs.yaml")]).exit_code == 0
    assert "valid" in CliRunner().invoke(main, ["channels", "check"]).output
    (home / "mappings" / "broken.yaml").write_text("name: broken\ninput: {kind: hl7}\noutput: {kind: json}\n"
                                                   "rules:\n  - patient.id <- nosuch(PID-3.1)\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["map", "check", str(home / "mappings/broken.yaml")])
    assert r.exit_code == 1 and "broken.yaml:5" in r.output and "nosuch" in r.output
