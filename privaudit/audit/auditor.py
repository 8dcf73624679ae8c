"""Audit a run directory: attacks against the ledger's observer → empirical ε lower bounds → verdict.

:func:`audit_run` reads a run (safetensors and JSON only, via :func:`privaudit.runs.load_run`),
regenerates its data deterministically (``prepare_data``; a run trained on a data file reads the
file the *user* names, ``data_path``, never the manifest's path, and checks it against the recorded
fingerprints) and checks it against the run's ``audit_key.json`` (the auditor's secret: which
records and canaries were members), runs the attacks that fit the observer named in the ledger
header, turns their scores into metrics and ε lower bounds, and writes ``audit.json`` with a verdict.

Attacks for the observer ``released model`` (DP-SGD style mechanisms), all record-level with
add/remove neighbours at the level of the attacked unit:

* ``loss`` — membership of training records vs held-out records, score −loss (Yeom et al.);
* ``lira_online`` / ``lira_offline`` / ``rmia`` — with ``reference_models`` ≥ 2: reference models are
  trained by the auditor with the run's own mechanism and config (no ledger) on random halves of the
  population (members ∪ non-members); RMIA's population points z are non-members held apart;
* ``canary_membership`` — data canaries (included independently with probability ½), score =
  loss under θ₀ − loss under the released model;
* ``canary_exposure`` — causal LMs: Secret Sharer exposure of each canary's secret among candidates
  of its format (sampled when the space is larger than ``exposure_candidates``; format canaries only);
* ``lm_canary_membership`` — causal LMs: the loss on each canary's secret tokens only (Panda et al.
  2025), under θ₀ minus under the released model; the canary design is ``audit.lm_canary_design``
  (:mod:`privaudit.data.lm_canaries`); canaries repeated k > 1 times are k-record units: metrics only;
  run by default when the design is not ``format`` (for ``format`` canaries: on request);
* ``gradient_canaries_one_run`` — white-box: the run's gradient canaries scored from θ₀ and the final
  trainable weights (:func:`privaudit.mechanisms.training.score_gradient_canaries`); a Dirac canary's
  unit direction is its own coordinate, a Gaussian one's its seeded direction (``directions`` in the key).
* ``gradient_canaries_every_step`` — white-box, an observer who sees every step: when the run kept
  ``canary_steps.safetensors`` (``audit.record_canary_steps``), each canary scored by the likelihood
  ratio of its per-step projections (:func:`privaudit.mechanisms.training.every_step_canary_scores`).

Which attacks yield an ε lower bound: only those whose units were included independently with
probability ½ — the canary attacks, via the one-run audit. Two one-run bounds are computed from the
same guesses and the larger is reported, with its name in ``bound``: ``one_run_steinke`` (Steinke,
Nasr, Jagielski 2023; assumption-free) and ``one_run_fdp`` (Mahloujifar, Melis, Chaudhuri 2024: a
lower bound on the GDP μ, reported as ε(δ) of μ-GDP, which assumes a Gaussian trade-off curve and
says so in ``assumption``). When the ledger is PLD-accountable under add/remove, a third test runs on
the same guesses: ``one_run_fdp_accounted``, the same f-DP recursion against the accountant's *own*
trade-off curve (from its δ(ε) for every ε, :mod:`privaudit.audit.accounted`). Rejecting that curve
(``refuted``) refutes the accounting with no assumption on the mechanism's shape, so it may decide a
``violation``; its ε_lower (ε(δ) of the smallest noise scale of the accounted schedule whose curve is
rejected) assumes the mechanism is that schedule at some noise scale (``assumption:
accounted_family``). Records are split into train/held-out at a fixed fraction, not by
independent fair coins, so the record-level attacks (loss, LiRA, RMIA) report metrics (AUC, TPR at
low FPR) but no ε bound.

Multiple testing: the reported ε_lower is the maximum over K bounds (K = attacks with a bound × (the
distinct δ values checked — the target δ and each claim's δ — for the Steinke bound, + 1 for the f-DP
bound, whose μ serves every δ > 0, + 1 for the accounted-curve test when it runs)), so each bound is computed at confidence 1 − (1 − confidence)/K
(Bonferroni) and the maximum holds at ``confidence``.

Verdicts: ``violation`` when an assumption-free bound (Steinke's) exceeds the accounted ε, the
accounted-curve test rejects the accountant's curve, or a claim is refuted; an ε_lower above the
accounted ε from a bound with an assumption alone is ``inconclusive``; ``no guarantee`` when
the ledger gives none; ``consistent`` only when a bound was computed, stays below the accounted ε, and
the audit had the power to exceed it (``power``: the bound the design gives for perfect guesses,
:mod:`privaudit.audit.power`) — or, when the accounted-curve test runs, perfect guesses on the design
would have rejected the accountant's own curve (``power_refutes_accounted``); otherwise
``inconclusive``, with the reason (no attack produced a bound,
or the accounted ε is above the power: even a perfect attack could not have shown a violation).

Other observers (``server``, ``worker`` ...): mechanisms register attacks on their view with
:func:`register_view_attack`; with none registered the audit says so and runs no attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from privaudit.attacks.interface import AttackScores, AuditContext, ViewAttack
from privaudit.attacks.released_model import (
    _REFERENCE_ATTACKS,
    _canary_exposure_attack,
    _canary_membership_attack,
    _derived_seed,
    _gradient_canary_attack,
    _lm_canary_attack,
    _loss_attack,
    _reference_attacks,
)
from privaudit.attacks.views import registered_view_attacks
from privaudit.audit.bounds import (
    ACCOUNTED_FAMILY,
    EpsilonLowerBound,
    TradeoffFamily,
    one_run_audit_best,
    one_run_bounds_best,
    one_run_fdp_claim_refutable,
)
from privaudit.audit.power import audit_power

if TYPE_CHECKING:

    from privaudit.data import Record
    from privaudit.mechanisms.training import DataBundle
    from privaudit.runs import LoadedRun

__all__ = [
    "AUDIT_FILE",
    "BUILTIN_ATTACKS",
    "AttackResult",
    "AuditResult",
    "audit_run",
]

AUDIT_FILE = "audit.json"
RELEASED_MODEL = "released model"
BUILTIN_ATTACKS: tuple[str, ...] = (
    "loss", "lira_online", "lira_offline", "rmia", "canary_membership", "canary_exposure", "lm_canary_membership",
    "gradient_canaries_one_run", "gradient_canaries_every_step",
)


# --------------------------------------------------------------------------------------------------
# results


def _jsonable(x: Any) -> Any:
    """Replace NaN/inf (not valid JSON) and numpy scalars, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


