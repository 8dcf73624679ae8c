"""Property test: every accountant's reported ε and upper bound never fall below an independent valid
lower bound on the true ε (and its lower bound never exceeds an independent upper bound), over
seeded random configs — q from 1e-6 to 1, σ from 0.3 to 10, up to 10^6 steps, δ from 1e-12 to 1e-3,
add/remove and replace, Poisson and fixed batches. The configs, the oracles (the exact composed
Gaussian at q = 1, dp_accounting's optimistic/pessimistic PLD otherwise) and the check live in
``benchmarks/accounting_soundness.py``, which runs thousands of them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "accounting_soundness.py"
_spec = importlib.util.spec_from_file_location("accounting_soundness", _PATH)
assert _spec is not None and _spec.loader is not None
sound = importlib.util.module_from_spec(_spec)
sys.modules["accounting_soundness"] = sound
_spec.loader.exec_module(sound)


def _run(cases: list, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    counts = {n: {"ok": 0, "unsound": 0, "refused": 0, "skipped": 0} for n in names}
    bad = []
    for case in cases:
        for name, out in sound.check(case, names).items():
            counts[name][out.status] += 1
            if out.status == "unsound":
                bad.append(f"{name}: {case} -- {out.detail}")
    assert not bad, "\n".join(bad)
    return counts


def test_oracle_is_exact_at_q1() -> None:
    from privaudit.accounting.analytic import composed_gaussian_epsilon

    for mu, delta in [(0.5, 1e-5), (3.0, 1e-12), (20.0, 1e-3)]:
        assert sound.exact_gaussian_epsilon(mu, delta) == pytest.approx(
            composed_gaussian_epsilon(1.0 / mu, 1, delta), rel=1e-9)


def test_random_configs_rdp_and_pld() -> None:
    counts = _run(sound.random_cases(160, seed=11, max_mu=60.0), ("rdp", "pld"))
    assert counts["rdp"]["ok"] + counts["rdp"]["skipped"] == 160  # RDP always answers
    assert counts["pld"]["ok"] >= 140  # and PLD nearly always (small δ included)


def test_random_configs_prv() -> None:
    counts = _run(sound.random_cases(60, seed=12, max_steps=20_000, max_mu=30.0), ("prv",))
    assert counts["prv"]["ok"] >= 25


def test_check_can_fail() -> None:
    """The check flags an accountant that under-states ε (5 % below the true ε)."""
    from privaudit.accounting.base import EpsilonResult, get_accountant, register_accountant
    from privaudit.accounting.rdp import RDPAccountant

    @register_accountant("_understating")
    class Under(RDPAccountant):
        def _epsilon(self, segments, delta):  # type: ignore[no-untyped-def]
            e = get_accountant("pld")._epsilon(segments, delta).epsilon_lower
            return EpsilonResult(0.95 * e, None, None, self.name, delta)

    try:
        case = sound.Case(1.0, 1.0, 10, 1e-6, "add_remove")
        assert sound.check(case, ("_understating",))["_understating"].status == "unsound"
        case = sound.Case(1.0, 0.1, 20, 1e-6, "replace")
        assert sound.check(case, ("_understating",))["_understating"].status == "unsound"
    finally:
        from privaudit.accounting import base

        base._REGISTRY.pop("_understating", None)


@pytest.mark.slow
def test_random_configs_all_accountants_many() -> None:
    _run(sound.random_cases(300, seed=13, max_mu=200.0), ("rdp", "pld", "prv"))
