"""Accountant benchmark: ours (rdp / pld / prv) against the peers, measured in the same run.

    python benchmarks/accounting.py [--prefix 100] [--skip-slow]

(a) one homogeneous query (REFERENCES.md §6 row 1: σ=1.1, q=256/60000, 14063 steps, δ=1e-5);
(b) a heterogeneous ledger: 1000 distinct σ ~ U[0.8, 1.5] (seed 0), q=0.01, 10 steps each, δ=1e-5.
    Ours run on all 1000 segments; the peers that need minutes run on the first ``--prefix``
    segments (ours are run on that prefix as well, for the ε comparison);
(c) calibrating σ for ε=3 at row 1's q and steps.

Prints seconds, ε and the time ratio peer/ours. Peers: dp_accounting 0.6 (RDP, PLD with
value_discretization_interval=1e-4), Opacus 1.6 (RDP, PRV), prv_accountant 0.2 (ε_err=0.01,
δ_err=δ/1000, the settings Opacus uses).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from privaudit.accounting.base import Segment  # noqa: E402
from privaudit.accounting.calibrate import calibrate_noise  # noqa: E402
from privaudit.accounting.pld import PLDAccountant  # noqa: E402
from privaudit.accounting.prv import PRVAccountant  # noqa: E402
from privaudit.accounting.rdp import RDPAccountant  # noqa: E402

warnings.simplefilter("ignore")
logging.getLogger().setLevel(logging.ERROR)  # dp_accounting's absl warnings on the warm-up call

SIGMA, Q, STEPS, DELTA = 1.1, 256 / 60000, 14063, 1e-5


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, float(value)


def row(label: str, secs: float, eps: float, ours_secs: float | None = None, note: str = "") -> None:
    ratio = f"{secs / ours_secs:8.1f}x" if ours_secs else " " * 9
    print(f"  {label:<44s} {secs:9.3f} s   ε = {eps:8.4f}   {ratio} {note}")


# ---- peers ---------------------------------------------------------------------------------
def dp_rdp(hist: list[tuple[float, float, int]], delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant as rpa

    acc = rpa.RdpAccountant()
    for s, q, n in hist:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
    return acc.get_epsilon(delta)


def dp_pld(hist: list[tuple[float, float, int]], delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant as ppa

    acc = ppa.PLDAccountant(value_discretization_interval=1e-4)
    for s, q, n in hist:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
    return acc.get_epsilon(delta)


def opacus(kind: str, hist: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant as OPRV
    from opacus.accountants import RDPAccountant as ORDP

    acc = OPRV() if kind == "prv" else ORDP()
    acc.history = list(hist)
    return acc.get_epsilon(delta)


def prv_lib(hist: list[tuple[float, float, int]], delta: float) -> float:
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant as Lib

    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
            for s, q, _ in hist]
    acc = Lib(prvs=prvs, max_self_compositions=[n for *_, n in hist], eps_error=0.01,
              delta_error=delta / 1000)
    return acc.compute_epsilon(delta=delta, num_self_compositions=[n for *_, n in hist])[2]


def ours(name: str, segs: list[Segment], delta: float) -> float:
    acc = {"rdp": RDPAccountant, "pld": PLDAccountant, "prv": PRVAccountant}[name]()
    return acc._epsilon(segs, delta).epsilon


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=100, help="segments for the slow peers in (b)")
    ap.add_argument("--skip-slow", action="store_true", help="skip dp_accounting PLD and Opacus "
                    "PRV on the heterogeneous prefix (minutes)")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass

    hist1 = [(SIGMA, Q, STEPS)]
    seg1 = [Segment("gaussian", SIGMA, Q, STEPS)]
    # warm-up imports (not timed)
    ours("pld", [Segment("gaussian", 1.0, 0.1, 3)], 1e-5)
    opacus("rdp", [(1.0, 0.1, 3)], 1e-5)
    dp_rdp([(1.0, 0.1, 3)], 1e-5)

    print(f"(a) homogeneous: σ={SIGMA}, q={Q:.6g}, {STEPS} steps, δ={DELTA}")
    t_rdp, e = timed(lambda: ours("rdp", seg1, DELTA)); row("ours rdp", t_rdp, e)
    t_pld, e = timed(lambda: ours("pld", seg1, DELTA)); row("ours pld (upper; + lower bound)", t_pld, e)
    t_prv, e = timed(lambda: ours("prv", seg1, DELTA)); row("ours prv (upper)", t_prv, e)
    t, e = timed(lambda: dp_rdp(hist1, DELTA)); row("dp_accounting RDP", t, e, t_rdp)
    t, e = timed(lambda: opacus("rdp", hist1, DELTA)); row("Opacus RDP", t, e, t_rdp)
    t, e = timed(lambda: dp_pld(hist1, DELTA)); row("dp_accounting PLD (1e-4)", t, e, t_pld)
    t, e = timed(lambda: opacus("prv", hist1, DELTA)); row("Opacus PRV (upper)", t, e, t_prv)
    t, e = timed(lambda: prv_lib(hist1, DELTA)); row("prv_accountant (upper)", t, e, t_prv)

    rng = np.random.default_rng(0)
    sig = rng.uniform(0.8, 1.5, 1000)
    hist = [(float(s), 0.01, 10) for s in sig]
    segs = [Segment("gaussian", s, q, n) for s, q, n in hist]
    n = args.prefix
    print(f"\n(b) heterogeneous ledger: 1000 distinct σ in [0.8, 1.5], q=0.01, 10 steps each, δ={DELTA}")
    full: dict[str, float] = {}
    for name in ("rdp", "pld", "prv"):
        t, e = timed(lambda: ours(name, segs, DELTA))
        full[name] = t
        row(f"ours {name}, all 1000 segments", t, e)
    t, e = timed(lambda: dp_rdp(hist, DELTA)); row("dp_accounting RDP, all 1000 segments", t, e, full["rdp"])
    t, e = timed(lambda: opacus("rdp", hist, DELTA)); row("Opacus RDP, all 1000 segments", t, e, full["rdp"])
    print(f"  -- the slow peers on the first {n} segments only (ours on the same prefix) --")
    pre, spre = hist[:n], segs[:n]
    pref: dict[str, float] = {}
    for name in ("rdp", "pld", "prv"):
        t, e = timed(lambda: ours(name, spre, DELTA))
        pref[name] = t
        row(f"ours {name}, {n} segments", t, e)
    if not args.skip_slow:
        t, e = timed(lambda: dp_pld(pre, DELTA)); row(f"dp_accounting PLD, {n} segments", t, e, pref["pld"])
        t, e = timed(lambda: opacus("prv", pre, DELTA)); row(f"Opacus PRV, {n} segments", t, e, pref["prv"])
    t, e = timed(lambda: prv_lib(pre, DELTA)); row(f"prv_accountant, {n} segments", t, e, pref["prv"])

    print(f"\n(c) calibrate σ for ε=3 (q={Q:.6g}, {STEPS} steps, δ={DELTA})")
    res: dict[str, float] = {}
    for name in ("pld", "prv", "rdp"):
        t0 = time.perf_counter()
        r = calibrate_noise(3.0, DELTA, Q, STEPS, accountant=name)
        res[name] = time.perf_counter() - t0
        row(f"ours {name}: σ = {r.noise_multiplier:.5f}", res[name], r.epsilon)
    from opacus.accountants.utils import get_noise_multiplier

    for name in ("prv", "rdp"):
        t0 = time.perf_counter()
        s = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=Q, steps=STEPS,
                                 accountant=name)
        t = time.perf_counter() - t0
        row(f"Opacus {name}: σ = {s:.5f}", t, opacus(name, [(s, Q, STEPS)], DELTA), res[name])


if __name__ == "__main__":
    main()
