"""DP-SGD on LoRA: the ledger, noise, sampling, canaries, and end-to-end utility."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from privaudit.ledger.events import GaussianEvent, PlaintextEvent
from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import parse_config, resolve_plan
from privaudit.runs import planned_events
from privaudit.mechanisms import get_mechanism
from privaudit.config import mechanism_names
from privaudit.mechanisms.dp_lora import DPLoraTrainer, apply_noisy_update, fit
from privaudit.mechanisms.training import (
    CANARY_STEPS_FILE,
    GradientCanaries,
    build_model,
    canary_direction,
    every_step_canary_scores,
    prepare_data,
    score_gradient_canaries,
)

TINY: dict[str, Any] = {
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 24,
              "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 30, "n_canaries": 4}, "max_heldout": 20},
    "training": {"steps": 6, "batch_size": 8, "learning_rate": 0.01},
    "privacy": {"noise_multiplier": 1.0, "noise_seed": 7},
}


def tiny(**sections: dict[str, Any]) -> Any:
    data = copy.deepcopy(TINY)
    for name, update in sections.items():
        data[name] = {**data.get(name, {}), **update}
    return parse_config(data)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_registry() -> None:
    assert "dp_lora" in mechanism_names()
    assert get_mechanism("dp_lora").OBSERVER == "released model"
    with pytest.raises(ValueError, match="^mechanism"):
        get_mechanism("nope")


def test_ledger_has_one_event_per_step_matching_the_plan(tmp_path: Path) -> None:
    cfg = tiny()
    data = prepare_data(cfg)
    with Ledger.create(tmp_path / "l.jsonl", mechanism="dp_lora") as ledger:
        res = fit(cfg, data.train, data.heldout, ledger=ledger)
        events = ledger.events
    assert verify_ledger(tmp_path / "l.jsonl").ok
    (ev,) = events
    assert isinstance(ev, GaussianEvent) and ev.count == 6 and ev.sampling == "poisson"
    assert ev.sample_rate == pytest.approx(8 / len(data.train)) and ev.clip_norm == 1.0
    assert events == planned_events(cfg).events
    assert res.steps_done == 6 and "accuracy" in res.metrics["heldout"]
    assert not any(p.grad is not None for p in res.model.parameters())


def test_event_is_appended_before_the_update_is_applied() -> None:
    cfg = tiny(training={"steps": 3})
    data = prepare_data(cfg)
    snapshots: list[tuple[dict[str, torch.Tensor], Any]] = []

    class SpyLedger:
        def append(self, event: Any) -> None:
            snapshots.append((trainable(trainer.model), event))

    plan = resolve_plan(cfg, len(data.train))
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    trainer = DPLoraTrainer(cfg, data.train, plan, model, tok, torch.device("cpu"), ledger=SpyLedger())
    for _ in range(3):
        before = trainable(model)
        trainer.step()
        at_append, event = snapshots[-1]
        assert all(torch.equal(before[n], at_append[n]) for n in before)  # not yet applied
        assert any(not torch.equal(before[n], p) for n, p in trainable(model).items())  # applied after
        assert isinstance(event, GaussianEvent) and event.noise_multiplier == 1.0
    trainer.close()


def test_empty_poisson_batches_are_noise_only_steps_with_events(tmp_path: Path) -> None:
    cfg = tiny(training={"steps": 4, "batch_size": None, "sample_rate": 1e-4})
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    with Ledger.create(tmp_path / "l.jsonl") as ledger:
        trainer = DPLoraTrainer(cfg, data.train, plan, model, tok, torch.device("cpu"), ledger=ledger)
        for _ in range(4):
            before = trainable(model)
            info = trainer.step()
            assert info["batch_size"] == 0
            assert all(not torch.equal(before[n], p) for n, p in trainable(model).items())  # noise moved all
        assert sum(e.count for e in ledger.events) == 4
        trainer.close()


def test_noise_has_the_configured_scale() -> None:
    p = torch.nn.Parameter(torch.zeros(200, 200))
    opt = torch.optim.SGD([p], lr=1.0)
    apply_noisy_update([("p", p)], {"p": torch.zeros(200, 200)}, 3.0, 2.0, torch.Generator().manual_seed(0), opt)
    # SGD, lr 1: p = -noise/denominator, noise ~ N(0, 3^2)
    assert float(p.detach().std()) == pytest.approx(1.5, rel=0.02)
    assert abs(float(p.detach().mean())) < 5 * 1.5 / 200  # 5 standard errors


def test_virtual_batches_give_the_same_clipped_sum() -> None:
    cfg = tiny()
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))
    sums = []  # (the tiny models have no dropout, so the two passes are comparable exactly)
    for physical in (3, 64):
        c = tiny(training={"physical_batch_size": physical})
        model, tok = build_model(c, 2, torch.device("cpu"))
        tr = DPLoraTrainer(c, data.train, plan, model, tok, torch.device("cpu"))
        total, size = tr.clipped_sum(np.arange(20))
        assert size == 20
        sums.append(total)
        tr.close()
    for n in sums[0]:
        torch.testing.assert_close(sums[0][n], sums[1][n], rtol=1e-5, atol=1e-6)


def test_non_private_baseline_records_no_guarantee(tmp_path: Path) -> None:
    from privaudit.accounting.base import compute_epsilon

    cfg = tiny(privacy={"noise_multiplier": 0.0})
    data = prepare_data(cfg)
    with Ledger.create(tmp_path / "l.jsonl") as ledger:
        fit(cfg, data.train, data.heldout, ledger=ledger)
        (ev,) = ledger.events
        assert isinstance(ev, PlaintextEvent) and ev.count == 6
        res = compute_epsilon(ledger, 1e-5, "rdp")
    assert not res.has_guarantee


def test_unsafe_noise_factor_changes_noise_not_ledger(tmp_path: Path) -> None:
    cfg = tiny()
    data = prepare_data(cfg)
    with Ledger.create(tmp_path / "l.jsonl") as ledger:
        planted = fit(cfg, data.train, data.heldout, ledger=ledger, _unsafe_noise_factor=0.0)
        (ev,) = ledger.events
    assert isinstance(ev, GaussianEvent) and ev.noise_multiplier == 1.0  # the ledger still claims σ = 1
    # same seeds (same batches), noise switched off: equals the σ = 0 run exactly
    clean = fit(tiny(privacy={"noise_multiplier": 0.0}), data.train, data.heldout)
    noisy = fit(cfg, data.train, data.heldout)
    a, b, c = trainable(planted.model), trainable(clean.model), trainable(noisy.model)
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)
    assert any(not torch.allclose(a[n], c[n], atol=1e-4) for n in a)
    with pytest.raises(ValueError, match="^_unsafe_noise_factor"):
        fit(cfg, data.train, data.heldout, _unsafe_noise_factor=-1.0)


def test_fixed_batch_sampling_is_recorded_as_such(tmp_path: Path) -> None:
    cfg = tiny(training={"sampling": "fixed_batch", "batch_size": 8})
    data = prepare_data(cfg)
    with Ledger.create(tmp_path / "l.jsonl") as ledger:
        fit(cfg, data.train, data.heldout, ledger=ledger)
        (ev,) = ledger.events
    assert isinstance(ev, GaussianEvent)
    assert ev.sampling == "fixed_batch" and ev.batch_size == 8 and ev.dataset_size == len(data.train)
    assert [ev] == planned_events(cfg).events


@pytest.mark.parametrize("directions", ["dirac", "gaussian"])
def test_gradient_canaries_are_detectable_and_rebuildable(directions: str) -> None:
    m = 40
    cfg = tiny(training={"steps": 14, "batch_size": None, "sample_rate": 0.5, "optimizer": "sgd",
                         "learning_rate": 0.5},
               privacy={"noise_multiplier": 0.3},
               audit={"gradient_canaries": m, "gradient_canary_seed": 11, "gradient_canary_directions": directions})
    data = prepare_data(cfg)
    res = fit(cfg, data.train, data.heldout)
    key = res.gradient_canaries
    assert key is not None and key.count == m and key.seed == 11 and key.directions == directions
    assert 5 < sum(key.included) < 35
    assert key.param_names == list(res.theta_0)
    js = json.loads(json.dumps(key.to_json()))
    assert GradientCanaries.from_json(js).direction(3, 1.0).tolist() == key.direction(3, 1.0).tolist()
    d0 = key.direction(3, js["clip_norm"])
    assert float(d0.norm()) == pytest.approx(cfg.privacy.clip_norm, rel=1e-5)
    if directions == "gaussian":
        assert torch.equal(d0, canary_direction(js["seed"], 3, key.dim, js["clip_norm"]))
    else:  # one coordinate each, all distinct
        assert int((d0 != 0).sum()) == 1 and len(set(key.coordinates().tolist())) == m
    scores = score_gradient_canaries(res.theta_0, trainable(res.model), js)
    inc = np.array(js["included"])
    # AUC of the score for membership
    auc = np.mean([s_in > s_out for s_in in scores[inc] for s_out in scores[~inc]])
    assert auc > 0.95, (auc, scores)


@pytest.mark.parametrize("directions", ["dirac", "gaussian"])
def test_canary_step_record_is_the_released_noisy_sum_projected_on_the_canaries(directions: str) -> None:
    """With plain SGD, θ_T − θ₀ = −(lr/denominator)·Σ_t S_t, so the recorded per-step projections must
    add up to the final-model score times denominator/lr; off by default."""
    m, lr = 30, 0.5
    cfg = tiny(training={"steps": 5, "batch_size": None, "sample_rate": 0.5, "optimizer": "sgd", "learning_rate": lr},
               privacy={"noise_multiplier": 0.3},
               audit={"gradient_canaries": m, "gradient_canary_seed": 5, "record_canary_steps": True,
                      "gradient_canary_directions": directions})
    data = prepare_data(cfg)
    res = fit(cfg, data.train, data.heldout)
    proj = res.run_files[CANARY_STEPS_FILE]["projections"].double().numpy()
    assert proj.shape == (5, m)
    denominator = res.plan.sample_rate * res.plan.dataset_size
    final = score_gradient_canaries(res.theta_0, trainable(res.model), res.gradient_canaries)
    np.testing.assert_allclose(proj.sum(0), final * denominator / lr, rtol=1e-3, atol=1e-3)
    off = fit(tiny(audit={"gradient_canaries": 4, "gradient_canary_seed": 5}), data.train, data.heldout)
    assert off.run_files == {}


def test_dirac_canaries_are_orthogonal_and_clipped_by_the_records_rule() -> None:
    """Dirac canaries: the clipped sum of any chosen set projects to exactly C on each chosen canary and
    0 on the others (no cross-talk); Gaussian directions of the same key leak into one another."""
    shapes, names = [[40, 30], [30]], ["a", "b"]
    dim = 40 * 30 + 30
    dirac = GradientCanaries(3, 600, names, shapes, 2.0, 0.1, directions="dirac")
    gauss = GradientCanaries(3, 600, names, shapes, 2.0, 0.1, directions="gaussian")
    chosen = list(range(0, 600, 3))
    total, n = dirac.clipped_sum(chosen, 2.0)
    assert n == 200 and total is not None
    proj = dirac.unit_projections(total).numpy()
    mask = np.zeros(600, bool)
    mask[chosen] = True
    np.testing.assert_allclose(proj[mask], 2.0 * (1 - 1e-6 / 2000), rtol=1e-6)  # C / (1 + ε_clip/‖g‖)·‖g‖
    assert np.all(proj[~mask] == 0.0)
    gtotal, _ = gauss.clipped_sum(chosen, 2.0)
    gproj = gauss.unit_projections(gtotal).numpy()
    assert np.abs(gproj[~mask]).mean() > 0.1  # ≈ C·√(200/dim) = 0.68 of cross-talk
    # the one clipping rule: a planted rule (no clipping) shows in the dirac sum as well
    raw, _ = dirac.clipped_sum(chosen, 1e9)
    assert float(dirac.unit_projections(raw)[0]) == pytest.approx(dirac.raw_norm, rel=1e-5)
    # unclipped runs add the key's C itself
    unclipped, _ = dirac.clipped_sum(chosen, None)
    assert float(dirac.unit_projections(unclipped)[0]) == pytest.approx(2.0)
    # the final-model score reads the canary's coordinate
    theta0 = {"a": torch.zeros(40, 30), "b": torch.zeros(30)}
    final = dirac.unflatten(-total)
    np.testing.assert_allclose(score_gradient_canaries(theta0, final, dirac)[mask], proj[mask], rtol=1e-6)
    assert dim == dirac.dim


def test_dirac_coordinates_prefer_the_adapter_matrices() -> None:
    names = ["m.lora_A.weight", "m.lora_B.weight", "classifier.weight", "classifier.bias"]
    shapes = [[4, 50], [50, 4], [2, 50], [2]]
    key = GradientCanaries(7, 300, names, shapes, 1.0, 0.1, directions="dirac")
    c = key.coordinates()
    assert len(set(c.tolist())) == 300 and c.min() >= 0 and c.max() < 400  # adapters: flat [0, 400)
    assert (c < 200).sum() > 100 and (c >= 200).sum() > 100  # both adapter matrices, uniformly
    more = GradientCanaries(7, 450, names, shapes, 1.0, 0.1, directions="dirac").coordinates()
    assert len(set(more.tolist())) == 450 and more.max() < key.dim and (more >= 400).any()  # too many: all
    again = GradientCanaries(7, 300, names, shapes, 1.0, 0.1, directions="dirac").coordinates()
    assert np.array_equal(c, again)  # from the seed, names and shapes alone


def test_canary_directions_auto_refusals_and_old_keys() -> None:
    from privaudit.mechanisms.training import resolve_canary_directions

    assert resolve_canary_directions("auto", 10, 10) == "dirac"
    assert resolve_canary_directions("auto", 11, 10) == "gaussian"
    assert resolve_canary_directions("gaussian", 11, 10) == "gaussian"
    with pytest.raises(ValueError, match="^audit.gradient_canary_directions: dirac canaries need"):
        resolve_canary_directions("dirac", 11, 10)
    # up to 1,000,000 Dirac canaries; Gaussian ones (O(dim) per canary per step) stop at 100,000
    assert resolve_canary_directions("auto", 1_000_000, 2_000_000) == "dirac"
    with pytest.raises(ValueError, match="^audit.gradient_canaries: at most 100000 with Gaussian"):
        resolve_canary_directions("auto", 200_000, 150_000)
    with pytest.raises(ValueError, match="^audit_key.gradient_canaries.count: at most 100000"):
        GradientCanaries(1, 100_001, ["a"], [[10]], 1.0, 0.1, directions="gaussian")
    with pytest.raises(ValueError, match="^audit_key.gradient_canaries.directions:"):
        GradientCanaries(1, 11, ["a"], [[10]], 1.0, 0.1, directions="dirac")
    with pytest.raises(ValueError, match="^audit_key.gradient_canaries.directions:"):
        GradientCanaries(1, 3, ["a"], [[10]], 1.0, 0.1, directions="sparse")
    # shapes from someone else's key: checked before any coordinate is drawn or read
    for shapes in ([[10], [3]], [[10**13, 10**13]], [[-1]], [[True]]):
        with pytest.raises(ValueError, match="^audit_key.gradient_canaries.param_shapes:"):
            GradientCanaries(1, 3, ["a"], shapes, 1.0, 0.1, directions="dirac")
    with pytest.raises(ValueError, match="^audit_key.gradient_canaries.param_shapes: 10 coordinates"):
        GradientCanaries(1, 3, ["a"], [[10]], 1.0, 0.1, directions="dirac").unit_projections(torch.zeros(12))
    key = GradientCanaries(1, 3, ["a"], [[10]], 1.0, 0.1).to_json()
    del key["directions"]  # a key written before directions existed
    assert GradientCanaries.from_json(key).directions == "gaussian"
    # a run whose canaries do not fit the trainable coordinates falls back to Gaussian directions
    cfg = tiny(training={"steps": 1}, audit={"gradient_canaries": 5, "gradient_canary_seed": 1})
    data = prepare_data(cfg)
    dim = fit(cfg, data.train, data.heldout).gradient_canaries.dim
    many = tiny(training={"steps": 1}, audit={"gradient_canaries": dim + 1, "gradient_canary_seed": 1})
    assert fit(many, data.train, data.heldout).gradient_canaries.directions == "gaussian"
    refused = tiny(training={"steps": 1}, audit={"gradient_canaries": dim + 1, "gradient_canary_seed": 1,
                                                 "gradient_canary_directions": "dirac"})
    with pytest.raises(ValueError, match="^audit.gradient_canary_directions:"):
        fit(refused, data.train, data.heldout)


def test_every_step_scores_separate_included_canaries() -> None:
    rng = np.random.default_rng(0)
    steps, m, q, sigma, clip = 30, 4000, 0.3, 1.0, 2.0
    inc = rng.random(m) < 0.5
    sampled = (rng.random((steps, m)) < q) & inc
    x = clip * (sampled + rng.normal(0, sigma, (steps, m))) + 0.7  # a shared offset (data cross-talk)
    s = every_step_canary_scores(x, clip, q)
    auc = np.mean(s[inc][:, None] > s[~inc][None, :])
    # ... better than the final-model view (the plain sum of projections)
    auc_sum = np.mean(x.sum(0)[inc][:, None] > x.sum(0)[~inc][None, :])
    assert auc > 0.85 and auc > auc_sum
    with pytest.raises(ValueError, match="^projections:"):
        every_step_canary_scores(np.zeros(5), 1.0, 0.5)
    with pytest.raises(ValueError, match="^sample_rate:"):
        every_step_canary_scores(np.zeros((2, 5)), 1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# end to end: utility, and `epsilon --config` equals the finished run's ledger
# ----------------------------------------------------------------------------------------------
def _train_and_check_epsilon(cfg_dict: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    from click.testing import CliRunner

    from privaudit.accounting.base import compute_epsilon
    from privaudit.cli import cli
    from privaudit.config import load_config
    from privaudit.runs import train

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    result = train(load_config(path), tmp_path / "run", progress=False)
    ledger = Ledger.read(tmp_path / "run" / "ledger.jsonl")
    assert verify_ledger(ledger.path).ok
    plan = result.manifest["plan"]
    assert sum(e.count for e in ledger.events) == plan["steps"]
    out = CliRunner().invoke(cli, ["epsilon", "--config", str(path), "--json"])
    assert out.exit_code == 0, out.output
    reported = {r["accountant"]: r["epsilon"] for r in json.loads(out.output)["results"]}
    for name in ("rdp", "pld", "prv"):
        from_ledger = compute_epsilon(ledger, plan["delta"], name).epsilon
        assert reported[name] == pytest.approx(from_ledger, rel=1e-12)
        assert result.privacy["epsilon"][name] == pytest.approx(from_ledger, rel=1e-12)
    return result.manifest


@pytest.mark.slow
def test_encoder_classification_dp_run_beats_chance(tmp_path: Path) -> None:
    cfg = {
        "task": "classification",
        "model": {"name": "all-MiniLM-L6-v2", "max_length": 40},
        "lora": {"rank": 1, "alpha": 1, "freeze_a": True,
                 "target_modules": ["encoder.layer.5.attention.self.value"]},
        "data": {"synthetic": {"n_people": 160, "n_canaries": 8}, "max_heldout": 80},
        "training": {"steps": 14, "batch_size": 40, "optimizer": "sgd", "learning_rate": 2.0,
                     "physical_batch_size": 64},
        # fixed noise seed: deterministic (over seeds 0-5 this config gives 0.70-0.83, majority 0.54)
        "privacy": {"target_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_seed": 0},
    }
    manifest = _train_and_check_epsilon(cfg, tmp_path)
    acc = manifest["metrics"]["heldout"]["accuracy"]
    assert manifest["privacy"]["noise_multiplier"] > 0.5  # calibrated to ε = 8: real noise
    assert acc >= 0.66 and acc >= manifest["metrics"]["heldout"]["majority_baseline"] + 0.12, manifest["metrics"]


@pytest.mark.slow
def test_causal_lm_dp_run_beats_chance(tmp_path: Path) -> None:
    cfg = {
        "task": "causal_lm",
        "model": {"name": "tiny-gpt2", "max_length": 40},
        "lora": {"rank": 8, "alpha": 16, "target_modules": ["c_attn", "lm_head"]},
        "data": {"synthetic": {"n_people": 150, "n_canaries": 8}, "max_heldout": 40},
        "training": {"steps": 16, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.03,
                     "eval_before": True},
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-5},
    }
    manifest = _train_and_check_epsilon(cfg, tmp_path)
    before = manifest["metrics"]["heldout_before"]["perplexity"]
    after = manifest["metrics"]["heldout"]["perplexity"]
    vocab = 30522  # the tiny models' tokenizer; uniform guessing has perplexity = vocab size
    assert after < 0.5 * before and after < 0.5 * vocab, (before, after)


# ----------------------------------------------------------------------------------------------
# issue 14, item 1: fixed-size batches under add/remove are charged sensitivity 2·C
# ----------------------------------------------------------------------------------------------
def _exact_fixed_batch_epsilon(n: int, b: int, sigma: float, delta: float) -> float:
    """ε(δ) of the worst-case pair of ONE fixed-batch step with N = B (independent 1-D quadrature):
    every record of D has clipped gradient +C, the added one −C. In units of C (shifted by the sum over
    D): D gives N(0, σ²); D ∪ {x} puts x in the batch with probability B/(N+1), pushing a +C record
    out (shift −2), else N(0, σ²)."""
    from scipy import integrate, optimize, stats

    w = b / (n + 1)

    def hockey(eps: float) -> float:
        p = lambda y: stats.norm.pdf(y, 0.0, sigma)
        q = lambda y: w * stats.norm.pdf(y, -2.0, sigma) + (1 - w) * stats.norm.pdf(y, 0.0, sigma)
        lo, hi = -2.0 - 40 * sigma, 40 * sigma
        pts = np.linspace(lo, hi, 4001)
        one = integrate.simpson(np.maximum(q(pts) - math.exp(eps) * p(pts), 0.0), x=pts)
        two = integrate.simpson(np.maximum(p(pts) - math.exp(eps) * q(pts), 0.0), x=pts)
        return max(float(one), float(two))

    return float(optimize.brentq(lambda e: hockey(e) - delta, 0.0, 60.0, xtol=1e-6))


def test_fixed_batch_step_is_charged_twice_the_clip_norm() -> None:
    """N = B = 100, σ = 1, one step: sensitivity C gave ε(1e-5) = 4.377; the exact pair's ε is ≈ 9.98."""
    from privaudit.accounting.base import compute_epsilon
    from privaudit.config import PrivacyPlan
    from privaudit.mechanisms.dp_lora import step_event

    exact = _exact_fixed_batch_epsilon(100, 100, 1.0, 1e-5)
    assert 9.9 < exact < 10.1  # the regime: far above the old charge
    for rel in ("add_remove", "replace"):
        plan = PrivacyPlan(1.0, 1.0, 1, "fixed_batch", 100, 100, 0.5, 1e-5, rel)  # type: ignore[arg-type]
        ev = step_event(plan)
        assert isinstance(ev, GaussianEvent) and ev.sensitivity == pytest.approx(1.0)  # 2·C, C = 0.5
        for acc in ("rdp", "pld"):
            eps = compute_epsilon([ev], 1e-5, acc, rel).epsilon
            assert eps >= exact - 1e-6, (rel, acc, eps, exact)
            assert eps < exact + (0.2 if acc == "pld" else 1.0)  # and not absurdly loose
    # B = 10 of N = 100, 10 steps (one pass): the added record is in at most one batch, where it moves
    # the sum by ≤ 2C; the ledger charges one release at 2C, which dominates that pair (joint convexity)
    plan = PrivacyPlan(1.0, 0.1, 10, "fixed_batch", 10, 100, 1.0, 1e-5, "add_remove")
    eps10 = compute_epsilon([step_event(plan).with_count(10)], 1e-5, "pld").epsilon
    assert eps10 >= exact - 1e-6
    # more than one pass under add/remove: the permutations of N + 1 and N records fall out of step and
    # no bound is proved, so the plan is refused; under replace the same charge holds for any passes
    with pytest.raises(ValueError, match="^training.sampling"):
        step_event(PrivacyPlan(1.0, 0.1, 11, "fixed_batch", 10, 100, 1.0, 1e-5, "add_remove"))
    many = step_event(PrivacyPlan(1.0, 0.1, 25, "fixed_batch", 10, 100, 1.0, 1e-5, "replace")).with_count(25)
    assert isinstance(many, GaussianEvent) and many.accounted_releases() == (1.0, 3)


