"""Batch samplers with saveable state (JSON), for DP-SGD.

* :class:`PoissonSampler` — every index is included independently with probability ``q`` at every
  step: batch sizes vary (Binomial(N, q)) and may be empty. This is the sampling the accountants'
  subsampled-Gaussian analysis assumes (amplification by Poisson subsampling, add/remove neighbours).
* :class:`ShuffledBatchSampler` — fixed-size batches read from a stream of random permutations of
  the data (no record is dropped, none appears twice in one batch, and in the first k batches a record
  appears at most ⌈k·B/N⌉ times). The ledger records it as ``sampling="fixed_batch"`` and no
  amplification by subsampling is claimed (each pass over the data costs one full-batch release).

Randomness comes from :func:`privaudit.mechanisms.rng.sampling_rng`: a CSPRNG without a seed (a
private run: anyone who can predict the sampling knows which records were in which batch, which voids
the amplification argument), numpy's PCG64 with one (reproducible, not secure). ``state_dict()`` / ``load_state_dict()`` round-trip through JSON.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from privaudit.mechanisms.rng import sampling_rng


def fresh_seed() -> int:
    """A 128-bit seed from the operating system's CSPRNG."""
    return secrets.randbits(128)


class _Sampler:
    kind: str = "base"

    def __init__(self, num_items: int, seed: int | None) -> None:
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"dataset_size: must be a positive integer, got {num_items!r}")
        self.num_items = num_items
        self.rng = sampling_rng(seed)  # None: a CSPRNG (privaudit.mechanisms.rng); a seed: PCG64
        self.steps = 0

    def next_batch(self) -> np.ndarray:
        raise NotImplementedError

    def _base_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_items": self.num_items, "steps": self.steps,
                "rng": _jsonable_rng_state(self.rng.bit_generator.state)}

    def _load_base(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("num_items") != self.num_items:
            raise ValueError(
                f"sampler: saved state is for {state.get('kind')} over {state.get('num_items')} items, "
                f"not {self.kind} over {self.num_items}"
            )
        self.rng.bit_generator.state = state["rng"]
        self.steps = int(state["steps"])


def _jsonable_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    # PCG64 state is nested dicts of Python ints (arbitrary size): JSON handles them exactly.
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _jsonable_rng_state(v)
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        else:
            out[k] = v
    return out


class PoissonSampler(_Sampler):
    """Each of ``num_items`` indices included independently with probability ``sample_rate``."""

    kind = "poisson"

    def __init__(self, num_items: int, sample_rate: float, seed: int | None = None) -> None:
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate: must be in (0, 1], got {sample_rate!r}")
        super().__init__(num_items, seed)
        self.sample_rate = float(sample_rate)

    def next_batch(self) -> np.ndarray:
        """Sorted indices of this step's batch (possibly empty)."""
        self.steps += 1
        mask = self.rng.random(self.num_items) < self.sample_rate
        return np.flatnonzero(mask)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        if float(state["sample_rate"]) != self.sample_rate:
            raise ValueError(f"sampler: saved sample_rate {state['sample_rate']} != {self.sample_rate}")


class ShuffledBatchSampler(_Sampler):
    """Fixed-size batches from a stream of random permutations (see the module docstring)."""

    kind = "fixed_batch"

    def __init__(self, num_items: int, batch_size: int, seed: int | None = None) -> None:
        if not isinstance(batch_size, int) or not 1 <= batch_size <= num_items:
            raise ValueError(f"batch_size: must be an integer in [1, {num_items}], got {batch_size!r}")
        super().__init__(num_items, seed)
        self.batch_size = batch_size
        self._buffer: list[int] = []

    def _refill(self) -> None:
        """Append a fresh permutation; if the pending batch would straddle it, keep the records
        already in that batch out of the part of the new permutation that completes it."""
        tail = list(self._buffer)  # records pending for the next batch (fewer than batch_size)
        perm = self.rng.permutation(self.num_items)
        need = self.batch_size - len(tail)
        if tail and need > 0:
            taken = set(tail)
            prefix = perm[:need]
            bad = [i for i in range(need) if int(prefix[i]) in taken]
            if bad:
                # swap each conflicting record with a random non-conflicting one beyond the prefix
                candidates = [j for j in range(need, self.num_items) if int(perm[j]) not in taken]
                choice = self.rng.choice(len(candidates), size=len(bad), replace=False)
                for i, c in zip(bad, choice):
                    j = candidates[int(c)]
                    perm[i], perm[j] = perm[j], perm[i]
        self._buffer.extend(int(v) for v in perm)

    def next_batch(self) -> np.ndarray:
        while len(self._buffer) < self.batch_size:
            self._refill()
        batch = np.asarray(self._buffer[: self.batch_size], dtype=np.int64)
        del self._buffer[: self.batch_size]
        self.steps += 1
        return np.sort(batch)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "batch_size": self.batch_size, "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"sampler: saved batch_size {state['batch_size']} != {self.batch_size}")
        self._buffer = [int(v) for v in state["buffer"]]


Sampler = PoissonSampler | ShuffledBatchSampler


def make_sampler(kind: str, num_items: int, *, sample_rate: float | None = None,
                 batch_size: int | None = None, seed: int | None = None) -> Sampler:
    """``poisson`` (needs ``sample_rate``) or ``fixed_batch`` (needs ``batch_size``)."""
    if kind == "poisson":
        if sample_rate is None:
            raise ValueError("sample_rate: required for Poisson sampling")
        return PoissonSampler(num_items, sample_rate, seed)
    if kind == "fixed_batch":
        if batch_size is None:
            raise ValueError("batch_size: required for fixed-batch sampling")
        return ShuffledBatchSampler(num_items, batch_size, seed)
    raise ValueError(f"sampling: must be 'poisson' or 'fixed_batch', got {kind!r}")
