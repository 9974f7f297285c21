"""The ask/tell example of docs/bo.md runs as written (with the tests' cheaper optimiser setting)."""

import re
from pathlib import Path

import numpy as np

from .common import FAST

DOC = Path(__file__).resolve().parents[2] / "docs" / "bo.md"


def test_ask_tell_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    ctor = "SimplexBO(3, maximize=True, seed=0)"
    assert ctor in code
    code = code.replace(ctor, "SimplexBO(3, maximize=True, seed=0, config=FAST)")
    monkeypatch.chdir(tmp_path)  # it saves bo.json
    ns: dict = {"FAST": FAST}
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    opt, ratio, value = ns["opt"], ns["ratio"], ns["value"]
    assert opt.n_observations == 15 and (tmp_path / "bo.json").exists()
    assert ratio.shape == (3,) and abs(ratio.sum() - 1) < 1e-9 and np.isfinite(value)
    assert value > -0.05  # 12 evaluations already come close to the target