def test_fixed_batch_calibration_uses_twice_the_clip_norm() -> None:
    from privaudit.accounting.base import compute_epsilon
    from privaudit.mechanisms.dp_lora import step_event

    for rel in ("add_remove", "replace"):
        cfg = tiny(training={"sampling": "fixed_batch", "batch_size": 10, "steps": 10},
                   privacy={"noise_multiplier": None, "target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp",
                            "neighbouring": rel})
        plan = resolve_plan(cfg, 100)
        ev = step_event(plan).with_count(plan.steps)
        eps = compute_epsilon([ev], 1e-5, "rdp", rel).epsilon
        assert 1.8 < eps <= 2.0, (rel, eps)  # the ledger of the calibrated run meets the target
        assert plan.calibrated_epsilon == pytest.approx(eps, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# issue 14, item 4: a gradient canary is one more unit of the accounted mechanism
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["poisson", "fixed_batch"])
def test_canaries_are_units_of_the_records_sampler_and_clipped_as_records(sampling: str) -> None:
    """A canary is sampled by the records' sampler and clipped by the records' rule, so its privacy
    loss is that of one more record, ε_canary = the ledger's per-record ε."""
    from privaudit.accounting.base import compute_epsilon
    from privaudit.mechanisms import per_sample
    from privaudit.mechanisms.dp_lora import step_event

    training = ({"sampling": "fixed_batch", "batch_size": 10} if sampling == "fixed_batch"
                else {"batch_size": None, "sample_rate": 0.3})
    cfg = tiny(training={**training, "steps": 4, "optimizer": "sgd"}, privacy={"clip_norm": 0.5},
               audit={"gradient_canaries": 30, "gradient_canary_seed": 4})
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    tr = DPLoraTrainer(cfg, data.train, plan, model, tok, torch.device("cpu"))
    assert tr.canaries is not None
    n, m_in = len(data.train), sum(tr.canaries.included)
    assert tr.sampler.num_items == n + m_in and len(tr.units) == m_in  # members only, after the records

    # clipping: a canary's raw gradient is far above C and leaves clipped to exactly C, like a record's
    assert tr.canaries.raw_norm == pytest.approx(1000 * 0.5)
    total = {k: torch.zeros_like(p) for k, p in tr.params}
    assert tr.add_canaries(total, [tr.units[0]]) == 1
    norm = math.sqrt(sum(float(v.square().sum()) for v in total.values()))
    assert norm == pytest.approx(0.5, rel=1e-4)

    # sampling: the same draws decide records and canaries
    steps = 300
    counts = np.zeros(n + m_in)
    sizes = []
    for _ in range(steps):
        b = tr.sampler.next_batch()
        counts[b] += 1
        sizes.append(len(b))
    if sampling == "poisson":
        q = plan.sample_rate
        sd = math.sqrt(q * (1 - q) / (steps * m_in))
        assert abs(counts[n:].mean() / steps - q) < 5 * sd  # canaries at the records' rate q
        canary_event = GaussianEvent(noise_multiplier=plan.noise_multiplier, sample_rate=q, clip_norm=norm,
                                     count=plan.steps)
    else:
        assert set(sizes) == {10}  # canaries take batch slots: they push records out, as an added record
        # the canary's worst-case pair: ≤ ceil(k·B/N) batches in k steps, each moving the sum by ≤ 2·C
        assert counts[n:].max() <= math.ceil(steps * 10 / n)
        canary_event = GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="full", clip_norm=norm,
                                     sensitivity=2 * norm, count=math.ceil(plan.steps * 10 / n))
    ledger_eps = compute_epsilon([step_event(plan).with_count(plan.steps)], 1e-5, "pld").epsilon
    assert compute_epsilon([canary_event], 1e-5, "pld").epsilon == pytest.approx(ledger_eps, rel=1e-3)

    # a clipping bug hits canaries as it hits records
    mp = pytest.MonkeyPatch()
    mp.setattr(per_sample, "clip_factors", lambda norms, c: (100 * c / (norms + 1e-6)).clamp(max=1.0))
    try:
        total = {k: torch.zeros_like(p) for k, p in tr.params}
        tr.add_canaries(total, [tr.units[0]])
    finally:
        mp.undo()
    assert math.sqrt(sum(float(v.square().sum()) for v in total.values())) == pytest.approx(50.0, rel=1e-4)
    # one real step: records and canaries of one draw
    info = tr.step()
    if sampling == "fixed_batch":
        assert info["canaries"] + info["batch_size"] == 10
    tr.close()


