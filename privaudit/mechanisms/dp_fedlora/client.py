"""One client's round: local training from the global state, then the release the server sees.

* ``paper``: ordinary local training, then every trainable tensor (LoRA A, B, a head) is clipped by
  Frobenius norm to its bound and N(0, (z·C_t)²) is added entry-wise; released as absolute values.
* ``client_dp``: ordinary local training; the update (local − global, all trainable tensors jointly)
  is clipped to C and N(0, (z·C)²) is added; released as a delta.
* ``record_dp``: DP-SGD (:class:`privaudit.mechanisms.dp_lora.DPLoraTrainer`, Poisson q = B/|D_i|)
  for the local steps; the result is released as is (absolute values).

Every random draw (local batches, DP-SGD sampling and noise, release noise) comes from a stream
named by (round, client, purpose) under the run's secret (:class:`RunSecret`): by default a substream
(:func:`privaudit.mechanisms.rng.derive`, HKDF-SHA256 → AES-256-CTR) of one master
:class:`~privaudit.mechanisms.rng.SecureGenerator` keyed from ``os.urandom``; with
``privacy.noise_seed`` torch's / numpy's generators seeded by (seed, round, client, purpose) —
reproducible, NOT secure. Either way the streams are deterministic in the run's secret, independent
across clients and rounds, and the in-process loop and Flower give the same releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from privaudit.config import PrivacyPlan, RunConfig
from privaudit.data import Record
from privaudit.mechanisms import rng
from privaudit.mechanisms.dp_fedlora.plan import FedLoraOptions, FedLoraPlan, TensorSpec

# purposes of the per-(round, client) streams (also the seeded path's derivation tags: unchanged)
RELEASE, LOCAL, DP_SGD, SCHEDULE = 0x52454C, 0x4C4F43, 0x445053, 0x534543


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends: ``tensors`` (``kind`` = ``absolute`` values or a ``delta`` from the global
    state), its number of records (public metadata, used by sample-weighted aggregation)."""

    client: int
    round: int
    kind: Literal["absolute", "delta"]
    tensors: dict[str, torch.Tensor]
    n_records: int
    local_loss: float


def derived_seed(secret: int, *parts: int) -> int:
    words = np.random.SeedSequence([int(secret) & (2**128 - 1), *[int(p) for p in parts]]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


@dataclass(frozen=True)
class RunSecret:
    """A federated run's secret randomness: ``master`` (a :class:`~privaudit.mechanisms.rng.
    SecureGenerator`; the default, secure) or ``seed`` (``privacy.noise_seed``: reproducible, NOT
    secure). Streams are named by integers, e.g. ``(round, client, RELEASE)``; the master is never read
    itself, only its substreams (:func:`privaudit.mechanisms.rng.derive`)."""

    master: rng.SecureGenerator | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.master is None) == (self.seed is None):
            raise ValueError("RunSecret: give exactly one of a master generator and a seed")

    @classmethod
    def for_run(cls, noise_seed: int | None) -> RunSecret:
        """Seeded from ``privacy.noise_seed`` if set, else a fresh master key from ``os.urandom``."""
        return cls(seed=int(noise_seed)) if noise_seed is not None else cls(master=rng.SecureGenerator())

    @property
    def secure(self) -> bool:
        return self.master is not None

    def noise(self, *parts: int) -> rng.SecureGenerator | torch.Generator:
        """A Gaussian-noise stream (draw with :func:`privaudit.mechanisms.rng.randn`)."""
        if self.master is not None:
            return rng.derive(self.master, *parts)
        return torch.Generator().manual_seed(derived_seed(self.seed, *parts))  # type: ignore[arg-type]

    def sampling(self, *parts: int) -> rng.SecureGenerator | np.random.Generator:
        """A sampling stream (``random``, ``permutation``, ``choice`` without replacement)."""
        if self.master is not None:
            return rng.derive(self.master, *parts)
        return np.random.default_rng(derived_seed(self.seed, *parts))  # type: ignore[arg-type]

    def dp_sgd(self, *parts: int) -> dict[str, Any]:
        """Keyword arguments for :class:`~privaudit.mechanisms.dp_lora.DPLoraTrainer` whose noise and
        sampling are stream ``parts``."""
        if self.master is not None:
            return {"secret_stream": rng.derive(self.master, *parts)}
        return {"secret_seed": derived_seed(self.seed, *parts)}  # type: ignore[arg-type]


def set_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    from privaudit.models import load_trainable_state_dict

    load_trainable_state_dict(model, state)


