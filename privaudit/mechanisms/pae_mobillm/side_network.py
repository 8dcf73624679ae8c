"""PAE MobiLLM building blocks: pivot-token activations, their release pipeline, the side network and
the side-tuned model (frozen backbone + side correction).

Shapes: ``S = L + 1`` hidden states per sample (the embedding output and each of the L blocks), each
of width ``d``; ``K`` classes.

* **Pivot** (the position the loss is computed on): ``last`` — the last non-padding token (decoders:
  what ``...ForSequenceClassification`` reads); ``cls`` — position 0; ``mean`` — the attention-masked
  mean over tokens (what the bundled MiniLM classifier's head reads: its "pivot" is pooled);
  ``first`` — the first token after the tokenizer's prefix (position ``prefix_len``, e.g. 1 after
  [CLS]; the last non-padding token if the record is shorter): a real vocabulary token;
  ``auto`` picks ``mean`` for mean-pooling encoders, ``cls`` for other encoders, ``last`` for decoders.
* **Release pipeline** for one sample's (S, d) pivot states: each layer's row clipped to L2 norm
  ``clip / sqrt(S)`` (so the whole sample has norm ≤ ``clip``), Gaussian noise N(0, (σ·clip)²) per
  coordinate, then top-k and quantisation (post-processing, :mod:`.transport`).
* **Prediction difference** δ = onehot(y) − softmax(backbone logits), in *probability* space (‖δ‖₂ ≤
  √2; its only positive entry is the true class, so unperturbed δ reveals the label), optionally
  clipped to ``delta_clip`` and perturbed with N(0, (σ_δ·delta_clip)²).
* **Side network**: h_0 = P_0(a_0); for i = 1..L, x_i = (1 − μ_i)·P_i(a_i) + μ_i·h_{i−1} with μ_i =
  sigmoid(α_i) and h_i = x_i + Adapter_i(x_i) (bottleneck: LayerNorm → down → GELU → up); output
  c = Head(LayerNorm(h_L)), zero-initialised (at θ₀ the model is the backbone). P_i = Linear(d → width)
  after a parameter-free LayerNorm of a_i. Trained by MSE to δ.
* **Inference**: p = softmax(backbone logits) + c; the class is argmax p; as ``logits`` the model
  returns log(max(p, 1e-4)) (softmax of these renormalises p, so cross-entropy is defined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from privaudit.mechanisms import rng
from privaudit.mechanisms.pae_mobillm.transport import Quantization, decode_rows, encode_rows

Pivot = Literal["auto", "cls", "mean", "last", "first"]
PROB_FLOOR = 1e-4

__all__ = ["Pivot", "resolve_pivot", "backbone_forward", "ReleaseSpec", "release_rows", "wire_rows",
           "prediction_difference", "SideNetwork", "SideTunedModel"]


def resolve_pivot(model: nn.Module, pivot: Pivot) -> Literal["cls", "mean", "last", "first"]:
    """The concrete pivot for ``model`` (see the module docstring)."""
    if pivot != "auto":
        return pivot
    if type(model).__name__.startswith("MeanPool"):
        return "mean"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or \
            getattr(getattr(model, "config", None), "model_type", "") in ("bert", "roberta", "distilbert", "electra",
                                                                          "deberta", "deberta-v2", "mpnet"):
        return "cls"
    return "last"


@torch.no_grad()
def backbone_forward(model: nn.Module, batch: dict[str, torch.Tensor], pivot: str, prefix_len: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """One forward pass of the frozen backbone: (pivot states (B, S, d), logits (B, K), all hidden
    states (S tensors of (B, T, d)), pivot token ids (B,); −1 where the pivot is pooled).
    ``prefix_len``: tokens the tokenizer puts before the text (the ``first`` pivot's position)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, output_hidden_states=True)
    hs = out.hidden_states
    mask = inputs["attention_mask"]
    stack = torch.stack(hs, dim=1).float()  # (B, S, T, d)
    b = stack.shape[0]
    if pivot == "mean":
        m = mask.to(stack.dtype)[:, None, :, None]
        piv = (stack * m).sum(2) / m.sum(2).clamp_min(1.0)
        ids = torch.full((b,), -1, dtype=torch.long)
    else:
        last = mask.sum(1).long() - 1
        if pivot == "cls":
            pos = torch.zeros(b, dtype=torch.long, device=mask.device)
        elif pivot == "first":
            pos = last.clamp(max=prefix_len)
        else:
            pos = last
        piv = stack[torch.arange(b, device=stack.device), :, pos]
        ids = inputs["input_ids"][torch.arange(b, device=mask.device), pos].cpu()
    return piv, out.logits.float(), hs, ids


@dataclass(frozen=True)
class ReleaseSpec:
    """How pivot states leave the device: clip (None: no clipping), σ (noise multiplier; 0: none),
    top-k per layer row (None: all), quantisation."""

    clip: float | None = None
    sigma: float = 0.0
    top_k: int | None = None
    quantization: Quantization = "float32"


def _clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)


