"""`ihehub messages resend` (no running hub) knows the queues actors declare: a PIX channel's ITI-10
consumers get their A31 again from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ihehub.bus.message import Message
from ihehub.cli import main
from ihehub.cli.common import open_store
from ihehub.config import load_channels, load_home
from ihehub.hub import actor_declared_queues
from tests.actors.test_iti10 import OPTIONS


def test_cli_resend_reaches_actor_declared_queues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    opts = json.dumps({**OPTIONS, "consumers": [{"name": "ris", "url": "mllp://127.0.0.1:9"}]})
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:9"}}\nactor: {{name: pix-manager, options: {opts}}}\n', encoding="utf-8")
    cfg = load_home(home)
    chans = load_channels(home, hub=cfg)
    with open_store(cfg) as store:
        assert actor_declared_queues(chans, cfg, store) == {"pix-iti10": ["ris"]}
        a31 = Message(channel="pix-iti10", raw=b"MSH|^~\\&|HUB|H|RIS|R|2026||ADT^A31^ADT_A05|N1|P|2.5\r",
                      control_id="N1", message_type="ADT^A31")
        store.append_sync(a31, ["ris"])
    r = CliRunner().invoke(main, ["messages", "resend", a31.id, "--to", "ris"])
    assert r.exit_code == 0 and "1 deliveries queued" not in r.output and "1 delivery queued" in r.output, r.output
    r = CliRunner().invoke(main, ["messages", "resend", "-c", "pix-iti10"])
    assert r.exit_code == 0 and "1 delivery queued" in r.output, r.output
    r = CliRunner().invoke(main, ["messages", "resend", a31.id, "--to", "rsi"])
    assert r.exit_code == 1 and "did you mean 'ris'" in r.output
