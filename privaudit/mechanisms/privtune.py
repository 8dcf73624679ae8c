"""PrivTune (Liu et al., arXiv 2512.08809): split learning with optimised d_χ noise on token representations.

The model is cut before transformer block ``k`` (``options.split_layer``):

* **bottom** (device, frozen, eval mode): the embeddings and blocks 0..k−1. Its output for each token —
  the input of block k — is perturbed by :class:`privaudit.mechanisms.dchi.TokenNoiser` and sent.
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

Configuration: ``mechanism: privtune`` with the mechanism's settings under ``options``
(:class:`PrivTuneSettings`, validated here; errors name ``options.<field>``). The ``privacy`` section's
``noise_multiplier`` is not used (set it to 0); ``training`` gives steps, batch size and optimizer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from privaudit.audit.events import Event, PlaintextEvent, format_validation_error
from privaudit.config import PrivacyPlan, RunConfig, parse_options
from privaudit.data import Record
from privaudit.mechanisms.dchi import NoiseSettings, TokenNoiser, VocabGeometry, build_geometry
from privaudit.mechanisms.dp_lora import FitResult
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
    "SplitModel",
    "ServerView",
    "PrivTuneFitResult",
    "settings_of",
    "build_split_model",
    "candidate_token_ids",
    "vocabulary_representations",
    "vocabulary_geometry",
    "make_noiser",
    "capture_server_view",
    "bottom_info",
    "planned_events",
    "ledger_header_extra",
    "fit",
    "attack_server_view",
    "StudyConfig",
    "load_study",
    "run_study",
    "summarise_study",
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
class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("bottom output reached")
        self.hidden = hidden


def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int):
            return n
    raise ValueError(f"model: cannot tell the number of blocks of {type(model).__name__}")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (length = the config's number of layers)."""
    n = _num_layers(model)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return module
    raise ValueError(f"model: no list of {n} transformer blocks found in {type(model).__name__}")


