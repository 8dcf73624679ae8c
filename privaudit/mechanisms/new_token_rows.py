"""Trainable rows of the new-token canaries (``audit.lm_canary_train_new_tokens``; Panda et al. 2025).

The ``new_token`` design (:mod:`privaudit.data.lm_canaries`) adds k tokens to the tokenizer, ids
``first .. first+k−1``; :func:`~privaudit.data.lm_canaries.add_new_tokens` gives them rows drawn from a
fixed public seed. By default those rows stay frozen. With ``audit.lm_canary_train_new_tokens`` they
are trained under the same DP-SGD as the LoRA factors, as two ordinary ``nn.Linear`` layers so that the
per-sample machinery (:class:`~privaudit.mechanisms.per_sample.LinearRule`) gives their exact
per-sample gradients and they go through the one clipping rule and the noise with every other
trainable parameter:

* **input** (:class:`NewTokenEmbedding`): ``embed(ids) = base(ids)·[id is not new] + W_in · onehot(id −
  first)`` with ``W_in = new_rows.weight`` of shape (d, k) (``nn.Linear(k, d, bias=False)``; one-hot
  zero at positions that hold no new token). The base embedding's rows for the new ids are never read.
* **output** (:class:`NewTokenHead`): the logits of the new ids are ``W_out · h`` (``nn.Linear(d, k,
  bias=False)`` on the final hidden state ``h``), spliced into the base head's logits at columns
  ``first .. first+k−1`` (the base head's columns there are dropped).

``W_in`` and ``W_out`` are **separate parameters even when the base model ties its input and output
embeddings**: a parameter used by two layers would make the per-layer (ghost or materialised)
per-sample norms wrong — the sample's gradient is the sum of the two layers' contributions, whose
norm is not the sum of per-layer norms — and :class:`~privaudit.mechanisms.per_sample.PerSampleGradients`
refuses shared trainable parameters anyway. Both start from the rows ``add_new_tokens`` drew (input
rows for ``W_in``, output rows — the same values when tied — for ``W_out``), so at θ₀ the model is
the function of the frozen design, θ₀ is data-independent and rebuilt from the config alone
(``training.seed``), and the parameters are saved with the adapter (``adapter_init`` / ``adapter``
safetensors) under the names ``…<embedding>.new_rows.weight`` and ``…<head>.new_rows.weight``.

Privacy: every trainable parameter of the model, these included, is in the per-sample norm that is
clipped to C; a record's gradient reaches ``W_in``/``W_out`` only through the positions it holds
(record-level, add/remove or replace as configured). The PEFT export cannot express these rows and
is not written (:mod:`privaudit.peft_export`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NewTokenEmbedding", "NewTokenHead", "install_trainable_new_token_rows"]


def _contiguous(ids: Sequence[int]) -> tuple[int, int]:
    first, k = int(min(ids)), len(ids)
    if sorted(int(i) for i in ids) != list(range(first, first + k)):
        raise ValueError("audit.lm_canary_train_new_tokens: the new token ids are not one contiguous range")
    return first, k


class NewTokenEmbedding(nn.Module):
    """``base`` embedding with the rows of ids ``first .. first+k−1`` replaced by a trainable
    ``new_rows = nn.Linear(k, d, bias=False)`` applied to their one-hot (see the module docstring)."""

    def __init__(self, base: nn.Module, first: int, rows: torch.Tensor) -> None:
        super().__init__()
        k, d = rows.shape
        self.base = base
        self.first, self.k = int(first), int(k)
        self.new_rows = nn.Linear(self.k, int(d), bias=False, device=rows.device, dtype=rows.dtype)
        with torch.no_grad():
            self.new_rows.weight.copy_(rows.t())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rel = input_ids - self.first
        is_new = (rel >= 0) & (rel < self.k)
        out = self.base(input_ids)
        w = self.new_rows.weight
        onehot = F.one_hot(rel.clamp(0, self.k - 1), self.k).to(w.dtype) * is_new.unsqueeze(-1).to(w.dtype)
        return out * (~is_new).unsqueeze(-1).to(out.dtype) + self.new_rows(onehot).to(out.dtype)


class NewTokenHead(nn.Module):
    """``base`` output layer whose logits at columns ``first .. first+k−1`` come from a trainable
    ``new_rows = nn.Linear(d, k, bias=False)`` on the hidden state (see the module docstring)."""

    def __init__(self, base: nn.Module, first: int, rows: torch.Tensor) -> None:
        super().__init__()
        k, d = rows.shape
        self.base = base
        self.first, self.k = int(first), int(k)
        self.new_rows = nn.Linear(int(d), self.k, bias=False, device=rows.device, dtype=rows.dtype)
        with torch.no_grad():
            self.new_rows.weight.copy_(rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        new = self.new_rows(hidden).to(logits.dtype)
        return torch.cat([logits[..., :self.first], new, logits[..., self.first + self.k:]], dim=-1)


def _hf_model(model: nn.Module) -> Any:
    get = getattr(model, "get_base_model", None)  # a PEFT wrapper: the transformers model inside
    return get() if callable(get) else model


def install_trainable_new_token_rows(model: nn.Module, ids: Sequence[int]) -> None:
    """Make the rows of the new tokens ``ids`` (one contiguous range, added by
    :func:`~privaudit.data.lm_canaries.add_new_tokens`) trainable, in place: wraps the causal LM's
    input embedding in :class:`NewTokenEmbedding` and its output layer in :class:`NewTokenHead`,
    initialised from the rows the model holds now. Call after the LoRA wrapping (PEFT freezes every
    parameter it does not add; these are added after it and left trainable). ``ValueError`` naming
    ``audit.lm_canary_train_new_tokens`` when the model has no such layers."""
    first, k = _contiguous(ids)
    hf = _hf_model(model)
    emb = hf.get_input_embeddings()
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or head is None or not hasattr(head, "weight"):
        raise ValueError("audit.lm_canary_train_new_tokens: the model needs a plain input embedding and an output "
                         "layer (a causal LM without an adapter on its embedding)")
    w_out = head.weight
    if emb.weight.shape[0] < first + k or w_out.shape[0] < first + k or w_out.shape[1] != emb.weight.shape[1]:
        raise ValueError("audit.lm_canary_train_new_tokens: the embeddings do not hold the new tokens' rows")
    idx = torch.arange(first, first + k, device=emb.weight.device)
    with torch.no_grad():
        rows_in = emb.weight[idx].detach().clone()
        rows_out = w_out[idx.to(w_out.device)].detach().clone()
    hf.set_input_embeddings(NewTokenEmbedding(emb, first, rows_in))
    hf.set_output_embeddings(NewTokenHead(head, first, rows_out))
