"""The built-in attacks on the released model: loss, LiRA / RMIA with reference models, data-canary
membership and exposure, white-box gradient canaries. Each takes an
:class:`~privaudit.attacks.interface.AuditContext` and returns
:class:`~privaudit.attacks.interface.AttackScores`; units are records (or canaries) under
add/remove neighbours, and the observer is whoever holds the released weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from numpy.typing import NDArray

from privaudit.attacks.interface import AttackScores, AuditContext, BoundMethod

if TYPE_CHECKING:
    import torch

    from privaudit.data import Record
    from privaudit.runs import LoadedRun


_REFERENCE_ATTACKS = ("lira_online", "lira_offline", "rmia")

@dataclass(frozen=True)
class _ExampleStats:
    """Per-example loss (nats; mean token NLL for LMs), logit-scaled confidence φ and p(true)."""

    loss: NDArray[np.float64]
    phi: NDArray[np.float64]
    prob: NDArray[np.float64]

def _example_stats(model: Any, tokenizer: Any, records: Sequence["Record"], cfg: Any, device: "torch.device"
                   ) -> _ExampleStats:
    import torch
    import torch.nn.functional as F

    from privaudit.attacks.membership import (
        logit_scaled_confidence_from_logits,
        logit_scaled_confidence_from_loss,
    )
    from privaudit.mechanisms.training import encode, per_sample_losses

    if not records:
        empty = np.zeros(0)
        return _ExampleStats(empty, empty, empty)
    model.eval()
    losses: list[np.ndarray] = []
    phis: list[np.ndarray] = []
    bs = cfg.training.eval_batch_size
    with torch.no_grad():
        for start in range(0, len(records), bs):
            batch = encode(tokenizer, records[start:start + bs], cfg, device)
            if cfg.task == "classification":
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = model(**inputs).logits.float()
                loss = F.cross_entropy(logits, batch["labels"], reduction="none")
                losses.append(loss.cpu().double().numpy())
                phis.append(logit_scaled_confidence_from_logits(logits.cpu().double().numpy(),
                                                                batch["labels"].cpu().numpy()))
            else:
                losses.append(per_sample_losses(model, batch, cfg.task).cpu().double().numpy())
    loss_arr = np.concatenate(losses)
    phi = np.concatenate(phis) if phis else logit_scaled_confidence_from_loss(np.maximum(loss_arr, 0.0))
    return _ExampleStats(loss_arr, phi, np.exp(-loss_arr))

def _shared_prefix_tokens(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int) -> int:
    """Leading token positions every text shares (0 where the model cannot skip their logits)."""
    import inspect

    if len(texts) < 2 or getattr(tokenizer, "padding_side", "right") != "right":
        return 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return 0
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    c = min(len(x) for x in ids)
    first = ids[0]
    for x in ids[1:]:
        c = next((i for i in range(c) if x[i] != first[i]), c)
    return c

def _sequence_nll(model: Any, tokenizer: Any, texts: Sequence[str], cfg: Any, device: "torch.device",
                  *, drop_shared_prefix: bool = False) -> NDArray[np.float64]:
    """Total next-token NLL (nats) of each text under a causal LM: the log-perplexity of the text.

    ``drop_shared_prefix``: leave out the NLL of the leading tokens all ``texts`` share (the same
    constant for every text, so ranks and exposures are unchanged) and skip computing their logits —
    the vocabulary projection over every position dominated the exposure attack's cost."""
    import torch
    import torch.nn.functional as F

    from privaudit.mechanisms.training import per_sample_losses
    from privaudit.models import encode_batch

    c = _shared_prefix_tokens(model, tokenizer, texts, cfg.model.max_length) if drop_shared_prefix else 0
    out: list[np.ndarray] = []
    bs = max(cfg.training.eval_batch_size, 64)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), bs):
            batch = encode_batch(tokenizer, list(texts[start:start + bs]), cfg.model.max_length,
                                 lm_labels=True, device=device)
            if c >= 1:
                # logits at positions c-1 .. L-1 predict the tokens after the shared prefix
                n_len = batch["input_ids"].shape[1]
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = model(**inputs, logits_to_keep=n_len - c + 1).logits[:, :-1].float()
                labels = batch["labels"][:, c:]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                                      ignore_index=-100).view(labels.shape)
                out.append(nll.sum(dim=1).cpu().double().numpy())
                continue
            mean = per_sample_losses(model, batch, "causal_lm")
            count = (batch["labels"][:, 1:] != -100).sum(dim=1).clamp(min=1)
            out.append((mean * count).cpu().double().numpy())
    return np.concatenate(out)

