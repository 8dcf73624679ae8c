"""Accountants (RDP, PLD, PRV) behind one interface; see :mod:`.base` for the registry."""

from privaudit.accounting.base import (
    Accountant,
    EpsilonResult,
    Segment,
    accountant_names,
    compute_delta,
    compute_epsilon,
    get_accountant,
    register_accountant,
    segments_from_events,
)

__all__ = [
    "Accountant",
    "EpsilonResult",
    "Segment",
    "accountant_names",
    "compute_delta",
    "compute_epsilon",
    "get_accountant",
    "register_accountant",
    "segments_from_events",
]
