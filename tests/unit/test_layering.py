"""The layers: nothing under mmserve/ imports the services or the app layer, and the router loads no torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

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


def test_the_router_never_imports_torch():
    """The router moves handles, never tensors: its entry point loads neither torch nor the tensor half of the
    transport (2 s and ~280 MB of start-up when it did)."""
    code = ("import sys, services.router.__main__; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
