"""PAE MobiLLM's observer is the server: label inference from δ, inversion and attribute inference on
the cached activations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from privaudit.config import RunConfig
from privaudit.data import Record
from privaudit.mechanisms.pae_mobillm.mechanism import (
    _dims,
    capture_server_view,
    settings_of,
)
from privaudit.mechanisms.pae_mobillm.side_network import (
    ReleaseSpec,
    SideTunedModel,
)


def _aux_records(cfg: RunConfig, data: Any, n: int, seed: int, exclude_people: set[int]) -> list[Record]:
    """The attacker's auxiliary records (other people than the victims): for the synthetic corpus a
    fresh corpus from the same public generator with another seed; otherwise non-member records of
    people who are not victims."""
    rng = np.random.default_rng(seed)
    if cfg.data.source == "synthetic":
        from privaudit.data import generate_corpus

        syn = cfg.data.synthetic
        per = syn.records_per_person
        corpus = generate_corpus(n_people=max(1, math.ceil(n / per)), records_per_person=per, n_canaries=0,
                                 seed=syn.seed + 1_000_003 + seed)
        recs = list(corpus.records)
    else:
        train_ids = {r.id for r in data.train}
        recs = [r for r in data.corpus.records if r.id not in train_ids and r.canary_id is None
                and (r.person_id < 0 or r.person_id not in exclude_people)]
    idx = rng.permutation(len(recs))[:n]
    return [recs[i] for i in sorted(idx)]

def _pivot_bottom(backbone: nn.Module, tok: Any, spec: ReleaseSpec, n_states: int) -> Any:
    """:class:`~privaudit.attacks.inversion.BottomInfo` at the embedding output (layer 0), each
    vocabulary token in a neutral context, clipped like the release (the pipeline is public)."""
    from privaudit.attacks.inversion import BottomInfo
    from privaudit.mechanisms.split_model import (
        SplitModel,
        candidate_token_ids,
        special_token_ids,
        vocabulary_representations,
    )

    split = SplitModel(backbone, tok, 0)
    try:
        vocab_size = backbone.get_input_embeddings().weight.shape[0]
        ids = candidate_token_ids(tok, vocab_size)
        reps = vocabulary_representations(split, ids).cpu()
    finally:
        split.remove_hooks()
    if spec.clip is not None:
        bound = spec.clip / math.sqrt(n_states)
        reps = reps * torch.clamp(bound / reps.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
    return BottomInfo(vocab_ids=ids, vocab_representations=reps, special_ids=special_token_ids(tok))

def audit_server_view(ctx: Any) -> list[Any]:
    """The auditor's attacks on what a PAE MobiLLM server holds (registered for ``pae_mobillm``)."""
    from privaudit.attacks.interface import AttackScores
    from privaudit.attacks.inversion import AuxData, attack_representations
    from privaudit.attacks.label_inference import label_inference_attack

    run, cfg = ctx.run, ctx.run.config
    s = settings_of(cfg)
    model: SideTunedModel = run.model
    backbone, tok = model.backbone, run.tokenizer
    n_states, _ = _dims(backbone)
    rng = np.random.default_rng(ctx.seed)
    pool = [r for r in ctx.data.train if r.canary_id is None]
    victims = [pool[i] for i in sorted(rng.permutation(len(pool))[: s.audit_victims])]
    aux = _aux_records(cfg, ctx.data, s.audit_aux, ctx.seed, {r.person_id for r in victims if r.person_id >= 0})
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    ctx.log(f"pae_mobillm: regenerating the server's view of {len(victims)} victims and {len(aux)} aux records")
    v_view = capture_server_view(backbone, tok, cfg, victims, gen)
    a_view = capture_server_view(backbone, tok, cfg, aux, gen)
    out: list[Any] = []
    noisy_d = f"σ_δ = {s.delta_noise:g}" if s.delta_noise > 0 else "δ sent in the clear"
    lab = label_inference_attack(v_view.deltas, [r.label for r in victims])
    out.append(AttackScores("label_inference_delta", "attribute", metrics=lab["metrics"],
                            note=f"argmax of the prediction difference δ ({noisy_d})"))

    # attribute inference: a record's (S, d) pivot states, averaged over the S layers by the shared attack
    ctx.log("pae_mobillm: attribute inference on the cached activations")
    rows_v = list(v_view.activations)
    rows_a = list(a_view.activations)
    if aux and all(r.sensitive for r in aux) and all(r.sensitive for r in victims):
        for a in attack_representations(rows_v, None, AuxData(rows_a, None, [r.sensitive for r in aux]),
                                        which=("attribute_logreg", "attribute_knn"),
                                        sensitive=[r.sensitive for r in victims], seed=ctx.seed):
            out.append(AttackScores(a["name"], "attribute", metrics=a["metrics"],
                                    note="classifier trained on auxiliary people's released pivot states "
                                         "(averaged over layers)"))

    # inversion of the pivot token from its layer-0 state
    ctx.log("pae_mobillm: inversion of the cached pivot tokens")
    which = ("inversion_nn", "inversion_learned")
    special = set(int(i) for i in tok.all_special_ids)
    tokens = [int(i) for i in v_view.pivot_ids] + [int(i) for i in a_view.pivot_ids]
    if all(i < 0 or i in special for i in tokens):
        why = (f"the pivot ({model.pivot}) is pooled over tokens: no token position to invert" if tokens and tokens[0] < 0
               else f"the pivot token ({model.pivot}) is a special token for every record: nothing to recover at "
                    "token level")
        for w in which:
            out.append(AttackScores(w, "inversion", metrics={"token_recovery": None, "n_tokens": 0},
                                    note=f"skipped: {why}; attribute inference probes what the pivot states carry"))
    else:
        bottom = _pivot_bottom(backbone, tok, s.release_spec(), n_states)
        obs = [a[:1] for a in v_view.activations]
        aux_obs = [a[:1] for a in a_view.activations]
        res = attack_representations(obs, [i.view(1) for i in v_view.pivot_ids],
                                     AuxData(aux_obs, [i.view(1) for i in a_view.pivot_ids]), bottom, which=which,
                                     seed=ctx.seed)
        for a in res:
            out.append(AttackScores(a["name"], "inversion", metrics=a["metrics"],
                                    note="layer-0 state of the pivot token against the vocabulary"))
    return out
