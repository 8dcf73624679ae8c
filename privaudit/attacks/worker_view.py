"""What an HE-LoRA worker sees, as inputs for the shared representation attacks.

The worker of an HE-LoRA run (:mod:`privaudit.mechanisms.he_lora`) receives, per remote product, the
ciphertext of the quantized input rows (one row per token position) and returns an encrypted result
it computed itself (a function of what it received and its own weights: it adds no information). The
most informative rows are the inputs of the **first** remote layer (closest to the token embeddings).

This module reproduces those rows for given records from the released model (the base weights are
frozen and the first remote layer sits before any trained LoRA branch can change its input only
through earlier layers — the released adapter is used, so the inputs are those of the trained model):

* :func:`first_remote_inputs` — the float inputs of the first remote layer, one (T_i, k) tensor per
  record (real tokens only; padding rows carry no token);
* :func:`quantized_view` — what an *unencrypted* worker would receive (the ``simulate`` backend's
  message bodies: the n-bit integers); the positive control of the audit;
* :func:`ciphertext_view` — each row encrypted by the backend, as features: the ciphertext bytes read
  as little-endian uint64 words scaled to [0, 1) (a row of the GLWE backend is ~10 kB, 1,264 words).

Attacks then run on these views exactly as on any released representation
(:func:`privaudit.attacks.inversion.attack_representations`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["first_remote_inputs", "quantized_view", "ciphertext_view", "ciphertext_features", "vocabulary_inputs"]


@torch.no_grad()
def first_remote_inputs(model: torch.nn.Module, tokenizer: Any, records: Sequence[Any], cfg: Any,
                        remote_lm_head: bool = False, batch_size: int = 32
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(inputs, token ids, layer name): the first remote layer's input rows for each record's real
    tokens, its token ids, and which layer that is (:func:`privaudit.mechanisms.he_lora.remote_candidates`)."""
    from privaudit.mechanisms.he_lora import remote_candidates
    from privaudit.mechanisms.training import encode

    cands = remote_candidates(model, remote_lm_head)
    if not cands:
        raise ValueError("model: no frozen base linear layer would be sent to a worker")
    name, layer = cands[0]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    device = next(model.parameters()).device
    xs: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    was = model.training
    model.eval()
    try:
        for s in range(0, len(records), batch_size):
            batch = encode(tokenizer, list(records[s:s + batch_size]), cfg, device)
            captured.clear()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            x = captured[0]
            mask = batch["attention_mask"].bool()
            x = x.reshape(mask.shape[0], mask.shape[1], -1)
            for i in range(mask.shape[0]):
                xs.append(x[i][mask[i]].float().cpu())
                ids.append(batch["input_ids"][i][mask[i]].cpu())
    finally:
        handle.remove()
        model.train(was)
    return xs, ids, name


def quantized_view(inputs: Sequence[torch.Tensor], n_bits: int) -> list[torch.Tensor]:
    """Per record, the n-bit integers an unencrypted worker would receive (as float32)."""
    from privaudit.mechanisms.he_backend import quantize_rows

    return [torch.from_numpy(quantize_rows(x.double().numpy(), n_bits).values.astype(np.float32))
            for x in inputs]


def ciphertext_features(blob: bytes) -> np.ndarray:
    """A ciphertext's bytes as little-endian uint64 words scaled to [0, 1) (trailing bytes padded)."""
    pad = (-len(blob)) % 8
    words = np.frombuffer(blob + b"\0" * pad, dtype="<u8")
    return (words.astype(np.float64) / 2.0 ** 64).astype(np.float32)


def ciphertext_view(inputs: Sequence[torch.Tensor], n_bits: int, client: Any) -> list[torch.Tensor]:
    """Per record, each token row quantized and encrypted on its own by ``client``
    (:meth:`privaudit.mechanisms.he_backend.HEBackend.keygen`), as (T_i, words) features."""
    out: list[torch.Tensor] = []
    for q in quantized_view(inputs, n_bits):
        rows = [ciphertext_features(client.encrypt_rows(q[i:i + 1].numpy().astype(np.int64)))
                for i in range(q.shape[0])]
        out.append(torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 1))
    return out


@torch.no_grad()
def vocabulary_inputs(model: torch.nn.Module, tokenizer: Any, token_ids: torch.Tensor, remote_lm_head: bool = False,
                      batch_size: int = 512) -> torch.Tensor:
    """(V, k): the first remote layer's input for each token alone in the tokenizer's neutral context
    (its own special tokens around it), at the token's position — the attacker's vocabulary table."""
    from privaudit.mechanisms.he_lora import remote_candidates
    from privaudit.mechanisms.privtune import neutral_context

    _, layer = remote_candidates(model, remote_lm_head)[0]
    prefix, suffix = neutral_context(tokenizer)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, token_ids.numel(), batch_size):
            ids = token_ids[s:s + batch_size].to(device)
            cols = [torch.full_like(ids, p) for p in prefix] + [ids] + [torch.full_like(ids, q) for q in suffix]
            x = torch.stack(cols, dim=1)
            captured.clear()
            model(input_ids=x, attention_mask=torch.ones_like(x))
            h = captured[0].reshape(x.shape[0], x.shape[1], -1)
            out.append(h[:, len(prefix)].float().cpu())
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(out)
