"""DP-FedLoRA: paper-config accounting, partitions, aggregation, write-ahead ledger, the three modes
end to end (train → ledger → audit), and Flower vs in-process ledgers."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privaudit.ledger.events import ClaimEvent, GaussianEvent
from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import load_config, parse_config
from privaudit.runs import planned_events
from privaudit.mechanisms import get_mechanism
from privaudit.config import mechanism_names
from privaudit.mechanisms.dp_fedlora.mechanism import accounting_summary, fit, resolve_plan
from privaudit.mechanisms.dp_fedlora.aggregation import aggregate
from privaudit.mechanisms.dp_fedlora.client import joint_clip_and_noise, paper_release
from privaudit.mechanisms.dp_fedlora.partition import (
    client_schedule,
    dirichlet_partition,
    iid_partition,
    new_participation_levels,
)
from privaudit.mechanisms.dp_fedlora.plan import paper_noise_multiplier
from privaudit.mechanisms.training import prepare_data

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# tiny GPT-2 classifier: fast ledger and plumbing tests
TINY: dict[str, Any] = {
    "mechanism": "dp_fedlora",
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 16, "overrides": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 30, "n_canaries": 4}, "max_heldout": 10},
    "training": {"steps": 2, "batch_size": 4, "learning_rate": 0.01},
    "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "noise_seed": 3},
    "options": {"num_clients": 4, "clients_per_round": 2, "rounds": 2},
}


def tiny(**sections: dict[str, Any]) -> Any:
    data = copy.deepcopy(TINY)
    for name, update in sections.items():
        data[name] = {**data.get(name, {}), **update}
    return parse_config(data)


# ------------------------------------------------------------------------------------------------
# the paper's configuration, accounting only
def test_paper_config_accounting_without_weights() -> None:
    cfg = load_config(EXAMPLES / "dp_fedlora_paper.yaml")
    planned = planned_events(cfg)  # no model is built or downloaded: shapes come from options.shapes
    plan = planned.plan
    assert plan.tensor_counts == {"A": 64, "B": 64}  # 32 layers × (q, v) × (A, B)
    assert plan.noise_multiplier == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 25, rel=1e-12)
    assert [c.epsilon for c in planned.claims] == [25.0] and "per tensor" in planned.claims[0].scope
    s = accounting_summary(plan, "pld")
    # REFERENCES §1: one tensor release ≈ 34.6 (analytic Gaussian), one client-round ≈ 2,000,
    # the run (20 expected participations) ≈ 35,000
    assert s["epsilon_per_tensor_release"] == pytest.approx(34.6, abs=0.1)
    assert 1_000 < s["epsilon_per_client_round"] < 5_000
    assert 20_000 < s["epsilon_expected_participations"] < 60_000
    assert plan.participations is not None and plan.participations >= 20
    assert 10_000 < s["epsilon_run"] < 100_000 and s["epsilon_run"] > s["epsilon_expected_participations"]
    assert s["claimed_epsilon"] == 25.0
    gauss = [e for e in planned.events if isinstance(e, GaussianEvent)]
    assert sum(e.count for e in gauss) == 128 * plan.participations


def test_paper_config_epsilon_cli_prints_claim_and_composed() -> None:
    from click.testing import CliRunner

    from privaudit.cli import cli

    res = CliRunner().invoke(cli, ["epsilon", "--config", str(EXAMPLES / "dp_fedlora_paper.yaml"), "--accountant",
                                   "rdp", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    eps = out["results"][0]["epsilon"]
    assert 10_000 < eps < 100_000
    assert out["claims"][0]["epsilon"] == 25.0


def test_replace_neighbours_double_the_sensitivity() -> None:
    cfg = load_config(EXAMPLES / "dp_fedlora_paper.yaml")
    d = cfg.model_dump(mode="json")
    d["privacy"]["neighbouring"] = "replace"
    d["data"]["synthetic"] = {"n_people": 40, "n_canaries": 0}
    cfg_r = parse_config(d)
    plan = resolve_plan(cfg_r, prepare_data(cfg_r).train)
    ev = get_mechanism("dp_fedlora").planned_events(cfg_r, plan)
    g = [e for e in ev if isinstance(e, GaussianEvent)]
    assert all(e.sensitivity == pytest.approx(2 * e.clip_norm) for e in g)
    assert isinstance(ev[0], ClaimEvent)


# ------------------------------------------------------------------------------------------------
# pieces
def test_partitions_and_schedule() -> None:
    parts = iid_partition(103, 8, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    labels = [i % 3 for i in range(300)]
    d = dirichlet_partition(labels, 6, alpha=0.3, seed=0)
    assert sorted(i for p in d for i in p) == list(range(300)) and min(map(len, d)) >= 1
    skew = [np.bincount([labels[i] for i in p], minlength=3) / len(p) for p in d]
    assert max(float(s.max()) for s in skew) > 0.6  # label skew, unlike IID
    with pytest.raises(ValueError, match="^options.num_clients"):
        iid_partition(3, 8, seed=0)
    sched = client_schedule(20, 2, 200, "fixed", seed=0)
    assert all(len(s) == 2 and len(set(s)) == 2 for s in sched)
    levels = new_participation_levels(sched, 20)
    counts = np.bincount([c for s in sched for c in s], minlength=20)
    assert sum(levels) == counts.max() and all(x >= 0 for x in levels)


def test_releases_are_clipped_and_noised() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.ones(50, 40) * 3.0
    out = paper_release(t, clip=0.1, z=0.0 + 1e-12, gen=gen)
    assert float(out.norm()) == pytest.approx(0.1, rel=1e-6)
    noisy = paper_release(t, clip=0.1, z=2.0, gen=gen)
    assert float((noisy - out).std()) == pytest.approx(0.2, rel=0.1)  # σ = z·C
    delta = {"a": torch.ones(10) * 5, "b": torch.ones(3, 3)}
    clipped = joint_clip_and_noise(delta, 1.0, 1e-12, gen)
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values())) == pytest.approx(1.0, rel=1e-6)


def test_stack_aggregation_is_the_exact_product() -> None:
    g = {"m.lora_A.default.weight": torch.randn(2, 5), "m.lora_B.default.weight": torch.zeros(4, 2),
         "m.base_layer.weight": torch.zeros(4, 5), "head.weight": torch.zeros(3)}
    f1 = {"m.lora_A.default.weight": torch.randn(2, 5), "m.lora_B.default.weight": torch.randn(4, 2),
          "head.weight": torch.ones(3)}
    f2 = {"m.lora_A.default.weight": torch.randn(2, 5), "m.lora_B.default.weight": torch.randn(4, 2),
          "head.weight": 3 * torch.ones(3)}
    new = aggregate(g, [f1, f2], [0.25, 0.75], "stack", g, scaling=2.0)
    want = 2.0 * (0.25 * f1["m.lora_B.default.weight"] @ f1["m.lora_A.default.weight"]
                  + 0.75 * f2["m.lora_B.default.weight"] @ f2["m.lora_A.default.weight"])
    torch.testing.assert_close(new["m.base_layer.weight"], want)
    torch.testing.assert_close(new["m.lora_B.default.weight"], g["m.lora_B.default.weight"])  # fresh adapter
    torch.testing.assert_close(new["head.weight"], 2.5 * torch.ones(3))
    avg = aggregate(g, [f1, f2], [0.5, 0.5], "fedavg", g, scaling=2.0)
    torch.testing.assert_close(avg["m.lora_A.default.weight"],
                               0.5 * (f1["m.lora_A.default.weight"] + f2["m.lora_A.default.weight"]))


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="^options.mode"):
        resolve_plan(tiny(options={"mode": "nope"}), prepare_data(tiny()).train)
    with pytest.raises(ValueError, match="^options.client_sample_secret"):
        resolve_plan(tiny(options={"client_sample_secret": True}), prepare_data(tiny()).train)
    with pytest.raises(ValueError, match="^training.steps"):
        cfg = parse_config({**copy.deepcopy(TINY), "training": {"epochs": 1, "batch_size": 4}})
        resolve_plan(cfg, prepare_data(cfg).train)


# ------------------------------------------------------------------------------------------------
# write-ahead ledger = planned events (fast: tiny model)
@pytest.mark.parametrize("options", [
    {"mode": "paper"},
    {"mode": "client_dp"},
    {"mode": "client_dp", "client_sampling": "poisson", "client_sample_secret": True},
    {"mode": "record_dp", "aggregation": "stack"},
])
def test_ledger_matches_planned_events(tmp_path: Path, options: dict[str, Any]) -> None:
    cfg = tiny(options=options, training={"sampling": "poisson"} if options["mode"] == "record_dp" else {},
               privacy={"noise_multiplier": None, "target_epsilon": 30.0} if options["mode"] == "paper" else {})
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, data.train)
    with Ledger.create(tmp_path / "l.jsonl", mechanism="dp_fedlora") as ledger:
        res = fit(cfg, data.train, data.heldout, ledger=ledger, plan=plan)
    assert verify_ledger(tmp_path / "l.jsonl").ok
    got = Ledger.read(tmp_path / "l.jsonl").events
    want = get_mechanism("dp_fedlora").planned_events(cfg, plan)

    def total(evs: list[Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in evs:
            k = json.dumps(e.identity(), sort_keys=True)
            out[k] = out.get(k, 0) + e.count
        return out

    if options.get("client_sample_secret"):
        # the realised (secret) schedule's most-participating client, one full release each; the plan
        # charged the worst case (a client in every round)
        sched = res.audit_key_extra["federated"]["schedule"]
        top = max(sum(c in s for s in sched) for c in range(4))
        assert sum(e.count for e in got) == top and all(e.sample_rate == 1.0 for e in got)
        assert sum(e.count for e in want) == plan.participations == 2 >= top
    else:
        assert total(got) == total(want) and total(got)
        assert plan.participations == max(sum(c in s for s in plan.schedule) for c in range(4))
    assert res.metrics["federated"]["rounds"] == 2
    assert res.run_files["server_view.json"]["rounds"][0]["clients"]


def test_secret_client_sample_is_charged_what_the_server_sees(tmp_path: Path) -> None:
    """Issue 14, item 3: 4 clients, 2 per round (Poisson, secret schedule), 12 rounds, z = 1. The old
    ledger (one subsampled release per round at rate 1/2) said ε = 11.50 while the most-participating
    client's 7 releases, seen one by one by the server, give 14.19."""
    from privaudit.accounting.base import compute_epsilon

    cfg = tiny(options={"client_sampling": "poisson", "client_sample_secret": True, "rounds": 12},
               training={"steps": 1}, data={"max_heldout": 2})
    data = prepare_data(cfg)
    with Ledger.create(tmp_path / "l.jsonl", mechanism="dp_fedlora") as ledger:
        res = fit(cfg, data.train, data.heldout, ledger=ledger)
    got = Ledger.read(tmp_path / "l.jsonl").events
    rounds = res.run_files["server_view.json"]["rounds"]
    seen = [sum(c in r["clients"] for r in rounds) for c in range(4)]  # what the server received, by id
    one_by_one = [GaussianEvent(noise_multiplier=1.0, clip_norm=1.0, sampling="full")] * max(seen)
    for acc in ("rdp", "pld"):
        ledger_eps = compute_epsilon(got, 1e-5, acc).epsilon
        assert ledger_eps >= compute_epsilon(one_by_one, 1e-5, acc).epsilon - 1e-9
    from privaudit.mechanisms.dp_fedlora.mechanism import ledger_header_extra

    fed = ledger_header_extra(cfg)["federated"]  # the header states the observer's view of the sample
    assert fed["amplification_by_client_sampling"] is False and fed["observer_sees_sample"] is True
    # the numbers: 7 releases at z = 1 (what the server sees) vs 12 subsampled ones (q = 1/2)
    seven = compute_epsilon([one_by_one[0].with_count(7)], 1e-5, "pld").epsilon
    amplified = compute_epsilon([GaussianEvent(noise_multiplier=1.0, sample_rate=0.5, count=12)], 1e-5, "pld").epsilon
    assert seven == pytest.approx(14.19, abs=0.02) and amplified == pytest.approx(11.50, abs=0.02)


