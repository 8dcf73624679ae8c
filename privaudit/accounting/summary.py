"""The manifest's ε section: ε(δ) of a ledger by every accountant, with the reason when there is no
guarantee.
"""

from __future__ import annotations

import math
from typing import Any

from privaudit.ledger.ledger import Ledger

ACCOUNTANTS = ("rdp", "pld", "prv")

def epsilon_section(ledger: Ledger, delta: float) -> dict[str, Any]:
    """ε(δ) of the ledger by every accountant (None = no formal guarantee), with the reason if none."""
    from privaudit.accounting.base import compute_epsilon

    eps: dict[str, float | None] = {}
    reason = None
    unavailable: dict[str, str] = {}
    for name in ACCOUNTANTS:
        try:
            res = compute_epsilon(ledger, delta, name)
        except (ValueError, OverflowError) as exc:  # an accountant that cannot answer (PRV mesh, PLD overflow at huge ε)
            eps[name] = None
            unavailable[name] = str(exc)
            continue
        eps[name] = float(res.epsilon) if math.isfinite(res.epsilon) else None
        reason = reason or res.reason
    out: dict[str, Any] = {"epsilon": eps}
    if unavailable:
        out["unavailable"] = unavailable
    if reason:
        out["guarantee"] = "none"
        out["reason"] = reason
    return out
