"""Imports flow one way: apps -> trainers -> reward_models -> visalign (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "visalign": {"trainers", "reward_models", "apps"},
    "reward_models": {"trainers", "apps"},
    "trainers": {"apps"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = [
        f"{f.relative_to(ROOT)} imports {sorted(imported_packages(f) & FORBIDDEN[package])}"
        for f in files
        if imported_packages(f) & FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom trainers.base import Loop\n")
    assert "trainers" in imported_packages(bad)
