"""HE-LoRA cost: time per training step and bytes per token in execute / simulate / clear mode.

    python benchmarks/he_lora.py [--n-embd 16] [--layers 1] [--tokens 8] [--steps 3] [--json]

A tiny GPT-2 (LoRA on c_attn and c_fc; all frozen base linears remote, the tied LM head local) is
trained on one fixed batch of ``--tokens`` tokens. Execute mode uses the GLWE backend
(concrete-ml-extensions) with an in-process worker: the numbers are the owner's and the worker's
compute on this machine, without network latency.

Scaling to the paper's figure (Llama-3.2-1B, one encrypted batch of 4×16 tokens in 5,322 s on CPU):
the GLWE encrypted × clear product costs per *output* of each encrypted row (one polynomial product
of size N = 2048 and a packing key switch per output), and per chunk of N inputs beyond the first:
the cost unit is rows × n × ⌈k/N⌉, not the k·n multiply-accumulates of a float product. Both
normalisations are printed, and the paper's step is re-expressed in each (forward x·Wᵀ and backward
grad·W for every linear layer of Llama-3.2-1B; the tied LM head stays local, as here).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Any

import torch

PAPER_SECONDS = 5322.0
PAPER_TOKENS = 4 * 16
LLAMA_1B = {"layers": 16, "hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8}
POLY = 2048


def llama_products(cfg: dict[str, int]) -> list[tuple[int, int]]:
    """(k, n) of each forward product of one Llama layer (x·Wᵀ: k = in, n = out)."""
    h, i = cfg["hidden"], cfg["intermediate"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def cost_units(shapes: list[tuple[int, int, int]]) -> dict[str, float]:
    """MACs, outputs and GLWE units (rows·n·⌈k/N⌉) of products with (rows, k, n)."""
    return {
        "macs": float(sum(r * k * n for r, k, n in shapes)),
        "outputs": float(sum(r * n for r, k, n in shapes)),
        "glwe_units": float(sum(r * n * math.ceil(k / POLY) for r, k, n in shapes)),
    }


def paper_step_units() -> dict[str, float]:
    shapes = []
    for k, n in llama_products(LLAMA_1B):
        shapes.append((PAPER_TOKENS, k, n))   # forward
        shapes.append((PAPER_TOKENS, n, k))   # backward: grad (n) · W -> k outputs
    units = cost_units(shapes)
    return {key: v * LLAMA_1B["layers"] for key, v in units.items()}


def build(n_embd: int, layers: int, seed: int = 0) -> tuple[Any, Any]:
    from privaudit.models import LoraSettings, apply_lora, load_base_model

    model, tok = load_base_model("tiny-gpt2", "causal_lm", seed=seed, n_embd=n_embd, n_layer=layers,
                                 n_head=2, initializer_range=0.5)
    return apply_lora(model, LoraSettings(rank=4, target_modules=["c_attn", "c_fc"]), seed=seed), tok


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from privaudit.mechanisms.he_lora.mechanism import HEEngine, install, uninstall

    model, tok = build(args.n_embd, args.layers)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, len(tok), (1, args.tokens), generator=gen)
    engine = HEEngine(mode, args.n_bits)  # type: ignore[arg-type]
    install(model, engine)
    t0 = time.perf_counter()
    setup = engine.start()
    setup_s = time.perf_counter() - t0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    steps = args.execute_steps if mode == "execute" else args.steps
    times, losses = [], []
    shapes: list[tuple[int, int, int]] = []
    for s in range(steps):
        n_before = 0 if engine.client is None else len(engine.client.transcript)
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(out.loss.detach()))
        if s == 0 and engine.client is not None:
            for rec in engine.client.transcript[n_before:]:
                if rec.type == "MATMUL":
                    k, n = engine.client.weight_shape(rec.meta["id"])
                    shapes.append((rec.meta["rows"], k, n))
    to, back, count = engine.matmul_totals()
    engine.close()
    uninstall(model)
    step_s = statistics.median(times)
    res: dict[str, Any] = {
        "mode": mode, "steps": steps, "setup_seconds": setup_s, "setup_bytes_to_worker": setup[0],
        "step_seconds": step_s, "tokens_per_step": args.tokens,
        "bytes_to_worker_per_step": to / steps, "bytes_from_worker_per_step": back / steps,
        "bytes_per_token": (to + back) / steps / args.tokens, "exchanges_per_step": count / steps,
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    if shapes:
        units = cost_units(shapes)
        res.update({f"{k}_per_step": v for k, v in units.items()})
        for key in ("macs", "outputs", "glwe_units"):
            res[f"seconds_per_{key[:-1]}"] = step_s / units[key]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-embd", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--n-bits", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="steps for simulate and clear")
    ap.add_argument("--execute-steps", type=int, default=1)
    ap.add_argument("--modes", default="clear,simulate,execute")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_mode(m.strip(), args) for m in args.modes.split(",") if m.strip()]
    paper = paper_step_units()
    report: dict[str, Any] = {
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "model": {"name": "tiny-gpt2", "n_embd": args.n_embd, "layers": args.layers, "tokens": args.tokens,
                  "n_bits": args.n_bits},
        "results": results,
        "paper": {"model": "Llama-3.2-1B", "tokens": PAPER_TOKENS, "seconds": PAPER_SECONDS, **paper,
                  **{f"seconds_per_{k[:-1]}": PAPER_SECONDS / v for k, v in paper.items()}},
    }
    ex = next((r for r in results if r["mode"] == "execute"), None)
    if ex is not None and "seconds_per_glwe_unit" in ex:
        report["paper_step_on_this_machine_seconds"] = {
            "by_glwe_unit": ex["seconds_per_glwe_unit"] * paper["glwe_units"],
            "by_mac": ex["seconds_per_mac"] * paper["macs"],
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"tiny-gpt2 n_embd={args.n_embd} layers={args.layers}, {args.tokens} tokens/step, "
          f"{args.n_bits}-bit, {args.threads} torch threads, {report['machine']['cpus']} CPUs")
    print(f"{'mode':9} {'setup s':>8} {'step s':>9} {'B/token':>10} {'exch/step':>9} {'loss0→last':>15}")
    for r in results:
        print(f"{r['mode']:9} {r['setup_seconds']:8.2f} {r['step_seconds']:9.3f} {r['bytes_per_token']:10.0f} "
              f"{r['exchanges_per_step']:9.0f} {r['first_loss']:7.3f}→{r['last_loss']:.3f}")
    if ex is not None and "seconds_per_glwe_unit" in ex:
        print(f"execute: {ex['outputs_per_step']:.0f} outputs, {ex['macs_per_step']:.0f} MACs per step -> "
              f"{1e3 * ex['seconds_per_output']:.2f} ms/output, {1e6 * ex['seconds_per_mac']:.1f} µs/MAC")
        print(f"paper (Llama-3.2-1B, 64 tokens, fwd+bwd): {paper['glwe_units']:.3g} GLWE units, "
              f"{paper['macs']:.3g} MACs in {PAPER_SECONDS:.0f} s -> "
              f"{1e6 * PAPER_SECONDS / paper['glwe_units']:.1f} µs/unit, "
              f"{1e9 * PAPER_SECONDS / paper['macs']:.1f} ns/MAC")
        est = report["paper_step_on_this_machine_seconds"]
        print(f"the paper's step on this machine: ≈ {est['by_glwe_unit']:.3g} s by GLWE units "
              f"(≈ {est['by_glwe_unit'] / 3600:.0f} h); {est['by_mac']:.3g} s by MACs (not meaningful: "
              f"cost does not grow with k up to {POLY})")


if __name__ == "__main__":
    main()
