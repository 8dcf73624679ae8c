"""What an attack gets (:class:`AuditContext`) and returns (:class:`AttackScores`); the auditor
(:mod:`privaudit.audit.auditor`) turns scores into metrics, ε lower bounds and a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:

    from privaudit.data import Record
    from privaudit.mechanisms.training import DataBundle
    from privaudit.runs import LoadedRun


AttackKind = Literal["membership", "canary", "inversion", "attribute"]

BoundMethod = Literal["none", "one_run"]

@dataclass(frozen=True)
class AttackScores:
    """The raw outcome of one attack; the auditor turns it into metrics and bounds.

    ``member_scores`` / ``nonmember_scores``: one score per unit, higher = more likely a member
    (None for attacks that only report ``metrics``, e.g. inversion or attribute inference).
    ``bound``: ``"one_run"`` when every scored unit was included independently with probability ½
    (then the scores support a one-run ε lower bound), else ``"none"``. ``metrics``: extra metrics,
    merged over the membership metrics. ``note``: one sentence for the reader.
    """

    name: str
    kind: AttackKind
    member_scores: NDArray[np.float64] | None = None
    nonmember_scores: NDArray[np.float64] | None = None
    bound: BoundMethod = "none"
    metrics: Mapping[str, Any] = field(default_factory=dict)
    note: str | None = None

@dataclass(frozen=True)
class AuditContext:
    """What an attack gets: the loaded run, its regenerated data, the balanced record sample
    (``members``/``nonmembers``), the population reference models train on and RMIA's population
    points z (held apart from everything scored), the settings, and ``log``/``advance`` callables for
    progress."""

    run: "LoadedRun"
    data: "DataBundle"
    observer: str
    members: tuple["Record", ...]
    nonmembers: tuple["Record", ...]
    seed: int
    settings: Mapping[str, Any]
    population: tuple["Record", ...] = ()
    population_z: tuple["Record", ...] = ()
    log: Callable[[str], None] = lambda _msg: None
    advance: Callable[[], None] = lambda: None

ViewAttack = Callable[[AuditContext], Sequence[AttackScores]]
