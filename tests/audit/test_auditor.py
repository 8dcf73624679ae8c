"""The auditor: membership attacks on real (tiny) runs, the planted-noise bug, claims, observers, CLI."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privaudit.audit import auditor
from privaudit.attacks import released_model as released_model
from privaudit.attacks import views as views
from privaudit.attacks.interface import AttackScores, AuditContext
from privaudit.audit.auditor import audit_run
from privaudit.attacks.views import register_view_attack
from privaudit.ledger.events import ClaimEvent
from privaudit.ledger.ledger import Ledger
from privaudit.config import parse_config
from privaudit.mechanisms import dp_lora
from privaudit.runs import train

TINY_MODEL = {"name": "tiny-gpt2", "max_length": 32, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}}

# 40 train / 40 held-out records; the non-private run fits them for 30 epochs (89 steps).
OVERFIT: dict[str, Any] = {
    "task": "classification",
    "model": TINY_MODEL,
    "lora": {"rank": 4, "alpha": 8},
    "data": {"synthetic": {"n_people": 40, "records_per_person": 2, "n_canaries": 16}, "heldout_fraction": 0.5},
    "training": {"epochs": 30, "batch_size": 16, "learning_rate": 0.02},
    "privacy": {"noise_multiplier": 0.0, "noise_seed": 1},
}
# 100 train / 100 held-out records, ε = 1.
DP_EPS1: dict[str, Any] = {
    **OVERFIT,
    "data": {"synthetic": {"n_people": 100, "records_per_person": 2, "n_canaries": 16}, "heldout_fraction": 0.5},
    "training": {"steps": 30, "batch_size": 16, "learning_rate": 0.02},
    "privacy": {"target_epsilon": 1.0, "noise_seed": 3},
}
# White-box gradient canaries: 1000 canaries, SGD, q = 0.1, 20 steps, σ calibrated for ε = 1.
CANARIES: dict[str, Any] = {
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 128, "n_head": 2}},
    "lora": {"rank": 16, "alpha": 16},
    "data": {"synthetic": {"n_people": 20, "records_per_person": 2, "n_canaries": 0}},
    "training": {"steps": 20, "sample_rate": 0.1, "learning_rate": 0.05, "optimizer": "sgd"},
    "privacy": {"target_epsilon": 1.0, "noise_seed": 3},
    # Gaussian directions: the shared canary runs' draws (and the claim test's ε_lower > 1e-3 at ε = 1)
    # were measured with them; tests that set their own "audit" get the default (dirac here)
    "audit": {"gradient_canaries": 1000, "gradient_canary_seed": 5, "gradient_canary_directions": "gaussian"},
}


def _train(cfg: dict[str, Any], run_dir: Path) -> Path:
    train(parse_config(copy.deepcopy(cfg)), run_dir, progress=False)
    return run_dir


def _copy(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("audit.json", "*.lock"))
    return dst


def _add_claims(run_dir: Path, *claims: ClaimEvent) -> None:
    """Play the trainer of a run that recorded claims: unseal, append them, seal again, and keep the
    manifest's head hash and seal in step (a sealed ledger is never appended to)."""
    path = run_dir / "ledger.jsonl"
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "seal"
    path.write_text("\n".join(lines[:-1]) + "\n")
    with Ledger.open(path, writable=True) as led:
        for c in claims:
            led.append(c)
        seal = led.seal()
        head = led.head_hash
    m = json.loads((run_dir / "manifest.json").read_text())
    m["ledger_seal"], m["ledger_head_hash"] = seal, head
    (run_dir / "manifest.json").write_text(json.dumps(m))


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from privaudit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(OVERFIT, tmp_path_factory.mktemp("overfit") / "run")


