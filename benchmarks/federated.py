"""DP-FedLoRA: time and peak memory per round versus the number of simulated clients, in-process and
on Flower's simulation engine.

Setting (defaults): a tiny GPT-2 classifier (1 layer, d = 32) with LoRA r = 2, the synthetic corpus
(1,500 people → 3,600 training records), ``client_dp``, N ∈ {10, 100, 1000} clients over an IID
partition, K = 10 sampled per round (so the per-round training work is the same for every N and the
numbers show the cost of the number of clients), 5 local steps of batch 4, 3 rounds, server view not
kept. Each configuration runs in a fresh subprocess; peak memory = the maximum resident set size of
the process tree (Flower: the driver plus its Ray workers), sampled every 50 ms. Time per round =
(federation wall time − the first round) / (rounds − 1) when rounds > 1: the first round carries model
loading and (Flower) Ray worker start-up, reported separately as ``startup_s``.

``--compare-noise``: instead, the cost of the default noise source. In one process, per mode
(``client_dp``: one release noise vector per client and round; ``record_dp``: DP-SGD noise and
Poisson sampling at every local step), federations with the CSPRNG (no ``noise_seed``: per-(round,
client) AES-256-CTR substreams of one master key, :mod:`privaudit.mechanisms.rng`) and seeded ones
(torch / numpy PRNGs) alternate ``--repeats`` times; reported: the median and minimum time per round
(rounds after the first) of each, and the ratio secure ÷ seeded. ``--embd`` / ``--layers`` / ``--rank``
size the model (LoRA on ``c_attn``; the released vector is the LoRA factors plus the head), and the
draw of one released-size noise vector alone is timed with each generator. Whole rounds differ by more
than the noise source (record_dp's Poisson batches differ between the secure runs and the fixed seeded
ones; the machine's load drifts), so the time spent inside the randomness (``rng.randn``, Poisson
sampling, setting up the per-(round, client) streams) is also measured per round, and its difference
is reported as a share of a seeded round (``randomness_overhead``): the secure path's own cost.

Usage: ``python benchmarks/federated.py [--clients 10,100,1000] [--backends inprocess,flower]
[--rounds 3] [--per-round 10] [--threads 1] [--json]``;
``python benchmarks/federated.py --compare-noise [--embd 32] [--layers 1] [--rank 2] [--rounds 4]
[--repeats 3] [--threads 1] [--clock wall|cpu] [--json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
from typing import Any


def _config(n_clients: int, per_round: int, rounds: int, backend: str) -> dict[str, Any]:
    return {
        "mechanism": "dp_fedlora", "task": "classification",
        "model": {"name": "tiny-gpt2", "max_length": 16, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
        "lora": {"rank": 2, "alpha": 4},
        "data": {"synthetic": {"n_people": 1500, "n_canaries": 0}, "max_heldout": 50},
        "training": {"steps": 5, "batch_size": 4, "learning_rate": 0.01},
        "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "noise_seed": 0},
        "options": {"num_clients": n_clients, "clients_per_round": min(per_round, n_clients), "rounds": rounds,
                    "backend": backend, "keep_server_view": False},
    }


def _peak_rss(stop: threading.Event, out: list[int]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        try:
            procs = [me] + me.children(recursive=True)
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            out[0] = max(out[0], total)
        except psutil.Error:
            pass
        stop.wait(0.05)


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from privaudit.config import parse_config
    from privaudit.mechanisms.dp_fedlora.mechanism import fit
    from privaudit.mechanisms.training import prepare_data

    cfg = parse_config(_config(args.n, args.per_round, args.rounds, args.backend))
    data = prepare_data(cfg)
    peak = [0]
    stop = threading.Event()
    t = threading.Thread(target=_peak_rss, args=(stop, peak), daemon=True)
    t.start()
    marks: list[float] = []
    t0 = time.perf_counter()
    fit(cfg, data.train, [], progress=lambda i, n, info: marks.append(time.perf_counter()))
    total = time.perf_counter() - t0
    stop.set()
    t.join()
    per_round = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else total
    print(json.dumps({"backend": args.backend, "clients": args.n, "per_round_clients": min(args.per_round, args.n),
                      "rounds": args.rounds, "startup_s": marks[0] - t0 if marks else None,
                      "time_per_round_s": per_round, "total_s": total, "peak_rss_mib": peak[0] / 2**20}))


def _noise_config(mode: str, seeded: bool, args: argparse.Namespace) -> dict[str, Any]:
    d = _config(8, 4, args.rounds, "inprocess")
    d["model"]["overrides"] = {"n_layer": args.layers, "n_embd": args.embd, "n_head": 2}
    d["lora"] = {"rank": args.rank, "alpha": 2 * args.rank}
    d["data"]["synthetic"]["n_people"] = 200
    d["privacy"]["noise_seed"] = 0 if seeded else None
    d["options"]["mode"] = mode
    if mode == "record_dp":
        d["training"]["sampling"] = "poisson"
    return d


def compare_noise(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Secure vs seeded noise source: per-round times of whole federations (see the docstring)."""
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    from privaudit.config import parse_config
    from privaudit.mechanisms import rng
    from privaudit.mechanisms.dp_fedlora.mechanism import fit
    from privaudit.mechanisms.training import prepare_data

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from privaudit.mechanisms.dp_fedlora import client as fed_client
    from privaudit.mechanisms.sampling import PoissonSampler

    spent = [0.0]  # time inside the randomness: noise draws, batch sampling, stream set-up

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += clock() - t0
        return wrapper

    sampled = [0, 0]  # records in Poisson batches, batches (record_dp: the work differs with them)
    next_batch = timed(PoissonSampler.next_batch)

    def counted(self: Any) -> Any:
        batch = next_batch(self)
        sampled[0] += len(batch)
        sampled[1] += 1
        return batch

    rng.randn = timed(rng.randn)  # type: ignore[assignment]
    PoissonSampler.next_batch = counted  # type: ignore[method-assign]
    for name in ("noise", "sampling", "dp_sgd"):
        setattr(fed_client.RunSecret, name, timed(getattr(fed_client.RunSecret, name)))
    rows: list[dict[str, Any]] = []
    for mode in ("client_dp", "record_dp"):
        cfgs = {src: parse_config(_noise_config(mode, src == "seeded", args)) for src in ("secure", "seeded")}
        data = prepare_data(cfgs["secure"])
        times: dict[str, list[float]] = {"secure": [], "seeded": []}
        rand_s: dict[str, list[float]] = {"secure": [], "seeded": []}
        batches: dict[str, list[int]] = {"secure": [0, 0], "seeded": [0, 0]}
        released = 0
        for rep in range(args.repeats + 1):  # the first pass warms up (imports, model files)
            for src in (("secure", "seeded") if rep % 2 else ("seeded", "secure")):
                marks: list[float] = []
                spent_at: list[float] = []

                def mark(i: int, n: int, info: Any, marks: list[float] = marks, spent_at: list[float] = spent_at
                         ) -> None:
                    marks.append(clock())
                    spent_at.append(spent[0])

                before = list(sampled)
                res = fit(cfgs[src], data.train, [], progress=mark)
                if rep:
                    batches[src] = [b + s1 - s0 for b, s0, s1 in zip(batches[src], before, sampled)]
                released = sum(v.numel() for k, v in res.released_state.items() if "base_layer" not in k)  # type: ignore[union-attr]
                if rep:
                    times[src] += [b - a for a, b in itertools.pairwise(marks)]
                    rand_s[src] += [b - a for a, b in itertools.pairwise(spent_at)]
        draw: dict[str, float] = {}
        for src, gen in (("secure", rng.SecureGenerator()), ("seeded", torch.Generator().manual_seed(0))):
            best = float("inf")
            for _ in range(20):
                t0 = clock()
                rng.randn(released, generator=gen)
                best = min(best, clock() - t0)
            draw[src] = best
        row = {"mode": mode, "clock": args.clock, "embd": args.embd, "layers": args.layers, "rank": args.rank,
               "clients_per_round": 4, "local_steps": 5, "released_params_per_client": released,
               "rounds_timed": len(times["secure"])}
        for src in ("secure", "seeded"):
            row[f"{src}_median_s"] = statistics.median(times[src])
            row[f"{src}_min_s"] = min(times[src])
            row[f"{src}_noise_draw_ms"] = 1e3 * draw[src]
            row[f"{src}_randomness_ms_per_round"] = 1e3 * statistics.median(rand_s[src])
            row[f"{src}_mean_poisson_batch"] = batches[src][0] / batches[src][1] if batches[src][1] else None
        row["ratio_median"] = row["secure_median_s"] / row["seeded_median_s"]
        row["ratio_min"] = row["secure_min_s"] / row["seeded_min_s"]
        # the secure path's own cost: its extra time in the randomness, as a share of a seeded round
        row["randomness_overhead"] = ((row["secure_randomness_ms_per_round"] - row["seeded_randomness_ms_per_round"])
                                      / 1e3 / row["seeded_median_s"])
        rows.append(row)
        if not args.json:
            print(f"{mode:9s} d={args.embd} L={args.layers} r={args.rank} ({released} released params/client, "
                  f"K=4, 5 local steps, {args.clock} clock): per round secure {row['secure_median_s']:.3f} s (min {row['secure_min_s']:.3f})"
                  f"  seeded {row['seeded_median_s']:.3f} s (min {row['seeded_min_s']:.3f})  ratio "
                  f"{row['ratio_median']:.3f} (min {row['ratio_min']:.3f});  one noise vector: secure "
                  f"{row['secure_noise_draw_ms']:.3f} ms, seeded {row['seeded_noise_draw_ms']:.3f} ms;  "
                  f"in the randomness per round: secure {row['secure_randomness_ms_per_round']:.2f} ms, seeded "
                  f"{row['seeded_randomness_ms_per_round']:.2f} ms (+{100 * row['randomness_overhead']:.2f}% of "
                  "a seeded round)" + (f";  mean Poisson batch secure {row['secure_mean_poisson_batch']:.2f}, seeded "
                                       f"{row['seeded_mean_poisson_batch']:.2f}" if mode == "record_dp" else ""),
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--backends", default="inprocess,flower")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compare-noise", action="store_true", help="secure vs seeded noise source (see above)")
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="--compare-noise: wall time, or this process's CPU time (steadier on a loaded machine)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="inprocess", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    if args.compare_noise:
        rows = compare_noise(args)
        if args.json:
            print(json.dumps(rows))
        return
    rows = []
    for backend in args.backends.split(","):
        for n in (int(x) for x in args.clients.split(",")):
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--backend", backend, "--rounds",
                   str(args.rounds), "--per-round", str(args.per_round), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                rows.append({"backend": backend, "clients": n, "error": res.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(lines[-1]))
            if not args.json:
                r = rows[-1]
                if "error" in r:
                    print(f"{backend:10s} N={n:5d}  error: {r['error']}", flush=True)
                else:
                    print(f"{backend:10s} N={n:5d} K={r['per_round_clients']:3d}  startup {r['startup_s']:7.2f} s  "
                          f"per round {r['time_per_round_s']:7.3f} s  peak RSS {r['peak_rss_mib']:8.1f} MiB", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
