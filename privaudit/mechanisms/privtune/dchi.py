"""d_χ (metric-DP) noise for token representations, and the PrivTune noise built on it.

**The d_χ sampler** (Feyisetan et al., WSDM 2020). Z ∈ R^d with density ∝ exp(−η‖z‖₂): direction
u = g/‖g‖ with g ~ N(0, I_d) (uniform on the sphere), magnitude r ~ Gamma(shape d, scale 1/η),
Z = r·u. E‖Z‖ = d/η, E‖Z‖² = d(d+1)/η². Adding Z to x is η·d_χ-private: Pr[y|x] ≤ e^{η‖x−x'‖}Pr[y|x'].
``η`` is *absolute* (per unit of Euclidean distance, the value the ledger records) or *per dimension*:
η_abs = η_dim · d, so that E‖Z‖ = 1/η_dim whatever d is. ``NoiseSettings.eta_unit`` states which.
Randomness (:mod:`privaudit.mechanisms.rng`): by default a CSPRNG (``rng.SecureGenerator``, AES-256-CTR):
g from its Box–Muller normals and r by Marsaglia–Tsang rejection on its keystream (``rng.standard_gamma``,
exact), drawn on the CPU and moved to the device. A seeded ``torch.Generator`` (``privacy.noise_seed``:
reproducible, not secure) draws g with ``torch.randn`` and r as a sum of d Exp(1)/η variables (exact for
integer d, on any device). A call given no generator draws from a fresh CSPRNG, never torch's global PRNG.

**The PrivTune noise** (Liu et al., arXiv 2512.08809; the paper leaves the details open — ours are):

* *Vocabulary geometry.* The vocabulary's representations at the split point (each token through the
  bottom model in a neutral context, computed by the caller) and their exact kNN graph (``knn_k``
  neighbours, Euclidean, made undirected). A token's *n-hop set* is the tokens at shortest-path
  distance exactly ``hops`` from it.
* *Target.* ``target_choice="random"``: a fresh uniform draw from the n-hop set at every release;
  ``"nearest"``: the n-hop token nearest to it (fixed). Tokens outside the graph (special tokens,
  ``[unused]`` entries) or with an empty n-hop set get no shift.
* *Optimal noise vector.* For an observed representation h and target representation x_T, δ* =
  argmin_δ ‖h + δ − x_T‖² + λ‖δ‖² (defence: resemble the target; utility: small distortion, weight
  λ = ``utility_weight``), optionally subject to ‖δ‖ ≤ ``max_shift``·d_med (d_med: the vocabulary's
  median nearest-neighbour distance). Solver: closed form δ* = (x_T − h)/(1 + λ); with the cap, its
  projection onto the ball (exact, the objective being (1+λ)‖δ − δ*‖² + const).
* *Mean shift.* The released value is y = h + δ* + s·Z with Z ~ d_χ(η): the noise mean moves to δ*.
* *Importance scaling.* Importance w_t = attention *received* by token t under parameter-free scaled
  dot-product self-attention over the bottom outputs of its own sequence (softmax_k(h_q·h_k/√d), padding
  and the query itself excluded, averaged over real query positions), normalised to mean 1 over the
  sequence's content tokens. Noise scale s_t = w_t^(−γ) (γ = ``importance_power``: important tokens
  get *less* noise, to limit distortion), renormalised to mean 1, clipped to [scale_min, scale_max].
  Token t's noise s_t·Z is d_χ with η/s_t; the ledger records η / s_floor per batch, where s_floor is
  the largest value of the grid 2^(j/8) not above the batch's smallest scale (fail-closed, and
  batches with similar scales merge in the ledger).
* *Special tokens and padding.* Padding positions are released as zeros (not a release; the attention
  mask, which the server needs anyway, says where they are). Special tokens ([CLS], [SEP], ...) get
  plain d_χ noise (no shift, scale 1) under ``special_tokens="noise"``; ``"clean"`` sends them as they
  are — a ``plaintext`` release unless the caller declares them public (e.g. a k = 0 split, where their
  representation depends only on the token id and position).

Baselines (``mode``): ``dchi`` (plain d_χ: no shift, no scaling), ``gaussian`` (N(0, σ²I) with the
same expected squared norm, σ = √(d+1)/η, on representations clipped to L2 norm C — default: the
largest vocabulary norm — recorded as a Gaussian release with sensitivity 2C, one token replaced),
``none`` (no noise: a ``plaintext`` release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from privaudit.ledger.events import DchiEvent, Event, GaussianEvent, PlaintextEvent
from privaudit.accounting.metric_dp import nearest_neighbours
from privaudit.mechanisms import rng

NoiseGenerator = rng.SecureGenerator | torch.Generator

__all__ = [
    "NoiseSettings",
    "VocabGeometry",
    "TokenNoiser",
    "Release",
    "absolute_eta",
    "sample_dchi",
    "gaussian_matched_sigma",
    "optimal_shift",
    "n_hop_sets",
    "nearest_targets",
    "build_geometry",
    "importance_weights",
    "noise_scales",
    "scale_floor",
]

EtaUnit = Literal["absolute", "per_dimension"]
Mode = Literal["privtune", "dchi", "gaussian", "none"]


# ----------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------
def absolute_eta(eta: float, unit: EtaUnit, dim: int) -> float:
    """η per unit of Euclidean distance: ``eta`` itself (``absolute``) or ``eta * dim`` (``per_dimension``)."""
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta: must be a finite number > 0, got {eta!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dimension: must be an integer >= 1, got {dim!r}")
    if unit == "absolute":
        return float(eta)
    if unit == "per_dimension":
        return float(eta) * dim
    raise ValueError(f"eta_unit: must be 'absolute' or 'per_dimension', got {unit!r}")


def sample_dchi(n: int, dim: int, eta: float | torch.Tensor, *, generator: NoiseGenerator | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` independent d_χ noise vectors in R^dim, shape (n, dim): density ∝ exp(−η‖z‖).

    ``eta``: absolute η, a number or a tensor of n per-row values (> 0). ``generator``: a
    ``rng.SecureGenerator`` (None: a fresh one) or a seeded ``torch.Generator`` (module docstring).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: must be an integer >= 0, got {n!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dimension: must be an integer >= 1, got {dim!r}")
    generator = rng.secure_or(generator)
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    eta_t = torch.as_tensor(eta, dtype=torch.float64, device=device)
    if eta_t.ndim not in (0, 1) or (eta_t.ndim == 1 and eta_t.shape[0] != n):
        raise ValueError(f"eta: must be a number or a tensor of {n} values, got shape {tuple(eta_t.shape)}")
    if not (torch.isfinite(eta_t).all() and (eta_t > 0).all()):
        raise ValueError("eta: must be finite and > 0")
    if n == 0:
        return torch.zeros(0, dim, device=device, dtype=dtype)
    g = rng.randn(n, dim, generator=generator, device=device, dtype=torch.float64)
    u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    r = rng.gamma(dim, n, generator=generator, device=device) / eta_t  # Gamma(dim, 1/eta)
    return (u * r[:, None]).to(dtype)


def gaussian_matched_sigma(eta: float, dim: int) -> float:
    """σ of N(0, σ²I_d) with the same E‖Z‖² as d_χ noise of absolute η: σ = √(d+1)/η."""
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta: must be a finite number > 0, got {eta!r}")
    return math.sqrt(dim + 1) / eta


# ----------------------------------------------------------------------------------------------
# vocabulary geometry: kNN graph, n-hop sets, targets
# ----------------------------------------------------------------------------------------------
def optimal_shift(h: torch.Tensor, target: torch.Tensor, utility_weight: float,
                  max_norm: float | None = None) -> torch.Tensor:
    """argmin_δ ‖h + δ − target‖² + λ‖δ‖² (row-wise), s.t. ‖δ‖ ≤ max_norm if given: (target − h)/(1+λ),
    projected onto the ball."""
    if not (math.isfinite(utility_weight) and utility_weight >= 0):
        raise ValueError(f"utility_weight: must be a finite number >= 0, got {utility_weight!r}")
    delta = (target - h) / (1.0 + utility_weight)
    if max_norm is not None:
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_shift: must be a finite number > 0, got {max_norm!r}")
        norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        delta = delta * (max_norm / norm).clamp(max=1.0)
    return delta


def n_hop_sets(knn_idx: torch.Tensor, hops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices at shortest-path distance exactly ``hops`` in the undirected kNN graph given by
    ``knn_idx`` (V, k). Returns CSR ``(indptr (V+1,), indices)`` (int64, sorted within rows)."""
    import scipy.sparse as sp

    if not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops: must be an integer >= 1, got {hops!r}")
    idx = knn_idx.detach().cpu().numpy()
    v, k = idx.shape
    rows = np.repeat(np.arange(v), k)
    adj = sp.csr_matrix((np.ones(v * k, dtype=np.int8), (rows, idx.reshape(-1))), shape=(v, v))
    adj = ((adj + adj.T) > 0).astype(np.int8)
    eye = sp.identity(v, dtype=np.int8, format="csr")
    prev = eye
    reach = ((adj + eye) > 0).astype(np.int8)  # within 1 hop
    for _ in range(hops - 1):
        prev = reach
        reach = ((reach @ adj + reach) > 0).astype(np.int8)
    exact = (reach - prev).tocsr() if hops > 1 else (reach - eye).tocsr()
    exact.eliminate_zeros()
    exact.sort_indices()
    return torch.from_numpy(exact.indptr.astype(np.int64)), torch.from_numpy(exact.indices.astype(np.int64))


