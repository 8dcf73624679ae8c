"""Run directories: writing, loading (safetensors + JSON only), resuming after a crash."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import parse_config
from privaudit.runs import load_run, train

TINY: dict[str, Any] = {
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 30, "n_canaries": 6}, "max_heldout": 20},
    "training": {"steps": 10, "batch_size": 8, "learning_rate": 0.01, "checkpoint_every": 4},
    "privacy": {"noise_multiplier": 1.0, "noise_seed": 3},
    "audit": {"gradient_canaries": 8, "gradient_canary_seed": 5},
}


def cfg_with(**sections: dict[str, Any]) -> Any:
    data = copy.deepcopy(TINY)
    for name, update in sections.items():
        data[name] = {**data.get(name, {}), **update}
    return parse_config(data)


def releases(ledger_path: Path) -> int:
    return sum(e.count for e in Ledger.read(ledger_path).events)


def test_train_writes_a_complete_run_and_load_run_reads_it(tmp_path: Path) -> None:
    cfg = cfg_with()
    rd = tmp_path / "run"
    res = train(cfg, rd, progress=False)
    names = {p.name for p in rd.iterdir() if not p.name.startswith(".")}
    assert {"manifest.json", "ledger.jsonl", "adapter.safetensors", "adapter_init.safetensors",
            "audit_key.json"} <= names
    assert "checkpoint" not in names  # the secret RNG states are gone once the run is complete
    m = json.loads((rd / "manifest.json").read_text())
    assert m["status"] == "complete" and m["mechanism"] == "dp_lora" and m["base_model"] == "tiny-gpt2"
    assert m["config"] == cfg.model_dump(mode="json") and "torch" in m["versions"]
    assert set(m["privacy"]["epsilon"]) == {"rdp", "pld", "prv"}
    assert all(v is not None and v > 0 for v in m["privacy"]["epsilon"].values())
    assert m["privacy"]["steps"] == 10 and m["privacy"]["ledger_releases"] == 10
    assert m["data"]["train_fingerprint"] and "accuracy" in m["metrics"]["heldout"]
    assert verify_ledger(rd / "ledger.jsonl").ok
    assert m["ledger_head_hash"] == Ledger.read(rd / "ledger.jsonl").head_hash
    assert res.summary()["status"] == "complete"
    # nothing secret in the manifest: no membership, no canary secrets
    key = json.loads((rd / "audit_key.json").read_text())
    assert key["canaries"] and key["records"]["members"] and key["gradient_canaries"]["count"] == 8
    text = (rd / "manifest.json").read_text()
    assert all(c["secret"] not in text for c in key["canaries"])
    assert "members" not in text

    run = load_run(rd)
    assert run.audit_key == key and run.manifest == m and run.config == cfg
    adapter = load_file(str(rd / "adapter.safetensors"))
    params = dict(run.model.named_parameters())
    assert all(torch.equal(params[n].detach(), v) for n, v in adapter.items())
    assert set(run.theta_0) == {n for n, p in params.items() if p.requires_grad}
    assert not run.ledger.writable
    # the loaded model is the trained one: same predictions twice, different from θ0
    batch = run.tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        out1 = run.model(**batch).logits
        out2 = load_run(rd).model(**batch).logits
    torch.testing.assert_close(out1, out2)


@pytest.mark.parametrize("bad", ["model.pt", "x.bin", "opt.pth", "sub/state.pkl", "a.pickle"])
def test_load_run_refuses_pickle_files(tmp_path: Path, bad: str) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "manifest.json").write_text("{}")
    (rd / bad).parent.mkdir(parents=True, exist_ok=True)
    (rd / bad).write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be opened
    with pytest.raises(ValueError, match=r"^run_dir: .*pickle-based files"):
        load_run(rd)


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^run_dir"):
        load_run(tmp_path / "missing")
    (tmp_path / "r").mkdir()
    with pytest.raises(ValueError, match="^manifest"):
        load_run(tmp_path / "r")


def test_train_refuses_existing_runs_and_changed_configs(tmp_path: Path) -> None:
    cfg = cfg_with(training={"steps": 2})
    rd = tmp_path / "run"
    train(cfg, rd, progress=False)
    with pytest.raises(ValueError, match="^run_dir: .* not empty"):
        train(cfg, rd, progress=False)
    with pytest.raises(ValueError, match="^run_dir: .* already complete"):
        train(cfg, rd, resume=True, progress=False)
    with pytest.raises(ValueError, match="^run_dir: .* no run to resume"):
        train(cfg, tmp_path / "other", resume=True, progress=False)


class Crash(Exception):
    pass


def test_resume_after_crash_counts_every_update_and_reproduces_the_run(tmp_path: Path) -> None:
    cfg = cfg_with()  # 10 steps, checkpoint every 4
    straight = tmp_path / "straight"
    train(cfg, straight, progress=False)

    rd = tmp_path / "crashed"

    def crash_after_7(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, rd, progress=crash_after_7)
    assert releases(rd / "ledger.jsonl") == 7
    with pytest.raises(ValueError, match="^config: differs"):
        train(cfg_with(training={"learning_rate": 0.02}), rd, resume=True, progress=False)
    res = train(cfg, rd, resume=True, progress=False)
    # steps 5-7 were appended (and applied) before the crash, then redone from the step-4 checkpoint:
    # counted twice (fail-closed), never lost
    assert releases(rd / "ledger.jsonl") == 10 + 3
    assert res.manifest["resumes"][0]["from_step"] == 4
    assert res.manifest["resumes"][0]["ledger_releases_before"] == 7
    assert res.privacy["ledger_releases"] == 13
    straight_eps = json.loads((straight / "manifest.json").read_text())["privacy"]["epsilon"]
    assert res.privacy["epsilon"]["rdp"] > straight_eps["rdp"]
    # restored sampler, noise and torch RNG states: the resumed run equals the uninterrupted one
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(rd / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ka = json.loads((straight / "audit_key.json").read_text())
    kb = json.loads((rd / "audit_key.json").read_text())
    assert ka["gradient_canaries"] == kb["gradient_canaries"]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume(tmp_path: Path) -> None:
    steps, every = 60, 5
    data = copy.deepcopy(TINY)
    data["training"].update({"steps": steps, "checkpoint_every": every})
    data["privacy"].pop("noise_seed")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rd = tmp_path / "run"
    cmd = [sys.executable, "-m", "privaudit", "train", str(cfg_path), "-o", str(rd), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ledger = rd / "ledger.jsonl"
    deadline = time.time() + 180
    killed_at = None
    try:
        while time.time() < deadline and proc.poll() is None:
            if ledger.exists():
                try:
                    n = releases(ledger)
                except ValueError:
                    n = 0
                if n >= 13:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = n
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((rd / "manifest.json").read_text())["status"] == "running"
    before = releases(ledger)  # everything appended before the kill is still there
    assert before >= killed_at

    out = subprocess.run(cmd + ["--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "complete"
    assert verify_ledger(ledger).ok
    total = releases(ledger)
    manifest = json.loads((rd / "manifest.json").read_text())
    resumed_from = manifest["resumes"][0]["from_step"]
    assert resumed_from % every == 0 and resumed_from <= before
    # every applied update is counted: the final trajectory's `steps` plus those lost after the checkpoint
    assert total == steps + (before - resumed_from)
    assert steps <= total <= steps + every
    assert summary["privacy"]["ledger_releases"] == total
