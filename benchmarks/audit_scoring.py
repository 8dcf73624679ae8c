"""Scoring-pass benchmark: tokens per second of privaudit's batched scoring pass
(:func:`privaudit.attacks.llm_scores.token_scores`: length-sorted batches, one forward pass per batch,
ℓ_t and the Min-K%++ vocabulary statistics from the same logits) against a straightforward per-record
loop, the way mimir scores (one text at a time: tokenize, forward, log-softmax, gather), same model,
same texts, same run. Both compute ℓ_t, μ_t and σ_t² for every predicted token; the outputs are
checked to agree before the times are reported.

    python benchmarks/audit_scoring.py [--records 256] [--batch-size 32] [--device cpu|cuda]
        [--model tiny-gpt2|tiny-llama|PATH] [--n-layer 4] [--n-embd 256]

Prints seconds, tokens/s for each and the ratio ours/loop.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from privaudit.attacks.llm_scores import token_scores

_WORDS = ["the", "patient", "was", "seen", "at", "the", "clinic", "on", "monday", "and", "reported", "mild", "pain", "in", "the", "left", "knee", "after", "a", "fall", "her", "address", "is", "on", "elm", "street", "and", "the", "invoice", "was", "paid", "by", "card", "ending", "in", "digits", "follow", "up", "in", "two", "weeks", "was", "advised", "with", "a", "referral", "to", "physiotherapy", "and", "a", "blood", "test", "for", "anaemia"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 20 to 120 words (fixed seed): varied lengths, as real records are."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 120))) + f" {rng.randint(1000, 9999)}"
            for _ in range(n)]


def per_record_loop(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The straightforward loop: one text per forward pass."""
    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([tokenizer(t, truncation=True, max_length=max_length)["input_ids"]], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            tok = logp.gather(-1, ids[0, 1:, None])[:, 0]
            p = logp.exp()
            mu = (p * logp).sum(-1)
            var = (p * (logp - mu[:, None]).square()).sum(-1)
            out.append((tok.double().cpu().numpy(), mu.double().cpu().numpy(), var.double().cpu().numpy()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="Timed repetitions (the best is reported).")
    args = ap.parse_args()

    from privaudit.models import load_base_model

    overrides = {}
    if args.model in ("tiny-gpt2", "tiny-llama"):
        overrides = ({"n_layer": args.n_layer, "n_embd": args.n_embd, "n_positions": args.max_length}
                     if args.model == "tiny-gpt2" else
                     {"num_hidden_layers": args.n_layer, "hidden_size": args.n_embd,
                      "max_position_embeddings": args.max_length})
    model, tok = load_base_model(args.model, "causal_lm", seed=0, device=args.device, **overrides)
    texts = make_texts(args.records)
    n_tokens = sum(len(tok(t, truncation=True, max_length=args.max_length)["input_ids"]) - 1 for t in texts)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up (allocations, kernels) on a few records, then timed runs; the best of --repeats
    token_scores(model, tok, texts[:8], batch_size=args.batch_size, max_length=args.max_length, vocab_stats=True)
    per_record_loop(model, tok, texts[:8], args.max_length)
    t_ours, t_loop = [], []
    for _ in range(args.repeats):
        sync(); t0 = time.perf_counter()
        ours = token_scores(model, tok, texts, batch_size=args.batch_size, max_length=args.max_length,
                            vocab_stats=True)
        sync(); t_ours.append(time.perf_counter() - t0)
        sync(); t0 = time.perf_counter()
        loop = per_record_loop(model, tok, texts, args.max_length)
        sync(); t_loop.append(time.perf_counter() - t0)
    worst = max(float(np.abs(a - b[0]).max()) for a, b in zip(ours.logprobs, loop))
    worst_mu = max(float(np.abs(a - b[1]).max()) for a, b in zip(ours.mu or (), loop))
    assert worst < 1e-3 and worst_mu < 1e-3, (worst, worst_mu)

    a, b = min(t_ours), min(t_loop)
    print(f"model {args.model} (layers {args.n_layer}, width {args.n_embd}, vocab {len(tok)}), device {args.device}, "
          f"{args.records} records, {n_tokens} predicted tokens, batch size {args.batch_size}")
    print(f"max |Δℓ| between the two: {worst:.2e} nats (μ: {worst_mu:.2e})")
    print(f"ours (batched pass):  {a:8.3f} s  {n_tokens / a:12.0f} tokens/s")
    print(f"per-record loop:      {b:8.3f} s  {n_tokens / b:12.0f} tokens/s")
    print(f"ratio ours/loop (tokens/s): {b / a:.2f}x")


if __name__ == "__main__":
    main()
