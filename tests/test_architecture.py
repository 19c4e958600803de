"""The layers hold: the pure core imports no I/O, and packages import only downwards.

Two checks, like kopf's import contracts:
- every pure module, imported alone in a fresh interpreter, loads none of libvirt,
  virt-firmware, sqlite3 or varsd's adapters (directly or through anything it imports);
- every `import` in varsd (module level or inside a function) follows the table of
  allowed directions below, and the three libraries are imported by their one adapter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import varsd

ROOT = Path(varsd.__file__).parent

PURE_MODULES = (
    "varsd.errors",
    "varsd.messages",
    "varsd.model.archive",
    "varsd.model.domain",
    "varsd.model.firmware",
    "varsd.model.journal",
    "varsd.model.secureboot",
    "varsd.model.varstore",
    "varsd.domain.classify",
    "varsd.domain.xml",
    "varsd.firmware.descriptors",
    "varsd.firmware.fit",
    "varsd.firmware.secureboot",
    "varsd.firmware.selection",
    "varsd.planning.migration",
    "varsd.planning.repair",
    "varsd.planning.upgrade",
    "varsd.retry",
    "varsd.clock",
)
FORBIDDEN = ("libvirt", "virt.firmware", "sqlite3", "varsd.adapters", "varsd.engine", "varsd.config")

# Which varsd packages each package may import ("varsd.errors" and "varsd.messages" count as
# packages of their own). A package may always import itself.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "messages": {"errors"},
    "retry": {"errors"},
    "clock": set(),
    "model": {"clock"},
    "domain": {"model", "errors", "clock"},
    "firmware": {"model", "errors", "domain", "adapters", "config", "messages", "__init__"},
    "planning": {"model", "errors", "domain", "firmware", "messages", "clock"},
    "adapters": {"model", "errors", "messages", "retry", "clock"},
    "config": {"errors", "retry", "model"},
    "engine": {"clock", "model", "errors", "domain", "firmware", "planning", "adapters", "config", "messages", "retry",
               "__init__"},
    "daemon": {"clock", "model", "errors", "domain", "firmware", "planning", "adapters", "config", "engine", "messages",
               "retry", "__init__"},
    "cli": {"clock", "model", "errors", "domain", "firmware", "planning", "adapters", "config", "engine", "messages",
            "retry", "__init__"},
}
# The pure modules of the mixed `firmware` package may not reach its I/O modules.
FIRMWARE_IO = {"varsd.firmware.catalog", "varsd.firmware.archive"}
# Third-party libraries with side effects, each behind its one adapter.
ONLY_IN = {
    "libvirt": {"varsd.adapters.libvirt_api", "varsd.adapters.libvirt_events"},
    "virt": {"varsd.adapters.virtfw"},
    "sqlite3": {"varsd.adapters.journal"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "varsd"]
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and not parts[1].startswith("__") else "__init__"


MODULES = sorted((_module_name(p), p) for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_loads_no_io(module: str) -> None:
    code = (
        "import sys\n"
        f"import {module}\n"
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_every_pure_module_exists() -> None:
    names = {m for m, _ in MODULES}
    assert set(PURE_MODULES) <= names, set(PURE_MODULES) - names


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_import_directions(module: str, path: Path) -> None:
    own = _package(module)
    allowed = ALLOWED.get(own)
    assert allowed is not None, f"{module}: package {own!r} is not in the contract table"
    wrong = []
    for imported in _imports(path):
        top = imported.split(".")[0]
        if top in ONLY_IN and module not in ONLY_IN[top]:
            wrong.append(f"{imported} (only {', '.join(sorted(ONLY_IN[top]))} may import it)")
        if top != "varsd" or imported == "varsd":
            continue
        target = _package(imported)
        if target not in allowed | {own}:
            wrong.append(f"{imported} ({own} may not import {target})")
        if module in PURE_MODULES and imported in FIRMWARE_IO:
            wrong.append(f"{imported} (a pure module may not import the firmware package's I/O)")
    assert not wrong, f"{module} imports: " + "; ".join(wrong)


TESTS = Path(__file__).parent


@pytest.mark.parametrize("directory", sorted(p.parent.name for p in TESTS.glob("*/test_*.py")))
def test_every_test_directory_states_its_tier(directory: str) -> None:
    conftest = TESTS / directory / "conftest.py"
    assert conftest.exists(), f"tests/{directory} has no conftest.py stating its tier"
    doc = ast.get_docstring(ast.parse(conftest.read_text())) or ""
    assert "tier" in doc.lower(), f"tests/{directory}/conftest.py does not state its tier"


def test_product_code_has_no_assert() -> None:
    """`python -O` drops asserts: a check product code relies on must be an explicit one
    (issue 9, point 8); type narrowing is an `if ... is None` with what to do then."""
    found = [f"{path.relative_to(ROOT.parent)}:{node.lineno}"
             for path in sorted(ROOT.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Assert)]
    assert found == []
