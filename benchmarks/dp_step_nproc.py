"""DP-SGD step time of privaudit's dp_lora across 1 vs N processes (torch.distributed, gloo on CPU).

Run by ``benchmarks/dp_step.py --nproc N`` (or directly: ``python benchmarks/dp_step_nproc.py --nproc 2``).
Each world trains the same tiny-GPT-2 classification config (Poisson batches of expected size B) for
``--warmup`` + ``--steps`` steps; rank 0 times the steps after warm-up (wall clock, every rank is in
every step's all-reduce). On a 2-core machine no speed-up is expected: the point is the numbers, and a
later GPU run (nccl, one process per GPU) uses the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CFG = {
    "task": "classification", "mechanism": "dp_lora",
    "model": {"name": "tiny-gpt2", "max_length": 64, "overrides": {"n_layer": 4, "n_embd": 256, "n_head": 4}},
    "lora": {"rank": 8, "alpha": 16},
    "data": {"synthetic": {"n_people": 400}, "max_heldout": 8},
    "training": {"steps": 1000, "batch_size": None, "sample_rate": 0.1, "learning_rate": 0.01, "eval_before": False},
    "privacy": {"noise_multiplier": 1.0, "noise_seed": 1},
}


def worker(warmup: int, steps: int) -> None:
    from privaudit.config import parse_config, resolve_plan
    from privaudit.mechanisms.distributed import close_world, init_world, world_from_env
    from privaudit.mechanisms.dp_lora import DPLoraTrainer
    from privaudit.mechanisms.training import build_model, prepare_data
    from privaudit.models import resolve_device

    world = world_from_env()
    init_world(world)
    cfg = parse_config(CFG)
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))
    device = resolve_device(cfg.model.device)
    model, tok = build_model(cfg, len(data.label_names), device)
    tr = DPLoraTrainer(cfg, data.train, plan, model, tok, device, world=world)
    tr.sync_from_main()
    for _ in range(warmup):
        tr.step()
    t0 = time.perf_counter()
    sizes = [tr.step()["batch_size"] for _ in range(steps)]
    dt = (time.perf_counter() - t0) / steps
    tr.close()
    if world.is_main:
        print(json.dumps({"world_size": world.size, "seconds_per_step": dt, "mean_batch": sum(sizes) / steps}))
    close_world(world)


def run(nproc: int, warmup: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", "--warmup", str(warmup), "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.warmup, args.steps)
        return 0
    one = run(1, args.warmup, args.steps)
    many = run(args.nproc, args.warmup, args.steps)
    res = {"one_process": one, f"{args.nproc}_processes": many,
           "ratio": many["seconds_per_step"] / one["seconds_per_step"]}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"1 process : {one['seconds_per_step']:.3f} s/step (mean batch {one['mean_batch']:.1f})")
        print(f"{args.nproc} processes: {many['seconds_per_step']:.3f} s/step")
        print(f"ratio ({args.nproc} / 1): {res['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
