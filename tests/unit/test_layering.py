"""ARCHITECTURE.md import rules, checked by walking every module's imports (ast, no import)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "softpbx"
STDLIB = set(sys.stdlib_module_names)

# package -> (allowed softpbx subpackages, allowed third-party, forbidden stdlib)
IO_STDLIB = {"asyncio", "socket", "sqlite3", "time", "selectors", "threading", "subprocess"}
RULES: dict[str, tuple[set[str], set[str], set[str]]] = {
    "config": ({"config"}, set(), IO_STDLIB),
    "sip": ({"sip", "config"}, set(), IO_STDLIB),
    "media": ({"media", "config"}, {"numpy"}, IO_STDLIB),
    "core": ({"core", "sip", "media", "config"}, {"numpy"}, IO_STDLIB),
    "store": ({"store", "core", "sip", "config"}, set(), set()),
    "http": ({"http", "core", "sip", "media", "config", "crm"}, {"aiohttp"}, set()),
}
EXCEPTIONS = {("media", "mp3.py"): {"soundfile"}}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(absolute-ish module name, level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(PKG).parts[:-1]
                up = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(("softpbx", *up, *(node.module.split(".") if node.module else [])))
                out.append((mod, node.level))
            else:
                out.append((node.module or "", 0))
    return out


MODULES = sorted(p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] in RULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_respects_layering(path: Path) -> None:
    layer = path.relative_to(PKG).parts[0]
    allowed_pkgs, allowed_3rd, forbidden = RULES[layer]
    extra = EXCEPTIONS.get((layer, path.name), set())
    for mod, _ in imports_of(path):
        top = mod.split(".")[0]
        if top == "softpbx":
            sub = mod.split(".")[1] if mod.count(".") else ""
            assert sub in allowed_pkgs, f"{path.name}: {layer}/ may not import softpbx.{sub}"
        elif top in STDLIB or top == "__future__":
            assert top not in forbidden, f"{path.name}: {layer}/ is sans-IO and imports {top}"
        else:
            assert top in allowed_3rd | extra, f"{path.name}: {layer}/ may not import {top}"


def test_rules_cover_real_modules() -> None:
    layers = {p.relative_to(PKG).parts[0] for p in MODULES}
    assert {"config", "sip", "core"} <= layers