@pytest.fixture(scope="module")
def canary_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(planted bug: the noise actually added is 10x smaller than the ledger says, clean run)."""
    root = tmp_path_factory.mktemp("canaries")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(dp_lora, "fit", functools.partial(dp_lora.fit, _unsafe_noise_factor=0.1))
        bug = _train(CANARIES, root / "bug")
    finally:
        mp.undo()
    return bug, _train(CANARIES, root / "clean")


# ------------------------------------------------------------------------------------------------
# membership on the released model


@pytest.mark.slow
def test_overfit_non_private_run_shows_membership(overfit_run: Path) -> None:
    res = audit_run(overfit_run, attacks=["loss", "canary_membership"])
    loss = res.attack("loss")
    lo, hi = loss.metrics["auc_ci"]
    assert loss.metrics["auc"] > 0.7 and lo > 0.5, loss.metrics["auc_ci"]
    assert loss.epsilon_lower is None  # records are not included by fair coins: no bound claimed
    assert loss.roc is not None and loss.roc["fpr"][0] == 0.0 and loss.roc["tpr"][-1] == 1.0
    assert res.verdict == "no guarantee"
    assert res.accounted["epsilon"] == {"rdp": None, "pld": None, "prv": None}
    assert "plaintext" in res.accounted["reason"]
    # audit.json on disk is exactly the result, in the format the reports read
    on_disk = json.loads((overfit_run / "audit.json").read_text())
    assert on_disk == json.loads(json.dumps(res.to_json()))
    assert set(on_disk) == {"run_id", "observer", "accounted", "claimed", "attacks", "epsilon_lower", "verdict",
                            "verdict_reason", "created", "settings"}
    assert on_disk["observer"] == "released model" and on_disk["accounted"]["delta"] == 1e-5
    from privaudit.reports.runs_table import load_run_record

    rec = load_run_record(overfit_run)
    assert rec.verdict == "no guarantee" and rec.recheck == "no guarantee"
    assert {a.name for a in rec.attacks} == {"loss", "canary_membership"}


@pytest.mark.slow
def test_reference_model_attacks(overfit_run: Path, tmp_path: Path) -> None:
    run = _copy(overfit_run, tmp_path / "run")
    res = audit_run(run, attacks=["lira_online", "lira_offline", "rmia"], reference_models=4)
    assert [a.name for a in res.attacks] == ["lira_online", "lira_offline", "rmia"]
    assert all(a.kind == "membership" for a in res.attacks)
    for name in ("lira_online", "rmia"):  # significantly better than chance on the overfit run
        assert res.attack(name).metrics["auc_ci"][0] > 0.5, (name, res.attack(name).metrics)
    # offline LiRA (OUT models only) is the weakest with 4 references and ~40 records a side
    assert res.attack("lira_offline").metrics["auc"] > 0.55, res.attack("lira_offline").metrics
    s = res.settings
    assert s["rmia_population_z"] >= 1 and s["reference_population"] == 80 - s["rmia_population_z"]
    assert s["n_members_scored"] == s["n_nonmembers_scored"]
    with pytest.raises(ValueError, match="^attacks: lira_online cannot run"):
        audit_run(run, attacks=["lira_online"], _write=False)


def test_dp_run_at_epsilon_one_auc_interval_contains_half(tmp_path: Path) -> None:
    run = _train(DP_EPS1, tmp_path / "run")
    res = audit_run(run)
    lo, hi = res.attack("loss").metrics["auc_ci"]
    assert lo < 0.5 < hi
    assert res.accounted["epsilon"]["pld"] == pytest.approx(1.0, abs=0.01)
    # few canaries: even perfect guesses could not certify ε = 1, so the audit cannot say "consistent"
    power = res.epsilon_lower["power"]
    # (16 canaries split unevenly by the coins: with the accounted-curve test's share of the error budget
    # the Steinke power can be 0; it is never above the accounted ε)
    assert power is not None and 0 <= power < res.accounted["compared"]["epsilon"]
    assert res.attack("canary_membership").to_json()["epsilon_lower"]["power"] == power
    assert res.verdict == "inconclusive" and "could certify at most" in res.verdict_reason, res.verdict_reason
    assert res.epsilon_lower["value"] <= res.accounted["compared"]["epsilon"]
    assert res.settings["n_members_scored"] == res.settings["n_nonmembers_scored"] == 100


# ------------------------------------------------------------------------------------------------
# the planted bug: noise 10x smaller than recorded


@pytest.mark.slow
def test_planted_noise_bug_is_a_violation_and_the_clean_run_is_consistent(
        canary_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bug, clean = canary_runs
    code, out, err = _cli(["audit", str(bug), "--json", "--quiet"], capsys)
    assert code == 1
    res = json.loads(out)
    assert res["verdict"] == "violation" and err.startswith("check failed:") and len(err.splitlines()) == 1
    (g,) = [a for a in res["attacks"] if a["name"] == "gradient_canaries_one_run"]
    assert g["kind"] == "canary" and g["epsilon_lower"]["method"] in ("one_run", "one_run_fdp", "one_run_fdp_accounted")
    assert g["epsilon_lower"]["bound"] == res["epsilon_lower"]["bound"] in g["epsilon_lower_by_bound"]
    assert set(g["epsilon_lower_by_bound"]) == {"one_run_steinke", "one_run_fdp", "one_run_fdp_accounted"}
    # the 10x noise bug rejects the accountant's own trade-off curve (no assumption needed)
    assert g["epsilon_lower_by_bound"]["one_run_fdp_accounted"]["refuted"] is True
    assert res["accounted"]["tradeoff_test"]["refuted_by"] == ["gradient_canaries_one_run"]
    assert res["epsilon_lower"]["attack"] == "gradient_canaries_one_run"
    assert res["epsilon_lower"]["value"] > 2.0 * res["accounted"]["compared"]["epsilon"]

    code, out, err = _cli(["audit", str(clean), "--quiet"], capsys)
    assert code == 0, err
    assert "verdict: consistent" in out and "gradient_canaries_one_run" in out
    ok = json.loads((clean / "audit.json").read_text())
    assert ok["verdict"] == "consistent" and ok["accounted"]["tradeoff_test"]["refuted"] is False
    assert 0.0 <= ok["epsilon_lower"]["value"] < ok["accounted"]["compared"]["epsilon"]

    from privaudit.reports.runs_table import load_run_record

    for run, verdict in ((bug, "violation"), (clean, "consistent")):
        rec = load_run_record(run)
        assert rec.verdict == rec.recheck == verdict


@pytest.mark.slow
def test_one_run_white_box_audit_at_epsilon_4_is_not_vacuous(tmp_path: Path) -> None:
    """σ calibrated for ε = 4 (PLD, δ = 1e-5); 5000 gradient canaries, one full-batch step (q = 1 for
    data and canaries alike). Measured: ε_lower ≈ 1.6 (ratio ≈ 0.40; q = 0.1 over 50 steps: ≈ 0.29).
    The one-run analysis itself caps a Gaussian mechanism's bound well below ε (Steinke et al. 2023)."""
    cfg = {**CANARIES,
           "model": {**CANARIES["model"], "overrides": {"n_layer": 1, "n_embd": 256, "n_head": 2}},
           "training": {"steps": 1, "sample_rate": 1.0, "learning_rate": 0.05, "optimizer": "sgd"},
           "privacy": {"target_epsilon": 4.0, "accountant": "pld", "noise_seed": 11},
           "audit": {"gradient_canaries": 5000, "gradient_canary_seed": 13}}
    res = audit_run(_train(cfg, tmp_path / "run"), attacks=["gradient_canaries_one_run"], _write=False)
    eps = res.accounted["epsilon"]["pld"]
    assert eps == pytest.approx(4.0, abs=0.01)
    assert res.epsilon_lower["value"] / eps > 0.2, res.epsilon_lower
    assert res.verdict == "consistent"


