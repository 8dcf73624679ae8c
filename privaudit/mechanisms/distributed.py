"""DP-SGD across processes with ``torch.distributed`` (DDP semantics; gloo on CPU, nccl on GPU).

Launched with ``torchrun --nproc-per-node N -m privaudit train CONFIG -o RUN_DIR`` (or
``privaudit train --nproc N``): every process runs the same config; the world is read from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).

One step, with W processes (record level, the accounting of the one-process run unchanged):

1. rank 0 draws the batch from the run's one sampling stream (Poisson or fixed batch, records and
   member canaries as units) and broadcasts the unit indices; every rank takes its share of the
   records (``indices[rank::W]``), so each record of the batch is processed exactly once;
2. each rank computes the clipped per-sample gradient sum of its share; the canaries (rank 0 only,
   so each is counted once) are added to rank 0's share;
3. rank 0 appends the step's event to the ledger (write-ahead, fsynced) and only then adds the Gaussian
   noise N(0, σ²C²) — drawn once, on rank 0 — to its partial sum;
4. the partial sums are all-reduced (sum): every rank obtains Σ clip(g) + N(0, σ²C²), divides by the
   same denominator and applies the same optimizer step.

Why the noise is added once on rank 0 rather than N(0, σ²C²/W) on every rank: the sum of W
independent draws has the same distribution, but then every rank's draw would have to be secret from
the others and a rank that fails to add its share silently weakens the guarantee; one draw on the rank
that also writes the ledger keeps "one ledger event ⇔ one noise draw" in one place, and no process ever
holds the exact noiseless total (each sees only its own share). Since no rank can finish the all-reduce
before rank 0 joins it, and rank 0 joins after its fsync, the ledger holds every release before any
process applies it.

Only rank 0 writes the run directory (ledger, checkpoints, manifest, adapter, audit key). At the start
(fresh or resumed) rank 0's trainable weights, optimizer state and step count are broadcast, so the
other ranks never read the run directory. Resume works across the same world size (a checkpoint holds
nothing rank-specific, so another world size would also resume correctly, but is not tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch and numpy are imported where used: `import privaudit.runs` stays light
    import numpy as np
    import torch


@dataclass(frozen=True)
class World:
    """This process's place in the distributed run (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: must be an integer, got {raw!r}") from None


def world_from_env() -> World:
    """The world torchrun describes in the environment (a single process when ``WORLD_SIZE`` is unset)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK/WORLD_SIZE: rank {rank} is not in a world of {size}")
    return World(rank, size, local)


def init_world(world: World) -> str | None:
    """Join the process group of ``world`` (no-op for one process); returns the backend used: nccl when
    CUDA is available (each process on ``cuda:LOCAL_RANK``), gloo otherwise."""
    if not world.distributed:
        return None
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    return backend


def close_world(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_indices(world: World, indices: "np.ndarray | None") -> "np.ndarray":
    """Rank 0's batch ``indices`` on every rank."""
    import numpy as np

    if not world.distributed:
        assert indices is not None
        return indices
    import torch.distributed as dist

    box = [None if indices is None else np.asarray(indices, dtype=np.int64).tolist()]
    dist.broadcast_object_list(box, src=0)
    return np.asarray(box[0], dtype=np.int64)


def broadcast_object(world: World, obj: Any) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(world: World, tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (in place, same shapes on every rank) with rank 0's values."""
    if not world.distributed:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=0)


def share(world: World, indices: np.ndarray) -> np.ndarray:
    """This rank's share of the batch: every W-th index, starting at its rank."""
    return indices[world.rank::world.size]


def all_reduce_sum(world: World, tensors: Sequence[torch.Tensor]) -> None:
    """In place: every rank's ``tensors`` become the sum over ranks (one flat all-reduce)."""
    if not world.distributed or not tensors:
        return
    import torch
    import torch.distributed as dist

    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for t, part in zip(tensors, flat.split(sizes)):
        t.copy_(part.view_as(t))


def sharded_map(world: World, n: int, compute: Any) -> list[Any]:
    """``compute(indices) -> list`` (one result per index, in order) over ``range(n)``, split across the
    ranks (every W-th index) and gathered: every rank returns the full list in index order, equal to
    ``compute(range(n))`` in one process. Used by the audits' scoring pass (one forward pass per record)."""
    import numpy as np

    idx = np.arange(n, dtype=np.int64)
    if not world.distributed:
        return list(compute(idx))
    import torch.distributed as dist

    init_world(world)  # no-op when the process group is up (a training run); joins it otherwise
    mine = share(world, idx)
    part = list(compute(mine))
    if len(part) != len(mine):
        raise ValueError(f"compute: returned {len(part)} results for {len(mine)} indices")
    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, (mine.tolist(), part))
    out: list[Any] = [None] * n
    for ids, vals in parts:
        for i, v in zip(ids, vals):
            out[i] = v
    return out


__all__ = ["World", "sharded_map", "all_reduce_sum", "broadcast_indices", "broadcast_object", "broadcast_tensors",
           "close_world", "init_world", "share", "world_from_env"]
