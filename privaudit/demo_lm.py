"""The demo's language-model part: SmolLM2-135M fine-tuned with DP-LoRA on PII records with canaries.

Two runs of the same config (:data:`LM_DEMO_CONFIG`, causal-LM loss on each record's text; canaries
are records whose text holds a secret, each included with probability ½): without noise (σ = 0,
clipped, no guarantee) and at ε = 8 (σ calibrated with PLD, δ = 1e-5, record level, add/remove,
observer = whoever sees the released adapter). Both go through :func:`privaudit.sweep.run_sweep`
(ledger, accounting, the auditor's loss / canary-membership / canary-exposure attacks, a PDF report
in ``OUT/lm``), then through :data:`LM_ATTACK_STEP`, the causal-LM attacks with the base model as
reference, whose summary lands in ``OUT/lm/lm_summary.json``.

The headline is the contrast: the non-private run memorises (reference-calibrated membership AUC
well above chance, included canaries' secrets ranked first among their candidates, some extracted
verbatim by greedy decoding), the ε = 8 run does not (AUC near ½, exposure near chance), with
held-out perplexity beside both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from privaudit.config import merge_config
from privaudit.sweep import SweepResult, make_points, run_sweep

#: ε of the private point (σ calibrated with PLD at δ = 1e-5); the other point is σ = 0.
LM_TARGET_EPSILON = 8.0

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: SmolLM2-135M has 30 blocks; LoRA goes on every projection of the last ones only, so the backward
#: pass stops there (a CPU step costs about forward + 2·backward·(share of blocks adapted)).
LM_ADAPTED_BLOCKS = range(20, 30)


def block_targets(blocks: Sequence[int], projections: Sequence[str] = LLAMA_PROJECTIONS) -> list[str]:
    """PEFT target names for ``projections`` of the Llama blocks ``blocks`` (full module paths)."""
    return [f"model.layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{p}"
            for i in blocks for p in projections]


LM_DEMO_CONFIG: dict[str, Any] = {
    "mechanism": "dp_lora",
    "task": "causal_lm",
    "model": {"name": "smollm2-135m", "max_length": 48},
    "lora": {"rank": 8, "alpha": 16, "target_modules": block_targets(LM_ADAPTED_BLOCKS)},
    "data": {
        "source": "synthetic",
        "synthetic": {"n_people": 60, "records_per_person": 3, "n_canaries": 16, "canary_inclusion": 0.5,
                      "seed": 0},
        "heldout_fraction": 0.5,
        "max_heldout": 100,
    },
    "training": {
        "sampling": "poisson",
        "batch_size": 16,
        "epochs": 8,
        "physical_batch_size": 16,
        "optimizer": "adam",
        "learning_rate": 0.003,
        "eval_batch_size": 32,
        "eval_before": True,  # the base model's held-out perplexity, beside the fine-tuned ones
        "checkpoint_every": 20,
        "seed": 0,
    },
    "privacy": {"target_epsilon": LM_TARGET_EPSILON, "delta": 1e-5, "clip_norm": 1.0, "accountant": "pld"},
    "audit": {"gradient_canaries": 0},
}

LM_QUICK_OVERRIDES: dict[str, Any] = {
    "data": {"synthetic": {"n_people": 40, "n_canaries": 12}},
    "training": {"batch_size": 8, "physical_batch_size": 8, "epochs": 6},
}

#: candidate secrets per canary for exposure (the auditor's ``exposure_candidates``)
LM_EXPOSURE_CANDIDATES = {False: 100, True: 50}


def lm_demo_config(quick: bool = False, noise_seed: int | None = None) -> dict[str, Any]:
    """The LM part's run config (``quick``: the CI version); ``noise_seed`` as in :func:`demo_config`."""
    cfg = json.loads(json.dumps(LM_DEMO_CONFIG))
    if quick:
        merge_config(cfg, LM_QUICK_OVERRIDES)
    if noise_seed is not None:
        cfg["privacy"]["noise_seed"] = int(noise_seed)
    return cfg


# --------------------------------------------------------------------------------------------------
# The attack step. TO BE REPLACED by privaudit.attacks.llm_scores (issue "audit any checkpoint"):
# a minimal, self-contained scoring pass kept here so that the demo runs before that module lands.
# Swap LM_ATTACK_STEP for a function with the same signature: (run_dir, log) -> JSON-able dict.


