"""``dp_lora``: DP-SGD on the LoRA parameters (plus the classification head when it is trained).

Each step (record-level privacy, add/remove neighbours unless the config says ``replace``):

1. sample a batch: Poisson with rate q (variable size, possibly empty — the accountants' assumption)
   or shuffled fixed-size batches (recorded as ``fixed_batch``; no amplification claimed, and charged
   sensitivity 2·C: see :func:`step_event`);
2. per-sample gradients of the trainable parameters from layer inputs and output-gradients
   (:mod:`.per_sample`), each clipped to L2 norm C, summed over physical chunks of the batch. Included
   gradient canaries are units of the same sampler (indices N, N+1, ... after the N records) and are
   clipped by the same rule; those the step samples join the sum (see :mod:`.training`);
3. the step's event is appended to the ledger (write-ahead, fsynced): ``GaussianEvent(noise_multiplier
   = σ, sampling, sample_rate = q, clip_norm = C)``, or for σ = 0 (the non-private baseline, clipped
   but noiseless) ``PlaintextEvent("non-private model update")`` — no guarantee;
4. Gaussian noise N(0, σ²C²) is added to the clipped sum, which is divided by the *expected* batch size
   q·N (Poisson; the actual size would leak) or by B (fixed batches), and the optimizer steps.

The noise and the sampling come from the CSPRNG of :mod:`.rng` unless ``privacy.noise_seed`` is set
(tests: seeded torch/numpy generators, recorded as not secure): whoever knows that seed knows the
batches and the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from privaudit.ledger.events import Event, GaussianEvent, PlaintextEvent
from privaudit.config import PrivacyPlan, RunConfig
from privaudit.data import Record
from privaudit.mechanisms.distributed import (
    World,
    all_reduce_sum,
    close_world,
    init_world,
    world_from_env,
    broadcast_indices,
    broadcast_object,
    broadcast_tensors,
    share,
)
from privaudit.mechanisms.per_sample import PerSampleGradients
from privaudit.mechanisms import rng
from privaudit.mechanisms.sampling import Sampler, fresh_seed, make_sampler
from privaudit.mechanisms.training import (
    CANARY_STEPS_FILE,
    CanaryStepRecorder,
    Checkpointer,
    GradientCanaries,
    resolve_canary_directions,
    ProgressFn,
    build_model,
    encode,
    evaluate,
    fit_setup,
    loop_rng_state,
    make_optimizer,
    scheduled_learning_rate,
    set_learning_rate,
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


FIXED_BATCH_SENSITIVITY = 2.0  # in units of the clip norm C, under add/remove and replace alike


def step_event(plan: PrivacyPlan) -> Event:
    """The ledger event of one step of ``plan``.

    Fixed-size batches are charged L2 sensitivity 2·C under *both* relations: the sampler always fills
    B slots, so under add/remove an added record pushes another record out of its batch and that
    batch's clipped sum moves by up to 2·C (N = B = 100, σ = 1, one step: ε(1e-5) ≈ 9.98, not the 4.38
    that sensitivity C gives). Poisson steps keep the relation's default (C add/remove, 2·C replace).

    Under add/remove the fixed-batch charge (⌈k·B/N⌉ releases at 2·C) is proved for one pass over the
    data only (k·B ≤ N: couple D ∪ {x} with D by putting the last record of the (N+1)-permutation in
    x's slot; exactly one batch differs, by one swap). Over several passes the permutations of N + 1
    and of N records fall out of step, batches straddle different epoch boundaries, and no bound is
    recorded here: such a plan is refused (``ValueError`` naming ``training.sampling``). Under replace
    N is fixed, the permutations are the same, and the charge holds for any number of passes.
    """
    if not plan.private:
        return PlaintextEvent(what="non-private model update")
    if (plan.sampling == "fixed_batch" and plan.neighbouring == "add_remove"
            and plan.steps * int(plan.batch_size or 0) > plan.dataset_size):
        raise ValueError(
            f"training.sampling: fixed_batch under add/remove neighbours is accounted for one pass over the "
            f"data only ({plan.steps} steps × batch {plan.batch_size} > {plan.dataset_size} records); use "
            "sampling: poisson, fewer steps, or privacy.neighbouring: replace")
    if plan.sampling == "poisson":
        return GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="poisson",
                             sample_rate=plan.sample_rate, clip_norm=plan.clip_norm)
    return GaussianEvent(noise_multiplier=plan.noise_multiplier, sampling="fixed_batch",
                         batch_size=plan.batch_size, dataset_size=plan.dataset_size, clip_norm=plan.clip_norm,
                         sensitivity=FIXED_BATCH_SENSITIVITY * plan.clip_norm)


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


def add_gaussian_noise(grads: Sequence[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add N(0, std²) to every element of ``grads`` (in place), drawn as one flat vector (``grads`` order)
    from ``generator``."""
    if std <= 0 or not grads:
        return
    ref = grads[0]
    if all(g.dtype == ref.dtype and g.device == ref.device for g in grads):
        sizes = [g.numel() for g in grads]
        noise = rng.randn(sum(sizes), generator=generator, device=ref.device, dtype=ref.dtype).mul_(std)
        torch._foreach_add_(list(grads), [z.view_as(g) for z, g in zip(noise.split(sizes), grads)])
    else:
        for g in grads:
            g.add_(rng.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype).mul_(std))


