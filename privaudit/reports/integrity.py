"""The report's one ledger-integrity check: may the report state the ledger's guarantee?

:func:`ledger_integrity` is the only place the report decides this (swap in a sealed-ledger check
here). A guarantee is stated only when the ledger's hash chain verifies *and* the ledger is the
complete one the run finished with: the run's manifest says ``complete`` and records the ledger's
head hash, and that hash equals the head of the chain on disk (a ledger cut short, extended or
replaced after the run no longer matches). Anything else is ``ok = False`` with one sentence why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = ["IntegrityStatus", "ledger_integrity", "manifest_head"]

IntegrityState = Literal["intact", "tampered", "unreadable", "missing", "incomplete", "unverifiable"]


@dataclass(frozen=True)
class IntegrityStatus:
    """``ok``: the report may state the guarantee. ``state``: ``intact`` (chain verifies and matches the
    manifest), ``tampered`` / ``unreadable`` (the chain does not verify), ``missing`` (no ledger),
    ``incomplete`` (head differs from the manifest's, or the run did not finish), ``unverifiable`` (the
    manifest records no head hash to compare). ``reason``: one sentence for the reader."""

    ok: bool
    state: IntegrityState
    reason: str
    head_hash: str | None = None
    manifest_head: str | None = None

    @property
    def head_compared(self) -> str:
        """'matches' / 'DIFFERS' / 'not recorded in the manifest' / 'no ledger head'."""
        if not self.manifest_head:
            return "not recorded in the manifest"
        if not self.head_hash:
            return "no ledger head"
        return "matches" if self.manifest_head == self.head_hash else "DIFFERS"


def manifest_head(manifest: Mapping[str, Any]) -> str | None:
    """The ledger head hash the run recorded (``ledger_head_hash``; ``ledger_head`` in older runs)."""
    for key in ("ledger_head_hash", "ledger_head"):
        v = manifest.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def _manifest(run_dir: Path) -> Mapping[str, Any]:
    try:
        m = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, Mapping) else {}


def ledger_integrity(run_dir: str | Path, public_key: Any = None) -> IntegrityStatus:
    """Read ``run_dir/ledger.jsonl`` with :func:`privaudit.ledger.ledger.read_ledger` (hash chain, seal,
    the manifest's head hash and seal, and ``public_key``'s signature when given) and decide whether
    the report may state its guarantee (see the module docstring)."""
    from privaudit.ledger.ledger import read_ledger

    p = Path(run_dir)
    manifest = _manifest(p)
    recorded = manifest_head(manifest)
    lpath = p / "ledger.jsonl"
    if not lpath.is_file():
        return IntegrityStatus(False, "missing", "the run directory has no ledger.jsonl, so no release is "
                               "accounted for", None, recorded)
    vr = read_ledger(lpath, public_key=public_key, manifest=dict(manifest) or None, collect=False)
    if vr.status == "incomplete":
        return IntegrityStatus(False, "incomplete", f"the ledger is incomplete: {vr.message}", vr.head_hash,
                               recorded)
    if vr.status != "intact":
        return IntegrityStatus(False, vr.status, f"the ledger does not verify ({vr.status}): {vr.message}",
                               vr.head_hash, recorded)
    if manifest.get("status") not in (None, "complete"):
        return IntegrityStatus(False, "incomplete", f"the run did not finish (manifest status "
                               f"'{manifest.get('status')}'), so its ledger may lack releases", vr.head_hash,
                               recorded)
    if recorded is None:
        return IntegrityStatus(False, "unverifiable", "the manifest records no ledger head hash, so the "
                               "ledger's completeness cannot be checked (it may have been cut short)",
                               vr.head_hash, None)
    if recorded != vr.head_hash:
        return IntegrityStatus(False, "incomplete", "the ledger's head hash differs from the one the run "
                               "recorded in its manifest: the ledger was cut short, extended or replaced "
                               "after the run", vr.head_hash, recorded)
    covered = {"covered": "; the seal covers the manifest (config, plan, data, privacy) and the audit key",
               "older run": "; the manifest is not covered by the seal (older run)",
               "external audit": "; the manifest is not covered by the seal (external audit)"}.get(vr.coverage or "", "")
    return IntegrityStatus(True, "intact", f"the hash chain verifies ({vr.message}) and its head matches the "
                           f"manifest{covered}", vr.head_hash, recorded)
