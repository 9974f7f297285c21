"""pyproject pins and requirements/constraints.txt agree (a mismatch makes `make setup` unsolvable)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pins_match_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    constraints = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m:
            constraints[m.group(1).lower().replace("_", "-")] = m.group(2)
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    bad = []
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$", r.split(";")[0].strip())
        assert m, f"unpinned requirement {r!r}"
        name, version = m.group(1).lower().replace("_", "-"), m.group(3)
        if constraints.get(name) != version:
            bad.append((name, version, constraints.get(name)))
    assert not bad, f"(name, pyproject, constraints) disagree: {bad}"
