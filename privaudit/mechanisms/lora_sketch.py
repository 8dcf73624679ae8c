"""``lora_sketch``: LoRA with A frozen at its random init; only B (and the head, if ``lora.train_head``)
is trained — "DP by random sketching" (Malekmohammadi & Farnadi, REFERENCES.md §2).

What is trained and released (record-level, add/remove neighbours unless ``privacy.neighbouring``):

* A ~ ``lora.init_a``: ``gaussian_1_over_r`` (N(0, 1/r) i.i.d., E[AᵀA] = I) or ``peft_default`` (PEFT's
  Kaiming-uniform, E[AᵀA] = (r/(3n))·I); ``lora.freeze_a: true`` is required. A stays bitwise at its
  init. With SGD, B's gradient is s·G·Aᵀ and W moves by −η·s²·G·AᵀA (:mod:`.sketch_stats`); Adam
  rescales each coordinate, so that algebra no longer holds (the optimizer is recorded).
* ``options.a_secret: false`` (default): A is drawn from ``training.seed`` (public, like any LoRA init)
  and written to ``adapter.safetensors`` with B. ``true``: A is drawn from a secret seed
  (``options.a_seed``, tests only; by default OS entropy), kept only in ``audit_key.json`` (the
  auditor's secret) and the secret checkpoint state, never in the released adapter, which holds B
  and the head. The auditor then attacks *without* A: black-box attacks run the released B with a
  substitute A drawn from the public seed (an independent draw: what an observer without A can do),
  and the sketch canaries are scored by an A-free statistic.
* Noise: ``privacy.noise_multiplier = 0`` — ordinary mini-batch training of B (no clipping, no noise;
  ``options.clip_without_noise: true`` clips each record's gradient to C first, i.e. DP-SGD without
  noise — the per-record rescaling keeps the sketch algebra). σ > 0 (or ``target_epsilon``) — DP-SGD on
  B and the head, by :class:`~.dp_lora.DPLoraTrainer` (per-sample clipping to C, Gaussian noise σ·C).

Ledger: one ``sketch`` event (rank, batch size, steps, A's distribution, A secret or public, σ,
optimizer), appended before the first update; with noise, one ``gaussian`` event per step as in
dp_lora. The accountants give ε = ∞ ("no formal guarantee") for a noise-free sketch and the DP-SGD ε
otherwise. A guarantee someone *claims* goes in ``privacy.claims`` (the ledger header's claims).

Sketch canaries (``options.sketch_canaries`` = m > 0, one-run audits): m canaries in the full
weight-gradient space of the LoRA layers, canary i being a rank-one gradient G_iℓ = u_iℓ v_iℓᵀ per
layer ℓ (seeded Gaussian u, v; ‖G_i‖_F = ``sketch_canary_norm``, default C), each included with
probability ½; an included canary is one more unit of the run's sampler (sampled exactly as a record:
Poisson at q, or a slot of a fixed-size batch). A sampled canary contributes what a record with that
weight gradient would: s·G_iℓ·Aᵀ to B's gradient (clipped by the records' rule and C whenever records
are clipped). Scores (higher = more likely included): with A known,
−⟨ΔB, s·G_i·Aᵀ⟩/‖s·G_i·Aᵀ‖ (the direction the canary pushed B); without A, Σ_ℓ ‖ΔB_ℓᵀ û_iℓ‖² — the
energy of ΔB along the canary's output direction, which needs no A. A canary is one more unit of the
add/remove relation: the accounting is unchanged. (dp_lora's ``audit.gradient_canaries`` work here
too, but they live in B's space: crafting a B-gradient presumes knowing A, so they test an observer
who holds A whatever ``a_secret`` says. With a secret A the auditor's LiRA/RMIA reference models are
evaluated with their own A, which an observer without A cannot do: use them for a public A.)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from privaudit.audit.events import Event, SketchEvent, format_validation_error
from privaudit.config import PrivacyPlan, RunConfig, parse_options
from privaudit.data import Record
from privaudit.mechanisms.dp_lora import DPLoraTrainer, FitResult, step_event
from privaudit.mechanisms.sampling import fresh_seed
from privaudit.mechanisms.sketch_stats import (
    A_DISTRIBUTION_LABELS,
    ata_scale,
    draw_a,
    lora_layers,
    measure_layer_sketch,
    summarize_layer_stats,
)
from privaudit.mechanisms.training import (
    Checkpointer,
    ProgressFn,
    build_model,
    fit_setup,
    per_sample_losses,
)

NAME = "lora_sketch"
OBSERVER = "released model"
ATTACK = "sketch_canaries_one_run"
LINEAR_OPTIMIZERS = ("sgd",)  # updates linear in the gradients: ΔW = s²·(Σ_t c_t G_t)·AᵀA holds


# --------------------------------------------------------------------------------------------------
# settings (cfg.options)


class SketchSettings(BaseModel):
    """``options`` of a ``lora_sketch`` config (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    a_secret: bool = False
    a_seed: int | None = Field(None, description="secret A's seed; None: OS entropy. Tests only: whoever "
                               "holds the config can then rebuild A")
    sketch_canaries: int = Field(0, ge=0)
    sketch_canary_seed: int | None = Field(None, description="None: drawn from OS entropy")
    sketch_canary_norm: float | None = Field(None, gt=0, description="‖G_i‖_F; default privacy.clip_norm")
    clip_without_noise: bool = Field(False, description="noise-free runs: clip per-sample gradients to C "
                                     "(DP-SGD without noise) instead of plain mini-batch gradients")
    sketch_stats_records: int = Field(64, ge=0, description="held-out records for the sketch statistics")
    sketch_stats_draws: int = Field(200, ge=0, description="Monte Carlo draws of A per layer (0: none)")


def settings_of(cfg: RunConfig) -> SketchSettings:
    """The config's :class:`SketchSettings`; ``ValueError`` starting ``options.<field>``."""
    return parse_options(SketchSettings, cfg.options)


def check_config(cfg: RunConfig) -> SketchSettings:
    """Validate what ``lora_sketch`` needs of a config; returns its settings."""
    if cfg.mechanism != NAME:
        raise ValueError(f"mechanism: {cfg.mechanism!r} is not {NAME!r}")
    if not cfg.lora.freeze_a:
        raise ValueError("lora.freeze_a: must be true for lora_sketch (A stays at its random init)")
    return settings_of(cfg)


def expected_batch_size(plan: PrivacyPlan) -> int:
    """B (fixed batches) or round(q·N) (Poisson, at least 1)."""
    if plan.sampling == "fixed_batch" and plan.batch_size is not None:
        return int(plan.batch_size)
    return max(1, int(round(plan.sample_rate * plan.dataset_size)))


def sketch_event(cfg: RunConfig, plan: PrivacyPlan) -> SketchEvent:
    """The run's ``sketch`` event (σ = 0: no added noise)."""
    s = settings_of(cfg)
    return SketchEvent(rank=cfg.lora.rank, batch_size=expected_batch_size(plan), steps=plan.steps,
                       a_distribution=cfg.lora.init_a, a_secret=s.a_secret,
                       noise_multiplier=float(plan.noise_multiplier), optimizer=cfg.training.optimizer)


def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """What the finished run's ledger holds: the sketch event, then (with noise) the DP-SGD steps."""
    check_config(cfg)
    events: list[Event] = [sketch_event(cfg, plan)]
    if plan.private and plan.steps > 0:
        events.append(step_event(plan).with_count(plan.steps))
    return events


# --------------------------------------------------------------------------------------------------
# A


def _seed63(*parts: int) -> int:
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


def set_a(model: nn.Module, distribution: str, seed: int) -> None:
    """Overwrite every LoRA A (sorted by layer name) with a fresh draw from ``distribution`` seeded by
    ``seed`` (a secret A). B and everything else are untouched."""
    gen = torch.Generator().manual_seed(_seed63(seed, 0x41))
    with torch.no_grad():
        for lay in lora_layers(model):
            a = lay.a
            a.copy_(draw_a(distribution, lay.rank, lay.in_features, gen).to(a.device, a.dtype))


def a_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every LoRA A, by parameter name."""
    return {lay.a_param: lay.a.detach().to("cpu", copy=True) for lay in lora_layers(model)}


def expected_ata_statement(distribution: str, rank: int, fan_ins: Sequence[int]) -> dict[str, Any]:
    """E[AᵀA] for the manifest: the distribution, its formula and c per fan-in."""
    formula = "I" if distribution == "gaussian_1_over_r" else "(r/(3n))·I"
    return {"distribution": distribution, "label": A_DISTRIBUTION_LABELS[distribution],
            "expected_AtA": formula,
            "scale_by_fan_in": {str(n): ata_scale(distribution, rank, n) for n in sorted(set(fan_ins))}}


# --------------------------------------------------------------------------------------------------
# sketch canaries


@dataclass
class SketchCanaries:
    """m rank-one weight-gradient canaries over the LoRA layers ``layers`` (see the module docstring).

    ``shapes``: (out, in) per layer; ``norm``: ‖G_i‖_F over all layers; ``clip``: clip each canary's
    B-gradient to ``clip_norm`` (DP runs); ``included``: fair coins drawn from ``seed``."""

    seed: int
    count: int
    layers: list[str]
    shapes: list[list[int]]
    norm: float
    sample_rate: float
    clip: bool
    clip_norm: float
    included: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.included:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.seed), 0x534B43])))
            self.included = [bool(b) for b in rng.random(self.count) < 0.5]

    def factors(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(u_iℓ, v_iℓ) per layer (float32 CPU), scaled so that Σ_ℓ ‖u‖²‖v‖² = norm²."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for j, (m, n) in enumerate(self.shapes):
            gen = torch.Generator().manual_seed(_seed63(self.seed, i, j, 0x5543))
            out.append((torch.randn(m, generator=gen), torch.randn(n, generator=gen)))
        total = math.sqrt(sum(float(u.square().sum() * v.square().sum()) for u, v in out))
        k = self.norm / max(total, 1e-30)
        return [(u * k, v) for u, v in out]

    def b_gradients(self, i: int, a: Sequence[torch.Tensor], scaling: Sequence[float]
                    ) -> list[torch.Tensor]:
        """Canary i's gradient for each layer's B: s·u·(A v)ᵀ (out × r), clipped to C if ``clip``."""
        grads = []
        for (u, v), a_l, s in zip(self.factors(i), a, scaling):
            av = a_l.detach().to("cpu", torch.float32) @ v
            grads.append(s * torch.outer(u, av))
        if self.clip:  # the records' clipping rule
            from privaudit.mechanisms import per_sample

            nrm = torch.tensor([math.sqrt(sum(float(g.square().sum()) for g in grads))])
            c = float(per_sample.clip_factors(nrm, self.clip_norm)[0])
            grads = [g * c for g in grads]
        return grads

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "count": self.count, "layers": self.layers, "shapes": self.shapes,
                "norm": self.norm, "sample_rate": self.sample_rate, "clip": self.clip,
                "clip_norm": self.clip_norm, "included": self.included,
                "gradient": "G_il = u_il v_il^T (SketchCanaries.factors); B-gradient s*G_il*A^T"}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SketchCanaries":
        return cls(int(d["seed"]), int(d["count"]), list(d["layers"]), [list(s) for s in d["shapes"]],
                   float(d["norm"]), float(d["sample_rate"]), bool(d["clip"]), float(d["clip_norm"]),
                   [bool(b) for b in d["included"]])


def score_sketch_canaries(delta_b: Sequence[torch.Tensor], key: SketchCanaries,
                          a: Sequence[torch.Tensor] | None = None,
                          scaling: Sequence[float] | None = None) -> np.ndarray:
    """Score of each canary (higher = more likely included) from ΔB = B_final − B_0 per layer (in
    ``key.layers`` order). With ``a`` (and ``scaling``): −⟨ΔB, d_i⟩/‖d_i‖ with d_i = s·G_i·Aᵀ. Without
    A: Σ_ℓ ‖ΔB_ℓᵀ u_iℓ‖²/‖u_iℓ‖²."""
    db = [d.detach().to("cpu", torch.float64) for d in delta_b]
    scores = np.empty(key.count)
    for i in range(key.count):
        f = key.factors(i)
        if a is not None:
            s = scaling if scaling is not None else [1.0] * len(db)
            num, den = 0.0, 0.0
            for (u, v), d, a_l, s_l in zip(f, db, a, s):
                dir_l = s_l * torch.outer(u.double(), a_l.detach().cpu().double() @ v.double())
                num += float((d * dir_l).sum())
                den += float(dir_l.square().sum())
            scores[i] = -num / math.sqrt(max(den, 1e-300))
        else:
            scores[i] = sum(float((d.T @ u.double()).square().sum()) / float(u.double().square().sum())
                            for (u, _), d in zip(f, db))
    return scores


# --------------------------------------------------------------------------------------------------
# training


class SketchTrainer(DPLoraTrainer):
    """:class:`DPLoraTrainer` on a model whose A is frozen. Noise-free plans train B by ordinary
    mini-batch steps (unclipped gradient sums unless ``clip_without_noise``; no per-step ledger event —
    the run's sketch event covers them); DP plans are dp_lora's steps unchanged. Member sketch canaries
    are units of the same sampler as the records; those sampled this step are added to the gradient sum
    before noise."""

    def __init__(self, cfg: RunConfig, train_records: Sequence[Record], plan: PrivacyPlan, model: nn.Module,
                 tokenizer: Any, device: torch.device, *, ledger: Any = None, settings: SketchSettings,
                 a_seed: int | None = None, noise_factor: float = 1.0) -> None:
        secret = cfg.privacy.noise_seed if cfg.privacy.noise_seed is not None else fresh_seed()
        super().__init__(cfg, train_records, plan, model, tokenizer, device,
                         ledger=ledger if plan.private else None, noise_factor=noise_factor, secret_seed=secret)
        self.clipped = plan.private or settings.clip_without_noise
        if not self.clipped:
            self.psg.enabled = False  # plain gradients: no per-sample capture
        self.settings = settings
        self.a_seed = a_seed
        self.layers = lora_layers(model)
        missing = [lay.b_param for lay in self.layers if lay.b_param not in self.param_names]
        if missing:
            raise ValueError(f"lora: B of {missing[0]} is not trainable")
        if any(lay.a.requires_grad for lay in self.layers):
            raise ValueError("lora.freeze_a: A must be frozen for lora_sketch")
        self.sketch_canaries: SketchCanaries | None = None
        if settings.sketch_canaries > 0:
            seed = settings.sketch_canary_seed if settings.sketch_canary_seed is not None else fresh_seed() >> 65
            self.sketch_canaries = SketchCanaries(
                seed, settings.sketch_canaries, [lay.name for lay in self.layers],
                [[lay.out_features, lay.in_features] for lay in self.layers],
                settings.sketch_canary_norm or plan.clip_norm, plan.sample_rate, self.clipped, plan.clip_norm)
        self.rebuild_sampler()  # the sketch canaries join the sampler's units (no step was taken yet)
        self.last_sketch_canaries = 0

    def _plain_sum(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        total = {n: torch.zeros_like(p) for n, p in self.params}
        for batch in self.physical_batches(indices):
            per_sample_losses(self.model, batch, self.cfg.task).sum().backward()
            for n, p in self.params:
                if p.grad is not None:
                    total[n] += p.grad
            self.model.zero_grad(set_to_none=True)
        return total

    def clipped_sum(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """Σ_b clip(∇_b) (DP) or Σ_b ∇_b (noise-free) over the records ``indices``."""
        if self.clipped:
            return super().clipped_sum(indices)
        return self._plain_sum(indices), len(indices)

    def canary_units(self) -> list[tuple[str, int]]:
        units = super().canary_units()
        sk = getattr(self, "sketch_canaries", None)  # None while DPLoraTrainer.__init__ runs
        if sk is not None:
            units += [("sketch", i) for i in range(sk.count) if sk.included[i]]
        return units

    def add_canaries(self, total: dict[str, torch.Tensor], units: Sequence[tuple[str, int]]) -> int:
        """dp_lora's gradient canaries, then this step's sampled sketch canaries (clipped as records)."""
        n = super().add_canaries(total, units)
        chosen = [i for kind, i in units if kind == "sketch"]
        self.last_sketch_canaries = len(chosen)
        if self.sketch_canaries is not None and chosen:
            a = [lay.a for lay in self.layers]
            s = [lay.scaling for lay in self.layers]
            for i in chosen:
                for lay, g in zip(self.layers, self.sketch_canaries.b_gradients(i, a, s)):
                    total[lay.b_param] += g.to(total[lay.b_param].device, total[lay.b_param].dtype)
        return n

    def step(self) -> dict[str, Any]:
        info = super().step()
        info["sketch_canaries"] = self.last_sketch_canaries
        return info

    def state(self) -> dict[str, Any]:
        """dp_lora's state plus the sketch secrets (A's seed, canary key and RNG). Secret."""
        st = super().state()
        st["sketch"] = {"a_seed": None if self.a_seed is None else str(self.a_seed),
                        "canaries": None if self.sketch_canaries is None else self.sketch_canaries.to_json()}
        return st

    def load_state(self, step: int, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
                   state: dict[str, Any]) -> None:
        sk = state.get("sketch")
        if sk is None:
            raise ValueError("resume: the checkpoint has no sketch state (not a lora_sketch checkpoint)")
        super().load_state(step, weights, opt_tensors, state)
        if sk["a_seed"] is not None:
            self.a_seed = int(sk["a_seed"])
            set_a(self.model, self.cfg.lora.init_a, self.a_seed)

    def load_canary_state(self, state: dict[str, Any]) -> None:
        sk = state["sketch"]
        self.sketch_canaries = None if sk["canaries"] is None else SketchCanaries.from_json(sk["canaries"])


@dataclass
class SketchFitResult(FitResult):
    """dp_lora's result plus what the run directory releases and keeps secret: ``released_state`` (the
    adapter: B and the head, and A only when public) and ``audit_key_extra`` (merged into
    ``audit_key.json``: the sketch key with a secret A's seed, and the sketch canaries)."""

    released_state: dict[str, torch.Tensor] = field(default_factory=dict)
    audit_key_extra: dict[str, Any] = field(default_factory=dict)
    sketch_canaries: SketchCanaries | None = None


def _has_sketch_event(ledger: Any) -> bool:
    return any(isinstance(e, SketchEvent) for e in getattr(ledger, "events", []))


def _finite(x: Any) -> Any:
    """JSON without NaN/inf (the manifest is strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fit(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record], *,
        ledger: Any = None, progress: ProgressFn | None = None, num_labels: int | None = None,
        plan: PrivacyPlan | None = None, checkpointer: Checkpointer | None = None, resume: bool = False,
        ) -> SketchFitResult:
    """Train B (and the head) with A frozen; no run directory. Appends the sketch event to ``ledger``
    (if given) before the first update, and with noise one Gaussian event per step before it. With
    ``checkpointer``, checkpoints as dp_lora does (the secret A seed is in the checkpoint state)."""
    from privaudit.models import trainable_state_dict

    settings = check_config(cfg)
    plan, num_labels, device = fit_setup(cfg, train_records, heldout_records, plan, num_labels)
    model, tok = build_model(cfg, num_labels, device)
    a_seed: int | None = None
    if settings.a_secret:
        a_seed = settings.a_seed if settings.a_seed is not None else fresh_seed()
        set_a(model, cfg.lora.init_a, a_seed)
    theta_0 = trainable_state_dict(model)
    trainer = SketchTrainer(cfg, train_records, plan, model, tok, device, ledger=ledger, settings=settings,
                            a_seed=a_seed)
    try:
        theta_0 = trainer.start(resume, checkpointer, theta_0, heldout_records)
        if ledger is not None and not (resume and _has_sketch_event(ledger)):
            ledger.append(sketch_event(cfg, plan))  # write-ahead: before any update
        if not resume and checkpointer is not None:
            trainer.save(checkpointer, theta_0)
        trainer.run(checkpointer, theta_0, progress)
    finally:
        trainer.close()
    model.eval()
    metrics = trainer.final_metrics(heldout_records)
    layers = trainer.layers
    sketch: dict[str, Any] = {
        "rank": cfg.lora.rank, "a_secret": settings.a_secret, "optimizer": cfg.training.optimizer,
        "added_noise_multiplier": plan.noise_multiplier,
        "per_sample_clipping": plan.private or settings.clip_without_noise,
        "sketch_algebra_holds": cfg.training.optimizer in LINEAR_OPTIMIZERS,
        "A": expected_ata_statement(cfg.lora.init_a, cfg.lora.rank, [lay.in_features for lay in layers]),
        "lora_scaling": sorted({lay.scaling for lay in layers}),
        "head_trained": bool(cfg.lora.train_head and cfg.task == "classification"),
        "release": ("adapter.safetensors holds B and the head, not A; load_run gives the model with a "
                    "substitute A from the public seed (the auditor's view); the real A is rebuilt by "
                    "set_a(model, init_a, audit_key['sketch']['a_seed'])" if settings.a_secret else
                    "adapter.safetensors holds A and B (A public, drawn from training.seed)"),
        "note": ("SGD on B applies s²·G·AᵀA to W; the sketch noise G(AᵀA − cI) is multiplicative, "
                 "data-dependent and reuses the same A every step: no formal DP guarantee without added "
                 "noise" + ("" if cfg.training.optimizer in LINEAR_OPTIMIZERS else
                            f"; {cfg.training.optimizer} rescales coordinates, so the algebra does not hold")),
    }
    n_stats = min(settings.sketch_stats_records, len(heldout_records))
    if n_stats > 0:
        stats = measure_layer_sketch(model, tok, list(heldout_records)[:n_stats], cfg, device,
                                     mc_draws=settings.sketch_stats_draws, seed=cfg.training.seed)
        sketch["stats"] = summarize_layer_stats(stats)
        sketch["stats"]["records"] = n_stats
        sketch["stats"]["gradient"] = "mean loss over held-out records, at the trained model"
    metrics["sketch"] = _finite(sketch)
    released = trainable_state_dict(model, include_lora=not settings.a_secret)
    a_seed = trainer.a_seed  # on resume: the seed restored from the checkpoint
    key_extra: dict[str, Any] = {
        "sketch": {"a_secret": settings.a_secret, "a_distribution": cfg.lora.init_a,
                   "a_seed": None if a_seed is None else str(a_seed),
                   "a_rebuild": "privaudit.mechanisms.lora_sketch.set_a(model, a_distribution, int(a_seed))"
                   if a_seed is not None else None},
        "sketch_canaries": None if trainer.sketch_canaries is None else trainer.sketch_canaries.to_json(),
    }
    return SketchFitResult(model, tok, metrics, plan, theta_0, trainer.canaries, trainer.step_count,
                           trainer.resumed_from,
                           released_state=released, audit_key_extra=key_extra,
                           sketch_canaries=trainer.sketch_canaries)


# --------------------------------------------------------------------------------------------------
# the auditor's attack on the sketch canaries (registered for this mechanism)


def _sketch_canary_attack(ctx: Any) -> list[Any]:
    from privaudit.audit.auditor import AttackScores, _canary_outside_ledger
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


def _register() -> None:
    from privaudit.audit.auditor import register_view_attack

    register_view_attack(NAME, _sketch_canary_attack)


_register()


# --------------------------------------------------------------------------------------------------
# the rank study


class PrivacyLevel(BaseModel):
    """One added-noise level: exactly one of ``noise_multiplier`` (> 0) and ``target_epsilon``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)

    def name(self) -> str:
        return f"sigma{self.noise_multiplier:g}" if self.noise_multiplier is not None else f"eps{self.target_epsilon:g}"


