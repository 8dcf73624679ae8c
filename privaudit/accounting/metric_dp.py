"""Accounting of metric-DP (d_χ) releases: the guarantee a ledger's ``dchi`` events give.

A mechanism M is η·d_χ-private (Chatzikokolakis et al. 2013; Feyisetan et al. 2020) if for all inputs
x, x' and outputs y: Pr[M(x)=y] ≤ exp(η·‖x − x'‖₂)·Pr[M(x')=y]. ``η`` is *per unit of Euclidean
distance* in the representation space the noise is added in. There is no δ and no subsampling
amplification here; the (ε, δ) accountants refuse ``dchi`` events by design
(:mod:`privaudit.accounting.base`).

To make η readable we report the ε it implies between two *tokens* at the median nearest-neighbour
distance of the vocabulary's representations (``d_med``): ε = η·d_med. That is the privacy of one
token release against an observer trying to tell a token from its typical closest alternative; tokens
farther apart are protected less (ε grows linearly with the distance).

Composition: every release of a token with fresh noise adds its η (sequential composition). A record
released ``m`` times (e.g. once per epoch of split learning) gives each of its tokens m·η; a record
differing in several tokens pays Σ_t η·‖x_t − x'_t‖. The ledger counts token releases, not which
record they belong to, so the number of releases per record must be supplied (the mechanism records
it in the run manifest); without it the report is per release and says so.

Caveats that make the formal statement weaker (the report states them):

* **Shifted mean** (``shifted_mean`` events, e.g. PrivTune): the output is x + μ(x) + Z. The d_χ
  bound holds between the *shifted* points x + μ(x), not between the inputs: replace ‖x − x'‖ by
  ‖x + μ(x) − x' − μ(x')‖. When the shifted vocabulary is supplied the report gives ε at its median
  nearest-neighbour distance too.
* **Data-dependent scale** (importance scaling): token t gets noise s_t·Z, i.e. η/s_t. Between two
  inputs whose scales differ the density ratio is unbounded (the tails decay at different rates), so
  the per-token η only holds among inputs with the *same* scale. Events record the largest per-token
  η of their batch (η divided by the smallest scale), which is the value reported.
* Other releases in the same ledger (``plaintext``: e.g. labels sent to the server; ``gaussian``)
  are listed: this report covers the d_χ token releases only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privaudit.ledger.events import (
    ClaimEvent,
    DchiEvent,
    EncryptedEvent,
    Event,
    GaussianEvent,
    LaplaceEvent,
    PlaintextEvent,
)

__all__ = ["MetricDPReport", "header_info", "metric_dp_report", "nearest_neighbours", "median_nn_distance"]


# ----------------------------------------------------------------------------------------------
# vocabulary geometry
# ----------------------------------------------------------------------------------------------
def _check_reps(reps: Any, name: str) -> torch.Tensor:
    if not isinstance(reps, torch.Tensor):
        try:
            reps = torch.as_tensor(reps)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name}: must be a (V, d) array ({exc})") from None
    if reps.ndim != 2 or reps.shape[0] < 2 or reps.shape[1] < 1:
        raise ValueError(f"{name}: must be a (V, d) array with V >= 2, got shape {tuple(reps.shape)}")
    if not torch.isfinite(reps).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return reps


@torch.no_grad()
def nearest_neighbours(reps: torch.Tensor, k: int = 1, *, chunk: int = 2048,
                       exclude_self: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours (Euclidean) of every row of ``reps`` (V, d) among its rows.

    Returns ``(distances, indices)``, both (V, k), sorted by distance; a row is not its own neighbour
    when ``exclude_self``. Computed in row chunks (memory O(chunk·V)), in float32 on ``reps``' device.
    """
    reps = _check_reps(reps, "reps")
    n = reps.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n - (1 if exclude_self else 0):
        raise ValueError(f"k: must be an integer in [1, {n - (1 if exclude_self else 0)}], got {k!r}")
    x = reps.float()
    sq = (x * x).sum(1)
    dists, idxs = [], []
    for start in range(0, n, chunk):
        block = x[start:start + chunk]
        d2 = sq[start:start + chunk, None] - 2.0 * block @ x.T + sq[None, :]
        if exclude_self:
            rows = torch.arange(block.shape[0], device=x.device)
            d2[rows, rows + start] = float("inf")
        val, idx = torch.topk(d2, k, dim=1, largest=False)
        dists.append(val.clamp_min(0).sqrt())
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def median_nn_distance(reps: torch.Tensor) -> float:
    """Median over rows of the distance to the nearest other row (Euclidean)."""
    d, _ = nearest_neighbours(reps, 1)
    return float(d[:, 0].median())


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricDPReport:
    """The metric-DP guarantee of a ledger's ``dchi`` releases (see the module docstring).

    ``eta`` is the largest per-token η of any release (per unit of Euclidean distance; the weakest
    guarantee), ``eta_per_dimension`` = eta / dimension (so E‖Z‖ = 1/eta_per_dimension at that η).
    ``epsilon_at_median_nn`` = eta · ``median_nn_distance`` for one release;
    ``epsilon_composed_at_median_nn`` = that × ``releases_per_record`` (None when unknown).
    ``guarantee``: ``metric_dp`` (plain), ``metric_dp_shifted`` (holds w.r.t. shifted points) or
    ``conditional`` (data-dependent scale: only among inputs with equal scale).
    """

    eta: float
    eta_min: float
    eta_per_dimension: float
    dimension: int
    token_releases: int
    n_events: int
    median_nn_distance: float
    epsilon_at_median_nn: float
    releases_per_record: int | None
    epsilon_composed_at_median_nn: float | None
    shifted_mean: bool
    median_nn_distance_shifted: float | None
    epsilon_at_median_nn_shifted: float | None
    data_dependent_scale: bool
    guarantee: str
    caveats: tuple[str, ...] = field(default_factory=tuple)
    other_releases: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "accountant": "metric_dp",
            "metric": "euclidean",
            "eta": self.eta,
            "eta_min": self.eta_min,
            "eta_per_dimension": self.eta_per_dimension,
            "dimension": self.dimension,
            "token_releases": self.token_releases,
            "n_events": self.n_events,
            "median_nn_distance": self.median_nn_distance,
            "epsilon_at_median_nn": self.epsilon_at_median_nn,
            "releases_per_record": self.releases_per_record,
            "epsilon_composed_at_median_nn": self.epsilon_composed_at_median_nn,
            "shifted_mean": self.shifted_mean,
            "median_nn_distance_shifted": self.median_nn_distance_shifted,
            "epsilon_at_median_nn_shifted": self.epsilon_at_median_nn_shifted,
            "data_dependent_scale": self.data_dependent_scale,
            "guarantee": self.guarantee,
            "caveats": list(self.caveats),
            "other_releases": list(self.other_releases),
        }


