"""PrivTune's observer is the server: it sees the d_χ-noised token representations. Inversion (nearest
neighbour, learned, optimisation), PII recovery and attribute inference on that view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from privaudit.attacks.interface import AttackScores, AuditContext
from privaudit.attacks.views.common import (
    PRIVTUNE_BUDGET,
    _has_attribute,
    _to_scores,
    _victims,
    auxiliary_records,
)
from privaudit.mechanisms.privtune.mechanism import (
    build_split_model,
    capture_server_view,
    make_noiser,
    settings_of,
    vocabulary_geometry,
)
from privaudit.mechanisms.split_model import SplitModel, special_token_ids

if TYPE_CHECKING:
    from privaudit.data import Record

import torch

from privaudit.config import RunConfig
from privaudit.data import Record
from privaudit.mechanisms.privtune.dchi import VocabGeometry


def privtune_server_view(ctx: AuditContext) -> list[AttackScores]:
    """Inversion and attribute attacks on what a PrivTune server received (see the module docstring)."""
    from privaudit.attacks.inversion import ALL_ATTACKS, InversionSettings
    from privaudit.attacks.views import privtune as privtune_view
    from privaudit.mechanisms.privtune import mechanism as pt
    from privaudit.models import resolve_device

    cfg = ctx.run.config
    budget = PRIVTUNE_BUDGET
    confidence = float(ctx.settings.get("confidence", 0.95))
    cap = int(ctx.settings.get("max_records", 1000))
    inv_victims = _victims(ctx, min(budget.inversion_victims, cap))
    attr_victims = _victims(ctx, min(budget.attribute_victims, cap))
    aux, aux_text = auxiliary_records(ctx, budget.aux_people)
    settings = pt.settings_of(cfg)
    num_labels = max(2, len(ctx.run.manifest.get("data", {}).get("label_names", [])))
    ctx.log("privtune: the server's view (vocabulary at the split)")
    split = pt.build_split_model(cfg, settings, num_labels, resolve_device(cfg.model.device))
    inv_names = [a for a in ALL_ATTACKS if a.startswith("inversion_")]
    att_names = [a for a in ALL_ATTACKS if a.startswith("attribute_")]
    attack_settings = InversionSettings(learned_steps=budget.learned_steps, optim_steps=budget.optim_steps)
    note = (f"server's view: one release of each victim training record through the run's mechanism (mode "
            f"{settings.mode}, η = {settings.eta} {settings.eta_unit}); attacker's auxiliary data: {aux_text}")
    try:
        ctx.log(f"privtune: inversion attacks on {len(inv_victims)} records")
        results = privtune_view.attack_server_view(cfg, inv_victims, aux, which=inv_names, split=split,
                                        attack_settings=attack_settings, seed=ctx.seed, num_labels=num_labels)
        if _has_attribute(attr_victims) and _has_attribute(aux):
            ctx.log(f"privtune: attribute inference on {len(attr_victims)} records")
            results += privtune_view.attack_server_view(cfg, attr_victims, aux, which=att_names, split=split,
                                             attack_settings=attack_settings, seed=ctx.seed, num_labels=num_labels)
        else:
            results += [{"name": a, "kind": "attribute", "metrics": {},
                         "skipped": "the data has no sensitive attribute with two or more values"} for a in att_names]
    finally:
        split.remove_hooks()
    return _to_scores(results, "", note, confidence)


def bottom_info(split: SplitModel, geometry: VocabGeometry) -> Any:
    """What an attacker knows about the device side, for :func:`privaudit.attacks.inversion` attacks:
    the vocabulary's bottom representations, the word-embedding table and the differentiable bottom."""
    from privaudit.attacks.inversion import BottomInfo

    emb = split.model.get_input_embeddings().weight.detach()
    return BottomInfo(
        vocab_ids=geometry.token_ids.detach().cpu(),
        vocab_representations=geometry.representations.detach().cpu(),
        special_ids=special_token_ids(split.tokenizer),
        embedding_matrix=emb.cpu().float(),
        forward_embeds=lambda e, m: split.bottom_from_embeds(e.to(split.device, emb.dtype), m.to(split.device)).float().cpu(),
    )

def attack_server_view(cfg: RunConfig, victims: Sequence[Record], aux: Sequence[Record], *,
                       which: Sequence[str] | None = None, split: SplitModel | None = None,
                       geometry: VocabGeometry | None = None, attack_settings: Any = None, seed: int = 0,
                       num_labels: int = 2) -> list[dict[str, Any]]:
    """Run the representation attacks against what the server of a PrivTune run ``cfg`` received.

    The view depends only on the frozen bottom and the noise settings (not on the trained top), so
    no checkpoint is needed: ``victims`` (training records) are released once each through the
    configured mechanism, and the attacker applies the same public mechanism to its ``aux`` records
    (disjoint people). Returns :func:`privaudit.attacks.inversion.attack_representations` results.
    """
    from privaudit.attacks.inversion import (
        ALL_ATTACKS,
        AuxData,
        InversionSettings,
        attack_representations,
        pii_token_spans,
    )
    from privaudit.models import resolve_device

    settings = settings_of(cfg)
    own = split is None
    if split is None:
        split = build_split_model(cfg, settings, num_labels, resolve_device(cfg.model.device))
    try:
        geo = geometry.with_hops(settings.hops) if geometry is not None else vocabulary_geometry(split, cfg, settings)
        geo = geo.to(split.device)
        noiser = make_noiser(split, geo, settings)
        gen = torch.Generator(device=split.device).manual_seed(seed + 1)
        victim_view = capture_server_view(split, noiser, victims, cfg, gen)
        aux_view = capture_server_view(split, noiser, aux, cfg, gen)
        spans = [pii_token_spans(split.tokenizer, ids, r.fields) for ids, r in zip(victim_view.token_ids, victims)]
        return attack_representations(
            victim_view.representations, victim_view.token_ids,
            AuxData(aux_view.representations, aux_view.token_ids, [r.sensitive for r in aux]),
            bottom_info(split, geo), which=list(which) if which is not None else list(ALL_ATTACKS),
            sensitive=[r.sensitive for r in victims], pii_spans=spans,
            settings=attack_settings if attack_settings is not None else InversionSettings(), seed=seed)
    finally:
        if own:
            split.remove_hooks()
