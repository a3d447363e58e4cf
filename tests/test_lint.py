"""The code passes ruff with the project's settings (pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    res = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
