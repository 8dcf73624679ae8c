"""privaudit: private fine-tuning, exact privacy ledgers, accountants, audits and reports.

Public API (imported lazily so that ``import privaudit`` stays light)::

    from privaudit import Ledger, GaussianEvent, compute_epsilon, calibrate_noise
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Ledger": "privaudit.ledger.ledger",
    "LedgerHeader": "privaudit.ledger.ledger",
    "verify_ledger": "privaudit.ledger.ledger",
    "GaussianEvent": "privaudit.ledger.events",
    "LaplaceEvent": "privaudit.ledger.events",
    "DchiEvent": "privaudit.ledger.events",
    "SketchEvent": "privaudit.ledger.events",
    "EncryptedEvent": "privaudit.ledger.events",
    "PlaintextEvent": "privaudit.ledger.events",
    "ClaimEvent": "privaudit.ledger.events",
    "EpsilonResult": "privaudit.accounting.base",
    "compute_epsilon": "privaudit.accounting.base",
    "compute_delta": "privaudit.accounting.base",
    "get_accountant": "privaudit.accounting.base",
    "calibrate_noise": "privaudit.accounting.calibrate",
    "load_config": "privaudit.config",
    "train": "privaudit.runs",
    "load_run": "privaudit.runs",
    "build_report": "privaudit.reports",
    "run_sweep": "privaudit.sweep",
    "audit_run": "privaudit.audit.auditor",
    "audit_model": "privaudit.audit.external",
    "ledger_from_opacus_history": "privaudit.ledger.opacus",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'privaudit' has no attribute {name!r}")
