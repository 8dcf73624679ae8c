"""DP-SGD across processes (torch.distributed, gloo on CPU): noise once, same run as one process,
crash of one rank then resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from privaudit.mechanisms.distributed import World, share, world_from_env

ROOT = Path(__file__).resolve().parents[2]

TINY: dict[str, Any] = {
    "task": "classification",
    "mechanism": "dp_lora",
    "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 30, "n_canaries": 4}, "max_heldout": 20},
    "training": {"steps": 6, "batch_size": None, "sample_rate": 0.3, "learning_rate": 0.01},
    "privacy": {"noise_multiplier": 1.0, "noise_seed": 7},
    "audit": {"gradient_canaries": 16, "gradient_canary_seed": 11},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")}, **extra)
    return env


def test_share_partitions_the_batch() -> None:
    idx = np.arange(11)
    parts = [share(World(r, 3, r), idx) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == idx.tolist()
    assert all(len(p) in (3, 4) for p in parts)
    assert share(World(), idx).tolist() == idx.tolist()


def test_world_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == World(0, 1, 0) and not world_from_env().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    w = world_from_env()
    assert (w.rank, w.size, w.local_rank, w.distributed, w.is_main) == (2, 4, 2, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="^RANK/WORLD_SIZE"):
        world_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="^WORLD_SIZE"):
        world_from_env()


_NOISE_SCRIPT = """
import os, sys, torch
from safetensors.torch import save_file
from privaudit.mechanisms.distributed import World, init_world, close_world
from privaudit.mechanisms.dp_lora import noisy_sum
rank, size, out, std, reps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
w = World(rank, size, rank)
init_world(w)
gen = torch.Generator(); gen.manual_seed(1000 + rank)
rows = []
for r in range(reps):
    grads = [torch.full((300,), float(rank)), torch.full((200,), 2.0 * rank)]   # this rank's partial sums
    noisy_sum(w, grads, std, gen)
    rows.append(torch.cat(grads))