@pytest.mark.slow
def test_every_step_white_box_audit_uses_the_recorded_steps(tmp_path: Path) -> None:
    cfg = {**CANARIES, "privacy": {"target_epsilon": 4.0, "accountant": "pld", "noise_seed": 11},
           "audit": {"gradient_canaries": 500, "gradient_canary_seed": 13, "record_canary_steps": True}}
    run = _train(cfg, tmp_path / "run")
    res = audit_run(run, attacks=["gradient_canaries_one_run", "gradient_canaries_every_step"], _write=False)
    es = res.attack("gradient_canaries_every_step")
    assert es.metrics["steps"] == 20 and es.metrics["m"] == 500
    assert set(es.by_bound) == {"one_run_steinke", "one_run_fdp", "one_run_fdp_accounted"} and es.epsilon_lower is not None
    assert es.metrics["auc"] > 0.55  # the leak is seen
    # 500 canaries at 1 − 0.05/6 per bound cannot certify the accounted 4 with the assumption-free bound:
    # inconclusive by the power rule (consistent if the design could certify it)
    assert res.epsilon_lower["n_bounds"] == 6 and res.verdict in ("consistent", "inconclusive")
    assert res.verdict == "consistent" or "could certify at most" in res.verdict_reason
    assert 0 < res.epsilon_lower["value"] < res.accounted["compared"]["epsilon"]
    assert res.to_json()["epsilon_lower"]["bound"] in ("one_run_steinke", "one_run_fdp", "one_run_fdp_accounted")
    # a damaged or oversized per-step record from someone else: one line naming the file, no traceback
    steps_file = run / "canary_steps.safetensors"
    good = steps_file.read_bytes()
    steps_file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="^run_dir: canary_steps.safetensors is not a readable safetensors file"):
        audit_run(run, attacks=["gradient_canaries_every_step"], _write=False)
    steps_file.write_bytes(good + b"\x00" * (4 * 500 * 21 + (1 << 20)))  # more than (steps + 1) × m floats
    with pytest.raises(ValueError, match="more than the limit"):
        audit_run(run, attacks=["gradient_canaries_every_step"], _write=False)
    steps_file.write_bytes(good)
    (run / "canary_steps.safetensors").unlink()
    with pytest.raises(ValueError, match="^attacks: gradient_canaries_every_step cannot run"):
        audit_run(run, attacks=["gradient_canaries_every_step"], _write=False)


