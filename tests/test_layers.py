"""The house rule: each folder imports only from the layers below it.

``core`` (vocabulary) ← ``operators``, ``sinks`` ← ``pipeline`` ← ``api`` ← ``server.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may import from the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "operators": {"core"},
    "sinks": {"core", "operators"},
    "pipeline": {"core", "operators", "sinks"},
    "api": {"core", "operators", "sinks", "pipeline"},
}
PROJECT = {*ALLOWED, "server"}


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_package_imports_upward(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imports - ALLOWED[package] - {package})
        for path in sorted((ROOT / package).rglob("*.py"))
        if (imports := project_imports(path)) - ALLOWED[package] - {package}
    }
    assert offenders == {}


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("from pipeline.orchestrator import Turn\nimport server\nimport json\n")
    assert project_imports(sample) == {"pipeline", "server"}