save_file({"x": torch.stack(rows)}, f"{out}/rank{rank}.safetensors")
close_world(w)
"""


@pytest.mark.slow
def test_noise_is_added_exactly_once_per_step_with_variance_sigma_c_squared(tmp_path: Path) -> None:
    """Two gloo processes: every rank ends with the same noisy sum; the noise on it has variance
    std² (not 2·std², which adding noise on every rank would give), and the sum of the partials is exact."""
    from safetensors.torch import load_file

    std, reps, size = 1.7, 200, 2
    script = tmp_path / "noise.py"
    script.write_text(_NOISE_SCRIPT)
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(size), str(tmp_path), str(std), str(reps)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(size)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    x0, x1 = (load_file(str(tmp_path / f"rank{r}.safetensors"))["x"].double() for r in range(size))
    assert torch.equal(x0, x1)  # every rank applies the same update
    expected = torch.cat([torch.full((300,), 1.0), torch.full((200,), 2.0)]).double()  # Σ over ranks 0 and 1
    noise = (x0 - expected).flatten().numpy()
    n = noise.size
    var = float(np.mean(noise ** 2))  # the mean is known (0): n·var/std² ~ χ²(n)
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], n) / n
    assert lo * std ** 2 <= var <= hi * std ** 2, (var, std ** 2)
    assert abs(float(np.mean(noise))) < 4 * std / np.sqrt(n)


_MAP_SCRIPT = """
import sys, json
from privaudit.mechanisms.distributed import World, init_world, close_world, sharded_map
rank, size, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
w = World(rank, size, rank)
init_world(w)
res = sharded_map(w, 11, lambda idx: [{"i": int(i), "sq": int(i) ** 2, "rank": rank} for i in idx])
open(f"{out}/map{rank}.json", "w").write(json.dumps(res))
close_world(w)
"""


def test_sharded_map_in_one_process() -> None:
    from privaudit.mechanisms.distributed import sharded_map

    assert sharded_map(World(), 5, lambda idx: [int(i) * 3 for i in idx]) == [0, 3, 6, 9, 12]


@pytest.mark.slow
def test_sharded_map_splits_the_records_and_gathers_them_in_order(tmp_path: Path) -> None:
    script = tmp_path / "map.py"
    script.write_text(_MAP_SCRIPT)
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    r0, r1 = (json.loads((tmp_path / f"map{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    assert [x["sq"] for x in r0] == [i * i for i in range(11)]
    assert {x["rank"] for x in r0} == {0, 1}  # both ranks did part of the work
    assert all(x["rank"] == x["i"] % 2 for x in r0)


def _write_cfg(tmp_path: Path, **training: Any) -> Path:
    data = copy.deepcopy(TINY)
    data["training"].update(training)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "privaudit", *args]


def _events(ledger: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]
    return [ln["event"] for ln in lines[1:] if ln.get("kind") == "event"]  # the seal differs by its time


@pytest.mark.slow
def test_two_processes_give_the_one_process_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _write_cfg(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "privaudit", "train", str(cfg), "-o", str(one), "--quiet"],
                        env=_env(), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(_torchrun(2, "train", str(cfg), "-o", str(two), "--quiet"), env=_env(),
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert _events(one / "ledger.jsonl") == _events(two / "ledger.jsonl")
    a1, a2 = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-5)
    m1 = json.loads((one / "manifest.json").read_text())
    m2 = json.loads((two / "manifest.json").read_text())
    assert m2["status"] == "complete" and m2["privacy"]["epsilon"] == m1["privacy"]["epsilon"]
    k1 = json.loads((one / "audit_key.json").read_text())
    k2 = json.loads((two / "audit_key.json").read_text())
    assert k1["gradient_canaries"] == k2["gradient_canaries"]  # canaries do not depend on the world


@pytest.mark.slow
def test_mechanisms_other_than_dp_lora_are_refused_across_processes(tmp_path: Path) -> None:
    data = copy.deepcopy(TINY)
    data["mechanism"] = "lora_sketch"
    data["privacy"] = {"noise_multiplier": 0.0}
    data["training"]["optimizer"] = "sgd"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = subprocess.run(_torchrun(2, "train", str(cfg), "-o", str(tmp_path / "rd"), "--quiet"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "runs in one process only" in r.stderr


@pytest.mark.slow
def test_killing_one_rank_then_resuming_counts_every_release(tmp_path: Path) -> None:
    import psutil

    from privaudit.ledger.ledger import Ledger, verify_ledger

    steps, every = 80, 5
    data = copy.deepcopy(TINY)
    data["training"].update({"steps": steps, "checkpoint_every": every})
    data["privacy"].pop("noise_seed")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    rd = tmp_path / "run"
    ledger = rd / "ledger.jsonl"

    def releases() -> int:
        return sum(e.count for e in Ledger.read(ledger).events)

    proc = subprocess.Popen(_torchrun(2, "train", str(cfg), "-o", str(rd), "--quiet"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    killed_at = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                n = releases() if ledger.exists() else 0
            except ValueError:
                n = 0
            if n >= 12:
                workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                           if c.environ().get("RANK") == "1"]
                if workers:
                    workers[0].send_signal(signal.SIGKILL)
                    killed_at = n
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=120)
    assert killed_at is not None, "the run finished or stalled before a rank could be killed"
    assert proc.returncode != 0
    assert json.loads((rd / "manifest.json").read_text())["status"] == "running"
    before = releases()
    assert before >= killed_at

    out = subprocess.run(_torchrun(2, "train", str(cfg), "-o", str(rd), "--quiet", "--resume", "--json"),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert verify_ledger(ledger).ok
    resumed_from = manifest["resumes"][0]["from_step"]
    total = releases()
    assert resumed_from % every == 0 and resumed_from <= before
    assert total == steps + (before - resumed_from) >= steps  # releases >= applied updates


_SCORE_SCRIPT = """
import json, sys, torch
from privaudit.config import parse_config
from privaudit.mechanisms.distributed import World, init_world, close_world
from privaudit.mechanisms.training import build_model
from privaudit.attacks.llm_scores import llm_scores
rank, size, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if size > 1:
    init_world(World(rank, size, rank))
cfg = parse_config({"task": "causal_lm", "model": {"name": "tiny-gpt2", "max_length": 32,
                    "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}}, "lora": {"rank": 2, "alpha": 4},
                    "training": {"steps": 1, "batch_size": 4}, "privacy": {"noise_multiplier": 1.0}})
torch.manual_seed(0)
model, tok = build_model(cfg, 2, torch.device("cpu"))
texts = [f"Note {i}: the meeting with {'Ana Bea Cid'[i % 8:]} moved to room {i * 7}." for i in range(11)]
res = llm_scores(model, tok, texts, batch_size=3, attacks=("loss", "min_k", "zlib", "min_k_pp"), max_length=32)
open(f"{out}/scores{rank}.json", "w").write(json.dumps({k: v.tolist() for k, v in res.items()}))
if size > 1:
    close_world(World(rank, size, rank))
"""


@pytest.mark.slow
def test_the_audit_scoring_pass_shards_across_processes_and_equals_one_process(tmp_path: Path) -> None:
    """Under torch.distributed the causal-LM scoring pass splits the records across the ranks and
    gathers the scores: every rank gets the one-process result."""
    script = tmp_path / "score.py"
    script.write_text(_SCORE_SCRIPT)
    one = tmp_path / "one"
    one.mkdir()
    r = subprocess.run([sys.executable, str(script), "0", "1", str(one)], env=_env(), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(k), "2", str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    ref = json.loads((one / "scores0.json").read_text())
    for k in range(2):
        got = json.loads((tmp_path / f"scores{k}.json").read_text())
        assert got.keys() == ref.keys()
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)
