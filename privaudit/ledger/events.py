"""Typed privacy events: the ledger's vocabulary.

Every privacy-relevant release a mechanism makes is described by one of these frozen, validated
models. Conventions (all events):

* ``count`` is the number of identical releases the line stands for (compression of repeated steps).
* Noise multipliers follow the Opacus/dp_accounting convention: noise standard deviation divided by
  the clipping norm. The L2 *sensitivity* of one release defaults to ``clip_norm`` under add/remove
  neighbours and to ``2 * clip_norm`` under replace neighbours; set it explicitly when it differs.
* Sampling: ``poisson`` (each unit included independently with probability ``sample_rate``),
  ``fixed_batch`` (shuffled fixed-size batches, ``batch_size`` of ``dataset_size``; no amplification by
  subsampling is claimed) or ``full`` (every unit in every release).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

Neighbouring = Literal["add_remove", "replace"]
NEIGHBOURING_RELATIONS: tuple[str, ...] = ("add_remove", "replace")

# Sanity bounds (hostile ledgers): values outside them are rejected at parse time naming the field,
# instead of overflowing an accountant later. They are far outside any real training run.
MAX_COUNT = 10**12  # releases one line stands for
MIN_NOISE, MAX_NOISE = 1e-4, 1e6  # noise multipliers (std / clip); effective noise likewise (= config's range)
MIN_RATE = 1e-12  # smallest sampling rate
MIN_SCALE, MAX_SCALE = 1e-9, 1e12  # clip norms, sensitivities, Laplace scales, eta
MAX_SIZE = 10**12  # batch/dataset sizes, steps, bytes, dimensions


class _Event(BaseModel):
    """Base of all events: frozen, strict about unknown fields, finite numbers only."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    count: int = Field(1, ge=1, le=MAX_COUNT, description="number of identical releases this event stands for")

    def identity(self) -> dict[str, Any]:
        """The event without its count: two events with equal identities can be merged."""
        data = self.model_dump(mode="json")
        data.pop("count", None)
        return data

    def with_count(self, count: int) -> "_Event":
        return self.model_copy(update={"count": count})


class GaussianEvent(_Event):
    """A (possibly subsampled) Gaussian release: DP-SGD steps, noisy client updates, noisy activations.

    ``noise_multiplier`` = noise std / clip_norm. ``sample_rate`` is the Poisson rate q (1.0 = every
    unit, no subsampling).
    """

    type: Literal["gaussian"] = "gaussian"
    noise_multiplier: float = Field(..., ge=MIN_NOISE, le=MAX_NOISE)
    sampling: Literal["poisson", "fixed_batch", "full"] | None = None
    sample_rate: float = Field(1.0, ge=MIN_RATE, le=1)
    batch_size: int | None = Field(None, ge=1, le=MAX_SIZE)
    dataset_size: int | None = Field(None, ge=1, le=MAX_SIZE)
    clip_norm: float | None = Field(None, ge=MIN_SCALE, le=MAX_SCALE)
    sensitivity: float | None = Field(None, ge=MIN_SCALE, le=MAX_SCALE)

    @model_validator(mode="after")
    def _check_sampling(self) -> "GaussianEvent":
        if self.sampling is None:
            object.__setattr__(self, "sampling", "full" if self.sample_rate == 1.0 else "poisson")
        if self.sampling == "full" and self.sample_rate != 1.0:
            raise ValueError("sampling: 'full' requires sample_rate 1.0")
        if self.sampling == "fixed_batch":
            if self.batch_size is None or self.dataset_size is None:
                raise ValueError("sampling: 'fixed_batch' requires batch_size and dataset_size")
            if self.batch_size > self.dataset_size:
                raise ValueError("batch_size: larger than dataset_size")
        for rel in NEIGHBOURING_RELATIONS:
            eff = self.effective_noise_multiplier(rel)  # type: ignore[arg-type]
            if not MIN_NOISE / 4 <= eff <= MAX_NOISE:  # σ / (sensitivity / C), sensitivity up to 2C (replace)
                raise ValueError(f"sensitivity: effective noise multiplier {eff:.3g} ({rel}) outside "
                                 f"[{MIN_NOISE / 4:g}, {MAX_NOISE:g}]")
        return self

    def effective_noise_multiplier(self, neighbouring: Neighbouring = "add_remove") -> float:
        """Noise std divided by the L2 sensitivity of one release under ``neighbouring``.

        Default sensitivity (when ``sensitivity`` is not given): C for ``full``/``poisson`` under
        add/remove (the record's clipped term appears or not); 2C under replace (g(x) → g(x')), and
        2C for ``fixed_batch`` under either relation: a batch always has B slots, so an added record
        displaces another from its batch (−C in, +C out). This charge rests on coupling the runs
        on D and D' = D ∪ {x} so that x takes one slot of one batch per pass and the displaced record
        leaves that pass; with a sampler whose later batch boundaries depend on the data-set size
        (a stream of permutations of N vs N + 1 records) that coupling is an assumption, not a
        proof — prefer Poisson sampling, or the replace relation (N fixed, where it is exact).
        """
        clip = self.clip_norm if self.clip_norm is not None else 1.0
        sens = self.sensitivity
        if sens is None:
            doubled = neighbouring == "replace" or self.sampling == "fixed_batch"
            sens = clip * (2.0 if doubled else 1.0)
        return self.noise_multiplier * clip / sens

    def accounted_releases(self) -> tuple[float, int]:
        """(sample rate, number of releases) the accountants compose.

        Fixed batches claim no subsampling amplification: each unit is assumed to be in at most one
        batch per pass over the data, so ``count`` steps cost ``ceil(count*batch/N)`` full releases.
        """
        if self.sampling == "fixed_batch":
            assert self.batch_size is not None and self.dataset_size is not None
            return 1.0, math.ceil(self.count * self.batch_size / self.dataset_size)
        return self.sample_rate, self.count


