"""The examples in docs/influence.md and the package docstring run and give sensible numbers."""

import pathlib
import re

import numpy as np

import duet_jax.influence as influence

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_docs_toy_example_runs_and_fisher_tracks_koh_liang():
    text = (ROOT / "docs" / "influence.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    ns = {}
    exec(compile(code, "docs/influence.md", "exec"), ns)
    assert ns["scores"].shape == (160,) and bool(ns["valid"].all())
    assert np.corrcoef(ns["scores"], ns["kl"])[0, 1] > 0.9


def test_package_docstring_example_runs():
    code = influence.__doc__.split("::")[1].split("DUET's")[0]
    code = "\n".join(line[4:] for line in code.splitlines())
    ns = {}
    exec(compile(code, "duet_jax/influence/__init__.py", "exec"), ns)
    assert ns["scores"].shape == (64, 1) and np.all(np.isfinite(ns["scores"]))