def test_resume_rebuilds_the_sampler_over_the_checkpoints_canaries() -> None:
    """Canaries from OS entropy differ between the crashed process and the resuming one: the sampler is
    rebuilt over the checkpoint's member canaries before its state is loaded."""
    from privaudit.mechanisms.training import optimizer_to_flat

    cfg = tiny(audit={"gradient_canaries": 40, "gradient_canary_seed": None})
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))

    def trainer(seed: int) -> DPLoraTrainer:
        model, tok = build_model(cfg, 2, torch.device("cpu"))
        return DPLoraTrainer(cfg, data.train, plan, model, tok, torch.device("cpu"), canary_seed=seed)

    a, b = trainer(1), trainer(2)
    assert a.canaries is not None and b.canaries is not None and a.canaries.included != b.canaries.included
    a.step()
    tensors, scalars = optimizer_to_flat(a.optimizer)
    b.load_state(1, trainable(a.model), tensors, json.loads(json.dumps({**a.state(), "optimizer": scalars})))
    assert b.canaries is not None and b.canaries.included == a.canaries.included
    assert b.sampler.num_items == a.sampler.num_items == len(data.train) + sum(a.canaries.included)
    assert np.array_equal(a.sampler.next_batch(), b.sampler.next_batch())
    a.close()
    b.close()


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedule_is_followed_step_by_step(schedule: str) -> None:
    from privaudit.mechanisms.training import scheduled_learning_rate

    cfg = tiny(training={"lr_schedule": schedule})
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    trainer = DPLoraTrainer(cfg, data.train, plan, model, tok, torch.device("cpu"))
    seen = []
    for _ in range(plan.steps):
        trainer.step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    lr, T = cfg.training.learning_rate, plan.steps
    expected = {"constant": [lr] * T,
                "linear": [lr * (1 - k / T) for k in range(T)],
                "cosine": [lr * 0.5 * (1 + math.cos(math.pi * k / T)) for k in range(T)]}[schedule]
    assert seen == pytest.approx(expected)
    assert scheduled_learning_rate(lr, schedule, T, T) == pytest.approx(lr if schedule == "constant" else 0.0)
    trainer.close()


def test_a_schedule_is_refused_where_the_mechanism_trains_at_a_constant_rate() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        parse_config({**TINY, "mechanism": "privtune", "training": {**TINY["training"], "lr_schedule": "linear"}})
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny(training={"lr_schedule": "step"})