def _noise(shape: torch.Size, generator: Any, device: torch.device) -> torch.Tensor:
    """N(0, 1) of ``shape`` on ``device`` from ``generator``: a ``rng.SecureGenerator`` (None: a fresh
    one) or a seeded ``torch.Generator`` (drawn on its own device, as seeded runs always have)."""
    generator = rng.secure_or(generator)
    on = generator.device if isinstance(generator, torch.Generator) else device
    return rng.randn(shape, generator=generator, device=on, dtype=torch.float32).to(device)


def release_rows(piv: torch.Tensor, spec: ReleaseSpec, generator: Any) -> torch.Tensor:
    """Clip and perturb (B, S, d) pivot states (the privacy-relevant part of the pipeline). The noise
    is a secret draw from ``generator`` (see :func:`_noise`)."""
    x = piv.float()
    if spec.clip is not None:
        x = _clip_rows(x, spec.clip / math.sqrt(x.shape[1]))
    if spec.sigma > 0:
        if spec.clip is None:
            raise ValueError("options.activation_clip: noise needs a clipping bound")
        x = x + _noise(x.shape, generator, x.device) * (spec.sigma * spec.clip)
    return x


def wire_rows(x: torch.Tensor, spec: ReleaseSpec) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(payload tensors, what the server decodes) for released rows (B, S, d): top-k + quantisation."""
    payload = encode_rows(x.cpu(), spec.quantization, spec.top_k, prefix="act")
    return payload, decode_rows(payload, x.shape[-1], prefix="act")


def prediction_difference(logits: torch.Tensor, labels: torch.Tensor, clip: float | None, sigma: float,
                          generator: Any) -> torch.Tensor:
    """δ = onehot(y) − softmax(logits) (probability space), clipped to ``clip`` and perturbed with
    N(0, (σ·clip)²) per class when σ > 0 (a secret draw from ``generator``, see :func:`_noise`)."""
    p = torch.softmax(logits.float(), dim=-1)
    delta = nn.functional.one_hot(labels.long(), p.shape[-1]).float() - p
    if clip is not None:
        delta = _clip_rows(delta, clip)
    if sigma > 0:
        if clip is None:
            raise ValueError("options.delta_clip: noise needs a clipping bound")
        delta = delta + _noise(delta.shape, generator, delta.device) * (sigma * clip)
    return delta


class _Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(self.norm(x))))


class SideNetwork(nn.Module):
    """Cascaded bottleneck adapters with gated fusion over S pivot states (module docstring)."""

    def __init__(self, n_states: int, d: int, num_outputs: int, width: int = 64, bottleneck: int = 16) -> None:
        super().__init__()
        if n_states < 1:
            raise ValueError(f"n_states: must be >= 1, got {n_states}")
        self.n_states, self.d = n_states, d
        self.proj = nn.ModuleList(nn.Linear(d, width) for _ in range(n_states))
        self.adapters = nn.ModuleList(_Bottleneck(width, bottleneck) for _ in range(n_states - 1))
        self.alpha = nn.Parameter(torch.zeros(max(n_states - 1, 1)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_outputs)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def gates(self) -> torch.Tensor:
        """μ_i = sigmoid(α_i), i = 1..L."""
        return torch.sigmoid(self.alpha[: self.n_states - 1])

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        """Correction c (B, K) from pivot states (B, S, d)."""
        if acts.ndim != 3 or acts.shape[1] != self.n_states or acts.shape[2] != self.d:
            raise ValueError(f"acts: expected (B, {self.n_states}, {self.d}), got {tuple(acts.shape)}")
        a = nn.functional.layer_norm(acts.float(), (self.d,))
        h = self.proj[0](a[:, 0])
        mu = self.gates()
        for i in range(1, self.n_states):
            x = (1 - mu[i - 1]) * self.proj[i](a[:, i]) + mu[i - 1] * h
            h = x + self.adapters[i - 1](x)
        return self.head(self.norm(h))


@dataclass
class _Output:
    logits: torch.Tensor


class SideTunedModel(nn.Module):
    """Frozen backbone + side network, as the device (or whoever holds the side network) runs it:
    pivot states → clip → top-k/quantisation (no noise: inference) → side correction; p = softmax(z_b)
    + c. ``forward(**batch).logits`` as a Hugging Face classifier, so evaluation and membership
    attacks apply unchanged. ``prefix_len``: as in :func:`backbone_forward`."""

    def __init__(self, backbone: nn.Module, side: SideNetwork, pivot: str, spec: ReleaseSpec,
                 prefix_len: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.side = side
        self.pivot = pivot
        self.prefix_len = prefix_len
        self.spec = ReleaseSpec(spec.clip, 0.0, spec.top_k, spec.quantization)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "SideTunedModel":
        super().train(mode)
        self.backbone.eval()  # frozen: a fixed function on the device
        return self

    def side_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoded pivot states (B, S, d) on the model's device, backbone logits (B, K))."""
        piv, logits, _, _ = backbone_forward(self.backbone, batch, self.pivot, self.prefix_len)
        _, decoded = wire_rows(release_rows(piv, self.spec, None), self.spec)
        return decoded.to(piv.device), logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> _Output:
        batch = {"input_ids": input_ids,
                 "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                 **{k: v for k, v in kwargs.items() if k in ("token_type_ids",) and v is not None}}
        acts, logits = self.side_inputs(batch)
        p = torch.softmax(logits, dim=-1) + self.side(acts)
        return _Output(logits=torch.log(p.clamp_min(PROB_FLOOR)))
