"""PrivTune and HE-LoRA through the run directory: train → audit (view attacks) → report, and the
fail-closed accounting of HE-LoRA's released adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from privaudit.audit.auditor import audit_run
from privaudit.attacks.views import registered_view_attacks
from privaudit.ledger.ledger import Ledger
from privaudit.cli import cli
from privaudit.config import parse_config
from privaudit.mechanisms import get_mechanism
from privaudit.config import mechanism_names
from privaudit.reports.runs_table import load_run_record, run_row
from privaudit.runs import load_run, train


pytestmark = pytest.mark.usefixtures("one_thread")


SYNTH = {"n_people": 30, "records_per_person": 2, "n_canaries": 6}


def _privtune_cfg(**options: Any) -> Any:
    return parse_config({
        "mechanism": "privtune", "task": "classification", "model": {"name": "tiny-llama", "max_length": 20},
        "data": {"synthetic": SYNTH, "max_heldout": 16},
        "training": {"steps": 3, "batch_size": 6, "sampling": "fixed_batch", "learning_rate": 0.01},
        "privacy": {"noise_multiplier": 0, "noise_seed": 7},
        "options": {"split_layer": 1, "eta": 0.5, "knn_k": 5, **options},
    })


def _he_cfg(noise: float = 0.0) -> Any:
    return parse_config({
        "mechanism": "he_lora", "task": "causal_lm",
        "model": {"name": "tiny-gpt2", "max_length": 12, "overrides": {"n_embd": 32, "n_layer": 1, "n_head": 2}},
        "lora": {"rank": 2, "target_modules": ["c_attn"]},
        "data": {"synthetic": SYNTH, "max_heldout": 8},
        "training": {"steps": 2, "batch_size": 4, "physical_batch_size": 4, "sampling": "fixed_batch",
                     "learning_rate": 0.02},
        "privacy": {"noise_multiplier": noise, "delta": 1e-5, "noise_seed": 1},
        "options": {"mode": "simulate"},
    })


@pytest.fixture
def small_vocabulary(monkeypatch):
    """PrivTune's vocabulary graph on the tokens of the run's and the auditor's corpora (the full
    vocabulary is slow on CPU): pre-filled into the per-process geometry cache for these configs."""
    from privaudit.attacks.views import common as va
    from privaudit.data import generate_corpus
    from privaudit.mechanisms.privtune import mechanism as pt
    from privaudit.mechanisms import split_model as split_model
    from privaudit.mechanisms.privtune.dchi import build_geometry

    monkeypatch.setattr(pt, "_GEOMETRY_CACHE", {})
    monkeypatch.setattr(va, "PRIVTUNE_BUDGET", va.ViewBudget(inversion_victims=20, attribute_victims=40,
                                                            aux_people=30, learned_steps=20, optim_steps=3))

    def fill(cfg: Any) -> None:
        s = pt.settings_of(cfg)
        split = pt.build_split_model(cfg, s, 2, torch.device("cpu"))
        tok = split.tokenizer
        texts = [r.text for r in generate_corpus(**SYNTH, seed=0).records]
        aux_seed = (0 + va._AUX_SEED_OFFSET) % (2 ** 31)
        texts += [r.text for r in generate_corpus(n_people=30, records_per_person=2, n_canaries=0, seed=aux_seed).records]
        ids = torch.tensor(sorted({i for t in texts for i in tok(t)["input_ids"]} - set(tok.all_special_ids)))
        geo = build_geometry(ids, split_model.vocabulary_representations(split, ids),
                             split.model.get_input_embeddings().weight.shape[0], knn_k=s.knn_k, hops=s.hops)
        split.remove_hooks()
        key = (cfg.model.name, tuple(sorted((k, repr(v)) for k, v in cfg.model.overrides.items())),
               cfg.training.seed, s.split_layer, s.knn_k, s.exclude_unused_tokens, "cpu")
        pt._GEOMETRY_CACHE[key] = geo

    return fill


def test_registry_and_view_attacks_keyed_by_mechanism() -> None:
    assert {"privtune", "he_lora"} <= set(mechanism_names())
    for name in ("privtune", "he_lora"):
        mod = get_mechanism(name)  # importing registers the view attacks
        views = registered_view_attacks(name, mod.OBSERVER)
        assert len(views) >= 1
        # keyed by mechanism: another mechanism with the same observer does not get them
        assert not set(views) & set(registered_view_attacks("some_other_mechanism", mod.OBSERVER)) - set(
            registered_view_attacks("", mod.OBSERVER))


def test_he_lora_without_noise_never_reports_epsilon_zero(tmp_path: Path) -> None:
    """Fail-closed: the ledger of a non-private HE-LoRA run holds no Gaussian event, yet no consumer
    (manifest, `privaudit epsilon --ledger`, the report's recomputation) shows a finite ε for it."""
    rd = tmp_path / "he"
    res = train(_he_cfg(), rd, progress=False)
    priv = res.manifest["privacy"]
    assert priv["guarantee"] == "none" and all(v is None for v in priv["epsilon"].values())
    assert priv["released_model"] == {"guarantee": "none", "reason": "the adapter is released without DP noise"}
    assert "simulate" in priv["against_worker"]["statement"] and priv["against_worker"]["encrypted_events"] == 0
    out = CliRunner().invoke(cli, ["epsilon", "--ledger", str(rd / "ledger.jsonl"), "--json"])
    assert out.exit_code == 0, out.output
    assert all(r["epsilon"] in (None, "inf") or r["epsilon"] == float("inf")
               for r in json.loads(out.output)["results"])
    rec = load_run_record(rd)
    assert rec.has_guarantee is False and all(a.value is None or a.value == float("inf") for a in rec.accounted)
    row = run_row(rec)
    assert row["epsilon"] == "inf" and row["released_model_guarantee"] == "none"
    from privaudit.mechanisms.he_lora.mechanism import RELEASED_WITHOUT_NOISE

    led = Ledger.read(rd / "ledger.jsonl")
    assert any(getattr(e, "what", None) == RELEASED_WITHOUT_NOISE for e in led.events)
    assert led.header.model_extra["he_lora"]["released_model"].startswith("none")
    # resume of an interrupted run is refused with a clear error
    m = json.loads((rd / "manifest.json").read_text())
    (rd / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    with pytest.raises(ValueError, match="^resume: he_lora runs cannot be resumed"):
        train(None, rd, resume=True, progress=False)


def test_report_catches_encrypted_only_ledger_without_marker(tmp_path: Path) -> None:
    """Defence in depth: a ledger of only encrypted events (no marker) still gives no finite ε for the
    released model in the report when the manifest says the adapter carries none."""
    from privaudit.ledger.events import EncryptedEvent

    rd = tmp_path / "run"
    rd.mkdir()
    led = Ledger.create(rd / "ledger.jsonl", mechanism="he_lora", base_model="tiny-gpt2", dataset_fingerprint="x",
                        dataset_size=10, target_delta=1e-5, observer="worker")
    led.append(EncryptedEvent(scheme="tfhe-glwe", security_bits=128, bytes_to_server=10, bytes_from_server=10))
    led.close()
    (rd / "manifest.json").write_text(json.dumps({
        "mechanism": "he_lora", "status": "complete", "ledger_head_hash": Ledger.read(rd / "ledger.jsonl").head_hash,
        "privacy": {"delta": 1e-5, "released_model": {"guarantee": "none", "reason": "the adapter is released "
                                                                                      "without DP noise"}}}))
    rec = load_run_record(rd)
    assert rec.has_guarantee is False and rec.primary_epsilon[0] == float("inf")


def test_he_lora_with_owner_side_noise_reports_the_dp_epsilon(tmp_path: Path) -> None:
    res = train(_he_cfg(noise=1.0), tmp_path / "he_dp", progress=False)
    priv = res.manifest["privacy"]
    assert priv["released_model"]["guarantee"] == "dp"
    eps = priv["epsilon"]["pld"]
    assert eps is not None and 0 < eps < float("inf") and priv["released_model"]["epsilon"]["pld"] == eps


def test_privtune_run_directory_train_audit_report(tmp_path: Path, small_vocabulary) -> None:
    cfg = _privtune_cfg(mode="none")
    small_vocabulary(cfg)
    rd = tmp_path / "pt_none"
    res = train(cfg, rd, progress=False)
    assert res.manifest["privacy"]["guarantee"] == "none"  # labels and representations in plaintext
    header = Ledger.read(rd / "ledger.jsonl").header
    assert header.observer == "server" and "metric_dp" in header.model_extra
    run = load_run(rd)
    assert run.model is not None
    a = audit_run(rd, max_records=40, exposure_candidates=20, n_bootstrap=10)
    names = [x.name for x in a.attacks]
    assert {"inversion_nn", "inversion_learned", "inversion_optim", "attribute_logreg", "loss",
            "canary_membership"} <= set(names)
    nn = a.attack("inversion_nn").metrics
    assert nn["token_recovery"] > 0.9 and nn["token_recovery_ci"][0] > nn["chance_rate"] and nn["beats_chance"]
    assert a.verdict == "no guarantee"

    cfg2 = _privtune_cfg(mode="dchi", eta=0.0005)  # strong noise: E|Z| = 1/0.0005 per dimension
    small_vocabulary(cfg2)
    rd2 = tmp_path / "pt_noisy"
    res2 = train(cfg2, rd2, progress=False)
    md = res2.manifest["privacy"]["metric_dp"]
    assert md["eta"] > 0 and md["epsilon_at_median_nn"] > 0 and res2.manifest["privacy"]["epsilon"]["pld"] is None
    a2 = audit_run(rd2, max_records=40, exposure_candidates=20, n_bootstrap=10)
    nn2 = a2.attack("inversion_nn").metrics
    assert nn2["token_recovery"] < 0.1 and not nn2["beats_chance"]
    assert a2.verdict == "no guarantee" and "metric-DP" in a2.verdict_reason and "chance" in a2.verdict_reason
    assert a2.accounted["metric_dp"]["eta"] == md["eta"]

    out = CliRunner().invoke(cli, ["report", str(rd), str(rd2), "-o", str(tmp_path / "r.pdf")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "r.pdf").stat().st_size > 5000
    rec = load_run_record(rd2)
    assert rec.has_guarantee is False and rec.mechanism_privacy["metric_dp"]["eta"] == md["eta"]
    row = run_row(rec)
    assert row["metric_dp_eta"] == md["eta"] and row["epsilon"] == "inf"


def test_privtune_full_top_loads(tmp_path: Path, small_vocabulary) -> None:
    cfg = _privtune_cfg(mode="dchi", top_training="full")
    small_vocabulary(cfg)
    rd = tmp_path / "full"
    train(cfg, rd, progress=False)
    run = load_run(rd)
    assert sum(p.numel() for p in run.model.parameters()) > 0 and run.theta_0


@pytest.mark.slow
def test_he_lora_train_audit_report_worker_view_at_chance(tmp_path: Path, monkeypatch) -> None:
    """Simulate-mode run; the audit encrypts what an execute worker would see (GLWE) and the inversion
    attacks on those ciphertexts stay at chance while the unencrypted control recovers the tokens."""
    from privaudit.attacks.views import common as va
    from privaudit.mechanisms.he_lora.backend import glwe_available

    monkeypatch.setattr(va, "HE_BUDGET", va.ViewBudget(inversion_victims=16, attribute_victims=16, aux_people=16,
                                                      learned_steps=60, max_vocabulary=400, learned_hidden=128))
    rd = tmp_path / "he"
    train(_he_cfg(), rd, progress=False)
    a = audit_run(rd, max_records=20, exposure_candidates=20, n_bootstrap=10)
    ctrl = a.attack("control_unencrypted_inversion_learned").metrics
    assert ctrl["token_recovery"] > 0.8 and ctrl["beats_chance"]
    assert {"loss", "canary_membership"} <= {x.name for x in a.attacks}  # the released adapter is attacked too
    if glwe_available():
        for name in ("worker_inversion_nn", "worker_inversion_learned"):
            m = a.attack(name).metrics
            assert not m["beats_chance"] and m["token_recovery_ci"][0] <= m["chance_rate"], (name, m)
            assert m["token_recovery"] < 0.2
        assert "skipped" in a.attack("worker_inversion_optim").metrics
    assert a.verdict == "no guarantee" and "against the worker" in a.verdict_reason
    assert a.accounted["released_model"]["guarantee"] == "none"
    out = CliRunner().invoke(cli, ["report", str(rd), "-o", str(tmp_path / "r.pdf")])
    assert out.exit_code == 0, out.output