def _initial_model(run: "LoadedRun") -> Any:
    """The model at θ₀ (the run's initial trainable parameters): data-independent."""
    from privaudit.mechanisms import get_mechanism
    from privaudit.mechanisms.training import build_model
    from privaudit.models import load_trainable_state_dict

    num_labels = max(2, len(run.manifest.get("data", {}).get("label_names", [])))
    device = next(run.model.parameters()).device
    loader = getattr(get_mechanism(run.config.mechanism), "load_released_model", None)
    if loader is not None and run.theta_0 is not None:  # the mechanism's own model layout (e.g. a full top)
        model, _ = loader(run.config, num_labels, device, run.theta_0)
    else:
        model, _ = build_model(run.config, num_labels, device)
        if run.theta_0 is not None:
            load_trainable_state_dict(model, run.theta_0)
    model.eval()
    return model

def _loss_attack(ctx: AuditContext) -> list[AttackScores]:
    from privaudit.attacks.membership import loss_attack_scores

    run = ctx.run
    device = next(run.model.parameters()).device
    ctx.log("loss attack: scoring members and non-members")
    m = _example_stats(run.model, run.tokenizer, ctx.members, run.config, device)
    n = _example_stats(run.model, run.tokenizer, ctx.nonmembers, run.config, device)
    return [AttackScores("loss", "membership", loss_attack_scores(m.loss), loss_attack_scores(n.loss),
                         note="records are split at a fixed fraction, not by independent coins: "
                              "metrics only, no ε bound")]

def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint32)[0])

def _reference_attacks(ctx: AuditContext, wanted: Sequence[str]) -> list[AttackScores]:
    """LiRA (online, offline) and RMIA with reference models trained by the auditor."""
    from privaudit.attacks.membership import (
        lira_scores,
        reference_split_masks,
        rmia_scores,
        split_reference_confidences,
    )
    from privaudit.mechanisms import get_mechanism

    run, cfg = ctx.run, ctx.run.config
    k = int(ctx.settings["reference_models"])
    population = list(ctx.population)
    z_points = list(ctx.population_z)
    pop_index = {r.id: i for i, r in enumerate(population)}
    targets = list(ctx.members) + list(ctx.nonmembers)
    target_idx = np.array([pop_index[r.id] for r in targets])
    n_m = len(ctx.members)
    masks = reference_split_masks(len(population), k, seed=_derived_seed(ctx.seed, 0x4C495241))
    device = next(run.model.parameters()).device
    num_labels = max(2, len(run.manifest.get("data", {}).get("label_names", [])))
    mech = get_mechanism(cfg.mechanism)

    tgt = _example_stats(run.model, run.tokenizer, targets, cfg, device)
    tgt_z = _example_stats(run.model, run.tokenizer, z_points, cfg, device) if z_points else None
    ref_phi = np.empty((k, len(targets)))
    ref_prob = np.empty((k, len(targets)))
    ref_prob_z = np.empty((k, len(z_points)))
    base_seed = cfg.privacy.noise_seed if cfg.privacy.noise_seed is not None else ctx.seed
    for j in range(k):
        ctx.log(f"reference model {j + 1}/{k}: training ({int(masks[j].sum())} records)")
        cfg_j = cfg.model_copy(update={
            "audit": cfg.audit.model_copy(update={"gradient_canaries": 0}),
            "privacy": cfg.privacy.model_copy(update={"noise_seed": _derived_seed(base_seed, ctx.seed, j, 0x52454646)}),
        })
        train_j = [population[i] for i in np.flatnonzero(masks[j])]
        res = mech.fit(cfg_j, train_j, [], ledger=None, num_labels=num_labels)
        st = _example_stats(res.model, res.tokenizer, targets, cfg, device)
        ref_phi[j], ref_prob[j] = st.phi, st.prob
        if z_points:
            ref_prob_z[j] = _example_stats(res.model, res.tokenizer, z_points, cfg, device).prob
        del res
        ctx.advance()
    in_mask = masks[:, target_idx]
    ref_in, ref_out = split_reference_confidences(ref_phi, in_mask)
    out: list[AttackScores] = []
    note = "reference models trained by the auditor on random halves of the population; metrics only"
    if "lira_online" in wanted:
        s = lira_scores(tgt.phi, ref_in, ref_out, online=True)
        out.append(AttackScores("lira_online", "membership", s[:n_m], s[n_m:], note=note))
    if "lira_offline" in wanted:
        s = lira_scores(tgt.phi, None, ref_out, online=False)
        out.append(AttackScores("lira_offline", "membership", s[:n_m], s[n_m:], note=note))
    if "rmia" in wanted:
        if tgt_z is None:
            raise ValueError("reference_models: RMIA needs population points z (non-members held apart); "
                             "the run has too few non-members")
        s = rmia_scores(tgt.prob, ref_prob, tgt_z.prob, ref_prob_z, ref_in_mask=in_mask)
        out.append(AttackScores("rmia", "membership", s[:n_m], s[n_m:],
                                metrics={"n_population_z": len(z_points)}, note=note))
    return out

