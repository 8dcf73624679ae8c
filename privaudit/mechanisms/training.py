"""Common training-loop pieces: data and model from a config, per-sample losses, optimizer, utility
evaluation, checkpoints (safetensors + JSON), RNG state, and white-box gradient canaries.

Gradient canaries (one-run audits, Steinke, Nasr & Jagielski 2023). With ``audit.gradient_canaries =
m > 0`` a run draws m fixed directions u_i in the flattened trainable-parameter space (parameters in
``param_names`` order, each direction a seeded standard Gaussian vector — rebuilt by
:func:`canary_direction`), and includes each canary independently with probability ½. Each *included*
canary is one more unit of the accounted mechanism, treated exactly as a record: it is a unit of the
run's own sampler (Poisson with the records' q, or a slot of the shuffled fixed-size batches, pushing a
record out), and its gradient — of norm ``raw_norm`` = 1000·C, far above C — goes through the same
clipping rule (:func:`.per_sample.clip_factors`) with the same C before it joins the clipped sum and
the noise. A sampling or clipping bug therefore hits canaries as it hits records, and the canaries'
ε is the ledger's per-record ε. The seed, the inclusion bits, the parameter names/shapes and C are
saved in ``audit_key.json``; the initial trainable parameters θ₀ in ``adapter_init.safetensors``. The auditor
scores canary i by ⟨θ_final − θ₀, u_i/‖u_i‖⟩ (:func:`score_gradient_canaries`): included canaries
should score higher (in the direction of −∇, i.e. negative for SGD-like updates — the score is
reported with the sign flipped so that "higher = more likely included"). A canary is one more unit of
the add/remove relation, so the accounting is unchanged. With ``audit.record_canary_steps`` the run
also keeps every step's released noisy sum projected on the canaries (:class:`CanaryStepRecorder`,
``canary_steps.safetensors``) for an auditor who sees every step (:func:`every_step_canary_scores`).

Directions (``audit.gradient_canary_directions``, recorded as ``directions`` in the key):

* ``dirac`` — canary i is the coordinate vector e_{j_i} of its own trainable coordinate j_i (m distinct
  coordinates drawn from the canary seed alone, :meth:`GradientCanaries.coordinates`: data-independent),
  the "Dirac canaries" of Nasr et al. 2023 and Steinke et al. 2023. The canaries are mutually
  orthogonal, so member canaries sampled in the same step do not add to one another's scores (with
  Gaussian directions each canary's projection picks up ≈ C·√(q·m/dim) of the others' sum, which sets
  an optimum in m); needs m ≤ dim. Scoring and recording are index lookups, so 10⁵ canaries cost
  nothing measurable per step.
* ``gaussian`` — a seeded standard Gaussian direction per canary (:func:`canary_direction`), for any m.
* ``auto`` (the default) — dirac when m ≤ dim, else gaussian.

``GradientCanaries.raw_norm``: key files written before this rule lack it and read as ``clip_norm``;
key files without ``directions`` read as ``gaussian`` (the only kind they could hold).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privaudit.config import PrivacyPlan, RunConfig, resolve_plan
from privaudit.data import Corpus, Record, dataset_fingerprint, generate_corpus, load_records_with_labels
from privaudit.ledger.durable import fsync_dir, fsync_file

ProgressFn = Callable[[int, int, dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataBundle:
    """A config's data: train/held-out records, label names, the corpus (canaries, audit key)."""

    train: list[Record]
    heldout: list[Record]
    label_names: tuple[str, ...]
    corpus: Corpus

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the training set (multiset of (text, label))."""
        return dataset_fingerprint(self.train)

    def audit_key(self) -> dict[str, Any]:
        return self.corpus.audit_key(self.train)


def prepare_data(cfg: RunConfig) -> DataBundle:
    """Generate or load the config's records and split off the held-out set (deterministic)."""
    d = cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        a = cfg.audit
        lm_design = a.lm_canary_design != "format"
        corpus = generate_corpus(n_people=s.n_people, records_per_person=s.records_per_person,
                                 n_canaries=0 if lm_design else s.n_canaries, canary_inclusion=s.canary_inclusion,
                                 seed=s.seed, canary_formats=tuple(s.canary_formats))
        if lm_design or a.lm_canary_repeats > 1:
            corpus = _with_lm_canaries(cfg, corpus)
    else:
        if cfg.task == "classification" and d.label_column is None:
            raise ValueError("data.label_column: required for the classification task")
        try:
            records, names = load_records_with_labels(d.path, d.text_column, d.label_column,  # type: ignore[arg-type]
                                                      d.sensitive_column, id_column=d.id_column, split=d.split)
        except ValueError as exc:
            raise ValueError(f"data.{exc}") from None
        corpus = Corpus(records=tuple(records), canaries=(), label_names=names, sensitive_name="", seed=0)
    train, heldout = corpus.split(d.heldout_fraction, d.split_seed)
    if d.max_heldout is not None:
        heldout = heldout[: d.max_heldout]
    if not train:
        raise ValueError("data: the training split is empty")
    if cfg.task == "classification" and len(corpus.label_names) < 2:
        raise ValueError("data.label_column: classification needs at least two labels")
    return DataBundle(list(train), list(heldout), tuple(corpus.label_names), corpus)


