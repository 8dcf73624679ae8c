"""Load run directories (manifest.json, ledger.jsonl, audit.json) into report records and tables.

Every field of a run directory may be missing in older runs: loading degrades to "not available"
and never crashes on a missing optional field. Only a missing directory or ``manifest.json`` is an
error (``ValueError`` naming it).

Accounting is re-done from the ledger where the accountants are available; the values recorded in
the manifest are kept beside them. Fail-closed: where both exist and disagree, the larger ε (more
spend) is used and the disagreement is reported. Conventions of the values:

* an ε of ``math.inf`` means *no formal guarantee*; ``None`` means *not available* (not computed,
  accountant missing, unsupported event). The two are never conflated, and neither is shown as 0.
* δ is the manifest's ``privacy.delta``, else the ledger header's ``target_delta``, else the audit's.
* A ledger with no release events at all accounts for nothing that was released, so it gives no
  guarantee (an empty ledger composes to ε = 0, which would under-count the trained model).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from privaudit.reports.integrity import IntegrityStatus, ledger_integrity, manifest_head as _manifest_head

ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld", "prv")
PRIMARY_ORDER: tuple[str, ...] = ("pld", "prv", "rdp")  # preferred accountant for a single ε value
_RELEASE_TYPES = ("gaussian", "laplace", "dchi", "sketch", "encrypted", "plaintext")
_MISMATCH_RTOL = 1e-3
_MECHANISM_PARTS = ("metric_dp", "against_worker", "released_model")


# --------------------------------------------------------------------------------------- formats
BOUND_TITLES: dict[str, str] = {
    "one_run_steinke": "Steinke", "one_run": "Steinke", "one_run_fdp": "f-DP, Gaussian",
    "one_run_fdp_accounted": "f-DP, accountant's curve", "clopper_pearson": "Clopper-Pearson", "gdp": "GDP",
}
"""Short titles of the bound an ε lower bound comes from (``audit.json``'s ``bound``)."""


def format_epsilon(x: float | None) -> str:
    """How an ε appears in the PDF and tables: 3 decimals, ``∞`` for no guarantee."""
    if x is None:
        return "not available"
    if math.isinf(x):
        return "∞"
    if abs(x) < 1000:
        return f"{x:.3f}"
    return f"{x:.4g}"


def format_delta(x: float | None) -> str:
    return "not available" if x is None else f"{x:.3g}"


def format_number(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.{digits}g}"


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class AccountedEpsilon:
    """ε of one accountant at the run's δ: recomputed from the ledger and/or read from the manifest."""

    accountant: str
    delta: float | None
    recomputed: float | None = None
    lower: float | None = None
    upper: float | None = None
    manifest: float | None = None
    note: str | None = None  # why recomputation is not available, or a mismatch

    @property
    def value(self) -> float | None:
        """The ε to report: recomputed if available, the manifest's otherwise, the larger on mismatch."""
        vals = [v for v in (self.recomputed, self.manifest) if v is not None]
        return max(vals) if vals else None

    @property
    def certified_upper(self) -> float | None:
        """A value no smaller than the true ε (the accountant's upper bound where it gives one)."""
        v = self.value
        if v is None:
            return None
        if self.upper is not None and self.recomputed is not None and v == self.recomputed:
            return max(self.upper, v)
        return v

    @property
    def mismatch(self) -> bool:
        if self.recomputed is None or self.manifest is None:
            return False
        a, b = self.recomputed, self.manifest
        if math.isinf(a) or math.isinf(b):
            return a != b
        return abs(a - b) > _MISMATCH_RTOL * max(1.0, abs(a), abs(b))


@dataclass(frozen=True)
class Claim:
    """A guarantee someone asserts: (ε, δ) with its source and scope, and what the evidence says."""

    epsilon: float
    delta: float
    source: str = ""
    scope: str = ""
    status: str = ""


@dataclass(frozen=True)
class AttackResult:
    """One attack of audit.json: metrics (AUC, TPR at fixed FPR ...), optional ROC and ε lower bound."""

    name: str
    kind: str
    metrics: Mapping[str, Any]
    fpr: tuple[float, ...] | None = None
    tpr: tuple[float, ...] | None = None
    epsilon_lower: float | None = None
    epsilon_lower_confidence: float | None = None
    epsilon_lower_method: str | None = None
    power: float | None = None  # the largest ε_lower this attack's design could certify
    family_confidence: float | None = None  # the confidence of the audit's maximum (Bonferroni)

    @property
    def auc(self) -> float | None:
        return _num(self.metrics.get("auc"))

    @property
    def auc_ci(self) -> tuple[float, float] | None:
        ci = self.metrics.get("auc_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            lo, hi = _num(ci[0]), _num(ci[1])
            if lo is not None and hi is not None:
                return (lo, hi)
        return None


@dataclass(frozen=True)
class RunRecord:
    """Everything the report shows about one run directory."""

    path: Path
    run_id: str
    label: str
    mechanism: str
    base_model: str | None
    task: str | None
    dataset_fingerprint: str | None
    dataset_size: int | None
    dataset_source: str | None
    privacy_unit: str | None
    neighbouring: str | None
    observer: str | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    utility_name: str | None
    utility_value: float | None
    utility_split: str | None
    train_loss: float | None
    accounted: tuple[AccountedEpsilon, ...]
    no_guarantee_reason: str | None
    claims: tuple[Claim, ...]
    attacks: tuple[AttackResult, ...]
    epsilon_lower: float | None
    epsilon_lower_confidence: float | None
    epsilon_lower_method: str | None
    epsilon_lower_attack: str | None
    audit_delta: float | None
    verdict: str | None
    recheck: str | None
    ledger_status: str
    ledger_message: str
    ledger_head: str | None
    manifest_ledger_head: str | None
    event_counts: Mapping[str, int]
    encrypted_security_bits: tuple[int, ...]
    eps_over_steps: tuple[tuple[int, float], ...]
    eps_over_steps_accountant: str | None
    versions: Mapping[str, str]
    created: str | None
    status: str | None
    has_audit: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    lora_rank: int | None = None  # the config's lora.rank (None: not a LoRA run / not recorded)
    a_secret: bool | None = None  # lora_sketch: A kept secret (None: not a frozen-A run)
    # mechanism-specific guarantees from the manifest's privacy section: ``metric_dp`` (PrivTune's
    # metric-DP report), ``against_worker`` and ``released_model`` (HE-LoRA); empty when none
    mechanism_privacy: Mapping[str, Any] = field(default_factory=dict)
    # the report's ledger-integrity check (reports/integrity.py); not ok: no guarantee is stated
    integrity: IntegrityStatus | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # the manifest's config (for naming runs)
    headline_accountant: str | None = None  # the one accountant of the whole report (see load_runs)
    epsilon_lower_power: float | None = None  # the largest ε_lower the audit's design could certify
    epsilon_lower_power_attack: str | None = None
    verdict_reason: str | None = None
    named: bool = True  # False: the manifest names no run, the label is derived from the config
    # perfect guesses on the audit's design would have rejected the accountant's own trade-off curve
    power_refutes_accounted: bool = False

    # -- derived ------------------------------------------------------------------------------
    def accountant(self, name: str) -> AccountedEpsilon | None:
        for a in self.accounted:
            if a.accountant == name:
                return a
        return None

    @property
    def guarantee_refused(self) -> str | None:
        """Why the report states no guarantee for this run (the ledger fails the integrity check), or None."""
        if self.integrity is not None and not self.integrity.ok:
            return self.integrity.reason
        return None

    @property
    def has_guarantee(self) -> bool | None:
        """True: a finite ε; False: no formal guarantee (ε = ∞); None: not known (nothing available, or
        the ledger fails the integrity check)."""
        hg = _has_guarantee(self.accounted, self.no_guarantee_reason, self.verdict)
        return None if hg is not False and self.guarantee_refused else hg

    @property
    def primary_epsilon(self) -> tuple[float | None, str | None]:
        """(ε, accountant) used where one value is needed: the report's headline accountant, else PLD,
        else PRV, else RDP; ∞ without guarantee; (None, None) when not available or refused."""
        hg = self.has_guarantee
        if hg is False:
            return math.inf, None
        if hg is None:
            return None, None
        order = PRIMARY_ORDER if self.headline_accountant is None else (self.headline_accountant, *PRIMARY_ORDER)
        for name in order:
            a = self.accountant(name)
            if a is not None and a.value is not None:
                return a.value, name
        return None, None

    @property
    def min_certified_upper(self) -> float | None:
        """The smallest ε some accountant certifies (any valid upper bound bounds the true ε)."""
        hg = self.has_guarantee
        return None if hg is None else _min_upper(self.accounted, hg)

    @property
    def ledger_intact(self) -> bool:
        return self.ledger_status == "intact"


# --------------------------------------------------------------------------------------- helpers
def _num(x: Any) -> float | None:
    """A JSON value as float: numbers, "inf"/"Infinity" strings; None for anything else."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x) if not math.isnan(float(x)) else None
    if isinstance(x, str) and x.strip().lower() in ("inf", "infinity", "+inf", "∞"):
        return math.inf
    return None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None and math.isfinite(v) else None


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) and x else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _read_json(path: Path, what: str) -> Any:
    from privaudit.safe_read import read_json_file  # a regular file in the run dir, size-capped

    return read_json_file(path, what, root=path.parent)


def _try_epsilon(events: Sequence[Any], delta: float, neighbouring: str, name: str
                 ) -> tuple[Any | None, str | None]:
    """EpsilonResult of one accountant, or (None, why it is not available)."""
    try:
        from privaudit.accounting.base import compute_epsilon

        return compute_epsilon(list(events), delta, accountant=name, neighbouring=neighbouring), None  # type: ignore[arg-type]
    except ImportError as exc:
        return None, f"accountant not installed ({exc.name or exc})"
    except ValueError as exc:
        return None, str(exc)
    except (ArithmeticError, RuntimeError) as exc:  # a numerical failure: unknown, never 0
        return None, f"accountant failed ({type(exc).__name__}: {exc})"


def prefix_events(events: Sequence[Any], steps: int) -> list[Any]:
    """The events of the first ``steps`` Gaussian releases, in ledger order.

    Non-Gaussian events are kept where they occur before the cut (fail-closed: an event between two
    Gaussian lines counts from the earlier line's last step); a Gaussian line straddling the cut is
    truncated and nothing after it is kept.
    """
    from privaudit.ledger.events import GaussianEvent

    out: list[Any] = []
    seen = 0
    for ev in events:
        if isinstance(ev, GaussianEvent):
            if seen >= steps:
                break
            take = min(ev.count, steps - seen)
            seen += take
            if take < ev.count:  # the cut falls inside this line: what follows came later
                out.append(ev.with_count(take))
                break
            out.append(ev)
        else:
            out.append(ev)
    return out


def epsilon_over_steps(events: Sequence[Any], delta: float, neighbouring: str, *,
                       accountants: Sequence[str] = ("rdp", "pld", "prv"), points: int = 20
                       ) -> tuple[list[tuple[int, float]], str | None]:
    """ε after the first k Gaussian releases, for ``points`` values of k up to the total.

    Uses the first accountant of ``accountants`` that works (the report's order: PLD, PRV, RDP, so
    that the curve ends at the headline ε). Returns ([(k, ε)], accountant) or ([], None) when there is no Gaussian event or no
    accountant.
    """
    from privaudit.ledger.events import GaussianEvent

    total = sum(ev.count for ev in events if isinstance(ev, GaussianEvent))
    if total == 0 or points < 1:
        return [], None
    cuts = sorted({max(1, round(total * i / points)) for i in range(1, points + 1)})
    for name in accountants:
        series: list[tuple[int, float]] = []
        for k in cuts:
            res, _ = _try_epsilon(prefix_events(events, k), delta, neighbouring, name)
            if res is None:
                break
            series.append((k, float(res.epsilon)))
        else:
            return series, name
    return [], None


def _claim_key(c: Claim) -> tuple[float, float, str, str]:
    return (round(c.epsilon, 9), round(c.delta, 12), c.source, c.scope)


def _claim_status(c: Claim, lower: float | None, lower_delta: float | None,
                  min_upper: float | None, acc_delta: float | None) -> str:
    """What the audit and the accountants say about a claim (δ-monotonicity respected)."""
    parts: list[str] = []
    if lower is not None and lower_delta is not None and c.delta <= lower_delta and lower > c.epsilon:
        parts.append(f"refuted by audit (ε_lower {format_epsilon(lower)} > claimed)")
    if min_upper is not None and math.isinf(min_upper):
        parts.append("not backed: no formal guarantee")
    elif min_upper is not None and acc_delta is not None and acc_delta <= c.delta:
        if min_upper <= c.epsilon * (1 + 1e-9):
            parts.append("backed by accounting")
        else:
            parts.append(f"not backed: accounted {format_epsilon(min_upper)} > claimed")
    elif min_upper is not None:
        parts.append("not comparable (different δ)")
    if not parts:
        parts.append("not checked")
    return "; ".join(parts)


def _recheck(has_guarantee: bool | None, min_upper: float | None, acc_delta: float | None,
             lower: float | None, lower_delta: float | None, claims: Sequence[Claim],
             power: float | None = None, bound_method: str | None = None, *,
             assumption_free: float | None = None, accounted_refuted: bool = False,
             power_refutes_accounted: bool = False) -> str | None:
    """Independent verdict from the recomputed ε and the audit's lower bound, by the auditor's rules:
    ``violation`` when the audit's test against the accountant's own trade-off curve rejected it
    (``accounted_refuted``) or an assumption-free bound (``assumption_free``; ``lower`` itself for
    audits that record none) exceeds the recomputed ε — a bound that assumes a Gaussian trade-off
    curve alone above it is ``inconclusive``; ``consistent`` needs a computed bound (``bound_method``
    not ``"none"``) and the power to have shown a violation: the largest ε_lower the design could
    certify (``power``) at least the accounted ε, or perfect guesses that would have rejected the
    accountant's curve (``power_refutes_accounted``); otherwise ``inconclusive``."""
    if lower is None:
        return None
    refuted = any(c.status.startswith("refuted") for c in claims)
    if has_guarantee is False:
        return "violation" if refuted else "no guarantee"
    if accounted_refuted:
        return "violation"
    if min_upper is None or acc_delta is None or lower_delta is None or acc_delta > lower_delta:
        return "violation" if refuted else None
    sound = lower if assumption_free is None else assumption_free
    if sound > min_upper or refuted:
        return "violation"
    if lower > min_upper:
        return "inconclusive"
    if bound_method == "none" or ((power is None or power < min_upper) and not power_refutes_accounted):
        return "inconclusive"
    return "consistent"


# --------------------------------------------------------------------------------------- loading
def load_run_record(run_dir: str | Path, *, accountants: Sequence[str] = ACCOUNTANTS,
                    steps_points: int = 20, steps_accountants: Sequence[str] = PRIMARY_ORDER,
                    public_key: Any = None) -> RunRecord:
    """Read one run directory. ``ValueError`` if it does not exist or has no manifest.json.

    The ledger is read by :func:`privaudit.ledger.ledger.read_ledger` against the manifest (head hash
    and seal) and ``public_key`` when given; its events are used only if it verifies (``intact``):
    ``ledger_status`` says ``incomplete``/``tampered``/``unreadable`` otherwise, with the reason. The
    report states a guarantee only when :func:`~privaudit.reports.integrity.ledger_integrity` says so."""
    from privaudit.ledger.events import EncryptedEvent
    from privaudit.ledger.ledger import read_ledger

    p = Path(run_dir)
    if not p.is_dir():
        raise ValueError(f"run_dir: {p} does not exist or is not a directory")
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"run_dir: {p} has no manifest.json")
    manifest = _read_json(mpath, "manifest")
    if not isinstance(manifest, Mapping):
        raise ValueError(f"manifest: {mpath} is not a JSON object")
    warnings: list[str] = []

    # -- audit.json (optional) ---------------------------------------------------------------
    audit: Mapping[str, Any] = {}
    apath = p / "audit.json"
    if apath.is_file():
        try:
            a = _read_json(apath, "audit")
            if isinstance(a, Mapping):
                audit = a
            else:
                warnings.append("audit.json is not a JSON object: ignored")
        except ValueError as exc:
            warnings.append(f"{exc}: ignored")

    # -- ledger ------------------------------------------------------------------------------
    lpath = p / "ledger.jsonl"
    header: Any = None
    events: list[Any] = []
    ledger_head: str | None = None
    if lpath.is_file():
        vr = read_ledger(lpath, public_key=public_key, manifest=dict(manifest))
        ledger_status, ledger_message, ledger_head = vr.status, vr.message, vr.head_hash
        if vr.verified:
            header, events = vr.header, list(vr.events)
            if vr.no_releases:
                ledger_message = f"{ledger_message}; no releases recorded"
        else:
            warnings.append(f"ledger verification failed ({vr.status}): {vr.message}; its events are not used")
    else:
        ledger_status, ledger_message = "missing", "no ledger.jsonl in the run directory"
        warnings.append("no ledger.jsonl: ε cannot be recomputed or verified")

    integrity = ledger_integrity(p, public_key=public_key)
    manifest_head = _manifest_head(manifest)  # compared by read_ledger above

    # -- identity and privacy setting --------------------------------------------------------
    privacy = manifest.get("privacy") if isinstance(manifest.get("privacy"), Mapping) else {}
    run_id = (_str(manifest.get("run_id")) or (header.run_id if header is not None else None)
              or _str(audit.get("run_id")) or p.name)
    label = _str(manifest.get("name")) or run_id
    mechanism = (_str(manifest.get("mechanism")) or (header.mechanism if header is not None else None)
                 or "unspecified")
    delta = _num(privacy.get("delta"))
    if delta is None and header is not None:
        delta = header.target_delta
    audit_delta = _num(_get(audit, "accounted", "delta"))
    if delta is None:
        delta = audit_delta
    neighbouring = header.neighbouring if header is not None else _str(_get(manifest, "config", "neighbouring"))
    privacy_unit = header.privacy_unit if header is not None else _str(_get(manifest, "config", "privacy_unit"))
    observer = header.observer if header is not None else _str(audit.get("observer"))

    # -- accounting --------------------------------------------------------------------------
    release_types = {getattr(ev, "type", "") for ev in events} & set(_RELEASE_TYPES)
    no_guarantee: str | None = None
    if header is not None and not release_types and ledger_status == "intact":
        warnings.append("no releases recorded: the sealed ledger accounts for no release (ε = 0 by every "
                        "reader)")
    if header is not None:
        from privaudit.accounting.base import segments_from_events

        try:  # structural: plaintext releases, noise-free sketching (needs no accountant)
            no_guarantee = segments_from_events(events, header.neighbouring).no_guarantee
        except ValueError:
            pass  # e.g. a metric-DP event: the accountants say why, per accountant
    # fail-closed: a mechanism's own statement that the released model has no guarantee (HE-LoRA without
    # owner-side noise, in the manifest or the ledger header), or that its releases have no (ε, δ) form
    # (PrivTune's metric DP), overrides an ε the accountants would compute from the ledger alone
    mech_privacy = {k: dict(privacy[k]) for k in _MECHANISM_PARTS if isinstance(privacy.get(k), Mapping)}
    released = mech_privacy.get("released_model") or {}
    header_he = (getattr(header, "model_extra", None) or {}).get("he_lora") if header is not None else None
    if no_guarantee is None and released.get("guarantee") == "none":
        no_guarantee = f"released model: {released.get('reason') or 'no guarantee'}"
    elif no_guarantee is None and isinstance(header_he, Mapping) and str(header_he.get("released_model", "")
                                                                         ).startswith("none"):
        no_guarantee = f"released model: {header_he.get('released_model')}"
    elif no_guarantee is None and "metric_dp" in mech_privacy and privacy.get("guarantee") == "none":
        no_guarantee = _str(privacy.get("reason")) or "no (ε, δ) guarantee (metric DP only)"
    accounted: list[AccountedEpsilon] = []
    man_eps = privacy.get("epsilon") if isinstance(privacy.get("epsilon"), Mapping) else {}
    can_recompute = header is not None and delta is not None and ledger_status == "intact"
    for name in accountants:
        manifest_val = _num(man_eps.get(name))
        rec = lo = up = None
        note: str | None = None
        if can_recompute and no_guarantee is not None:
            rec, note = math.inf, f"no guarantee: {no_guarantee}"
        elif can_recompute:
            res, why = _try_epsilon(events, delta, header.neighbouring, name)  # type: ignore[arg-type]
            if res is not None:
                rec, lo, up = float(res.epsilon), res.epsilon_lower, res.epsilon_upper
                if math.isinf(rec) and no_guarantee is None:
                    no_guarantee = res.reason or "the accountant gives no finite ε"
            else:
                note = f"not available: {why}"
        elif ledger_status != "intact":
            note = f"not recomputed: ledger {ledger_status}"
        else:
            note = "not recomputed: no δ recorded"
        acc = AccountedEpsilon(name, delta, rec, lo, up, manifest_val, note)
        if acc.mismatch:
            acc = AccountedEpsilon(name, delta, rec, lo, up, manifest_val,
                                   f"manifest {format_epsilon(manifest_val)} differs from ledger; "
                                   "larger value used")
            warnings.append(f"{name}: manifest ε {format_epsilon(manifest_val)} differs from the "
                            f"ledger's {format_epsilon(rec)}; the larger is reported")
        accounted.append(acc)

    # -- audit results -----------------------------------------------------------------------
    attacks: list[AttackResult] = []
    for a in audit.get("attacks") or []:
        if not isinstance(a, Mapping):
            continue
        roc = a.get("roc") if isinstance(a.get("roc"), Mapping) else {}
        fpr, tpr = roc.get("fpr"), roc.get("tpr")
        fpr_t = tpr_t = None
        if isinstance(fpr, list) and isinstance(tpr, list) and len(fpr) == len(tpr) and fpr:
            pairs = [(_num(f), _num(t)) for f, t in zip(fpr, tpr)]
            pairs = [(f, t) for f, t in pairs if f is not None and t is not None]
            if pairs:
                fpr_t = tuple(f for f, _ in pairs)
                tpr_t = tuple(t for _, t in pairs)
        el = a.get("epsilon_lower") if isinstance(a.get("epsilon_lower"), Mapping) else {}
        attacks.append(AttackResult(
            name=_str(a.get("name")) or "attack", kind=_str(a.get("kind")) or "",
            metrics=dict(a.get("metrics")) if isinstance(a.get("metrics"), Mapping) else {},
            fpr=fpr_t, tpr=tpr_t, epsilon_lower=_num(el.get("value")),
            epsilon_lower_confidence=_num(el.get("confidence")),
            epsilon_lower_method=_str(el.get("bound") or el.get("method")),  # the bound's name when given
            power=_num(el.get("power")), family_confidence=_num(el.get("family_confidence")),
        ))
    el_top = audit.get("epsilon_lower") if isinstance(audit.get("epsilon_lower"), Mapping) else {}
    eps_lower = _num(el_top.get("value"))
    if eps_lower is None:
        per_attack = [a for a in attacks if a.epsilon_lower is not None]
        if per_attack:
            best = max(per_attack, key=lambda a: a.epsilon_lower or 0.0)
            el_top = {"value": best.epsilon_lower, "confidence": best.epsilon_lower_confidence,
                      "method": best.epsilon_lower_method, "attack": best.name}
            eps_lower = best.epsilon_lower
    verdict = _str(audit.get("verdict"))
    power = _num(el_top.get("power"))
    if eps_lower is None and _str(el_top.get("reason")):  # e.g. a checkpoint audit without fair-coin membership
        warnings.append(f"no empirical ε lower bound: {el_top.get('reason')}")

    # -- claims --------------------------------------------------------------------------------
    raw_claims: list[Claim] = []
    if header is not None:
        from privaudit.ledger.events import ClaimEvent

        for c in list(header.claims) + [e for e in events if isinstance(e, ClaimEvent)]:
            raw_claims.append(Claim(c.epsilon, c.delta, c.source, c.scope))
    for c in audit.get("claimed") or []:
        if isinstance(c, Mapping) and _num(c.get("epsilon")) is not None:
            raw_claims.append(Claim(_num(c.get("epsilon")) or 0.0, _num(c.get("delta")) or 0.0,
                                    _str(c.get("source")) or "", _str(c.get("scope")) or ""))
    seen: set[tuple[float, float, str, str]] = set()
    claims_unique: list[Claim] = []
    for c in raw_claims:
        if _claim_key(c) not in seen:
            seen.add(_claim_key(c))
            claims_unique.append(c)

    # the derived accounting values used to check claims and the verdict
    hg = _has_guarantee(tuple(accounted), no_guarantee, verdict)
    min_upper = _min_upper(tuple(accounted), hg)
    lower_delta = audit_delta if audit_delta is not None else delta
    claims = tuple(Claim(c.epsilon, c.delta, c.source, c.scope,
                         _claim_status(c, eps_lower, lower_delta, min_upper, delta))
                   for c in claims_unique)
    refused = None if integrity.ok or hg is False else integrity.reason
    tradeoff = (audit.get("accounted") or {}).get("tradeoff_test") if isinstance(audit.get("accounted"), Mapping) \
        else None
    tradeoff = tradeoff if isinstance(tradeoff, Mapping) else {}
    recheck = None if refused else _recheck(hg, min_upper, delta, eps_lower, lower_delta, claims, power,
                                            _str(el_top.get("method")),
                                            assumption_free=_num(el_top.get("assumption_free")),
                                            accounted_refuted=tradeoff.get("refuted") is True,
                                            power_refutes_accounted=el_top.get("power_refutes_accounted") is True)
    if verdict and recheck and verdict != recheck:
        warnings.append(f"audit.json verdict '{verdict}' differs from the report's re-check '{recheck}'")

    # -- ε over steps ----------------------------------------------------------------------------
    series: list[tuple[int, float]] = []
    series_acc: str | None = None
    if can_recompute and steps_points > 0:
        series, series_acc = epsilon_over_steps(events, delta, header.neighbouring,  # type: ignore[arg-type]
                                                accountants=steps_accountants, points=steps_points)

    counts: dict[str, int] = {}
    for ev in events:
        t = getattr(ev, "type", "?")
        counts[t] = counts.get(t, 0) + int(getattr(ev, "count", 1))
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), Mapping) else {}
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), Mapping) else {}
    utility = metrics.get("utility") if isinstance(metrics.get("utility"), Mapping) else {}
    dataset = manifest.get("dataset") if isinstance(manifest.get("dataset"), Mapping) else {}

    return RunRecord(
        path=p, run_id=run_id, label=label, mechanism=mechanism,
        base_model=_str(manifest.get("base_model")) or (header.base_model if header is not None else None),
        task=_str(manifest.get("task")),
        dataset_fingerprint=_str(dataset.get("fingerprint"))
        or (header.dataset_fingerprint if header is not None else None),
        dataset_size=_int(dataset.get("size")) if dataset.get("size") is not None
        else (header.dataset_size if header is not None else None),
        dataset_source=_str(dataset.get("source")),
        privacy_unit=privacy_unit, neighbouring=neighbouring, observer=observer, delta=delta,
        noise_multiplier=_num(privacy.get("noise_multiplier")), sample_rate=_num(privacy.get("sample_rate")),
        steps=_int(privacy.get("steps")) if privacy.get("steps") is not None else _int(metrics.get("steps")),
        utility_name=_str(utility.get("name")), utility_value=_num(utility.get("value")),
        utility_split=_str(utility.get("split")), train_loss=_num(metrics.get("train_loss")),
        accounted=tuple(accounted), no_guarantee_reason=no_guarantee, claims=claims,
        attacks=tuple(attacks), epsilon_lower=eps_lower,
        epsilon_lower_confidence=_num(el_top.get("confidence")),
        epsilon_lower_method=_str(el_top.get("bound") or el_top.get("method")),
        epsilon_lower_attack=_str(el_top.get("attack")),
        audit_delta=audit_delta, verdict=verdict, recheck=recheck,
        ledger_status=ledger_status, ledger_message=ledger_message, ledger_head=ledger_head,
        manifest_ledger_head=manifest_head, event_counts=counts,
        encrypted_security_bits=tuple(ev.security_bits for ev in events if isinstance(ev, EncryptedEvent)),
        eps_over_steps=tuple(series), eps_over_steps_accountant=series_acc,
        versions={str(k): str(v) for k, v in versions.items()},
        created=_str(manifest.get("created")), status=_str(manifest.get("status")),
        has_audit=bool(audit), warnings=tuple(warnings),
        lora_rank=_int(_get(manifest, "config", "lora", "rank")),
        a_secret=(bool(_get(manifest, "config", "options", "a_secret"))
                  if mechanism == "lora_sketch" else None),
        mechanism_privacy=mech_privacy, integrity=integrity,
        config=dict(manifest["config"]) if isinstance(manifest.get("config"), Mapping) else {},
        epsilon_lower_power=power, epsilon_lower_power_attack=_str(el_top.get("power_attack")),
        verdict_reason=_str(audit.get("verdict_reason")), named=_str(manifest.get("name")) is not None,
        power_refutes_accounted=el_top.get("power_refutes_accounted") is True,
    )


