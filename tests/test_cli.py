"""The command line: help lists the commands; run says it is not built yet; packaging is complete."""

import subprocess
import sys
import tomllib
from pathlib import Path

from duet_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands():
    text = build_parser().format_help()
    for cmd in ("run", "domains", "bench"):
        assert cmd in text


def test_module_entry_points():
    r = subprocess.run([sys.executable, "-m", "duet_jax", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "domains" in r.stdout


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "duet_jax").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
    assert "duet_kernels" in listed
