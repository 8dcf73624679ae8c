"""privaudit: private fine-tuning, exact privacy ledgers, accountants, audits and reports.

Public API (imported lazily so that ``import privaudit`` stays light)::

    from privaudit import Ledger, GaussianEvent, compute_epsilon, calibrate_noise
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Ledger": "privaudit.audit.ledger",
    "LedgerHeader": "privaudit.audit.ledger",
    "verify_ledger": "privaudit.audit.ledger",
    "GaussianEvent": "privaudit.audit.events",
    "LaplaceEvent": "privaudit.audit.events",
    "DchiEvent": "privaudit.audit.events",
    "SketchEvent": "privaudit.audit.events",
    "EncryptedEvent": "privaudit.audit.events",
    "PlaintextEvent": "privaudit.audit.events",
    "ClaimEvent": "privaudit.audit.events",
    "EpsilonResult": "privaudit.audit.accountants.base",
    "compute_epsilon": "privaudit.audit.accountants.base",
    "compute_delta": "privaudit.audit.accountants.base",
    "get_accountant": "privaudit.audit.accountants.base",
    "calibrate_noise": "privaudit.audit.accountants.calibrate",
    "load_config": "privaudit.config",
    "train": "privaudit.runs",
    "load_run": "privaudit.runs",
    "build_report": "privaudit.reports",
    "run_sweep": "privaudit.sweep",
    "audit_run": "privaudit.audit.auditor",
    "audit_model": "privaudit.audit.external",
    "ledger_from_opacus_history": "privaudit.audit.opacus_ledger",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'privaudit' has no attribute {name!r}")
