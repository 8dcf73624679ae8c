"""``he_lora``: LoRA fine-tuning whose base linear layers run on a worker under homomorphic encryption.

Protocol (HE-LoRA, Frery et al., arXiv 2505.07329). The data owner runs embeddings, norms, attention,
non-linearities, the LoRA branches and the loss in the clear. Every frozen base linear layer
(``nn.Linear`` / GPT-2 ``Conv1D``) is replaced by a :class:`RemoteLinear`: its forward product x·Wᵀ
and its backward product grad·W (the input gradient; the base weight's gradient is never needed) go
to the worker: dynamic per-token quantization of the input to ``n_bits``, encryption, the worker's
product with per-channel quantized clear weights, decryption and dequantization by the owner
(:mod:`.he_backend`). LoRA factors and trainable heads stay local and are trained locally. By default
the LM head stays local too (it is tied to the embeddings the owner already holds); the bias of a
remote layer is added locally.

Modes: ``execute`` (real encryption, GLWE backend, in-process or loopback worker), ``simulate`` (the
same quantized integers multiplied without encryption, in-process only) and ``clear`` (float
products, the reference).

Privacy against the worker (``observer = "worker"``). The worker sees ciphertexts, shapes, layer
order and timing. Each training step is one :class:`~privaudit.ledger.events.EncryptedEvent` (bytes
of the step's products each way, predicted exactly and appended before the step; a mismatch with the
counted bytes appends a correction). Shapes are data-independent only with fixed-size batches padded
to ``model.max_length`` (the default); otherwise (Poisson batch sizes, or padding to the longest
record) a ``PlaintextEvent`` records that batch shapes reach the worker — no formal guarantee.
Against whoever receives the released adapter there is no guarantee unless DP noise is enabled
(``privacy.noise_multiplier > 0``): then dp_lora's per-sample clipping and Gaussian noise run on the
owner's side and its Gaussian events are appended too. Timing side channels are not accounted.

Randomness on the owner's side (:mod:`privaudit.mechanisms.rng`): batch sampling and the DP noise come
from the CSPRNG (AES-256-CTR keyed from ``os.urandom``) unless ``privacy.noise_seed`` is set (seeded:
reproducible, ``noise_secure: false`` in the ledger header). Out of scope here: the randomness of the
encryption itself (GLWE key generation and encryption noise), which the HE library draws from its own
generator; dropout, if the model has any, uses torch's global generator (it is no DP noise).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from privaudit.config import PrivacyPlan, RunConfig, parse_options
from privaudit.data import Record
from privaudit.ledger.events import EncryptedEvent, Event, PlaintextEvent
from privaudit.mechanisms.he_lora.backend import (
    ClientSession,
    HEBackend,
    QuantizedWeight,
    check_accumulator,
    dequantize_product,
    get_backend,
    quantize_channels,
    quantize_rows,
)
from privaudit.mechanisms.he_lora.worker import (
    InProcessTransport,
    Message,
    SocketTransport,
    Transport,
    WorkerClient,
    parse_worker_address,
)

NAME = "he_lora"
OBSERVER = "worker"
Mode = Literal["execute", "simulate", "clear"]
MODES: tuple[str, ...] = ("execute", "simulate", "clear")
SHAPES_LEAK = "batch shapes (rows per exchange: batch size x padded length) visible to the worker"
# the fail-closed marker of a non-private run: whoever receives the adapter gets it without DP noise
RELEASED_WITHOUT_NOISE = "the trained adapter, released without DP noise (no guarantee for the released model)"
WORKER_STATEMENT = "no information beyond shapes, sequence lengths and timing"
RESUMABLE = False  # keys and the worker session are not checkpointed: privaudit.runs refuses resume
AUDIT_RELEASED_MODEL = True  # the auditor also attacks the released adapter (membership, canaries)


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
class HESettings(BaseModel):
    """HE-LoRA settings (``options`` of a run config).

    ``mode``: execute / simulate / clear. ``n_bits``: bits of the quantized inputs and weights (the
    accumulator needs 2·n_bits + log2(k) ≤ the scheme's reserved bits, 27). ``backend``: for execute,
    ``glwe``. ``worker``: ``"127.0.0.1:PORT"`` of a running ``privaudit he-worker``, or None for an
    in-process worker. ``remote_lm_head``: send the (embedding-tied) LM head too. ``pad_to_max_length``:
    pad every batch to ``model.max_length`` tokens so that shapes do not depend on the data.
    ``eval_mode``: how held-out evaluation runs (locally: ``simulate`` or ``clear``; nothing is sent).
    ``keep_transcript``: keep every byte sent (memory grows with the run).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "simulate"
    n_bits: int = Field(8, ge=2, le=16)
    backend: Literal["glwe"] = "glwe"
    worker: str | None = None
    remote_lm_head: bool = False
    pad_to_max_length: bool = True
    eval_mode: Literal["simulate", "clear"] = "simulate"
    keep_transcript: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "HESettings":
        s = parse_options(cls, options)
        if s.worker is not None:
            try:
                parse_worker_address(s.worker)
            except ValueError as exc:
                raise ValueError(f"options.{exc}") from None
            if s.mode != "execute":
                raise ValueError(f"options.worker: mode {s.mode!r} computes locally; a worker needs mode 'execute'")
        return s


# ----------------------------------------------------------------------------------------------
# the remote layer
# ----------------------------------------------------------------------------------------------
class _RemoteProduct(torch.autograd.Function):
    """y = x·Wᵀ on the worker; backward: grad_x = grad_y·W on the worker (only when x needs it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, engine: "HEEngine", layer: int) -> torch.Tensor:  # type: ignore[override]
        ctx.engine, ctx.layer = engine, layer
        return engine.product(layer, "forward", x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return ctx.engine.product(ctx.layer, "backward", grad), None, None


class RemoteLinear(nn.Module):
    """Stands in for a frozen base ``nn.Linear`` / ``Conv1D``: same parameter names (``weight``,
    ``bias``: the original tensors), products computed through the :class:`HEEngine`."""

    def __init__(self, original: nn.Module, engine: "HEEngine", layer: int, name: str) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self._original = [original]  # a list: not registered as a submodule
        self.weight = original.weight
        self.bias = original.bias
        self.fan_in_fan_out = isinstance(original, Conv1D)
        w = original.weight
        self.in_features = int(w.shape[0] if self.fan_in_fan_out else w.shape[1])
        self.out_features = int(w.shape[1] if self.fan_in_fan_out else w.shape[0])
        self._engine = engine
        self.layer = layer
        self.layer_name = name

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def weight_out_in(self) -> torch.Tensor:
        """The weight as (out, in)."""
        w = self.weight.detach()
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _RemoteProduct.apply(x.reshape(-1, self.in_features), self._engine, self.layer)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layer={self.layer}, name={self.layer_name}"


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) in (nn.Linear, Conv1D)


def remote_candidates(model: nn.Module, remote_lm_head: bool = False) -> list[tuple[str, nn.Module]]:
    """Frozen base linear layers to send to the worker: ``nn.Linear``/``Conv1D`` whose parameters are
    all frozen, outside LoRA factors, and (unless ``remote_lm_head``) not sharing an embedding's
    weight (the tied LM head)."""
    embeds = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, m in model.named_modules():
        if not _is_linear(m) or isinstance(m, RemoteLinear):
            continue
        parts = name.split(".")
        if any(p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for p in parts):
            continue
        if any(p.requires_grad for p in m.parameters()):
            continue
        if not remote_lm_head and m.weight.data_ptr() in embeds:
            continue
        out.append((name, m))
    return out


# ----------------------------------------------------------------------------------------------
# the engine: quantize, send, decrypt
# ----------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: RemoteLinear
    forward: QuantizedWeight | None = None
    backward: QuantizedWeight | None = None


@dataclass(frozen=True)
class StepBytes:
    """Bytes and exchanges of one step's products (both directions)."""

    to_worker: int
    from_worker: int
    exchanges: int


class HEEngine:
    """Owns the remote layers of one model and computes their products in ``mode``.

    ``execute`` needs ``transport`` (or builds an in-process worker); ``simulate`` always uses an
    in-process worker with the plaintext backend; ``clear`` uses no worker.
    """

    def __init__(self, mode: Mode, n_bits: int = 8, *, backend: HEBackend | None = None,
                 transport: Transport | None = None, keep_payloads: bool = False,
                 keys: ClientSession | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
        self.mode: Mode = mode
        self.n_bits = int(n_bits)
        if mode == "simulate":
            if transport is not None and transport.remote:
                raise ValueError("mode: 'simulate' sends unencrypted values and may not use a remote worker")
            backend = get_backend("simulate")
        elif mode == "execute" and backend is None:
            backend = get_backend("glwe")
        self.backend = backend
        self.transport = transport
        self.keep_payloads = keep_payloads
        self.keys = keys
        self.layers: list[_Layer] = []
        self.client: WorkerClient | None = None
        self._recording: list[tuple[int, int]] | None = None
        self.local_mode: Mode | None = None  # temporary override (evaluation, planning)
        self.seconds = 0.0

    # -- setup --------------------------------------------------------------------------------
    def register(self, name: str, module: RemoteLinear) -> None:
        layer = _Layer(name, module)
        if self.backend is not None:
            w = module.weight_out_in().to(torch.float64).cpu().numpy()  # (out, in)
            reserved = self.backend.reserved_bits
            check_accumulator(self.n_bits, module.in_features, reserved, f"{name} (forward, k={module.in_features})")
            check_accumulator(self.n_bits, module.out_features, reserved,
                              f"{name} (backward, k={module.out_features})")
            layer.forward = quantize_channels(w.T, self.n_bits)   # (in, out): per output channel
            layer.backward = quantize_channels(w, self.n_bits)    # (out, in): per input channel
        self.layers.append(layer)

    def start(self) -> tuple[int, int]:
        """Connect to the worker (keygen here, evaluation key sent once) and load the quantized
        weights; returns the setup bytes (to, from). No-op in clear mode."""
        if self.backend is None:
            return 0, 0
        transport = self.transport if self.transport is not None else InProcessTransport(allow_plaintext=True)
        self.client = WorkerClient(self.backend, transport, keep_payloads=self.keep_payloads, keys=self.keys)
        self.client.connect()
        for i, layer in enumerate(self.layers):
            assert layer.forward is not None and layer.backward is not None
            self.client.load_weight(2 * i, layer.forward.values, self.n_bits)
            self.client.load_weight(2 * i + 1, layer.backward.values, self.n_bits)
        return self.client.totals()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    # -- products -----------------------------------------------------------------------------
    def product(self, layer: int, direction: str, t: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ (``forward``) or g·W (``backward``) of remote layer ``layer`` for 2-d ``t``."""
        start = time.perf_counter()
        mode = self.local_mode or self.mode
        lay = self.layers[layer]
        if self._recording is not None:
            self._recording.append((2 * layer + (direction == "backward"), int(t.shape[0])))
        if mode == "clear" or self._recording is not None:
            w = lay.module.weight_out_in().to(t.dtype)
            out = t @ w.t() if direction == "forward" else t @ w
        else:
            qw = lay.forward if direction == "forward" else lay.backward
            assert qw is not None
            x = t.detach().to(torch.float64).cpu().numpy()
            rows = quantize_rows(x, self.n_bits)
            if mode == "simulate" and self.mode == "execute":  # local evaluation of an execute run
                from privaudit.mechanisms.he_lora.backend import integer_product

                acc = integer_product(rows.values, qw.values)
            else:
                if self.client is None:
                    raise RuntimeError("he_lora: the engine was not started")
                acc = self.client.matmul(2 * layer + (direction == "backward"), rows.values)
            out = torch.from_numpy(dequantize_product(acc, rows, qw)).to(dtype=t.dtype, device=t.device)
        self.seconds += time.perf_counter() - start
        return out

    @contextlib.contextmanager
    def locally(self, mode: Literal["simulate", "clear"]):  # type: ignore[no-untyped-def]
        """Compute in ``mode`` on the owner's side (nothing is sent) inside the block."""
        if mode == "simulate" and self.backend is None:
            raise ValueError("eval_mode: 'simulate' needs quantized weights (mode simulate or execute)")
        old, self.local_mode = self.local_mode, mode
        try:
            yield
        finally:
            self.local_mode = old

    # -- planning -----------------------------------------------------------------------------
    def record_exchanges(self, run: Callable[[], None]) -> list[tuple[int, int]]:
        """(weight id, rows) of every product ``run`` would send, computed in clear (nothing is sent;
        torch's RNG state is restored)."""
        self._recording = []
        try:
            with torch.random.fork_rng(devices=[]):
                run()
            return self._recording
        finally:
            self._recording = None

    def exchange_bytes(self, exchanges: Sequence[tuple[int, int]]) -> StepBytes:
        if self.client is None:
            return StepBytes(0, 0, 0)
        to = back = 0
        for wid, rows in exchanges:
            a, b = self.client.matmul_nbytes(wid, rows)
            to += a
            back += b
        return StepBytes(to, back, len(exchanges))

    def matmul_totals(self) -> tuple[int, int, int]:
        """(bytes to, bytes from, count) of all MATMUL exchanges so far."""
        if self.client is None:
            return 0, 0, 0
        recs = [r for r in self.client.transcript if r.type == "MATMUL"]
        return sum(r.bytes_to_worker for r in recs), sum(r.bytes_from_worker for r in recs), len(recs)

    def worker_view(self) -> list[Message]:
        """What the worker saw (see :meth:`WorkerClient.worker_view`)."""
        return [] if self.client is None else self.client.worker_view()


def install(model: nn.Module, engine: HEEngine, remote_lm_head: bool = False) -> list[RemoteLinear]:
    """Replace the model's frozen base linear layers by :class:`RemoteLinear` modules (in place)."""
    installed = []
    for name, module in remote_candidates(model, remote_lm_head):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        remote = RemoteLinear(module, engine, len(engine.layers), name)
        engine.register(name, remote)
        setattr(parent, child, remote)
        installed.append(remote)
    if not installed:
        raise ValueError("model: no frozen base linear layer to send to the worker")
    return installed


def uninstall(model: nn.Module) -> None:
    """Put the original modules back (parameters are shared, so nothing else changes)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RemoteLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.original)


# ----------------------------------------------------------------------------------------------
# session: engine + ledger bookkeeping for a training run
# ----------------------------------------------------------------------------------------------
class HELoraSession:
    """A model with remote layers, its worker connection and the per-step ledger events."""

    def __init__(self, model: nn.Module, settings: HESettings, *, transport: Transport | None = None,
                 ledger: Any = None, backend: HEBackend | None = None) -> None:
        self.model, self.settings, self.ledger = model, settings, ledger
        if transport is None and settings.worker is not None:
            transport = SocketTransport(parse_worker_address(settings.worker))
        if settings.mode == "execute" and backend is None:
            backend = get_backend(settings.backend)
        elif settings.mode != "execute":
            backend = None
        self.engine = HEEngine(settings.mode, settings.n_bits, backend=backend, transport=transport,
                               keep_payloads=settings.keep_transcript)
        self.remote = install(model, self.engine, settings.remote_lm_head)
        self._plans: dict[Any, list[tuple[int, int]]] = {}
        self.setup_bytes = (0, 0)
        self.steps = 0
        self.corrections = 0
        try:
            self.setup_bytes = self.engine.start()
        except BaseException:
            uninstall(model)
            self.engine.close()
            raise

    @property
    def records_events(self) -> bool:
        return self.settings.mode == "execute"

    def step_event(self, sb: StepBytes) -> Event:
        """The ledger event of a step's products (a plaintext event for an unencrypted backend)."""
        backend = self.engine.backend
        assert backend is not None
        if not backend.encrypted:
            return PlaintextEvent(what=f"quantized activations and gradients ({backend.name} backend, unencrypted)",
                                  shape=[sb.exchanges])
        params = {"n_bits": self.settings.n_bits, "exchanges_per_step": sb.exchanges,
                  "backend": backend.name, **backend.parameters()}
        return EncryptedEvent(scheme=backend.scheme, parameters=params, security_bits=backend.security_bits,
                              bytes_to_server=sb.to_worker, bytes_from_server=sb.from_worker)

    def plan_step(self, shapes: Sequence[Any], dry_run: Callable[[Any], None]) -> StepBytes:
        """Bytes of a step made of chunks with keys ``shapes``; ``dry_run(key)`` runs one chunk's
        forward and backward (its products are computed in clear and recorded, nothing is sent)."""
        exchanges: list[tuple[int, int]] = []
        for key in shapes:
            if key not in self._plans:
                self._plans[key] = self.engine.record_exchanges(lambda: dry_run(key))
            exchanges.extend(self._plans[key])
        return self.engine.exchange_bytes(exchanges)

    @contextlib.contextmanager
    def step(self, planned: StepBytes | None):  # type: ignore[no-untyped-def]
        """Append the step's event (write-ahead) before the block, check the counted bytes after."""
        if not self.records_events or planned is None:
            yield
            self.steps += 1
            return
        before = self.engine.matmul_totals()
        if self.ledger is not None and planned.exchanges:
            self.ledger.append(self.step_event(planned))
        yield
        after = self.engine.matmul_totals()
        actual = StepBytes(after[0] - before[0], after[1] - before[1], after[2] - before[2])
        self.steps += 1
        if (actual.to_worker > planned.to_worker or actual.from_worker > planned.from_worker
                or actual.exchanges > planned.exchanges):
            self.corrections += 1
            extra = StepBytes(max(0, actual.to_worker - planned.to_worker),
                              max(0, actual.from_worker - planned.from_worker),
                              max(0, actual.exchanges - planned.exchanges))
            warnings.warn(f"he_lora: step sent more than predicted ({actual} > {planned}); recorded a correction",
                          RuntimeWarning, stacklevel=2)
            if self.ledger is not None:
                ev = self.step_event(extra)
                if isinstance(ev, EncryptedEvent):
                    ev = ev.model_copy(update={"parameters": {**ev.parameters, "correction": True}})
                self.ledger.append(ev)

    def metrics(self) -> dict[str, Any]:
        to, back, count = self.engine.matmul_totals()
        backend = self.engine.backend
        return {
            "mode": self.settings.mode,
            "backend": None if backend is None else backend.name,
            "scheme": None if backend is None else backend.scheme,
            "security_bits": None if backend is None else backend.security_bits,
            "n_bits": self.settings.n_bits,
            "remote_layers": [r.layer_name for r in self.remote],
            "setup_bytes_to_worker": self.setup_bytes[0],
            "setup_bytes_from_worker": self.setup_bytes[1],
            "bytes_to_worker": to,
            "bytes_from_worker": back,
            "exchanges": count,
            "steps": self.steps,
            "byte_corrections": self.corrections,
            "product_seconds": self.engine.seconds,
        }

    def worker_view(self) -> list[Message]:
        return self.engine.worker_view()

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            uninstall(self.model)


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------
def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a tokenized batch to ``length`` tokens (pads: attention 0, LM labels -100)."""
    ids = batch["input_ids"]
    extra = length - ids.shape[1]
    if extra <= 0:
        return batch
    out = dict(batch)
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in batch:
            t = batch[key]
            out[key] = torch.cat([t, t.new_full((t.shape[0], extra), value)], dim=1)
    if "labels" in batch and batch["labels"].dim() == 2:
        lab = batch["labels"]
        out["labels"] = torch.cat([lab, lab.new_full((lab.shape[0], extra), -100)], dim=1)
    return out


def shapes_leak(cfg: RunConfig, settings: HESettings) -> bool:
    """Whether the worker can see data-dependent shapes (Poisson batch sizes or unpadded lengths)."""
    return cfg.training.sampling == "poisson" or not settings.pad_to_max_length


def _encode(tokenizer: Any, records: Sequence[Record], cfg: RunConfig, settings: HESettings,
            device: torch.device) -> dict[str, torch.Tensor]:
    from privaudit.mechanisms.training import encode

    batch = encode(tokenizer, records, cfg, device)
    if settings.pad_to_max_length:
        batch = pad_batch(batch, cfg.model.max_length, int(tokenizer.pad_token_id))
    return batch


# ----------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------
class _PlainTrainer:
    """Non-private HE-LoRA: mean loss over the batch, optimizer step (no clipping, no noise). ``seed``:
    the sampler's (None: a CSPRNG)."""

    def __init__(self, cfg: RunConfig, records: Sequence[Record], plan: PrivacyPlan, model: nn.Module,
                 tokenizer: Any, device: torch.device, session: HELoraSession, seed: int | None) -> None:
        from privaudit.mechanisms.sampling import make_sampler
        from privaudit.mechanisms.training import make_optimizer, trainable_parameters

        self.cfg, self.plan, self.model, self.tok, self.device = cfg, plan, model, tokenizer, device
        self.records = list(records)
        self.session = session
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("lora: the model has no trainable parameters")
        self.optimizer = make_optimizer([p for _, p in self.params], cfg)
        self.sampler = make_sampler(plan.sampling, len(self.records), sample_rate=plan.sample_rate,
                                    batch_size=plan.batch_size, seed=seed)
        self.step_count = 0
        self.losses: list[float] = []

    def _chunks(self, indices: np.ndarray) -> list[dict[str, torch.Tensor]]:
        size = self.cfg.training.physical_batch_size
        return [_encode(self.tok, [self.records[int(i)] for i in indices[s:s + size]], self.cfg,
                        self.session.settings, self.device) for s in range(0, len(indices), size)]

    def _chunk_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from privaudit.mechanisms.training import per_sample_losses

        return per_sample_losses(self.model, batch, self.cfg.task).sum()

    def step(self) -> dict[str, Any]:
        indices = self.sampler.next_batch()
        chunks = self._chunks(indices)
        planned = None
        if self.session.records_events:
            keys = [tuple(c["input_ids"].shape) for c in chunks]
            by_key = {tuple(c["input_ids"].shape): c for c in chunks}

            def dry(key: Any) -> None:
                self._chunk_loss(by_key[key]).backward()
                self.model.zero_grad(set_to_none=True)

            planned = self.session.plan_step(keys, dry)
        self.model.train()
        total = 0.0
        with self.session.step(planned):
            for batch in chunks:
                loss = self._chunk_loss(batch) / max(len(indices), 1)
                loss.backward()
                total += float(loss.detach())
        if len(indices):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.losses.append(total)
        return {"batch_size": len(indices), "loss": total}


def _dp_trainer_class() -> type:
    from privaudit.mechanisms.dp_lora import DPLoraTrainer
    from privaudit.mechanisms.training import per_sample_losses

    class _DPTrainer(DPLoraTrainer):  # type: ignore[misc, valid-type]
        """dp_lora's clipping + noise, with padded batches and the step's encrypted event first."""

        session: HELoraSession

        def clipped_sum(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
            total = {n: torch.zeros_like(p) for n, p in self.params}
            size = self.cfg.training.physical_batch_size
            chunks = [_encode(self.tokenizer, [self.records[int(i)] for i in indices[s:s + size]], self.cfg,
                              self.session.settings, self.device) for s in range(0, len(indices), size)]
            planned = None
            if self.session.records_events:
                by_key = {tuple(c["input_ids"].shape): c for c in chunks}

                def dry(key: Any) -> None:
                    self.psg.enabled = False
                    try:
                        per_sample_losses(self.model, by_key[key], self.cfg.task).sum().backward()
                    finally:
                        self.psg.enabled = True
                        self.model.zero_grad(set_to_none=True)
                        self.psg.reset()

                planned = self.session.plan_step([tuple(c["input_ids"].shape) for c in chunks], dry)
            self.model.train()
            with self.session.step(planned):
                for batch in chunks:
                    self.psg.reset()
                    per_sample_losses(self.model, batch, self.cfg.task).sum().backward()
                    out = self.psg.clip(self.plan.clip_norm)
                    for n in total:
                        total[n] += out.grads[n]
                    self.model.zero_grad(set_to_none=True)
                    self.psg.reset()
            return total, len(indices)

    return _DPTrainer


# ----------------------------------------------------------------------------------------------
# mechanism interface
# ----------------------------------------------------------------------------------------------
def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """The ε-relevant events of a finished run (encrypted events contribute nothing and their
    byte counts are only known at run time; one placeholder stands for them)."""
    settings = HESettings.from_options(cfg.options)
    events: list[Event] = []
    if plan.steps <= 0:
        return events
    if settings.mode == "execute" and shapes_leak(cfg, settings):
        events.append(PlaintextEvent(what=SHAPES_LEAK))
    if plan.private:
        from privaudit.mechanisms.dp_lora import step_event

        events.append(step_event(plan).with_count(plan.steps))
    else:
        events.append(PlaintextEvent(what=RELEASED_WITHOUT_NOISE))
    if settings.mode == "execute":
        from privaudit.mechanisms.he_lora.backend import GLWE_SCHEME, GLWE_SECURITY_BITS

        events.append(EncryptedEvent(scheme=GLWE_SCHEME, security_bits=GLWE_SECURITY_BITS,
                                     parameters={"note": "bytes per step are recorded at run time"},
                                     count=plan.steps))
    return events


def adapter_guarantee(plan: PrivacyPlan) -> str:
    """What protects the released adapter (for the manifest)."""
    if plan.private:
        return ("the released adapter carries the DP-SGD guarantee of its Gaussian events (dp_lora clipping "
                "and noise on the owner's side), against anyone who receives it")
    return ("the released adapter carries no DP guarantee: encryption protects the exchanges from the "
            "worker only; enable privacy.noise_multiplier > 0 for DP on the adapter")


def privacy_section(ledger: Any, plan: PrivacyPlan, cfg: RunConfig, metrics: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The manifest's privacy section (hook of :mod:`privaudit.runs`): the accountants' ε of the ledger
    (fail-closed: ∞ without owner-side DP, through the :data:`RELEASED_WITHOUT_NOISE` marker; the DP-SGD
    ε of the Gaussian events with it), plus two separate parts:

    * ``against_worker``: encrypted exchanges only → "no information beyond shapes, sequence lengths
      and timing" (unless a plaintext shape release was recorded), with the encrypted events, bytes
      each way, scheme and security bits;
    * ``released_model``: ``{"guarantee": "none", "reason": ...}`` without DP noise, else the DP-SGD ε
      of the Gaussian events (``{"guarantee": "dp", "epsilon": {...}}``)."""
    from privaudit.accounting.summary import epsilon_section
    from privaudit.ledger.events import EncryptedEvent, GaussianEvent

    events = list(ledger.events)
    section = epsilon_section(ledger, plan.delta)
    enc = [e for e in events if isinstance(e, EncryptedEvent)]
    shapes = [e for e in events if isinstance(e, PlaintextEvent) and e.what == SHAPES_LEAK]
    other_plain = [e.what for e in events if isinstance(e, PlaintextEvent)
                   and e.what not in (SHAPES_LEAK, RELEASED_WITHOUT_NOISE)]
    settings = HESettings.from_options(cfg.options)
    he = (metrics or {}).get("he") or {}
    if settings.mode == "execute":
        statement = WORKER_STATEMENT if not (shapes or other_plain) else (
            "no formal guarantee: " + "; ".join(([SHAPES_LEAK] if shapes else []) + other_plain))
    elif settings.mode == "simulate":
        statement = ("simulate mode: nothing left the owner's machine (the products were computed locally on "
                     f"the quantized values); an execute run with these settings gives the worker {WORKER_STATEMENT}")
    else:
        statement = "clear mode: no worker (float products computed locally)"
    section["against_worker"] = {
        "observer": OBSERVER, "mode": settings.mode, "statement": statement,
        "guarantee": "encrypted" if settings.mode == "execute" and not (shapes or other_plain) else
        ("none" if settings.mode == "execute" else "nothing sent"),
        "encrypted_events": sum(e.count for e in enc),
        "scheme": enc[0].scheme if enc else he.get("scheme"),
        "security_bits": min((e.security_bits for e in enc), default=he.get("security_bits")),
        "bytes_to_worker": sum(e.bytes_to_server * e.count for e in enc),
        "bytes_from_worker": sum(e.bytes_from_server * e.count for e in enc),
        "setup_bytes_to_worker": he.get("setup_bytes_to_worker"),
        "shapes_visible": bool(shapes), "timing": "not accounted (a side channel)",
    }
    if plan.private and any(isinstance(e, GaussianEvent) for e in events):
        section["released_model"] = {"guarantee": "dp", "epsilon": dict(section.get("epsilon", {})),
                                     "delta": plan.delta, "reason": adapter_guarantee(plan)}
    else:
        section["released_model"] = {"guarantee": "none",
                                     "reason": "the adapter is released without DP noise"}
    return section


def ledger_header_extra(cfg: RunConfig) -> dict[str, Any]:
    """Ledger-header fields of an HE-LoRA run: what the released adapter's guarantee rests on (the
    ledger's observer is the worker; the released model is a second observer)."""
    settings = HESettings.from_options(cfg.options)
    private = float(cfg.privacy.noise_multiplier or 0.0) > 0 or cfg.privacy.target_epsilon is not None
    return {"he_lora": {"mode": settings.mode, "n_bits": settings.n_bits,
                        "released_model": "dp (gaussian events)" if private else
                        "none: the adapter is released without DP noise"}}


def fit(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record], *,
        ledger: Any = None, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
        num_labels: int | None = None, plan: PrivacyPlan | None = None, checkpointer: Any = None,
        resume: bool = False, transport: Transport | None = None,
        transcript_path: str | Path | None = None, _backend: HEBackend | None = None) -> Any:
    """Train LoRA with the base linear layers on a worker (see the module docstring).

    ``ledger`` (if given; header observer ``worker``) gets the run's events write-ahead. ``transport``
    overrides ``options.worker`` (tests). ``transcript_path`` (needs ``options.keep_transcript``)
    receives the exact byte stream sent to the worker. ``_backend`` (tests only) replaces the
    execute backend; an unencrypted one is recorded as plaintext. Returns dp_lora's ``FitResult`` with the
    original base layers restored; ``metrics["he"]`` has the byte counts and the adapter's guarantee.
    """
    from privaudit.mechanisms.dp_lora import FitResult
    from privaudit.mechanisms.training import (
        build_model,
        evaluate,
        fit_setup,
        require_mechanism,
        run_steps,
    )
    from privaudit.models import trainable_state_dict

    require_mechanism(cfg, NAME)
    if resume:
        raise ValueError("resume: he_lora runs cannot be resumed (keys and worker session are not checkpointed)")
    settings = HESettings.from_options(cfg.options)
    if transcript_path is not None and not settings.keep_transcript:
        raise ValueError("options.keep_transcript: must be true to save the worker's transcript")
    plan, num_labels, device = fit_setup(cfg, train_records, heldout_records, plan, num_labels)
    model, tok = build_model(cfg, num_labels, device)
    theta_0 = trainable_state_dict(model)
    if ledger is not None and settings.mode == "execute" and shapes_leak(cfg, settings) and plan.steps > 0:
        ledger.append(PlaintextEvent(what=SHAPES_LEAK))
    if ledger is not None and not plan.private:  # fail-closed marker: the adapter carries no DP guarantee
        ledger.append(PlaintextEvent(what=RELEASED_WITHOUT_NOISE))
    session = HELoraSession(model, settings, transport=transport, ledger=ledger, backend=_backend)
    metrics: dict[str, Any] = {}
    trainer: Any = None
    try:
        if plan.private:
            trainer = _dp_trainer_class()(cfg, train_records, plan, model, tok, device, ledger=ledger)
            trainer.session = session
        else:
            # batch sampling: a CSPRNG unless privacy.noise_seed is set (rng.sampling_rng)
            trainer = _PlainTrainer(cfg, train_records, plan, model, tok, device, session, cfg.privacy.noise_seed)
        start = time.perf_counter()
        run_steps(trainer.step, trainer.step_count, plan.steps, checkpointer=checkpointer if plan.private else None,
                  save=lambda _: trainer.save(checkpointer, theta_0), progress=progress, save_final=True)
        train_seconds = time.perf_counter() - start
        with session.engine.locally(settings.eval_mode if settings.mode != "clear" else "clear"):
            metrics["heldout"] = evaluate(model, tok, heldout_records, cfg, device)
        he = session.metrics()
        he["train_seconds"] = train_seconds
        he["adapter_guarantee"] = adapter_guarantee(plan)
        if isinstance(trainer, _PlainTrainer):
            he["train_losses"] = trainer.losses
        if transcript_path is not None and session.engine.client is not None:
            he["transcript_bytes"] = session.engine.client.save_transcript(transcript_path)
        metrics["he"] = he
    finally:
        if plan.private and trainer is not None:
            trainer.close()
        session.close()
    metrics["train_size"] = len(train_records)
    return FitResult(model=model, tokenizer=tok, metrics=metrics, plan=plan, theta_0=theta_0,
                     steps_done=trainer.step_count)


__all__ = [
    "HEEngine",
    "HELoraSession",
    "HESettings",
    "MODES",
    "NAME",
    "OBSERVER",
    "RemoteLinear",
    "adapter_guarantee",
    "fit",
    "install",
    "pad_batch",
    "planned_events",
    "remote_candidates",
    "uninstall",
]
