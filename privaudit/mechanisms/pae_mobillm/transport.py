"""Wire format and byte counting for device ↔ server messages (split and side-tuning mechanisms).

A message is a dict of tensors plus string metadata, serialised with ``safetensors`` (the bytes that
would cross the wire: an 8-byte header length, a JSON header, the raw little-endian tensor data). Its
size is ``len(serialise(...))`` — counted from the real serialisation, never estimated.

Activation payloads are encoded per (sample, layer) row:

* ``float32`` / ``float16``: the values as that dtype;
* ``int8``: symmetric linear quantisation, q = round(x / s) with s = max|x| / 127 per row (float32
  scales travel with the message);
* ``top_k`` (optional, before quantisation): only the k entries of largest magnitude per row are sent,
  with their indices (int16 when the row has fewer than 32768 entries, else int32); the receiver
  scatters them into a zero row.

Encoding is deterministic post-processing: it adds no privacy and costs none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch

Quantization = Literal["float32", "float16", "int8"]

__all__ = ["Quantization", "serialise", "deserialise", "encode_rows", "decode_rows", "TransportLog"]


def serialise(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (moved to CPU, made contiguous)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata=dict(metadata) if metadata else None)


def deserialise(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`serialise` (tensors only)."""
    from safetensors.torch import load

    return load(data)


def encode_rows(x: torch.Tensor, quantization: Quantization = "float32", top_k: int | None = None,
                prefix: str = "act") -> dict[str, torch.Tensor]:
    """Encode ``x`` (..., d) row-wise for the wire (see the module docstring)."""
    if quantization not in ("float32", "float16", "int8"):
        raise ValueError(f"quantization: must be float32, float16 or int8, got {quantization!r}")
    x = x.detach().float()
    d = x.shape[-1]
    out: dict[str, torch.Tensor] = {}
    if top_k is not None:
        if not 1 <= top_k <= d:
            raise ValueError(f"top_k: must be in [1, {d}], got {top_k!r}")
        if top_k < d:
            idx = x.abs().topk(top_k, dim=-1).indices.sort(dim=-1).values
            x = x.gather(-1, idx)
            out[f"{prefix}.indices"] = idx.to(torch.int16 if d < 32768 else torch.int32)
    if quantization == "int8":
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        out[f"{prefix}.q"] = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        out[f"{prefix}.scale"] = scale.squeeze(-1).float()
    else:
        out[f"{prefix}.values"] = x.to(torch.float16 if quantization == "float16" else torch.float32)
    return out


def decode_rows(msg: Mapping[str, torch.Tensor], d: int, prefix: str = "act") -> torch.Tensor:
    """Dense float32 rows (..., d) from an :func:`encode_rows` payload."""
    if f"{prefix}.q" in msg:
        vals = msg[f"{prefix}.q"].float() * msg[f"{prefix}.scale"].float().unsqueeze(-1)
    else:
        vals = msg[f"{prefix}.values"].float()
    idx = msg.get(f"{prefix}.indices")
    if idx is None:
        return vals
    dense = torch.zeros(*vals.shape[:-1], d, dtype=torch.float32)
    dense.scatter_(-1, idx.long(), vals)
    return dense


@dataclass
class TransportLog:
    """Bytes and messages per epoch in each direction (epoch 0 = after training, e.g. the final
    side-network transfer)."""

    to_server: dict[int, int] = field(default_factory=dict)
    to_device: dict[int, int] = field(default_factory=dict)
    messages_to_server: dict[int, int] = field(default_factory=dict)
    messages_to_device: dict[int, int] = field(default_factory=dict)

    def sent_to_server(self, epoch: int, payload: bytes) -> None:
        self.to_server[epoch] = self.to_server.get(epoch, 0) + len(payload)
        self.messages_to_server[epoch] = self.messages_to_server.get(epoch, 0) + 1

    def sent_to_device(self, epoch: int, payload: bytes) -> None:
        self.to_device[epoch] = self.to_device.get(epoch, 0) + len(payload)
        self.messages_to_device[epoch] = self.messages_to_device.get(epoch, 0) + 1

    def bytes_to_server(self, epoch: int) -> int:
        return self.to_server.get(epoch, 0)

    def bytes_to_device(self, epoch: int) -> int:
        return self.to_device.get(epoch, 0)

    def total(self) -> int:
        return sum(self.to_server.values()) + sum(self.to_device.values())