def test_calibrated_client_dp_meets_the_target() -> None:
    from privaudit.accounting.base import compute_epsilon

    cfg = tiny(privacy={"noise_multiplier": None, "target_epsilon": 4.0, "accountant": "rdp"})
    plan = resolve_plan(cfg, prepare_data(cfg).train)
    events = get_mechanism("dp_fedlora").planned_events(cfg, plan)
    eps = compute_epsilon(events, plan.delta, "rdp").epsilon
    assert eps <= 4.0 and eps > 3.5
    assert paper_noise_multiplier(25.0, 1e-5) == pytest.approx(0.19379, rel=1e-4)


def test_registered() -> None:
    assert "dp_fedlora" in mechanism_names()
    assert get_mechanism("dp_fedlora").OBSERVER == "server"


# ------------------------------------------------------------------------------------------------
# randomness: a CSPRNG master key by default, per-(round, client) substreams; seeded on request
SECURE_MODES = [  # secret Poisson schedule: 6 rounds, so that some client is sampled (1 − 2^-24)
    {"options": {"mode": "client_dp", "client_sampling": "poisson", "client_sample_secret": True, "rounds": 6},
     "training": {"steps": 1}},
    {"options": {"mode": "record_dp"}, "training": {"sampling": "poisson"}},
]