@dataclass(frozen=True)
class AttackResult:
    """One attack in ``audit.json``. ``epsilon_lower`` is the bound at the target δ (None when the
    attack supports none); ``bounds`` holds it at every δ checked (target and claims)."""

    name: str
    kind: str
    metrics: Mapping[str, Any]
    roc: Mapping[str, list[float]] | None = None
    epsilon_lower: EpsilonLowerBound | None = None
    bounds: Mapping[float, EpsilonLowerBound] = field(default_factory=dict)
    family_confidence: float | None = None
    note: str | None = None
    power: float | None = None  # the largest ε_lower this attack's design could certify (perfect guesses)
    by_bound: Mapping[str, EpsilonLowerBound] = field(default_factory=dict)  # every bound at the target δ
    sound_bounds: Mapping[float, EpsilonLowerBound] = field(default_factory=dict)  # assumption-free, per δ
    # would perfect guesses on this design reject the accountant's own curve? (None: test not run)
    power_refutes_accounted: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "metrics": _jsonable(dict(self.metrics))}
        if self.roc is not None:
            out["roc"] = {"fpr": list(self.roc["fpr"]), "tpr": list(self.roc["tpr"])}
        if self.epsilon_lower is not None:
            el = self.epsilon_lower.to_json()
            el["family_confidence"] = self.family_confidence
            el["bound"] = bound_name(self.epsilon_lower)
            if self.power is not None:
                el["power"] = self.power
            if self.power_refutes_accounted is not None:
                el["power_refutes_accounted"] = self.power_refutes_accounted
            out["epsilon_lower"] = el
            if self.by_bound:
                out["epsilon_lower_by_bound"] = {k: b.to_json() for k, b in self.by_bound.items()}
            others = [{"delta": d, "value": b.value} for d, b in sorted(self.bounds.items())
                      if d != self.epsilon_lower.delta]
            if others:
                out["epsilon_lower_at_claim_deltas"] = others
        if self.note:
            out["note"] = self.note
        return out


Verdict = Literal["consistent", "inconclusive", "violation", "no guarantee"]


@dataclass(frozen=True)
class AuditResult:
    """The content of ``audit.json`` (see :meth:`to_json`); ``path`` is where it was written."""

    run_id: str
    observer: str
    accounted: Mapping[str, Any]
    claimed: tuple[Mapping[str, Any], ...]
    attacks: tuple[AttackResult, ...]
    epsilon_lower: Mapping[str, Any]
    verdict: Verdict
    verdict_reason: str
    created: str
    settings: Mapping[str, Any]
    path: Path | None = None

    def attack(self, name: str) -> AttackResult:
        for a in self.attacks:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return _jsonable({
            "run_id": self.run_id,
            "observer": self.observer,
            "accounted": dict(self.accounted),
            "claimed": [dict(c) for c in self.claimed],
            "attacks": [a.to_json() for a in self.attacks],
            "epsilon_lower": dict(self.epsilon_lower),
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "created": self.created,
            "settings": dict(self.settings),
        })


# --------------------------------------------------------------------------------------------------
# progress


