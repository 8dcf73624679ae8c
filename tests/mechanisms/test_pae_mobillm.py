"""PAE MobiLLM: side network, wire format, cache, communication, ledger, run directory and audit."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from privaudit.ledger.events import GaussianEvent, PlaintextEvent
from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import parse_config, resolve_plan
from privaudit.mechanisms import get_mechanism
from privaudit.config import mechanism_names
from privaudit.mechanisms.pae_mobillm import mechanism as pm
from privaudit.attacks.views import pae_mobillm as pae_view
from privaudit.mechanisms.pae_mobillm.side_network import SideNetwork
from privaudit.mechanisms.training import prepare_data
from privaudit.mechanisms.pae_mobillm.transport import decode_rows, deserialise, encode_rows, serialise


pytestmark = pytest.mark.usefixtures("two_threads")


BASE: dict[str, Any] = {
    "mechanism": "pae_mobillm",
    "task": "classification",
    "model": {"name": "all-MiniLM-L6-v2", "max_length": 32},
    "data": {"synthetic": {"n_people": 40, "records_per_person": 2, "n_canaries": 4, "seed": 1}, "max_heldout": 24},
    "training": {"epochs": 2, "batch_size": 16, "sampling": "fixed_batch", "learning_rate": 0.003},
    "privacy": {"noise_multiplier": 0, "noise_seed": 5},
    "options": {"audit_victims": 40, "audit_aux": 60},
}


def make_cfg(**sections: dict[str, Any]) -> Any:
    data = copy.deepcopy(BASE)
    for name, update in sections.items():
        data[name] = {**data.get(name, {}), **update}
    return parse_config(data)


def _fit(cfg: Any, tmp: Path, name: str) -> tuple[Any, Ledger, Any]:
    data = prepare_data(cfg)
    ledger = Ledger.create(tmp / f"{name}.jsonl", mechanism="pae_mobillm", observer="server")
    res = pm.fit(cfg, data.train, data.heldout, ledger=ledger, num_labels=len(data.label_names))
    ledger.close()
    return res, Ledger.read(tmp / f"{name}.jsonl"), data


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Ledger, Any]:
    return _fit(make_cfg(), tmp_path_factory.mktemp("pae"), "cached")


# ---------------------------------------------------------------------------------------------------
def test_registered_with_the_server_as_observer() -> None:
    assert "pae_mobillm" in mechanism_names()
    assert get_mechanism("pae_mobillm").OBSERVER == "server"


def test_side_network_starts_at_the_backbone_and_fuses_with_sigmoid_gates() -> None:
    side = SideNetwork(4, 8, 3, width=6, bottleneck=2)
    acts = torch.randn(5, 4, 8)
    assert torch.equal(side(acts), torch.zeros(5, 3))  # zero-initialised head: inference = backbone
    with torch.no_grad():
        side.alpha.copy_(torch.tensor([0.0, 50.0, -50.0]))
    mu = side.gates()
    assert torch.allclose(mu, torch.tensor([0.5, 1.0, 0.0]), atol=1e-6)
    # μ_2 = 1: layer 2's activations are ignored; μ_3 = 0: the side state before layer 3 is ignored
    torch.nn.init.normal_(side.head.weight)
    base = side(acts)
    a2 = acts.clone()
    a2[:, 2] += 10.0
    assert torch.allclose(side(a2), base, atol=1e-5)
    with pytest.raises(ValueError, match="^acts"):
        side(torch.randn(5, 3, 8))


def test_wire_encoding_round_trips_and_bytes_are_the_serialisation() -> None:
    x = torch.randn(3, 4, 50)
    exact = decode_rows(deserialise(serialise(encode_rows(x, "float32"))), 50)
    assert torch.equal(exact, x)
    q = decode_rows(encode_rows(x, "int8"), 50)
    assert (q - x).abs().max() <= x.abs().amax() / 127 + 1e-6
    sparse = encode_rows(x, "float16", top_k=5)
    dense = decode_rows(sparse, 50)
    assert ((dense != 0).sum(-1) == 5).all()
    kept = x.abs().topk(5, dim=-1).values.min(-1).values
    assert torch.allclose(dense.abs().amax(-1), x.abs().amax(-1), rtol=1e-2)
    assert (dense.abs().sum(-1) >= kept).all()
    assert len(serialise(sparse)) < len(serialise(encode_rows(x, "float16")))


def test_cache_epoch_two_makes_no_forward_pass_and_sends_nothing(cached) -> None:
    res, _, data = cached
    ep = res.metrics["transport"]["per_epoch"]
    n = len(data.train)
    assert [e["device_forward_passes"] for e in ep] == [n, 0]
    assert ep[0]["bytes_device_to_server"] > 0 and ep[1]["bytes_device_to_server"] == 0
    assert ep[1]["messages_device_to_server"] == 0
    assert all(e["bytes_server_to_device"] == 0 for e in ep)
    assert res.metrics["uploads_per_record"] == 1.0


def test_communication_reduction_against_the_mobillm_baseline(cached) -> None:
    t = cached[0].metrics["transport"]
    ep = t["per_epoch"]
    assert ep[0]["baseline_bytes_device_to_server"] == ep[1]["baseline_bytes_device_to_server"] > 0
    ours = sum(e["bytes_device_to_server"] for e in ep) + t["final_side_network_bytes_server_to_device"]
    assert t["total_bytes"] == ours
    assert t["reduction"] == pytest.approx(1 - ours / t["baseline_total_bytes"])
    assert t["reduction"] >= 0.90
    assert t["reduction_epoch_1"] >= 0.90


def test_ledger_one_plaintext_release_per_sample_and_matches_the_plan(cached) -> None:
    res, ledger, data = cached
    events = ledger.events
    n = len(data.train)
    assert [type(e) for e in events] == [PlaintextEvent, PlaintextEvent]
    assert all(e.count == n for e in events)
    assert "label" in events[1].what
    cfg = make_cfg()
    planned = pm.planned_events(cfg, resolve_plan(cfg, n))
    assert [e.model_dump() for e in planned] == [e.model_dump() for e in events]
    assert verify_ledger(ledger.path).ok


TINY_MODEL = {"name": "tiny-gpt2", "overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2}}


def test_without_cache_every_epoch_uploads_again_and_is_ledgered(tmp_path: Path) -> None:
    cfg = make_cfg(model=TINY_MODEL, options={"cache": False, "activation_noise": 0.5, "activation_clip": 5.0, "delta_noise": 1.0,
                            "quantization": "int8", "top_k": 16})
    res, ledger, data = _fit(cfg, tmp_path, "nocache")
    n = len(data.train)
    ep = res.metrics["transport"]["per_epoch"]
    assert [e["device_forward_passes"] for e in ep] == [n, n]
    assert ep[1]["bytes_device_to_server"] > 0
    gauss = [e for e in ledger.events if isinstance(e, GaussianEvent)]
    assert len(gauss) == 4 and all(e.count == n and e.sampling == "fixed_batch" for e in gauss)
    assert {(e.noise_multiplier, e.clip_norm, e.sensitivity) for e in gauss} == {(0.5, 5.0, 10.0),
                                                                                 (1.0, math.sqrt(2), 2 * math.sqrt(2))}
    assert all(e.accounted_releases() == (1.0, 1) for e in gauss)  # each record once per upload
    planned = pm.planned_events(cfg, resolve_plan(cfg, n))
    assert [e.model_dump() for e in planned] == [e.model_dump() for e in ledger.events]


def test_options_are_validated_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="^options.activation_clip"):
        pm.settings_of(make_cfg(options={"activation_noise": 1.0}))
    with pytest.raises(ValueError, match="^options.quantization"):
        pm.settings_of(make_cfg(options={"quantization": "int4"}))
    with pytest.raises(ValueError, match="^task"):
        pm.planned_events(parse_config({**copy.deepcopy(BASE), "task": "causal_lm"}), resolve_plan(make_cfg(), 40))


def test_label_inference_on_the_server_view_falls_with_delta_noise() -> None:
    from privaudit.attacks.label_inference import label_inference_attack

    cfg0 = make_cfg(model=TINY_MODEL)
    data = prepare_data(cfg0)
    backbone, tok = pm.build_backbone(cfg0, 2, torch.device("cpu"))
    recs = [r for r in data.train if r.canary_id is None]
    accs = []
    for sigma in (0.0, 0.5, 5.0):
        cfg = make_cfg(model=TINY_MODEL, options={"delta_noise": sigma})
        view = pm.capture_server_view(backbone, tok, cfg, recs, torch.Generator().manual_seed(3))
        accs.append(label_inference_attack(view.deltas, [r.label for r in recs])["metrics"]["accuracy"])
    assert accs[0] == 1.0
    assert accs[0] > accs[1] > accs[2]
    assert accs[2] < 0.75


def test_train_load_run_and_audit_the_server_view(tmp_path: Path) -> None:
    """End to end on a small decoder backbone (pivot = last token): run directory, reload, audit."""
    from privaudit.audit.auditor import audit_run
    from privaudit.mechanisms.training import evaluate
    from privaudit.runs import load_run, train

    cfg = make_cfg(model=TINY_MODEL, options={"side_holder": "server", "side_width": 16, "audit_victims": 30, "audit_aux": 40})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.manifest["observer"] == "server"
    assert result.metrics["side_holder"] == "server" and result.metrics["pivot"] == "last"
    assert result.metrics["transport"]["final_side_network_bytes_server_to_device"] == 0
    assert verify_ledger(tmp_path / "run" / "ledger.jsonl").ok
    run = load_run(tmp_path / "run")
    assert set(run.theta_0) == {f"side.{k}" for k in run.model.side.state_dict()}
    data = prepare_data(cfg)
    again = evaluate(run.model, run.tokenizer, data.heldout, cfg, torch.device("cpu"))
    assert again["accuracy"] == pytest.approx(result.metrics["heldout"]["accuracy"])
    audit = audit_run(tmp_path / "run", max_records=30, n_bootstrap=20)
    names = {a.name for a in audit.attacks}
    assert {"label_inference_delta", "attribute_logreg", "attribute_knn", "inversion_nn", "inversion_learned",
            "loss", "canary_membership"} <= names
    assert audit.attack("label_inference_delta").metrics["accuracy"] == 1.0
    # the pivot of a [CLS] ... [SEP] record is [SEP]: a special token, not scored
    assert audit.attack("inversion_nn").metrics["n_tokens"] == 0
    assert audit.verdict == "no guarantee"
    saved = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert saved["observer"] == "server"


@pytest.mark.slow
def test_side_tuning_is_within_five_points_of_noise_free_lora() -> None:
    """Same records, backbone, epochs and optimizer: held-out accuracy of side-tuning vs DP-free LoRA
    (dp_lora with σ = 0). (With ~190 training records side-tuning trails LoRA by ~6-15 points: the
    side network needs more data than an adapter inside a pretrained encoder.)"""
    from privaudit.mechanisms import dp_lora

    common = {"task": "classification", "model": {"name": "all-MiniLM-L6-v2", "max_length": 48},
              "data": {"synthetic": {"n_people": 150, "records_per_person": 3, "n_canaries": 0, "seed": 0},
                       "max_heldout": 100},
              "training": {"epochs": 3, "batch_size": 32, "sampling": "fixed_batch", "learning_rate": 0.003}}
    side_cfg = parse_config({**common, "mechanism": "pae_mobillm", "privacy": {"noise_multiplier": 0, "noise_seed": 1}})
    # LoRA on the top two layers (their attention query/value) and the head: backward stops there
    top = [f"encoder.layer.{i}.attention.self.{m}" for i in (4, 5) for m in ("query", "value")]
    lora_cfg = parse_config({**common, "mechanism": "dp_lora", "lora": {"rank": 4, "alpha": 8, "target_modules": top},
                             "privacy": {"noise_multiplier": 0, "clip_norm": 10.0, "noise_seed": 1}})
    data = prepare_data(side_cfg)
    side = pm.fit(side_cfg, data.train, data.heldout, num_labels=2).metrics["heldout"]
    lora = dp_lora.fit(lora_cfg, data.train, data.heldout, num_labels=2).metrics["heldout"]
    print(f"n_train {len(data.train)}: side-tuning accuracy {side['accuracy']:.3f}, LoRA (noise off) "
          f"{lora['accuracy']:.3f}")
    assert side["accuracy"] > side["majority_baseline"] + 0.2  # it learns
    assert side["accuracy"] >= lora["accuracy"] - 0.05


def test_first_token_pivot_is_inverted_from_the_server_view_and_noise_stops_it() -> None:
    """pivot = first: the pivot is a real vocabulary token, so the audit builds the vocabulary's layer-0
    representations and runs token inversion on the cached pivot states (the path the default pooled /
    special-token pivots skip)."""
    from types import SimpleNamespace

    from privaudit.mechanisms.pae_mobillm.side_network import SideNetwork, SideTunedModel

    base = make_cfg(model=TINY_MODEL, options={"pivot": "first"})
    data = prepare_data(base)
    backbone, tok = pm.build_backbone(base, 2, torch.device("cpu"))
    recs = [r for r in data.train if r.canary_id is None][:8]
    view = pm.capture_server_view(backbone, tok, base, recs, None)
    first_ids = [tok(r.text)["input_ids"][1] for r in recs]  # [CLS] t1 ... [SEP]: the pivot is t1
    assert view.pivot_ids.tolist() == first_ids
    assert not set(first_ids) & set(tok.all_special_ids)

    scores = {}
    for sigma in (0.0, 3.0):
        opts = {"pivot": "first", "audit_victims": 40, "audit_aux": 60}
        if sigma:
            opts |= {"activation_noise": sigma, "activation_clip": 1.0}
        cfg = make_cfg(model=TINY_MODEL, options=opts)
        s = pm.settings_of(cfg)
        model = SideTunedModel(backbone, SideNetwork(3, 32, 2), "first", s.release_spec(), 1)
        ctx = SimpleNamespace(run=SimpleNamespace(config=cfg, model=model, tokenizer=tok), data=data, seed=0,
                              log=lambda _msg: None)
        scores[sigma] = {a.name: dict(a.metrics) for a in pae_view.audit_server_view(ctx) if a.kind == "inversion"}
    clean, noisy = scores[0.0], scores[3.0]
    for name in ("inversion_nn", "inversion_learned"):
        m = clean[name]
        assert m["n_tokens"] == 40 and m["chance_rate"] is not None
        assert m["token_recovery"] >= 0.9 and m["token_recovery"] > m["chance_rate"] + 0.5
        assert noisy[name]["n_tokens"] == 40
        assert noisy[name]["token_recovery"] <= noisy[name]["chance_rate"] + 0.1  # at or below chance


# ---------------------------------------------------------------------------------------------------
# randomness: a CSPRNG by default, seeded generators on request
# ---------------------------------------------------------------------------------------------------
NOISY = {"activation_noise": 0.5, "activation_clip": 5.0, "delta_noise": 1.0, "side_width": 16, "device_batch_size": 8}
SMALL = {"data": {"synthetic": {"n_people": 12, "records_per_person": 2, "n_canaries": 0, "seed": 1}, "max_heldout": 6},
         "training": {"epochs": 1, "batch_size": 8}}


def small_cfg(**privacy: Any) -> Any:
    return make_cfg(model=TINY_MODEL, options=NOISY, privacy=privacy, **SMALL)


def test_default_run_draws_its_noise_from_the_csprng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No noise_seed: the run directory's ledger header says noise_secure, every noise draw (pivot
    activations, δ) comes from a SecureGenerator and torch's and numpy's PRNGs are never drawn from
    (patched to fail; the global torch RNG state is untouched). The same guards stop a seeded fit."""
    from privaudit.mechanisms import rng
    from privaudit.runs import train

    from tests.mechanisms.rng_spy import spy_generators

    cfg = small_cfg(noise_seed=None)
    assert cfg.privacy.noise_seed is None
    data = prepare_data(cfg)
    # the training order is public (seeded by training.seed): mechanism code may build that Generator
    seen = spy_generators(monkeypatch, forbid_torch_generator=False)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a non-cryptographic PRNG was drawn from")

    for name in ("randn", "rand", "normal"):
        monkeypatch.setattr(torch, name, forbidden)
    state = torch.get_rng_state()
    res = pm.fit(cfg, data.train, data.heldout, num_labels=len(data.label_names))
    assert torch.equal(torch.get_rng_state(), state)
    assert res.metrics["device_forward_passes"] == len(data.train)
    # one activation and one δ draw per upload message of device_batch_size records
    assert seen.count("SecureGenerator") == 2 * math.ceil(len(data.train) / 8) and set(seen) == {"SecureGenerator"}
    with pytest.raises(AssertionError, match="PRNG"):
        pm.fit(small_cfg(), data.train, data.heldout, num_labels=len(data.label_names))
    monkeypatch.undo()
    train(cfg, tmp_path / "run", progress=False)
    header = Ledger.read(tmp_path / "run" / "ledger.jsonl").header
    assert header.noise_secure is True and header.noise_source == rng.SECURE_SOURCE


def test_seeded_runs_replay_and_default_runs_do_not() -> None:
    seeded = small_cfg()
    data = prepare_data(seeded)
    k = len(data.label_names)
    a, b = (pm.fit(seeded, data.train, data.heldout, num_labels=k).released_state for _ in range(2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    # without a seed every upload draws under a fresh key: the server's views differ
    secure = small_cfg(noise_seed=None)
    backbone, tok = pm.build_backbone(secure, k, torch.device("cpu"))
    c, d = (pm.capture_server_view(backbone, tok, secure, data.train[:8], None) for _ in range(2))
    assert not torch.equal(c.activations, d.activations) and not torch.equal(c.deltas, d.deltas)
