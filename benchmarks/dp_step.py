"""DP step time ÷ non-private step time on the same LoRA model and batch: privaudit vs Opacus.

Setting (defaults): GPT-2 with 4 layers, d = 256, 4 heads, GPT-2's vocabulary (50257), LoRA r = 8
on c_attn and c_proj, one batch of 32 sequences × 64 tokens, causal-LM loss, CPU, 2 threads.

* non-private: forward, mean loss, backward, Adam step (the LoRA parameters only).
* privaudit: forward with per-sample hooks, summed loss, backward, per-sample norms + clipped sum
  (privaudit.mechanisms.per_sample), Gaussian noise, Adam step — the same functions ``dp_lora`` uses.
  Also reported with the write-ahead ledger append (fsync) that a real run adds per step.
* Opacus: ``PrivacyEngine.make_private`` (grad_sample_mode="hooks") on a copy of the same model:
  forward, mean loss, backward, DPOptimizer step (clip + noise).

Steps are interleaved round-robin (so load drift hits all variants alike); medians and minima are
reported (on a shared, loaded machine the minima are the better estimate of the unloaded cost).
* ``--secure-noise``: also the privaudit step with its default noise source, the CSPRNG
  (``privaudit.mechanisms.rng.SecureGenerator``: AES-256-CTR + Box–Muller), against the seeded torch
  generator of the ``privaudit`` variant, and the cost of drawing the noise vector alone
  (``--noise-sizes``, default the LoRA parameter count and 10M) with each generator.

Usage: ``python benchmarks/dp_step.py [--rounds 10] [--threads 2] [--clock wall|cpu] [--secure-noise] [--json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from privaudit.models import LoraSettings, apply_lora

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, n_positions=max(128, args.seq),
                     vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = apply_lora(GPT2LMHeadModel(cfg), LoraSettings(rank=args.rank, alpha=2 * args.rank,
                                                          target_modules=["c_attn", "c_proj"]), seed=0)
    with torch.no_grad():  # non-zero B so that every factor has a gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, batch


def timed(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    fn()
    return clock() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: this process's CPU time (robust on a loaded machine "
                         "with --threads 1)")
    ap.add_argument("--norm-method", default="auto", choices=["auto", "ghost", "materialise"])
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--secure-noise", action="store_true",
                    help="also time the step with the CSPRNG noise source (the default of a real run)")
    ap.add_argument("--noise-sizes", default=None,
                    help="comma-separated noise vector sizes for the draw-only timing (with --secure-noise)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--nproc", type=int, default=1,
                    help="> 1: privaudit's DP step across 1 vs N processes instead (benchmarks/dp_step_nproc.py)")
    args = ap.parse_args()
    if args.nproc > 1:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from dp_step_nproc import main as nproc_main

        sys.argv = [sys.argv[0], "--nproc", str(args.nproc), *(["--json"] if args.json else [])]
        return nproc_main()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from privaudit.audit.events import GaussianEvent
    from privaudit.audit.ledger import Ledger
    from privaudit.mechanisms.dp_lora import accumulate_clipped_sum, apply_noisy_update
    from privaudit.mechanisms.per_sample import PerSampleGradients
    from privaudit.mechanisms.training import per_sample_losses

    sigma, clip, task = 1.0, 1.0, "causal_lm"
    base, batch = build(args)

    # -- non-private ------------------------------------------------------------------------------
    plain = copy.deepcopy(base).train()
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    plain_opt = torch.optim.Adam(plain_params, lr=1e-3)

    def plain_step() -> None:
        per_sample_losses(plain, batch, task).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    # -- privaudit ----------------------------------------------------------------------------------
    ours = copy.deepcopy(base).train()
    named = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    ours_opt = torch.optim.Adam([p for _, p in named], lr=1e-3)
    psg = PerSampleGradients(ours, args.norm_method)
    gen = torch.Generator().manual_seed(2)
    tmp = tempfile.TemporaryDirectory()
    ledger = Ledger.create(Path(tmp.name) / "ledger.jsonl", mechanism="dp_lora")
    event = GaussianEvent(noise_multiplier=sigma, sample_rate=args.batch / 1000, clip_norm=clip)

    def ours_step(with_ledger: bool = False) -> None:
        total = {n: torch.zeros_like(p) for n, p in named}
        accumulate_clipped_sum(ours, psg, batch, task, clip, total)
        if with_ledger:
            ledger.append(event)
        apply_noisy_update(named, total, sigma * clip, float(args.batch), gen, ours_opt)

    variants: dict[str, Callable[[], None]] = {
        "non_private": plain_step,
        "privaudit": ours_step,
        "privaudit_with_ledger": lambda: ours_step(True),
    }
    noise_draw: dict[str, Any] = {}
    if args.secure_noise:
        from privaudit.mechanisms.rng import SecureGenerator, randn

        secure = SecureGenerator()

        def secure_step() -> None:
            total = {n: torch.zeros_like(p) for n, p in named}
            accumulate_clipped_sum(ours, psg, batch, task, clip, total)
            apply_noisy_update(named, total, sigma * clip, float(args.batch), secure, ours_opt)

        variants["privaudit_csprng"] = secure_step
        n_params = sum(p.numel() for _, p in named)
        sizes = [int(float(x)) for x in args.noise_sizes.split(",")] if args.noise_sizes else [n_params, 10_000_000]
        for n in sizes:
            row: dict[str, float] = {}
            for label, g in (("torch_seeded", torch.Generator().manual_seed(3)), ("csprng", secure)):
                ts = [timed(lambda: randn(n, generator=g)) for _ in range(max(3, args.rounds // 2))]
                row[label] = min(ts)
            row["ratio"] = row["csprng"] / row["torch_seeded"]
            noise_draw[str(n)] = row

    # -- Opacus --------------------------------------------------------------------------------------
    if not args.no_opacus:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        op_model = copy.deepcopy(base).train()
        op_opt = torch.optim.Adam([p for p in op_model.parameters() if p.requires_grad], lr=1e-3)
        loader = DataLoader(TensorDataset(batch["input_ids"]), batch_size=args.batch)
        engine = PrivacyEngine(accountant="rdp")
        op_model, op_opt, _ = engine.make_private(module=op_model, optimizer=op_opt, data_loader=loader,
                                                  noise_multiplier=sigma, max_grad_norm=clip,
                                                  poisson_sampling=False, grad_sample_mode="hooks")

        def opacus_step() -> None:
            per_sample_losses(op_model, batch, task).mean().backward()
            op_opt.step()
            op_opt.zero_grad(set_to_none=True)

        variants["opacus"] = opacus_step

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for name, fn in variants.items():
            t = timed(fn, time.perf_counter if args.clock == "wall" else time.process_time)
            if r >= args.warmup:
                times[name].append(t)
    ledger.close()
    tmp.cleanup()

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "setting": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "vocab", "rank", "batch", "seq",
                                                  "threads", "norm_method", "clock")},
        "median_step_seconds": med,
        "ratio_vs_non_private": {k: med[k] / med["non_private"] for k in med if k != "non_private"},
        "min_step_seconds": best,
        "ratio_of_minima": {k: best[k] / best["non_private"] for k in best if k != "non_private"},
        "rounds": args.rounds,
        "torch": torch.__version__,
    }
    if noise_draw:
        result["noise_draw_min_seconds"] = noise_draw
        result["csprng_step_ratio"] = med["privaudit_csprng"] / med["privaudit"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"setting: {result['setting']}")
        for k in med:
            ratio = "" if k == "non_private" else (f"  ({med[k] / med['non_private']:.3f}× non-private; "
                                                   f"minima {best[k] / best['non_private']:.3f}×)")
            print(f"{k:>22}: median {med[k] * 1000:8.1f} ms/step, min {best[k] * 1000:8.1f}{ratio}")
        if noise_draw:
            print(f"CSPRNG step ÷ seeded step (medians): {result['csprng_step_ratio']:.3f}")
            for n, row in noise_draw.items():
                print(f"noise draw of {n} values: torch seeded {row['torch_seeded'] * 1000:.2f} ms, "
                      f"CSPRNG {row['csprng'] * 1000:.2f} ms ({row['ratio']:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