class _Progress:
    """Stage progress: a rich bar on stderr (``progress=True``), a callable ``(message, done, total)``,
    or nothing."""

    def __init__(self, progress: bool | Callable[[str, int, int], None] | None) -> None:
        self._fn = progress if callable(progress) else None
        self._bar: Any = None
        self._task: Any = None
        self.done, self.total = 0, 1
        if progress is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(TextColumn("[bold]audit[/bold] {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
            self._task = self._bar.add_task("", total=None)
            self._bar.start()

    def set_total(self, total: int) -> None:
        self.total = max(total, 1)

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=message, completed=self.done, total=self.total)
        if self._fn is not None:
            self._fn(message, self.done, self.total)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# --------------------------------------------------------------------------------------------------
# built-in attacks on the released model


def _gradient_canary_every_step_attack(ctx: AuditContext) -> list[AttackScores]:
    from safetensors.numpy import load

    from privaudit.mechanisms.training import (
        CANARY_STEPS_FILE,
        GradientCanaries,
        every_step_canary_scores,
    )
    from privaudit.safe_read import read_bounded

    run = ctx.run
    key = GradientCanaries.from_json(run.audit_key["gradient_canaries"])  # type: ignore[index]
    steps = run.manifest.get("plan", {}).get("steps") if isinstance(run.manifest.get("plan"), dict) else None
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 1_000_000
    limit = min(1 << 32, 4 * key.count * (steps + 1) + (1 << 20))  # float32 (steps, m) and a header
    data = read_bounded(run.run_dir / CANARY_STEPS_FILE, "run_dir", limit, root=run.run_dir)
    try:
        proj = load(data).get("projections")
    except Exception as exc:  # a damaged safetensors file: one line, not a traceback
        raise ValueError(f"run_dir: {CANARY_STEPS_FILE} is not a readable safetensors file ({exc})") from None
    if proj is None or proj.ndim != 2 or proj.shape[1] != key.count or proj.shape[0] < 1:
        raise ValueError(f"run_dir: {CANARY_STEPS_FILE} must hold 'projections' of shape (steps, {key.count})")
    ctx.log(f"gradient canaries, every step: {key.count} canaries × {proj.shape[0]} steps")
    scores = every_step_canary_scores(proj, key.clip_norm, key.sample_rate)
    inc = np.array(key.included, dtype=bool)
    return [AttackScores("gradient_canaries_every_step", "canary", scores[inc], scores[~inc], bound="one_run",
                         metrics={"m": key.count, "sample_rate": key.sample_rate, "steps": int(proj.shape[0])},
                         note="white-box, every step seen: score = Σ_t log-likelihood ratio of the canary's "
                              "projection on step t's noisy sum (Nasr et al. 2023)")]


# --------------------------------------------------------------------------------------------------
# accounting, claims, bounds, verdict


def _accounted(ledger: Any, delta: float) -> tuple[dict[str, Any], float, str | None]:
    """(JSON section, certified ε to compare with (inf: none), the accountant giving it)."""
    from privaudit.accounting.base import accountant_names, compute_epsilon

    eps: dict[str, float | None] = {}
    upper: dict[str, float | None] = {}
    reason: str | None = None
    certified: list[tuple[float, str]] = []
    for name in accountant_names():
        try:
            res = compute_epsilon(ledger, delta, name)
        except ValueError as exc:  # e.g. an event this accountant does not support
            eps[name], upper[name] = None, None
            reason = reason or f"{name}: {exc}"
            continue
        if math.isfinite(res.epsilon):
            eps[name] = float(res.epsilon)
            up = res.epsilon_upper if res.epsilon_upper is not None and math.isfinite(res.epsilon_upper) else None
            upper[name] = None if up is None else float(up)
            certified.append((max(float(res.epsilon), up if up is not None else -math.inf), name))
        else:
            eps[name], upper[name] = None, None
            reason = reason or res.reason or f"{name}: no finite ε"
            certified.append((math.inf, name))
    section: dict[str, Any] = {"delta": delta, "epsilon": eps, "epsilon_upper": upper}
    if not certified:
        section["guarantee"] = "none"
        section["reason"] = reason or "no accountant handles this ledger"
        return section, math.inf, None
    if any(math.isinf(c) for c, _ in certified):  # fail-closed: an accountant sees no guarantee
        section["epsilon"] = {k: None for k in eps}
        section["guarantee"] = "none"
        section["reason"] = reason or "no finite ε"
        return section, math.inf, None
    best, who = min(certified)
    section["compared"] = {"epsilon": best, "accountant": who,
                           "note": "smallest certified upper bound over the accountants"}
    return section, best, who


def _view_summary(results: Sequence[AttackResult], prefix: str = "") -> str | None:
    """'best token recovery X (chance Y), best attribute accuracy A vs majority B' over view attacks."""
    inv = [r for r in results if r.kind == "inversion" and r.name.startswith(prefix)
           and isinstance(r.metrics.get("token_recovery"), (int, float))]
    att = [r for r in results if r.kind == "attribute" and r.name.startswith(prefix)
           and isinstance(r.metrics.get("accuracy"), (int, float))]
    parts = []
    if inv:
        b = max(inv, key=lambda r: r.metrics["token_recovery"])
        ch = b.metrics.get("chance_rate")
        parts.append(f"best token recovery {b.metrics['token_recovery']:.3g} ({b.name}"
                     + (f"; chance {ch:.3g}" if isinstance(ch, (int, float)) else "") + ")")
    if att:
        b = max(att, key=lambda r: r.metrics["accuracy"])
        parts.append(f"best attribute accuracy {b.metrics['accuracy']:.3g} vs majority "
                     f"{b.metrics.get('majority_baseline', float('nan')):.3g} ({b.name})")
    return ", ".join(parts) or None


def _mechanism_parts(manifest: Mapping[str, Any], accounted: dict[str, Any], reason: str,
                     results: Sequence[AttackResult]) -> tuple[dict[str, Any], str]:
    """Add the manifest's mechanism-specific guarantees (a metric-DP report; the guarantees against a
    worker and for the released model) to the accounted section, and say in the verdict's reason what
    was compared with what."""
    privacy = manifest.get("privacy") or {}
    accounted = dict(accounted)
    extra: list[str] = []
    md = privacy.get("metric_dp")
    if isinstance(md, Mapping):
        accounted["metric_dp"] = dict(md)
        eps = md.get("epsilon_at_median_nn")
        extra.append("the token representations carry a metric-DP guarantee ("
                     + (f"η = {md.get('eta'):.4g} per unit distance, ε = {eps:.4g} between tokens at the "
                        f"median nearest-neighbour distance; {md.get('guarantee')}" if isinstance(eps, (int, float))
                        else str(md.get("guarantee"))) + "), which has no (ε, δ) form to compare an empirical "
                     "bound with: the server-view attacks are compared with chance and the majority baseline")
        summary = _view_summary(results)
        if summary:
            extra.append("server-view attacks: " + summary)
    worker = privacy.get("against_worker")
    released = privacy.get("released_model")
    if isinstance(worker, Mapping):
        accounted["against_worker"] = dict(worker)
        extra.append(f"against the worker: {worker.get('statement')}")
        summary = _view_summary(results, "worker_")
        if summary:
            extra.append("worker-view attacks on the ciphertexts: " + summary)
        control = _view_summary(results, "control_unencrypted_")
        if control:
            extra.append("without encryption (control): " + control)
    if isinstance(released, Mapping):
        accounted["released_model"] = dict(released)
        if released.get("guarantee") == "none":
            extra.append(f"the released model has no guarantee ({released.get('reason')})")
    if extra:
        reason = reason + ". " + "; ".join(extra)
    return accounted, reason


def bound_name(b: EpsilonLowerBound) -> str:
    """The name a result gives the bound: ``one_run_steinke`` | ``one_run_fdp`` |
    ``one_run_fdp_accounted`` | the method."""
    return "one_run_steinke" if b.method == "one_run" else b.method


_ASSUMPTION_TEXT = {ACCOUNTED_FAMILY: "assuming the mechanism is the accounted schedule at some noise scale"}


def _bound_label(r: AttackResult | None) -> str | None:
    """'attack, bound' for the verdict's reason, with the bound's assumption when it has one."""
    if r is None or r.epsilon_lower is None:
        return None if r is None else r.name
    b = r.epsilon_lower
    extra = (" " + _ASSUMPTION_TEXT.get(b.assumption, "assuming a Gaussian trade-off curve")) if b.assumption else ""
    return f"{r.name}, {bound_name(b)} bound{extra}"


def _n_bound_tests(deltas: Sequence[float], accounted: bool = False) -> int:
    """Bonferroni tests one attack spends: one Steinke bound per δ, one f-DP μ bound for all δ > 0,
    one accounted-curve test (all δ, all noise scales: a confidence set) when it runs."""
    return len(deltas) + (1 if any(d > 0 for d in deltas) else 0) + (1 if accounted else 0)


def _bounds(scores: AttackScores, deltas: Sequence[float], confidence: float, seed: int,
            family: TradeoffFamily | None = None
            ) -> tuple[dict[float, EpsilonLowerBound], dict[str, EpsilonLowerBound], dict[float, EpsilonLowerBound]]:
    """Every one-run bound of one attack, each at ``confidence`` (already Bonferroni-corrected by the
    caller): ({δ: the largest bound at δ}, {bound name: bound at deltas[0]}, {δ: the assumption-free
    (Steinke) bound at δ}). The f-DP bound holds only for a Gaussian trade-off curve and the
    accounted-curve ε only for the accounted family, so an ε-based verdict of violation rests on the
    Steinke bound; the accounted test's ``refuted`` flag (in by_bound) is assumption-free."""
    assert scores.member_scores is not None and scores.nonmember_scores is not None
    s = np.concatenate([scores.member_scores, scores.nonmember_scores])
    inc = np.concatenate([np.ones(scores.member_scores.size, bool), np.zeros(scores.nonmember_scores.size, bool)])
    steinke = {d: one_run_audit_best(s, inc, d, confidence, seed=seed) for d in deltas}
    pos = [d for d in deltas if d > 0]
    fdp = one_run_bounds_best(s, inc, pos, confidence, ("one_run_fdp",), seed=seed)["one_run_fdp"] if pos else {}
    acc: dict[float, EpsilonLowerBound] = {}
    if family is not None and pos:
        acc = one_run_bounds_best(s, inc, pos, confidence, ("one_run_fdp_accounted",), seed=seed,
                                  family=family)["one_run_fdp_accounted"]
    best = {d: max([steinke[d]] + [x[d] for x in (fdp, acc) if d in x], key=lambda b: b.value) for d in deltas}
    target = deltas[0]
    by_bound = {bound_name(b): b for b in [steinke[target]] + [x[target] for x in (fdp, acc) if target in x]}
    return best, by_bound, steinke


def _power(scores: AttackScores, delta: float, confidence: float, seed: int) -> float:
    """The largest ε_lower :func:`_bound` could certify on this attack's design (its perfect guesses,
    see :mod:`privaudit.audit.power`); whatever bound ``_bound`` computes, its power follows."""
    assert scores.member_scores is not None and scores.nonmember_scores is not None
    inc = np.concatenate([np.ones(scores.member_scores.size, bool), np.zeros(scores.nonmember_scores.size, bool)])

    def bound_fn(s: NDArray[np.float64], i: NDArray[np.bool_], d: float, c: float) -> EpsilonLowerBound:
        # the assumption-free bound: a violation can only be shown by it (see _verdict)
        return _bounds(AttackScores(scores.name, scores.kind, s[i], s[~i], bound="one_run"), [d], c, seed)[2][d]

    return float(audit_power(inc, delta, confidence, bound_fn).value)


def _metrics(scores: AttackScores, n_bootstrap: int, seed: int, confidence: float
             ) -> tuple[dict[str, Any], dict[str, list[float]] | None, str | None]:
    from privaudit.attacks.metrics import membership_metrics

    extra = dict(scores.metrics)
    a, b = scores.member_scores, scores.nonmember_scores
    if a is None or b is None:
        return extra, None, None
    if a.size == 0 or b.size == 0:
        return ({**extra, "n_members": int(a.size), "n_nonmembers": int(b.size)}, None,
                "no metrics: one side has no scored unit")
    mm = membership_metrics(a, b, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    roc = mm.pop("roc")
    return {**mm, **extra}, roc, None


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def _verdict(has_guarantee: bool, compared: float, compared_by: str | None, delta: float,
             top: EpsilonLowerBound | None, top_attack: str | None, claims: Sequence[dict[str, Any]],
             n_attacks: int, observer: str, confidence: float, power: float | None = None,
             power_attack: str | None = None, sound_lower: float | None = None,
             accounted_refuted: str | None = None, accounted_power: str | None = None) -> tuple[Verdict, str]:
    """The verdict and its one-sentence reason (see the module docstring).

    ``consistent`` only when a valid bound was computed and the design had the power to exceed the
    accounted ε (``power``: the largest ε_lower any attack's design could certify); otherwise, with a
    guarantee and no violation, ``inconclusive`` with the reason. ``accounted_refuted``: the attack
    whose guesses rejected the accountant's own trade-off curve (``one_run_fdp_accounted``), if any;
    ``accounted_power``: an attack whose design's perfect guesses would have rejected it (then the audit
    had the power to show a violation even where the Steinke power is below the accounted ε)."""
    lower = top.value if top is not None else 0.0
    sound = lower if sound_lower is None else sound_lower  # the assumption-free bound decides a violation
    refuted = [c for c in claims if c["status"] == "refuted"]
    if has_guarantee and accounted_refuted is not None:
        return "violation", (f"the f-DP one-run test against the accountant's own trade-off curve rejects it "
                             f"({accounted_refuted}, one_run_fdp_accounted, {100 * confidence:g}% confidence): the "
                             "run is not as private as its ledger's privacy profile says, whatever the mechanism's "
                             f"shape (accounted ε = {_fmt(compared)} at δ = {delta:g}, {compared_by}; largest "
                             f"ε_lower = {_fmt(lower)}, Steinke {_fmt(sound)}): an implementation bug")
    if has_guarantee and lower > compared and sound <= compared:
        return "inconclusive", (f"the f-DP bound gives ε_lower = {_fmt(lower)} ({top_attack}) at δ = {delta:g}, above "
                                f"the accounted ε = {_fmt(compared)} ({compared_by}), but it assumes a Gaussian "
                                "trade-off curve, which a subsampled mechanism need not have; neither the test "
                                "against the accountant's own curve (when it ran) nor any assumption-free "
                                f"bound exceeds the accounted ε (largest {_fmt(sound)}): worth investigating, not a "
                                "proof of a violation")
    if has_guarantee and lower > compared:
        return "violation", (f"the audit proves ε ≥ {_fmt(lower)} ({top_attack}, {100 * confidence:g}% confidence) "
                             f"at δ = {delta:g}, above the accounted ε = {_fmt(compared)} ({compared_by}): the "
                             "run leaks more than its ledger allows (an implementation bug)")
    if refuted:
        c = refuted[0]
        return "violation", (f"the audit proves ε ≥ {_fmt(c['epsilon_lower'])} ({c['attack']}, "
                             f"{100 * confidence:g}% confidence) at δ = {c['delta']:g}, "
                             f"above the claimed ε = {_fmt(c['epsilon'])} ({c['source'] or 'unnamed source'}): "
                             "the claim is false")
    if not has_guarantee:
        claimed = ("nothing is claimed" if not claims else
                   "the audit did not refute the claim" + ("s" if len(claims) > 1 else "") +
                   ", which is not a proof of it")
        return "no guarantee", ("the ledger gives no formal guarantee against the observer "
                                f"'{observer}' and {claimed}; the audit measures leakage only "
                                f"(ε_lower = {_fmt(lower)})")
    if n_attacks == 0:
        return "inconclusive", (f"no attack applies to the observer '{observer}', so nothing was tested; the "
                                "guarantee rests on the accounting alone")
    if top is None or power is None:
        return "inconclusive", ("no attack of this audit had the power to produce an ε lower bound (record-level "
                                "attacks report metrics only; a bound needs units included by fair coins, e.g. "
                                "canaries), so the audit cannot test the accounted ε = "
                                f"{_fmt(compared)} ({compared_by})")
    if power < compared and accounted_power is None:
        return "inconclusive", (f"the audit's design could certify at most ε_lower = {_fmt(power)} "
                                f"({power_attack}, perfect guesses, {100 * confidence:g}% confidence, δ = {delta:g}), "
                                f"below the accounted ε = {_fmt(compared)} ({compared_by}): even a perfect attack "
                                f"could not have shown a violation (measured ε_lower = {_fmt(lower)}); more "
                                "canaries would be needed")
    what = []
    if has_guarantee:
        what.append(f"the accounted ε = {_fmt(compared)} ({compared_by})")
    if claims:
        what.append("every claim" if len(claims) > 1 else f"the claimed ε = {_fmt(claims[0]['epsilon'])}")
    could = (f"the design could have certified up to {_fmt(power)} ({power_attack})" if power >= compared else
             f"perfect guesses on the design ({accounted_power}) would have rejected the accountant's own trade-off "
             "curve (one_run_fdp_accounted), which this audit's guesses did not")
    return "consistent", (f"the empirical lower bound ε_lower = {_fmt(lower)} at δ = {delta:g} "
                          f"({top_attack or 'no bound'}) does not exceed {' nor '.join(what)}, and {could}")


# --------------------------------------------------------------------------------------------------
# the audit


def _check_args(attacks: Sequence[str] | None, reference_models: int, confidence: float, seed: int,
                max_records: int, exposure_candidates: int, n_bootstrap: int) -> list[str] | None:
    if not (isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
            and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    if isinstance(reference_models, bool) or not isinstance(reference_models, int) or reference_models < 0 \
            or reference_models == 1:
        raise ValueError(f"reference_models: must be 0 or an integer >= 2, got {reference_models!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 2:
        raise ValueError(f"max_records: must be an integer >= 2, got {max_records!r}")
    if isinstance(exposure_candidates, bool) or not isinstance(exposure_candidates, int) or exposure_candidates < 2:
        raise ValueError(f"exposure_candidates: must be an integer >= 2, got {exposure_candidates!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap: must be an integer >= 0, got {n_bootstrap!r}")
    if attacks is None:
        return None
    if isinstance(attacks, str):
        attacks = [a for a in attacks.split(",")]
    names = [a.strip() for a in attacks]
    if not names or any(not a for a in names):
        raise ValueError(f"attacks: empty attack name in {list(attacks)!r}")
    return list(dict.fromkeys(names))


def _regenerate_data(run: "LoadedRun") -> "DataBundle":
    """The run's data, regenerated deterministically and checked against the manifest and audit key."""
    from privaudit.mechanisms.training import prepare_data

    data = run.data if run.data is not None else prepare_data(run.config)  # a user's file: already checked
    man = run.manifest.get("data", {})
    if man.get("train_fingerprint") not in (None, data.fingerprint):
        raise ValueError("data: the regenerated training set differs from the run's (fingerprint mismatch); "
                         "the data source changed since training")
    key = run.audit_key
    if key is None:
        raise ValueError(f"audit_key: {run.run_dir} has no audit_key.json; the auditor needs the run's secret "
                         "membership key")
    if key.get("corpus_fingerprint") not in (None, data.corpus.fingerprint()):
        raise ValueError("audit_key: corpus fingerprint differs from the regenerated corpus")
    recs = key.get("records")
    if recs is not None and sorted(recs.get("members", [])) != sorted(r.id for r in data.train):
        raise ValueError("audit_key: records.members differ from the regenerated training set")
    return data


def _plan(run: "LoadedRun", data: "DataBundle", observer: str, reference_models: int,
          wanted: list[str] | None) -> tuple[list[str], list[ViewAttack], list[str]]:
    """(built-in attacks to run, view attacks to run, notes)."""
    notes: list[str] = []
    cfg = run.config
    from privaudit.mechanisms import get_mechanism

    mech = get_mechanism(cfg.mechanism)  # importing a mechanism's module registers its view attacks
    views = registered_view_attacks(cfg.mechanism, observer)
    available: dict[str, str | None] = {}  # name -> reason it cannot run (None: it can)
    if observer == RELEASED_MODEL or getattr(mech, "AUDIT_RELEASED_MODEL", False):
        n_can = len(data.corpus.canaries)
        gc = (run.audit_key or {}).get("gradient_canaries")
        train_ids = {r.id for r in data.train}
        has_records = any(r.canary_id is None for r in data.train) and any(
            r.id not in train_ids and r.canary_id is None for r in data.corpus.records)
        no_records = "the run has no non-canary training records or no held-out records"
        available["loss"] = None if has_records else no_records
        for name in _REFERENCE_ATTACKS:
            available[name] = (no_records if not has_records else
                               None if reference_models >= 2 else "needs --reference-models >= 2")
        available["canary_membership"] = None if n_can >= 2 else "the run has fewer than 2 data canaries"
        if cfg.task != "causal_lm":
            available["canary_exposure"] = "applies to causal language models only"
        elif cfg.audit.lm_canary_design != "format":
            available["canary_exposure"] = "needs the format canaries (audit.lm_canary_design: format)"
        else:
            available["canary_exposure"] = None if n_can >= 1 else "the run has no data canaries"
        available["lm_canary_membership"] = (
            "applies to causal language models only" if cfg.task != "causal_lm"
            else None if n_can >= 2 else "the run has fewer than 2 data canaries")
        available["gradient_canaries_one_run"] = None if gc else "the run has no gradient canaries"
        from privaudit.mechanisms.training import CANARY_STEPS_FILE

        available["gradient_canaries_every_step"] = (
            None if gc and (run.run_dir / CANARY_STEPS_FILE).exists()
            else "the run kept no per-step canary record (audit.record_canary_steps)")
    else:
        for name in BUILTIN_ATTACKS:
            available[name] = f"attacks the released model; this run's observer is '{observer}'"
        if not views:
            notes.append(f"no attack is registered for the observer '{observer}' (mechanism '{cfg.mechanism}'); "
                         "register one with privaudit.attacks.views.register_view_attack")
    if wanted is None:
        builtins = [n for n, why in available.items() if why is None]
        if cfg.audit.lm_canary_design == "format":  # on request only: keeps the default audit's bounds as they were
            builtins = [n for n in builtins if n != "lm_canary_membership"]
    else:
        builtins = []
        for name in wanted:
            if name in available:
                if available[name] is not None:
                    raise ValueError(f"attacks: {name} cannot run on this run: {available[name]}")
                builtins.append(name)
            elif not views:
                known = ", ".join(BUILTIN_ATTACKS)
                raise ValueError(f"attacks: unknown attack {name!r} (built-in: {known})")
    return builtins, views, notes


def _population(data: "DataBundle", need_z: bool, max_records: int, seed: int
                ) -> tuple[list["Record"], list["Record"], list["Record"], list["Record"]]:
    """(members sample, non-members sample, population for reference models, RMIA z points).

    Members: non-canary training records; non-members: non-canary corpus records outside the training
    set (all of them, not only the evaluated held-out part). The samples are balanced, at most
    ``max_records`` each, drawn at random (``seed``). All empty when either side has no record."""
    train_ids = {r.id for r in data.train}
    members = [r for r in data.train if r.canary_id is None]
    nonmembers = [r for r in data.corpus.records if r.id not in train_ids and r.canary_id is None]
    if not members or not nonmembers:  # no record-level membership audit possible
        return [], [], [], []
    rng = np.random.default_rng(_derived_seed(seed, 0x504F50))
    nonmembers = [nonmembers[i] for i in rng.permutation(len(nonmembers))]
    z: list[Record] = []
    if need_z:
        n_z = min(max(len(nonmembers) // 5, 1), 500)
        if len(nonmembers) - n_z < 1:
            raise ValueError("data: too few non-members to hold some apart as RMIA population points")
        z, nonmembers = nonmembers[:n_z], nonmembers[n_z:]
    population = members + nonmembers
    n = min(len(members), len(nonmembers), max_records)
    m_idx = np.sort(rng.choice(len(members), n, replace=False))
    nm_idx = np.sort(rng.choice(len(nonmembers), n, replace=False))
    return [members[i] for i in m_idx], [nonmembers[i] for i in nm_idx], population, z


def _load(run_dir: str | Path, public_key: Any = None, model_path: str | Path | None = None,
          data_path: str | Path | None = None) -> "LoadedRun":
    """:func:`privaudit.runs.load_run` (which refuses pickle-based files), with an unreadable
    safetensors file reported as a ``ValueError`` naming the run directory."""
    from safetensors import SafetensorError

    from privaudit.runs import load_run

    try:
        return load_run(run_dir, public_key=public_key, model_path=model_path, data_path=data_path)
    except SafetensorError as exc:
        raise ValueError(f"run_dir: {run_dir} holds a weights file that is not valid safetensors ({exc})") from None


def score_attacks(outcomes: Sequence[AttackScores], delta: float, deltas: Sequence[float], confidence: float,
                  seed: int, n_bootstrap: int, family: TradeoffFamily | None = None
                  ) -> tuple[list[AttackResult], list[AttackScores], int, float]:
    """Metrics of every attack and, for those whose units were included by fair coins, one-run ε lower
    bounds at each δ in ``deltas``, Bonferroni-corrected over all of them (so their maximum holds at
    ``confidence``). ``family``: the accountant's trade-off family (:mod:`privaudit.audit.accounted`)
    for the ``one_run_fdp_accounted`` test, or None. Returns (results, the bounded outcomes, number of
    bounds, per-bound confidence)."""
    bounded = [o for o in outcomes if o.bound == "one_run" and o.member_scores is not None
               and o.nonmember_scores is not None and o.member_scores.size + o.nonmember_scores.size > 0]
    n_bounds = len(bounded) * _n_bound_tests(deltas, family is not None)
    per_conf = 1.0 - (1.0 - confidence) / max(n_bounds, 1)
    results: list[AttackResult] = []
    for i, o in enumerate(outcomes):
        metrics, roc, why = _metrics(o, n_bootstrap, _derived_seed(seed, i, 0x4D4554), confidence)
        note = "; ".join(x for x in (o.note, why) if x) or None
        if any(o is b for b in bounded):
            order = [delta] + [d for d in deltas if d != delta]
            by_delta, by_bound, sound = _bounds(o, order, per_conf, _derived_seed(seed, i, 0x424E44), family)
            refutable = None
            if family is not None:
                assert o.member_scores is not None and o.nonmember_scores is not None
                design = np.concatenate([np.ones(o.member_scores.size, bool), np.zeros(o.nonmember_scores.size, bool)])
                refutable = one_run_fdp_claim_refutable(design, family, per_conf)
            results.append(AttackResult(o.name, o.kind, metrics, roc, by_delta[delta], by_delta, confidence, note,
                                        power=_power(o, delta, per_conf, _derived_seed(seed, i, 0x424E44)),
                                        by_bound=by_bound, sound_bounds=sound, power_refutes_accounted=refutable))
        else:
            results.append(AttackResult(o.name, o.kind, metrics, roc, None, {}, None, note))
    return results, bounded, n_bounds, per_conf


def audit_run(
    run_dir: str | Path,
    *,
    attacks: Sequence[str] | None = None,
    reference_models: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool | Callable[[str, int, int], None] | None = None,
    max_records: int = 1000,
    exposure_candidates: int = 1000,
    n_bootstrap: int = 200,
    _write: bool = True,
    public_key: Any = None,
    model_path: str | Path | None = None,
    data_path: str | Path | None = None,
) -> AuditResult:
    """Audit the run in ``run_dir`` and write ``run_dir/audit.json`` (see the module docstring).

    ``attacks``: names to run (default: every attack that fits the run); an unknown or inapplicable
    name is a ``ValueError``. ``reference_models``: reference models to train for LiRA/RMIA (0: none).
    ``confidence``: the family-wise confidence of the reported ε lower bound. ``seed``: the auditor's
    randomness (subsampling, reference splits, tie-breaking). ``progress``: True for a rich bar on
    stderr, a callable ``(message, done, total)``, or None. ``max_records``: members (and as many
    non-members) scored by the record-level attacks. ``exposure_candidates``: candidate secrets per
    canary for exposure. A run directory holding pickle-based files is refused (``ValueError``).
    The ledger must verify against the manifest (and ``public_key``, an Ed25519 key or PEM path, when
    given): otherwise ``LedgerCorruptError`` naming the first bad line.
    ``model_path``: the base model's folder, when the run's model is neither bundled nor in the local
    HF cache (a manifest never chooses a folder itself; see :func:`privaudit.runs.load_run`).
    ``data_path``: the run's data file, for a run trained on one (``data.source`` jsonl/csv/hf; the
    manifest's path is never opened); it must match the fingerprints the run recorded, else a
    ``ValueError`` naming the fingerprint. Synthetic data needs none.
    """
    from privaudit.runs import _write_json_atomic

    wanted = _check_args(attacks, reference_models, confidence, seed, max_records, exposure_candidates,
                         n_bootstrap)
    confidence = float(confidence)
    prog = _Progress(progress)
    try:
        prog.log("loading the run")
        run = _load(run_dir, public_key, model_path, data_path)
        header = run.ledger.header
        observer = header.observer
        delta = header.target_delta if header.target_delta is not None else run.manifest.get("plan", {}).get("delta")
        if delta is None:
            raise ValueError("ledger: the header names no target_delta and the manifest no plan delta")
        delta = float(delta)
        accounted, compared, compared_by = _accounted(run.ledger, delta)
        if run.ledger.reading is not None:
            accounted["ledger"] = run.ledger.reading.integrity
            if run.ledger.reading.no_releases:
                accounted["note"] = "no releases recorded"
        has_guarantee = math.isfinite(compared)
        claims = run.ledger.claims
        data = _regenerate_data(run)
        builtins, views, notes = _plan(run, data, observer, reference_models, wanted)
        need_ref = [n for n in _REFERENCE_ATTACKS if n in builtins]
        members, nonmembers, population, z_points = _population(data, "rmia" in need_ref, max_records, seed)
        prog.set_total(len(builtins) - len(need_ref) + (reference_models if need_ref else 0) + len(views) + 1)
        settings: dict[str, Any] = {
            "attacks_requested": wanted, "reference_models": reference_models, "confidence": confidence,
            "seed": seed, "max_records": max_records, "exposure_candidates": exposure_candidates,
            "n_bootstrap": n_bootstrap,
            "_canary_inclusion": (run.config.data.synthetic.canary_inclusion
                                  if run.config.data.source == "synthetic" else None),
        }
        ctx = AuditContext(run, data, observer, tuple(members), tuple(nonmembers), seed, settings,
                           tuple(population), tuple(z_points), prog.log, prog.advance)

        outcomes: list[AttackScores] = []
        simple = {"loss": _loss_attack, "canary_membership": _canary_membership_attack,
                  "canary_exposure": _canary_exposure_attack, "gradient_canaries_one_run": _gradient_canary_attack,
                  "lm_canary_membership": _lm_canary_attack,
                  "gradient_canaries_every_step": _gradient_canary_every_step_attack}
        for name in builtins:
            if name in simple:
                outcomes.extend(simple[name](ctx))
                prog.advance()
        if need_ref:
            outcomes.extend(_reference_attacks(ctx, need_ref))
        for fn in views:
            got = list(fn(ctx))
            for a in got:
                if not isinstance(a, AttackScores):
                    raise TypeError(f"view attack {fn!r} returned {type(a).__name__}, not AttackScores")
            if wanted is not None:
                got = [a for a in got if a.name in wanted]
            outcomes.extend(got)
            prog.advance()
        if wanted is not None:
            missing = [n for n in wanted if n not in {o.name for o in outcomes}]
            if missing:
                raise ValueError(f"attacks: unknown attack {missing[0]!r} (built-in: {', '.join(BUILTIN_ATTACKS)})")

        # -- bounds (Bonferroni over every bound the verdict uses) ------------------------------
        prog.log("bounds and verdict")
        deltas = sorted({delta} | {float(c.delta) for c in claims})
        family, no_family = None, "the ledger gives no guarantee"
        if has_guarantee:
            from privaudit.audit.accounted import accounted_family

            family, no_family = accounted_family(run.ledger)
        accounted["tradeoff_test"] = (
            {"bound": "one_run_fdp_accounted", "accountant": "pld", "neighbouring": "add_remove",
             "curve": "f(α) = sup_ε max(0, 1 − δ(ε) − e^ε α, e^−ε (1 − δ(ε) − α)) from the pessimistic PLD"}
            if family is not None else {"bound": "one_run_fdp_accounted", "skipped": no_family})
        results, bounded, n_bounds, per_conf = score_attacks(outcomes, delta, deltas, confidence, seed, n_bootstrap,
                                                             family)

        with_bounds = [r for r in results if r.epsilon_lower is not None]
        top = max(with_bounds, key=lambda r: r.epsilon_lower.value) if with_bounds else None  # type: ignore[union-attr]
        top_bound = top.epsilon_lower if top is not None else None
        strongest = max(with_bounds, key=lambda r: r.power or 0.0) if with_bounds else None
        power = strongest.power if strongest is not None else None
        if top_bound is not None and top is not None:
            eps_lower: dict[str, Any] = {
                "value": top_bound.value, "confidence": confidence, "method": top_bound.method,
                "bound": bound_name(top_bound), "attack": top.name, "delta": delta, "per_bound_confidence": per_conf,
                "correction": "bonferroni", "n_bounds": n_bounds,
                "note": f"maximum over {n_bounds} bounds ({len(bounded)} attacks × ({len(deltas)} δ values for the "
                        "Steinke bound" + (" + 1 f-DP μ bound" if _n_bound_tests(deltas) > len(deltas) else "")
                        + (" + 1 accounted-curve test" if family is not None else "")
                        + f")), each at confidence 1 − {1 - confidence:g}/{n_bounds}",
                "power": power, "power_attack": strongest.name if strongest is not None else None,
                "power_note": "the largest ε_lower the audit's design could certify (perfect guesses, same "
                              "bound and confidence)",
            }
            if top_bound.assumption:
                eps_lower["assumption"] = top_bound.assumption
                if top_bound.mu is not None:
                    eps_lower["mu"] = top_bound.mu
                if top_bound.noise_scale is not None:
                    eps_lower["noise_scale"] = top_bound.noise_scale
        else:
            eps_lower = {"value": 0.0, "confidence": confidence, "method": "none", "attack": None, "delta": delta,
                         "n_bounds": 0, "power": None, "note": "no attack of this audit supports an ε lower bound "
                                                "(record-level attacks report metrics only)"}
        claimed: list[dict[str, Any]] = []
        for c in claims:
            cd = float(c.delta)
            best = max(((r.bounds[cd].value, r.name) for r in with_bounds), default=(0.0, None))
            sound = max((r.sound_bounds[cd].value for r in with_bounds if cd in r.sound_bounds), default=0.0)
            entry = {"epsilon": float(c.epsilon), "delta": cd, "source": c.source, "scope": c.scope,
                     "epsilon_lower": best[0], "attack": best[1], "epsilon_lower_assumption_free": sound,
                     "status": "refuted" if sound > float(c.epsilon) else "not refuted"}
            if best[0] > float(c.epsilon) >= sound:
                entry["note"] = ("only a bound with an assumption (the f-DP bound's Gaussian trade-off curve or the "
                                 "accounted family's noise scale) exceeds the claim; no assumption-free bound does, "
                                 "so it is not refuted")
            claimed.append(entry)
        sound_lower = max((r.sound_bounds[delta].value for r in with_bounds if delta in r.sound_bounds), default=0.0)
        refutable = [r.name for r in with_bounds if r.power_refutes_accounted]
        if top_bound is not None:
            eps_lower["assumption_free"] = sound_lower  # the largest bound that decides a violation alone
        if top_bound is not None and family is not None:
            eps_lower["power_refutes_accounted"] = bool(refutable)
        refuting = [r.name for r in with_bounds
                    if (b := r.by_bound.get("one_run_fdp_accounted")) is not None and b.refuted]
        if family is not None:
            accounted["tradeoff_test"]["refuted"] = bool(refuting)
            if refuting:
                accounted["tradeoff_test"]["refuted_by"] = refuting
        verdict, reason = _verdict(has_guarantee, compared, compared_by, delta, top_bound,
                                   _bound_label(top), claimed, len(outcomes), observer,
                                   confidence, power, strongest.name if strongest is not None else None,
                                   sound_lower=sound_lower, accounted_refuted=refuting[0] if refuting else None,
                                   accounted_power=refutable[0] if refutable else None)
        accounted, reason = _mechanism_parts(run.manifest, accounted, reason, results)
        public_settings = {k: v for k, v in settings.items() if not k.startswith("_")}
        public_settings.update({
            "n_members_scored": len(members), "n_nonmembers_scored": len(nonmembers),
            "multiple_testing": {"method": "bonferroni", "n_bounds": n_bounds, "deltas": deltas,
                                 "family_confidence": confidence, "per_bound_confidence": per_conf},
            "attacks_run": [o.name for o in outcomes], "notes": notes,
        })
        if need_ref:
            public_settings["reference_population"] = len(population)
            public_settings["rmia_population_z"] = len(z_points)
        result = AuditResult(
            run_id=str(run.manifest.get("run_id") or header.run_id), observer=observer, accounted=accounted,
            claimed=tuple(claimed), attacks=tuple(results), epsilon_lower=eps_lower, verdict=verdict,
            verdict_reason=reason, created=datetime.now(timezone.utc).isoformat(), settings=public_settings,
        )
        if _write:
            path = Path(run_dir) / AUDIT_FILE
            _write_json_atomic(path, result.to_json())
            result = replace(result, path=path)
        prog.advance()
        return result
    finally:
        prog.close()
