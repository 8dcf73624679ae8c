"""DP-FedLoRA end to end: each mode trains the bundled MiniLM encoder over 8 clients to better than
chance, writes a verified ledger, and `privaudit audit` runs the server-view attacks on it; the Flower
backend writes the same ledger (and the same model) as the in-process loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from privaudit.audit.auditor import audit_run
from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import parse_config
from privaudit.mechanisms.dp_fedlora.mechanism import fit
from privaudit.mechanisms.training import prepare_data
from privaudit.runs import train

ENCODER: dict[str, Any] = {
    "mechanism": "dp_fedlora",
    "task": "classification",
    # 64 tokens keep the label's cue in nearly every record (at 32 most records lose it and no mode
    # learns much beyond the majority class)
    "model": {"name": "all-MiniLM-L6-v2", "max_length": 64},
    "lora": {"rank": 1, "alpha": 1, "target_modules": ["encoder.layer.5.attention.self.value"]},
    "data": {"synthetic": {"n_people": 120, "n_canaries": 8}, "max_heldout": 100},
    "training": {"steps": 5, "batch_size": 16, "optimizer": "sgd", "learning_rate": 0.5},
    "privacy": {"noise_multiplier": 0.05, "clip_norm": 1.0, "delta": 1e-5, "noise_seed": 0},
    "options": {"num_clients": 8, "clients_per_round": 3, "rounds": 4},
}
# Per mode (fixed noise seed, so deterministic). The noise is small: with ~1.5k released parameters
# per client and 3 clients a round, the large-ε regime is where a few rounds learn anything.
MODES: dict[str, dict[str, Any]] = {
    "client_dp": {},
    "paper": {"privacy": {"noise_multiplier": None, "target_epsilon": 200.0},  # per tensor (Eq. 9)
              "options": {"mode": "paper", "clip_a": 1.0, "clip_b": 0.5, "clip_other": 1.0, "rounds": 3,
                          "clients_per_round": 4}},
    "record_dp": {"privacy": {"noise_multiplier": 0.3}, "training": {"learning_rate": 2.0, "sampling": "poisson"},
                  "options": {"mode": "record_dp"}},
}


def config(mode: str) -> Any:
    d = copy.deepcopy(ENCODER)
    d["options"]["mode"] = mode
    for sec, upd in MODES[mode].items():
        d[sec] = {**d[sec], **upd}
    return parse_config(d)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_verifies_and_audits(tmp_path: Path, mode: str, two_threads: Any) -> None:
    rd = tmp_path / mode
    result = train(config(mode), rd, progress=False)
    h = result.metrics["heldout"]
    assert h["accuracy"] > h["majority_baseline"], h
    assert verify_ledger(rd / "ledger.jsonl").ok
    ledger = Ledger.read(rd / "ledger.jsonl")
    assert ledger.header.observer == "server"
    assert ledger.header.privacy_unit == ("record" if mode == "record_dp" else "client")
    assert result.privacy["privacy_unit"] == ledger.header.privacy_unit
    eps = result.privacy["epsilon"]
    assert eps["rdp"] is not None and eps["rdp"] > 0
    fed = result.privacy["federated"]
    assert fed["epsilon_run"] == pytest.approx(eps["rdp"], rel=1e-9)
    if mode == "paper":
        assert [c.epsilon for c in ledger.claims] == [200.0]
        assert fed["epsilon_per_client_round"] > 200.0  # composed over the client's 4 tensors
    for f in ("server_view.safetensors", "server_view.json", "adapter.safetensors", "audit_key.json"):
        assert (rd / f).exists()
    key = json.loads((rd / "audit_key.json").read_text())
    assert len(key["federated"]["partition"]) == 8
    audit = audit_run(rd, max_records=40, n_bootstrap=20)
    names = {a.name for a in audit.attacks}
    assert {"client_update_membership", "client_update_canaries", "global_loss",
            "global_canary_membership"} <= names
    # small noise: ε is far above what 8 canaries could certify, so the audit cannot say "consistent"
    assert audit.verdict == "inconclusive" and "could certify at most" in audit.verdict_reason, audit.verdict_reason
    assert (rd / "audit.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("secret", ["seeded", "secure"])
def test_flower_backend_writes_the_same_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    """Seeded (noise_seed 3), or secure with one master key for both backends: the Ray workers derive the
    same per-(round, client) substreams from the pickled master as the in-process loop."""
    from privaudit.mechanisms import rng
    from privaudit.mechanisms.dp_fedlora.client import RunSecret
    from tests.mechanisms.test_dp_fedlora import tiny

    if secret == "secure":
        master = rng.SecureGenerator()
        monkeypatch.setattr(RunSecret, "for_run", classmethod(lambda cls, seed: cls(master=master)))
    got: dict[str, Any] = {}
    for backend in ("inprocess", "flower"):
        cfg = tiny(options={"backend": backend, "num_clients": 4, "rounds": 2},
                   privacy={"noise_seed": 3 if secret == "seeded" else None})
        data = prepare_data(cfg)
        path = tmp_path / f"{backend}.jsonl"
        with Ledger.create(path, mechanism="dp_fedlora") as ledger:
            res = fit(cfg, data.train, data.heldout, ledger=ledger)
        assert verify_ledger(path).ok
        got[backend] = ([e.model_dump() for e in Ledger.read(path).events], res.released_state)
    assert got["flower"][0] == got["inprocess"][0] and got["flower"][0]
    for k, v in got["inprocess"][1].items():  # same seed / master key: the same releases and the same model
        assert float((v - got["flower"][1][k]).abs().max()) < 1e-5, k