def _has_guarantee(accounted: tuple[AccountedEpsilon, ...], no_guarantee_reason: str | None,
                   verdict: str | None) -> bool | None:
    if no_guarantee_reason is not None:
        return False
    vals = [a.value for a in accounted if a.value is not None]
    if any(math.isinf(v) for v in vals):
        return False
    if vals:
        return True
    return False if verdict == "no guarantee" else None


def _min_upper(accounted: tuple[AccountedEpsilon, ...], hg: bool | None) -> float | None:
    if hg is False:
        return math.inf
    ups = [a.certified_upper for a in accounted if a.certified_upper is not None]
    return min(ups) if ups else None


def load_runs(run_dirs: Iterable[str | Path], *, progress: Callable[[str], None] | None = None,
              **kwargs: Any) -> list[RunRecord]:
    """Load several run directories (all are checked to exist before any is loaded)."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("run_dirs: no run directory given")
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"run_dir: {d} does not exist or is not a directory")
        if not (d / "manifest.json").is_file():
            raise ValueError(f"run_dir: {d} has no manifest.json")
    records = []
    for i, d in enumerate(dirs, 1):
        if progress:
            progress(f"loading run {i}/{len(dirs)}: {d}")
        records.append(load_run_record(d, **kwargs))
    records = name_runs(records)
    acc = headline_accountant(records)
    records = [replace(r, headline_accountant=acc) for r in records]
    labels = [r.label for r in records]
    if len(set(labels)) != len(labels):  # make labels unique for legends and tables
        records = [_relabel(r, f"{r.label} ({r.run_id[:8]})") if labels.count(r.label) > 1 else r
                   for r in records]
        labels = [r.label for r in records]
        if len(set(labels)) != len(labels):
            records = [_relabel(r, f"{r.label} #{i + 1}") for i, r in enumerate(records)]
    return records


def _relabel(r: RunRecord, label: str) -> RunRecord:
    return replace(r, label=label)


def headline_accountant(records: Sequence[RunRecord]) -> str | None:
    """The one accountant of a report: among those that give a finite ε for every run with a guarantee,
    the tightest (smallest total ε; ties in the order PLD, PRV, RDP). None when no accountant covers
    every such run (each run then falls back to PLD, else PRV, else RDP)."""
    runs = [r for r in records if r.has_guarantee is True]
    best: tuple[float, int, str] | None = None
    for i, name in enumerate(PRIMARY_ORDER):
        vals = [r.accountant(name).value if r.accountant(name) is not None else None for r in runs]  # type: ignore[union-attr]
        if not runs or any(v is None or not math.isfinite(v) for v in vals):
            continue
        key = (sum(vals), i, name)  # type: ignore[arg-type]
        if best is None or key < best:
            best = key
    return best[2] if best else None


_LABEL_SKIP = ("seed", "noise_seed", "output", "name")
_LABEL_NAMES = {"lora.rank": "rank", "lora.alpha": "α", "privacy.target_epsilon": "target ε",
                "privacy.noise_multiplier": "σ", "training.steps": "steps", "training.learning_rate": "lr",
                "options.a_secret": "A secret", "privacy.clip_norm": "clip"}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    text = str(v)
    return text if len(text) <= 24 else text[:23] + "…"


def name_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Runs whose manifest names none get a label from what distinguishes them: the mechanism, the
    privacy level (non-private, target ε or σ) and up to three config values that differ between the
    runs (e.g. ``dp_lora, target ε = 4, rank = 8``), never a hex run id."""
    flat = [_flatten(r.config) for r in records]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1
                 and not k.startswith("privacy.") and k.rsplit(".", 1)[-1] not in _LABEL_SKIP]
    out = []
    for r, f in zip(records, flat):
        if r.named:
            out.append(r)
            continue
        parts = [r.mechanism]
        target, sigma = f.get("privacy.target_epsilon"), f.get("privacy.noise_multiplier")
        if r.has_guarantee is False or sigma == 0:
            parts.append("non-private" if sigma == 0 else "no guarantee")
        elif isinstance(target, (int, float)):
            parts.append(f"target ε = {target:g}")
        elif isinstance(sigma, (int, float)):
            parts.append(f"σ = {sigma:g}")
        parts += [f"{_LABEL_NAMES.get(k, k.rsplit('.', 1)[-1])} = {_short(f.get(k))}" for k in differing[:3]]
        out.append(replace(r, label=", ".join(parts)))
    return out


