"""Layers import downward only (docs/architecture.md): a lower layer never imports a higher one.

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ihehub"

# package -> the ihehub packages it must not import
FORBIDDEN = {
    "hl7": {"bus", "channels", "engine", "api", "cli", "config", "actors"},
    "bus": {"channels", "engine", "api", "cli", "actors"},
    "channels": {"engine", "api", "cli", "actors", "config"},
    "engine": {"api", "cli", "hub", "actors"},
    "actors": {"api", "cli", "hub"},
    # domain services are framework-free: no transports, no actors (STYLE.md: xds/, empi/, atna/ never import channels/)
    "empi": {"channels", "engine", "actors", "api", "cli", "hub", "config", "hl7"},
    "atna": {"channels", "engine", "actors", "api", "cli", "hub"},
    "mappings": {"bus", "channels", "engine", "actors", "api", "cli", "hub"},
    "dicom": {"channels", "engine", "actors", "api", "cli", "hub"},
    "xds": {"channels", "engine", "actors", "api", "cli", "hub", "config"},
    "soap": {"bus", "channels", "engine", "actors", "api", "cli", "hub", "config", "empi", "xds", "atna", "dicom"},
    "api": {"cli", "hub"},
    "config": {"api", "cli"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                type_only.add(id(sub))
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ihehub."):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("ihehub.")]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_downward_only(package: str) -> None:
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[1]  # ihehub.hub is the composition root: only cli may import it
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module}")
    assert not bad, "upward imports:\n" + "\n".join(bad)
