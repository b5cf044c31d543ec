"""The committed stubs are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    (tmp_path / "mmserve" / "v1").mkdir(parents=True)
    subprocess.run([sys.executable, str(tmp_path / "scripts" / "gen_protos.py")], check=True)
    generated = sorted(p.name for p in (tmp_path / "mmserve" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "mmserve" / "v1").iterdir() if p.is_file())
    assert generated == committed
    for name in generated:
        assert (tmp_path / "mmserve" / "v1" / name).read_text() == (ROOT / "mmserve" / "v1" / name).read_text(), \
            f"mmserve/v1/{name} is stale: run `make protos`"
