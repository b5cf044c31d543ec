"""The shared package stands below the services and the app layer: nothing under mmserve/ imports them."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ABOVE = ("services", "stack")  # the packages that stand on mmserve/, never the other way round


def imported_modules(path: pathlib.Path) -> list[str]:
    """Every module a file imports, at top level or inside a function (relative imports stay in mmserve)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_the_shared_package_has_python_files():
    assert len(list((ROOT / "mmserve").rglob("*.py"))) > 20


@pytest.mark.parametrize("path", sorted((ROOT / "mmserve").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_mmserve_imports_no_service_and_no_app_layer(path):
    upward = [name for name in imported_modules(path) if name.split(".")[0] in ABOVE]
    assert not upward, f"{path.relative_to(ROOT)} imports {upward}: mmserve/ must not depend on {ABOVE}"
