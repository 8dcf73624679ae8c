"""LoRA with a frozen random A: frozen bitwise, secret A kept out of the release, ledger, audits."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privaudit.accounting.base import compute_epsilon
from privaudit.audit.auditor import audit_run
from privaudit.ledger.events import ClaimEvent, GaussianEvent, SketchEvent
from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import parse_config
from privaudit.runs import planned_events
from privaudit.mechanisms import get_mechanism
from privaudit.config import mechanism_names
from privaudit.mechanisms.lora_sketch import mechanism as ls
from privaudit.studies import lora_sketch_rank as rank_study
from privaudit.mechanisms.lora_sketch.sketch_stats import lora_layers
from privaudit.mechanisms.training import build_model, prepare_data
from privaudit.runs import load_run, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TINY: dict[str, Any] = {
    "mechanism": "lora_sketch",
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "lora": {"rank": 4, "alpha": 4, "freeze_a": True, "init_a": "gaussian_1_over_r", "train_head": True},
    "data": {"synthetic": {"n_people": 20, "records_per_person": 2, "n_canaries": 4}, "max_heldout": 16},
    "training": {"steps": 5, "batch_size": 8, "learning_rate": 0.1, "optimizer": "sgd"},
    "privacy": {"noise_multiplier": 0.0, "noise_seed": 7},
    "options": {"sketch_stats_records": 8, "sketch_stats_draws": 20},
}


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def tiny(**sections: dict[str, Any]) -> Any:
    data = copy.deepcopy(TINY)
    for name, update in sections.items():
        data[name] = {**data.get(name, {}), **update}
    return parse_config(data)


def a_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {lay.a_param: lay.a.detach().clone() for lay in lora_layers(model)}


def bitwise_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k].view(torch.uint8) if x[k].dtype != torch.uint8 else x[k],
                                                    y[k].view(torch.uint8) if y[k].dtype != torch.uint8 else y[k])
                                        for k in x)


# ------------------------------------------------------------------------------------------------
# config and ledger


def test_registered_and_config_checked() -> None:
    assert "lora_sketch" in mechanism_names()
    assert get_mechanism("lora_sketch").OBSERVER == "released model"
    with pytest.raises(ValueError, match=r"^lora\.freeze_a"):
        ls.fit(tiny(lora={"freeze_a": False}), [], [])
    with pytest.raises(ValueError, match=r"^options\.a_secrt"):
        ls.settings_of(tiny(options={"a_secrt": True}))
    with pytest.raises(ValueError, match=r"^options\.sketch_canaries"):
        ls.settings_of(tiny(options={"sketch_canaries": -1}))


def test_noise_free_ledger_has_no_formal_guarantee() -> None:
    cfg = tiny(options={"a_secret": True})
    pe = planned_events(cfg)
    (ev,) = pe.events
    assert isinstance(ev, SketchEvent)
    assert (ev.rank, ev.steps, ev.a_secret, ev.a_distribution, ev.optimizer) == (4, 5, True, "gaussian_1_over_r", "sgd")
    assert ev.batch_size == 8 and ev.noise_multiplier == 0.0
    for acc in ("rdp", "pld", "prv"):
        res = compute_epsilon(pe.events, 1e-5, acc)
        assert math.isinf(res.epsilon) and not res.has_guarantee
        assert "no formal DP guarantee" in (res.reason or "")


def test_added_noise_is_accounted_as_dp_sgd() -> None:
    cfg = tiny(privacy={"noise_multiplier": 1.1})
    pe = planned_events(cfg)
    sk, g = pe.events
    assert isinstance(sk, SketchEvent) and sk.noise_multiplier == 1.1
    assert isinstance(g, GaussianEvent) and g.count == 5 and g.noise_multiplier == 1.1
    with_sketch = compute_epsilon(pe.events, 1e-5, "rdp").epsilon
    assert math.isfinite(with_sketch) and with_sketch == compute_epsilon([g], 1e-5, "rdp").epsilon


def test_claims_go_to_the_ledger_header(tmp_path: Path) -> None:
    cfg = tiny(privacy={"claims": [{"epsilon": 0.5, "delta": 1e-5, "source": "paper"}]})
    assert planned_events(cfg).claims == [ClaimEvent(epsilon=0.5, delta=1e-5, source="paper")]


# ------------------------------------------------------------------------------------------------
# frozen A, secret A


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_a_stays_bitwise_frozen_and_the_event_is_written_first(sigma: float, tmp_path: Path) -> None:
    cfg = tiny(privacy={"noise_multiplier": sigma}, options={"a_secret": True, "a_seed": 123})
    data = prepare_data(cfg)
    ref, _ = build_model(cfg, 2, torch.device("cpu"))
    public_a = a_of(ref)
    ls.set_a(ref, "gaussian_1_over_r", 123)
    secret_a = a_of(ref)
    assert not bitwise_equal(public_a, secret_a)  # the secret A is not the public-seed A
    with Ledger.create(tmp_path / "l.jsonl", mechanism="lora_sketch") as ledger:
        res = ls.fit(cfg, data.train, data.heldout, ledger=ledger)
        events = ledger.events
    assert bitwise_equal(a_of(res.model), secret_a)
    assert verify_ledger(tmp_path / "l.jsonl").ok
    assert events == planned_events(cfg).events and isinstance(events[0], SketchEvent)
    b = [lay.b for lay in lora_layers(res.model)]
    assert all(float(x.detach().abs().sum()) > 0 for x in b)  # B was trained
    assert not any(".lora_A." in k for k in res.released_state)
    assert any(".lora_B." in k for k in res.released_state)


def test_clip_without_noise_bounds_each_records_gradient() -> None:
    """With per-record clipping to C (no noise), 5 SGD steps move θ by at most 5·η·(N + m)·C/(q·N)
    (N records and m = 4 canaries, each clipped to C; the sum is divided by the expected batch q·N)."""
    c, lr = 1e-4, 0.1
    moved = {}
    for clip in (True, False):
        cfg = tiny(privacy={"clip_norm": c}, training={"learning_rate": lr},
                   options={"clip_without_noise": clip, "sketch_canaries": 4, "sketch_canary_norm": 10 * c})
        data = prepare_data(cfg)
        res = ls.fit(cfg, data.train, data.heldout)
        assert res.metrics["sketch"]["per_sample_clipping"] is clip
        assert res.sketch_canaries is not None and res.sketch_canaries.clip is clip
        from privaudit.models import trainable_state_dict

        final = trainable_state_dict(res.model)
        moved[clip] = math.sqrt(sum(float((final[k] - res.theta_0[k]).double().square().sum()) for k in final))
    q = 8 / len(data.train)
    bound = 5 * lr * (len(data.train) + 4) * c / (q * len(data.train))
    assert 0 < moved[True] <= bound * (1 + 1e-4) < moved[False]


def test_write_ahead_sketch_event_precedes_every_update() -> None:
    cfg = tiny(training={"steps": 3})
    data = prepare_data(cfg)
    seen: list[tuple[Any, float]] = []

    class SpyLedger:
        events: list[Any] = []

        def append(self, event: Any) -> None:
            seen.append((event, float(sum(float(lay.b.abs().sum()) for lay in layers))))

    layers: list[Any] = []
    orig = ls.SketchTrainer.__init__

    def spy_init(self: Any, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        layers.extend(self.layers)

    mp = pytest.MonkeyPatch()
    mp.setattr(ls.SketchTrainer, "__init__", spy_init)
    try:
        ls.fit(cfg, data.train, data.heldout, ledger=SpyLedger())
    finally:
        mp.undo()
    assert len(seen) == 1 and isinstance(seen[0][0], SketchEvent) and seen[0][1] == 0.0  # B still 0


def test_run_directory_keeps_a_secret_out_of_the_release(tmp_path: Path) -> None:
    cfg = tiny(options={"a_secret": True, "sketch_stats_records": 0})
    rd = train(cfg, tmp_path / "run", progress=False).run_dir
    adapter = load_file(str(rd / "adapter.safetensors"))
    init = load_file(str(rd / "adapter_init.safetensors"))
    assert not any(".lora_A." in k for k in list(adapter) + list(init))
    assert any(".lora_B." in k for k in adapter)
    raw = b"".join((rd / f).read_bytes() for f in ("adapter.safetensors", "adapter_init.safetensors",
                                                     "manifest.json", "ledger.jsonl"))
    key = json.loads((rd / "audit_key.json").read_text())
    seed = int(key["sketch"]["a_seed"])
    assert key["sketch"]["a_secret"] is True and str(seed).encode() not in raw
    # the auditor's secret rebuilds A exactly; the released run, loaded, has a different (substitute) A
    model, _ = build_model(cfg, 2, torch.device("cpu"))
    ls.set_a(model, "gaussian_1_over_r", seed)
    run = load_run(rd)
    assert not bitwise_equal(a_of(run.model), a_of(model))
    for lay in lora_layers(model):
        a_bytes = lay.a.detach().numpy().tobytes()
        assert a_bytes not in raw  # the secret A's values are nowhere in the released files
    man = json.loads((rd / "manifest.json").read_text())
    assert man["privacy"]["guarantee"] == "none" and man["metrics"]["sketch"]["a_secret"] is True


def test_public_a_is_released_bitwise(tmp_path: Path) -> None:
    cfg = tiny()
    res = train(cfg, tmp_path / "run", progress=False)
    adapter = load_file(str(res.run_dir / "adapter.safetensors"))
    model, _ = build_model(cfg, 2, torch.device("cpu"))
    assert bitwise_equal({k: v for k, v in adapter.items() if ".lora_A." in k}, a_of(model))
    sk = res.metrics["sketch"]
    assert sk["A"]["expected_AtA"] == "I" and sk["sketch_algebra_holds"] is True
    assert sk["stats"]["expected_relative_noise"] == pytest.approx((32 + 1) / 4)


def test_resume_restores_the_secret_a(tmp_path: Path) -> None:
    """Crash after step 4, resume: the result equals an uninterrupted run with the same secret A (whose
    seed, drawn from OS entropy, only the checkpoint and the audit key hold)."""
    opts = {"a_secret": True, "sketch_canaries": 8, "sketch_canary_seed": 3, "sketch_stats_records": 0}
    cfg = tiny(training={"steps": 6, "checkpoint_every": 2}, options=opts)

    class Crash(RuntimeError):
        pass

    def crash_at_4(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", progress=crash_at_4)
    res = train(None, tmp_path / "run", resume=True, progress=False)
    key = json.loads((res.run_dir / "audit_key.json").read_text())
    seed = int(key["sketch"]["a_seed"])
    led = Ledger.read(res.run_dir / "ledger.jsonl")
    assert sum(isinstance(e, SketchEvent) for e in led.events) == 1
    assert key["sketch_canaries"]["count"] == 8
    ref = train(tiny(training={"steps": 6, "checkpoint_every": 2}, options={**opts, "a_seed": seed}),
                tmp_path / "ref", progress=False)
    got = load_file(str(res.run_dir / "adapter.safetensors"))
    want = load_file(str(ref.run_dir / "adapter.safetensors"))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# sketch canaries


def _key(count: int = 200, clip: bool = False) -> ls.SketchCanaries:
    return ls.SketchCanaries(seed=5, count=count, layers=["l0", "l1"], shapes=[[24, 16], [8, 16]], norm=1.0,
                             sample_rate=0.5, clip=clip, clip_norm=0.5)


def test_sketch_canary_gradients_and_json() -> None:
    key = _key()
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 16, generator=g) / 2, torch.randn(4, 16, generator=g) / 2]
    f = key.factors(3)
    assert sum(float(u.square().sum() * v.square().sum()) for u, v in f) == pytest.approx(1.0, rel=1e-5)
    grads = key.b_gradients(3, a, [2.0, 2.0])
    torch.testing.assert_close(grads[0], 2.0 * torch.outer(f[0][0], a[0] @ f[0][1]))
    clipped = _key(clip=True).b_gradients(3, a, [2.0, 2.0])
    assert math.sqrt(sum(float(x.square().sum()) for x in clipped)) <= 0.5 + 1e-6
    again = ls.SketchCanaries.from_json(json.loads(json.dumps(key.to_json())))
    assert again.included == key.included and 60 < sum(key.included) < 140
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(again.factors(7), key.factors(7)))


@pytest.mark.parametrize("know_a", [True, False])
def test_sketch_canary_scores_separate_included_canaries(know_a: bool) -> None:
    """ΔB = −η·Σ_{included} s·G_i·Aᵀ + background: both scores rank included canaries first; the
    score with a wrong A does not."""
    from privaudit.attacks.metrics import auc

    key = ls.SketchCanaries(seed=5, count=60, layers=["l0", "l1"], shapes=[[64, 32], [48, 32]], norm=1.0,
                            sample_rate=0.5, clip=False, clip_norm=1.0)
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(8, 32, generator=g, dtype=torch.float64) / math.sqrt(8) for _ in range(2)]
    delta = [torch.randn(64, 8, generator=g, dtype=torch.float64) * 0.01,
             torch.randn(48, 8, generator=g, dtype=torch.float64) * 0.01]
    for i in range(key.count):
        if key.included[i]:
            for j, gr in enumerate(key.b_gradients(i, [x.float() for x in a], [1.0, 1.0])):
                delta[j] -= 0.1 * gr.double()
    inc = np.array(key.included)
    s = ls.score_sketch_canaries(delta, key, a=a if know_a else None, scaling=[1.0, 1.0] if know_a else None)
    assert auc(s[inc], s[~inc]) > (0.95 if know_a else 0.85)  # the A-free statistic is weaker
    wrong = [torch.randn(8, 32, generator=g, dtype=torch.float64) for _ in range(2)]
    sw = ls.score_sketch_canaries(delta, key, a=wrong, scaling=[1.0, 1.0])
    assert 0.2 < auc(sw[inc], sw[~inc]) < 0.8
    none = ls.score_sketch_canaries([d * 0 + torch.randn_like(d) for d in delta], key,
                                    a=a if know_a else None, scaling=[1.0, 1.0] if know_a else None)
    assert 0.2 < auc(none[inc], none[~inc]) < 0.8


# ------------------------------------------------------------------------------------------------
# end to end: no guarantee, audit, claim violated


# 28 train / 28 held-out records (incl. canaries), 30 SGD steps; 100 sketch canaries of norm 3 (seeds fixed:
# deterministic; over A seeds 0-2 the A-free canary AUC was 0.83-0.93 and A-known 0.84-1.0).
OVERFIT = {
    "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 64, "n_head": 2}},
    "lora": {"rank": 8, "alpha": 8},
    "data": {"synthetic": {"n_people": 24, "records_per_person": 2, "n_canaries": 8}, "heldout_fraction": 0.5},
    "training": {"steps": None, "epochs": 10, "batch_size": 8, "learning_rate": 0.5, "momentum": 0.9, "optimizer": "sgd"},
    "privacy": {"noise_multiplier": 0.0, "noise_seed": 2,
                "claims": [{"epsilon": 0.01, "delta": 1e-5, "source": "claimed: DP by random sketching"}]},
    "options": {"sketch_canaries": 100, "sketch_canary_seed": 1, "sketch_canary_norm": 3.0, "a_seed": 1,
                "sketch_stats_records": 8, "sketch_stats_draws": 20},
}


@pytest.mark.parametrize("secret", [False, True])
def test_noise_free_run_audit_refutes_a_small_claim(secret: bool, tmp_path: Path) -> None:
    cfg = tiny(**{k: v for k, v in OVERFIT.items() if k != "options"}, options={**OVERFIT["options"], "a_secret": secret})
    res = train(cfg, tmp_path / "run", progress=False)
    assert res.privacy["guarantee"] == "none" and "no formal DP guarantee" in res.privacy["reason"]
    assert all(v is None for v in res.privacy["epsilon"].values())
    audit = audit_run(res.run_dir, n_bootstrap=50)
    assert audit.accounted["guarantee"] == "none"
    names = {a.name for a in audit.attacks}
    assert {"loss", "canary_membership", ls.ATTACK} <= names
    sk = audit.attack(ls.ATTACK)
    assert sk.metrics["a_known"] is (not secret)
    assert 0.0 <= audit.attack("loss").metrics["auc"] <= 1.0 and sk.metrics["auc"] > 0.7
    assert sk.epsilon_lower is not None and audit.epsilon_lower["value"] > 0.01
    (claim,) = audit.claimed
    assert claim["status"] == "refuted" and claim["epsilon"] == 0.01
    assert audit.verdict == "violation" and "claimed ε = 0.01" in audit.verdict_reason
    on_disk = json.loads((res.run_dir / "audit.json").read_text())
    assert on_disk["verdict"] == "violation"


@pytest.mark.slow
def test_noisy_run_is_consistent_with_its_dp_sgd_epsilon(tmp_path: Path) -> None:
    cfg = tiny(**{k: v for k, v in OVERFIT.items() if k not in ("options", "privacy")},
               privacy={"noise_multiplier": None, "target_epsilon": 2.0, "noise_seed": 4}, options=OVERFIT["options"])
    res = train(cfg, tmp_path / "run", progress=False)
    eps = res.privacy["epsilon"]["pld"]
    assert eps is not None and eps <= 2.0 + 1e-6
    audit = audit_run(res.run_dir, attacks=["loss", ls.ATTACK], n_bootstrap=50)
    # never a violation; consistent when the canary design could certify ε = 2, else inconclusive (power rule)
    assert audit.verdict in ("consistent", "inconclusive") and audit.epsilon_lower["value"] <= eps
    assert audit.verdict == "consistent" or "could certify at most" in audit.verdict_reason
    led = Ledger.read(res.run_dir / "ledger.jsonl")
    assert [type(e) for e in led.events] == [SketchEvent, GaussianEvent]


# ------------------------------------------------------------------------------------------------
# examples and the rank study


def test_example_configs_parse() -> None:
    from privaudit.config import load_config

    cfg = load_config(EXAMPLES / "lora_sketch.yaml")
    assert cfg.mechanism == "lora_sketch" and cfg.lora.freeze_a and cfg.lora.init_a == "gaussian_1_over_r"
    ls.check_config(cfg)
    # the study file is a `privaudit sweep` config: rank (with alpha, s = alpha/r fixed) × A public/secret
    from privaudit.sweep import load_sweep_spec

    base, sweep = load_sweep_spec(EXAMPLES / "lora_sketch_study.yaml")
    points = sweep.points()
    names = {p.name for p in points}
    assert {"rank_4-alpha_8-a_secret_false-non_private", "rank_64-alpha_128-a_secret_true-non_private"} <= names
    cfg64 = parse_config(next(p for p in points if p.name.startswith("rank_64-alpha_128-a_secret_true")).apply(base))
    assert cfg64.mechanism == "lora_sketch" and cfg64.lora.rank == 64 and cfg64.options["a_secret"] is True
    assert cfg64.lora.alpha / 64 == pytest.approx(base["lora"]["alpha"] / base["lora"]["rank"])
    ls.check_config(cfg64)


def test_bad_study_file(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("base: {training: {steps: 1, batch_size: 2}, privacy: {noise_multiplier: 0}, "
                 "lora: {freeze_a: true}}\nstudy: {rankz: [1]}\n")
    with pytest.raises(ValueError, match=r"^study\.rankz"):
        rank_study.load_study(p)


@pytest.mark.slow
def test_rank_study_table(tmp_path: Path) -> None:
    base = json.loads(tiny(**{k: v for k, v in OVERFIT.items() if k not in ("options", "privacy")},
                           privacy={"noise_multiplier": 0.0, "noise_seed": 2},
                           options={"sketch_canaries": 100, "sketch_stats_records": 8,
                                    "sketch_stats_draws": 20}).model_dump_json())
    spec = rank_study.StudySpec(noise=[rank_study.PrivacyLevel(noise_multiplier=2.0)], noise_ranks=[2],
                        attacks=["loss", ls.ATTACK])
    res = rank_study.run_rank_study(base, [2, 8], tmp_path / "study", spec=spec, report=False)
    names = [r["name"] for r in res.rows]
    assert names == ["r2-public", "r2-secret", "r8-public", "r8-secret", "r2-public-sigma2"]
    for r in res.rows:
        assert r["auc_loss"] is not None and r["epsilon_lower"] is not None
        # a noisy point is "consistent" only where its canaries could certify its ε, else "inconclusive"
        assert r["verdict"] in ({"no guarantee"} if r["noise_multiplier"] == 0 else {"consistent", "inconclusive"})
        assert (r["accounted_epsilon"] == math.inf) == (r["noise_multiplier"] == 0)
    assert "AUC sketch_canaries_one_run" in res.table and (tmp_path / "study" / "rank_study.png").exists()
    again = rank_study.run_rank_study(base, [2, 8], tmp_path / "study", spec=spec, report=False)  # resumes: no retraining
    assert again.rows == res.rows


# ------------------------------------------------------------------------------------------------
# randomness: the secret A, the noise and the sampling from the CSPRNG unless seeded


def test_default_run_draws_a_noise_and_batches_from_the_csprng(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.mechanisms.rng_spy import spy_generators

    cfg = tiny(privacy={"noise_multiplier": 1.0, "noise_seed": None}, training={"steps": 3},
               options={"a_secret": True, "sketch_stats_records": 0})
    seen = spy_generators(monkeypatch)
    rd = train(cfg, tmp_path / "run", progress=False).run_dir
    header = Ledger.read(rd / "ledger.jsonl").header
    assert header.noise_secure is True and header.model_extra["sketch_a"]["secret"] is True
    # A (gaussian_1_over_r: one randn per layer), the sampler, and the noise of every step
    assert len(seen) >= len(lora_layers(build_model(cfg, 2, torch.device("cpu"))[0])) + 1 + 3
    assert set(seen) == {"SecureGenerator"}
    monkeypatch.undo()
    seed = int(json.loads((rd / "audit_key.json").read_text())["sketch"]["a_seed"])
    assert seed.bit_length() > 128  # 256 bits of OS entropy key A's stream


def test_seeded_run_is_reproducible_and_said_not_secure(tmp_path: Path) -> None:
    cfg = tiny(privacy={"noise_multiplier": 1.0}, training={"steps": 3},
               options={"a_secret": True, "a_seed": 11, "sketch_stats_records": 0})
    runs = [train(cfg, tmp_path / f"run{i}", progress=False).run_dir for i in range(2)]
    header = Ledger.read(runs[0] / "ledger.jsonl").header
    assert header.noise_secure is False and header.model_extra["sketch_a"]["secret"] is False
    assert "NOT secret" in header.model_extra["sketch_a"]["source"]
    a, b = (load_file(str(rd / "adapter.safetensors")) for rd in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init_a", ["gaussian_1_over_r", "peft_default"])
def test_secret_a_is_keyed_by_its_seed(init_a: str) -> None:
    from privaudit.mechanisms import rng
    from privaudit.mechanisms.lora_sketch.sketch_stats import draw_a

    cfg = tiny(lora={"init_a": init_a})
    model, _ = build_model(cfg, 2, torch.device("cpu"))
    ls.set_a(model, init_a, 2**200 + 5)
    gen = rng.keyed_generator(2**200 + 5, "lora_sketch.A")
    for lay in lora_layers(model):  # one AES-CTR stream, layers in order
        assert torch.equal(lay.a.detach().cpu(), draw_a(init_a, lay.rank, lay.in_features, gen))
    other, _ = build_model(cfg, 2, torch.device("cpu"))
    ls.set_a(other, init_a, 2**200 + 6)
    assert not bitwise_equal(a_of(model), a_of(other))


def test_resume_continues_the_secret_noise_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash after step 4 of a secure DP run, resume: the adapter equals an uninterrupted run whose
    keys are the same (os.urandom pinned per process), so the resumed run continued the checkpoint's
    noise and sampling streams where they stood (a restart of the streams would differ)."""
    import hashlib
    from types import SimpleNamespace

    from privaudit.mechanisms import rng

    def pin_urandom() -> None:  # rng's key source only (rng.os is this module's handle on os)
        calls = iter(range(10**6))
        pinned = SimpleNamespace(urandom=lambda n: hashlib.sha256(str(next(calls)).encode()).digest()[:n])
        monkeypatch.setattr(rng, "os", pinned)

    cfg = tiny(privacy={"noise_multiplier": 1.0, "noise_seed": None},
               training={"steps": 6, "checkpoint_every": 2, "batch_size": 4}, options={"sketch_stats_records": 0})

    class Crash(RuntimeError):
        pass

    def crash_at_4(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 4:
            raise Crash

    pin_urandom()
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", progress=crash_at_4)
    holders = {p.relative_to(tmp_path / "run").parts[0] for p in (tmp_path / "run").rglob("*")
               if p.is_file() and b"aes-256-ctr" in p.read_bytes()}
    assert holders and all("checkpoint" in h for h in holders), holders  # the keys live in checkpoints only
    pin_urandom()
    got = load_file(str(train(None, tmp_path / "run", resume=True, progress=False).run_dir / "adapter.safetensors"))
    pin_urandom()
    want = load_file(str(train(cfg, tmp_path / "ref", progress=False).run_dir / "adapter.safetensors"))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
