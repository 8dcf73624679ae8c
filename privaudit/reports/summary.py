"""The executive summary: one plain-language sentence per question a reviewer asks about a run.

What was trained, what is guaranteed (one sentence: ε, δ, accountant, neighbouring relation,
observer; or "no formal guarantee" and why; or nothing at all when the ledger fails the integrity
check), what privacy cost in utility against the non-private run, how strong the strongest attack
was, what the audit proves (the empirical lower bound, its confidence and the audit's power), the
verdict and the ledger's integrity. Used by page 1 of the PDF; text only (no reportlab).
"""

from __future__ import annotations

import math
from typing import Sequence

from privaudit.reports.runs_table import AttackResult, RunRecord, format_delta, format_epsilon

__all__ = ["SummaryLine", "executive_summary", "report_verdict", "verdict_explanation", "baseline_for",
           "strongest_attack"]

ACCOUNTANT_TITLES = {"rdp": "RDP", "pld": "PLD", "prv": "PRV"}
_UNIT = {"record": "any single training record", "user": "all the records of any single user",
         "client": "all the data of any single client"}
_RELATION = {"add_remove": "added or removed", "replace": "replaced by another (data-set size public)"}
_OBSERVER = {"released model": "the released model", "server": "everything the server receives"}

SummaryLine = tuple[str, str]


def _eps(x: float) -> str:
    return format_epsilon(x)


def report_verdict(r: RunRecord) -> str:
    """The verdict the report shows: its own re-check where it made one, else audit.json's."""
    if r.guarantee_refused and r.has_guarantee is not False:
        return "not stated (ledger)"
    return r.recheck or r.verdict or ("not audited" if not r.has_audit else "not recorded")


def verdict_explanation(r: RunRecord) -> str:
    """One sentence: why the verdict is what it is."""
    v = report_verdict(r)
    eps, acc = r.primary_epsilon
    acc_t = ACCOUNTANT_TITLES.get(acc or "", acc or "")
    power = r.epsilon_lower_power
    if v.startswith("not stated"):
        return "the ledger fails the integrity check, so no guarantee is stated and nothing is compared"
    if v == "violation":
        refuted = [c for c in r.claims if c.status.startswith("refuted")]
        if refuted and (eps is None or r.epsilon_lower is None or r.epsilon_lower <= eps):
            return (f"the audit proves ε ≥ {_eps(r.epsilon_lower or 0.0)}, above the claimed ε = "
                    f"{_eps(refuted[0].epsilon)}: the claim is false")
        return (f"the audit proves ε ≥ {_eps(r.epsilon_lower or 0.0)}, above the accounted ε: the run leaks "
                "more than its ledger allows (an implementation bug)")
    if v == "no guarantee":
        return "there is no formal guarantee to check; the attacks measure this model's leakage only"
    if v == "inconclusive":
        if r.epsilon_lower is None or r.epsilon_lower_method == "none":
            return "no attack had the power to produce an ε lower bound, so the accounting was not tested"
        if power is not None and eps is not None and math.isfinite(eps) and power < eps:
            return (f"the accounted ε = {_eps(eps)} ({acc_t}) is above the largest lower bound this audit "
                    f"could certify ({_eps(power)}): even a perfect attack could not have shown a violation")
        if power is None:
            return "the audit does not record its power, so a bound below ε proves nothing either way"
        return r.verdict_reason or "the audit could not test the accounted ε"
    if v == "consistent":
        p = f"; the audit could have certified up to {_eps(power)}" if power is not None else ""
        if r.power_refutes_accounted and (power is None or eps is None or power < eps):
            p = ("; its guesses could have rejected the accountant's own trade-off curve (the f-DP one-run "
                 "test), and did not")
        return (f"the empirical lower bound {_eps(r.epsilon_lower or 0.0)} stays below the accounted "
                f"ε = {_eps(eps) if eps is not None else '?'}{p}")
    return "no audit results (run `privaudit audit` on the run directory)"


def baseline_for(r: RunRecord, records: Sequence[RunRecord]) -> RunRecord | None:
    """The non-private run to compare ``r``'s utility with: a run without guarantee measuring the same
    utility on the same data (same fingerprint where recorded), preferring the same mechanism."""
    cands = [b for b in records if b is not r and b.has_guarantee is False and b.utility_value is not None
             and b.utility_name == r.utility_name
             and (r.dataset_fingerprint is None or b.dataset_fingerprint in (None, r.dataset_fingerprint))]
    if not cands:
        return None
    same = [b for b in cands if b.mechanism == r.mechanism]
    return (same or cands)[0]


