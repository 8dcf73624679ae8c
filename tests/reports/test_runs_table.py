"""Loading run directories into report records: accounting, degradation, claims, verdict re-check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from privaudit.ledger.events import GaussianEvent, PlaintextEvent
from privaudit.ledger.ledger import Ledger
from privaudit.reports.runs_table import (
    attack_rows,
    epsilon_over_steps,
    format_epsilon,
    load_run_record,
    load_runs,
    prefix_events,
    record_to_json,
    run_row,
)
from tests.reports.conftest import (
    DELTA,
    DP_STRONG_EVENTS,
    DP_WEAK_EVENTS,
    MANIFEST_EPS,
    fake_epsilon,
    install_fake_accountants,
    make_four_runs,
    make_run,
    remove_accountants,
)


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Path]:
    return {p.name: p for p in make_four_runs(tmp_path)}


def test_format_epsilon() -> None:
    assert format_epsilon(None) == "not available"
    assert format_epsilon(math.inf) == "∞"
    assert format_epsilon(1.70449) == "1.704"
    assert format_epsilon(12345.6) == "1.235e+04"


def test_missing_dir_and_manifest_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^run_dir: .*nope"):
        load_run_record(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^run_dir: .*empty.* manifest\.json"):
        load_run_record(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^run_dir: .*empty"):
        load_runs([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^manifest: "):
        load_run_record(tmp_path / "bad")


def test_minimal_manifest_degrades(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    r = load_run_record(d)
    assert r.label == "old" and r.mechanism == "unspecified"
    assert r.ledger_status == "missing"
    assert r.has_guarantee is None and r.primary_epsilon == (None, None)
    assert all(a.value is None for a in r.accounted)
    assert r.recheck is None and r.attacks == () and r.utility_value is None
    row = run_row(r)
    assert row["epsilon"] is None and row["guarantee"] == "unknown"
    json.dumps(record_to_json(r), allow_nan=False)


def test_without_accountants_manifest_values_are_used(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    remove_accountants(monkeypatch)
    r = load_run_record(runs["dp-strong"])
    for a in r.accounted:
        assert a.recomputed is None
        assert a.note is not None and a.note.startswith("not available")
        assert a.value == MANIFEST_EPS["dp-strong"][a.accountant]
    assert r.primary_epsilon == (MANIFEST_EPS["dp-strong"]["pld"], "pld")
    assert r.eps_over_steps == () and r.recheck == "consistent"
    # structural "no guarantee" needs no accountant
    b = load_run_record(runs["baseline"])
    assert b.has_guarantee is False and "plaintext" in (b.no_guarantee_reason or "")
    assert b.primary_epsilon[0] == math.inf


def test_recomputed_from_ledger_and_fail_closed_on_mismatch(runs: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_accountants(monkeypatch)
    r = load_run_record(runs["dp-strong"])
    for a in r.accounted:
        expected = fake_epsilon(DP_STRONG_EVENTS, a.accountant)
        assert a.recomputed == pytest.approx(expected)
        # the stand-in manifest values are smaller: the larger (ledger) value is reported
        assert a.manifest == MANIFEST_EPS["dp-strong"][a.accountant]
        assert a.value == pytest.approx(max(expected, a.manifest))
        assert a.mismatch
    assert any("differs" in w for w in r.warnings)
    # a manifest that records MORE spend than the ledger wins too (fail-closed)
    m = json.loads((runs["dp-weak"] / "manifest.json").read_text())
    m["privacy"]["epsilon"]["pld"] = 99.0
    (runs["dp-weak"] / "manifest.json").write_text(json.dumps(m))
    w = load_run_record(runs["dp-weak"])
    assert w.accountant("pld").value == 99.0  # type: ignore[union-attr]
    assert w.accountant("pld").recomputed == pytest.approx(fake_epsilon(DP_WEAK_EVENTS, "pld"))  # type: ignore[union-attr]


def test_eps_over_steps_on_prefixes(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_accountants(monkeypatch)
    r = load_run_record(runs["dp-strong"], steps_points=20)
    assert r.eps_over_steps_accountant == "pld"  # the report's headline accountant, not RDP
    steps = [k for k, _ in r.eps_over_steps]
    eps = [e for _, e in r.eps_over_steps]
    assert steps == sorted(steps) and steps[-1] == 300 and len(steps) == 20
    assert all(b >= a for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(fake_epsilon(DP_STRONG_EVENTS, "pld"))
    # at step 150: 100 steps at sigma 1.3 and 50 at sigma 1.1
    k150 = dict(r.eps_over_steps)[150]
    assert k150 == pytest.approx(1.0 * (100 * 0.02 / 1.3 + 50 * 0.02 / 1.1))


def test_prefix_events_truncates_and_keeps_order() -> None:
    evs = [GaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=5), PlaintextEvent(what="x"),
           GaussianEvent(noise_multiplier=2.0, sample_rate=0.1, count=5)]
    p = prefix_events(evs, 3)
    assert len(p) == 1 and p[0].count == 3
    p = prefix_events(evs, 5)
    assert [e.type for e in p] == ["gaussian", "plaintext"]  # type: ignore[attr-defined]
    p = prefix_events(evs, 7)
    assert [e.count for e in p] == [5, 1, 2]
    series, acc = epsilon_over_steps([PlaintextEvent(what="x")], DELTA, "add_remove")
    assert series == [] and acc is None


def test_claim_refuted_and_verdict_recheck(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    remove_accountants(monkeypatch)
    r = load_run_record(runs["sketch-claim"])
    assert r.has_guarantee is False
    assert len(r.claims) == 1  # header claim and audit.json's claim are the same one
    c = r.claims[0]
    assert c.epsilon == 1.0 and "refuted by audit" in c.status and "no formal guarantee" in c.status
    assert r.verdict == "violation" and r.recheck == "violation"
    assert r.epsilon_lower == 2.4 and r.epsilon_lower_attack == "canary_exposure"
    assert r.utility_name == "perplexity"


def test_recheck_flags_a_violation_the_audit_missed(tmp_path: Path) -> None:
    d = make_run(tmp_path, "bug", mechanism="dp_lora", events=DP_STRONG_EVENTS,
                 eps_fallback={"rdp": 1.0, "pld": 0.9, "prv": 0.9},
                 audit={"accounted": {"delta": DELTA, "epsilon": {"pld": 0.9}}, "claimed": [], "attacks": [],
                        "epsilon_lower": {"value": 2.0, "confidence": 0.95, "method": "one_run"},
                        "verdict": "consistent"})
    with pytest.MonkeyPatch.context() as mp:
        remove_accountants(mp)
        r = load_run_record(d)
    assert r.recheck == "violation"
    assert any("differs from the report's re-check" in w for w in r.warnings)


@pytest.mark.parametrize("top, extra, expected", [
    # a Gaussian-assuming f-DP bound above the recomputed ε, no assumption-free one: not a proof
    ({"value": 2.0, "assumption_free": 0.5, "power": 5.0}, {}, "inconclusive"),
    # the assumption-free bound above it: a violation
    ({"value": 2.0, "assumption_free": 1.5, "power": 5.0}, {}, "violation"),
    # the test against the accountant's own curve rejected it, whatever the bounds' values
    ({"value": 0.3, "assumption_free": 0.2, "power": 0.5}, {"tradeoff_test": {"refuted": True}}, "violation"),
    # Steinke's power below ε, but perfect guesses would have rejected the accountant's curve
    ({"value": 0.3, "assumption_free": 0.2, "power": 0.5, "power_refutes_accounted": True}, {}, "consistent"),
    ({"value": 0.3, "assumption_free": 0.2, "power": 0.5, "power_refutes_accounted": False}, {}, "inconclusive"),
])
def test_recheck_follows_the_auditors_bound_rules(tmp_path: Path, top: dict, extra: dict, expected: str) -> None:
    from privaudit.reports.summary import verdict_explanation

    d = make_run(tmp_path, "r", mechanism="dp_lora", events=DP_STRONG_EVENTS,
                 eps_fallback={"rdp": 1.0, "pld": 0.9, "prv": 0.9},
                 audit={"accounted": {"delta": DELTA, "epsilon": {"pld": 0.9}, **extra}, "claimed": [],
                        "attacks": [], "epsilon_lower": {"confidence": 0.95, "method": "one_run", **top},
                        "verdict": expected})
    with pytest.MonkeyPatch.context() as mp:
        remove_accountants(mp)
        r = load_run_record(d)
    assert r.recheck == expected
    assert not any("differs from the report's re-check" in w for w in r.warnings)
    if top.get("power_refutes_accounted") and expected == "consistent":
        assert "accountant's own trade-off curve" in verdict_explanation(r)


def test_tampered_ledger_is_not_used(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_accountants(monkeypatch)
    path = runs["dp-weak"] / "ledger.jsonl"
    lines = path.read_text().splitlines()
    obj = json.loads(lines[1])
    obj["event"]["noise_multiplier"] = 50.0  # someone edits sigma upwards
    lines[1] = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    r = load_run_record(runs["dp-weak"])
    assert r.ledger_status == "tampered" and not r.ledger_intact
    assert all(a.recomputed is None for a in r.accounted)
    assert any("verification failed" in w for w in r.warnings)


def test_empty_ledger_is_no_releases_recorded(tmp_path: Path) -> None:
    """A sealed ledger without releases reads as "no releases recorded" (ε 0), as in every reader; an
    unsealed one (a failed run) is incomplete and its events are not used."""
    d = tmp_path / "empty-ledger"
    d.mkdir()
    with Ledger.create(d / "ledger.jsonl", mechanism="dp_lora", target_delta=DELTA) as led:
        seal = led.seal()
        head = led.head_hash
    (d / "manifest.json").write_text(json.dumps({"run_id": "x", "mechanism": "dp_lora", "status": "complete",
                                                 "ledger_head_hash": head, "ledger_seal": seal}))
    r = load_run_record(d)
    assert r.ledger_status == "intact" and "no releases recorded" in r.ledger_message
    assert r.primary_epsilon[0] == 0.0
    d2 = tmp_path / "unsealed"
    d2.mkdir()
    Ledger.create(d2 / "ledger.jsonl", mechanism="dp_lora", target_delta=DELTA).close()
    (d2 / "manifest.json").write_text(json.dumps({"run_id": "x", "mechanism": "dp_lora"}))
    r2 = load_run_record(d2)
    assert r2.ledger_status == "incomplete" and not r2.ledger_intact
    assert all(a.recomputed is None for a in r2.accounted)


def test_tables(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    remove_accountants(monkeypatch)
    recs = load_runs([runs["baseline"], runs["dp-weak"]])
    rows = [run_row(r) for r in recs]
    assert rows[0]["epsilon"] == "inf" and rows[0]["guarantee"] == "none"
    assert rows[1]["epsilon_pld"] == MANIFEST_EPS["dp-weak"]["pld"]
    arows = attack_rows(recs)
    assert [a["attack"] for a in arows] == ["loss", "lira", "loss", "rmia"]
    assert arows[1]["auc_ci_low"] == 0.81 and arows[1]["tpr_at_1%_fpr"] == 0.21
    json.dumps([record_to_json(r) for r in recs], allow_nan=False)


def test_duplicate_labels_are_made_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remove_accountants(monkeypatch)
    a = make_run(tmp_path / "a", "same", mechanism="dp_lora", events=DP_WEAK_EVENTS)
    b = make_run(tmp_path / "b", "same", mechanism="dp_lora", events=DP_WEAK_EVENTS)
    recs = load_runs([a, b])
    assert len({r.label for r in recs}) == 2