@pytest.mark.slow
def test_claims_are_checked_at_their_own_delta_with_bonferroni(canary_runs: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    run = _copy(canary_runs[1], tmp_path / "run")
    _add_claims(run, ClaimEvent(epsilon=1e-3, delta=1e-5, source="too good"),
                ClaimEvent(epsilon=50.0, delta=0.0, source="pure DP"))
    res = audit_run(run, attacks=["gradient_canaries_one_run"])
    mt = res.settings["multiple_testing"]
    # Steinke at each of the 2 δ values + one f-DP μ bound (δ > 0 only) + one accounted-curve test
    assert mt["n_bounds"] == 4 and mt["deltas"] == [0.0, 1e-5]
    assert mt["per_bound_confidence"] == pytest.approx(1 - 0.05 / 4)
    g = res.attack("gradient_canaries_one_run")
    assert g.epsilon_lower is not None and g.epsilon_lower.confidence == pytest.approx(1 - 0.05 / 4)
    assert g.epsilon_lower.delta == 1e-5 and g.bounds[0.0].delta == 0.0
    assert g.bounds[0.0].method == "one_run"  # the f-DP bound has no δ = 0 form
    assert set(g.by_bound) == {"one_run_steinke", "one_run_fdp", "one_run_fdp_accounted"}
    assert g.epsilon_lower.value == max(b.value for b in g.by_bound.values())
    tight, pure = res.claimed
    assert pure["delta"] == 0.0 and pure["epsilon_lower"] == g.bounds[0.0].value
    # a δ = 0 Steinke bound is never smaller than the δ > 0 one
    assert pure["epsilon_lower"] >= g.by_bound["one_run_steinke"].value and tight["epsilon_lower"] > 1e-3
    assert tight["status"] == "refuted" and pure["status"] == "not refuted"
    assert res.verdict == "violation" and "claimed" in res.verdict_reason
    assert res.to_json()["attacks"][0]["epsilon_lower_at_claim_deltas"] == [{"delta": 0.0,
                                                                               "value": g.bounds[0.0].value}]


@pytest.mark.slow
def test_a_claim_on_a_run_without_guarantee_is_checked(overfit_run: Path, tmp_path: Path) -> None:
    run = _copy(overfit_run, tmp_path / "run")
    _add_claims(run, ClaimEvent(epsilon=100.0, delta=1e-5, source="loose"))
    res = audit_run(run, attacks=["canary_membership"], _write=False)
    assert res.verdict == "no guarantee" and res.claimed[0]["status"] == "not refuted"
    assert "did not refute the claim" in res.verdict_reason
    assert not (run / "audit.json").exists()


# ------------------------------------------------------------------------------------------------
# other observers: the view-attack registry


@pytest.fixture()
def server_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = {**OVERFIT, "data": {"synthetic": {"n_people": 10, "records_per_person": 2, "n_canaries": 0}},
           "training": {"steps": 2, "batch_size": 4}, "privacy": {"noise_multiplier": 1.0, "noise_seed": 1}}
    monkeypatch.setattr(dp_lora, "OBSERVER", "server")
    return _train(cfg, tmp_path / "run")


def test_observer_without_a_registered_attack_is_reported(server_run: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(views, "_VIEW_ATTACKS", {})
    res = audit_run(server_run)
    assert res.observer == "server" and res.attacks == ()
    assert any("no attack is registered for the observer 'server'" in n for n in res.settings["notes"])
    assert res.verdict == "inconclusive" and "nothing was tested" in res.verdict_reason
    assert res.epsilon_lower["value"] == 0.0 and res.epsilon_lower["n_bounds"] == 0
    with pytest.raises(ValueError, match="^attacks: loss cannot run"):
        audit_run(server_run, attacks=["loss"], _write=False)


def test_registered_view_attack_feeds_the_bound_and_verdict(server_run: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "_VIEW_ATTACKS", {})
    seen: list[AuditContext] = []

    def perfect_view_attack(ctx: AuditContext) -> list[AttackScores]:
        seen.append(ctx)
        rng = np.random.default_rng(0)  # 400 units, perfectly separated: ε_lower well above σ=1's ε
        return [AttackScores("server_view", "membership", rng.normal(10, 1, 200), rng.normal(0, 1, 200),
                             bound="one_run"),
                AttackScores("server_attribute", "attribute", metrics={"accuracy": 0.4, "majority": 0.35})]

    register_view_attack("server", perfect_view_attack)
    res = audit_run(server_run, _write=False)
    assert seen and seen[0].observer == "server"
    assert [a.name for a in res.attacks] == ["server_view", "server_attribute"]
    assert res.attack("server_attribute").metrics == {"accuracy": 0.4, "majority": 0.35}
    assert res.epsilon_lower["attack"] == "server_view"
    assert res.epsilon_lower["value"] > res.accounted["compared"]["epsilon"]
    assert res.verdict == "violation"
    only = audit_run(server_run, attacks=["server_attribute"], _write=False)
    assert [a.name for a in only.attacks] == ["server_attribute"] and only.epsilon_lower["n_bounds"] == 0
    with pytest.raises(ValueError, match="^attacks: unknown attack 'nope'"):
        audit_run(server_run, attacks=["nope"], _write=False)
    with pytest.raises(ValueError, match="^observer_or_mechanism"):
        register_view_attack("", perfect_view_attack)


def test_a_run_without_held_out_records_is_audited_with_its_canaries(tmp_path: Path) -> None:
    cfg = {**OVERFIT, "data": {"synthetic": {"n_people": 8, "records_per_person": 2, "n_canaries": 0},
                               "heldout_fraction": 0.0},
           "training": {"steps": 2, "batch_size": 4}, "privacy": {"noise_multiplier": 1.0, "noise_seed": 1},
           "audit": {"gradient_canaries": 50, "gradient_canary_seed": 2}}
    run = _train(cfg, tmp_path / "run")
    res = audit_run(run, _write=False)
    assert [a.name for a in res.attacks] == ["gradient_canaries_one_run"]
    # Steinke + f-DP + the test against the accountant's own curve
    assert res.settings["n_members_scored"] == 0 and res.epsilon_lower["n_bounds"] == 3
    assert res.accounted["tradeoff_test"]["refuted"] is False
    with pytest.raises(ValueError, match="^attacks: loss cannot run on this run: the run has no"):
        audit_run(run, attacks=["loss"], _write=False)


# ------------------------------------------------------------------------------------------------
# causal LM canaries


@pytest.mark.slow
def test_canary_exposure_of_a_memorising_language_model(tmp_path: Path) -> None:
    cfg = {
        "task": "causal_lm",
        "model": {**TINY_MODEL, "max_length": 24},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "lm_head"]},
        "data": {"synthetic": {"n_people": 4, "records_per_person": 1, "n_canaries": 8, "canary_formats": ["pin4"]},
                 "heldout_fraction": 0.5},
        "training": {"epochs": 15, "batch_size": 4, "learning_rate": 0.1},
        "privacy": {"noise_multiplier": 0.0, "noise_seed": 1},
    }
    run = _train(cfg, tmp_path / "run")
    res = audit_run(run, attacks=["canary_exposure"], exposure_candidates=20)
    ex = res.attack("canary_exposure")
    exposures = ex.metrics["exposures"]
    assert len(exposures) == 8 and all(0.0 <= e <= math.log2(10**4) + 1e-9 for e in exposures.values())
    assert ex.metrics["exposure_mean_included"] > ex.metrics["exposure_mean_excluded"] + 3.0
    assert ex.epsilon_lower is not None and ex.epsilon_lower.m == 8  # 8 canaries prove little, validly
    with pytest.raises(ValueError, match="^attacks: gradient_canaries_one_run cannot run"):
        audit_run(run, attacks=["canary_exposure", "gradient_canaries_one_run"], _write=False)