class StudySpec(BaseModel):
    """The ``study:`` block of a rank-study file (``base:`` + ``study:``). The same study also runs as a
    plain ``privaudit sweep`` over rank (``examples/lora_sketch_study.yaml``, ``--set lora.rank=...``).

    Every rank × ``a_secret`` is run without added noise; each ``noise`` level is run at
    ``noise_ranks`` (default: every rank) × ``noise_a_secret``. ``scale_alpha`` keeps s = alpha/r at the
    base config's value (so E[ΔW] is the same at every rank and only the sketch noise changes).
    ``reference_models`` (LiRA/RMIA) apply to runs with a public A only: the auditor's reference models
    are evaluated with their own A, which an observer without A cannot do."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64])
    a_secret: list[bool] = Field(default_factory=lambda: [False, True])
    noise: list[PrivacyLevel] = Field(default_factory=list)
    noise_ranks: list[int] | None = None
    noise_a_secret: list[bool] = Field(default_factory=lambda: [False])
    scale_alpha: bool = True
    attacks: list[str] | None = None
    reference_models: int = Field(0, ge=0)
    audit_seed: int = 0
    max_records: int = Field(1000, ge=2)


@dataclass(frozen=True)
class StudyPoint:
    name: str
    rank: int
    a_secret: bool
    level: PrivacyLevel | None

    def sweep_point(self, base: Mapping[str, Any], scale_alpha: bool) -> Any:
        """This point as a :class:`privaudit.sweep.SweepPoint` over the run config ``base``: rank (and
        alpha, keeping s = alpha/r when ``scale_alpha``), A frozen, A secret or public, privacy level."""
        from privaudit.sweep import SweepPoint

        lora = base.get("lora") or {}
        settings: list[tuple[str, Any]] = [("mechanism", NAME), ("lora.rank", self.rank), ("lora.freeze_a", True),
                                           ("options.a_secret", self.a_secret)]
        if scale_alpha:
            settings.append(("lora.alpha", float(lora.get("alpha", 16.0)) * self.rank / int(lora.get("rank", 8))))
        if self.level is None:
            return SweepPoint(self.name, noise_multiplier=0.0, settings=tuple(settings))
        return SweepPoint(self.name, noise_multiplier=self.level.noise_multiplier,
                          target_epsilon=self.level.target_epsilon, settings=tuple(settings))


def study_points(spec: StudySpec) -> list[StudyPoint]:
    pts = [StudyPoint(f"r{r}-{'secret' if s else 'public'}", r, s, None) for r in spec.ranks for s in spec.a_secret]
    for lvl in spec.noise:
        for r in (spec.noise_ranks or spec.ranks):
            for s in spec.noise_a_secret:
                pts.append(StudyPoint(f"r{r}-{'secret' if s else 'public'}-{lvl.name()}", r, s, lvl))
    names = [p.name for p in pts]
    if len(set(names)) != len(names):
        raise ValueError("study: duplicate points (repeated ranks or noise levels)")
    if not pts:
        raise ValueError("study.ranks: no points")
    return pts


@dataclass(frozen=True)
class RankStudyResult:
    out_dir: Path
    rows: tuple[dict[str, Any], ...]
    run_dirs: tuple[Path, ...]
    table: str
    report: Path | None = None


def study_row(run_dir: Path) -> dict[str, Any]:
    """One table row from a run directory (manifest.json and audit.json)."""
    man = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    cfg = man["config"]
    priv = man.get("privacy", {})
    eps = priv.get("epsilon", {}) or {}
    row: dict[str, Any] = {
        "name": man.get("name") or run_dir.name, "rank": cfg["lora"]["rank"],
        "a_secret": bool(cfg.get("options", {}).get("a_secret", False)),
        "noise_multiplier": priv.get("noise_multiplier"),
        "accounted_epsilon": eps.get("pld") if priv.get("guarantee") != "none" else math.inf,
        "accounted_reason": priv.get("reason"),
        "claimed_epsilon": min((c["epsilon"] for c in cfg["privacy"].get("claims", [])), default=None),
        "heldout_accuracy": (man.get("metrics", {}).get("heldout") or {}).get("accuracy"),
    }
    stats = ((man.get("metrics", {}).get("sketch") or {}).get("stats") or {})
    row["sketch_relative_noise"] = stats.get("mean_relative_noise")
    row["sketch_expected_relative_noise"] = stats.get("expected_relative_noise")
    row["sketch_mc_max_abs_z"] = stats.get("monte_carlo_max_abs_z")
    audit_path = run_dir / "audit.json"
    if audit_path.exists():
        audit = json.loads(audit_path.read_text(encoding="utf-8"))
        el = audit.get("epsilon_lower") or {}
        row["epsilon_lower"] = el.get("value")
        row["epsilon_lower_attack"] = el.get("attack")
        row["verdict"] = audit.get("verdict")
        for a in audit.get("attacks", []):
            row[f"auc_{a['name']}"] = (a.get("metrics") or {}).get("auc")
            if a.get("epsilon_lower"):
                row[f"eps_lower_{a['name']}"] = a["epsilon_lower"].get("value")
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "secret" if v else "public"
    if isinstance(v, float):
        return "∞ (none)" if math.isinf(v) else f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the study rows (ε = ∞ (none): no formal guarantee)."""
    auc_cols = sorted({k for r in rows for k in r if k.startswith("auc_")})
    cols = (["name", "rank", "a_secret", "noise_multiplier", "accounted_epsilon", "claimed_epsilon",
             "heldout_accuracy"] + auc_cols + ["epsilon_lower", "epsilon_lower_attack", "verdict",
                                               "sketch_relative_noise", "sketch_expected_relative_noise"])
    head = "| " + " | ".join(c.replace("auc_", "AUC ") for c in cols) + " |"
    sep = "|" + "---|" * len(cols)
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def run_rank_study(cfg: RunConfig | Mapping[str, Any], ranks: Sequence[int], out_dir: str | Path, *,
                   spec: StudySpec | None = None, report: bool = True, quiet: bool = True,
                   log: Callable[[str], None] | None = None) -> RankStudyResult:
    """Train and audit ``cfg`` (a ``lora_sketch`` config) at each rank (× A public/secret, and the
    added-noise levels of ``spec``) as a :func:`privaudit.sweep.run_sweep` (resumable: completed runs
    and audits are skipped). Writes ``OUT/runs/<point>``, ``OUT/sweep.json``, ``OUT/study.json``,
    ``OUT/study.csv``, ``OUT/study.md``, ``OUT/rank_study.png`` (the report's rank figure) and
    (``report``) ``OUT/report.pdf``."""
    from privaudit.reports import figures as F
    from privaudit.reports.runs_table import load_run_record
    from privaudit.sweep import SweepPoint, run_sweep

    spec = spec or StudySpec()
    spec = spec.model_copy(update={"ranks": [int(r) for r in ranks]})
    if any(r < 1 for r in spec.ranks):
        raise ValueError(f"ranks: each must be >= 1, got {list(ranks)!r}")
    base = json.loads(cfg.model_dump_json()) if isinstance(cfg, RunConfig) else dict(cfg)
    study = study_points(spec)
    a_secret = {p.name: p.a_secret for p in study}

    def audit_settings(point: SweepPoint) -> dict[str, Any]:
        # reference models are evaluated with their own A: only an observer who knows A can run them
        refs = 0 if a_secret[point.name] else spec.reference_models
        attacks = spec.attacks
        if attacks is not None and refs == 0:
            attacks = [a for a in attacks if a not in ("lira_online", "lira_offline", "rmia")]
        return {"attacks": attacks, "reference_models": refs, "seed": spec.audit_seed,
                "max_records": spec.max_records}

    res = run_sweep(base, [p.sweep_point(base, spec.scale_alpha) for p in study], out_dir, report=report,
                    quiet=quiet, log=log, audit_settings=audit_settings)
    out = Path(res.out_dir)
    rows = [study_row(rd) for rd in res.run_dirs]
    table = format_table(rows)
    (out / "study.json").write_text(json.dumps({"spec": spec.model_dump(mode="json"), "rows": _finite(rows)},
                                               indent=2), encoding="utf-8")
    (out / "study.md").write_text(table + "\n", encoding="utf-8")
    cols = sorted({k for r in rows for k in r})
    with (out / "study.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()})
    F.save_png(F.attack_vs_rank([load_run_record(rd) for rd in res.run_dirs]), out / "rank_study.png")
    return RankStudyResult(out, tuple(rows), tuple(res.run_dirs), table, res.report)


def load_study(path: str | Path) -> tuple[dict[str, Any], StudySpec]:
    """Read a study file: ``base`` (a lora_sketch run config) and ``study`` (:class:`StudySpec`)."""
    import yaml

    from privaudit.config import parse_config

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"study: {p} is not a file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"study: {p} is not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or "base" not in raw:
        raise ValueError("base: the study file needs a 'base' run config and a 'study' block")
    unknown = set(raw) - {"base", "study"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (use base, study)")
    try:
        spec = StudySpec.model_validate(raw.get("study") or {})
    except ValidationError as exc:
        raise ValueError(f"study.{format_validation_error(exc)}") from None
    if not isinstance(raw["base"], dict):
        raise ValueError("base: must be a mapping (a lora_sketch run config)")
    cfg = parse_config({**raw["base"], "mechanism": NAME}, base_dir=p.parent)  # validates, resolves paths
    return json.loads(cfg.model_dump_json()), spec


def run_study_file(path: str | Path, out_dir: str | Path, *, progress: Callable[[str], None] | None = None,
                   **kwargs: Any) -> RankStudyResult:
    """:func:`run_rank_study` on a study file (``base:`` run config + ``study:`` block); a ``privaudit
    sweep`` config with a ``sweep:`` block (``examples/lora_sketch_study.yaml``) runs as that sweep and
    is summarised as the same study table. ``progress`` receives one line per stage."""
    if progress is not None:
        kwargs.setdefault("log", progress)
    if _is_sweep_file(path):
        from privaudit.sweep import load_sweep_spec, run_sweep

        base, sweep = load_sweep_spec(path)
        res = run_sweep(base, sweep.points(), out_dir, report=kwargs.get("report", True),
                        quiet=kwargs.get("quiet", True), log=kwargs.get("log"))
        rows = [study_row(rd) for rd in res.run_dirs]
        return RankStudyResult(Path(res.out_dir), tuple(rows), tuple(res.run_dirs), format_table(rows), res.report)
    base, spec = load_study(path)
    return run_rank_study(base, spec.ranks, out_dir, spec=spec, **kwargs)


def _is_sweep_file(path: str | Path) -> bool:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and "base" not in raw and "sweep" in raw


__all__ = [
    "ATTACK",
    "NAME",
    "OBSERVER",
    "PrivacyLevel",
    "RankStudyResult",
    "SketchCanaries",
    "SketchFitResult",
    "SketchSettings",
    "SketchTrainer",
    "StudySpec",
    "check_config",
    "fit",
    "load_study",
    "planned_events",
    "run_rank_study",
    "run_study_file",
    "score_sketch_canaries",
    "set_a",
    "settings_of",
    "sketch_event",
]
