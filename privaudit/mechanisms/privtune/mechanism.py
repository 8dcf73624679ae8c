"""PrivTune (Liu et al., arXiv 2512.08809): split learning with optimised d_χ noise on token representations.

The model is cut before transformer block ``k`` (``options.split_layer``):

* **bottom** (device, frozen, eval mode): the embeddings and blocks 0..k−1. Its output for each token —
  the input of block k — is perturbed by :class:`privaudit.mechanisms.privtune.dchi.TokenNoiser` and sent.
* **top** (cloud, trained): blocks k.., the final norm/pooler and the head, fine-tuned with LoRA
  (``top_training: lora``; LoRA factors inside the bottom are frozen at their identity init) or fully
  (``full``; a head tied to the input embeddings is untied first so the bottom stays frozen).

The cut is simulated in one process by a forward pre-hook on block k that replaces its input by the
released tensor: what the top computes is exactly what the cloud would compute from the wire. The
server's view is that tensor (padding zeroed) plus the attention mask; :func:`capture_server_view`
records it through the same code path as training.

The cloud computes the loss, so it also receives the **labels**: the class labels (classification)
or, for a causal LM, the next-token targets — which *are* the text. Both are written to the ledger
as ``plaintext`` releases: for a causal LM split learning of this kind protects nothing against the
server unless the targets are protected by other means. Held-out evaluation runs the same noisy
pipeline (inference also crosses the wire) but is not a training-data release and is not ledgered.

Ledger (observer ``server``): per training step, a ``dchi`` event for the batch's token releases (η per
token after importance scaling, fail-closed), written *before* the top sees them, then a
``plaintext`` event for the labels. Baseline modes write ``gaussian`` or ``plaintext`` events
instead. The ledger header's ``metric_dp`` entry (:func:`ledger_header_extra`) tells the metric-DP
report about the shift and scaling; the run's metrics give ``releases_per_record``.

Randomness (:mod:`privaudit.mechanisms.rng`): the batch sampler, the token noise and the random n-hop
targets draw from a CSPRNG (AES-256-CTR keyed from ``os.urandom``) unless ``privacy.noise_seed`` is set
(reproducible, recorded as ``noise_secure: false``); the generators' states are secret and live in
checkpoints only, and a resumed run continues the same secret streams.

Configuration: ``mechanism: privtune`` with the mechanism's settings under ``options``
(:class:`PrivTuneSettings`, validated here; errors name ``options.<field>``). The ``privacy`` section's
``noise_multiplier`` is not used (set it to 0); ``training`` gives steps, batch size and optimizer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from privaudit.config import PrivacyPlan, RunConfig, parse_options
from privaudit.data import Record
from privaudit.ledger.events import Event, PlaintextEvent
from privaudit.mechanisms import rng
from privaudit.mechanisms.dp_lora import FitResult
from privaudit.mechanisms.privtune.dchi import (
    NoiseSettings,
    TokenNoiser,
    VocabGeometry,
    build_geometry,
)
from privaudit.mechanisms.split_model import (
    SplitModel,
    _Stop,
    candidate_token_ids,
    special_token_ids,
    vocabulary_representations,
)
from privaudit.mechanisms.training import (
    Checkpointer,
    ProgressFn,
    encode,
    evaluate,
    fit_setup,
    loop_rng_state,
    make_optimizer,
    per_sample_losses,
    require_mechanism,
    restore_loop_state,
    resume_checkpoint,
    run_steps,
    save_checkpoint,
    trainable_parameters,
)

NAME = "privtune"
OBSERVER = "server"

__all__ = [
    "NAME",
    "OBSERVER",
    "PrivTuneSettings",
    "ServerView",
    "PrivTuneFitResult",
    "settings_of",
    "build_split_model",
    "vocabulary_geometry",
    "make_noiser",
    "capture_server_view",
    "planned_events",
    "ledger_header_extra",
    "fit",
]


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
class PrivTuneSettings(NoiseSettings):
    """``options`` of a ``mechanism: privtune`` config: the noise (see :class:`NoiseSettings`) plus the
    split. ``split_layer`` k: the bottom is the embeddings and blocks 0..k−1 (k = 0: embeddings only)."""

    split_layer: int = Field(2, ge=0)
    top_training: Literal["lora", "full"] = "lora"
    exclude_unused_tokens: bool = Field(True, description="leave [unusedN]-style vocabulary entries out of "
                                        "the vocabulary graph and the attack candidates")
    vocab_batch_size: int = Field(2048, ge=1)


def settings_of(cfg: RunConfig) -> PrivTuneSettings:
    """Validate ``cfg.options`` as :class:`PrivTuneSettings` (``ValueError`` naming ``options.<field>``)."""
    return parse_options(PrivTuneSettings, cfg.options)


# ----------------------------------------------------------------------------------------------
# the split model
# ----------------------------------------------------------------------------------------------


def build_split_model(cfg: RunConfig, settings: PrivTuneSettings, num_labels: int,
                      device: torch.device) -> SplitModel:
    """Base model (+ LoRA on the top when ``top_training: lora``), cut and with a frozen bottom."""
    from privaudit.models import apply_lora, load_base_model

    model, tok = load_base_model(cfg.model.name, cfg.task, num_labels=num_labels, seed=cfg.training.seed,
                                 **cfg.model.overrides)
    if settings.top_training == "lora":
        model = apply_lora(model, cfg.lora, seed=cfg.training.seed)
    else:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:
            out_emb.weight = nn.Parameter(out_emb.weight.detach().clone())
            model.config.tie_word_embeddings = False
        for p in model.parameters():
            p.requires_grad_(True)
    model = model.to(device)
    split = SplitModel(model, tok, settings.split_layer)
    split.freeze_bottom()
    if not trainable_parameters(model):
        raise ValueError("options.top_training: the top has no trainable parameters")
    return split


# ----------------------------------------------------------------------------------------------
# the vocabulary at the split point
# ----------------------------------------------------------------------------------------------


_GEOMETRY_CACHE: dict[tuple[Any, ...], VocabGeometry] = {}


def vocabulary_geometry(split: SplitModel, cfg: RunConfig, settings: PrivTuneSettings) -> VocabGeometry:
    """The vocabulary's representations, kNN graph and n-hop sets at the split (cached per process:
    the bottom is frozen, so they depend only on the model, the split and the graph settings)."""
    key = (cfg.model.name, tuple(sorted((k, repr(v)) for k, v in cfg.model.overrides.items())), cfg.training.seed,
           settings.split_layer, settings.knn_k, settings.exclude_unused_tokens, str(split.device))
    geo = _GEOMETRY_CACHE.get(key)
    if geo is None:
        vocab_size = split.model.get_input_embeddings().weight.shape[0]
        ids = candidate_token_ids(split.tokenizer, vocab_size, settings.exclude_unused_tokens)
        reps = vocabulary_representations(split, ids, settings.vocab_batch_size)
        geo = build_geometry(ids, reps, vocab_size, knn_k=settings.knn_k, hops=settings.hops)
        _GEOMETRY_CACHE[key] = geo
    return geo.with_hops(settings.hops)


def make_noiser(split: SplitModel, geometry: VocabGeometry, settings: NoiseSettings) -> TokenNoiser:
    return TokenNoiser(settings, geometry, special_token_ids(split.tokenizer), specials_public=split.k == 0)


# ----------------------------------------------------------------------------------------------
# the server's view
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerView:
    """What the server received for ``records``: per record the released (T_i, d) token
    representations (padding removed) and, for scoring only, the token ids."""

    representations: list[torch.Tensor]
    token_ids: list[torch.Tensor]
    records: list[Record]


@torch.no_grad()
def capture_server_view(split: SplitModel, noiser: TokenNoiser, records: Sequence[Record], cfg: RunConfig,
                        generator: Any = None, batch_size: int = 64) -> ServerView:
    """Release ``records`` once each through the training code path and keep what crossed the wire.
    The bottom is frozen and the noise fresh per release, so this has the distribution of any one
    training-time release of those records. ``generator``: a seeded ``torch.Generator`` (an audit's
    reproducible simulation) or a ``rng.SecureGenerator``; None: a fresh CSPRNG."""
    generator = rng.secure_or(generator)
    reps: list[torch.Tensor] = []
    ids_out: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []

    def release(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = noiser.release(hidden, ids, mask, generator).values
        captured.append(values)
        return values

    prev_mode, prev_fn = split.mode, split.release_fn
    split.mode, split.release_fn = "release", release
    was = split.model.training
    split.train(False)
    try:
        for s in range(0, len(records), batch_size):
            chunk = list(records[s:s + batch_size])
            batch = encode(split.tokenizer, chunk, cfg, split.device)
            captured.clear()
            _forward_until_top(split, batch)
            values = captured[0]
            mask = batch["attention_mask"].bool()
            for i in range(len(chunk)):
                reps.append(values[i][mask[i]].detach().cpu())
                ids_out.append(batch["input_ids"][i][mask[i]].detach().cpu())
    finally:
        split.mode, split.release_fn = prev_mode, prev_fn
        split.train(was)
    return ServerView(reps, ids_out, list(records))


def _forward_until_top(split: SplitModel, batch: dict[str, torch.Tensor]) -> None:
    """Run the bottom and the release (the top's first block is stopped right after the release)."""
    def stop_after(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise _Stop(args[0])

    # the release hook was registered first, so it runs before this one
    handle = split.blocks[split.k].register_forward_pre_hook(stop_after)
    try:
        split.model(**{k: v for k, v in batch.items() if k != "labels"})
    except _Stop:
        pass
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# ledger
# ----------------------------------------------------------------------------------------------
def _label_event(cfg: RunConfig, count: int) -> PlaintextEvent:
    what = ("classification labels (the server computes the loss)" if cfg.task == "classification"
            else "next-token targets (the server computes the loss; they are the text itself)")
    return PlaintextEvent(what=what, shape=[], count=count)


def ledger_header_extra(cfg: RunConfig) -> dict[str, Any]:
    """Extra ledger-header fields for a PrivTune run (read by :func:`privaudit.accounting.metric_dp.metric_dp_report`)."""
    from privaudit.accounting.metric_dp import header_info

    s = settings_of(cfg)
    return {"metric_dp": header_info(
        mean_shift=s.shifted, importance_scaling=s.scaled, mode=s.mode, eta=s.eta, eta_unit=s.eta_unit,
        split_layer=s.split_layer, knn_k=s.knn_k, hops=s.hops, target_choice=s.target_choice,
        utility_weight=s.utility_weight, scale_bounds=[s.scale_min, s.scale_max], special_tokens=s.special_tokens)}


def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """Fail-closed plan: every step releases its (expected) batch at ``model.max_length`` tokens per
    record, each token at η / scale_min (scaled PrivTune), and the batch's labels."""
    from privaudit.ledger.events import DchiEvent, GaussianEvent
    from privaudit.mechanisms.privtune.dchi import (
        absolute_eta,
        gaussian_matched_sigma,
        scale_floor,
    )
    from privaudit.models import load_base_model

    s = settings_of(cfg)
    if plan.steps == 0:
        return []
    model, _ = load_base_model(cfg.model.name, cfg.task, **cfg.model.overrides)
    cfgm = model.config
    dim = int(getattr(cfgm, "hidden_size", None) or getattr(cfgm, "n_embd"))
    per_step = plan.batch_size if plan.batch_size is not None else max(1, math.ceil(plan.sample_rate * plan.dataset_size))
    tokens = plan.steps * per_step * cfg.model.max_length
    events: list[Event]
    if s.mode == "none":
        events = [PlaintextEvent(what="token representations at the split point", shape=[dim], count=tokens)]
    elif s.mode == "gaussian":
        eta = absolute_eta(s.eta, s.eta_unit, dim)
        # the clip is only known with the vocabulary; record the noise level per unit clip
        events = [GaussianEvent(noise_multiplier=gaussian_matched_sigma(eta, dim), clip_norm=1.0, sensitivity=2.0,
                                sampling="full", count=tokens)]
    else:
        eta = absolute_eta(s.eta, s.eta_unit, dim)
        floor = scale_floor(s.scale_min) if s.scaled else 1.0
        events = [DchiEvent(eta=eta / floor, dimension=dim, count=tokens, shifted_mean=s.shifted)]
    return events + [_label_event(cfg, plan.steps * per_step)]


AUDIT_RELEASED_MODEL = True  # the auditor also attacks the released model (membership, canaries)


def privacy_section(ledger: Any, plan: PrivacyPlan, cfg: RunConfig, metrics: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The manifest's privacy section of a PrivTune run (hook of :mod:`privaudit.runs`).

    d_χ modes: the (ε, δ) accountants do not apply (they refuse ``dchi`` events by design), so
    ``epsilon`` is None for each and ``guarantee`` is ``"none"`` *as an (ε, δ) guarantee*; the token
    representations' metric-DP guarantee is ``metric_dp`` (the fit's report: η per unit distance, ε at
    the vocabulary's median nearest-neighbour distance, shifted/conditional caveats). The labels reach
    the server in plaintext, which no guarantee covers. Other modes (``gaussian``, ``none``): the
    accountants' section (the plaintext labels make it "no guarantee")."""
    from privaudit.accounting.summary import ACCOUNTANTS, epsilon_section
    from privaudit.ledger.events import DchiEvent

    events = list(ledger.events)
    if not any(isinstance(e, DchiEvent) for e in events):
        return epsilon_section(ledger, plan.delta)
    report = (metrics or {}).get("metric_dp")
    plain = sorted({e.what for e in events if isinstance(e, PlaintextEvent)})
    reason = ("no (ε, δ) guarantee against the server: the token representations are released with d_χ noise, "
              "a metric-DP guarantee (see metric_dp), not an (ε, δ) one")
    if plain:
        reason += "; sent in plaintext (no guarantee): " + "; ".join(plain)
    return {"epsilon": {name: None for name in ACCOUNTANTS}, "guarantee": "none", "reason": reason,
            "metric_dp": report if report is not None else {
                "guarantee": "metric_dp", "note": "the metric-DP report was not computed for this run"}}


def load_released_model(cfg: RunConfig, num_labels: int, device: torch.device,
                        state: dict[str, torch.Tensor]) -> tuple[nn.Module, Any]:
    """The released model of a PrivTune run (bottom + trained top, LoRA or full), without the split's
    hooks: it computes on clean inputs, as whoever receives the model would run it."""
    from privaudit.models import load_trainable_state_dict

    split = build_split_model(cfg, settings_of(cfg), num_labels, device)
    split.remove_hooks()
    load_trainable_state_dict(split.model, state)
    return split.model, split.tokenizer


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
@dataclass
class PrivTuneFitResult(FitResult):
    """:class:`FitResult` plus the split model, the noiser and the vocabulary geometry (for attacks)."""

    split: SplitModel | None = None
    noiser: TokenNoiser | None = None
    geometry: VocabGeometry | None = None
    release_counts: np.ndarray | None = field(default=None, repr=False)


def _generators(cfg: RunConfig, device: torch.device) -> tuple[int | None, Any, Any]:
    """(sampler seed, training-noise generator, evaluation-noise generator) of a fit.

    Default: no sampler seed and two independent ``rng.SecureGenerator`` s (CSPRNG: the batches, the
    noise and the random n-hop targets are secret draws; the ledger header says ``noise_secure:
    true``). With ``privacy.noise_seed``: seeds derived from it (SeedSequence) for PCG64 and two
    ``torch.Generator`` s — reproducible, not secure (``noise_secure: false``)."""
    if cfg.privacy.noise_seed is None:
        return None, rng.noise_generator(None), rng.noise_generator(None)
    words = np.random.SeedSequence(int(cfg.privacy.noise_seed)).generate_state(4, np.uint64)
    return (int(words[0]) << 64 | int(words[1]), rng.noise_generator(int(words[2] >> np.uint64(1)), device),
            rng.noise_generator(int(words[3] >> np.uint64(1)), device))


def fit(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record], *,
        ledger: Any = None, progress: ProgressFn | None = None, num_labels: int | None = None,
        plan: PrivacyPlan | None = None, checkpointer: Checkpointer | None = None, resume: bool = False,
        geometry: VocabGeometry | None = None) -> PrivTuneFitResult:
    """Train the top on the noisy bottom outputs of ``train_records``; utility on ``heldout_records``
    through the same noisy pipeline. Appends the step's events to ``ledger`` before the top sees the
    release. ``geometry``: a precomputed vocabulary geometry for this model and split (else computed
    and cached). Metrics: ``heldout`` (utility), ``releases_per_record`` (max over records),
    ``metric_dp`` (the report, d_χ modes), ``mean_shift_norm`` and ``min_scale`` statistics."""
    from privaudit.mechanisms.sampling import make_sampler
    from privaudit.models import trainable_state_dict

    require_mechanism(cfg, NAME)
    settings = settings_of(cfg)
    train_records = list(train_records)
    plan, num_labels, device = fit_setup(cfg, train_records, heldout_records, plan, num_labels)
    split = build_split_model(cfg, settings, num_labels, device)
    geo = geometry.with_hops(settings.hops) if geometry is not None else vocabulary_geometry(split, cfg, settings)
    geo = geo.to(device)
    noiser = make_noiser(split, geo, settings)
    model, tok = split.model, split.tokenizer
    theta_0 = trainable_state_dict(model)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = make_optimizer(params, cfg)

    sampler_seed, noise_gen, eval_gen = _generators(cfg, device)
    sampler = make_sampler(plan.sampling, len(train_records), sample_rate=plan.sample_rate,
                           batch_size=plan.batch_size, seed=sampler_seed)
    counts = np.zeros(len(train_records), dtype=np.int64)
    stats = {"shift": 0.0, "min_scale": math.inf, "tokens": 0, "batches": 0}
    released: dict[str, Event] = {}  # this process's events, merged by identity

    def record(ev: Event) -> None:
        if ledger is not None:
            ledger.append(ev)  # write-ahead: durable before the release happens
        key = json.dumps(ev.identity(), sort_keys=True)
        released[key] = ev if key not in released else released[key].with_count(released[key].count + ev.count)

    def training_release(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rel = noiser.release(hidden, ids, mask, noise_gen)
        for ev in rel.events:
            record(ev)  # before the top (the server) sees the values
        stats["shift"] += rel.mean_shift_norm
        stats["min_scale"] = min(stats["min_scale"], rel.min_scale)
        stats["tokens"] += rel.n_tokens
        stats["batches"] += 1
        return rel.values

    def eval_release(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return noiser.release(hidden, ids, mask, eval_gen).values

    step = 0
    resumed_from: int | None = None
    if resume:
        ckpt = resume_checkpoint(checkpointer)
        theta_0 = ckpt.theta_0
        restore_loop_state(model, optimizer, sampler, noise_gen, ckpt.trainable, ckpt.optimizer_tensors, ckpt.state)
        counts = np.asarray(ckpt.state["release_counts"], dtype=np.int64)
        step = resumed_from = ckpt.step

    def save(at: int) -> None:
        if checkpointer is None:
            return
        save_checkpoint(checkpointer, at, model, theta_0, optimizer, {
            **loop_rng_state(sampler, noise_gen), "release_counts": counts.tolist(), "plan": plan.to_json()})

    def one_step() -> dict[str, Any]:
        indices = sampler.next_batch()
        if not len(indices):
            return {"batch_size": 0}
        split.train(True)
        recs = [train_records[int(i)] for i in indices]
        counts[indices] += 1
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        chunk = cfg.training.physical_batch_size
        for s in range(0, len(recs), chunk):
            part = recs[s:s + chunk]
            batch = encode(tok, part, cfg, device)
            loss = per_sample_losses(model, batch, cfg.task).sum() / len(recs)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"batch_size": len(recs), "loss": total}

    metrics: dict[str, Any] = {}
    try:
        split.release_fn = training_release
        split.mode = "release"
        if not resume:
            if cfg.training.eval_before:
                split.release_fn = eval_release
                metrics["heldout_before"] = evaluate(model, tok, list(heldout_records), cfg, device)
                split.release_fn = training_release
            save(step)
        if step < plan.steps:
            # the labels of every remaining step, once, before the first of them (fail-closed count)
            per_step = plan.batch_size if plan.batch_size is not None else max(
                1, math.ceil(plan.sample_rate * plan.dataset_size))
            record(_label_event(cfg, (plan.steps - step) * per_step))
        step = run_steps(one_step, step, plan.steps, checkpointer=checkpointer, save=save, progress=progress)
        split.release_fn = eval_release
        split.train(False)
        metrics["heldout"] = evaluate(model, tok, list(heldout_records), cfg, device)
    finally:
        split.mode = "off"
        split.release_fn = None
    model.eval()
    metrics.update({
        "train_size": len(train_records), "heldout_size": len(heldout_records), "steps": step,
        "split_layer": settings.split_layer, "mode": settings.mode, "dimension": noiser.dim,
        "eta_absolute": noiser.eta, "releases_per_record": int(counts.max()) if counts.size else 0,
        "token_releases": int(stats["tokens"]), "vocab_median_nn_distance": geo.median_nn,
        "mean_shift_norm": stats["shift"] / max(stats["batches"], 1),
        "min_scale": None if not math.isfinite(stats["min_scale"]) else float(stats["min_scale"]),
    })
    metrics["events"] = [e.model_dump(mode="json") for e in released.values()]
    if settings.mode in ("privtune", "dchi") and stats["tokens"] > 0:
        from privaudit.accounting.metric_dp import metric_dp_report

        metrics["metric_dp"] = metric_dp_report(
            list(released.values()), geo.representations.cpu(),
            releases_per_record=max(1, int(counts.max())), median_nn=geo.median_nn,
            shifted_vocab_representations=(lambda s: None if s is None else s.cpu())(noiser.shifted_vocabulary()),
            data_dependent_scale=settings.scaled).to_json()
    return PrivTuneFitResult(model, tok, metrics, plan, theta_0, None, step, resumed_from,
                             split=split, noiser=noiser, geometry=geo, release_counts=counts)