# ------------------------------------------------------------------------------------------------
# input validation (no run needed: checked before anything is read)


@pytest.mark.parametrize("kwargs, field", [
    ({"confidence": 1.0}, "confidence"), ({"confidence": 0}, "confidence"),
    ({"reference_models": 1}, "reference_models"), ({"reference_models": -2}, "reference_models"),
    ({"seed": 1.5}, "seed"), ({"attacks": ["loss", ""]}, "attacks"), ({"max_records": 1}, "max_records"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        audit_run(tmp_path, **kwargs)


def test_missing_run_and_bad_cli_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="^run_dir"):
        audit_run(tmp_path / "nothing")
    for args, field in ((["audit", str(tmp_path / "nothing"), "--quiet"], "run_dir"),
                        (["audit", str(tmp_path), "--confidence", "2", "--quiet"], "confidence"),
                        (["audit", str(tmp_path), "--reference-models", "1", "--quiet"], "reference_models")):
        code, out, err = _cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and field in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# issue 14, item 4: canaries are one more unit of the accounted mechanism, so sampling and clipping
# bugs that hit records hit them too and the audit flags them


def _all_units(self: Any) -> np.ndarray:
    """Planted sampling bug: every unit in every batch while the ledger says Poisson q."""
    self.steps += 1
    return np.arange(self.num_items)


def _clip_at_100c(norms: Any, clip_norm: float) -> Any:
    """Planted clipping bug: clip at 100·C while the ledger (and the noise) say C."""
    return (100.0 * clip_norm / (norms + 1e-6)).clamp(max=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["sampling", "clipping"])
def test_planted_sampling_and_clipping_bugs_are_violations(bug: str, tmp_path: Path) -> None:
    """CANARIES (ε = 1 by PLD, σ = 2.10, q = 0.1, 20 steps, 1000 canaries). Measured (seeds fixed):
    sampling bug ε_lower = 3.10 (AUC 0.91; the true ε of 20 unsampled releases is 10.79); clipping bug
    ε_lower = 3.37 (AUC 0.91); the clean run 0.27 (AUC 0.59). While canaries drew their own Poisson
    inclusion and were added after clipping at norm C, both bugs passed as `consistent`."""
    from privaudit.mechanisms import per_sample, sampling

    mp = pytest.MonkeyPatch()
    try:
        if bug == "sampling":
            mp.setattr(sampling.PoissonSampler, "next_batch", _all_units)
        else:
            mp.setattr(per_sample, "clip_factors", _clip_at_100c)
        run = _train(CANARIES, tmp_path / "run")
    finally:
        mp.undo()
    res = audit_run(run, attacks=["gradient_canaries_one_run"], _write=False)
    assert res.accounted["epsilon"]["pld"] == pytest.approx(1.0, abs=0.01)
    assert res.verdict == "violation", (res.verdict_reason, res.epsilon_lower)
    assert res.epsilon_lower["value"] > 1.5 * res.accounted["compared"]["epsilon"]


def test_exposure_nll_without_the_shared_prefix_keeps_every_rank() -> None:
    """The exposure attack skips the logits of the tokens all candidates share: a constant per text."""
    import torch

    from privaudit.mechanisms.training import build_model

    cfg = parse_config({"task": "causal_lm", "model": TINY_MODEL, "lora": {"rank": 2, "alpha": 4},
                        "training": {"steps": 1, "batch_size": 4}, "privacy": {"noise_multiplier": 1.0}})
    torch.manual_seed(0)
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    texts = [f"Note from James: my PIN is {i:04d}." for i in range(0, 9999, 97)]
    assert released_model._shared_prefix_tokens(model, tok, texts, cfg.model.max_length) >= 5
    full = released_model._sequence_nll(model, tok, texts, cfg, torch.device("cpu"))
    fast = released_model._sequence_nll(model, tok, texts, cfg, torch.device("cpu"), drop_shared_prefix=True)
    shift = full - fast
    assert shift.min() > 0 and shift.max() - shift.min() < 1e-3  # the same constant for every text
    assert list(np.argsort(full, kind="stable")) == list(np.argsort(fast, kind="stable"))


def test_a_violation_needs_an_assumption_free_bound() -> None:
    """The f-DP bound assumes a Gaussian trade-off curve: above the accounted ε on its own it makes the
    audit inconclusive (worth investigating), never a violation; the Steinke bound above it is one."""
    from privaudit.audit.bounds import EpsilonLowerBound

    fdp = EpsilonLowerBound(value=3.0, delta=1e-5, confidence=0.95, method="one_run_fdp")
    common = dict(has_guarantee=True, compared=2.0, compared_by="pld", delta=1e-5, top=fdp,
                  top_attack="gradient_canaries_one_run", claims=[], n_attacks=1, observer="released model",
                  confidence=0.95, power=5.0, power_attack="gradient_canaries_one_run")
    verdict, reason = auditor._verdict(**common, sound_lower=1.5)
    assert verdict == "inconclusive" and "Gaussian trade-off" in reason
    verdict, _ = auditor._verdict(**common, sound_lower=2.5)
    assert verdict == "violation"
    verdict, _ = auditor._verdict(**{**common, "top": EpsilonLowerBound(value=1.0, delta=1e-5, confidence=0.95,
                                                                           method="one_run")}, sound_lower=1.0)
    assert verdict == "consistent"


def test_rejecting_the_accountants_own_curve_is_a_violation_without_assumption() -> None:
    """The accounted-curve test refutes the ledger's privacy profile itself: a violation even when
    every ε_lower (Steinke's included) stays below the accounted ε; without it, the same numbers are
    consistent."""
    from privaudit.audit.bounds import EpsilonLowerBound

    acc = EpsilonLowerBound(value=1.9, delta=1e-5, confidence=0.95, method="one_run_fdp_accounted",
                            assumption="accounted_family", refuted=True, noise_scale=1.0)
    common = dict(has_guarantee=True, compared=2.0, compared_by="pld", delta=1e-5, top=acc,
                  top_attack="gradient_canaries_one_run", claims=[], n_attacks=1, observer="released model",
                  confidence=0.95, power=5.0, power_attack="gradient_canaries_one_run", sound_lower=1.2)
    verdict, reason = auditor._verdict(**common, accounted_refuted="gradient_canaries_one_run")
    assert verdict == "violation" and "accountant's own trade-off curve" in reason
    assert auditor._verdict(**common)[0] == "consistent"
    # no guarantee stays no guarantee (there is no accounted curve to refute)
    assert auditor._verdict(**{**common, "has_guarantee": False}, accounted_refuted="x")[0] == "no guarantee"
    assert auditor.bound_name(acc) == "one_run_fdp_accounted"
    # power: a Steinke power below the accounted ε is inconclusive, unless the design's perfect guesses
    # would have rejected the accountant's curve
    weak = {**common, "power": 1.5, "top": EpsilonLowerBound(value=1.0, delta=1e-5, confidence=0.95, method="one_run")}
    assert auditor._verdict(**weak)[0] == "inconclusive"
    verdict, reason = auditor._verdict(**weak, accounted_power="gradient_canaries_one_run")
    assert verdict == "consistent" and "would have rejected the accountant's own trade-off curve" in reason


def test_gradient_canaries_give_no_bound_where_the_ledger_may_not_cover_them(tmp_path: Path) -> None:
    """A replace ledger with several passes of fixed-size batches: a canary (an added unit) is not
    covered by it, so the canary attack gives metrics only; one pass, or add/remove, keeps the bound."""
    from privaudit.ledger.events import GaussianEvent

    def ledger(name: str, rel: str, steps: int) -> Ledger:
        with Ledger.create(tmp_path / f"{name}.jsonl", neighbouring=rel) as led:
            led.append(GaussianEvent(noise_multiplier=1.0, sampling="fixed_batch", batch_size=10, dataset_size=100,
                                     clip_norm=1.0, sensitivity=2.0, count=steps))
        return Ledger.read(tmp_path / f"{name}.jsonl")

    assert released_model._canary_outside_ledger(ledger("a", "replace", 11))
    assert not released_model._canary_outside_ledger(ledger("b", "replace", 10))
    assert not released_model._canary_outside_ledger(ledger("c", "add_remove", 10))
