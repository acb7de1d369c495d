"""The atna package is a transport-free library: a curated public API, no web/CLI framework, no upward imports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import ihehub.atna as atna

PKG = Path(atna.__file__).parent
FORBIDDEN = ("ihehub.channels", "ihehub.engine", "ihehub.api", "ihehub.cli", "ihehub.config", "ihehub.hub",
             "ihehub.actors", "fastapi", "starlette", "click", "uvicorn")


def test_public_api_is_complete_and_importable() -> None:
    for name in atna.__all__:
        assert getattr(atna, name) is not None, name
    for path in sorted(PKG.glob("*.py")):
        if path.stem in ("__init__", "tables"):
            continue
        module = importlib.import_module(f"ihehub.atna.{path.stem}")
        missing = [n for n in getattr(module, "__all__", []) if n not in atna.__all__
                   and n not in ("GENESIS", "chain_hash", "summarize", "index_ids", "lookup", "BOM", "IHE_MSGID",
                                 "DCM", "IHE_TX", "RFC3881", "ihe_transaction", "format_datetime", "parse_datetime")]
        assert not missing, f"{path.name} exports {missing} but ihehub.atna does not"


def test_no_framework_or_upward_imports() -> None:
    bad = []
    for path in sorted(PKG.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.startswith(FORBIDDEN)]
    assert not bad, bad


def test_modules_stay_small() -> None:
    for path in PKG.glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 800, path.name