@torch.no_grad()
def nearest_targets(reps: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                    chunk: int = 65536) -> torch.Tensor:
    """For each row, the member of its n-hop set nearest to it (Euclidean); −1 for an empty set."""
    v = reps.shape[0]
    deg = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(v), deg)
    x = reps.float().cpu()
    d2 = torch.empty(indices.shape[0])
    for s in range(0, indices.shape[0], chunk):
        r, c = rows[s:s + chunk], indices[s:s + chunk]
        d2[s:s + chunk] = ((x[r] - x[c]) ** 2).sum(1)
    best = torch.full((v,), float("inf")).scatter_reduce(0, rows, d2, reduce="amin")
    hit = d2 <= best[rows]
    out = torch.full((v,), -1, dtype=torch.long)
    # first hit per row: scatter the candidates in reverse order so the earliest wins
    pos = torch.nonzero(hit).squeeze(1).flip(0)
    out[rows[pos]] = indices[pos]
    return out


@dataclass(frozen=True)
class VocabGeometry:
    """The vocabulary at the split point, as the device (and an attacker) knows it.

    ``token_ids`` (V,): the vocabulary tokens in the graph (candidates); ``representations`` (V, d):
    their representations; ``row_of`` (vocab_size,): row of a token id, −1 if not in the graph;
    ``knn_idx`` (V, k) rows of the nearest neighbours; ``median_nn``: median nearest-neighbour
    distance; ``hop_indptr``/``hop_indices``: CSR of the n-hop sets (rows); ``nearest_target`` (V,):
    nearest n-hop row, −1 if none (computed on demand: :meth:`with_nearest`).
    """

    token_ids: torch.Tensor
    representations: torch.Tensor
    row_of: torch.Tensor
    knn_idx: torch.Tensor
    median_nn: float
    hops: int
    hop_indptr: torch.Tensor
    hop_indices: torch.Tensor
    nearest_target: torch.Tensor | None = None

    @property
    def dimension(self) -> int:
        return int(self.representations.shape[1])

    def to(self, device: torch.device | str) -> "VocabGeometry":
        return VocabGeometry(*(getattr(self, f).to(device) if isinstance(getattr(self, f), torch.Tensor)
                               else getattr(self, f) for f in self.__dataclass_fields__))

    def with_hops(self, hops: int) -> "VocabGeometry":
        """The same geometry with n-hop sets for another ``hops`` (kNN graph reused)."""
        if hops == self.hops:
            return self
        indptr, indices = n_hop_sets(self.knn_idx.cpu(), hops)
        dev = self.representations.device
        return VocabGeometry(self.token_ids, self.representations, self.row_of, self.knn_idx, self.median_nn,
                             hops, indptr.to(dev), indices.to(dev), None)

    def with_nearest(self) -> "VocabGeometry":
        """The same geometry with ``nearest_target`` filled in."""
        if self.nearest_target is not None:
            return self
        nearest = nearest_targets(self.representations, self.hop_indptr.cpu(), self.hop_indices.cpu())
        return VocabGeometry(self.token_ids, self.representations, self.row_of, self.knn_idx, self.median_nn,
                             self.hops, self.hop_indptr, self.hop_indices, nearest.to(self.representations.device))


