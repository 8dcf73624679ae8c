"""Sketch statistics of LoRA with a frozen random A: how far G·AᵀA is from c·G.

Setting (PEFT LoRA, written in the ``nn.Linear`` convention): base weight W (m×n, out × in), frozen A
(r×n), trained B (m×r), ΔW = s·B·A with s = lora_alpha / r. With G = ∂L/∂W (m×n) the gradient of B is
s·G·Aᵀ, so one SGD step on B moves W by −η·s²·G·AᵀA: the full-weight gradient seen through the random
"sketch" AᵀA (REFERENCES.md §2).

If A's entries are i.i.d. with mean 0, variance v and fourth moment μ₄ [derived, rows of A independent,
summing the per-row terms over the rows of G]:

* E[AᵀA] = c·I with c = r·v;
* E‖G(AᵀA − c·I)‖_F² = r·(μ₄ + (n − 2)·v²)·‖G‖_F²  (the "sketch noise").

``gaussian_1_over_r`` (A ~ N(0, 1/r)): c = 1 and the sketch noise is ((n + 1)/r)·‖G‖_F².
``peft_default`` (PEFT's Kaiming-uniform init, U(−1/√n, 1/√n)): c = r/(3n), and the noise relative to
the mean c²·‖G‖_F² is (n − 1/5)/r. Either way the "noise" is multiplicative, data-dependent and the same
A is reused at every step: this is a measurement of the sketch, not a privacy guarantee.

Functions: the moments and expectations (:func:`ata_scale`, :func:`expected_sketch_noise`), draws of A
(:func:`draw_a`), the noise of one A (:func:`sketch_noise`), a Monte Carlo over fresh draws of A
(:func:`monte_carlo_sketch_noise`) and, for a trained model, the full-weight gradient of every LoRA layer
and its statistics (:func:`layer_gradients`, :func:`measure_layer_sketch`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from privaudit.mechanisms import rng

if TYPE_CHECKING:
    from privaudit.config import RunConfig
    from privaudit.data import Record

ADistribution = Literal["gaussian_1_over_r", "peft_default"]
A_DISTRIBUTIONS: tuple[str, ...] = ("gaussian_1_over_r", "peft_default")
A_DISTRIBUTION_LABELS: dict[str, str] = {
    "gaussian_1_over_r": "N(0, 1/r) i.i.d. (E[AᵀA] = I)",
    "peft_default": "PEFT default: Kaiming-uniform U(-1/sqrt(n), 1/sqrt(n)) i.i.d. (E[AᵀA] = (r/(3n))·I)",
}


def _check(distribution: str, rank: int, fan_in: int) -> None:
    if distribution not in A_DISTRIBUTIONS:
        raise ValueError(f"distribution: must be one of {A_DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: must be an integer >= 1, got {rank!r}")
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1:
        raise ValueError(f"fan_in: must be an integer >= 1, got {fan_in!r}")


def entry_moments(distribution: str, rank: int, fan_in: int) -> tuple[float, float]:
    """(variance v, fourth moment μ₄) of one entry of A (r × n, n = ``fan_in``)."""
    _check(distribution, rank, fan_in)
    if distribution == "gaussian_1_over_r":
        v = 1.0 / rank
        return v, 3.0 * v * v
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound gain*sqrt(3/n)
    return bound * bound / 3.0, bound ** 4 / 5.0


def ata_scale(distribution: str, rank: int, fan_in: int) -> float:
    """c with E[AᵀA] = c·I."""
    v, _ = entry_moments(distribution, rank, fan_in)
    return rank * v


def expected_relative_sketch_noise(distribution: str, rank: int, fan_in: int) -> float:
    """E‖G(AᵀA − cI)‖_F² / (c²·‖G‖_F²): (n+1)/r for N(0, 1/r), (n − 1/5)/r for PEFT's default."""
    v, mu4 = entry_moments(distribution, rank, fan_in)
    c = rank * v
    return rank * (mu4 + (fan_in - 2) * v * v) / (c * c)


def expected_sketch_noise(grad_sq_norm: float, distribution: str, rank: int, fan_in: int) -> float:
    """E‖G(AᵀA − cI)‖_F² for a gradient with ‖G‖_F² = ``grad_sq_norm``."""
    c = ata_scale(distribution, rank, fan_in)
    return expected_relative_sketch_noise(distribution, rank, fan_in) * c * c * float(grad_sq_norm)