def lm_canary_seed(cfg: RunConfig) -> int:
    """The LM canaries' secret seed: ``audit.lm_canary_seed``, else derived from the corpus seed."""
    if cfg.audit.lm_canary_seed is not None:
        return int(cfg.audit.lm_canary_seed)
    return int(np.random.SeedSequence([cfg.data.synthetic.seed, 0x4C4D43]).generate_state(1, np.uint64)[0])


def n_new_canary_tokens(cfg: RunConfig) -> int:
    """Tokens the ``new_token`` design adds (one set per canary; 0 for other designs)."""
    if cfg.task != "causal_lm" or cfg.audit.lm_canary_design != "new_token":
        return 0
    return cfg.data.synthetic.n_canaries * cfg.audit.lm_canary_secret_tokens


def _with_lm_canaries(cfg: RunConfig, corpus: Corpus) -> Corpus:
    """The corpus with the configured LM canary design and repeats (privaudit.data.lm_canaries)."""
    from privaudit.data.lm_canaries import make_lm_canaries, new_token_strings, with_canaries
    from privaudit.models import load_tokenizer

    a, seed = cfg.audit, lm_canary_seed(cfg)
    if a.lm_canary_design == "format":
        return with_canaries(corpus, corpus.canaries, a.lm_canary_repeats, seed)
    tok = load_tokenizer(cfg.model.name)
    if a.lm_canary_design == "new_token":
        tok.add_tokens(new_token_strings(n_new_canary_tokens(cfg)))  # the tokenizer build_model makes
    canaries = make_lm_canaries(a.lm_canary_design, cfg.data.synthetic.n_canaries, tok, seed,
                                secret_tokens=a.lm_canary_secret_tokens, prefix=a.lm_canary_prefix,
                                first_person_id=cfg.data.synthetic.n_people, max_length=cfg.model.max_length)
    return with_canaries(corpus, canaries, a.lm_canary_repeats, seed)


# ----------------------------------------------------------------------------------------------
# model, losses, evaluation
# ----------------------------------------------------------------------------------------------
def build_model(cfg: RunConfig, num_labels: int, device: torch.device) -> tuple[nn.Module, Any]:
    """Base model + LoRA adapter of ``cfg``, seeded by ``training.seed`` (θ₀ is a function of cfg); with
    ``audit.lm_canary_train_new_tokens`` the new-token canaries' rows are trainable layers too
    (:mod:`privaudit.mechanisms.new_token_rows`)."""
    from privaudit.models import apply_lora, load_base_model

    model, tok = load_base_model(cfg.model.name, cfg.task, num_labels=num_labels, seed=cfg.training.seed,
                                 **cfg.model.overrides)
    n_new = n_new_canary_tokens(cfg)
    new_ids: list[int] = []
    if n_new:  # new-token canaries: public random rows (privaudit.data.lm_canaries), frozen unless trained
        from privaudit.data.lm_canaries import add_new_tokens, new_token_strings

        new_ids = add_new_tokens(model, tok, new_token_strings(n_new), seed=cfg.training.seed)
    model = apply_lora(model, cfg.lora, seed=cfg.training.seed)
    if new_ids and cfg.audit.lm_canary_train_new_tokens:  # their rows as trainable layers (.new_token_rows)
        from privaudit.mechanisms.new_token_rows import install_trainable_new_token_rows

        install_trainable_new_token_rows(model, new_ids)
    return model.to(device), tok