def _utility_cost(r: RunRecord, records: Sequence[RunRecord]) -> str:
    if r.utility_name is None or r.utility_value is None:
        return "not recorded"
    u = f"{r.utility_name} {r.utility_value:.3f}"
    if r.has_guarantee is False:
        if any(baseline_for(o, records) is r for o in records if o.has_guarantee is not False):
            return f"{u}: the non-private reference the private runs are compared with"
        return f"{u} (no formal guarantee, so no privacy cost to measure)"
    b = baseline_for(r, records)
    if b is None or b.utility_value is None:
        return f"{u} (no non-private run in this report to compare with)"
    lower_better = r.utility_name.lower() in ("perplexity", "loss", "cross_entropy")
    cost = (r.utility_value - b.utility_value) if lower_better else (b.utility_value - r.utility_value)
    rel = f", {abs(cost) / abs(b.utility_value):.1%}" if b.utility_value else ""
    what = "worse" if cost > 0 else "no worse"
    return (f"{u} against {b.utility_value:.3f} without privacy ({b.label}): {abs(cost):.3f} {what}{rel}"
            + (" (lower is better)" if lower_better else ""))


def strongest_attack(r: RunRecord) -> AttackResult | None:
    """The attack with the highest AUC (membership and canary attacks)."""
    scored = [a for a in r.attacks if a.auc is not None]
    return max(scored, key=lambda a: a.auc or 0.0) if scored else None


def _attack_text(r: RunRecord) -> str:
    a = strongest_attack(r)
    if a is None:
        if r.attacks:
            return "no membership attack with an AUC (attacks on the observer's view: see the appendix)"
        return "not audited" if not r.has_audit else "no attack ran"
    ci = a.auc_ci
    parts = [f"{a.name}: AUC {a.auc:.3f}" + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else "")]
    t1 = a.metrics.get("tpr_at_1%_fpr")
    if isinstance(t1, (int, float)) and not isinstance(t1, bool):
        parts.append(f"it finds {t1:.1%} of members while flagging 1% of non-members")
    return "; ".join(parts) + " (AUC 0.5 = guessing)"


def _bound_text(r: RunRecord) -> str:
    power = r.epsilon_lower_power
    ptxt = f"; the most this audit's design could certify is {_eps(power)}" if power is not None else ""
    if r.epsilon_lower is None or r.epsilon_lower_method == "none":
        return ("none: no attack of this audit can produce a lower bound (it needs units included by fair "
                "coins, e.g. canaries)" if r.has_audit else "not audited")
    conf = f" with {r.epsilon_lower_confidence:.0%} confidence" if r.epsilon_lower_confidence else ""
    by = f" ({r.epsilon_lower_attack})" if r.epsilon_lower_attack else ""
    return f"the audit proves ε ≥ {_eps(r.epsilon_lower)}{conf}{by}{ptxt}"


def _guarantee_text(r: RunRecord) -> str:
    if r.guarantee_refused and r.has_guarantee is not False:
        return f"NOT STATED: {r.guarantee_refused}."
    eps, acc = r.primary_epsilon
    if r.has_guarantee is False:
        return f"no formal guarantee: {r.no_guarantee_reason or 'the mechanism makes none'}."
    if eps is None:
        return "not available: no accountant could compute ε and the manifest records none."
    unit = _UNIT.get(r.privacy_unit or "", f"one {r.privacy_unit or 'unit (not recorded)'}")
    rel = _RELATION.get(r.neighbouring or "", f"changed ({r.neighbouring or 'relation not recorded'})")
    obs = _OBSERVER.get(r.observer or "", r.observer or "an unrecorded observer")
    return (f"(ε = {_eps(eps)}, δ = {format_delta(r.delta)})-differential privacy "
            f"({ACCOUNTANT_TITLES.get(acc or '', acc)} accountant): whether {unit} is {rel} changes the "
            f"probability of anything seen by {obs} by at most a factor e^ε ≈ {math.exp(min(eps, 700)):.3g}, plus δ.")


def _trained_text(r: RunRecord) -> str:
    size = f" ({r.dataset_size} records)" if r.dataset_size is not None else ""
    fp = r.dataset_fingerprint or "fingerprint not recorded"
    fp = fp if len(fp) <= 24 else fp[:22] + "…"
    return (f"{r.mechanism} on {r.base_model or 'an unrecorded model'}, data {fp}{size}; privacy unit: "
            f"{r.privacy_unit or 'not recorded'}")


def _ledger_text(r: RunRecord) -> str:
    i = r.integrity
    if i is None:
        return f"{r.ledger_status}: {r.ledger_message}"
    return ("verified: " if i.ok else "FAILED: ") + i.reason


def executive_summary(r: RunRecord, records: Sequence[RunRecord]) -> list[SummaryLine]:
    """(question, plain-language answer) pairs for page 1, in reading order."""
    v = report_verdict(r)
    return [
        ("what was trained", _trained_text(r)),
        ("guarantee", _guarantee_text(r)),
        ("utility cost", _utility_cost(r, records)),
        ("strongest attack", _attack_text(r)),
        ("empirical lower bound", _bound_text(r)),
        ("verdict", f"{v.upper()}: {verdict_explanation(r)}"),
        ("ledger integrity", _ledger_text(r)),
    ]
