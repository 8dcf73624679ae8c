"""Soundness sweep: every accountant's reported ε and upper bound against an independent valid LOWER
bound on the true ε (and its lower bound against an independent upper bound), over random configs.

    python benchmarks/accounting_soundness.py [--cases 2000] [--seed 0] [--accountants rdp,pld,prv]

Configs (seeded): q log-uniform in [1e-6, 1] (a quarter at q = 1 exactly), σ log-uniform in
[0.3, 10], steps log-uniform in [1, 10^6], δ log-uniform in [1e-12, 1e-3], both neighbouring
relations, Poisson or fixed batches (a fifth of the cases: batch B of N, no amplification).

Independent oracles (none shares code with the accountants):

* q = 1 (and fixed batches, which are accounted as ⌈k·B/N⌉ full-batch releases at sensitivity 2C):
  the exact composed Gaussian, δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ) with μ = √k/σ, solved for ε
  by bisection in log space here (exact: both a lower and an upper bound);
* q < 1: dp_accounting 0.6's PLD (add/remove: ADD_OR_REMOVE_ONE; replace: REPLACE_ONE with its
  sensitivity 1 = our C, i.e. σ_dp = 2σ_ours) — its *optimistic* estimate (privacy buckets, a
  garbling of the true pair) as the lower bound and its pessimistic one as the upper bound, on a
  grid of 0.02·ε_RDP/k where the FFT length allows (the buckets round each release's loss down by up
  to one interval, so the lower bound weakens for long runs). Its FFT has an absolute rounding floor, so for δ < 1e-9 the oracle is
  evaluated at δ' = 1e-9 (a lower bound there is a lower bound at δ < δ', since ε(δ) decreases;
  the upper-bound check is skipped there).

A case counts as ``unsound`` when an accountant's reported ε or ``epsilon_upper`` is below the
oracle's lower bound by more than 1e-9 relative (+1e-9), or its ``epsilon_lower`` above the oracle's
upper bound; ``refused`` when it raises a ValueError (e.g. PRV's mesh, PLD's numeric range), which is
fail-closed; ``skipped`` when the oracle cannot answer (RDP ε > 150: beyond dp_accounting's range).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import special  # noqa: E402

from privaudit.accounting.base import get_accountant, segments_from_events  # noqa: E402
from privaudit.ledger.events import GaussianEvent  # noqa: E402

warnings.simplefilter("ignore")
logging.getLogger().setLevel(logging.ERROR)

ACCOUNTANTS = ("rdp", "pld", "prv")


@dataclass(frozen=True)
class Case:
    sigma: float  # noise multiplier (std / C)
    q: float  # Poisson rate (1.0 for fixed batches)
    steps: int
    delta: float
    neighbouring: str
    batch: tuple[int, int] | None = None  # (B, N) for fixed batches

    def event(self) -> GaussianEvent:
        if self.batch is not None:
            b, n = self.batch
            return GaussianEvent(noise_multiplier=self.sigma, sampling="fixed_batch", batch_size=b,
                                 dataset_size=n, count=self.steps)
        return GaussianEvent(noise_multiplier=self.sigma, sample_rate=self.q, count=self.steps)


def random_cases(n: int, seed: int, max_steps: int = 10**6, max_mu: float = math.inf) -> list[Case]:
    """``n`` seeded configs (see the module docstring). ``max_mu``: redraw configs whose charged
    mechanism without subsampling would have μ = √k/σ above it (ε in the thousands: slow for the
    numerical accountants and not a regime anyone reports)."""
    rng = np.random.default_rng(seed)
    out: list[Case] = []
    while len(out) < n:
        sigma = float(10 ** rng.uniform(math.log10(0.3), 1.0))
        steps = int(round(10 ** rng.uniform(0.0, math.log10(max_steps))))
        delta = float(10 ** rng.uniform(-12.0, -3.0))
        rel = "replace" if rng.random() < 0.5 else "add_remove"
        u = rng.random()
        if u < 0.2:
            n_data = int(10 ** rng.uniform(1.0, 5.0))
            b = int(rng.integers(1, n_data + 1))
            out.append(Case(sigma, 1.0, steps, delta, rel, (b, n_data)))
        elif u < 0.4:
            out.append(Case(sigma, 1.0, steps, delta, rel))
        else:
            out.append(Case(sigma, float(10 ** rng.uniform(-6.0, 0.0)), steps, delta, rel))
        s_eff, _, k = charged(out[-1])
        if math.sqrt(k) / s_eff > max_mu:
            out.pop()
    return out


# ---- oracles ----------------------------------------------------------------------------------
def _log_delta_gaussian(mu: float, eps: float) -> float:
    """log δ(ε) of the Gaussian pair N(μ,1) vs N(0,1) (exact, Balle & Wang 2018)."""
    la = float(special.log_ndtr(mu / 2 - eps / mu))
    lb = float(special.log_ndtr(-mu / 2 - eps / mu)) + eps
    if lb >= la:
        return -math.inf
    return la + math.log(-math.expm1(lb - la))


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of the Gaussian pair with μ = Δ/σ (composition: μ adds in quadrature), by bisection."""
    target = math.log(delta)
    if _log_delta_gaussian(mu, 0.0) <= target:
        return 0.0
    lo, hi = 0.0, 1.0
    while _log_delta_gaussian(mu, hi) > target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _log_delta_gaussian(mu, mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(hi, 1.0):
            break
    return 0.5 * (lo + hi)


def charged(case: Case) -> tuple[float, float, int]:
    """(σ in units of the relation's sensitivity, q, releases) the ledger charges — recomputed here
    from the event's definition, not from the accountants' reduction."""
    if case.batch is not None:
        b, n = case.batch
        return case.sigma / 2.0, 1.0, math.ceil(case.steps * b / n)  # 2C per pass, either relation
    factor = 2.0 if case.neighbouring == "replace" else 1.0
    return case.sigma / factor, case.q, case.steps


def oracle(case: Case, rdp_eps: float) -> tuple[float, float | None] | None:
    """(lower bound, upper bound or None) on the true ε of the charged mechanism, or None (skip)."""
    s, q, k = charged(case)
    if q >= 1.0:
        e = exact_gaussian_epsilon(math.sqrt(k) / s, case.delta)
        return e, e
    if not math.isfinite(rdp_eps) or rdp_eps > 150:
        return None
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution as pldlib

    rel = (NeighboringRelation.REPLACE_ONE if case.neighbouring == "replace"
           else NeighboringRelation.ADD_OR_REMOVE_ONE)
    dp_sigma = 2.0 * s if case.neighbouring == "replace" else s  # dp_accounting: sensitivity C
    # privacy buckets round every release's loss down by up to one interval: keep k·interval
    # small where the FFT length allows it (≤ 5·10^4 points over [−1, 3ε + 5])
    interval = float(np.clip(0.02 * max(rdp_eps, 0.05) / k, (3 * rdp_eps + 6) / 5e4, 2e-2))
    d_eval = max(case.delta, 1e-9)
    out = []
    for pess in (False, True):
        try:
            pld = pldlib.from_gaussian_mechanism(
                dp_sigma, sensitivity=1.0, pessimistic_estimate=pess, value_discretization_interval=interval,
                sampling_prob=q, use_connect_dots=pess, neighboring_relation=rel)
            out.append(float(pld.self_compose(k).get_epsilon_for_delta(d_eval)))
        except (OverflowError, ValueError, MemoryError):  # beyond the oracle's numeric range
            return None
    return out[0], (out[1] if d_eval == case.delta else None)


# ---- the check ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # ok / unsound / refused / skipped
    detail: str = ""


def check(case: Case, names: tuple[str, ...] = ACCOUNTANTS) -> dict[str, Outcome]:
    red = segments_from_events([case.event()], case.neighbouring)  # type: ignore[arg-type]
    results = {}
    for name in names:
        try:
            results[name] = get_accountant(name).epsilon(red, case.delta)
        except ValueError as exc:
            results[name] = exc
    rdp = results.get("rdp")
    rdp_eps = rdp.epsilon if rdp is not None and not isinstance(rdp, Exception) else math.inf
    if rdp is None:
        try:
            rdp_eps = get_accountant("rdp").epsilon(red, case.delta).epsilon
        except ValueError:
            rdp_eps = math.inf
    orc = oracle(case, rdp_eps)
    out: dict[str, Outcome] = {}
    for name, res in results.items():
        if isinstance(res, Exception):
            out[name] = Outcome("refused", str(res)[:80])
            continue
        if orc is None:
            out[name] = Outcome("skipped")
            continue
        lo, up = orc
        tol = 1e-9 * max(lo, 1.0)
        bad = []
        if res.epsilon < lo - tol:
            bad.append(f"epsilon {res.epsilon:.6g} < oracle lower {lo:.6g}")
        if res.epsilon_upper is not None and res.epsilon_upper < lo - tol:
            bad.append(f"upper {res.epsilon_upper:.6g} < oracle lower {lo:.6g}")
        if up is not None and res.epsilon_lower is not None and res.epsilon_lower > up + 1e-9 * max(up, 1.0):
            bad.append(f"lower {res.epsilon_lower:.6g} > oracle upper {up:.6g}")
        out[name] = Outcome("unsound", "; ".join(bad)) if bad else Outcome("ok")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accountants", default=",".join(ACCOUNTANTS))
    args = ap.parse_args()
    names = tuple(args.accountants.split(","))
    counts = {n: {"ok": 0, "unsound": 0, "refused": 0, "skipped": 0} for n in names}
    t0 = time.perf_counter()
    for i, case in enumerate(random_cases(args.cases, args.seed)):
        res = check(case, names)
        for n, o in res.items():
            counts[n][o.status] += 1
            if o.status == "unsound":
                print(f"UNSOUND {n}: {case} -- {o.detail}")
        if (i + 1) % 50 == 0:
            summary = "; ".join(f"{n} " + " ".join(f"{k} {v}" for k, v in counts[n].items()) for n in names)
            print(f"  {i + 1} cases, {time.perf_counter() - t0:.0f} s: {summary}", flush=True)
    print(f"\n{args.cases} random configs (seed {args.seed}), {time.perf_counter() - t0:.0f} s")
    for n in names:
        c = counts[n]
        print(f"  {n:4s} ok {c['ok']:5d}  unsound {c['unsound']:4d}  refused {c['refused']:4d}  "
              f"skipped {c['skipped']:4d}")


if __name__ == "__main__":
    main()
