"""``dp_fedlora`` options (``RunConfig.options``), the resolved federated plan, and its ledger events.

Privacy unit and neighbours, per mode (observer: the server, which sees every client's release):

* ``paper`` — client level (hence record level): every released tensor is clipped to its own Frobenius
  bound C_t whatever the client's data, so one tensor release has L2 sensitivity C_t (the paper's
  add/remove convention: the client's tensor vs none) or 2·C_t (replace: any other data of that
  client). σ_t = C_t·sqrt(2 ln(1.25/δ))/ε per tensor (the paper's Eq. 9, with ε = ``privacy.
  target_epsilon`` — or give ``privacy.noise_multiplier`` = σ_t/C_t directly). One ``gaussian`` event
  per tensor release; one ``claim`` event with the paper's per-tensor ε.
* ``client_dp`` — client level: the client's whole update (all trainable tensors jointly, as a delta
  from the round's global model) is clipped to C and N(0, σ²C²) is added by the client. Each
  participation is a full (unamplified) release: the server receives and stores every sampled
  client's release under the client's id, so it knows the sample, and amplification by client
  sampling does not hold against it. ``client_sample_secret: true`` only draws the Poisson schedule
  from the run's secret seed (unpredictable from the config, hidden from anyone but the server); there
  is no secure aggregation, and the ledger header records that the server sees who was sampled.
* ``record_dp`` — record level: DP-SGD inside each client (``dp_lora``'s trainer, Poisson q_i =
  B/|D_i|, clip C, σ), composed over that client's participations. The ledger uses q_max = B/min|D_i|
  for every client (fail-closed: a larger q never costs less).

Composition over clients: a unit (client, or record of one client) is only affected by its own
client's releases. The ledger therefore holds, write-ahead, the releases of the *most-participating*
client: before each round the server appends one participation's events for every unit the maximum
participation count grows by. With a secret schedule the plan (calibration, ``epsilon --config``)
charges the worst case, a client in every round; the run's ledger charges the realised schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privaudit.ledger.events import ClaimEvent, Event, GaussianEvent
from privaudit.config import PrivacyPlan, RunConfig
from privaudit.config import parse_options as validate_options

Mode = Literal["paper", "client_dp", "record_dp"]
PAPER_SOURCE = "DP-FedLoRA (Xu et al., arXiv 2509.09097), Eq. 9: per tensor, per release"


class ShapeSpec(BaseModel):
    """Trainable-tensor shapes for accounting without weights: ``layers`` × ``modules`` (name →
    [out_features, in_features]) get LoRA A (r × in) and B (out × r); ``extra`` = other trainable
    tensors (name → shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: int = Field(..., ge=1)
    modules: dict[str, list[int]]
    extra: dict[str, list[int]] = Field(default_factory=dict)


class FedLoraOptions(BaseModel):
    """Mechanism options of ``dp_fedlora`` (``RunConfig.options``). Local training per round:
    ``training.steps`` steps of batch ``training.batch_size`` with ``training.optimizer`` (fresh
    optimizer state each round)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Mode = "client_dp"
    backend: Literal["inprocess", "flower"] = "inprocess"
    num_clients: int = Field(8, ge=1)
    clients_per_round: int = Field(2, ge=1)
    rounds: int = Field(3, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    partition_seed: int = 0
    client_sampling: Literal["fixed", "poisson"] = "fixed"
    client_sample_secret: bool = False
    schedule_seed: int = Field(0, description="public: the server's sampling (unless secret)")
    aggregation: Literal["fedavg", "stack"] = "fedavg"
    weighting: Literal["samples", "uniform"] | None = Field(
        None, description="None: samples in paper mode (authors' code), uniform otherwise")
    clip_a: float | None = Field(None, gt=0, description="paper: C_A (default privacy.clip_norm)")
    clip_b: float | None = Field(None, gt=0, description="paper: C_B (default privacy.clip_norm)")
    clip_other: float | None = Field(None, gt=0, description="paper: other tensors, e.g. a head")
    shapes: ShapeSpec | None = None
    keep_server_view: bool = Field(True, description="store every round's releases for the auditor")
    flower_num_cpus: int = Field(1, ge=1, description="Flower simulation: CPUs per ClientApp")

    @model_validator(mode="after")
    def _check(self) -> "FedLoraOptions":
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round: {self.clients_per_round} exceeds num_clients {self.num_clients}")
        if self.client_sample_secret and self.client_sampling != "poisson":
            raise ValueError("client_sample_secret: a secret schedule needs client_sampling: poisson")
        if self.client_sample_secret and self.mode != "client_dp":
            raise ValueError("client_sample_secret: a secret schedule is offered for client_dp only")
        return self

    @property
    def sample_weighted(self) -> bool:
        return (self.weighting or ("samples" if self.mode == "paper" else "uniform")) == "samples"


def parse_options(cfg: RunConfig) -> FedLoraOptions:
    """``cfg.options`` as :class:`FedLoraOptions` (``ValueError`` naming ``options.<field>``), checked
    against the training section."""
    opts = validate_options(FedLoraOptions, cfg.options)
    if cfg.training.steps is None:
        raise ValueError("training.steps: dp_fedlora needs training.steps (local steps per round), not epochs")
    if cfg.training.batch_size is None:
        raise ValueError("training.batch_size: dp_fedlora needs the local batch size")
    if opts.mode == "record_dp" and cfg.training.sampling != "poisson":
        raise ValueError("training.sampling: record_dp runs DP-SGD with Poisson sampling inside each client")
    return opts


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def group(self) -> Literal["A", "B", "other"]:
        return "A" if ".lora_A." in self.name else "B" if ".lora_B." in self.name else "other"


def tensors_from_shapes(spec: ShapeSpec, rank: int) -> list[TensorSpec]:
    out: list[TensorSpec] = []
    for layer in range(spec.layers):
        for mod, dims in spec.modules.items():
            if len(dims) != 2:
                raise ValueError(f"options.shapes.modules.{mod}: give [out_features, in_features]")
            o, i = dims
            out.append(TensorSpec(f"layers.{layer}.{mod}.lora_A.weight", (rank, i)))
            out.append(TensorSpec(f"layers.{layer}.{mod}.lora_B.weight", (o, rank)))
    out.extend(TensorSpec(n, tuple(s)) for n, s in spec.extra.items())
    return out


def tensor_inventory(cfg: RunConfig, opts: FedLoraOptions, num_labels: int = 2) -> list[TensorSpec]:
    """The trainable tensors each client releases: from ``options.shapes`` (no weights needed) or from
    the model built from the config (local files only)."""
    if opts.shapes is not None:
        return tensors_from_shapes(opts.shapes, cfg.lora.rank)
    import torch

    from privaudit.mechanisms.training import build_model

    model, _ = build_model(cfg, num_labels, torch.device("cpu"))
    return [TensorSpec(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class FedLoraPlan(PrivacyPlan):
    """A :class:`PrivacyPlan` for a federated run. ``noise_multiplier`` z = σ/C of every release;
    ``sample_rate`` = client sampling rate K/N (paper, client_dp) or the largest local DP-SGD rate
    (record_dp); ``steps`` = rounds. ``participations`` = the most rounds any one client takes part in
    (with a secret schedule: ``rounds``, the worst case); ``schedule`` = clients per round (None:
    secret)."""

    mode: str = "client_dp"
    privacy_unit: str = "client"
    rounds: int = 0
    local_steps: int = 0
    num_clients: int = 0
    clients_per_round: int = 0
    client_sample_secret: bool = False
    participations: int | None = None
    client_sizes: tuple[int, ...] = ()
    local_sample_rate_max: float | None = None
    clips: dict[str, float] = field(default_factory=dict)
    tensor_counts: dict[str, int] = field(default_factory=dict)
    schedule: tuple[tuple[int, ...], ...] | None = None
    paper_epsilon_per_tensor: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update({
            "mode": self.mode, "privacy_unit": self.privacy_unit, "rounds": self.rounds,
            "local_steps": self.local_steps, "num_clients": self.num_clients,
            "clients_per_round": self.clients_per_round, "client_sample_secret": self.client_sample_secret,
            "participations": self.participations, "client_sizes": list(self.client_sizes),
            "local_sample_rate_max": self.local_sample_rate_max, "clips": dict(self.clips),
            "tensor_counts": dict(self.tensor_counts),
            "schedule": None if self.schedule is None else [list(s) for s in self.schedule],
            "paper_epsilon_per_tensor": self.paper_epsilon_per_tensor,
        })
        return out


def paper_noise_multiplier(epsilon: float, delta: float) -> float:
    """σ/C = sqrt(2 ln(1.25/δ))/ε: the classic Gaussian mechanism bound (Dwork–Roth Thm A.1), which the
    paper applies per tensor; it is a valid (ε, δ) bound only for ε < 1."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def participation_events(plan: FedLoraPlan) -> list[Event]:
    """The events of one participation of one client (what one client-round releases)."""
    if plan.mode == "paper":
        out: list[Event] = []
        for group in ("A", "B", "other"):
            n = plan.tensor_counts.get(group, 0)
            if n:
                c = plan.clips[group]
                sens = c if plan.neighbouring == "add_remove" else 2.0 * c
                out.append(GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="full", clip_norm=c,
                                         sensitivity=sens, count=n))
        return out
    if plan.mode == "client_dp":
        return [GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="full", clip_norm=plan.clip_norm)]
    assert plan.local_sample_rate_max is not None
    return [GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="poisson",
                          sample_rate=plan.local_sample_rate_max, clip_norm=plan.clip_norm,
                          count=plan.local_steps)]


def claim_event(plan: FedLoraPlan) -> ClaimEvent | None:
    if plan.mode != "paper" or plan.paper_epsilon_per_tensor is None:
        return None
    return ClaimEvent(epsilon=plan.paper_epsilon_per_tensor, delta=plan.delta,
                      scope="per tensor per release (not composed over tensors, rounds or clients)",
                      source=PAPER_SOURCE)


def events_before_round(plan: FedLoraPlan, new_levels: int) -> list[Event]:
    """What the server appends (write-ahead) before a round's releases: one participation's events for
    each level the most-participating client's count grows by (the server sees whom it sampled, so no
    amplification by client sampling is credited, secret schedule or not)."""
    return participation_events(plan) * new_levels


def all_events(plan: FedLoraPlan) -> list[Event]:
    """Every event a finished run appends, claim first (the ledger's content, merged by count). With a
    secret schedule: an upper bound on it (``participations`` = ``rounds``)."""
    out: list[Event] = []
    claim = claim_event(plan)
    if claim is not None:
        out.append(claim)
    return out + participation_events(plan) * int(plan.participations or 0)