def build_geometry(token_ids: torch.Tensor, representations: torch.Tensor, vocab_size: int, *,
                   knn_k: int = 10, hops: int = 2) -> VocabGeometry:
    """kNN graph (exact, O(V²d) in chunks), median nearest-neighbour distance and n-hop sets."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).cpu()
    if token_ids.ndim != 1 or representations.ndim != 2 or representations.shape[0] != token_ids.shape[0]:
        raise ValueError("representations: must be (V, d) with one row per token id")
    if not isinstance(knn_k, int) or knn_k < 1:
        raise ValueError(f"knn_k: must be an integer >= 1, got {knn_k!r}")
    if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        raise ValueError(f"token_ids: must lie in [0, {vocab_size})")
    if torch.unique(token_ids).numel() != token_ids.numel():
        raise ValueError("token_ids: duplicate ids")
    dist, idx = nearest_neighbours(representations, min(knn_k, representations.shape[0] - 1))
    row_of = torch.full((vocab_size,), -1, dtype=torch.long)
    row_of[token_ids] = torch.arange(token_ids.numel())
    indptr, indices = n_hop_sets(idx.cpu(), hops)
    dev = representations.device
    return VocabGeometry(token_ids.to(dev), representations, row_of.to(dev), idx, float(dist[:, 0].median()),
                         hops, indptr.to(dev), indices.to(dev), None)


# ----------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------
def importance_weights(hidden: torch.Tensor, real: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Attention received by each position (see the module docstring), (B, T), mean 1 over the
    ``content`` positions of each sequence, 1 elsewhere. ``real``: non-padding positions."""
    b, t, d = hidden.shape
    h = hidden.float()
    scores = h @ h.transpose(1, 2) / math.sqrt(d)
    eye = torch.eye(t, dtype=torch.bool, device=h.device)[None]
    keys_ok = real[:, None, :] & ~eye
    scores = scores.masked_fill(~keys_ok, float("-inf"))
    att = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no valid key: zeros
    q = real.float()
    received = (att * q[:, :, None]).sum(1) / q.sum(1, keepdim=True).clamp_min(1.0)
    c = content.float()
    mean = (received * c).sum(1, keepdim=True) / c.sum(1, keepdim=True).clamp_min(1.0)
    w = received / mean.clamp_min(1e-30)
    return torch.where(content, w, torch.ones_like(w))


