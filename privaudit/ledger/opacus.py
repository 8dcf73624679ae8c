"""A privaudit ledger from an Opacus accountant's history, so DP-SGD trained with Opacus (or anything
that keeps Opacus-style history) enters the same ledger, accountants, audits and reports.

Opacus accountants (``RDPAccountant``, ``PRVAccountant``, ``GaussianAccountant``) keep ``history``, a
list of ``(noise_multiplier, sample_rate, num_steps)`` segments, each ``num_steps`` steps of the
Poisson-subsampled Gaussian mechanism with noise std = ``noise_multiplier`` × clip norm and sampling
rate ``sample_rate``, at record level with add/remove neighbours — Opacus's own assumptions. Each
segment becomes one :class:`~privaudit.ledger.events.GaussianEvent` with ``count = num_steps``, so
``compute_epsilon(ledger, delta, "rdp")`` equals ``RDPAccountant.get_epsilon(delta)`` (same orders; the
test checks 1e-9).

Header fields to fill (documented in :class:`~privaudit.ledger.ledger.LedgerHeader`): ``target_delta``
(the δ you report), ``mechanism`` (default ``"opacus_dp_sgd"``), ``base_model``,
``dataset_fingerprint`` and ``dataset_size`` (what was trained on), ``privacy_unit`` (``record``
unless each Opacus "sample" is a user's data), ``neighbouring`` (``add_remove``: Opacus's relation),
``observer`` (``released model``: amplification by sampling holds only against an observer who sees
the final model, not the sampled batches).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from privaudit.ledger.events import GaussianEvent
from privaudit.ledger.ledger import Ledger

__all__ = ["ledger_from_opacus_history"]


def _segments(history: Iterable[Sequence[Any]]) -> list[GaussianEvent]:
    events: list[GaussianEvent] = []
    for i, seg in enumerate(history):
        if not isinstance(seg, (tuple, list)) or len(seg) != 3:
            raise ValueError(f"history: entry {i} must be (noise_multiplier, sample_rate, num_steps), got {seg!r}")
        sigma, q, steps = seg
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"history: entry {i}: num_steps must be an integer >= 1, got {steps!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"history: entry {i}: noise_multiplier must be a finite number > 0 (σ = 0 has no "
                             f"guarantee), got {sigma!r}")
        if not (isinstance(q, (int, float)) and 0 < q <= 1):
            raise ValueError(f"history: entry {i}: sample_rate must be in (0, 1], got {q!r}")
        events.append(GaussianEvent(noise_multiplier=float(sigma), sample_rate=float(q), count=steps))
    if not events:
        raise ValueError("history: empty (no training step was accounted)")
    return events


def ledger_from_opacus_history(history: Iterable[Sequence[Any]], path: str | os.PathLike[str], *,
                               target_delta: float, mechanism: str = "opacus_dp_sgd", **header: Any) -> Ledger:
    """Create the ledger file ``path`` (refuses to overwrite) from an Opacus ``accountant.history``;
    ``header``: more :class:`~privaudit.ledger.ledger.LedgerHeader` fields (see the module docstring).
    Returns the ledger, closed for writing; read it back with ``Ledger.read(path)``."""
    events = _segments(history)
    header.setdefault("neighbouring", "add_remove")
    header.setdefault("observer", "released model")
    ledger = Ledger.create(path, mechanism=mechanism, target_delta=target_delta, **header)
    try:
        for ev in events:
            ledger.append(ev)
        ledger.seal()  # the history is complete: a reader treats an unsealed ledger as incomplete
    finally:
        ledger.close()
    return Ledger.read(path)