def _embedding_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The modules run before block 0: the input embeddings' container if it is one (BERT's
    ``embeddings``), else every ``nn.Embedding`` beside the input embeddings (GPT-2 wte/wpe)."""
    emb = model.get_input_embeddings()
    in_blocks = {id(m) for m in blocks.modules()}
    parent: nn.Module | None = None
    for _, module in model.named_modules():
        if any(child is emb for child in module.children()):
            parent = module
            break
    if parent is not None and "embedding" in type(parent).__name__.lower():
        return [parent]
    mods: list[nn.Module] = [emb]
    if parent is not None:
        mods += [c for c in parent.children() if isinstance(c, nn.Embedding) and c is not emb
                 and id(c) not in in_blocks]
    return mods


class SplitModel:
    """A Hugging Face model cut before block ``split_layer`` (see the module docstring).

    ``mode``: ``off`` (the plain model), ``release`` (block k's input is replaced by
    ``release_fn(hidden, input_ids, attention_mask)``) or ``stop`` (the forward stops at block k and
    :meth:`bottom` returns its input).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, split_layer: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = find_blocks(model)
        if not isinstance(split_layer, int) or not 0 <= split_layer < len(self.blocks):
            raise ValueError(f"options.split_layer: must be in [0, {len(self.blocks) - 1}] for this model "
                             f"({len(self.blocks)} blocks), got {split_layer!r}")
        self.k = split_layer
        self.bottom_modules: list[nn.Module] = _embedding_modules(model, self.blocks) + list(self.blocks[:split_layer])
        self.mode: Literal["off", "release", "stop"] = "off"
        self.release_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._inputs: dict[str, Any] = {}
        self._handles = [
            model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            self.blocks[split_layer].register_forward_pre_hook(self._at_split),
        ]

    # -- hooks ----------------------------------------------------------------------------------
    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None),
                        "attention_mask": kwargs.get("attention_mask")}
        return None

    def _at_split(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.mode == "off":
            return None
        hidden = args[0]
        if self.mode == "stop":
            raise _Stop(hidden)
        ids, mask = self._inputs.get("input_ids"), self._inputs.get("attention_mask")
        if ids is None:
            raise ValueError("input_ids: the release path needs token ids (inputs_embeds are device-internal)")
        if mask is None:
            mask = torch.ones_like(ids)
        assert self.release_fn is not None
        released = self.release_fn(hidden.detach(), ids, mask)
        return (released.to(hidden.dtype),) + tuple(args[1:])

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- parameters and modes -------------------------------------------------------------------
    def bottom_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in self.bottom_modules:
            for p in m.parameters():
                seen[id(p)] = p
        return list(seen.values())

    def freeze_bottom(self) -> None:
        for p in self.bottom_parameters():
            p.requires_grad_(False)

    def train(self, flag: bool = True) -> None:
        """Top in train mode (if ``flag``), bottom always in eval mode (a fixed function on the device)."""
        self.model.train(flag)
        for m in self.bottom_modules:
            m.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))

    # -- bottom ---------------------------------------------------------------------------------
    def _run_to_split(self, **inputs: Any) -> torch.Tensor:
        previous = self.mode
        self.mode = "stop"
        try:
            self.model(**inputs)
        except _Stop as stop:
            return stop.hidden
        finally:
            self.mode = previous
        raise RuntimeError("model: the forward pass never reached the split block")

    @torch.no_grad()
    def bottom(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bottom's output (B, T, d) for a tokenized batch (no noise)."""
        was = self.model.training
        self.train(False)
        try:
            return self._run_to_split(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            self.train(was)

    def bottom_from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The bottom's output for input *word* embeddings (B, T, d_e), differentiable w.r.t. them
        (the model adds its own position/type embeddings as for token ids)."""
        was = self.model.training
        self.train(False)
        try:
            return self._run_to_split(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        finally:
            self.train(was)


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
_UNUSED = re.compile(r"^(\[unused\d+\]|<unused\d+>|<\|reserved_special_token_\d+\|>)$")


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(int(i) for i in tokenizer.all_special_ids)


def candidate_token_ids(tokenizer: Any, vocab_size: int, exclude_unused: bool = True) -> torch.Tensor:
    """Token ids an attacker (and the vocabulary graph) consider: every id below ``vocab_size`` except
    special tokens and, with ``exclude_unused``, placeholder entries like ``[unused12]``."""
    special = special_token_ids(tokenizer)
    n = min(vocab_size, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    keep = [i for i, t in enumerate(tokens) if i not in special and not (exclude_unused and t and _UNUSED.match(t))]
    return torch.tensor(keep, dtype=torch.long)


def neutral_context(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer puts around a text (e.g. [CLS] ... [SEP])."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_sp) - len(plain) + 1):
        if with_sp[start:start + len(plain)] == plain:
            return list(with_sp[:start]), list(with_sp[start + len(plain):])
    return [], []


@torch.no_grad()
def vocabulary_representations(split: SplitModel, token_ids: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Each token through the bottom in a neutral context — the tokenizer's own special tokens around
    the single token ([CLS] v [SEP] for BERT-style tokenizers) — taken at the token's position.
    For k = 0 this is the embedding output (word + position/type embeddings, norm) at that position."""
    prefix, suffix = neutral_context(split.tokenizer)
    dev = split.device
    out = []
    for s in range(0, token_ids.numel(), batch_size):
        ids = token_ids[s:s + batch_size].to(dev)
        cols = [torch.full_like(ids, p) for p in prefix] + [ids] + [torch.full_like(ids, q) for q in suffix]
        x = torch.stack(cols, dim=1)
        h = split.bottom({"input_ids": x, "attention_mask": torch.ones_like(x)})
        out.append(h[:, len(prefix)].float())
    return torch.cat(out)


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
                        generator: torch.Generator | None = None, batch_size: int = 64) -> ServerView:
    """Release ``records`` once each through the training code path and keep what crossed the wire.
    The bottom is frozen and the noise fresh per release, so this has the distribution of any one
    training-time release of those records."""
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


# ----------------------------------------------------------------------------------------------
# ledger
# ----------------------------------------------------------------------------------------------
def _label_event(cfg: RunConfig, count: int) -> PlaintextEvent:
    what = ("classification labels (the server computes the loss)" if cfg.task == "classification"
            else "next-token targets (the server computes the loss; they are the text itself)")
    return PlaintextEvent(what=what, shape=[], count=count)


def ledger_header_extra(cfg: RunConfig) -> dict[str, Any]:
    """Extra ledger-header fields for a PrivTune run (read by :func:`privaudit.audit.metric_dp.metric_dp_report`)."""
    from privaudit.audit.metric_dp import header_info

    s = settings_of(cfg)
    return {"metric_dp": header_info(
        mean_shift=s.shifted, importance_scaling=s.scaled, mode=s.mode, eta=s.eta, eta_unit=s.eta_unit,
        split_layer=s.split_layer, knn_k=s.knn_k, hops=s.hops, target_choice=s.target_choice,
        utility_weight=s.utility_weight, scale_bounds=[s.scale_min, s.scale_max], special_tokens=s.special_tokens)}


def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """Fail-closed plan: every step releases its (expected) batch at ``model.max_length`` tokens per
    record, each token at η / scale_min (scaled PrivTune), and the batch's labels."""
    from privaudit.models import load_base_model
    from privaudit.mechanisms.dchi import absolute_eta, gaussian_matched_sigma, scale_floor
    from privaudit.audit.events import DchiEvent, GaussianEvent

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
    from privaudit.audit.events import DchiEvent
    from privaudit.runs import ACCOUNTANTS, epsilon_section

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


def _seed_from(cfg: RunConfig) -> int:
    from privaudit.mechanisms.sampling import fresh_seed

    return int(cfg.privacy.noise_seed) if cfg.privacy.noise_seed is not None else fresh_seed()


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

    secret = _seed_from(cfg)
    words = np.random.SeedSequence(secret).generate_state(4, np.uint64)
    sampler = make_sampler(plan.sampling, len(train_records), sample_rate=plan.sample_rate,
                           batch_size=plan.batch_size, seed=int(words[0]) << 64 | int(words[1]))
    noise_gen = torch.Generator(device=device).manual_seed(int(words[2] >> np.uint64(1)))
    eval_gen = torch.Generator(device=device).manual_seed(int(words[3] >> np.uint64(1)))
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
        from privaudit.audit.metric_dp import metric_dp_report

        metrics["metric_dp"] = metric_dp_report(
            list(released.values()), geo.representations.cpu(),
            releases_per_record=max(1, int(counts.max())), median_nn=geo.median_nn,
            shifted_vocab_representations=(lambda s: None if s is None else s.cpu())(noiser.shifted_vocabulary()),
            data_dependent_scale=settings.scaled).to_json()
    return PrivTuneFitResult(model, tok, metrics, plan, theta_0, None, step, resumed_from,
                             split=split, noiser=noiser, geometry=geo, release_counts=counts)


# ----------------------------------------------------------------------------------------------
# auditing the server's view
# ----------------------------------------------------------------------------------------------
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
    from privaudit.attacks.inversion import ALL_ATTACKS, AuxData, InversionSettings, attack_representations
    from privaudit.attacks.inversion import pii_token_spans
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


# ----------------------------------------------------------------------------------------------
# the study: utility and attack success over a grid of modes and eta
# ----------------------------------------------------------------------------------------------
class StudyGrid(BaseModel):
    """Grid of the study: every ``mode`` × every ``eta`` (``none`` once)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    mode: list[Literal["privtune", "dchi", "gaussian", "none"]] = Field(
        default_factory=lambda: ["none", "dchi", "privtune", "gaussian"])
    eta: list[float] = Field(default_factory=lambda: [0.1, 0.05, 0.025])


class StudyAttack(BaseModel):
    """The attacker: ``aux_fraction`` of the training *people* (all their records) is set aside as the
    attacker's auxiliary data and never trained on; inversion attacks target the first ``victims``
    training records, attribute attacks the first ``attribute_victims`` (cheap: a larger sample gives
    a tighter interval against the majority baseline)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    aux_fraction: float = Field(0.25, gt=0, lt=1)
    victims: int = Field(150, ge=1)
    attribute_victims: int = Field(600, ge=1)
    which: list[str] = Field(default_factory=lambda: list(_all_attacks()))
    learned_steps: int = Field(300, ge=0)
    optim_steps: int = Field(60, ge=0)
    seed: int = 0


def _all_attacks() -> tuple[str, ...]:
    from privaudit.attacks.inversion import ALL_ATTACKS

    return ALL_ATTACKS


class StudyConfig(BaseModel):
    """``base``: a run config (``mechanism: privtune``); ``grid`` and ``attack`` as above;
    ``max_utility_drop``: the utility-drop threshold of the summary (absolute accuracy);
    ``vocabulary``: ``all`` (the model's vocabulary) or ``corpus`` (only the tokens occurring in the
    study's corpus — a faster setting for small studies and tests: the n-hop graph and the attack
    candidates are then restricted to them, which also hands the attacker a domain prior)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    base: dict[str, Any]
    vocabulary: Literal["all", "corpus"] = "all"
    grid: StudyGrid = Field(default_factory=StudyGrid)
    attack: StudyAttack = Field(default_factory=StudyAttack)
    max_utility_drop: float = Field(0.05, ge=0, le=1)


def load_study(source: Any) -> StudyConfig:
    """A :class:`StudyConfig` from a mapping, a YAML path or a StudyConfig."""
    import yaml
    from pathlib import Path

    if isinstance(source, StudyConfig):
        return source
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise ValueError(f"config: {p} does not exist")
        source = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    try:
        return StudyConfig.model_validate(source)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None


def _aux_split(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, aux): a ``fraction`` of the people (all their records) goes to aux."""
    import random

    people = sorted({r.person_id if r.person_id >= 0 else -1 - i for i, r in enumerate(records)})
    rng = random.Random(f"privaudit-aux:{seed}")
    rng.shuffle(people)
    aux_people = set(people[: max(1, round(fraction * len(people)))])
    key = [r.person_id if r.person_id >= 0 else -1 - i for i, r in enumerate(records)]
    train = [r for r, k in zip(records, key) if k not in aux_people]
    aux = [r for r, k in zip(records, key) if k in aux_people]
    return train, aux


def run_study(cfg: Any, progress: Callable[[str], None] | None = None,
              out_path: str | None = None) -> list[dict[str, Any]]:
    """Train PrivTune and its baselines over the grid and attack each server view.

    For each grid point: the top is trained on the training records (minus the attacker's people);
    utility is held-out accuracy (or perplexity) through the noisy pipeline; the attacker gets the
    released representations of ``victims`` training records (one release each) and the same public
    pipeline applied to its auxiliary records, and runs ``attack.which``. Returns one JSON-able row per
    grid point: mode, eta, utility, utility_drop (against mode ``none``; None if it is not in the
    grid), the attacks' results and, for d_χ modes, the metric-DP report. ``out_path``: also append
    each row to this JSON Lines file as soon as it is done (without ``utility_drop``).
    """
    from privaudit.attacks.inversion import InversionSettings
    from privaudit.config import parse_config
    from privaudit.mechanisms.training import prepare_data

    study = load_study(cfg)
    base = dict(study.base)
    base["mechanism"] = NAME
    base_cfg = parse_config(base)
    base_settings = settings_of(base_cfg)
    data = prepare_data(base_cfg)
    train, aux = _aux_split(data.train, study.attack.aux_fraction, study.attack.seed)
    victims = train[: study.attack.victims]
    attr_victims = train[: study.attack.attribute_victims]
    say = progress or (lambda msg: None)
    points: list[tuple[str, float]] = []
    for mode in study.grid.mode:
        if mode == "none":
            points.append(("none", base_settings.eta))
        else:
            points += [(mode, float(e)) for e in study.grid.eta]
    inv_settings = InversionSettings(learned_steps=study.attack.learned_steps, optim_steps=study.attack.optim_steps)
    rows: list[dict[str, Any]] = []
    geometry: VocabGeometry | None = None
    if study.vocabulary == "corpus":
        from privaudit.models import resolve_device

        probe = build_split_model(base_cfg, base_settings, len(data.label_names), resolve_device(base_cfg.model.device))
        tok = probe.tokenizer
        vocab_size = probe.model.get_input_embeddings().weight.shape[0]
        ids = sorted({i for r in data.corpus.records for i in tok(r.text)["input_ids"] if i < vocab_size}
                     - set(special_token_ids(tok)))
        ids_t = torch.tensor(ids, dtype=torch.long)
        geometry = build_geometry(ids_t, vocabulary_representations(probe, ids_t, base_settings.vocab_batch_size),
                                  vocab_size, knn_k=base_settings.knn_k, hops=base_settings.hops)
        probe.remove_hooks()
    for mode, eta in points:
        options = {**base_cfg.options, "mode": mode, "eta": eta}
        run_cfg = base_cfg.model_copy(update={"options": options})
        say(f"privtune study: mode={mode} eta={eta}: training")
        res = fit(run_cfg, train, data.heldout, num_labels=len(data.label_names), geometry=geometry)
        assert res.split is not None and res.noiser is not None and res.geometry is not None
        geometry = res.geometry
        say(f"privtune study: mode={mode} eta={eta}: attacks")
        inv = [w for w in study.attack.which if w.startswith("inversion_")]
        att = [w for w in study.attack.which if not w.startswith("inversion_")]
        found: dict[str, dict[str, Any]] = {}
        for names, targets in ((inv, victims), (att, attr_victims)):
            if names:
                for a in attack_server_view(run_cfg, targets, aux, which=names, split=res.split, geometry=res.geometry,
                                            attack_settings=inv_settings, seed=study.attack.seed):
                    found[a["name"]] = a
        attacks = [found[w] for w in study.attack.which]
        res.split.remove_hooks()
        rows.append({
            "mode": mode, "eta": eta if mode != "none" else None,
            "eta_unit": base_settings.eta_unit, "eta_absolute": res.metrics["eta_absolute"] if mode != "none" else None,
            "split_layer": base_settings.split_layer, "model": base_cfg.model.name,
            "utility": res.metrics["heldout"], "attacks": attacks,
            "metric_dp": res.metrics.get("metric_dp"), "events": res.metrics["events"],
            "mean_shift_norm": res.metrics["mean_shift_norm"], "min_scale": res.metrics["min_scale"],
            "vocab_median_nn_distance": res.metrics["vocab_median_nn_distance"],
            "releases_per_record": res.metrics["releases_per_record"],
            "n_train": len(train), "n_aux": len(aux), "n_victims": len(victims),
            "n_attribute_victims": len(attr_victims),
        })
        if out_path is not None:
            with open(out_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rows[-1], allow_nan=False) + "\n")
    key = "accuracy" if base_cfg.task == "classification" else "perplexity"
    clean = next((r["utility"].get(key) for r in rows if r["mode"] == "none"), None)
    for r in rows:
        val = r["utility"].get(key)
        if clean is None or val is None:
            r["utility_drop"] = None
        else:
            r["utility_drop"] = (clean - val) if key == "accuracy" else (val - clean) / clean
    return rows