def noise_scales(weights: torch.Tensor, content: torch.Tensor, power: float, scale_min: float,
                 scale_max: float) -> torch.Tensor:
    """s = w^(−power), renormalised to mean 1 over each sequence's content positions, clipped to
    [scale_min, scale_max]; 1 at other positions."""
    s = weights.clamp_min(1e-6) ** (-float(power))
    c = content.float()
    mean = (s * c).sum(1, keepdim=True) / c.sum(1, keepdim=True).clamp_min(1.0)
    s = (s / mean.clamp_min(1e-30)).clamp(scale_min, scale_max)
    return torch.where(content, s, torch.ones_like(s))


def scale_floor(smallest: float) -> float:
    """Largest 2^(j/8) (j integer) that is <= ``smallest`` (> 0)."""
    if not (math.isfinite(smallest) and smallest > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {smallest!r}")
    j = math.floor(8 * math.log2(smallest) + 1e-9)
    value = 2.0 ** (j / 8)
    while value > smallest:  # guard against rounding
        j -= 1
        value = 2.0 ** (j / 8)
    return value


# ----------------------------------------------------------------------------------------------
# settings and the noiser
# ----------------------------------------------------------------------------------------------
class NoiseSettings(BaseModel):
    """How token representations are perturbed before they leave the device (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    mode: Mode = "privtune"
    eta: float = Field(0.05, gt=0, description="d_chi privacy parameter, unit given by eta_unit")
    eta_unit: EtaUnit = "per_dimension"
    knn_k: int = Field(10, ge=1, description="neighbours per token in the vocabulary graph")
    hops: int = Field(2, ge=1, le=4, description="n of the n-hop target")
    target_choice: Literal["random", "nearest"] = "random"
    utility_weight: float = Field(1.0, ge=0, description="lambda of the shift objective")
    max_shift: float | None = Field(None, gt=0, description="cap on |shift|, in median-NN distances")
    importance: Literal["attention", "none"] = "attention"
    importance_power: float = Field(1.0, ge=0)
    scale_min: float = Field(0.5, gt=0)
    scale_max: float = Field(2.0, gt=0)
    special_tokens: Literal["noise", "clean"] = "noise"
    gaussian_clip: float | None = Field(None, gt=0, description="L2 clip before Gaussian noise; "
                                        "None: the largest vocabulary representation norm")

    @model_validator(mode="after")
    def _check(self) -> "NoiseSettings":
        if self.scale_min > 1.0 or self.scale_max < 1.0:
            raise ValueError("scale_min: need scale_min <= 1 <= scale_max")
        return self

    @property
    def shifted(self) -> bool:
        return self.mode == "privtune"

    @property
    def scaled(self) -> bool:
        return self.mode == "privtune" and self.importance != "none"


@dataclass(frozen=True)
class Release:
    """What one call of :meth:`TokenNoiser.release` sent: the values (padding zeroed), the ledger
    events that account for it, and statistics (per-token scales, shift norms)."""

    values: torch.Tensor
    events: tuple[Event, ...]
    n_tokens: int
    min_scale: float
    mean_shift_norm: float


class TokenNoiser:
    """Applies :class:`NoiseSettings` to batches of bottom-model outputs.

    ``special_ids``: ids treated as special tokens; ``specials_public``: their clean representation
    is a function of public values (a k = 0 split), so sending them clean is not a release.
    """

    def __init__(self, settings: NoiseSettings, geometry: VocabGeometry, special_ids: set[int] | frozenset[int],
                 *, specials_public: bool = False) -> None:
        self.settings = settings
        if settings.mode == "privtune" and settings.target_choice == "nearest":
            geometry = geometry.with_nearest()
        self.geometry = geometry
        self.dim = geometry.dimension
        self.eta = absolute_eta(settings.eta, settings.eta_unit, self.dim)
        self.special_ids = torch.tensor(sorted(special_ids), dtype=torch.long)
        self.specials_public = specials_public
        self.sigma = gaussian_matched_sigma(self.eta, self.dim)
        self.clip = settings.gaussian_clip if settings.gaussian_clip is not None else float(
            geometry.representations.norm(dim=1).max())
        self.max_shift = None if settings.max_shift is None else settings.max_shift * geometry.median_nn

    def targets(self, rows: torch.Tensor, generator: NoiseGenerator | None) -> torch.Tensor:
        """Target rows for vocabulary ``rows`` (−1: no target); random targets are secret draws from
        ``generator`` (None: a fresh CSPRNG)."""
        g = self.geometry
        if self.settings.target_choice == "nearest":
            assert g.nearest_target is not None
            return g.nearest_target[rows]
        lo, hi = g.hop_indptr[rows], g.hop_indptr[rows + 1]
        deg = hi - lo
        u = rng.rand(rows.shape[0], generator=rng.secure_or(generator), device=rows.device, dtype=torch.float64)
        pick = lo + torch.minimum((u * deg).long(), (deg - 1).clamp_min(0))
        out = torch.full_like(rows, -1)
        ok = deg > 0
        out[ok] = g.hop_indices[pick[ok]]
        return out

    def shifted_vocabulary(self) -> torch.Tensor | None:
        """x_v + δ*(x_v, x_T(v)) for every vocabulary row (``nearest`` targets only; None otherwise)."""
        if not self.settings.shifted or self.settings.target_choice != "nearest":
            return None
        g = self.geometry.with_nearest()
        tgt = g.nearest_target
        assert tgt is not None
        x = g.representations
        shift = torch.zeros_like(x)
        ok = tgt >= 0
        shift[ok] = optimal_shift(x[ok], x[tgt[ok]], self.settings.utility_weight, self.max_shift)
        return x + shift

    @torch.no_grad()
    def release(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                generator: NoiseGenerator | None = None) -> Release:
        """Perturb ``hidden`` (B, T, d), the bottom outputs for ``input_ids`` (B, T), as configured.
        Every random draw (noise, random targets) comes from ``generator``: a ``rng.SecureGenerator``
        or a seeded ``torch.Generator``; None: one fresh CSPRNG for this call."""
        s = self.settings
        if hidden.ndim != 3 or hidden.shape[:2] != input_ids.shape or hidden.shape[-1] != self.dim:
            raise ValueError(f"hidden: expected (B, T, {self.dim}) matching input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(hidden.shape)}")
        dev = hidden.device
        real = attention_mask.to(dev).bool()
        special = torch.isin(input_ids.to(dev), self.special_ids.to(dev)) & real
        content = real & ~special
        noised = real if s.special_tokens == "noise" else content
        out = torch.where(real[..., None], hidden, torch.zeros_like(hidden))
        n = int(noised.sum())
        events: list[Event] = []
        min_scale, shift_norm = 1.0, 0.0
        if s.special_tokens == "clean" and not self.specials_public and s.mode != "none":
            n_special = int(special.sum())
            if n_special:
                events.append(PlaintextEvent(what="special-token representations (contextual)", shape=[self.dim],
                                             count=n_special))
        if s.mode == "none":
            n_real = int(real.sum())
            if n_real:
                events.append(PlaintextEvent(what="token representations at the split point", shape=[self.dim],
                                             count=n_real))
            return Release(out, tuple(events), n_real, 1.0, 0.0)
        if n == 0:
            return Release(out, tuple(events), 0, 1.0, 0.0)
        h = hidden[noised].float()
        generator = rng.secure_or(generator)
        if s.mode == "gaussian":
            norms = h.norm(dim=1, keepdim=True).clamp_min(1e-30)
            h = h * (self.clip / norms).clamp(max=1.0)
            z = rng.randn(h.shape, generator=generator, device=dev, dtype=torch.float32) * self.sigma
            out[noised] = (h + z).to(out.dtype)
            events.append(GaussianEvent(noise_multiplier=self.sigma / self.clip, clip_norm=self.clip,
                                        sensitivity=2 * self.clip, sampling="full", count=n))
            return Release(out, tuple(events), n, 1.0, 0.0)
        scales = torch.ones(n, device=dev)
        mean = torch.zeros_like(h)
        if s.mode == "privtune":
            ids = input_ids.to(dev)[noised]
            is_content = content[noised]
            rows = self.geometry.row_of.to(dev)[ids.clamp(0, self.geometry.row_of.shape[0] - 1)]
            rows = torch.where(is_content & (ids < self.geometry.row_of.shape[0]), rows, torch.full_like(rows, -1))
            has = rows >= 0
            if has.any():
                tgt = self.targets(rows[has], generator)
                ok = tgt >= 0
                sel = torch.nonzero(has).squeeze(1)[ok]
                mean[sel] = optimal_shift(h[sel], self.geometry.representations[tgt[ok]].float().to(dev),
                                          s.utility_weight, self.max_shift)
            shift_norm = float(mean.norm(dim=1).mean())
            if s.importance == "attention":
                w = importance_weights(hidden, real, content)
                sc = noise_scales(w, content, s.importance_power, s.scale_min, s.scale_max)
                scales = sc[noised].float()
        z = sample_dchi(n, self.dim, self.eta, generator=generator, device=dev)
        out[noised] = (h + mean + scales[:, None] * z).to(out.dtype)
        min_scale = float(scales.min())
        floor = scale_floor(min_scale) if s.scaled else 1.0
        events.append(DchiEvent(eta=self.eta / floor, dimension=self.dim, count=n, shifted_mean=s.shifted))
        return Release(out, tuple(events), n, min_scale, shift_norm)
