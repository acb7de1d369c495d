"""A real channel in an in-process hub against a real OpenSSH server: a remote folder in, another out."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ihehub.bus.store import MessageQuery
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.channels.sql_kit import GB_HL7
from tests.channels.sshd_kit import sshd
from tests.conftest import loopback_config


def test_remote_folder_to_remote_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "ihehub.yaml").write_text(
        "database: sqlite:///db/ihehub.sqlite\n"
        "delivery: {max_attempts: 5, initial_backoff: 0.05, max_backoff: 0.2, jitter: 0, lease_seconds: 5}\n",
        encoding="utf-8")
    with sshd(tmp_path) as server:
        inbox, outbox = server.root / "in", server.root / "out"
        inbox.mkdir()
        login = f"{{key_file: '{server.key_file}', host_key: '{server.host_key}'"
        (home / "channels" / "ris.yaml").write_text(f"""
source:
  url: "{server.url(inbox)}"
  options: {login}, pattern: "*.hl7", charset: gb18030, poll_interval: 0.1, min_age: 0.2}}
destinations:
  - name: archive
    url: "{server.url(outbox)}"
    options: {login}, filename: "{{control_id}}.{{ext}}"}}
""", encoding="utf-8")
        cfg = loopback_config(load_home(home))
        registry = Registry()
        hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
        loop = LoopThread()
        loop.run(hub.start())
        try:
            (inbox / "adt.hl7").write_bytes(GB_HL7)
            old = time.time() - 60
            os.utime(inbox / "adt.hl7", (old, old))
            wait_for(lambda: (outbox / "HIS-0001.hl7").exists(), 15, "the archived file")
            assert (outbox / "HIS-0001.hl7").read_bytes() == GB_HL7
            wait_for(lambda: (inbox / "done" / "adt.hl7").exists(), 15, "the source file moved to done/")
            (row,) = hub.store.search(MessageQuery(channel="ris"))
            assert row["control_id"] == "HIS-0001"
            assert hub.errors.get("ris") is None
        finally:
            loop.run(hub.stop())
            loop.close()