def draw_a(distribution: str, rank: int, fan_in: int, generator: Any, *,
           draws: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (r × n) with i.i.d. entries of ``distribution`` (float32 CPU draws from ``generator``: a
    ``torch.Generator`` or a :class:`privaudit.mechanisms.rng.SecureGenerator`, cast to ``dtype``);
    ``draws`` = k gives a stack (k, r, n)."""
    _check(distribution, rank, fan_in)
    shape = (rank, fan_in) if draws is None else (int(draws), rank, fan_in)
    if distribution == "gaussian_1_over_r":
        a = rng.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(rank)
    else:
        bound = 1.0 / math.sqrt(fan_in)
        a = (rng.rand(shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound
    return a.to(dtype)


def sketch_noise(grad: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> float:
    """‖G·AᵀA − scale·G‖_F² for G (m × n) and A (r × n), in float64."""
    g = grad.detach().to(torch.float64)
    a64 = a.detach().to(torch.float64)
    if g.dim() != 2 or a64.dim() != 2 or g.shape[1] != a64.shape[1]:
        raise ValueError(f"grad: shape {tuple(g.shape)} does not match A {tuple(a64.shape)} (G is m×n, A r×n)")
    return float(((g @ a64.T) @ a64 - scale * g).square().sum())


@dataclass(frozen=True)
class MonteCarloSketch:
    """Monte Carlo estimate of E‖G(AᵀA − cI)‖_F² over ``draws`` fresh draws of A.

    ``mean``/``std_error``: the estimate and its standard error; ``expected``: the formula's value;
    ``z`` = (mean − expected)/std_error; ``relative`` = mean/(c²‖G‖²) beside ``expected_relative``.
    """

    distribution: str
    rank: int
    fan_in: int
    draws: int
    grad_sq_norm: float
    scale: float
    mean: float
    std_error: float
    expected: float
    relative: float
    expected_relative: float

    @property
    def z(self) -> float:
        return (self.mean - self.expected) / self.std_error if self.std_error > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "z": self.z}


def monte_carlo_sketch_noise(grad: torch.Tensor, rank: int, distribution: str = "gaussian_1_over_r", *,
                             draws: int = 1000, seed: int = 0, chunk: int = 256) -> MonteCarloSketch:
    """Estimate E_A‖G(AᵀA − cI)‖_F² for the fixed gradient ``grad`` (m × n) over ``draws`` i.i.d. draws
    of A (float64 arithmetic, ``chunk`` draws at a time)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws: must be an integer >= 2, got {draws!r}")
    g = grad.detach().to("cpu", torch.float64)
    if g.dim() != 2:
        raise ValueError(f"grad: must be a matrix (m × n), got shape {tuple(g.shape)}")
    n = int(g.shape[1])
    c = ata_scale(distribution, rank, n)
    gen = torch.Generator().manual_seed(int(seed))
    values: list[torch.Tensor] = []
    left = draws
    while left > 0:
        k = min(chunk, left)
        a = draw_a(distribution, rank, n, gen, draws=k, dtype=torch.float64)  # (k, r, n)
        ga = torch.matmul(g.unsqueeze(0), a.transpose(1, 2))                  # (k, m, r)
        noise = torch.matmul(ga, a) - c * g.unsqueeze(0)                        # (k, m, n)
        values.append(noise.square().sum(dim=(1, 2)))
        left -= k
    vals = torch.cat(values).numpy()
    gsq = float(g.square().sum())
    mean = float(vals.mean())
    se = float(vals.std(ddof=1) / math.sqrt(draws))
    rel = mean / (c * c * gsq) if gsq > 0 else math.nan
    return MonteCarloSketch(distribution, rank, n, draws, gsq, c, mean, se,
                            expected_sketch_noise(gsq, distribution, rank, n), rel,
                            expected_relative_sketch_noise(distribution, rank, n))


# --------------------------------------------------------------------------------------------------
# trained layers


@dataclass(frozen=True)
class LoraLayerInfo:
    """One PEFT LoRA layer: its module name, ΔW = scaling·B·A with A (rank × in), B (out × rank)."""

    name: str
    module: nn.Module
    a_param: str
    b_param: str
    in_features: int
    out_features: int
    rank: int
    scaling: float
    fan_in_fan_out: bool

    @property
    def a(self) -> torch.Tensor:
        return self.module.lora_A["default"].weight  # type: ignore[index,union-attr]

    @property
    def b(self) -> torch.Tensor:
        return self.module.lora_B["default"].weight  # type: ignore[index,union-attr]


def lora_layers(model: nn.Module) -> list[LoraLayerInfo]:
    """The PEFT LoRA layers of ``model`` (adapter ``default``), sorted by name."""
    from peft.tuners.lora import LoraLayer

    out: list[LoraLayerInfo] = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            a = mod.lora_A["default"].weight
            b = mod.lora_B["default"].weight
            out.append(LoraLayerInfo(name, mod, f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight",
                                     int(a.shape[1]), int(b.shape[0]), int(a.shape[0]),
                                     float(mod.scaling["default"]), bool(getattr(mod, "fan_in_fan_out", False))))
    return sorted(out, key=lambda x: x.name)


def layer_gradients(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """G = ∂L/∂W (out × in, float32 CPU) of the base weight of every LoRA layer, for the mean loss over
    ``batch``. Base weights are made trainable only for this backward pass; every ``requires_grad``
    flag and ``.grad`` is restored/cleared afterwards."""
    from privaudit.mechanisms.training import per_sample_losses

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    old_grads = {n: p.grad for n, p in model.named_parameters()}
    was_training = model.training
    weights = [lay.module.base_layer.weight for lay in layers]  # type: ignore[union-attr]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        model.eval()  # no dropout: the gradient of the deterministic loss
        loss = per_sample_losses(model, batch, task).mean()
        grads = torch.autograd.grad(loss, weights)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = old_grads[n]
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    for lay, g in zip(layers, grads):
        g = g.detach().to("cpu", torch.float32)
        out[lay.name] = g.T.contiguous() if lay.fan_in_fan_out else g  # Conv1D stores W as (in, out)
    return out


@dataclass(frozen=True)
class LayerSketchStats:
    """Sketch statistics of one trained LoRA layer at one gradient G (see the module docstring).

    ``noise``: ‖G·AᵀA − c·G‖² for the layer's own A; ``expected``: its expectation over A;
    ``ratio`` = noise/expected (one draw: about 1 ± its spread); ``relative`` = noise/(c²‖G‖²) beside
    ``expected_relative`` ((n+1)/r for N(0, 1/r)); ``monte_carlo``: the same over fresh draws of A.
    """

    layer: str
    out_features: int
    in_features: int
    rank: int
    distribution: str
    scale: float
    grad_sq_norm: float
    noise: float
    expected: float
    relative: float
    expected_relative: float
    monte_carlo: MonteCarloSketch | None = None

    @property
    def ratio(self) -> float:
        return self.noise / self.expected if self.expected > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "monte_carlo"}
        out["ratio"] = self.ratio
        out["monte_carlo"] = None if self.monte_carlo is None else self.monte_carlo.to_json()
        return out


def measure_layer_sketch(model: nn.Module, tokenizer: Any, records: Sequence["Record"], cfg: "RunConfig",
                         device: torch.device, *, distribution: str | None = None, mc_draws: int = 0,
                         seed: int = 0) -> list[LayerSketchStats]:
    """Sketch statistics of every LoRA layer of a (trained) model, G computed on ``records``
    (use records outside the training set). ``distribution``: A's (default ``cfg.lora.init_a``);
    ``mc_draws`` > 1 adds a Monte Carlo over fresh draws of A for the same G."""
    from privaudit.mechanisms.training import encode

    if not records:
        raise ValueError("records: need at least one record to compute a gradient")
    dist = distribution or cfg.lora.init_a
    batch = encode(tokenizer, list(records), cfg, device)
    grads = layer_gradients(model, batch, cfg.task)
    out: list[LayerSketchStats] = []
    for i, lay in enumerate(lora_layers(model)):
        g = grads[lay.name]
        n, r = lay.in_features, lay.rank
        c = ata_scale(dist, r, n)
        gsq = float(g.double().square().sum())
        noise = sketch_noise(g, lay.a.detach().cpu(), c)
        expected = expected_sketch_noise(gsq, dist, r, n)
        mc = (monte_carlo_sketch_noise(g, r, dist, draws=mc_draws, seed=seed + i)
              if mc_draws > 1 and gsq > 0 else None)
        out.append(LayerSketchStats(lay.name, lay.out_features, n, r, dist, c, gsq, noise, expected,
                                    noise / (c * c * gsq) if gsq > 0 else math.nan,
                                    expected_relative_sketch_noise(dist, r, n), mc))
    return out


def summarize_layer_stats(stats: Sequence[LayerSketchStats]) -> dict[str, Any]:
    """JSON summary: per layer, plus the mean of ``ratio`` (own A) and of the Monte Carlo ``z`` scores."""
    ratios = [s.ratio for s in stats if math.isfinite(s.ratio)]
    zs = [s.monte_carlo.z for s in stats if s.monte_carlo is not None and math.isfinite(s.monte_carlo.z)]
    return {
        "layers": [s.to_json() for s in stats],
        "mean_ratio_own_a": float(np.mean(ratios)) if ratios else None,
        "mean_relative_noise": float(np.mean([s.relative for s in stats])) if stats else None,
        "expected_relative_noise": float(np.mean([s.expected_relative for s in stats])) if stats else None,
        "monte_carlo_max_abs_z": float(np.max(np.abs(zs))) if zs else None,
    }


__all__ = [
    "A_DISTRIBUTIONS",
    "A_DISTRIBUTION_LABELS",
    "LayerSketchStats",
    "LoraLayerInfo",
    "MonteCarloSketch",
    "ata_scale",
    "draw_a",
    "entry_moments",
    "expected_relative_sketch_noise",
    "expected_sketch_noise",
    "layer_gradients",
    "lora_layers",
    "measure_layer_sketch",
    "monte_carlo_sketch_noise",
    "sketch_noise",
    "summarize_layer_stats",
]
