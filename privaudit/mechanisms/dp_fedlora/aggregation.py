"""Server-side aggregation of the clients' (noisy) factors.

* ``fedavg`` (the authors' code): every trainable tensor — A, B, a head — is the weighted mean of the
  clients' tensors; the next round trains from these averaged factors. Biased for the product:
  mean(B)·mean(A) ≠ mean(B·A).
* ``stack`` (the paper, FLoRA-style): B's side by side and A's stacked, so the product is exactly
  ΔW = s·Σ_k w_k B_k A_k (s = α/r); ΔW is merged into the frozen base weights, and the next round
  trains a *fresh* adapter (A at its initial value, B = 0) on top of the merged model. Other trainable
  tensors are averaged. The global state then carries the merged base weights
  (``<module>.base_layer.weight``).

Weights: n_k/Σn (``weighting: samples``: the clients' record counts, assumed public) or 1/K.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch

from privaudit.mechanisms.dp_fedlora.client import ClientUpdate


def client_factors(update: ClientUpdate, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The client's tensors as absolute values (what the server reconstructs from its release)."""
    if update.kind == "absolute":
        return dict(update.tensors)
    return {n: global_state[n].to(torch.float32) + d for n, d in update.tensors.items()}


def weights(updates: Sequence[ClientUpdate], sample_weighted: bool, expected: float | None = None) -> list[float]:
    """Aggregation weights. ``expected``: divide by the expected number of clients instead of the actual
    one (Poisson client sampling, uniform weights: the actual count is not revealed by the mean)."""
    if sample_weighted:
        total = sum(u.n_records for u in updates)
        return [u.n_records / total for u in updates]
    k = expected if expected is not None else len(updates)
    return [1.0 / k] * len(updates)


def aggregate(global_state: Mapping[str, torch.Tensor], factors: Sequence[Mapping[str, torch.Tensor]],
              w: Sequence[float], how: Literal["fedavg", "stack"], init_state: Mapping[str, torch.Tensor],
              scaling: float) -> dict[str, torch.Tensor]:
    """The next round's global state from the clients' absolute factors."""
    new = {n: v.clone() for n, v in global_state.items()}
    if not factors:
        return new
    names = list(factors[0])
    for n in names:
        if how == "stack" and (".lora_A." in n or ".lora_B." in n):
            continue
        g = global_state[n].to(torch.float32)
        # global + Σ w_k (f_k − global): the weighted mean when Σ w = 1; DP-FedAvg's fixed denominator
        # (expected number of clients) otherwise
        new[n] = (g + sum(wk * (f[n].to(torch.float32) - g) for wk, f in zip(w, factors))).to(global_state[n].dtype)
    if how == "stack":
        lora_b = [n for n in global_state if ".lora_B." in n]
        for b_name in lora_b:
            prefix, _, rest = b_name.partition(".lora_B.")
            a_name = f"{prefix}.lora_A.{rest}"
            base = f"{prefix}.base_layer.weight"
            if base not in new:
                raise ValueError(f"aggregation: stacking needs the base weight {base!r} in the global state")
            # a factor a client does not train (e.g. a frozen A) is the global one
            delta = scaling * sum(wk * (f.get(b_name, global_state[b_name]).to(torch.float32)
                                        @ f.get(a_name, global_state[a_name]).to(torch.float32))
                                  for wk, f in zip(w, factors))
            w0 = new[base]
            if tuple(delta.shape) != tuple(w0.shape):  # type: ignore[union-attr]
                delta = delta.T  # type: ignore[union-attr]  # fan_in_fan_out (GPT-2 Conv1D)
            new[base] = (w0.to(torch.float32) + delta).to(w0.dtype)
            new[a_name] = init_state[a_name].clone()
            new[b_name] = init_state[b_name].clone()
    return new
