"""Partitions of a training set over clients, and the server's client-sampling schedule.

Both are deterministic functions of public seeds (``options.partition_seed``,
``options.schedule_seed``): the server knows who holds how many records and whom it sampled. The one
exception is ``client_sample_secret``: the Poisson schedule is drawn from the run's secret (a CSPRNG
substream of its master key, or the noise seed when one is set; the server still sees it: it receives
each release under the client's id).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np


def iid_partition(n_records: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle record indices and split them into ``num_clients`` near-equal parts."""
    if num_clients > n_records:
        raise ValueError(f"options.num_clients: {num_clients} clients for only {n_records} training records")
    perm = np.random.default_rng(seed).permutation(n_records)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(labels: Sequence[int], num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 1000) -> list[list[int]]:
    """Non-IID label skew: for every label, the client shares are drawn from Dir(α·1); redrawn until
    every client holds at least ``min_size`` records (``ValueError`` after ``max_tries``)."""
    if alpha <= 0:
        raise ValueError(f"options.dirichlet_alpha: must be > 0, got {alpha}")
    y = np.asarray(labels)
    if num_clients * min_size > y.size:
        raise ValueError(f"options.num_clients: {num_clients} clients for only {y.size} training records")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for lab in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == lab))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"options.dirichlet_alpha: no Dirichlet({alpha}) partition over {num_clients} clients gives "
                     f"every client {min_size} record(s) in {max_tries} draws; raise alpha")


def client_schedule(num_clients: int, per_round: int, rounds: int, sampling: Literal["fixed", "poisson"],
                    seed: int | None, generator: Any = None) -> list[list[int]]:
    """The clients sampled in each round: ``fixed`` = ``per_round`` distinct clients uniformly at random;
    ``poisson`` = each client independently with probability ``per_round / num_clients``. Drawn from
    ``generator`` if given (a secret schedule: a :class:`privaudit.mechanisms.rng.SecureGenerator`),
    else from numpy's PCG64 seeded by ``seed`` (a public schedule)."""
    if per_round > num_clients:
        raise ValueError(f"options.clients_per_round: {per_round} exceeds options.num_clients {num_clients}")
    if generator is None and seed is None:
        raise ValueError("client_schedule: give a seed or a generator")
    rng = generator if generator is not None else np.random.default_rng(
        np.random.SeedSequence([int(seed) & (2**63 - 1), 0x5343484544]))  # type: ignore[arg-type]
    out: list[list[int]] = []
    for _ in range(rounds):
        if sampling == "fixed":
            out.append(sorted(int(c) for c in rng.choice(num_clients, per_round, replace=False)))
        else:
            out.append([int(c) for c in np.flatnonzero(rng.random(num_clients) < per_round / num_clients)])
    return out


def new_participation_levels(schedule: Sequence[Sequence[int]], num_clients: int) -> list[int]:
    """For each round, by how much the maximum number of participations of any one client grows when
    that round's clients release (the ledger's write-ahead increments; their sum is the maximum)."""
    counts = np.zeros(num_clients, dtype=np.int64)
    top = 0
    out: list[int] = []
    for clients in schedule:
        for c in clients:
            counts[c] += 1
        new_top = int(counts.max()) if num_clients else 0
        out.append(new_top - top)
        top = new_top
    return out