# --------------------------------------------------------------------------------------- tables
def _json_eps(x: float | None) -> float | str | None:
    """ε for JSON/CSV: a number, ``"inf"`` for no guarantee, null/empty for not available."""
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def run_row(r: RunRecord) -> dict[str, Any]:
    """One flat row per run (CSV/JSON). ε: number, "inf" (no guarantee) or null (not available)."""
    eps, acc = r.primary_epsilon
    row: dict[str, Any] = {
        "run_id": r.run_id, "label": r.label, "path": str(r.path), "mechanism": r.mechanism,
        "base_model": r.base_model, "task": r.task, "dataset_fingerprint": r.dataset_fingerprint,
        "dataset_size": r.dataset_size, "privacy_unit": r.privacy_unit, "neighbouring": r.neighbouring,
        "observer": r.observer, "delta": r.delta, "noise_multiplier": r.noise_multiplier,
        "sample_rate": r.sample_rate, "steps": r.steps, "utility_name": r.utility_name,
        "utility_value": r.utility_value, "utility_split": r.utility_split, "train_loss": r.train_loss,
    }
    for a in r.accounted:
        row[f"epsilon_{a.accountant}"] = _json_eps(a.value)
        row[f"epsilon_{a.accountant}_recomputed"] = _json_eps(a.recomputed)
        row[f"epsilon_{a.accountant}_manifest"] = _json_eps(a.manifest)
    row.update({
        "epsilon": _json_eps(eps), "epsilon_accountant": acc,
        "guarantee": {True: "finite", False: "none", None: "unknown"}[r.has_guarantee],
        "no_guarantee_reason": r.no_guarantee_reason,
        "claimed_epsilon": "; ".join(f"{format_epsilon(c.epsilon)} (δ={format_delta(c.delta)})"
                                     for c in r.claims) or None,
        "epsilon_lower": r.epsilon_lower, "epsilon_lower_confidence": r.epsilon_lower_confidence,
        "epsilon_lower_method": r.epsilon_lower_method, "epsilon_lower_attack": r.epsilon_lower_attack,
        "epsilon_lower_power": r.epsilon_lower_power,
        "verdict": r.verdict, "recheck": r.recheck, "ledger_status": r.ledger_status,
        "ledger_integrity": r.integrity.state if r.integrity else None,
        "guarantee_refused": r.guarantee_refused,
        "ledger_head": r.ledger_head, "warnings": " | ".join(r.warnings) or None,
    })
    md = r.mechanism_privacy.get("metric_dp") or {}
    worker = r.mechanism_privacy.get("against_worker") or {}
    released = r.mechanism_privacy.get("released_model") or {}
    row.update({
        "metric_dp_guarantee": md.get("guarantee"), "metric_dp_eta": md.get("eta"),
        "metric_dp_epsilon_at_median_nn": md.get("epsilon_at_median_nn"),
        "metric_dp_median_nn_distance": md.get("median_nn_distance"),
        "against_worker": worker.get("statement"), "worker_bytes_to": worker.get("bytes_to_worker"),
        "worker_bytes_from": worker.get("bytes_from_worker"),
        "released_model_guarantee": released.get("guarantee"), "released_model_reason": released.get("reason"),
    })
    return row