def _canary_records(ctx: AuditContext) -> tuple[list["Record"], NDArray[np.bool_]]:
    canaries = ctx.data.corpus.canaries
    return [c.to_record() for c in canaries], np.array([c.included for c in canaries], dtype=bool)

def _one_run_ok(ctx: AuditContext) -> tuple[BoundMethod, str | None]:
    k = int(getattr(ctx.run.config.audit, "lm_canary_repeats", 1))
    if k > 1:
        return "none", (f"each included canary is {k} records (audit.lm_canary_repeats): the audit tests group "
                        f"privacy of {k}, not the per-record ε; metrics only, no one-run bound in the verdict")
    if getattr(ctx.run.config.audit, "lm_canary_design", "format") != "format":
        return "one_run", None  # LM canaries: fair coins from the audit's seed (privaudit.data.lm_canaries)
    p = ctx.settings.get("_canary_inclusion")
    if p is not None and abs(float(p) - 0.5) > 1e-12:
        return "none", f"canaries were included with probability {p}, not 1/2: metrics only, no one-run bound"
    return "one_run", None

def _canary_membership_attack(ctx: AuditContext) -> list[AttackScores]:
    from privaudit.attacks.canaries import canary_membership_scores

    run = ctx.run
    device = next(run.model.parameters()).device
    recs, included = _canary_records(ctx)
    ctx.log(f"canary membership: {len(recs)} canaries")
    final = _example_stats(run.model, run.tokenizer, recs, run.config, device).loss
    init = _example_stats(_initial_model(run), run.tokenizer, recs, run.config, device).loss
    cs = canary_membership_scores(final, included, reference_losses=init)
    bound, note = _one_run_ok(ctx)
    return [AttackScores("canary_membership", "canary", cs.member_scores, cs.nonmember_scores, bound=bound,
                         note=note or "score = loss under θ₀ − loss under the released model")]

def secret_nll(model: Any, tokenizer: Any, canaries: Sequence[Any], cfg: Any, device: "torch.device"
               ) -> NDArray[np.float64]:
    """Total next-token NLL (nats) of each canary's **secret tokens only**, given its prefix: the
    text is tokenized exactly as in training (:func:`privaudit.models.encode_batch`) and only the
    positions :func:`privaudit.data.lm_canaries.secret_token_span` names are summed (prefix and
    suffix tokens are context, not scored)."""
    import torch
    import torch.nn.functional as F

    from privaudit.data.lm_canaries import secret_token_span
    from privaudit.models import encode_batch

    spans = [secret_token_span(tokenizer, c.prefix, c.secret, c.suffix, cfg.model.max_length) for c in canaries]
    out = np.empty(len(canaries))
    bs = cfg.training.eval_batch_size
    model.eval()
    with torch.no_grad():
        for start in range(0, len(canaries), bs):
            chunk = canaries[start:start + bs]
            batch = encode_batch(tokenizer, [c.text for c in chunk], cfg.model.max_length, lm_labels=True,
                                 device=device)
            mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
            for row, (s, e) in enumerate(spans[start:start + bs]):
                mask[row, s:e] = True
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                                  ignore_index=-100).view(labels.shape)
            out[start:start + len(chunk)] = (nll * mask[:, 1:]).sum(dim=1).cpu().double().numpy()
    return out

