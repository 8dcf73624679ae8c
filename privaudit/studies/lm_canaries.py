"""Study: which language-model canary design gives the tightest black-box one-run audit of a causal LM.

For every design in ``designs`` (:mod:`privaudit.data.lm_canaries`: ``format`` = the baseline,
``new_token``, ``new_token_trained`` = ``new_token`` with the new tokens' rows trained
(``audit.lm_canary_train_new_tokens``), ``rare_token``, ``bigram``) and every privacy point
(``noise_multiplier`` or ``target_epsilon``), one run of ``base`` is trained (the same records, seeds
and schedule; only the canaries differ) and audited with ``lm_canary_membership`` alone (the loss on the secret tokens,
calibrated by θ₀; fair coins). A row reports the canary AUC, ε_lower (the larger valid one-run bound
at the run's δ and the study's confidence, the bound named) and the accounted ε.

With ``audit.lm_canary_repeats`` = k > 1 each canary is k records: the auditor gives metrics only,
and the row adds the group comparison — ε_lower of the canary unit at δ_k, computed from the same
scores, against the group bound (kε, δ_k = k·e^{(k−1)ε}·δ) of
:func:`privaudit.data.lm_canaries.group_epsilon_bound`.

Study file (``privaudit study FILE -o DIR``)::

    study: lm_canaries
    base: {...a causal-LM run config, data.source synthetic...}
    designs: [format, new_token, rare_token, bigram]
    privacy: [{noise_multiplier: 0}, {target_epsilon: 8}]
    confidence: 0.95

Outputs: ``DIR/runs/<design>-<point>/`` (each run with its ``audit.json``), ``rows.jsonl`` (one row
per run, written as soon as it is done) and ``study.json`` (rows and a per-design ``summary``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["LmCanaryStudy", "PrivacyPoint", "load_study", "run_config", "run_study", "run_study_file", "summarise"]


#: The study's name for ``new_token`` with ``audit.lm_canary_train_new_tokens`` (trained rows).
TRAINED = "new_token_trained"


class PrivacyPoint(BaseModel):
    """One privacy setting: exactly one of σ (0 = non-private) and a target ε (σ calibrated)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)

    @property
    def name(self) -> str:
        if self.target_epsilon is not None:
            return f"eps{self.target_epsilon:g}"
        return "nonprivate" if not self.noise_multiplier else f"sigma{self.noise_multiplier:g}"


class LmCanaryStudy(BaseModel):
    """The study file (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    study: Literal["lm_canaries"] = "lm_canaries"
    base: dict[str, Any]
    designs: list[Literal["format", "new_token", "new_token_trained", "rare_token", "bigram"]] = Field(
        default_factory=lambda: ["format", "new_token", "rare_token", "bigram"], min_length=1, max_length=5)
    privacy: list[PrivacyPoint] = Field(
        default_factory=lambda: [PrivacyPoint(noise_multiplier=0.0), PrivacyPoint(target_epsilon=8.0)],
        min_length=1, max_length=8)
    confidence: float = Field(0.95, gt=0, lt=1)
    audit_seed: int = Field(0, ge=0)


def load_study(raw: dict[str, Any]) -> LmCanaryStudy:
    """Validate a study mapping; ``ValueError`` naming the field. Every run config is checked too."""
    from privaudit.config import parse_config

    try:
        study = LmCanaryStudy.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    for point in study.privacy:
        if (point.noise_multiplier is None) == (point.target_epsilon is None):
            raise ValueError("privacy: each point needs exactly one of noise_multiplier and target_epsilon")
    for design in study.designs:
        for point in study.privacy:
            parse_config(run_config(study, design, point))
    return study


def run_config(study: LmCanaryStudy, design: str, point: PrivacyPoint) -> dict[str, Any]:
    """The run config of one (design, privacy point): the base with the design's audit fields and the point."""
    cfg = copy.deepcopy(study.base)
    audit = cfg.setdefault("audit", {})
    audit["lm_canary_design"] = "new_token" if design == TRAINED else design
    audit["lm_canary_train_new_tokens"] = design == TRAINED
    priv = cfg.setdefault("privacy", {})
    priv.pop("noise_multiplier", None)
    priv.pop("target_epsilon", None)
    if point.target_epsilon is not None:
        priv["target_epsilon"] = point.target_epsilon
    else:
        priv["noise_multiplier"] = point.noise_multiplier
    return cfg


def _group_row(attack: Any, run_dir: Path, k: int, accounted: float, delta: float, confidence: float, seed: int
               ) -> dict[str, Any]:
    """ε_lower of a k-record canary unit at δ_k against the group bound kε (see the module docstring)."""
    import numpy as np

    from privaudit.audit.bounds import one_run_bounds_best
    from privaudit.data.lm_canaries import group_epsilon_bound

    eps_k, delta_k = group_epsilon_bound(accounted, delta, k)
    row: dict[str, Any] = {"group_k": k, "group_epsilon": eps_k if math.isfinite(eps_k) else None,
                           "group_delta": delta_k}
    by_id = attack.metrics.get("scores") or {}
    key = json.loads((run_dir / "audit_key.json").read_text(encoding="utf-8"))
    members = set(key.get("member_canaries", []))
    ids = sorted(by_id)
    scores = np.array([by_id[i] for i in ids], dtype=float)
    inc = np.array([i in members for i in ids], dtype=bool)
    if delta_k >= 1.0 or inc.all() or not inc.any():
        row["group_epsilon_lower"] = None
        return row
    best = one_run_bounds_best(scores, inc, [delta_k], confidence, bounds=("one_run",), seed=seed)["one_run"][delta_k]
    row["group_epsilon_lower"] = best.value
    row["group_bound"] = "one_run_steinke (assumption-free)"
    row["group_violation"] = bool(best.value > eps_k)  # never with no guarantee (eps_k = inf)
    return row


