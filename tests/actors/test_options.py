"""Actor options are JSON-Schema checked with errors naming the key; a PIX/PDQ channel needs the hub's EMPI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ihehub.actors import ActorContext, build_actor
from ihehub.actors.hl7v2 import OptionsError
from tests.actors.support import running_hub


@pytest.mark.parametrize(("options", "message"), [
    ({"domains": [{"namespace": "A", "type": "enterprise"}]}, r"domains/0/type: 'enterprise' is not one of"),
    ({"domains": [{"namespace": "A^B"}]}, r"domains/0/namespace: 'A\^B' does not match"),
    ({"facility_domains": {"HA": "NOPE"}}, r"facility_domains/HA: domain 'NOPE' is not in domains"),
    ({"domain": []}, r"unknown option 'domain' \(did you mean 'domains'\?\)"),
    ({"max_cursors": 0}, r"max_cursors: 0 is less than the minimum of 1"),
])
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    for actor in ("pix-manager", "pdq-supplier"):
        with pytest.raises(OptionsError, match=f"{actor} options: {message}"):
            build_actor(actor, channel="c", options=options, context=None)  # type: ignore[arg-type]


def test_bad_empi_settings_are_named() -> None:
    with pytest.raises(Exception, match="unknown EMPI setting"):
        build_actor("pix-manager", channel="c", options={"empi": {"profil": "tenders"}}, context=None)  # type: ignore[arg-type]


def test_actor_without_the_empi_service_does_not_start() -> None:
    actor = build_actor("pdq-supplier", channel="c", options={},
                        context=ActorContext(node_id="n", store=None, extras={}))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"needs the hub's EMPI service"):
        asyncio.run(actor.start())


def test_channel_with_bad_options_stays_down(tmp_path: Path) -> None:
    with running_hub(tmp_path, options={"domains": [{"namespace": "A", "universal_id": ""}]}) as hub:
        assert hub.hub.channel_status("pix") == "error" and "universal_id" in hub.hub.errors["pix"]
        assert hub.hub.channel_status("pdq") == "error"
