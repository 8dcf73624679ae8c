"""``dp_lora``: DP-SGD on the LoRA parameters (plus the classification head when it is trained).

Each step (record-level privacy, add/remove neighbours unless the config says ``replace``):

1. sample a batch: Poisson with rate q (variable size, possibly empty — the accountants' assumption)
   or shuffled fixed-size batches (recorded as ``fixed_batch``; no amplification claimed);
2. per-sample gradients of the trainable parameters from layer inputs and output-gradients
   (:mod:`.per_sample`), each clipped to L2 norm C, summed over physical chunks of the batch; included
   gradient canaries that the step samples are added (see :mod:`.training`);
3. the step's event is appended to the ledger (write-ahead, fsynced): ``GaussianEvent(noise_multiplier
   = σ, sampling, sample_rate = q, clip_norm = C)``, or for σ = 0 (the non-private baseline, clipped
   but noiseless) ``PlaintextEvent("non-private model update")`` — no guarantee;
4. Gaussian noise N(0, σ²C²) is added to the clipped sum, which is divided by the *expected* batch size
   q·N (Poisson; the actual size would leak) or by B (fixed batches), and the optimizer steps.

The noise and sampling RNGs are seeded from OS entropy unless ``privacy.noise_seed`` is set (tests):
whoever knows that seed knows the batches and the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from privaudit.audit.events import Event, GaussianEvent, PlaintextEvent
from privaudit.config import PrivacyPlan, RunConfig
from privaudit.data import Record
from privaudit.mechanisms.per_sample import PerSampleGradients
from privaudit.mechanisms.sampling import Sampler, fresh_seed, make_sampler
from privaudit.mechanisms.training import (
    CANARY_STEPS_FILE,
    CanaryStepRecorder,
    Checkpointer,
    GradientCanaries,
    ProgressFn,
    build_model,
    encode,
    evaluate,
    fit_setup,
    loop_rng_state,
    make_optimizer,
    per_sample_losses,
    require_mechanism,
    restore_loop_state,
    resume_checkpoint,
    run_steps,
    save_checkpoint,
    trainable_parameters,
)

NAME = "dp_lora"
OBSERVER = "released model"


def step_event(plan: PrivacyPlan) -> Event:
    """The ledger event of one step of ``plan``."""
    if not plan.private:
        return PlaintextEvent(what="non-private model update")
    if plan.sampling == "poisson":
        return GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="poisson",
                             sample_rate=plan.sample_rate, clip_norm=plan.clip_norm)
    return GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="fixed_batch",
                         batch_size=plan.batch_size, dataset_size=plan.dataset_size, clip_norm=plan.clip_norm)


def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """One event per step, merged: what the finished run's ledger holds."""
    return [step_event(plan).with_count(plan.steps)] if plan.steps > 0 else []


@dataclass
class FitResult:
    """A trained model (hooks removed), its tokenizer and utility metrics; ``theta_0`` are the initial
    trainable parameters, ``gradient_canaries`` the canary key (None without canaries)."""

    model: nn.Module
    tokenizer: Any
    metrics: dict[str, Any]
    plan: PrivacyPlan
    theta_0: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient_canaries: GradientCanaries | None = None
    steps_done: int = 0
    resumed_from_step: int | None = None
    run_files: dict[str, Any] = field(default_factory=dict)  # canary_steps.safetensors when recorded


def accumulate_clipped_sum(model: nn.Module, psg: PerSampleGradients, batch: dict[str, torch.Tensor], task: str,
                           clip_norm: float, total: dict[str, torch.Tensor]) -> torch.Tensor:
    """Add Σ_b clip_C(∇_b) of one physical batch to ``total`` (in place); returns the per-sample norms."""
    psg.reset()
    losses = per_sample_losses(model, batch, task)
    losses.sum().backward()
    out = psg.clip(clip_norm)
    for n in total:
        total[n] += out.grads[n]
    model.zero_grad(set_to_none=True)
    psg.reset()
    return out.norms


def apply_noisy_update(params: Sequence[tuple[str, nn.Parameter]], total: dict[str, torch.Tensor], std: float,
                       denominator: float, generator: torch.Generator, optimizer: torch.optim.Optimizer) -> None:
    """grad = (clipped sum + N(0, std²)) / denominator for every parameter, then one optimizer step.

    The noise for all parameters is drawn as one flat vector (parameters in ``params`` order) from
    ``generator``; the sums in ``total`` are updated in place.
    """
    grads = [total[n] for n, _ in params]
    if std > 0:
        ref = grads[0]
        if all(g.dtype == ref.dtype and g.device == ref.device for g in grads):
            sizes = [g.numel() for g in grads]
            noise = torch.randn(sum(sizes), generator=generator, device=ref.device, dtype=ref.dtype).mul_(std)
            torch._foreach_add_(grads, [z.view_as(g) for z, g in zip(noise.split(sizes), grads)])
        else:
            for g in grads:
                g.add_(torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype).mul_(std))
    torch._foreach_div_(grads, float(denominator))
    for (_, p), g in zip(params, grads):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _derive_seeds(secret: int) -> tuple[int, int, int]:
    words = np.random.SeedSequence(secret).generate_state(6, np.uint64)
    sampler = int(words[0]) << 64 | int(words[1])
    noise = int(words[2] >> np.uint64(1))
    canary = int(words[4]) << 64 | int(words[5])
    return sampler, noise, canary


