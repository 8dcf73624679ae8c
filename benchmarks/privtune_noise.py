"""PrivTune and PAE-MobiLLM: the cost of the default noise source (CSPRNG) against the seeded torch generator.

Setting (defaults): PrivTune on the bundled ``all-MiniLM-L6-v2`` (d = 384), split before block 2, mode
``privtune`` (random 2-hop targets, attention importance scaling), LoRA r = 8 on the top, the vocabulary
graph restricted to the synthetic corpus' tokens (the full 30k vocabulary only adds set-up time), one
batch of 16 records × 64 tokens, CPU, 2 threads.

* ``step``: one PrivTune training step as :func:`privaudit.mechanisms.privtune.mechanism.fit` takes it —
  encode, bottom, release (targets, shift, importance, d_χ noise: :meth:`TokenNoiser.release`), top
  forward, loss, backward, Adam — with the noise generator either ``rng.SecureGenerator`` (AES-256-CTR,
  Box–Muller normals, Marsaglia–Tsang Gamma radii; the default) or a seeded ``torch.Generator``
  (``privacy.noise_seed``: reproducible, not secure).
* ``release``: the release alone (the part of the step that draws).
* ``dchi_draw``: drawing the batch's d_χ vectors alone (``sample_dchi``, tokens × d).
* ``pae_release``: PAE-MobiLLM's noise on a batch of 32 pivot stacks (S = 7 layers × d = 384,
  :func:`release_rows`) and on its prediction differences (:func:`prediction_difference`).
* ``pae_upload``: the device's whole upload of those 32 records (backbone forward, clip, noise,
  serialisation, the server's decoding: :func:`capture_server_view`), activation σ 0.5, δ σ 1.

Variants are interleaved round-robin (load drift hits both alike); medians and minima are reported and
the ratio CSPRNG ÷ seeded of each (on a shared, loaded machine the minima are the better estimate).
Usage: ``python benchmarks/privtune_noise.py [--rounds 10] [--threads 2] [--batch 16] [--clock wall|cpu] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    fn()
    return clock() - t


def setup(args: argparse.Namespace) -> dict[str, Callable[[Any], Any]]:
    """The timed functions, each taking the noise generator."""
    from privaudit.config import parse_config, register_mechanism
    from privaudit.data import generate_corpus
    from privaudit.mechanisms.pae_mobillm.side_network import ReleaseSpec, prediction_difference, release_rows
    from privaudit.mechanisms.privtune.dchi import build_geometry, sample_dchi
    from privaudit.mechanisms.training import encode, make_optimizer, per_sample_losses, trainable_parameters

    register_mechanism("privtune", "privaudit.mechanisms.privtune.mechanism")
    from privaudit.mechanisms import split_model
    from privaudit.mechanisms.privtune import mechanism as pt

    cfg = parse_config({
        "mechanism": "privtune", "task": "classification", "model": {"name": args.model, "max_length": args.tokens},
        "training": {"steps": 1, "batch_size": args.batch, "sampling": "fixed_batch", "learning_rate": 1e-3},
        "privacy": {"noise_multiplier": 0},
        "options": {"split_layer": args.split, "eta": 0.05, "knn_k": 10}})
    settings = pt.settings_of(cfg)
    cpu = torch.device("cpu")
    split = pt.build_split_model(cfg, settings, 2, cpu)
    corpus = generate_corpus(n_people=max(40, args.batch), records_per_person=2, n_canaries=0, seed=0)
    tok = split.tokenizer
    ids = torch.tensor(sorted({i for r in corpus.records for i in tok(r.text)["input_ids"]} - set(tok.all_special_ids)))
    reps = split_model.vocabulary_representations(split, ids)
    geo = build_geometry(ids, reps, split.model.get_input_embeddings().weight.shape[0], knn_k=settings.knn_k,
                         hops=settings.hops)
    noiser = pt.make_noiser(split, geo, settings)
    recs = corpus.records[:args.batch]
    batch = encode(tok, recs, cfg, cpu)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = split.model
    opt = make_optimizer([p for _, p in trainable_parameters(model)], cfg)
    with torch.no_grad():
        hidden = split.bottom(batch)
    n_tokens = int(batch["attention_mask"].sum())
    gen_holder: dict[str, Any] = {}
    split.release_fn = lambda h, i, m: noiser.release(h, i, m, gen_holder["g"]).values
    split.mode = "release"

    def step(g: Any) -> None:
        gen_holder["g"] = g
        split.train(True)
        loss = per_sample_losses(model, encode(tok, recs, cfg, cpu), cfg.task).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def release(g: Any) -> None:
        noiser.release(hidden, inputs["input_ids"], inputs["attention_mask"], g)

    def dchi_draw(g: Any) -> None:
        sample_dchi(n_tokens, noiser.dim, noiser.eta, generator=g)

    s, d, k = 7, noiser.dim, 2
    piv = torch.randn(32, s, d, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(32, k, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(32) % k
    spec = ReleaseSpec(clip=1.0, sigma=0.5)

    def pae_release(g: Any) -> None:
        release_rows(piv, spec, g)
        prediction_difference(logits, labels, 2 ** 0.5, 1.0, g)

    from privaudit.mechanisms.pae_mobillm import mechanism as pm

    pcfg = parse_config({
        "mechanism": "pae_mobillm", "task": "classification", "model": {"name": args.model, "max_length": args.tokens},
        "training": {"epochs": 1, "batch_size": 32, "sampling": "fixed_batch"}, "privacy": {"noise_multiplier": 0},
        "options": {"activation_noise": 0.5, "activation_clip": 1.0, "delta_noise": 1.0, "device_batch_size": 32}})
    backbone, btok = pm.build_backbone(pcfg, 2, cpu)
    up_recs = corpus.records[:32]

    def pae_upload(g: Any) -> None:
        pm.capture_server_view(backbone, btok, pcfg, up_recs, g)

    print(f"PrivTune step: {args.model} (d = {d}), split {args.split}, batch {args.batch} × {args.tokens} tokens "
          f"({n_tokens} real tokens released), vocabulary graph of {len(ids)} tokens; PAE: 32 × {s} × {d} pivot rows")
    return {"step": step, "release": release, "dchi_draw": dchi_draw, "pae_release": pae_release,
            "pae_upload": pae_upload}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--split", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (steadier on a loaded machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from privaudit.mechanisms.rng import SecureGenerator

    fns = setup(args)
    gens = {"seeded": torch.Generator().manual_seed(3), "csprng": SecureGenerator()}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, dict[str, list[float]]] = {name: {g: [] for g in gens} for name in fns}
    for name, fn in fns.items():  # warm-up
        for g in gens.values():
            fn(g)
    for _ in range(args.rounds):
        for name, fn in fns.items():
            for label, g in gens.items():
                times[name][label].append(timed(lambda: fn(g), clock))
    result: dict[str, Any] = {"rounds": args.rounds, "threads": args.threads, "batch": args.batch, "clock": args.clock}
    for name, by in times.items():
        med = {g: statistics.median(v) for g, v in by.items()}
        mins = {g: min(v) for g, v in by.items()}
        result[name] = {"median_s": med, "min_s": mins, "ratio_median": med["csprng"] / med["seeded"],
                        "ratio_min": mins["csprng"] / mins["seeded"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in fns:
        r = result[name]
        print(f"{name:12s} seeded {r['median_s']['seeded'] * 1e3:8.2f} ms  CSPRNG {r['median_s']['csprng'] * 1e3:8.2f} ms"
              f"  ratio {r['ratio_median']:.2f}× (minima {r['min_s']['seeded'] * 1e3:.2f} / "
              f"{r['min_s']['csprng'] * 1e3:.2f} ms: {r['ratio_min']:.2f}×)")


if __name__ == "__main__":
    main()