def _lm_canary_attack(ctx: AuditContext) -> list[AttackScores]:
    """Black-box LM canaries (Panda et al. 2025): score = secret-token NLL under θ₀ − under the
    released model (higher = more likely included)."""
    from privaudit.attacks.canaries import canary_membership_scores

    run = ctx.run
    device = next(run.model.parameters()).device
    canaries = list(ctx.data.corpus.canaries)
    included = np.array([c.included for c in canaries], dtype=bool)
    ctx.log(f"LM canaries: secret-token loss of {len(canaries)} canaries")
    final = secret_nll(run.model, run.tokenizer, canaries, run.config, device)
    init = secret_nll(_initial_model(run), run.tokenizer, canaries, run.config, device)
    cs = canary_membership_scores(final, included, reference_losses=init)
    bound, note = _one_run_ok(ctx)
    a = run.config.audit
    return [AttackScores("lm_canary_membership", "canary", cs.member_scores, cs.nonmember_scores, bound=bound,
                         metrics={"design": a.lm_canary_design, "repeats": a.lm_canary_repeats,
                                  "secret_nll_mean_included": float(final[included].mean()) if included.any() else None,
                                  "secret_nll_mean_excluded": float(final[~included].mean()) if (~included).any()
                                  else None,
                                  "scores": {c.id: float(v) for c, v in zip(canaries, cs.scores)}},
                         note=note or "score = secret-token loss under θ₀ − under the released model")]

def _canary_exposure_attack(ctx: AuditContext) -> list[AttackScores]:
    from privaudit.attacks.canaries import (
        candidate_space,
        exposure_from_log_perplexities,
    )
    from privaudit.data.corpus import CANARY_FORMATS

    run = ctx.run
    device = next(run.model.parameters()).device
    n_cand = int(ctx.settings["exposure_candidates"])
    canaries = ctx.data.corpus.canaries
    exposures = np.empty(len(canaries))
    for i, c in enumerate(canaries):
        ctx.log(f"canary exposure: canary {i + 1}/{len(canaries)}")
        pattern = CANARY_FORMATS[c.format][0] if c.format in CANARY_FORMATS else c.format
        space = candidate_space(pattern, n=n_cand, seed=_derived_seed(ctx.seed, i, 0x455850), secret=c.secret)
        texts = [f"{c.prefix}{cand}{c.suffix}" for cand in space.candidates]
        exposures[i] = exposure_from_log_perplexities(_sequence_nll(run.model, run.tokenizer, texts, run.config,
                                                                    device, drop_shared_prefix=True), space)
    included = np.array([c.included for c in canaries], dtype=bool)
    bound, note = _one_run_ok(ctx)
    extra = {
        "exposure_mean_included": float(exposures[included].mean()) if included.any() else None,
        "exposure_mean_excluded": float(exposures[~included].mean()) if (~included).any() else None,
        "exposure_max": float(exposures.max()),
        "exposures": {c.id: float(e) for c, e in zip(canaries, exposures)},
        "candidates_per_canary": n_cand,
    }
    return [AttackScores("canary_exposure", "canary", exposures[included], exposures[~included], bound=bound,
                         metrics=extra, note=note or "score = exposure (bits) of the canary's secret")]

def _gradient_canary_attack(ctx: AuditContext) -> list[AttackScores]:
    from privaudit.mechanisms.training import GradientCanaries, score_gradient_canaries
    from privaudit.models import trainable_state_dict

    run = ctx.run
    key = GradientCanaries.from_json(run.audit_key["gradient_canaries"])  # type: ignore[index]
    if run.theta_0 is None:
        raise ValueError("run_dir: the run has gradient canaries but no adapter_init.safetensors (θ₀)")
    ctx.log(f"gradient canaries: scoring {key.count} canaries")
    scores = score_gradient_canaries(run.theta_0, trainable_state_dict(run.model), key)
    inc = np.array(key.included, dtype=bool)
    note = "white-box: score = −⟨θ_final − θ₀, u_i/‖u_i‖⟩"
    bound: BoundMethod = "one_run"
    if _canary_outside_ledger(run.ledger):
        bound = "none"
        note += ("; metrics only: a canary is an added unit, and over several passes of fixed-size batches "
                 "its add/remove ε is not bounded by this replace ledger")
    return [AttackScores("gradient_canaries_one_run", "canary", scores[inc], scores[~inc], bound=bound,
                         metrics={"m": key.count, "sample_rate": key.sample_rate}, note=note)]

def _canary_outside_ledger(ledger: Any) -> bool:
    """Whether the ledger's ε may not bound a gradient canary (an added sampler unit): a replace ledger
    with fixed-size batches over more than one pass (add/remove is proved for one pass only; see
    :func:`privaudit.mechanisms.dp_lora.step_event`)."""
    from privaudit.ledger.events import GaussianEvent

    if getattr(ledger.header, "neighbouring", "add_remove") != "replace":
        return False
    fixed = [e for e in ledger.events if isinstance(e, GaussianEvent) and e.sampling == "fixed_batch"]
    slots = sum(e.count * int(e.batch_size or 0) for e in fixed)
    return bool(fixed) and slots > min(int(e.dataset_size or 0) for e in fixed)
