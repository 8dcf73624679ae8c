"""PAE MobiLLM (Yang, Li et al., arXiv 2507.01216): server-assisted additive side-tuning with an
activation cache, the pivot-token shortcut and prediction-difference training.

**Device** (keeps the data and the labels): a frozen backbone (``model.name``: the bundled MiniLM
encoder, a tiny decoder built from a config, any local model; task ``classification``). For each
training sample it runs *one* forward pass and sends, in one message, the hidden states of the pivot
token from every layer (S = L + 1 rows of width d; see :mod:`.pae_side` for the pivot, clipping,
noise, top-k and quantisation) and the prediction difference δ = onehot(y) − softmax(backbone
logits) (probability space), optionally clipped and perturbed. Labels never leave the device — but
unperturbed δ reveals them (its only positive entry is the true class).

**Server**: an activation cache keyed by sample id (``options.cache``, default on): a sample's
message crosses the wire once for the whole training; later epochs read the cache (no device
forward pass, no bytes). The server trains the side network (:class:`.pae_side.SideNetwork`) by MSE
to δ with the ``training`` section's optimizer, learning rate and batch size, over whole epochs
(``training.epochs``, rounded up; with ``training.steps`` the epochs those steps span). Inference =
softmax(backbone logits) + side correction (:class:`.pae_side.SideTunedModel`). Who holds the side
network afterwards is ``options.side_holder`` (``device``: its weights are sent to the device once,
counted; ``server``: inference queries go to the server), recorded in the metrics.

**Transport** (:mod:`.transport`): every message is serialised (safetensors) and its bytes counted,
per epoch and direction. The MobiLLM-style baseline (arXiv 2502.20421: all tokens' activations of
every layer, every epoch, plus the labels, same quantisation, no top-k) is serialised from the same
forward passes; the backbone being frozen and deterministic, its messages are byte-identical every
epoch, so one epoch's serialisation is counted for each epoch. During training neither scheme sends
anything server → device (0 bytes, counted as no message).

**Ledger** (observer ``server``), one release per sample per upload — with the cache, once per run —
appended before the epoch's first upload: activations ``plaintext`` (σ_a = 0) or ``gaussian`` (σ_a,
clip C_a), and δ ``plaintext`` or ``gaussian`` (σ_δ, clip C_δ). Gaussian events are written as
``fixed_batch`` releases of batch 1 out of N (each record in exactly one release per upload) with
sensitivity 2·C: a record's message against any other record's message (local-DP, fail-closed under
either neighbouring relation). Without the cache every epoch re-uploads and its events are counted
again.

**Audit** (registered for the mechanism ``pae_mobillm``, :func:`audit_server_view`): the server's
view is regenerated (same public pipeline, fresh noise) for training records and for an auxiliary set
of other people; label inference from δ (:mod:`privaudit.attacks.label_inference`), inversion and
attribute inference on the cached pivot activations (:mod:`privaudit.attacks.inversion`,
:mod:`privaudit.attacks.attribute`, trained on auxiliary records only); with
``AUDIT_RELEASED_MODEL`` the auditor's built-in membership and canary attacks also run on the final
model (backbone + side network, rebuilt by :func:`load_released_model`; θ₀ = the side network's
zero-output initialisation, i.e. the backbone alone).

Randomness (:mod:`privaudit.mechanisms.rng`): the activation and δ noise draw from a CSPRNG (AES-256-CTR
keyed from ``os.urandom``) unless ``privacy.noise_seed`` is set (torch's seeded generator: reproducible,
recorded as ``noise_secure: false``). The training order (seeded by ``training.seed``) is the server's
own and no secret from it: it sees every sample id it trains on.

Configuration: ``mechanism: pae_mobillm`` with :class:`PaeSettings` under ``options``; the
``privacy`` section's ``noise_multiplier`` is not used (set it to 0). Resuming restarts training
(events of the interrupted attempt stay in the ledger: over-count, fail-closed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from privaudit.config import PrivacyPlan, RunConfig, parse_options
from privaudit.config import (
    resolve_plan as _resolve_plan,  # aliased: runs.py would read `resolve_plan` as a hook
)
from privaudit.data import Record
from privaudit.ledger.events import Event, GaussianEvent, PlaintextEvent
from privaudit.mechanisms import rng
from privaudit.mechanisms.dp_lora import FitResult
from privaudit.mechanisms.pae_mobillm.side_network import (
    ReleaseSpec,
    SideNetwork,
    SideTunedModel,
    backbone_forward,
    prediction_difference,
    release_rows,
    resolve_pivot,
    wire_rows,
)
from privaudit.mechanisms.pae_mobillm.transport import (
    TransportLog,
    decode_rows,
    deserialise,
    encode_rows,
    serialise,
)
from privaudit.mechanisms.training import (
    Checkpointer,
    ProgressFn,
    encode,
    evaluate,
    make_optimizer,
)

NAME = "pae_mobillm"
OBSERVER = "server"
RESUMABLE = False  # nothing is checkpointed: an interrupted run is restarted in a new directory
AUDIT_RELEASED_MODEL = True  # the auditor also attacks the final model (membership, canaries)

__all__ = ["NAME", "OBSERVER", "PaeSettings", "PaeFitResult", "settings_of", "planned_events", "fit",
           "load_released_model", "build_backbone", "ServerView", "capture_server_view",
           "epochs_of"]


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
class PaeSettings(BaseModel):
    """``options`` of a ``mechanism: pae_mobillm`` config.

    ``activation_noise`` σ_a and ``delta_noise`` σ_δ are noise multipliers (std / clip); 0 sends in
    the clear. ``activation_clip`` C_a bounds a sample's whole (S, d) pivot stack (each layer row to
    C_a/√S); ``delta_clip`` C_δ bounds δ (‖δ‖₂ ≤ √2 always, so the default √2 never distorts).
    ``pivot``: see :mod:`.pae_side` (``first``: the first text token, a real vocabulary token, so
    the audit's token inversion applies). ``top_k``: entries kept per layer row; ``quantization``: wire dtype. ``side_width`` /
    ``side_bottleneck``: side network sizes. ``device_batch_size``: samples per device forward pass
    and per upload message. ``audit_victims``/``audit_aux``: records in the audit's server-view attacks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    pivot: Literal["auto", "cls", "mean", "last", "first"] = "auto"
    cache: bool = True
    activation_noise: float = Field(0.0, ge=0)
    activation_clip: float | None = Field(None, gt=0)
    delta_noise: float = Field(0.0, ge=0)
    delta_clip: float = Field(math.sqrt(2.0), gt=0)
    top_k: int | None = Field(None, ge=1)
    quantization: Literal["float32", "float16", "int8"] = "float32"
    side_width: int = Field(64, ge=1)
    side_bottleneck: int = Field(16, ge=1)
    side_holder: Literal["device", "server"] = "device"
    device_batch_size: int = Field(32, ge=1)
    audit_victims: int = Field(300, ge=2)
    audit_aux: int = Field(400, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "PaeSettings":
        if self.activation_noise > 0 and self.activation_clip is None:
            raise ValueError("activation_clip: required when activation_noise > 0")
        return self

    def release_spec(self) -> ReleaseSpec:
        return ReleaseSpec(self.activation_clip, self.activation_noise, self.top_k, self.quantization)


def settings_of(cfg: RunConfig) -> PaeSettings:
    """Validate ``cfg.options`` (``ValueError`` naming ``options.<field>``)."""
    return parse_options(PaeSettings, cfg.options)


def _check_cfg(cfg: RunConfig) -> PaeSettings:
    if cfg.mechanism != NAME:
        raise ValueError(f"mechanism: {cfg.mechanism!r} is not {NAME!r}")
    if cfg.task != "classification":
        raise ValueError("task: pae_mobillm implements the pivot-token classification setting of the paper; "
                         f"got {cfg.task!r}")
    return settings_of(cfg)


def _batch_size(cfg: RunConfig, n: int) -> int:
    t = cfg.training
    b = t.batch_size if t.batch_size is not None else max(1, round(float(t.sample_rate) * n))  # type: ignore[arg-type]
    return max(1, min(int(b), n))


def epochs_of(cfg: RunConfig, plan: PrivacyPlan) -> int:
    """Whole epochs the server trains: ``ceil(training.epochs)``, or the epochs ``plan.steps`` span."""
    n = plan.dataset_size
    if cfg.training.epochs is not None:
        return int(math.ceil(cfg.training.epochs))
    b = _batch_size(cfg, n)
    return int(math.ceil(plan.steps * b / n)) if plan.steps > 0 else 0


# ----------------------------------------------------------------------------------------------
# ledger
# ----------------------------------------------------------------------------------------------
def _release_events(settings: PaeSettings, n_states: int, d: int, count: int, dataset_size: int) -> list[Event]:
    """The events of ``count`` per-sample uploads (activations, then δ)."""
    if count <= 0:
        return []
    out: list[Event] = []
    if settings.activation_noise > 0:
        c = float(settings.activation_clip)  # type: ignore[arg-type]
        out.append(GaussianEvent(noise_multiplier=settings.activation_noise, sampling="fixed_batch", batch_size=1,
                                 dataset_size=dataset_size, clip_norm=c, sensitivity=2 * c, count=count))
    else:
        out.append(PlaintextEvent(what="pivot-token activations of every layer (to the server's cache)",
                                  shape=[n_states, d], count=count))
    if settings.delta_noise > 0:
        c = float(settings.delta_clip)
        out.append(GaussianEvent(noise_multiplier=settings.delta_noise, sampling="fixed_batch", batch_size=1,
                                 dataset_size=dataset_size, clip_norm=c, sensitivity=2 * c, count=count))
    else:
        out.append(PlaintextEvent(what="prediction differences onehot(y) - softmax(backbone) (reveal the label)",
                                  shape=[], count=count))
    return out


def _dims(model: nn.Module) -> tuple[int, int]:
    c = model.config
    n_layers = int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer"))
    d = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd"))
    return n_layers + 1, d


def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """One upload of every record (cache on) or one per epoch (cache off), as :func:`fit` appends them."""
    from privaudit.models import load_base_model

    s = _check_cfg(cfg)
    epochs = epochs_of(cfg, plan)
    if epochs == 0:
        return []
    model, _ = load_base_model(cfg.model.name, cfg.task, seed=cfg.training.seed, **cfg.model.overrides)
    n_states, d = _dims(model)
    uploads = 1 if s.cache else epochs
    events: list[Event] = []
    for _ in range(uploads):
        events += _release_events(s, n_states, d, plan.dataset_size, plan.dataset_size)
    return events


# ----------------------------------------------------------------------------------------------
# the device
# ----------------------------------------------------------------------------------------------
def build_backbone(cfg: RunConfig, num_labels: int, device: torch.device) -> tuple[nn.Module, Any]:
    """The frozen backbone (seeded by ``training.seed``: a function of the config), in eval mode."""
    from privaudit.models import load_base_model

    model, tok = load_base_model(cfg.model.name, cfg.task, num_labels=num_labels, seed=cfg.training.seed,
                                 **cfg.model.overrides)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _baseline_message(hs: tuple[torch.Tensor, ...], mask: torch.Tensor, ids: list[int], labels: torch.Tensor,
                      quantization: str) -> bytes:
    """MobiLLM-style upload: every token's activations from every layer (unpadded) plus the labels."""
    stack = torch.stack(hs, dim=2).float()  # (B, T, S, d)
    keep = mask.bool()
    rows = stack[keep]  # (sum T_i, S, d)
    payload = encode_rows(rows.cpu(), quantization, None, prefix="act")  # type: ignore[arg-type]
    return serialise({**payload, "sample_ids": torch.tensor(ids, dtype=torch.int64),
                      "lengths": keep.sum(1).to(torch.int32).cpu(), "labels": labels.to(torch.int64).cpu()},
                     {"kind": "mobillm_upload"})


def _prefix_len(tok: Any) -> int:
    """Tokens the tokenizer puts before a text (1 for [CLS] ...): the ``first`` pivot's position."""
    from privaudit.mechanisms.split_model import neutral_context

    return len(neutral_context(tok)[0])


class _Device:
    """The device side: frozen backbone, the records and labels, the release pipeline; counts its
    forward passes."""

    def __init__(self, backbone: nn.Module, tok: Any, cfg: RunConfig, settings: PaeSettings,
                 records: Sequence[Record], pivot: str, generator: Any) -> None:
        self.backbone, self.tok, self.cfg, self.settings = backbone, tok, cfg, settings
        self.records = list(records)
        self.pivot = pivot
        self.prefix_len = _prefix_len(tok)
        self.spec = settings.release_spec()
        self.gen = generator
        self.device = next(backbone.parameters()).device
        self.forward_passes = 0
        self.pivot_ids: list[torch.Tensor] = []  # per uploaded batch, for the auditor's scoring only

    def upload(self, ids: Sequence[int], *, epoch: int, log: TransportLog,
               baseline: TransportLog | None = None) -> list[bytes]:
        """Forward ``ids`` (one pass each), release and serialise: the upload messages."""
        msgs: list[bytes] = []
        s = self.settings
        for start in range(0, len(ids), s.device_batch_size):
            chunk = [int(i) for i in ids[start:start + s.device_batch_size]]
            batch = encode(self.tok, [self.records[i] for i in chunk], self.cfg, self.device)
            piv, logits, hs, pivot_ids = backbone_forward(self.backbone, batch, self.pivot, self.prefix_len)
            self.forward_passes += len(chunk)
            self.pivot_ids.append(pivot_ids)
            payload, _ = wire_rows(release_rows(piv, self.spec, self.gen), self.spec)
            delta = prediction_difference(logits, batch["labels"], s.delta_clip if s.delta_noise > 0 else None,
                                          s.delta_noise, self.gen)
            msg = serialise({**payload, "sample_ids": torch.tensor(chunk, dtype=torch.int64),
                             "delta": delta.float().cpu()}, {"kind": "pae_upload"})
            log.sent_to_server(epoch, msg)
            msgs.append(msg)
            if baseline is not None:
                baseline.sent_to_server(epoch, _baseline_message(hs, batch["attention_mask"], chunk, batch["labels"],
                                                                 s.quantization))
        return msgs


def _receive(msg: bytes, d: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The server's decoding of one upload: (sample id, pivot states (S, d), δ (K,))."""
    t = deserialise(msg)
    acts = decode_rows(t, d, prefix="act")
    return [(int(i), acts[j], t["delta"][j]) for j, i in enumerate(t["sample_ids"].tolist())]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
@dataclass
class PaeFitResult(FitResult):
    """dp_lora's result plus ``released_state`` (the side network, keys ``side.*``), the transport
    accounting and the side network's holder."""

    released_state: dict[str, torch.Tensor] = field(default_factory=dict)
    audit_key_extra: dict[str, Any] = field(default_factory=dict)
    transport: dict[str, Any] = field(default_factory=dict)


def _side_state(side: SideNetwork) -> dict[str, torch.Tensor]:
    return {f"side.{k}": v.detach().cpu().clone().contiguous() for k, v in side.state_dict().items()}


def _new_side(cfg: RunConfig, settings: PaeSettings, n_states: int, d: int, num_labels: int,
              device: torch.device) -> SideNetwork:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed + 1)
        side = SideNetwork(n_states, d, num_labels, settings.side_width, settings.side_bottleneck)
    return side.to(device)


def load_released_model(cfg: RunConfig, num_labels: int, device: torch.device,
                        state: dict[str, torch.Tensor]) -> tuple[SideTunedModel, Any]:
    """The side-tuned model of a run directory: the backbone rebuilt from the config and the side
    network from ``state`` (``side.*`` keys, as in ``adapter.safetensors``)."""
    s = _check_cfg(cfg)
    backbone, tok = build_backbone(cfg, num_labels, device)
    n_states, d = _dims(backbone)
    side = _new_side(cfg, s, n_states, d, num_labels, device)
    sd = {k.removeprefix("side."): v for k, v in state.items() if k.startswith("side.")}
    if len(sd) != len(state):
        raise ValueError("state: pae_mobillm adapters hold only side.* tensors")
    try:
        side.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"state: does not match the side network of this config ({exc})") from None
    model = SideTunedModel(backbone, side, resolve_pivot(backbone, s.pivot), s.release_spec(),
                           _prefix_len(tok)).eval()
    return model, tok


def fit(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record], *,
        ledger: Any = None, progress: ProgressFn | None = None, num_labels: int | None = None,
        plan: PrivacyPlan | None = None, checkpointer: Checkpointer | None = None,
        resume: bool = False) -> PaeFitResult:
    """Side-tune on ``train_records`` (see the module docstring); events go to ``ledger`` before each
    epoch's uploads. ``checkpointer``/``resume`` are accepted for the common interface: training
    restarts from scratch (nothing secret is checkpointed)."""
    from privaudit.models import resolve_device

    s = _check_cfg(cfg)
    records = list(train_records)
    if plan is None:
        plan = _resolve_plan(cfg, len(records))
    if plan.dataset_size != len(records):
        raise ValueError(f"plan: made for {plan.dataset_size} records, got {len(records)}")
    if num_labels is None:
        num_labels = max(2, max(r.label for r in records + list(heldout_records)) + 1)
    dev = resolve_device(cfg.model.device)
    backbone, tok = build_backbone(cfg, num_labels, dev)
    pivot = resolve_pivot(backbone, s.pivot)
    n_states, d = _dims(backbone)
    side = _new_side(cfg, s, n_states, d, num_labels, dev)
    theta_0 = _side_state(side)
    model = SideTunedModel(backbone, side, pivot, s.release_spec(), _prefix_len(tok))
    metrics: dict[str, Any] = {}
    if cfg.training.eval_before:
        metrics["heldout_before"] = evaluate(model, tok, list(heldout_records), cfg, dev)

    # the activation and δ noise: a CSPRNG unless privacy.noise_seed is set (then torch's seeded
    # generator: reproducible, recorded as noise_secure: false)
    noise_gen = rng.noise_generator(cfg.privacy.noise_seed, "cpu")
    device_side = _Device(backbone, tok, cfg, s, records, pivot, noise_gen)
    n = len(records)
    batch = _batch_size(cfg, n)
    epochs = epochs_of(cfg, plan)
    steps_per_epoch = math.ceil(n / batch)
    total_steps = epochs * steps_per_epoch
    optimizer = make_optimizer(list(side.parameters()), cfg)
    shuffle = torch.Generator().manual_seed(cfg.training.seed)
    ours, base = TransportLog(), TransportLog()
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    per_epoch: list[dict[str, Any]] = []
    baseline_epoch_bytes: int | None = None
    step = 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=shuffle).tolist()
        need = [i for i in perm if i not in cache] if s.cache else perm
        if ledger is not None:
            for ev in _release_events(s, n_states, d, len(need), n):
                ledger.append(ev)  # write-ahead: durable before the epoch's first upload
        passes_before = device_side.forward_passes
        store: dict[int, tuple[torch.Tensor, torch.Tensor]] = cache if s.cache else {}
        if need:
            msgs = device_side.upload(need, epoch=epoch, log=ours,
                                      baseline=base if baseline_epoch_bytes is None else None)
            for msg in msgs:
                for i, a, dl in _receive(msg, d):
                    store[i] = (a, dl)
        if baseline_epoch_bytes is None:
            baseline_epoch_bytes = base.bytes_to_server(epoch)
        else:  # frozen, deterministic backbone: the baseline re-sends the same messages every epoch
            base.to_server[epoch] = baseline_epoch_bytes
            base.messages_to_server[epoch] = base.messages_to_server[1]
        side.train()
        loss_sum = 0.0
        for b0 in range(0, n, batch):
            ids = perm[b0:b0 + batch]
            acts = torch.stack([store[i][0] for i in ids]).to(dev)
            target = torch.stack([store[i][1] for i in ids]).to(dev)
            loss = ((side(acts) - target) ** 2).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(ids)
            step += 1
            if progress is not None:
                progress(step, total_steps, {"batch_size": len(ids), "loss": float(loss.detach())})
        per_epoch.append({
            "epoch": epoch, "device_forward_passes": device_side.forward_passes - passes_before,
            "bytes_device_to_server": ours.bytes_to_server(epoch), "bytes_server_to_device": ours.bytes_to_device(epoch),
            "messages_device_to_server": ours.messages_to_server.get(epoch, 0),
            "baseline_bytes_device_to_server": base.bytes_to_server(epoch),
            "baseline_bytes_server_to_device": base.bytes_to_device(epoch),
            "train_mse": loss_sum / n, "cached_samples": len(cache),
        })
        if not s.cache:
            del store
    side.eval()
    final_bytes = 0
    if s.side_holder == "device":  # the trained side network goes to the device once
        final_msg = serialise(_side_state(side), {"kind": "side_network"})
        ours.sent_to_device(0, final_msg)
        base.sent_to_device(0, final_msg)
        final_bytes = len(final_msg)
    ours_total, base_total = ours.total(), base.total()
    first = per_epoch[0] if per_epoch else None
    transport = {
        "per_epoch": per_epoch,
        "final_side_network_bytes_server_to_device": final_bytes,
        "total_bytes": ours_total, "baseline_total_bytes": base_total,
        "reduction": (1.0 - ours_total / base_total) if base_total else None,
        "reduction_epoch_1": (1.0 - first["bytes_device_to_server"] / first["baseline_bytes_device_to_server"])
        if first and first["baseline_bytes_device_to_server"] else None,
        "quantization": s.quantization, "top_k": s.top_k, "cache": s.cache,
        "baseline": "MobiLLM-style: all tokens' activations of every layer each epoch + labels, same quantization",
    }
    metrics["heldout"] = evaluate(model, tok, list(heldout_records), cfg, dev)
    metrics.update({
        "train_size": n, "heldout_size": len(heldout_records), "steps": step, "epochs": epochs,
        "pivot": pivot, "n_states": n_states, "hidden_size": d, "side_holder": s.side_holder,
        "side_parameters": sum(p.numel() for p in side.parameters()),
        "gates": [float(g) for g in side.gates().detach().cpu()],
        "device_forward_passes": device_side.forward_passes, "uploads_per_record":
            (device_side.forward_passes / n) if n else 0.0,
        "transport": transport,
        "delta_space": "probabilities: onehot(y) - softmax(backbone logits)",
    })
    model.eval()
    return PaeFitResult(model, tok, metrics, plan, theta_0, None, step, None,
                        released_state=_side_state(side), audit_key_extra={}, transport=transport)