class LaplaceEvent(_Event):
    """A (possibly Poisson-subsampled) Laplace release. ``scale`` is b; ``sensitivity`` is L1."""

    type: Literal["laplace"] = "laplace"
    scale: float = Field(..., ge=MIN_SCALE, le=MAX_SCALE)
    sensitivity: float = Field(1.0, ge=MIN_SCALE, le=MAX_SCALE)
    sampling: Literal["poisson", "full"] | None = None
    sample_rate: float = Field(1.0, ge=MIN_RATE, le=1)

    @model_validator(mode="after")
    def _check_sampling(self) -> "LaplaceEvent":
        if self.sampling is None:
            object.__setattr__(self, "sampling", "full" if self.sample_rate == 1.0 else "poisson")
        return self

    def epsilon_per_release(self) -> float:
        return self.sensitivity / self.scale


class DchiEvent(_Event):
    """Metric-DP (d_chi) release of token representations: density ∝ exp(-eta * ||z||).

    ``eta`` is the privacy parameter per unit of distance in ``metric``; ``count`` is the number of
    token representations released.
    """

    type: Literal["dchi"] = "dchi"
    eta: float = Field(..., gt=0, le=MAX_SCALE)
    dimension: int = Field(..., ge=1, le=MAX_SIZE)
    metric: Literal["euclidean"] = "euclidean"
    shifted_mean: bool = False


class SketchEvent(_Event):
    """Training of LoRA B with a frozen random A (the "DP by random sketching" claim).

    Without ``noise_multiplier`` there is no formal guarantee; with it, the accompanying Gaussian
    events carry the accountable spend.
    """

    type: Literal["sketch"] = "sketch"
    rank: int = Field(..., ge=1, le=MAX_SIZE)
    batch_size: int = Field(..., ge=1, le=MAX_SIZE)
    steps: int = Field(..., ge=0, le=MAX_SIZE)
    a_distribution: str
    a_secret: bool
    noise_multiplier: float | None = Field(None, ge=0, le=MAX_NOISE)
    optimizer: str = "sgd"


class EncryptedEvent(_Event):
    """An exchange whose payload is encrypted to a key the observer does not hold."""

    type: Literal["encrypted"] = "encrypted"
    scheme: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    security_bits: int = Field(..., ge=1, le=100_000)
    bytes_to_server: int = Field(0, ge=0, le=MAX_SIZE * 10**6)
    bytes_from_server: int = Field(0, ge=0, le=MAX_SIZE * 10**6)


class PlaintextEvent(_Event):
    """Data-dependent values sent in the clear: no formal guarantee against that observer."""

    type: Literal["plaintext"] = "plaintext"
    what: str
    shape: list[int] = Field(default_factory=list)


class ClaimEvent(_Event):
    """A guarantee that a paper or a user asserts for this configuration, to be checked."""

    type: Literal["claim"] = "claim"
    epsilon: float = Field(..., ge=0, le=1e6)
    delta: float = Field(0.0, ge=0, lt=1)
    scope: str = "per run"
    source: str = ""


PrivacyEvent = Annotated[
    Union[
        GaussianEvent,
        LaplaceEvent,
        DchiEvent,
        SketchEvent,
        EncryptedEvent,
        PlaintextEvent,
        ClaimEvent,
    ],
    Field(discriminator="type"),
]

EVENT_TYPES: dict[str, type[_Event]] = {
    "gaussian": GaussianEvent,
    "laplace": LaplaceEvent,
    "dchi": DchiEvent,
    "sketch": SketchEvent,
    "encrypted": EncryptedEvent,
    "plaintext": PlaintextEvent,
    "claim": ClaimEvent,
}

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(PrivacyEvent)

Event = _Event


def parse_event(data: dict[str, Any]) -> _Event:
    """Validate a JSON object as an event; raises ``ValueError`` naming the offending field."""
    try:
        return _EVENT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the first offending field of a pydantic error."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("function-after",))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
