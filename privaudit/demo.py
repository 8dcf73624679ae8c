"""``privaudit demo``: the whole pipeline on bundled data.

Generates the synthetic PII corpus, sweeps DP-SGD on LoRA adapters of the bundled MiniLM encoder
over three privacy levels plus a non-private baseline, audits each run (loss-threshold membership,
canary membership, and white-box one-run audits with gradient canaries, from the final weights and
from every step's noisy update), and renders the PDF.
Then the language-model part (:mod:`privaudit.demo_lm`, in ``OUT/lm``): SmolLM2-135M fine-tuned
without noise and at ε = 8, audited with causal-LM attacks. ``quick`` is a smaller version for CI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privaudit.config import merge_config
from privaudit.sweep import SweepResult, make_points, run_sweep

#: Target ε of the private points (σ calibrated with PLD at δ = 1e-5), plus σ = 0 (non-private).
DEMO_TARGET_EPSILONS: tuple[float, ...] = (1.0, 4.0, 16.0)

DEMO_CONFIG: dict[str, Any] = {
    "mechanism": "dp_lora",
    "task": "classification",
    # 64 tokens keep the sentiment cue of ~99% of the records (many records end with it)
    "model": {"name": "all-MiniLM-L6-v2", "max_length": 64},
    "lora": {
        "rank": 2,
        "alpha": 4,
        "target_modules": ["encoder.layer.4.attention.self.value", "encoder.layer.5.attention.self.value"],
        "train_head": True,
    },
    "data": {
        "source": "synthetic",
        "synthetic": {"n_people": 400, "records_per_person": 3, "n_canaries": 64, "canary_inclusion": 0.5,
                      "seed": 0},
        "heldout_fraction": 0.3,
        "max_heldout": 400,  # ~360 held-out records: an accuracy's standard error is <= 0.027
    },
    "training": {
        "sampling": "poisson",
        "batch_size": 64,
        "epochs": 3,
        "physical_batch_size": 64,
        # Adam at 0.05: with ~40 noisy steps SGD (any lr 0.5-2) and Adam at <= 0.01 often stay at a
        # constant prediction; measured: accuracy rises clearly from ε = 1 to ε = 16 to non-private
        "optimizer": "adam",
        "learning_rate": 0.05,
        "checkpoint_every": 20,
        "seed": 0,
    },
    "privacy": {"target_epsilon": 4.0, "delta": 1e-5, "clip_norm": 1.0, "accountant": "pld"},
    # record_canary_steps: the white-box auditor also sees every step (gradient_canaries_every_step)
    "audit": {"gradient_canaries": 2000, "record_canary_steps": True},
}

QUICK_OVERRIDES: dict[str, Any] = {
    "model": {"max_length": 48},  # keeps the cue of ~75% of the records; 1.4x cheaper than 64
    "data": {"synthetic": {"n_people": 300, "n_canaries": 32}, "heldout_fraction": 0.4, "max_heldout": 400},
    "training": {"epochs": 4},  # 35 steps: with 3 epochs (27 steps) ε = 16 sometimes stayed near chance
    "audit": {"gradient_canaries": 1000},
}


def demo_config(quick: bool = False, noise_seed: int | None = None) -> dict[str, Any]:
    """The demo's run config (``quick``: the CI version). ``noise_seed`` seeds the DP noise, the
    sampling and the gradient canaries (which ride in the same batches) for a reproducible demo; None
    keeps OS entropy for all three."""
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    if quick:
        merge_config(cfg, QUICK_OVERRIDES)
    if noise_seed is not None:
        cfg["privacy"]["noise_seed"] = int(noise_seed)
        cfg["audit"]["gradient_canary_seed"] = int(noise_seed)
    return cfg


def run_demo(out_dir: str | Path, *, quick: bool = False, quiet: bool = False, log=None,
             noise_seed: int | None = None, lm: bool = False) -> SweepResult:
    """Run the demo into ``out_dir`` (resumable: completed points are kept). ``noise_seed``: see
    :func:`demo_config`. ``lm``: also the language-model part into ``out_dir/lm`` (needs SmolLM2: a
    ``ValueError`` naming the install commands, before anything runs, when it is missing)."""
    out = Path(out_dir)
    if lm:
        from privaudit.models import SMOLLM2, model_status, smollm2_gguf_path

        if next(r for r in model_status() if r["name"] == SMOLLM2)["ready"] != "yes":
            smollm2_gguf_path()  # not converted yet: fail before the first part runs if it cannot be
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(quick, noise_seed)
    (out / "demo_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    points = make_points(noise_multipliers=[0.0], target_epsilons=DEMO_TARGET_EPSILONS)
    res = run_sweep(cfg, points, out, audit=True, quiet=quiet, log=log)
    if lm:
        from privaudit.demo_lm import format_lm_summary, run_lm_demo

        summary = run_lm_demo(out / "lm", quick=quick, quiet=quiet, log=log, noise_seed=noise_seed)
        if log is not None:
            log(format_lm_summary(summary))
    return res
