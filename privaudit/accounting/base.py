"""The accountant interface, the registry, and the reduction of a ledger to composable segments.

Every accountant turns a list of events into ε(δ) (and δ(ε)). Before an accountant sees them, events
are reduced to :class:`Segment` s (mechanism, sample rate, effective noise, number of releases) by
:func:`segments_from_events`:

* ``gaussian`` / ``laplace``: one segment each (merged with identical ones);
* ``claim``: not a release, ignored (reported separately);
* ``encrypted``: nothing learnt by an observer without the key — contributes no spend;
* ``plaintext`` and noise-free ``sketch``: no formal guarantee — the result is ε = ∞ with the reason;
* ``dchi``: a metric-DP guarantee, not an (ε, δ) one — an error naming it (see ``metric_dp``).

An event an accountant cannot handle is a ``ValueError`` naming it, never a silent zero.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from privaudit.ledger.events import (
    NEIGHBOURING_RELATIONS,
    ClaimEvent,
    DchiEvent,
    EncryptedEvent,
    Event,
    GaussianEvent,
    LaplaceEvent,
    Neighbouring,
    PlaintextEvent,
    SketchEvent,
)


@dataclass(frozen=True)
class EpsilonResult:
    """ε at a given δ. ``epsilon_lower``/``epsilon_upper`` bound the true ε of the composed mechanism
    where the method provides bounds (None otherwise). ``epsilon`` is the value to report and what
    every consumer (calibration, auditor, manifest, report) uses: always a valid upper bound — never
    below ``epsilon_upper`` (raised to it on construction), and an upper bound by construction where
    ``epsilon_upper`` is None. ``epsilon == inf`` means no formal guarantee; ``reason`` says why."""

    epsilon: float
    epsilon_lower: float | None
    epsilon_upper: float | None
    accountant: str
    delta: float
    reason: str | None = None

    def __post_init__(self) -> None:
        # fail-closed: an estimate below the accountant's own upper bound is never reported
        if self.epsilon_upper is not None and not self.epsilon >= self.epsilon_upper:
            object.__setattr__(self, "epsilon", float(self.epsilon_upper))

    @property
    def has_guarantee(self) -> bool:
        return math.isfinite(self.epsilon)

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        out: dict[str, Any] = {
            "accountant": self.accountant,
            "epsilon": num(self.epsilon),
            "epsilon_lower": num(self.epsilon_lower),
            "epsilon_upper": num(self.epsilon_upper),
        }
        if not self.has_guarantee:
            out["guarantee"] = "none"
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Segment:
    """``count`` releases of one mechanism.

    ``kind`` = ``gaussian``: ``noise`` is the effective noise multiplier (std / L2 sensitivity);
    ``kind`` = ``laplace``: ``noise`` is scale / L1 sensitivity. ``sample_rate`` is the Poisson rate.
    ``neighbouring``: the relation the sensitivity refers to. Under ``replace`` the pair of outputs is
    symmetric, and with subsampling (q < 1) the accountants use a symmetrised dominating pair
    (the add/remove pairs at this sensitivity are not a valid bound for both orders at once).
    """

    kind: Literal["gaussian", "laplace"]
    noise: float
    sample_rate: float
    count: int
    neighbouring: Neighbouring = "add_remove"


@dataclass(frozen=True)
class Reduction:
    """A ledger reduced for accounting: segments to compose, or the reason there is no guarantee."""

    segments: tuple[Segment, ...]
    no_guarantee: str | None = None
    ignored: tuple[str, ...] = field(default_factory=tuple)


def segments_from_events(
    events: Iterable[Event], neighbouring: Neighbouring = "add_remove"
) -> Reduction:
    """Reduce events to merged segments (order does not matter for composition)."""
    if neighbouring not in NEIGHBOURING_RELATIONS:
        raise ValueError(f"neighbouring: must be one of {NEIGHBOURING_RELATIONS}, got {neighbouring!r}")
    merged: "OrderedDict[tuple[str, float, float, str], int]" = OrderedDict()
    no_guarantee: str | None = None
    ignored: list[str] = []
    for ev in events:
        if isinstance(ev, GaussianEvent):
            q, n = ev.accounted_releases()
            key = ("gaussian", ev.effective_noise_multiplier(neighbouring), q, neighbouring)
            merged[key] = merged.get(key, 0) + n
        elif isinstance(ev, LaplaceEvent):
            scale = ev.scale / (ev.sensitivity * (2.0 if neighbouring == "replace" else 1.0))
            key = ("laplace", scale, ev.sample_rate, neighbouring)
            merged[key] = merged.get(key, 0) + ev.count
        elif isinstance(ev, ClaimEvent):
            ignored.append("claim")
        elif isinstance(ev, EncryptedEvent):
            ignored.append("encrypted")
        elif isinstance(ev, PlaintextEvent):
            no_guarantee = no_guarantee or f"plaintext release ({ev.what}) seen by the observer"
        elif isinstance(ev, SketchEvent):
            if not ev.noise_multiplier:
                no_guarantee = no_guarantee or (
                    "random sketching (frozen A) without added noise has no formal DP guarantee"
                )
            else:
                ignored.append("sketch")
        elif isinstance(ev, DchiEvent):
            raise ValueError(
                "event 'dchi': a metric-DP (d_chi) guarantee is not an (epsilon, delta) guarantee; "
                "use privaudit.accounting.metric_dp"
            )
        else:
            raise ValueError(f"event {getattr(ev, 'type', type(ev).__name__)!r}: not supported")
    segs = tuple(Segment(kind, noise, q, n, rel)  # type: ignore[arg-type]
                 for (kind, noise, q, rel), n in merged.items())
    return Reduction(segs, no_guarantee, tuple(ignored))


class Accountant(ABC):
    """Turns segments into ε(δ) and δ(ε). Subclasses declare what they support.

    ``max_segments``: the most distinct segments (after merging equal ones) an accountant composes;
    above it the ledger is refused with a ``ValueError`` naming the limit (bounded time and memory:
    RDP and PLD compose 1,000 distinct segments in about 20 s; PRV about 0.7 s per segment)."""

    name: str = "base"
    max_segments: int = 1000

    def supports(self, segment: Segment) -> bool:
        return segment.kind == "gaussian"

    def check(self, segments: Sequence[Segment]) -> None:
        if len(segments) > self.max_segments:
            raise ValueError(f"ledger: {len(segments)} distinct (noise, sample rate) segments; the {self.name} "
                             f"accountant composes at most {self.max_segments} (refused)")
        for s in segments:
            if not self.supports(s):
                raise ValueError(
                    f"event {s.kind!r} (sample_rate={s.sample_rate}): not supported by the "
                    f"{self.name} accountant"
                )

    @abstractmethod
    def _epsilon(self, segments: Sequence[Segment], delta: float) -> EpsilonResult: ...

    @abstractmethod
    def _delta(self, segments: Sequence[Segment], epsilon: float) -> float: ...

    def epsilon(self, events: Iterable[Event] | Reduction, delta: float,
                neighbouring: Neighbouring = "add_remove") -> EpsilonResult:
        _check_delta(delta)
        red = events if isinstance(events, Reduction) else segments_from_events(events, neighbouring)
        self.check(red.segments)
        if red.no_guarantee:
            return EpsilonResult(math.inf, None, None, self.name, delta, red.no_guarantee)
        if not red.segments:
            return EpsilonResult(0.0, 0.0, 0.0, self.name, delta, None)
        return self._epsilon(red.segments, delta)

    def delta(self, events: Iterable[Event] | Reduction, epsilon: float,
              neighbouring: Neighbouring = "add_remove") -> float:
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
        red = events if isinstance(events, Reduction) else segments_from_events(events, neighbouring)
        self.check(red.segments)
        if red.no_guarantee:
            return 1.0
        if not red.segments:
            return 0.0
        return self._delta(red.segments, epsilon)


_REGISTRY: dict[str, Callable[[], Accountant]] = {}


def register_accountant(name: str) -> Callable[[type[Accountant]], type[Accountant]]:
    """Class decorator: make an accountant available by name."""

    def deco(cls: type[Accountant]) -> type[Accountant]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def accountant_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_accountant(name: str) -> Accountant:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"accountant: unknown {name!r} (choose from {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]()


def _load_builtin() -> None:
    # Importing the modules registers them.
    from importlib import import_module

    for module in ("pld", "prv", "rdp"):  # plugins, found by name as mechanisms are: no import cycle
        import_module(f"privaudit.accounting.{module}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta: must be in (0, 1), got {delta!r}")


def events_and_relation(source: Any) -> tuple[list[Event], Neighbouring]:
    """Accept a Ledger, a path to a ledger, or an iterable of events."""
    from privaudit.ledger.ledger import Ledger

    if isinstance(source, (str, Path)):
        source = Ledger.read(source)
    if isinstance(source, Ledger):
        return source.events, source.header.neighbouring
    if isinstance(source, Event):
        return [source], "add_remove"
    return list(source), "add_remove"


def compute_epsilon(source: Any, delta: float, accountant: str = "pld",
                    neighbouring: Neighbouring | None = None) -> EpsilonResult:
    """ε(δ) of a ledger (object or path) or a list of events.

    ``neighbouring`` defaults to the ledger header's relation (add/remove for bare events).
    """
    events, relation = events_and_relation(source)
    return get_accountant(accountant).epsilon(events, delta, neighbouring or relation)


def compute_delta(source: Any, epsilon: float, accountant: str = "pld",
                  neighbouring: Neighbouring | None = None) -> float:
    """δ(ε) of a ledger or a list of events."""
    events, relation = events_and_relation(source)
    return get_accountant(accountant).delta(events, epsilon, neighbouring or relation)