def encode(tokenizer: Any, records: Sequence[Record], cfg: RunConfig, device: torch.device) -> dict[str, torch.Tensor]:
    from privaudit.models import encode_batch

    batch = encode_batch(tokenizer, [r.text for r in records], cfg.model.max_length,
                         lm_labels=cfg.task == "causal_lm", device=device)
    if cfg.task == "classification":
        batch["labels"] = torch.tensor([r.label for r in records], dtype=torch.long, device=device)
    return batch


def per_sample_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """Loss of each sample, shape (B,): cross-entropy (classification) or mean next-token NLL over the
    sample's own tokens (causal LM). Sum these for per-sample gradients."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch["labels"]
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          reduction="none", ignore_index=-100).view(shift_labels.shape)
    count = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / count


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, records: Sequence[Record], cfg: RunConfig,
             device: torch.device) -> dict[str, float]:
    """Utility on ``records``: ``accuracy`` and ``loss`` (classification, with the majority-class rate
    as ``majority_baseline``) or ``perplexity`` = exp(mean NLL per predicted token) (causal LM)."""
    if not records:
        return {}
    was_training = model.training
    model.eval()
    bs = cfg.training.eval_batch_size
    correct, loss_sum, nll_sum, tokens = 0, 0.0, 0.0, 0
    for start in range(0, len(records), bs):
        chunk = records[start:start + bs]
        batch = encode(tokenizer, chunk, cfg, device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        labels = batch["labels"]
        if cfg.task == "classification":
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        else:
            sl, lab = logits[:, :-1], labels[:, 1:]
            nll_sum += float(F.cross_entropy(sl.reshape(-1, sl.shape[-1]), lab.reshape(-1), reduction="sum",
                                             ignore_index=-100))
            tokens += int((lab != -100).sum())
    model.train(was_training)
    n = len(records)
    if cfg.task == "classification":
        counts = np.bincount([r.label for r in records])
        return {"accuracy": correct / n, "loss": loss_sum / n, "majority_baseline": float(counts.max() / n),
                "n_eval": float(n)}
    mean_nll = nll_sum / max(tokens, 1)
    return {"perplexity": float(math.exp(min(mean_nll, 700.0))), "loss": mean_nll, "n_eval": float(n),
            "n_tokens": float(tokens)}


def scheduled_learning_rate(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of update ``step`` (0-based) of ``total_steps``: ``constant`` (``base``),
    ``linear`` (``base·(1 − step/total)``) or ``cosine`` (``base·(1 + cos(π·step/total))/2``), both
    decaying towards 0 at the last update. A function of the step count only (data-independent), so
    it is post-processing and costs no privacy."""
    if schedule == "constant" or total_steps <= 0:
        return float(base)
    frac = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return float(base) * (1.0 - frac)
    if schedule == "cosine":
        return float(base) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lr_schedule: unknown schedule {schedule!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(params: Sequence[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# RNG state <-> JSON
# ----------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def torch_rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and every CUDA device), JSON-able."""
    state: dict[str, Any] = {"cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_torch_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def generator_state(gen: Any) -> str:
    """A noise generator's state: base64 (torch.Generator) or JSON (``rng.SecureGenerator``)."""
    from privaudit.mechanisms.rng import SecureGenerator

    return json.dumps(gen.state) if isinstance(gen, SecureGenerator) else _b64(gen.get_state())


def set_generator_state(gen: Any, state: str) -> None:
    from privaudit.mechanisms.rng import SecureGenerator

    if isinstance(gen, SecureGenerator):
        gen.state = json.loads(state)
    else:
        gen.set_state(_unb64(state))


# ----------------------------------------------------------------------------------------------
# checkpoints: trainable weights + optimizer state in safetensors, the rest in JSON
# ----------------------------------------------------------------------------------------------
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) from an optimizer state dict: tensors keyed ``state.<idx>.<key>``."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                        meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=1, allow_nan=False), encoding="utf-8")


THETA0_PREFIX = "__theta0__."  # θ₀ is saved with every checkpoint, under this key prefix


@dataclass(frozen=True)
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def trainable(self) -> dict[str, torch.Tensor]:
        """The trainable weights after ``step`` updates (θ₀ left out)."""
        return {k: v for k, v in self.weights.items() if not k.startswith(THETA0_PREFIX)}

    @property
    def theta_0(self) -> dict[str, torch.Tensor]:
        """The run's initial trainable parameters θ₀, saved with the checkpoint."""
        return {k[len(THETA0_PREFIX):]: v for k, v in self.weights.items() if k.startswith(THETA0_PREFIX)}


class Checkpointer:
    """Checkpoints under ``directory``: ``step-<k>/{trainable,optimizer}.safetensors`` and
    ``state.json`` (step, optimizer scalars, sampler/noise/canary/torch RNG states). A checkpoint is
    written to a temporary folder, fsynced and renamed into place, so the newest complete one is
    always readable; older ones are removed afterwards.

    The state holds the secret RNG states (sampling and noise): never publish it. ``clear()`` removes
    the folder once the run is finished.
    """

    def __init__(self, directory: str | Path, every: int) -> None:
        if every < 1:
            raise ValueError(f"training.checkpoint_every: must be >= 1, got {every}")
        self.directory = Path(directory)
        self.every = every

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, weights: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             state: Mapping[str, Any]) -> Path:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-step-{step:09d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, **state, "complete": True})
        for f in tmp.iterdir():
            fsync_file(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.directory)
        for old in self.directory.iterdir():
            if old.name.startswith("step-") and old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        from safetensors.torch import load_file

        if not self.directory.is_dir():
            return None
        for d in sorted((p for p in self.directory.iterdir() if p.name.startswith("step-")), reverse=True):
            try:
                state = json.loads((d / "state.json").read_text(encoding="utf-8"))
                if not state.get("complete"):
                    continue
                weights = load_file(str(d / "trainable.safetensors"))
                opt = load_file(str(d / "optimizer.safetensors"))
            except (OSError, ValueError):
                continue
            return Checkpoint(int(state["step"]), weights, opt, state)
        return None

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def save_checkpoint(checkpointer: Checkpointer, step: int, model: nn.Module, theta_0: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> Path:
    """Checkpoint ``model``'s trainable weights after ``step`` updates, with θ₀ (see
    :attr:`Checkpoint.theta_0`), the optimizer and the JSON ``state`` (secret: holds RNG states)."""
    from privaudit.models import trainable_state_dict

    weights = trainable_state_dict(model)
    weights.update({f"{THETA0_PREFIX}{k}": v for k, v in theta_0.items()})
    return checkpointer.save(step, weights, optimizer, state)


def resume_checkpoint(checkpointer: Checkpointer | None) -> Checkpoint:
    """The checkpoint a ``resume=True`` fit continues from: ``checkpointer``'s newest one."""
    if checkpointer is None:
        raise ValueError("resume: needs a checkpoint directory")
    ckpt = checkpointer.latest()
    if ckpt is None:
        raise ValueError(f"resume: no checkpoint under {checkpointer.directory}")
    return ckpt


def loop_rng_state(sampler: Any, noise_gen: torch.Generator) -> dict[str, Any]:
    """The secret RNG states of a step loop, JSON-able: the batch sampler's, the noise generator's
    and the global torch RNG's (keys ``sampler``, ``noise_generator``, ``torch_rng``)."""
    return {"sampler": sampler.state_dict(), "noise_generator": generator_state(noise_gen),
            "torch_rng": torch_rng_state()}


def restore_loop_state(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: Any, noise_gen: torch.Generator,
                       weights: Mapping[str, torch.Tensor], opt_tensors: Mapping[str, torch.Tensor],
                       state: Mapping[str, Any]) -> None:
    """Put a checkpoint's trainable ``weights``, optimizer state and :func:`loop_rng_state` back."""
    from privaudit.models import load_trainable_state_dict

    load_trainable_state_dict(model, weights)
    optimizer_from_flat(optimizer, opt_tensors, state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    set_generator_state(noise_gen, state["noise_generator"])
    set_torch_rng_state(state["torch_rng"])


# ----------------------------------------------------------------------------------------------
# the scaffolding of a mechanism's fit()
# ----------------------------------------------------------------------------------------------
def require_mechanism(cfg: RunConfig, name: str) -> None:
    """Refuse a config made for another mechanism."""
    if cfg.mechanism != name:
        raise ValueError(f"mechanism: {cfg.mechanism!r} is not {name!r}")


class FitSetup(NamedTuple):
    plan: PrivacyPlan
    num_labels: int
    device: torch.device


def fit_setup(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record],
              plan: PrivacyPlan | None = None, num_labels: int | None = None) -> FitSetup:
    """The privacy plan (``resolve_plan`` unless given; it must be made for ``len(train_records)``
    records), the number of labels (unless given: max label + 1 over both splits, at least 2) and the
    device of a fit."""
    from privaudit.models import resolve_device

    if plan is None:
        plan = resolve_plan(cfg, len(train_records))
    if plan.dataset_size != len(train_records):
        raise ValueError(f"plan: made for {plan.dataset_size} records, got {len(train_records)}")
    if num_labels is None:
        labels = [r.label for r in list(train_records) + list(heldout_records)]
        num_labels = max(2, max(labels) + 1)
    return FitSetup(plan, num_labels, resolve_device(cfg.model.device))


def run_steps(step: Callable[[], dict[str, Any]], done: int, total: int, *, checkpointer: Checkpointer | None = None,
              save: Callable[[int], Any] | None = None, progress: ProgressFn | None = None,
              save_final: bool = False) -> int:
    """Call ``step`` (one update; returns its progress info) until ``total`` updates are done,
    ``done`` of them already; returns ``total``. After update k: ``save(k)`` when ``checkpointer`` is
    due at k (not after the last update unless ``save_final``: the run's result replaces that
    checkpoint), then ``progress(k, total, info)``."""
    k = done
    while k < total:
        info = step()
        k += 1
        if checkpointer is not None and save is not None and checkpointer.due(k) and (save_final or k < total):
            save(k)
        if progress is not None:
            progress(k, total, info)
    return k


# ----------------------------------------------------------------------------------------------
# gradient canaries
# ----------------------------------------------------------------------------------------------
def canary_direction(seed: int, index: int, dim: int, norm: float = 1.0) -> torch.Tensor:
    """Direction of gradient canary ``index``: a standard Gaussian vector in R^dim (float32, CPU,
    from a generator seeded by (seed, index)) scaled to L2 norm ``norm``."""
    words = np.random.SeedSequence([int(seed), int(index), 0x67726164]).generate_state(2, np.uint64)
    gen = torch.Generator().manual_seed(int(words[0] >> np.uint64(1)))
    v = torch.randn(dim, generator=gen, dtype=torch.float32)
    return v * (norm / v.norm().clamp_min(1e-30))


CANARY_RAW_NORM = 1000.0  # a gradient canary's norm before clipping, in units of C
CANARY_DIRECTIONS = ("gaussian", "dirac")
MAX_GAUSSIAN_CANARIES = 100_000  # each costs O(dim) per step to rebuild; Dirac canaries go to 1,000,000


def resolve_canary_directions(requested: str, count: int, dim: int) -> str:
    """``audit.gradient_canary_directions`` for m = ``count`` canaries over ``dim`` trainable coordinates:
    ``auto`` → dirac when m ≤ dim, else gaussian; an explicit ``dirac`` with m > dim is refused."""
    if requested == "auto":
        requested = "dirac" if count <= dim else "gaussian"
    if requested == "dirac" and count > dim:
        raise ValueError(f"audit.gradient_canary_directions: dirac canaries need one trainable coordinate "
                         f"each, but {count} canaries > {dim} trainable coordinates (use gaussian or fewer)")
    if requested not in CANARY_DIRECTIONS:
        raise ValueError(f"audit.gradient_canary_directions: must be auto, gaussian or dirac, got {requested!r}")
    if requested == "gaussian" and count > MAX_GAUSSIAN_CANARIES:
        raise ValueError(f"audit.gradient_canaries: at most {MAX_GAUSSIAN_CANARIES} with Gaussian directions "
                         f"(got {count}; {dim} trainable coordinates); Dirac canaries need count <= coordinates")
    return requested


@dataclass
class GradientCanaries:
    """m gradient canaries over the trainable parameters ``param_names`` (see the module docstring).
    ``sample_rate``: the records' q (Poisson) or B/N (fixed batches), for reports; the inclusion
    itself is the run's sampler's. ``raw_norm``: a canary gradient's L2 norm before clipping (default
    1000·``clip_norm``)."""

    seed: int
    count: int
    param_names: list[str]
    param_shapes: list[list[int]]
    clip_norm: float
    sample_rate: float
    included: list[bool] = field(default_factory=list)
    raw_norm: float | None = None
    directions: str = "gaussian"
    _coords: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.included:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.seed), 0x696E63])))
            self.included = [bool(b) for b in rng.random(self.count) < 0.5]
        if self.raw_norm is None:
            self.raw_norm = CANARY_RAW_NORM * self.clip_norm
        if self.directions not in CANARY_DIRECTIONS:
            raise ValueError(f"audit_key.gradient_canaries.directions: must be one of {CANARY_DIRECTIONS}, "
                             f"got {self.directions!r}")
        if (len(self.param_shapes) != len(self.param_names)
                or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for sh in self.param_shapes for d in sh)
                or self.dim > 1 << 40):
            raise ValueError("audit_key.gradient_canaries.param_shapes: must give one shape of non-negative "
                             "integers per parameter name, at most 2^40 coordinates in all")
        if self.directions == "gaussian" and self.count > MAX_GAUSSIAN_CANARIES:
            raise ValueError(f"audit_key.gradient_canaries.count: at most {MAX_GAUSSIAN_CANARIES} Gaussian "
                             f"canaries, got {self.count}")
        if self.directions == "dirac" and self.count > self.dim:
            raise ValueError(f"audit_key.gradient_canaries.directions: dirac canaries need count ({self.count}) "
                             f"<= the trainable coordinates ({self.dim})")

    @property
    def dim(self) -> int:
        return int(sum(math.prod(s) for s in self.param_shapes))

    def coordinates(self) -> np.ndarray:
        """Dirac canaries: canary i's coordinate j_i in the flattened trainable parameters (int64, shape
        (m,)) — m distinct coordinates drawn uniformly without replacement, from the canary seed and the
        parameter names and shapes alone (data-independent): from the LoRA adapter matrices (names with
        ``lora_``) when they hold at least m coordinates, else from all trainable coordinates.

        Why the adapters first: a densely trained parameter (a classification head, a bias) receives a
        data gradient of the same sign step after step, so a non-member canary on it drifts like a
        member (measured, tiny GPT-2, every record in every step: head coordinates 3.5% of the
        non-members, 27% of the false "in" guesses among the top 300, their summed projection 2.0× the
        noise's spread), while adapter coordinates (B starts at 0, so A's data gradient starts at 0)
        stay at the noise's spread (1.00×)."""
        if self.directions != "dirac":
            raise ValueError("directions: coordinates exist for dirac canaries only")
        if self._coords is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.seed), 0x64697261])))
            sizes = np.array([math.prod(s) for s in self.param_shapes], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            adapter = np.array(["lora_" in n for n in self.param_names], dtype=bool)
            eligible = adapter if int(sizes[adapter].sum()) >= self.count else np.ones(len(sizes), dtype=bool)
            seg_sizes, seg_starts = sizes[eligible], starts[eligible]
            pos = rng.choice(int(seg_sizes.sum()), size=self.count, replace=False).astype(np.int64)
            ends = np.cumsum(seg_sizes)
            seg = np.searchsorted(ends, pos, side="right")
            self._coords = seg_starts[seg] + pos - (ends[seg] - seg_sizes[seg])
        return self._coords

    def direction(self, index: int, norm: float = 1.0) -> torch.Tensor:
        """Canary ``index``'s gradient direction in R^dim with L2 norm ``norm`` (float32, CPU)."""
        if self.directions == "dirac":
            v = torch.zeros(self.dim, dtype=torch.float32)
            v[int(self.coordinates()[index])] = float(norm)
            return v
        return canary_direction(self.seed, index, self.dim, norm)

    def unit_projections(self, flat: torch.Tensor) -> torch.Tensor:
        """⟨flat, u_i/‖u_i‖⟩ for every canary i (float32, shape (m,)); ``flat`` on the CPU, shape (dim,)."""
        if flat.numel() != self.dim:
            raise ValueError(f"audit_key.gradient_canaries.param_shapes: {self.dim} coordinates, but the model's "
                             f"parameters {self.param_names[:1]}… hold {flat.numel()}")
        if self.directions == "dirac":
            return flat[torch.from_numpy(self.coordinates())].to(torch.float32)
        return torch.stack([flat @ canary_direction(self.seed, i, self.dim, 1.0) for i in range(self.count)])

    def included_indices(self) -> list[int]:
        """The included canaries, in index order: the units a run adds to its sampler."""
        return [i for i in range(self.count) if self.included[i]]

    def clipped_sum(self, chosen: Sequence[int], clip_norm: float | None) -> tuple[torch.Tensor | None, int]:
        """Σ clip_C(g_i) over the canaries ``chosen`` (flat, float32, CPU) and how many: each gradient
        g_i has norm ``raw_norm`` and is clipped by :func:`.per_sample.clip_factors` with ``clip_norm``
        (the records' C); ``clip_norm=None`` (a run that does not clip its records) adds g_i scaled to
        the key's ``clip_norm`` instead."""
        from privaudit.mechanisms import per_sample

        if not chosen:
            return None, 0
        total = torch.zeros(self.dim, dtype=torch.float32)
        if self.directions == "dirac":  # g_i = raw_norm·e_{j_i}: clipped by the same rule, coordinates distinct
            raw = float(self.clip_norm if clip_norm is None else self.raw_norm)  # type: ignore[arg-type]
            value = raw if clip_norm is None else raw * float(
                per_sample.clip_factors(torch.tensor([raw]), clip_norm)[0])
            total[torch.from_numpy(self.coordinates()[np.asarray(chosen, dtype=np.int64)])] = value
            return total, len(chosen)
        for i in chosen:
            if clip_norm is None:
                total += canary_direction(self.seed, i, self.dim, self.clip_norm)
                continue
            g = canary_direction(self.seed, i, self.dim, float(self.raw_norm))  # type: ignore[arg-type]
            total += g * per_sample.clip_factors(g.norm().reshape(1), clip_norm)[0]
        return total, len(chosen)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.param_names, self.param_shapes):
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].view(*shape)
            offset += n
        return out

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "count": self.count, "included": self.included,
                "param_names": self.param_names, "param_shapes": self.param_shapes,
                "clip_norm": self.clip_norm, "sample_rate": self.sample_rate, "raw_norm": self.raw_norm,
                "directions": self.directions,
                "sampling": "units of the run's sampler, as records; gradients clipped as records'",
                "direction": ("raw_norm * e_j, j = coordinates(seed)[index], clipped to clip_norm"
                              if self.directions == "dirac" else
                              "canary_direction(seed, index, dim, raw_norm), clipped to clip_norm"),
                "score": "-<theta_final - theta_0, direction/|direction|>"}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "GradientCanaries":
        raw = d.get("raw_norm")
        return cls(int(d["seed"]), int(d["count"]), list(d["param_names"]), [list(s) for s in d["param_shapes"]],
                   float(d["clip_norm"]), float(d["sample_rate"]), [bool(b) for b in d["included"]],
                   float(raw) if raw is not None else float(d["clip_norm"]),
                   str(d.get("directions", "gaussian")))


