"""The house stays as built: small rooms, no private names across modules, a Monitor that is a room."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "mfumon").rglob("*.py")) + sorted((ROOT / "integrations").glob("*.py"))
SOURCES = [p for p in SOURCES if "integrations" not in p.relative_to(ROOT).parts[1:]]  # not via a symlink


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    too_big = {name: n for name, n in sizes.items() if n > 400 and name != "mfumon/_peaks.py"}  # table data
    assert too_big == {}, "split these by concern (STYLE.md)"
    assert len(sizes) > 20  # the walk found the package


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{p.relative_to(ROOT)}: {node.module}.{alias.name}"
        for p in SOURCES
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mfumon")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_monitor_class_is_a_room_not_a_house() -> None:
    tree = ast.parse((ROOT / "mfumon" / "monitoring.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Monitor"]
    assert cls.end_lineno is not None
    assert cls.end_lineno - cls.lineno + 1 < 250  # its parts: FlopModel, Reducer, Windows
