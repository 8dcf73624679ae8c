"""Audit tightness: ε_lower ÷ accounted ε for each one-run bound and canary design, on the same runs.

For each target ε (default 1, 4, 16; σ calibrated with PLD at δ = 1e-5) one DP-SGD run is trained and
audited with every canary design it carries, each design audited on its own (as ``privaudit audit
--attacks <design>`` would: the Steinke and f-DP bounds of that design Bonferroni-corrected together,
95% family confidence):

* ``gradient_final`` — white-box gradient canaries scored from θ₀ and the final weights
  (``gradient_canaries_one_run``);
* ``gradient_every_step`` — the same canaries scored by an observer who sees every step's noisy sum
  (``gradient_canaries_every_step``, from the run's opt-in per-step record);
* ``data_canaries`` — the corpus's data canaries scored by loss under θ₀ − loss under the released
  model (``canary_membership``).

Bounds: ``one_run_steinke`` (Steinke, Nasr, Jagielski 2023; assumption-free), ``one_run_fdp``
(Mahloujifar, Melis, Chaudhuri 2024; a GDP μ lower bound reported as ε(δ) of μ-GDP, i.e. assuming a
Gaussian trade-off curve) and ``one_run_fdp_accounted`` (the same recursion against the PLD
accountant's own trade-off curve of the run with its noise scaled by c: ε(δ) of the smallest rejected
scale, assuming the mechanism is the accounted schedule at some noise scale; ``R`` after it marks a
rejection of the accountant's curve itself — a violation without assumption).

Ceiling rows (``ideal_every_step``, ``ideal_final``): the same bounds on scores *simulated* for an
ideal observer of the run's own schedule (its q, steps, σ and m; δ = 1e-5; same grid, same
Bonferroni correction) whose canaries suffer no interference from data or from one another — every
step: x_t = 1{sampled} + σ·N(0, 1) per step, scored by the exact likelihood ratio; final: the sum over
steps (the final weights of plain SGD). No one-run audit of that schedule with m canaries can expect
more than these rows (up to the draw: ``--ideal-draws`` averages several), so they say whether a gap
to the accounted ε is the attack's or the schedule's.

``--noise-factor F`` plants a bug: the run adds F × the noise its ledger records (F < 1 leaks more
than accounted), to see which bound catches it.

Settings (``--settings``):

* ``demo`` — the demo's privacy schedule and canaries (``privaudit.demo``: the synthetic corpus of
  400 people, Poisson sampling at batch 64 → q ≈ 0.07, 3 epochs ≈ 40 steps, Adam at 0.05, 2,000
  gradient canaries, 64 data canaries), on a tiny GPT-2 classifier instead of MiniLM so that a point
  takes seconds, not minutes (``--full-model`` uses the demo's model: ~5 min per point on 2 cores);
* ``full_batch`` — every record and canary in every step (q = 1, 10 steps, SGD): the mechanism is then
  exactly a composition of Gaussian mechanisms, the regime where the f-DP bound's assumption holds.
* ``lm`` — the black-box audit of a causal LM with the strong LM canaries (Panda et al. 2025; the
  designs of ``privaudit study``: new_token, new_token_trained (its rows trained under the same
  DP-SGD), rare_token, bigram and the format baseline, one run per design, attack
  ``lm_canary_membership``): the schedule of ``examples/lm_canary_study.yaml`` (200 canaries —
  ``--lm-canaries N`` — 24 tokens, q = 0.15, 8 epochs, Adam) at learning rate 5e-5 (``--lm-lr``; the
  study's sweep on another draw found trained rows certify nothing at 5e-3 and level off below 5e-5),
  on a tiny GPT-2 (2 layers × 64) or, with ``--full-model``, on SmolLM2-135M (≈ 2 min per run per 200
  canaries on 2 cores).

Canaries: ``--canaries N``, ``--directions auto|dirac|gaussian`` (``audit.gradient_canary_directions``;
dirac = one trainable coordinate each, orthogonal), ``--lora-rank R --lora-targets a,b`` to widen the
trainable space (the demo trains 3,842 coordinates: LoRA rank 2 on two value projections + the head).

``--quick``: ε = 4 only, the demo's quick corpus and 1,000 gradient canaries. Timing is not the point
here; the table is. Usage: ``python benchmarks/audit_tightness.py [--quick] [--epsilons 1,4,16]
[--settings demo,full_batch] [--full-model] [--canaries N] [--seed S] [--json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DESIGNS = {"gradient_final": "gradient_canaries_one_run", "gradient_every_step": "gradient_canaries_every_step",
           "data_canaries": "canary_membership"}
BOUNDS = ("one_run_steinke", "one_run_fdp", "one_run_fdp_accounted")
IDEAL = ("ideal_every_step", "ideal_final")
LM_DESIGNS = ("new_token_trained", "new_token", "rare_token", "bigram", "format")
LM_ROWS = tuple(f"lm_{d}" for d in LM_DESIGNS)
TINY_LM = {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 2, "n_embd": 64, "n_head": 2}}
SETTINGS = ("demo", "full_batch", "lm")
TINY_MODEL = {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 64, "n_head": 2}}


def _config(setting: str, epsilon: float, quick: bool, full_model: bool, seed: int,
            canaries: int | None = None, directions: str = "auto", lora_rank: int | None = None,
            lora_targets: list[str] | None = None) -> dict[str, Any]:
    from privaudit.demo import demo_config

    cfg = demo_config(quick=quick, noise_seed=seed)
    if not full_model:
        cfg["model"] = dict(TINY_MODEL)
        cfg["lora"] = {"rank": 4, "alpha": 8, "train_head": True}
    if setting == "full_batch":
        cfg["training"] = {**cfg["training"], "sampling": "poisson", "sample_rate": 1.0, "batch_size": None,
                           "epochs": None, "steps": 10, "optimizer": "sgd", "learning_rate": 0.05}
    cfg["privacy"] = {**cfg["privacy"], "target_epsilon": float(epsilon), "noise_seed": seed}
    cfg["audit"] = {**cfg["audit"], "record_canary_steps": True, "gradient_canary_seed": seed + 1}
    if canaries is not None:
        cfg["audit"]["gradient_canaries"] = int(canaries)
    cfg["audit"]["gradient_canary_directions"] = directions
    if lora_rank is not None:
        cfg["lora"] = {**cfg["lora"], "rank": int(lora_rank), "alpha": 2 * int(lora_rank)}
    if lora_targets:
        cfg["lora"] = {**cfg["lora"], "target_modules": list(lora_targets)}
    return cfg


def _ideal_rows(plan: dict[str, Any], m: int, family: Any, draws: int, seed: int) -> dict[str, Any]:
    """The ceiling rows (see the module docstring): each bound averaged over ``draws`` simulations."""
    import math

    import numpy as np

    from privaudit.audit.bounds import one_run_bounds_best

    q, steps, sigma = float(plan["sample_rate"]), int(plan["steps"]), float(plan["noise_multiplier"])
    wanted = ("one_run", "one_run_fdp") + (("one_run_fdp_accounted",) if family is not None else ())
    sums: dict[str, dict[str, list[float]]] = {"ideal_every_step": {}, "ideal_final": {}}
    for k in range(draws):
        rng = np.random.default_rng([seed, k, 0x1DEA1])
        inc = rng.random(m) < 0.5
        x = ((rng.random((steps, m)) < q) & inc[None, :]) + sigma * rng.standard_normal((steps, m))
        every = (x.sum(0) if q >= 1.0 else
                 np.logaddexp(math.log1p(-q), math.log(q) + (x - 0.5) / sigma**2).sum(0))
        for name, scores in (("ideal_every_step", every), ("ideal_final", x.sum(0))):
            out = one_run_bounds_best(scores, inc, [1e-5], 0.95, wanted, family=family)
            for b, by_d in out.items():
                sums[name].setdefault(b, []).append(by_d[1e-5].value)
    rename = {"one_run": "one_run_steinke"}
    return {name: {"auc": None, "draws": draws,
                   **{rename.get(b, b): {"epsilon_lower": float(np.mean(v)), "min": float(np.min(v)),
                                         "max": float(np.max(v))} for b, v in by_b.items()}}
            for name, by_b in sums.items()}


def _cell(res: Any, attack: str, eps: float) -> dict[str, Any]:
    a = res.attack(attack)
    cell: dict[str, Any] = {"auc": a.metrics.get("auc")}
    for b in BOUNDS:
        lb = a.by_bound.get(b)
        cell[b] = None if lb is None else {"epsilon_lower": lb.value, "ratio": lb.value / eps, "mu": lb.mu,
                                           "r": lb.r, "v": lb.v, "refuted": lb.refuted,
                                           "noise_scale": lb.noise_scale}
    cell["verdict"] = res.verdict
    return cell


def _lm_point(epsilon: float, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The ``lm`` setting at one ε: one run per LM canary design, each audited by its secret loss."""
    import yaml

    from privaudit.audit.auditor import audit_run
    from privaudit.config import parse_config
    from privaudit.runs import train
    from privaudit.studies.lm_canaries import PrivacyPoint, load_study, run_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "lm_canary_study.yaml").read_text())
    base = raw["base"]
    if not args.full_model:
        base["model"], base["lora"] = dict(TINY_LM), {"rank": 8, "alpha": 16}
    base["training"] = {**base["training"], "learning_rate": args.lm_lr}
    base["data"]["synthetic"] = {**base["data"]["synthetic"], "n_canaries": args.lm_canaries}
    base["privacy"] = {**base["privacy"], "noise_seed": args.seed}
    base["audit"] = {**base.get("audit", {}), "lm_canary_seed": 1000 + args.seed}
    designs = [d for d in (args.lm_designs or ",".join(LM_DESIGNS)).split(",") if d]
    study = load_study({**raw, "designs": designs, "privacy": [{"target_epsilon": float(epsilon)}]})
    t0 = time.perf_counter()
    row: dict[str, Any] = {"setting": "lm", "target_epsilon": epsilon}
    for design in designs:
        cfg = run_config(study, design, PrivacyPoint(target_epsilon=float(epsilon)))
        run_dir = root / f"lm_{design}_eps{epsilon:g}"
        train(parse_config(cfg), run_dir, progress=False)
        res = audit_run(run_dir, attacks=["lm_canary_membership"], _write=False)
        eps = res.accounted["epsilon"]["pld"]
        row["accounted_epsilon"] = eps
        row[f"lm_{design}"] = _cell(res, "lm_canary_membership", eps)
        if args.ideal_draws > 0 and "ideal_final" not in row:  # the same schedule for every design
            from privaudit.audit.accounted import accounted_family

            m = res.attack("lm_canary_membership").metrics
            family, _ = accounted_family(run_dir / "ledger.jsonl")
            plan = json.loads((run_dir / "manifest.json").read_text())["plan"]
            ideal = _ideal_rows(plan, int(m["n_members"]) + int(m["n_nonmembers"]), family, args.ideal_draws,
                                args.seed)
            for name, c in ideal.items():
                for b in BOUNDS:
                    if c.get(b):
                        c[b]["ratio"] = c[b]["epsilon_lower"] / eps
                row[name] = c
        shutil.rmtree(run_dir, ignore_errors=True)
    row["total_s"] = round(time.perf_counter() - t0, 1)
    return row