class ClientRuntime:
    """Trains clients on one model object (in-process, or inside one Flower ClientApp worker)."""

    def __init__(self, cfg: RunConfig, opts: FedLoraOptions, plan: FedLoraPlan, records: Sequence[Record],
                 partition: Sequence[Sequence[int]], secret: RunSecret, num_labels: int) -> None:
        self.cfg, self.opts, self.plan = cfg, opts, plan
        self.records = list(records)
        self.partition = [list(p) for p in partition]
        self.secret = secret
        self.num_labels = num_labels
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        # the clients' own DP-SGD runs no gradient canaries and uses the client's records only
        self.local_cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"gradient_canaries": 0})})

    def attach(self, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def ensure_model(self) -> None:
        if self.model is None:
            from privaudit.mechanisms.training import build_model
            from privaudit.models import resolve_device

            device = resolve_device(self.cfg.model.device)
            model, tok = build_model(self.cfg, self.num_labels, device)
            self.attach(model, tok, device)

    # ------------------------------------------------------------------------------------------
    def train(self, client: int, rnd: int, global_state: Mapping[str, torch.Tensor]) -> ClientUpdate:
        from privaudit.mechanisms.training import trainable_parameters

        self.ensure_model()
        assert self.model is not None
        set_state(self.model, global_state)
        recs = [self.records[i] for i in self.partition[client]]
        names = [n for n, _ in trainable_parameters(self.model)]
        start = {n: global_state[n].detach().to("cpu", torch.float32) for n in names}
        if self.plan.mode == "record_dp":
            loss = self._dp_sgd(recs, client, rnd)
        else:
            loss = self._local_sgd(recs, client, rnd)
        local = {n: p.detach().to("cpu", torch.float32).clone() for n, p in trainable_parameters(self.model)}
        gen = self.secret.noise(rnd, client, RELEASE)
        if self.plan.mode == "paper":
            out = {n: paper_release(t, self.plan.clips[TensorSpec(n, ()).group], self.plan.noise_multiplier, gen)
                   for n, t in local.items()}
            return ClientUpdate(client, rnd, "absolute", out, len(recs), loss)
        if self.plan.mode == "client_dp":
            delta = {n: local[n] - start[n] for n in names}
            return ClientUpdate(client, rnd, "delta", joint_clip_and_noise(delta, self.plan.clip_norm,
                                                                           self.plan.noise_multiplier, gen),
                                len(recs), loss)
        return ClientUpdate(client, rnd, "absolute", local, len(recs), loss)

    def _local_sgd(self, recs: Sequence[Record], client: int, rnd: int) -> float:
        """Ordinary (non-private) local training: ``training.steps`` steps of shuffled batches."""
        from privaudit.mechanisms.training import encode, make_optimizer, per_sample_losses, trainable_parameters

        assert self.model is not None
        params = [p for _, p in trainable_parameters(self.model)]
        opt = make_optimizer(params, self.cfg)
        order_rng = self.secret.sampling(rnd, client, LOCAL)
        b = min(int(self.cfg.training.batch_size or 1), len(recs))
        self.model.train()
        losses: list[float] = []
        order = order_rng.permutation(len(recs))
        pos = 0
        for _ in range(int(self.cfg.training.steps or 0)):
            if pos + b > len(order):
                order, pos = order_rng.permutation(len(recs)), 0
            batch = encode(self.tokenizer, [recs[int(i)] for i in order[pos:pos + b]], self.cfg, self.device)
            pos += b
            loss = per_sample_losses(self.model, batch, self.cfg.task).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else math.nan

    def _dp_sgd(self, recs: Sequence[Record], client: int, rnd: int) -> float:
        """DP-SGD inside the client with ``dp_lora``'s trainer (no ledger: the server's envelope
        accounts every client's steps)."""
        from privaudit.mechanisms.dp_lora import DPLoraTrainer

        assert self.model is not None
        q = min(1.0, float(self.cfg.training.batch_size) / len(recs))  # type: ignore[arg-type]
        plan = PrivacyPlan(self.plan.noise_multiplier, q, int(self.cfg.training.steps or 0), "poisson", None,
                           len(recs), self.plan.clip_norm, self.plan.delta, self.plan.neighbouring)
        trainer = DPLoraTrainer(self.local_cfg, recs, plan, self.model, self.tokenizer, self.device, ledger=None,
                                **self.secret.dp_sgd(rnd, client, DP_SGD))
        try:
            while trainer.step_count < plan.steps:
                trainer.step()
        finally:
            trainer.close()
        return math.nan


def paper_release(t: torch.Tensor, clip: float, z: float, gen: rng.SecureGenerator | torch.Generator
                  ) -> torch.Tensor:
    """t·min(1, C/‖t‖_F) + N(0, (z·C)²) entry-wise (noise from ``gen``, either kind: :func:`rng.randn`)."""
    norm = float(t.norm())
    out = t * min(1.0, clip / norm) if norm > 0 else t.clone()
    return out + rng.randn(t.shape, generator=gen, dtype=t.dtype) * (z * clip)


def joint_clip_and_noise(delta: Mapping[str, torch.Tensor], clip: float, z: float,
                         gen: rng.SecureGenerator | torch.Generator) -> dict[str, torch.Tensor]:
    """Clip the concatenation of all tensors to L2 norm C, then add N(0, (z·C)²) entry-wise (noise from
    ``gen``, either kind, tensors in ``delta``'s order)."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))
    f = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: v * f + rng.randn(v.shape, generator=gen, dtype=v.dtype) * (z * clip) for n, v in delta.items()}