@pytest.mark.parametrize("sections", SECURE_MODES)
def test_default_run_draws_every_secret_from_the_csprng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        sections: dict[str, Any]) -> None:
    from privaudit.mechanisms import rng
    from privaudit.mechanisms.dp_fedlora import client as fed_client
    from privaudit.runs import train
    from tests.mechanisms.rng_spy import spy_generators

    cfg = tiny(privacy={"noise_seed": None}, **sections)
    labels: list[tuple[Any, ...]] = []
    derive = rng.derive
    monkeypatch.setattr(rng, "derive", lambda m, *p: (labels.append(p), derive(m, *p))[1])

    def seeded(*_: Any) -> int:
        raise AssertionError("a seeded stream was derived in a secure run")

    monkeypatch.setattr(fed_client, "derived_seed", seeded)
    seen = spy_generators(monkeypatch)
    rd = train(cfg, tmp_path / "run", progress=False).run_dir
    led = Ledger.read(rd / "ledger.jsonl")
    assert led.header.noise_secure is True
    assert seen and set(seen) == {"SecureGenerator"}  # noise and sampling: never torch's or numpy's PRNG
    key = json.loads((rd / "audit_key.json").read_text())["federated"]
    assert "csprng" in key["noise_seed"]
    mode = cfg.options["mode"]
    purpose = fed_client.RELEASE if mode == "client_dp" else fed_client.DP_SGD
    want = {(rnd, c, purpose) for rnd, clients in enumerate(key["schedule"]) for c in clients}
    assert want and want <= set(labels)  # one substream per (round, client) of the master key
    if mode == "client_dp":
        assert (fed_client.SCHEDULE,) in labels  # the secret schedule too
    else:
        assert ("noise",) in labels and ("sampler",) in labels  # DP-SGD's own substreams