def _check_format_canaries_fit(cfg: Any) -> None:
    """The corpus' format canaries keep their secret within ``model.max_length`` (else ``ValueError``
    before any training; the other designs are checked when they are built)."""
    from privaudit.data.lm_canaries import secret_token_span
    from privaudit.mechanisms.training import prepare_data
    from privaudit.models import load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    for c in prepare_data(cfg).corpus.canaries:
        secret_token_span(tok, c.prefix, c.secret, c.suffix, cfg.model.max_length)


def run_study(study: LmCanaryStudy, out_dir: str | Path, progress: Callable[[str], None] | None = None
              ) -> list[dict[str, Any]]:
    """Train and audit every (design, point); return the rows (also appended to ``rows.jsonl``)."""
    import time

    from privaudit.audit.auditor import audit_run, bound_name
    from privaudit.config import parse_config
    from privaudit.runs import train

    say = progress or (lambda msg: None)
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for design in study.designs:
        for point in study.privacy:
            cfg = parse_config(run_config(study, design, point))
            rd = out / "runs" / f"{design}-{point.name}"
            if design == "format":
                _check_format_canaries_fit(cfg)
            say(f"{design}, {point.name}: training")
            t0 = time.process_time()
            train(cfg, rd, progress=False)
            t1 = time.process_time()
            say(f"{design}, {point.name}: auditing")
            res = audit_run(rd, attacks=["lm_canary_membership"], confidence=study.confidence,
                            seed=study.audit_seed, n_bootstrap=200)
            t2 = time.process_time()
            att = res.attack("lm_canary_membership")
            el = att.epsilon_lower
            accounted = dict(res.accounted)
            delta = float(cfg.privacy.delta)
            eps = (accounted.get("compared") or {}).get("epsilon")
            eps = math.inf if eps is None and accounted.get("guarantee") == "none" else eps
            m = att.metrics
            row: dict[str, Any] = {
                "design": design, "point": point.name, "noise_multiplier": point.noise_multiplier,
                "target_epsilon": point.target_epsilon,
                "accounted_epsilon": None if eps is None or not math.isfinite(eps) else eps, "delta": delta,
                "repeats": cfg.audit.lm_canary_repeats,
                "n_canaries": int(m.get("n_members", 0)) + int(m.get("n_nonmembers", 0)),
                "auc": m.get("auc"), "auc_ci": m.get("auc_ci"), "tpr_at_1pct_fpr": m.get("tpr_at_1%_fpr"),
                "epsilon_lower": None if el is None else el.value,
                "bound": None if el is None else bound_name(el),
                "ratio": None if el is None or not eps or not math.isfinite(eps) else el.value / eps,
                "verdict": res.verdict, "cpu_s_train": t1 - t0, "cpu_s_audit": t2 - t1,
                "secret_nll_mean_included": m.get("secret_nll_mean_included"),
                "secret_nll_mean_excluded": m.get("secret_nll_mean_excluded"),
            }
            if cfg.audit.lm_canary_repeats > 1:
                row.update(_group_row(att, rd, cfg.audit.lm_canary_repeats,
                                      eps if eps is not None else math.inf, delta, study.confidence,
                                      study.audit_seed))
            rows.append(row)
            with open(out / "rows.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, allow_nan=False, default=str) + "\n")
            say(f"{design}, {point.name}: AUC {row['auc']}, ε_lower {row['epsilon_lower']} (accounted {eps})")
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{design: {point: {auc, epsilon_lower, bound, accounted_epsilon, ratio}}}`` (group rows add
    ``group_epsilon_lower`` and ``group_epsilon``)."""
    keys = ("auc", "epsilon_lower", "bound", "accounted_epsilon", "ratio", "group_epsilon_lower", "group_epsilon")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["design"], {})[r["point"]] = {k: r[k] for k in keys if k in r}
    return out


def run_study_file(path: str | Path, out_dir: str | Path, progress: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """``privaudit study`` entry: read ``path``, run, write ``study.json`` into ``out_dir``."""
    from privaudit.studies import _read

    raw = _read(path)
    study = load_study(raw)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    rows = run_study(study, out, progress)
    result = {"study": "lm_canaries", "config": study.model_dump(mode="json"), "rows": rows,
              "summary": summarise(rows)}
    (out / "study.json").write_text(json.dumps(result, indent=1, allow_nan=False, default=str), encoding="utf-8")
    return {**result, "out_dir": str(out)}