def summarise_study(rows: Sequence[dict[str, Any]], max_utility_drop: float = 0.05) -> dict[str, Any]:
    """For each mode, the strongest-noise (smallest eta) grid point whose utility drop is at most
    ``max_utility_drop``, with each attack's headline number (token recovery / accuracy)."""
    def headline(a: dict[str, Any]) -> float | None:
        m = a.get("metrics", {})
        return m.get("token_recovery") if a["kind"] == "inversion" else m.get("accuracy")

    out: dict[str, Any] = {"max_utility_drop": max_utility_drop, "modes": {}}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ok = [r for r in rows if r["mode"] == mode and r.get("utility_drop") is not None
              and r["utility_drop"] <= max_utility_drop]
        if not ok:
            out["modes"][mode] = None
            continue
        best = min(ok, key=lambda r: r["eta"] if r["eta"] is not None else math.inf)
        out["modes"][mode] = {"eta": best["eta"], "utility": best["utility"], "utility_drop": best["utility_drop"],
                              "attacks": {a["name"]: headline(a) for a in best["attacks"]}}
    return out


# ----------------------------------------------------------------------------------------------
# the auditor's attacks on the server's view (registered when this module is imported)
# ----------------------------------------------------------------------------------------------
def _register_view_attacks() -> None:
    from privaudit.audit.auditor import register_view_attack
    from privaudit.audit.view_attacks import privtune_server_view

    register_view_attack(NAME, privtune_server_view)


_register_view_attacks()
