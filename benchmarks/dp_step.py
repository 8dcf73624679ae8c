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

``--model NAME`` benchmarks a real pretrained causal LM instead (e.g. ``smollm2-135m``: Llama, 30
layers, d = 576, grouped-query attention, tied embeddings; LoRA on every attention and MLP
projection by default, ``--targets`` to change), with token ids drawn from its vocabulary; defaults
then shrink to a batch of 8 × 64 tokens and 5 rounds (CPU). ``--peak-memory`` also runs each variant
alone in a fresh process (build, warm-up, 2 steps) and reports its peak memory: resident set size
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, each beside the process's
footprint after building the model (so the step's own extra memory is the difference).
``--secure-noise``: also the privaudit step with its default noise source, the CSPRNG
(``privaudit.mechanisms.rng.SecureGenerator``: AES-256-CTR + Box–Muller), against the seeded torch
generator of the ``privaudit`` variant, and the cost of drawing the noise vector alone
(``--noise-sizes``, default the LoRA parameter count and 10M) with each generator.
``--nproc N``: privaudit's DP step across 1 vs N processes (``benchmarks/dp_step_nproc.py``).
Usage: ``python benchmarks/dp_step.py [--model smollm2-135m] [--secure-noise] [--nproc N] [--rounds 10] [--threads 2]
[--clock wall|cpu] [--device cpu|cuda] [--peak-memory] [--json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from privaudit.models import LoraSettings, apply_lora, load_base_model

    torch.manual_seed(0)
    if args.model:
        base, tok = load_base_model(args.model, "causal_lm")
        model_type = base.config.model_type
        targets = args.targets.split(",") if args.targets else (LLAMA_TARGETS if model_type == "llama" else None)
        model = apply_lora(base, LoraSettings(rank=args.rank, alpha=2 * args.rank, target_modules=targets), seed=0)
        args.vocab = int(base.config.vocab_size)
    else:
        cfg = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
                         n_positions=max(128, args.seq), vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
        model = apply_lora(GPT2LMHeadModel(cfg), LoraSettings(rank=args.rank, alpha=2 * args.rank,
                                                              target_modules=["c_attn", "c_proj"]), seed=0)
    model = model.to(args.device)
    with torch.no_grad():  # non-zero B so that every factor has a gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, {k: v.to(args.device) for k, v in batch.items()}


def peak_memory_mb(device: str) -> float:
    """This process's peak: CUDA allocator peak (MB) on CUDA, else peak resident set size (MB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_alone(variant: str) -> dict[str, float]:
    """Re-run this script for ``variant`` only in a fresh process; its peak memory (see the docstring)."""
    argv = [a for a in sys.argv[1:] if a not in ("--peak-memory", "--json")]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", variant, "--rounds", "2", "--warmup", "1",
           "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["memory_mb"]


def timed(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    fn()
    return clock() - t


def plain_variant(plain: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> Callable[[], None]:
    """Non-private: forward, mean loss, backward, Adam step."""
    from privaudit.mechanisms.training import per_sample_losses

    plain_opt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-3)

    def plain_step() -> None:
        per_sample_losses(plain, batch, task).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    return plain_step


def ours_variants(ours: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, args: argparse.Namespace,
                  sigma: float, clip: float) -> dict[str, Callable[[], None]]:
    """privaudit's DP step (the functions dp_lora uses), without and with the fsynced ledger append."""
    from privaudit.ledger.events import GaussianEvent
    from privaudit.ledger.ledger import Ledger
    from privaudit.mechanisms.dp_lora import accumulate_clipped_sum, apply_noisy_update
    from privaudit.mechanisms.per_sample import PerSampleGradients

    named = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    ours_opt = torch.optim.Adam([p for _, p in named], lr=1e-3)
    psg = PerSampleGradients(ours, args.norm_method)
    gen = torch.Generator(device=args.device).manual_seed(2)
    tmp = tempfile.TemporaryDirectory()
    ledger = Ledger.create(Path(tmp.name) / "ledger.jsonl", mechanism="dp_lora")
    event = GaussianEvent(noise_multiplier=sigma, sample_rate=args.batch / 1000, clip_norm=clip)

    def ours_step(with_ledger: bool = False) -> None:
        total = {n: torch.zeros_like(p) for n, p in named}
        accumulate_clipped_sum(ours, psg, batch, task, clip, total)
        if with_ledger:
            ledger.append(event)
        apply_noisy_update(named, total, sigma * clip, float(args.batch), gen, ours_opt)

    def cleanup() -> None:
        ledger.close()
        tmp.cleanup()

    out = {"privaudit": ours_step, "privaudit_with_ledger": lambda: ours_step(True), "_cleanup": cleanup}
    if getattr(args, "secure_noise", False):
        from privaudit.mechanisms.rng import SecureGenerator

        secure = SecureGenerator()

        def secure_step() -> None:
            total = {n: torch.zeros_like(p) for n, p in named}
            accumulate_clipped_sum(ours, psg, batch, task, clip, total)
            apply_noisy_update(named, total, sigma * clip, float(args.batch), secure, ours_opt)

        out["privaudit_csprng"] = secure_step
    return out  # type: ignore[return-value]


def noise_draw_times(n_params: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Seconds (min over repeats) to draw ``n`` Gaussians with the seeded torch generator vs the CSPRNG."""
    from privaudit.mechanisms.rng import SecureGenerator, randn

    secure = SecureGenerator()
    sizes = [int(float(x)) for x in args.noise_sizes.split(",")] if args.noise_sizes else [n_params, 10_000_000]
    out: dict[str, dict[str, float]] = {}
    for n in sizes:
        row: dict[str, float] = {}
        for label, g in (("torch_seeded", torch.Generator().manual_seed(3)), ("csprng", secure)):
            row[label] = min(timed(lambda: randn(n, generator=g)) for _ in range(max(3, args.rounds // 2)))
        row["ratio"] = row["csprng"] / row["torch_seeded"]
        out[str(n)] = row
    return out


def opacus_variant(op_model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, args: argparse.Namespace,
                   sigma: float, clip: float) -> Callable[[], None]:
    """Opacus: make_private (hooks), forward, mean loss, backward, DPOptimizer step (clip + noise)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from privaudit.mechanisms.training import per_sample_losses

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

    return opacus_step


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
    ap.add_argument("--model", default=None, help="a pretrained causal LM (e.g. smollm2-135m) instead of GPT-2")
    ap.add_argument("--targets", default=None, help="LoRA target modules, comma-separated (with --model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-memory", action="store_true", help="also each variant's peak memory, alone")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--secure-noise", action="store_true",
                    help="also time the step with the CSPRNG noise source (the default of a real run)")
    ap.add_argument("--noise-sizes", default=None,
                    help="comma-separated noise vector sizes for the draw-only timing (with --secure-noise)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="> 1: privaudit's DP step across 1 vs N processes instead (benchmarks/dp_step_nproc.py)")
    ap.add_argument("--json", action="store_true")
    explicit = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    args = ap.parse_args()
    if args.nproc > 1:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from dp_step_nproc import main as nproc_main

        sys.argv = [sys.argv[0], "--nproc", str(args.nproc), *(["--json"] if args.json else [])]
        return nproc_main()
    if args.model:  # a 135M-parameter model on CPU: a smaller default batch and fewer rounds
        for flag, key, value in (("--batch", "batch", 8), ("--rounds", "rounds", 5), ("--warmup", "warmup", 1)):
            if flag not in explicit:
                setattr(args, key, value)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    sigma, clip, task = 1.0, 1.0, "causal_lm"
    base, batch = build(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    footprint = peak_memory_mb(args.device)

    def want(name: str) -> bool:
        return args.only is None or args.only == name or (args.only.startswith(name) and name == "privaudit")

    def fresh() -> torch.nn.Module:  # alone (--only): the one variant trains the built model itself
        return (base if args.only is not None else copy.deepcopy(base)).train()

    variants: dict[str, Callable[[], None]] = {}
    # -- non-private ------------------------------------------------------------------------------
    if want("non_private"):
        variants["non_private"] = plain_variant(fresh(), batch, task)
    # -- privaudit ----------------------------------------------------------------------------------
    if want("privaudit"):
        variants.update(ours_variants(fresh(), batch, task, args, sigma, clip))
    # -- Opacus --------------------------------------------------------------------------------------
    if not args.no_opacus and want("opacus"):
        variants["opacus"] = opacus_variant(fresh(), batch, task, args, sigma, clip)
    tmp_cleanup = variants.pop("_cleanup", None)  # type: ignore[arg-type]

    if args.only is not None:
        variants = {args.only: variants[args.only]}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    cuda = args.device.startswith("cuda")

    def run(fn: Callable[[], None]) -> None:
        fn()
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for name, fn in variants.items():
            t = timed(lambda: run(fn), clock)
            if r >= args.warmup:
                times[name].append(t)
    if tmp_cleanup is not None:
        tmp_cleanup()
    if args.only is not None:
        print(json.dumps({"memory_mb": {"after_build": footprint, "peak": peak_memory_mb(args.device)}}))
        return 0
    if args.peak_memory and not args.json:  # the timings first: the memory runs take a while
        print("step seconds (median, min): " + ", ".join(
            f"{k} {statistics.median(v):.3f}, {min(v):.3f}" for k, v in times.items()), flush=True)
    memory = ({k: measure_alone(k) for k in variants if k != "privaudit_with_ledger"} if args.peak_memory
              else None)

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "setting": {k: getattr(args, k) for k in ("model", "layers", "d_model", "heads", "vocab", "rank", "batch",
                                                  "seq", "threads", "norm_method", "clock", "device")},
        "median_step_seconds": med,
        "ratio_vs_non_private": {k: med[k] / med["non_private"] for k in med if k != "non_private"},
        "min_step_seconds": best,
        "ratio_of_minima": {k: best[k] / best["non_private"] for k in best if k != "non_private"},
        "rounds": args.rounds,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    if "privaudit_csprng" in med:
        n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
        result["noise_draw_min_seconds"] = noise_draw_times(n_params, args)
        result["csprng_step_ratio"] = med["privaudit_csprng"] / med["privaudit"]
    if memory is not None:
        result["memory_mb"] = memory
        result["peak_memory_ratio_vs_non_private"] = {
            k: (m["peak"] - m["after_build"]) / max(memory["non_private"]["peak"] - memory["non_private"]["after_build"],
                                                    1e-9)
            for k, m in memory.items() if k != "non_private"}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"setting: {result['setting']}")
        for k in med:
            ratio = "" if k == "non_private" else (f"  ({med[k] / med['non_private']:.3f}× non-private; "
                                                   f"minima {best[k] / best['non_private']:.3f}×)")
            print(f"{k:>22}: median {med[k] * 1000:8.1f} ms/step, min {best[k] * 1000:8.1f}{ratio}")
        if memory is not None:
            for k, m in memory.items():
                extra = m["peak"] - m["after_build"]
                rel = "" if k == "non_private" else f"  ({result['peak_memory_ratio_vs_non_private'][k]:.2f}× " \
                                                    "non-private's step memory)"
                print(f"{k:>22}: peak {m['peak']:8.0f} MB, model {m['after_build']:8.0f} MB, step +{extra:6.0f} MB{rel}")
        if "csprng_step_ratio" in result:
            print(f"CSPRNG step ÷ seeded step (medians): {result['csprng_step_ratio']:.3f}")
            for n, row in result["noise_draw_min_seconds"].items():
                print(f"noise draw of {n} values: torch seeded {row['torch_seeded'] * 1000:.2f} ms, "
                      f"CSPRNG {row['csprng'] * 1000:.2f} ms ({row['ratio']:.2f}×)")
        print(f"load average (1, 5, 15 min): {result['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