def _events_and_info(source: Any) -> tuple[list[Event], dict[str, Any]]:
    from privaudit.ledger.ledger import Ledger

    if isinstance(source, (str, Path)):
        source = Ledger.read(source)
    if isinstance(source, Ledger):
        info = getattr(source.header, "metric_dp", None) or (source.header.model_extra or {}).get("metric_dp")
        return source.events, dict(info or {})
    if isinstance(source, Event):
        return [source], {}
    return list(source), {}


def metric_dp_report(
    source: Any,
    vocab_representations: torch.Tensor,
    *,
    releases_per_record: int | None = None,
    shifted_vocab_representations: torch.Tensor | None = None,
    data_dependent_scale: bool | None = None,
    median_nn: float | None = None,
) -> MetricDPReport:
    """The metric-DP guarantee of the ``dchi`` events in ``source`` (a Ledger, a ledger path or events).

    ``vocab_representations`` (V, d): every vocabulary token's representation in the space the noise
    is added in (for a split model: the bottom model's output for the token in a neutral context).
    ``releases_per_record``: how many times one record's tokens were released (e.g. epochs), for the
    composed ε. ``shifted_vocab_representations``: the vocabulary's shifted means x + μ(x) (shifted
    mechanisms). ``data_dependent_scale``: whether per-token noise scales depend on the data (default:
    the ledger header's ``metric_dp.importance_scaling``, else False). ``median_nn``: a precomputed
    median nearest-neighbour distance of ``vocab_representations`` (skips the O(V²) search).
    """
    events, info = _events_and_info(source)
    dchi = [e for e in events if isinstance(e, DchiEvent)]
    if not dchi:
        raise ValueError("events: no 'dchi' event to account (metric DP covers d_chi releases only)")
    dims = {e.dimension for e in dchi}
    if len(dims) != 1:
        raise ValueError(f"events: dchi events with different dimensions {sorted(dims)}; report them separately")
    dim = dims.pop()
    reps = _check_reps(vocab_representations, "vocab_representations")
    if reps.shape[1] != dim:
        raise ValueError(f"vocab_representations: dimension {reps.shape[1]} != the events' dimension {dim}")
    if releases_per_record is not None and (not isinstance(releases_per_record, int) or releases_per_record < 1):
        raise ValueError(f"releases_per_record: must be an integer >= 1, got {releases_per_record!r}")
    if median_nn is not None and not (math.isfinite(median_nn) and median_nn > 0):
        raise ValueError(f"median_nn: must be a finite number > 0, got {median_nn!r}")

    eta = max(e.eta for e in dchi)
    eta_min = min(e.eta for e in dchi)
    shifted = any(e.shifted_mean for e in dchi)
    if data_dependent_scale is None:
        data_dependent_scale = bool(info.get("importance_scaling", False))
    d_med = float(median_nn) if median_nn is not None else median_nn_distance(reps)
    eps = eta * d_med
    composed = None if releases_per_record is None else eps * releases_per_record

    d_shift = eps_shift = None
    if shifted_vocab_representations is not None:
        sh = _check_reps(shifted_vocab_representations, "shifted_vocab_representations")
        if sh.shape != reps.shape:
            raise ValueError(f"shifted_vocab_representations: shape {tuple(sh.shape)} != {tuple(reps.shape)}")
        d_shift = median_nn_distance(sh)
        eps_shift = eta * d_shift

    caveats: list[str] = [
        f"per token release: Pr[M(x)=y] <= exp({eta:.6g} * ||x - x'||) Pr[M(x')=y]; epsilon {eps:.4g} is for "
        f"two tokens at the vocabulary's median nearest-neighbour distance {d_med:.4g}; farther tokens get "
        "proportionally more",
    ]
    if releases_per_record is None:
        caveats.append("releases per record unknown: every further release of a record's tokens with fresh "
                       "noise adds its eta (sequential composition); the epsilon shown is per release")
    else:
        caveats.append(f"each record's tokens were released up to {releases_per_record} times: composed "
                       f"epsilon {composed:.4g} at the median nearest-neighbour distance")
    caveats.append("a record differing in several tokens pays the sum of eta * distance over those tokens")
    if shifted:
        caveats.append("shifted mean: the guarantee holds only with respect to the shifted points x + mu(x), "
                       "not the original token representations"
                       + (f" (median nearest-neighbour distance of the shifted vocabulary {d_shift:.4g}, "
                          f"epsilon {eps_shift:.4g})" if d_shift is not None else ""))
    if data_dependent_scale:
        caveats.append("data-dependent noise scale (importance scaling): between inputs whose scales differ the "
                       "density ratio is unbounded; the per-token eta (eta / smallest scale) holds only among "
                       "inputs with the same scale")
    if eta_min != eta:
        caveats.append(f"per-token eta varies across releases ({eta_min:.6g} .. {eta:.6g}); the largest is reported")

    other: list[str] = []
    for e in events:
        if isinstance(e, PlaintextEvent):
            other.append(f"plaintext: {e.what} (x{e.count}) — no guarantee for it")
        elif isinstance(e, (GaussianEvent, LaplaceEvent)):
            other.append(f"{e.type} (x{e.count}) — account with the (epsilon, delta) accountants")
        elif isinstance(e, (ClaimEvent, EncryptedEvent, DchiEvent)):
            continue
        else:
            other.append(f"{getattr(e, 'type', type(e).__name__)} (x{e.count}) — not covered by this report")
    merged: dict[str, None] = dict.fromkeys(other)

    guarantee = "conditional" if data_dependent_scale else ("metric_dp_shifted" if shifted else "metric_dp")
    return MetricDPReport(
        eta=float(eta), eta_min=float(eta_min), eta_per_dimension=float(eta) / dim, dimension=int(dim),
        token_releases=int(sum(e.count for e in dchi)), n_events=len(dchi),
        median_nn_distance=d_med, epsilon_at_median_nn=float(eps), releases_per_record=releases_per_record,
        epsilon_composed_at_median_nn=None if composed is None else float(composed), shifted_mean=shifted,
        median_nn_distance_shifted=d_shift, epsilon_at_median_nn_shifted=eps_shift,
        data_dependent_scale=bool(data_dependent_scale), guarantee=guarantee, caveats=tuple(caveats),
        other_releases=tuple(merged),
    )


def header_info(mean_shift: bool, importance_scaling: bool, **extra: Any) -> dict[str, Any]:
    """The ``metric_dp`` entry a d_χ mechanism puts in its ledger header (read by the report)."""
    return {"mean_shift": bool(mean_shift), "importance_scaling": bool(importance_scaling), **extra}