class DPLoraTrainer:
    """The state of one DP-LoRA training run; :meth:`step` performs one private update."""

    def __init__(self, cfg: RunConfig, train_records: Sequence[Record], plan: PrivacyPlan, model: nn.Module,
                 tokenizer: Any, device: torch.device, *, ledger: Any = None, noise_factor: float = 1.0,
                 secret_seed: int | None = None, canary_seed: int | None = None) -> None:
        self.cfg, self.plan, self.model, self.tokenizer, self.device = cfg, plan, model, tokenizer, device
        self.records = list(train_records)
        self.ledger = ledger
        self.noise_factor = float(noise_factor)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("lora: the model has no trainable parameters")
        self.param_names = [n for n, _ in self.params]
        self.optimizer = make_optimizer([p for _, p in self.params], cfg)
        self.psg = PerSampleGradients(model, cfg.privacy.norm_method)
        secret = secret_seed if secret_seed is not None else (
            cfg.privacy.noise_seed if cfg.privacy.noise_seed is not None else fresh_seed())
        s_seed, n_seed, c_seed = _derive_seeds(secret)
        self.sampler: Sampler = make_sampler(plan.sampling, len(self.records), sample_rate=plan.sample_rate,
                                             batch_size=plan.batch_size, seed=s_seed)
        self.noise_gen = torch.Generator(device=device)
        self.noise_gen.manual_seed(n_seed)
        self.canary_rng = np.random.Generator(np.random.PCG64(c_seed))
        self.canaries: GradientCanaries | None = None
        m = cfg.audit.gradient_canaries
        if m > 0:
            seed = canary_seed if canary_seed is not None else (
                cfg.audit.gradient_canary_seed if cfg.audit.gradient_canary_seed is not None
                else fresh_seed() >> 65)
            self.canaries = GradientCanaries(seed, m, self.param_names,
                                             [list(p.shape) for _, p in self.params], plan.clip_norm,
                                             plan.sample_rate)
        self.canary_recorder = (CanaryStepRecorder(self.canaries)
                                if self.canaries is not None and cfg.audit.record_canary_steps else None)
        self.event = step_event(plan)
        self.denominator = (plan.sample_rate * plan.dataset_size if plan.sampling == "poisson"
                            else float(plan.batch_size))  # type: ignore[arg-type]
        self.step_count = 0
        self.resumed_from: int | None = None
        self.extra_state: dict[str, Any] = {}  # JSON-able, saved with checkpoints

    # -- one step -----------------------------------------------------------------------------
    def physical_batches(self, indices: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """The records ``indices``, encoded in chunks of ``training.physical_batch_size`` (model in
        train mode)."""
        chunk = self.cfg.training.physical_batch_size
        self.model.train()
        for start in range(0, len(indices), chunk):
            recs = [self.records[int(i)] for i in indices[start:start + chunk]]
            yield encode(self.tokenizer, recs, self.cfg, self.device)

    def clipped_sum(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """Σ_b clip_C(∇_b) over the batch ``indices`` in physical chunks; (sums, batch size)."""
        total = {n: torch.zeros_like(p) for n, p in self.params}
        for batch in self.physical_batches(indices):
            accumulate_clipped_sum(self.model, self.psg, batch, self.cfg.task, self.plan.clip_norm, total)
        return total, len(indices)

    def step(self) -> dict[str, Any]:
        """One update: sample, clip, add canaries, append the ledger event, add noise, step."""
        indices = self.sampler.next_batch()
        total, size = self.clipped_sum(indices)
        n_canaries = 0
        if self.canaries is not None:
            flat, n_canaries = self.canaries.sampled_sum(self.canary_rng)
            if flat is not None:
                for n, v in self.canaries.unflatten(flat).items():
                    total[n] += v.to(total[n].device, total[n].dtype)
        if self.ledger is not None:
            self.ledger.append(self.event)  # write-ahead: durable before the update is applied
        std = self.plan.noise_multiplier * self.plan.clip_norm * self.noise_factor
        apply_noisy_update(self.params, total, std, self.denominator, self.noise_gen, self.optimizer)
        if self.canary_recorder is not None:  # `total` now holds the released noisy sum / denominator
            self.canary_recorder.record(total, self.denominator)
        self.step_count += 1
        return {"batch_size": size, "canaries": n_canaries}

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able state besides weights and optimizer tensors. Secret: holds the RNG states."""
        return {
            **loop_rng_state(self.sampler, self.noise_gen),
            "canary_rng": self.canary_rng.bit_generator.state,
            "gradient_canaries": None if self.canaries is None else self.canaries.to_json(),
            "plan": self.plan.to_json(),
            "extra": self.extra_state,
        }

    def load_state(self, step: int, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
                   state: dict[str, Any]) -> None:
        if state["plan"] != self.plan.to_json():
            raise ValueError("resume: the checkpoint was made with a different privacy plan")
        restore_loop_state(self.model, self.optimizer, self.sampler, self.noise_gen, weights, opt_tensors, state)
        self.canary_rng.bit_generator.state = state["canary_rng"]
        if state.get("gradient_canaries") is not None:
            self.canaries = GradientCanaries.from_json(state["gradient_canaries"])
        self.extra_state = dict(state.get("extra", {}))
        self.step_count = step

    def save(self, checkpointer: Checkpointer, theta_0: dict[str, torch.Tensor]) -> None:
        save_checkpoint(checkpointer, self.step_count, self.model, theta_0, self.optimizer, self.state())

    def start(self, resume: bool, checkpointer: Checkpointer | None, theta_0: dict[str, torch.Tensor],
              heldout_records: Sequence[Record]) -> dict[str, torch.Tensor]:
        """Before this process's first step. ``resume``: load ``checkpointer``'s newest checkpoint (its
        step becomes ``resumed_from``) and return the run's θ₀ saved with it. Otherwise return
        ``theta_0``, after evaluating the initial model on ``heldout_records`` if
        ``training.eval_before`` (metric ``heldout_before``)."""
        if resume:
            ckpt = resume_checkpoint(checkpointer)
            self.load_state(ckpt.step, ckpt.trainable, ckpt.optimizer_tensors, ckpt.state)
            self.resumed_from = ckpt.step
            return ckpt.theta_0
        if self.cfg.training.eval_before:
            self.extra_state["heldout_before"] = evaluate(self.model, self.tokenizer, heldout_records, self.cfg,
                                                          self.device)
        return theta_0

    def run(self, checkpointer: Checkpointer | None, theta_0: dict[str, torch.Tensor],
            progress: ProgressFn | None) -> None:
        """The remaining steps of the plan, checkpointing when due (:func:`.training.run_steps`)."""
        run_steps(self.step, self.step_count, self.plan.steps, checkpointer=checkpointer,
                  save=lambda _: self.save(checkpointer, theta_0), progress=progress)  # type: ignore[arg-type]

    def final_metrics(self, heldout_records: Sequence[Record]) -> dict[str, Any]:
        """The fit's metrics: the saved extras, ``heldout`` utility, split sizes and steps done."""
        metrics: dict[str, Any] = dict(self.extra_state)
        metrics["heldout"] = evaluate(self.model, self.tokenizer, heldout_records, self.cfg, self.device)
        metrics["train_size"] = len(self.records)
        metrics["heldout_size"] = len(heldout_records)
        metrics["steps"] = self.step_count
        return metrics

    def close(self) -> None:
        self.psg.remove()


def fit(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record], *,
        ledger: Any = None, progress: ProgressFn | None = None, num_labels: int | None = None,
        plan: PrivacyPlan | None = None, checkpointer: Checkpointer | None = None, resume: bool = False,
        _unsafe_noise_factor: float = 1.0) -> FitResult:
    """Train with DP-SGD on LoRA; no run directory. Appends one event per step to ``ledger`` (if
    given) before the step's update. With ``checkpointer``, saves the initial state and every
    ``checkpoint_every`` steps; ``resume=True`` continues from its newest checkpoint.

    ``_unsafe_noise_factor`` (tests only; not reachable from configs or the CLI) multiplies the noise
    actually added while the ledger still records the configured σ — a planted bug for auditor tests.
    """
    from privaudit.models import trainable_state_dict

    if not (math.isfinite(_unsafe_noise_factor) and _unsafe_noise_factor >= 0):
        raise ValueError(f"_unsafe_noise_factor: must be a finite number >= 0, got {_unsafe_noise_factor!r}")
    require_mechanism(cfg, NAME)
    plan, num_labels, device = fit_setup(cfg, train_records, heldout_records, plan, num_labels)
    model, tok = build_model(cfg, num_labels, device)
    theta_0 = trainable_state_dict(model)
    trainer = DPLoraTrainer(cfg, train_records, plan, model, tok, device, ledger=ledger,
                            noise_factor=_unsafe_noise_factor)
    try:
        theta_0 = trainer.start(resume, checkpointer, theta_0, heldout_records)
        if not resume and checkpointer is not None:
            trainer.save(checkpointer, theta_0)  # step 0: the secret seeds are durable before step 1
        trainer.run(checkpointer, theta_0, progress)
    finally:
        trainer.close()
    metrics = trainer.final_metrics(heldout_records)
    model.eval()
    # every-step record (opt-in): only complete when the run did not resume from a checkpoint
    rec = trainer.canary_recorder
    files = {CANARY_STEPS_FILE: rec.tensors()} if rec is not None and trainer.resumed_from is None else {}
    return FitResult(model, tok, metrics, plan, theta_0, trainer.canaries, trainer.step_count, trainer.resumed_from,
                     files)