@pytest.mark.parametrize("sections", SECURE_MODES)
def test_a_run_is_a_function_of_its_master_key_or_seed(monkeypatch: pytest.MonkeyPatch,
                                                       sections: dict[str, Any]) -> None:
    from privaudit.mechanisms import rng
    from privaudit.mechanisms.dp_fedlora.client import RunSecret

    cfg = tiny(privacy={"noise_seed": None}, data={"max_heldout": 2}, **sections)
    data = prepare_data(cfg)
    key = {"k": bytes(range(32))}
    monkeypatch.setattr(RunSecret, "for_run",
                        classmethod(lambda cls, seed: cls(master=rng.SecureGenerator(key=key["k"]))))

    def run(c: Any) -> dict[str, torch.Tensor]:
        return fit(c, data.train, data.heldout).released_state  # type: ignore[return-value]

    a, b = run(cfg), run(cfg)
    assert all(torch.equal(a[n], b[n]) for n in a)  # same master key: the same releases
    key["k"] = bytes(range(1, 33))
    c = run(cfg)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    monkeypatch.undo()
    seeded = tiny(data={"max_heldout": 2}, **sections)  # noise_seed 3: reproducible
    s1, s2 = run(seeded), run(seeded)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)


def test_run_secret_streams_are_distinct_per_round_and_client() -> None:
    from privaudit.mechanisms import rng
    from privaudit.mechanisms.dp_fedlora.client import RELEASE, RunSecret

    master = rng.SecureGenerator()
    secret = RunSecret(master=master)
    draws = {(r, c): rng.randn(16, generator=secret.noise(r, c, RELEASE)) for r in range(3) for c in range(4)}
    assert len({tuple(v.tolist()) for v in draws.values()}) == len(draws)
    twin = RunSecret(master=rng.SecureGenerator(key=bytes.fromhex(master.state["key"])))
    assert all(torch.equal(rng.randn(16, generator=twin.noise(r, c, RELEASE)), v) for (r, c), v in draws.items())
    assert isinstance(secret.sampling(0, 0, 1), rng.SecureGenerator) and "secret_stream" in secret.dp_sgd(0, 0, 2)
    seeded = RunSecret.for_run(3)
    assert not seeded.secure and isinstance(seeded.noise(0, 0, RELEASE), torch.Generator)
    assert isinstance(seeded.sampling(0, 0, 1), np.random.Generator) and "secret_seed" in seeded.dp_sgd(0, 0, 2)
    assert RunSecret.for_run(None).secure
    with pytest.raises(ValueError, match="exactly one"):
        RunSecret()
