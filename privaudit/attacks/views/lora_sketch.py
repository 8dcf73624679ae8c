"""LoRA with frozen random A: the one-run audit with sketch canaries planted in the trainable factor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privaudit.mechanisms.lora_sketch.mechanism import (
    ATTACK,
    SketchCanaries,
    score_sketch_canaries,
    settings_of,
)
from privaudit.mechanisms.lora_sketch.sketch_stats import (
    lora_layers,
)


def sketch_canary_attack(ctx: Any) -> list[Any]:
    from privaudit.attacks.interface import AttackScores
    from privaudit.attacks.released_model import _canary_outside_ledger
    from privaudit.models import trainable_state_dict

    run = ctx.run
    key_json = (run.audit_key or {}).get("sketch_canaries")
    if not key_json:
        return []
    if run.theta_0 is None:
        raise ValueError("run_dir: the run has sketch canaries but no adapter_init.safetensors (θ₀)")
    key = SketchCanaries.from_json(key_json)
    secret = settings_of(run.config).a_secret
    layers = {lay.name: lay for lay in lora_layers(run.model)}
    final = trainable_state_dict(run.model)
    delta_b = []
    for name in key.layers:
        b = layers[name].b_param
        delta_b.append(final[b].double() - run.theta_0[b].double())
    ctx.log(f"sketch canaries: scoring {key.count} canaries ({'without' if secret else 'with'} A)")
    if secret:
        scores = score_sketch_canaries(delta_b, key)
        how = "A secret: score = Σ_ℓ ‖ΔB_ℓᵀ û_iℓ‖² (needs no A)"
    else:
        scores = score_sketch_canaries(delta_b, key, a=[layers[n].a for n in key.layers],
                                       scaling=[layers[n].scaling for n in key.layers])
        how = "A public: score = −⟨ΔB, s·G_i·Aᵀ⟩/‖s·G_i·Aᵀ‖"
    inc = np.array(key.included, dtype=bool)
    outside = _canary_outside_ledger(run.ledger)  # an added unit the replace ledger may not bound
    return [AttackScores(ATTACK, "canary", scores[inc], scores[~inc], bound="none" if outside else "one_run",
                         metrics={"m": key.count, "sample_rate": key.sample_rate, "a_known": not secret},
                         note=f"white-box weight-gradient canaries seen through the sketch; {how}"
                         + ("; metrics only (several fixed-batch passes under a replace ledger)" if outside else ""))]