def noisy_sum(world: World, grads: Sequence[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """In place: ``grads`` (this rank's clipped partial sums) become Σ over ranks + N(0, std²), the noise
    drawn once, by rank 0 (see :mod:`.distributed`). One process: just the noise."""
    if world.is_main:
        add_gaussian_noise(grads, std, generator)
    all_reduce_sum(world, grads)


def apply_noisy_update(params: Sequence[tuple[str, nn.Parameter]], total: dict[str, torch.Tensor], std: float,
                       denominator: float, generator: torch.Generator, optimizer: torch.optim.Optimizer) -> None:
    """grad = (clipped sum + N(0, std²)) / denominator for every parameter, then one optimizer step.

    The noise for all parameters is drawn as one flat vector (parameters in ``params`` order) from
    ``generator``; the sums in ``total`` are updated in place.
    """
    grads = [total[n] for n, _ in params]
    add_gaussian_noise(grads, std, generator)
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
    """The state of one DP-LoRA training run; :meth:`step` performs one private update.

    Randomness (:mod:`.rng`): ``secret_seed`` (or ``privacy.noise_seed``) gives seeded, reproducible and
    NOT secure generators; otherwise noise and sampling come from :class:`~.rng.SecureGenerator` s —
    fresh keys from ``os.urandom``, or the substreams ``"noise"`` / ``"sampler"`` of
    ``secret_stream``'s key when one is given."""

    def __init__(self, cfg: RunConfig, train_records: Sequence[Record], plan: PrivacyPlan, model: nn.Module,
                 tokenizer: Any, device: torch.device, *, ledger: Any = None, noise_factor: float = 1.0,
                 secret_seed: int | None = None, canary_seed: int | None = None, world: World | None = None,
                 secret_stream: rng.SecureGenerator | None = None) -> None:
        self.world = world if world is not None else World()
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
        s_seed, n_seed, _ = _derive_seeds(secret)
        secure = secret_seed is None and cfg.privacy.noise_seed is None  # CSPRNG unless seeded (rng.py)
        self._sampler_seed = None if secure else s_seed  # None: the sampler draws from a CSPRNG
        # secure + secret_stream: noise and sampling are substreams of that (secret) key, so a caller
        # holding one master key (dp_fedlora: per round and client) gets reproducible, independent runs
        self._secret_stream = secret_stream if secure else None
        self.clipped = True  # records' gradients are clipped to C (and so are the canaries')
        self.noise_gen = (rng.derive(self._secret_stream, "noise") if self._secret_stream is not None
                          else rng.noise_generator(None if secure else n_seed, device))
        self.canaries: GradientCanaries | None = None
        m = cfg.audit.gradient_canaries
        if m > 0:
            seed = canary_seed if canary_seed is not None else (
                cfg.audit.gradient_canary_seed if cfg.audit.gradient_canary_seed is not None
                else fresh_seed() >> 65)
            shapes = [list(p.shape) for _, p in self.params]
            kind = resolve_canary_directions(cfg.audit.gradient_canary_directions, m,
                                             sum(math.prod(sh) for sh in shapes))
            self.canaries = GradientCanaries(seed, m, self.param_names, shapes, plan.clip_norm,
                                             plan.sample_rate, directions=kind)
        self.canary_recorder = (CanaryStepRecorder(self.canaries)
                                if self.canaries is not None and cfg.audit.record_canary_steps else None)
        self.units: list[tuple[str, int]] = []
        self.sampler: Sampler = self.rebuild_sampler()
        self.event = step_event(plan)
        self.denominator = (plan.sample_rate * plan.dataset_size if plan.sampling == "poisson"
                            else float(plan.batch_size))  # type: ignore[arg-type]
        self.step_count = 0
        self.resumed_from: int | None = None
        self.extra_state: dict[str, Any] = {}  # JSON-able, saved with checkpoints

    # -- sampling: records and canaries are units of one sampler ---------------------------------
    def canary_units(self) -> list[tuple[str, int]]:
        """The audit canaries that are members of this run, as sampler units (kind, canary index)."""
        return [] if self.canaries is None else [("gradient", i) for i in self.canaries.included_indices()]

    def rebuild_sampler(self) -> Sampler:
        """A fresh sampler (from the run's sampler seed) over the N records followed by the member
        canaries (:meth:`canary_units`): a canary is sampled exactly as a record is."""
        self.units = self.canary_units()
        self.sampler = make_sampler(self.plan.sampling, len(self.records) + len(self.units),
                                    sample_rate=self.plan.sample_rate, batch_size=self.plan.batch_size,
                                    seed=self._sampler_seed)
        if self._secret_stream is not None:  # a fresh copy of the keyed sampling substream
            self.sampler.rng = rng.derive(self._secret_stream, "sampler")
        return self.sampler

    def add_canaries(self, total: dict[str, torch.Tensor], units: Sequence[tuple[str, int]]) -> int:
        """Add the sampled canary ``units`` to the clipped sum ``total`` (in place), clipped as records
        are (not at all when records are not clipped); returns how many were added."""
        if self.canaries is None:
            return 0
        chosen = [i for kind, i in units if kind == "gradient"]
        flat, n = self.canaries.clipped_sum(chosen, self.plan.clip_norm if self.clipped else None)
        if flat is not None:
            for name, v in self.canaries.unflatten(flat).items():
                total[name] += v.to(total[name].device, total[name].dtype)
        return n

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
        """One update: sample, clip, add canaries, append the ledger event, add noise, step. Across
        processes (:mod:`.distributed`): rank 0 samples and broadcasts the batch, each rank clips its
        share, rank 0 adds the canaries, writes the ledger and then the noise, and the sums are
        all-reduced before the same update is applied everywhere."""
        w = self.world
        units = broadcast_indices(w, self.sampler.next_batch() if w.is_main else None)
        n_rec = len(self.records)
        records = units[units < n_rec]
        total, _ = self.clipped_sum(share(w, records))
        n_canaries = self.add_canaries(total, [self.units[int(j) - n_rec] for j in units[units >= n_rec]]) \
            if w.is_main else 0
        if self.ledger is not None and w.is_main:
            self.ledger.append(self.event)  # write-ahead: durable before the update is applied
        std = self.plan.noise_multiplier * self.plan.clip_norm * self.noise_factor
        t = self.cfg.training
        set_learning_rate(self.optimizer, scheduled_learning_rate(t.learning_rate, t.lr_schedule, self.step_count,
                                                                  self.plan.steps))
        noisy_sum(w, [total[n] for n, _ in self.params], std, self.noise_gen)
        apply_noisy_update(self.params, total, 0.0, self.denominator, self.noise_gen, self.optimizer)
        if self.canary_recorder is not None:  # `total` now holds the released noisy sum / denominator
            self.canary_recorder.record(total, self.denominator)
        self.step_count += 1
        return {"batch_size": len(records), "canaries": n_canaries}

    def sync_from_main(self) -> None:
        """Across processes: every rank takes rank 0's trainable weights, optimizer state, step count
        and saved extras (after rank 0 started fresh or resumed from its checkpoint)."""
        w = self.world
        if not w.distributed:
            return
        from privaudit.mechanisms.training import optimizer_from_flat, optimizer_to_flat

        broadcast_tensors(w, [p for _, p in self.params])
        meta = broadcast_object(w, {"step": self.step_count, "resumed_from": self.resumed_from,
                                    "extra": self.extra_state,
                                    "optimizer": optimizer_to_flat(self.optimizer) if w.is_main else None})
        self.step_count, self.resumed_from = int(meta["step"]), meta["resumed_from"]
        self.extra_state = dict(meta["extra"])
        if not w.is_main:
            tensors, state = meta["optimizer"]
            optimizer_from_flat(self.optimizer, tensors, state)

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able state besides weights and optimizer tensors. Secret: holds the RNG states."""
        return {
            **loop_rng_state(self.sampler, self.noise_gen),
            "gradient_canaries": None if self.canaries is None else self.canaries.to_json(),
            "plan": self.plan.to_json(),
            "extra": self.extra_state,
        }

    def load_state(self, step: int, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
                   state: dict[str, Any]) -> None:
        if state["plan"] != self.plan.to_json():
            raise ValueError("resume: the checkpoint was made with a different privacy plan")
        if state.get("gradient_canaries") is not None:
            self.canaries = GradientCanaries.from_json(state["gradient_canaries"])
        self.load_canary_state(state)
        self.rebuild_sampler()  # over the checkpoint's canaries, before its sampler state is loaded
        restore_loop_state(self.model, self.optimizer, self.sampler, self.noise_gen, weights, opt_tensors, state)
        self.extra_state = dict(state.get("extra", {}))
        self.step_count = step

    def load_canary_state(self, state: dict[str, Any]) -> None:
        """Hook: restore further canaries from a checkpoint's ``state`` (before the sampler is rebuilt)."""

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
    world = world_from_env()
    init_world(world)
    plan, num_labels, device = fit_setup(cfg, train_records, heldout_records, plan, num_labels)
    model, tok = build_model(cfg, num_labels, device)
    theta_0 = trainable_state_dict(model)
    trainer = DPLoraTrainer(cfg, train_records, plan, model, tok, device, ledger=ledger,
                            noise_factor=_unsafe_noise_factor, world=world)
    try:
        theta_0 = trainer.start(resume, checkpointer, theta_0, heldout_records)
        trainer.sync_from_main()  # across processes: rank 0's (initial or resumed) state everywhere
        if not resume and checkpointer is not None:
            trainer.save(checkpointer, theta_0)  # step 0: the secret seeds are durable before step 1
        trainer.run(checkpointer, theta_0, progress)
    finally:
        trainer.close()
        close_world(world)
    metrics = trainer.final_metrics(heldout_records)
    model.eval()
    # every-step record (opt-in): only complete when the run did not resume from a checkpoint
    rec = trainer.canary_recorder
    files = {CANARY_STEPS_FILE: rec.tensors()} if rec is not None and trainer.resumed_from is None else {}
    return FitResult(model, tok, metrics, plan, theta_0, trainer.canaries, trainer.step_count, trainer.resumed_from,
                     files)