def lm_attacks(run_dir: Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Membership scores of the run's non-canary training records vs non-members (higher = member):
    ``loss`` (−mean NLL), ``min_k`` (Min-20% log-prob), ``zlib`` (−total NLL / zlib bytes of the text),
    ``reference`` (base-model NLL − fine-tuned NLL, the base model = θ₀, LoRA B = 0); each with AUC,
    TPR at 1% FPR and bootstrap CIs. ``extraction``: greedy decoding from each canary's prefix; a
    canary is extracted when its secret appears verbatim. Record-level, members vs non-members split
    at a fixed fraction (not by fair coins): metrics, no ε bound."""
    import torch

    from privaudit.attacks.llm_scores import llm_scores
    from privaudit.attacks.metrics import membership_metrics
    from privaudit.attacks.released_model import _initial_model
    from privaudit.audit.auditor import _population, _regenerate_data
    from privaudit.runs import load_run

    say = log or (lambda msg: None)
    run = load_run(run_dir)
    cfg = run.config
    data = _regenerate_data(run)
    members, nonmembers, _, _ = _population(data, False, 1000, 0)
    texts = [r.text for r in members] + [r.text for r in nonmembers]
    n_m = len(members)
    bs, length = cfg.training.eval_batch_size, cfg.model.max_length
    say(f"LM attacks: scoring {len(texts)} records under the fine-tuned and the base model (one pass each)")
    base_model = _initial_model(run)
    raw = llm_scores(run.model, run.tokenizer, texts, batch_size=bs, reference=base_model,
                     attacks=("loss", "min_k", "zlib", "ref"), max_length=length)
    scores = {"loss": raw["loss"], "min_k": raw["min_k"], "zlib": raw["zlib"], "reference": raw["ref"]}
    attacks: dict[str, Any] = {}
    for name, s in scores.items():
        m = membership_metrics(s[:n_m], s[n_m:], n_bootstrap=200, seed=0)
        attacks[name] = {k: m[k] for k in ("auc", "auc_ci", "tpr_at_1%_fpr", "tpr_at_1%_fpr_ci", "n_members",
                                          "n_nonmembers")}
    say(f"LM attacks: greedy extraction of {len(data.corpus.canaries)} canaries")
    extraction = []
    run.model.eval()
    device = next(run.model.parameters()).device
    for c in data.corpus.canaries:
        enc = run.tokenizer([c.prefix], return_tensors="pt").to(device)
        n_secret = len(run.tokenizer(c.secret)["input_ids"])
        with torch.no_grad():
            out = run.model.generate(**enc, max_new_tokens=n_secret + 2, do_sample=False,
                                     pad_token_id=run.tokenizer.pad_token_id)
        completion = run.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        extraction.append({"id": c.id, "included": c.included, "extracted": c.secret in completion})
    inc = [e for e in extraction if e["included"]]
    exc = [e for e in extraction if not e["included"]]
    return {
        "attacks": attacks,
        "extraction": {"included_extracted": sum(e["extracted"] for e in inc), "included": len(inc),
                       "excluded_extracted": sum(e["extracted"] for e in exc), "excluded": len(exc),
                       "canaries": extraction},
        "note": "scores from privaudit.attacks.llm_scores (one batched pass per model; reference = the base model)",
    }


#: The swappable attack step: (run_dir, log) -> JSON-able dict with "attacks" and "extraction".
LM_ATTACK_STEP: Callable[[Path, Callable[[str], None] | None], dict[str, Any]] = lm_attacks


# --------------------------------------------------------------------------------------------------


def _audit_attack(audit: dict[str, Any], name: str) -> dict[str, Any] | None:
    for a in audit.get("attacks", []):
        if a.get("name") == name:
            return a
    return None


def summarise_point(run_dir: Path, point: dict[str, Any], lm: dict[str, Any]) -> dict[str, Any]:
    """One row of ``lm_summary.json``: ε, perplexity, the LM attacks, exposure and extraction."""
    import math

    from privaudit.data.corpus import secret_space_size

    audit = json.loads((run_dir / "audit.json").read_text(encoding="utf-8"))
    exp = _audit_attack(audit, "canary_exposure") or {}
    metrics = exp.get("metrics") or {}
    key = json.loads((run_dir / "audit_key.json").read_text(encoding="utf-8"))
    # exposure as a fraction of its maximum log₂|R| (the secret ranked first among all candidates)
    frac = {c["id"]: float(metrics.get("exposures", {}).get(c["id"], 0.0)) / math.log2(secret_space_size(c["format"]))
            for c in key.get("canaries", [])}
    inc = [frac[c["id"]] for c in key.get("canaries", []) if c["included"]]
    exc = [frac[c["id"]] for c in key.get("canaries", []) if not c["included"]]
    util = point.get("utility") or {}
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    return {
        "name": point["name"],
        "epsilon": (point.get("epsilon") or {}).get("pld"),
        "noise_multiplier": point.get("noise_multiplier"),
        "perplexity": util.get("perplexity"),
        "perplexity_before": ((manifest.get("metrics") or {}).get("heldout_before") or {}).get("perplexity"),
        "attacks": lm["attacks"],
        "exposure": {**{k: metrics.get(k) for k in ("exposure_mean_included", "exposure_mean_excluded",
                                                    "exposure_max", "candidates_per_canary")},
                     "fraction_of_max_included": inc, "fraction_of_max_excluded": exc,
                     "included_near_max": sum(f >= 0.9 for f in inc), "excluded_near_max": sum(f >= 0.9 for f in exc)},
        "exposure_auc": metrics.get("auc"),
        "canary_membership_auc": ((_audit_attack(audit, "canary_membership") or {}).get("metrics") or {}).get("auc"),
        "epsilon_lower": (audit.get("epsilon_lower") or {}).get("value"),
        "extraction": {k: v for k, v in lm["extraction"].items() if k != "canaries"},
        "verdict": point.get("verdict"),
    }


def run_lm_demo(out_dir: str | Path, *, quick: bool = False, quiet: bool = False,
                log: Callable[[str], None] | None = None, noise_seed: int | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the LM part into ``out_dir`` (resumable) and return the summary (also ``lm_summary.json``).
    ``overrides``: merged into the config (e.g. a smaller model for tests)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = lm_demo_config(quick, noise_seed)
    if overrides:
        merge_config(cfg, json.loads(json.dumps(overrides)))
    (out / "demo_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    points = make_points(noise_multipliers=[0.0], target_epsilons=[LM_TARGET_EPSILON])
    n_cand = LM_EXPOSURE_CANDIDATES[quick]
    res: SweepResult = run_sweep(cfg, points, out, audit=True, quiet=quiet, log=log,
                                 audit_settings=lambda p: {"exposure_candidates": n_cand, "max_records": 1000})
    rows = []
    for rd, point in zip(res.run_dirs, res.points):
        cached = rd / "lm_attacks.json"
        if cached.exists():
            lm = json.loads(cached.read_text(encoding="utf-8"))
        else:
            lm = LM_ATTACK_STEP(rd, log)
            cached.write_text(json.dumps(lm, indent=1), encoding="utf-8")
        rows.append(summarise_point(rd, point, lm))
    summary = {"model": cfg["model"]["name"], "quick": quick, "points": rows,
               "report": str(res.report) if res.report else None}
    (out / "lm_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def format_lm_summary(summary: dict[str, Any]) -> str:
    """A few lines of text: per point ε, perplexity, reference AUC (CI), TPR@1%, exposure, extraction."""
    lines = [f"LM part ({summary['model']}):"]
    for p in summary["points"]:
        eps = "∞ (no noise)" if p["epsilon"] is None else f"{p['epsilon']:.2f}"
        ref = p["attacks"]["reference"]
        ex, exp = p["extraction"], p["exposure"]
        ppl = "-" if p["perplexity"] is None else f"{p['perplexity']:.2f}"
        lines.append(
            f"  ε {eps}: perplexity {ppl}; reference-calibrated AUC {ref['auc']:.3f} "
            f"[{ref['auc_ci'][0]:.3f}, {ref['auc_ci'][1]:.3f}], TPR@1%FPR {ref['tpr_at_1%_fpr']:.3f}; "
            f"loss AUC {p['attacks']['loss']['auc']:.3f}; exposure included/excluded "
            f"{exp['exposure_mean_included'] or 0:.2f}/{exp['exposure_mean_excluded'] or 0:.2f} bits "
            f"(near max: {exp['included_near_max']}/{len(exp['fraction_of_max_included'])} included, "
            f"{exp['excluded_near_max']}/{len(exp['fraction_of_max_excluded'])} excluded); extracted {ex['included_extracted']}/{ex['included']} included, "
            f"{ex['excluded_extracted']}/{ex['excluded']} excluded")
    return "\n".join(lines)