def attack_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One flat row per (run, attack)."""
    rows = []
    for r in records:
        for a in r.attacks:
            ci = a.auc_ci
            row: dict[str, Any] = {"run_id": r.run_id, "label": r.label, "attack": a.name, "kind": a.kind,
                                   "auc": a.auc, "auc_ci_low": ci[0] if ci else None,
                                   "auc_ci_high": ci[1] if ci else None}
            for k, v in a.metrics.items():
                if k in ("auc", "auc_ci"):
                    continue
                row[k] = v if isinstance(v, (int, float, str)) or v is None else json.dumps(v)
            row.update({"epsilon_lower": a.epsilon_lower,
                        "epsilon_lower_confidence": a.epsilon_lower_confidence,
                        "epsilon_lower_method": a.epsilon_lower_method, "epsilon_lower_power": a.power})
            rows.append(row)
    return rows


def record_to_json(r: RunRecord) -> dict[str, Any]:
    """Full JSON view of a record: the flat row plus accountants, claims, attacks and ε over steps."""
    out = run_row(r)
    out["accountants"] = [
        {"accountant": a.accountant, "delta": a.delta, "epsilon": _json_eps(a.value),
         "recomputed": _json_eps(a.recomputed), "lower": a.lower, "upper": a.upper,
         "manifest": _json_eps(a.manifest), "note": a.note} for a in r.accounted]
    out["claims"] = [{"epsilon": c.epsilon, "delta": c.delta, "source": c.source, "scope": c.scope,
                      "status": c.status} for c in r.claims]
    out["attacks"] = [row for row in attack_rows([r])]
    out["epsilon_over_steps"] = {"accountant": r.eps_over_steps_accountant,
                                 "steps": [k for k, _ in r.eps_over_steps],
                                 "epsilon": [_json_eps(e) for _, e in r.eps_over_steps]}
    out["mechanism_privacy"] = dict(r.mechanism_privacy)
    out["event_counts"] = dict(r.event_counts)
    out["versions"] = dict(r.versions)
    out["warnings"] = list(r.warnings)
    return out


def _csv_value(v: Any) -> Any:
    return "" if v is None else v


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Rows to CSV with the union of their keys as columns (first-seen order)."""
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(row.get(k)) for k in cols})
    return path


def write_json(obj: Any, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path