def _point(setting: str, epsilon: float, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from privaudit.audit.auditor import audit_run
    from privaudit.config import parse_config
    from privaudit.runs import train

    cfg = _config(setting, epsilon, args.quick, args.full_model, args.seed, args.canaries, args.directions,
                  args.lora_rank, [t for t in (args.lora_targets or "").split(",") if t])
    run_dir = root / f"{setting}_eps{epsilon:g}"
    t0 = time.perf_counter()
    if args.noise_factor != 1.0:  # planted bug (see the module docstring)
        import functools

        from privaudit.mechanisms import dp_lora

        fit = dp_lora.fit
        dp_lora.fit = functools.partial(fit, _unsafe_noise_factor=args.noise_factor)  # type: ignore[assignment]
        try:
            train(parse_config(copy.deepcopy(cfg)), run_dir, progress=False)
        finally:
            dp_lora.fit = fit  # type: ignore[assignment]
    else:
        train(parse_config(copy.deepcopy(cfg)), run_dir, progress=False)
    train_s = time.perf_counter() - t0
    row: dict[str, Any] = {"setting": setting, "target_epsilon": epsilon, "train_s": round(train_s, 1),
                           "gradient_canaries": cfg["audit"]["gradient_canaries"]}
    for design, attack in DESIGNS.items():
        try:
            res = audit_run(run_dir, attacks=[attack], _write=False)
        except ValueError as exc:  # e.g. a run without data canaries
            row[design] = {"skipped": str(exc)}
            continue
        eps = res.accounted["epsilon"]["pld"]
        row["accounted_epsilon"] = eps
        row[design] = _cell(res, attack, eps)
    if args.ideal_draws > 0 and row.get("accounted_epsilon"):
        from privaudit.audit.accounted import accounted_family

        manifest = json.loads((run_dir / "manifest.json").read_text())
        family, _ = accounted_family(run_dir / "ledger.jsonl")
        ideal = _ideal_rows(manifest["plan"], int(cfg["audit"]["gradient_canaries"]), family, args.ideal_draws,
                            args.seed)
        for name, cell in ideal.items():
            for b in BOUNDS:
                if cell.get(b):
                    cell[b]["ratio"] = cell[b]["epsilon_lower"] / row["accounted_epsilon"]
            row[name] = cell
    row["total_s"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'setting':<11} {'ε':>5} {'design':<20} {'AUC':>6} " + " ".join(f"{b + ' ε_l (÷ε)':>26}" for b in BOUNDS)
            + "  verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        for design in [*DESIGNS, *IDEAL, *LM_ROWS]:
            if design not in r:
                continue
            cell = r.get(design, {})
            if "skipped" in cell:
                lines.append(f"{r['setting']:<11} {r['target_epsilon']:>5g} {design:<20} skipped: {cell['skipped']}")
                continue
            auc = cell.get("auc")
            parts = []
            for b in BOUNDS:
                c = cell.get(b)
                parts.append(f"{'—':>26}" if c is None else
                             f"{c['epsilon_lower']:>15.3f} ({c['ratio']:.3f}){'R' if c.get('refuted') else ' '}")
            lines.append(f"{r['setting']:<11} {r['target_epsilon']:>5g} {design:<20} "
                         f"{(f'{auc:.3f}' if isinstance(auc, float) else '—'):>6} " + " ".join(parts)
                         + f"  {cell.get('verdict', '')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ε = 4 only, smaller corpus, 1,000 gradient canaries")
    ap.add_argument("--epsilons", default=None, help="comma-separated target ε values (default 1,4,16)")
    ap.add_argument("--settings", default="demo,full_batch", help="comma-separated: demo, full_batch, lm")
    ap.add_argument("--full-model", action="store_true", help="the demo's MiniLM model (minutes per point)")
    ap.add_argument("--canaries", type=int, default=None, help="gradient canaries (default: the demo's)")
    ap.add_argument("--directions", default="auto", choices=("auto", "dirac", "gaussian"),
                    help="gradient canary directions (audit.gradient_canary_directions)")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: the demo's 2)")
    ap.add_argument("--lora-targets", default=None, help="comma-separated LoRA target modules (default: the demo's)")
    ap.add_argument("--ideal-draws", type=int, default=3,
                    help="simulations averaged in the ideal-observer ceiling rows (0: no ceiling rows)")
    ap.add_argument("--lm-canaries", type=int, default=200, help="lm setting: LM canaries per run")
    ap.add_argument("--lm-lr", type=float, default=5e-5, help="lm setting: Adam learning rate")
    ap.add_argument("--lm-designs", default=None, help="lm setting: comma-separated designs (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    ap.add_argument("--noise-factor", type=float, default=1.0,
                    help="planted bug: the run adds this × the recorded noise (default 1: no bug)")
    args = ap.parse_args()
    try:
        eps_list = [float(x) for x in (args.epsilons or ("4" if args.quick else "1,4,16")).split(",")]
        settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    except ValueError:
        print("--epsilons: must be comma-separated numbers", file=sys.stderr)
        return 2
    bad = [s for s in settings if s not in SETTINGS]
    if not (args.noise_factor > 0):
        print("--noise-factor: must be > 0", file=sys.stderr)
        return 2
    if bad or not settings or any(not (e > 0) for e in eps_list):
        print(f"--settings/--epsilons: unknown setting {bad[0] if bad else ''!r} or ε <= 0", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="audit_tightness_") as tmp:
        for setting in settings:
            for eps in eps_list:
                rows.append(_lm_point(eps, args, Path(tmp)) if setting == "lm" else _point(setting, eps, args, Path(tmp)))
                print(f"[{setting} ε={eps:g}] done in {rows[-1]['total_s']} s", file=sys.stderr, flush=True)
    print(_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
