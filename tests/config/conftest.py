"""Shared helpers: a registry of the test connectors and a writer for small home folders."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ihehub.channels.registry import Registry

FAKE = "tests.config.fake_connector"


@pytest.fixture
def registry() -> Registry:
    """The fake connectors under the schemes the default home uses, plus a source-only one."""
    return Registry({"fake": FAKE, "mllp": FAKE, "http": FAKE, "listen": "tests.config.fake_listener"})


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """``write("channels/adt.yaml", text)`` writes a dedented file under the home ``tmp_path``."""

    def _write(relative: str, text: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write
