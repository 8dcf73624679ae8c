"""``lora_sketch``: LoRA with A frozen at its random init; only B (and the head, if ``lora.train_head``)
is trained — "DP by random sketching" (Malekmohammadi & Farnadi, REFERENCES.md §2).

What is trained and released (record-level, add/remove neighbours unless ``privacy.neighbouring``):

* A ~ ``lora.init_a``: ``gaussian_1_over_r`` (N(0, 1/r) i.i.d., E[AᵀA] = I) or ``peft_default`` (PEFT's
  Kaiming-uniform, E[AᵀA] = (r/(3n))·I); ``lora.freeze_a: true`` is required. A stays bitwise at its
  init. With SGD, B's gradient is s·G·Aᵀ and W moves by −η·s²·G·AᵀA (:mod:`.sketch_stats`); Adam
  rescales each coordinate, so that algebra no longer holds (the optimizer is recorded).
* ``options.a_secret: false`` (default): A is drawn from ``training.seed`` (public, like any LoRA init)
  and written to ``adapter.safetensors`` with B. ``true``: A is drawn from a CSPRNG (AES-256-CTR,
  :func:`set_a`) keyed by a secret seed (by default 256 bits of OS entropy; ``options.a_seed``, tests
  only, makes it reproducible and not secret), kept only in ``audit_key.json`` (the
  auditor's secret) and the secret checkpoint state, never in the released adapter, which holds B
  and the head. The auditor then attacks *without* A: black-box attacks run the released B with a
  substitute A drawn from the public seed (an independent draw: what an observer without A can do),
  and the sketch canaries are scored by an A-free statistic.
* Randomness: the secret A, the DP noise and the batch sampling come from :mod:`privaudit.mechanisms.rng`'s
  CSPRNG unless ``privacy.noise_seed`` is set (seeded: reproducible, ``noise_secure: false`` in the
  ledger header); the audit's canary coins and directions are drawn from their own seeds (audit keys).
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

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from privaudit.config import PrivacyPlan, RunConfig, parse_options
from privaudit.data import Record
from privaudit.ledger.events import Event, SketchEvent
from privaudit.mechanisms import rng
from privaudit.mechanisms.dp_lora import DPLoraTrainer, FitResult, step_event
from privaudit.mechanisms.lora_sketch.sketch_stats import (
    A_DISTRIBUTION_LABELS,
    ata_scale,
    draw_a,
    lora_layers,
    measure_layer_sketch,
    summarize_layer_stats,
)
from privaudit.mechanisms.sampling import fresh_seed
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


def ledger_header_extra(cfg: RunConfig) -> dict[str, Any]:
    """Ledger-header field (runs hook) ``sketch_a``: whether A is secret and where it came from — the
    header's ``noise_secure`` speaks of the noise and the sampling, this of A."""
    s = settings_of(cfg)
    if not s.a_secret:
        source = "public: drawn from training.seed, released with B"
    elif s.a_seed is not None:
        source = "options.a_seed: reproducible by whoever holds the config, NOT secret"
    else:
        source = (f"csprng: AES-256-CTR keyed from a {A_SEED_BITS}-bit os-entropy seed held by the audit key "
                  "and checkpoints only")
    return {"sketch_a": {"secret": s.a_secret and s.a_seed is None, "distribution": cfg.lora.init_a,
                         "source": source}}


# --------------------------------------------------------------------------------------------------
# A


def _seed63(*parts: int) -> int:
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


A_SEED_BITS = 256  # a secret A's seed: the AES-256 key of its CSPRNG stream is derived from it


def fresh_a_seed() -> int:
    """A secret A's seed: 256 bits from the operating system's CSPRNG (:mod:`secrets`)."""
    return secrets.randbits(A_SEED_BITS)


def set_a(model: nn.Module, distribution: str, seed: int) -> None:
    """Overwrite every LoRA A (sorted by layer name) with a fresh draw from ``distribution`` keyed by
    ``seed`` (a secret A): one AES-256-CTR stream (:func:`privaudit.mechanisms.rng.keyed_generator`,
    HKDF-SHA256 of the seed), layers in order. As secret as the seed: :func:`fresh_a_seed` by default;
    a seed from the config (``options.a_seed``, tests) makes A reproducible by whoever holds it. B and
    everything else are untouched."""
    gen = rng.keyed_generator(int(seed), "lora_sketch.A")
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
        # noise and sampling: dp_lora's generators (a CSPRNG unless privacy.noise_seed is set)
        super().__init__(cfg, train_records, plan, model, tokenizer, device,
                         ledger=ledger if plan.private else None, noise_factor=noise_factor)
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
        a_seed = settings.a_seed if settings.a_seed is not None else fresh_a_seed()
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
                   "a_rebuild": "privaudit.mechanisms.lora_sketch.mechanism.set_a(model, a_distribution, int(a_seed))"
                   if a_seed is not None else None},
        "sketch_canaries": None if trainer.sketch_canaries is None else trainer.sketch_canaries.to_json(),
    }
    return SketchFitResult(model, tok, metrics, plan, theta_0, trainer.canaries, trainer.step_count,
                           trainer.resumed_from,
                           released_state=released, audit_key_extra=key_extra,
                           sketch_canaries=trainer.sketch_canaries)


# --------------------------------------------------------------------------------------------------
# the rank study


__all__ = [
    "ATTACK",
    "NAME",
    "OBSERVER",
    "SketchCanaries",
    "SketchFitResult",
    "SketchSettings",
    "SketchTrainer",
    "check_config",
    "fit",
    "ledger_header_extra",
    "planned_events",
    "score_sketch_canaries",
    "set_a",
    "settings_of",
    "sketch_event",
]