# ----------------------------------------------------------------------------------------------
# the server's view and its audit
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerView:
    """What the server holds for ``records``: decoded pivot states (n, S, d), δ (n, K) as received,
    and, for scoring only, the pivot token ids (−1 for a pooled pivot)."""

    activations: torch.Tensor
    deltas: torch.Tensor
    pivot_ids: torch.Tensor


@torch.no_grad()
def capture_server_view(backbone: nn.Module, tok: Any, cfg: RunConfig, records: Sequence[Record],
                        generator: Any) -> ServerView:
    """Upload ``records`` once each through the training code path (fresh noise) and decode them as
    the server does: the distribution of the server's cache. ``generator``: a seeded
    ``torch.Generator`` (an audit's reproducible simulation) or a ``rng.SecureGenerator``; None: a
    fresh CSPRNG."""
    generator = rng.secure_or(generator)
    s = settings_of(cfg)
    pivot = resolve_pivot(backbone, s.pivot)
    _, d = _dims(backbone)
    dev = _Device(backbone, tok, cfg, s, records, pivot, generator)
    acts, deltas = [], []
    for msg in dev.upload(list(range(len(records))), epoch=1, log=TransportLog()):
        for _, a, dl in _receive(msg, d):
            acts.append(a)
            deltas.append(dl)
    return ServerView(torch.stack(acts), torch.stack(deltas), torch.cat(dev.pivot_ids))