def flatten(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().reshape(-1).to("cpu", torch.float32) for n in names])


def score_gradient_canaries(theta_0: Mapping[str, torch.Tensor], theta_final: Mapping[str, torch.Tensor],
                            key: Mapping[str, Any] | GradientCanaries) -> np.ndarray:
    """Score of each gradient canary: −⟨θ_final − θ₀, u_i/‖u_i‖⟩ (higher = more likely included,
    since an update moves against the summed gradient)."""
    can = key if isinstance(key, GradientCanaries) else GradientCanaries.from_json(key)
    delta = flatten(theta_final, can.param_names) - flatten(theta_0, can.param_names)
    return -can.unit_projections(delta).double().numpy()


CANARY_STEPS_FILE = "canary_steps.safetensors"


class CanaryStepRecorder:
    """Opt-in white-box record of every DP-SGD release: step t's noisy clipped sum S_t (data + sampled
    canaries + N(0, σ²C²I), *before* division by the batch denominator) projected on each gradient
    canary's unit direction, x_{t,i} = ⟨S_t, u_i/‖u_i‖⟩. Only these m numbers per step are kept (the
    observer "sees every step", Nasr et al. 2023). Directions are cached when m·dim ≤ ``cache_limit``
    floats, else regenerated each step."""

    def __init__(self, canaries: GradientCanaries, cache_limit: int = 1 << 24) -> None:
        self.canaries = canaries
        self._dirs: torch.Tensor | None = None
        if canaries.directions == "gaussian" and canaries.count * canaries.dim <= cache_limit:
            self._dirs = torch.stack([canary_direction(canaries.seed, i, canaries.dim, 1.0)
                                      for i in range(canaries.count)])
        self.rows: list[torch.Tensor] = []

    def record(self, total: Mapping[str, torch.Tensor], scale: float) -> None:
        """Record one step: ``total`` holds the noisy sum divided by the denominator ``scale``."""
        flat = flatten(total, self.canaries.param_names) * float(scale)
        if self._dirs is not None:
            self.rows.append(self._dirs @ flat)
        else:
            self.rows.append(self.canaries.unit_projections(flat))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"projections": (steps, m) float32}`` for a safetensors file."""
        rows = self.rows or [torch.zeros(self.canaries.count)]
        return {"projections": torch.stack(rows).float().contiguous()[: len(self.rows)]}


def every_step_canary_scores(projections: np.ndarray, clip_norm: float, sample_rate: float) -> np.ndarray:
    """Every-step score of each gradient canary from its per-step projections x_{t,i} (shape (T, m)):
    the log-likelihood ratio "included" vs "absent" summed over steps (Nasr et al. 2023),
    Σ_t log(1 − q + q·exp((z_{t,i} − c_t − ½)/s_t²)) with z = x/C, q the canaries' Poisson rate, and
    c_t, s_t the median and MAD-scale of step t's z over all canaries — label-free, so any threshold
    on the scores stays valid for the one-run game. Higher = more likely included."""
    x = np.asarray(projections, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"projections: must have shape (steps >= 1, canaries), got {x.shape}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm: must be > 0, got {clip_norm!r}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate: must be in (0, 1], got {sample_rate!r}")
    z = x / clip_norm
    c = np.median(z, axis=1, keepdims=True)
    s = np.maximum(1.4826 * np.median(np.abs(z - c), axis=1, keepdims=True), 1e-6)
    a = (z - c - 0.5) / s**2
    if sample_rate >= 1.0:
        return a.sum(axis=0)
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + a).sum(axis=0)
