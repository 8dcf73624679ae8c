"""The server loop, shared by the in-process backend and Flower: before each round it appends the
round's events to the ledger (write-ahead), then dispatches the sampled clients, records what it
received (the server's view, for the auditor) and aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from privaudit.mechanisms.dp_fedlora.aggregation import aggregate, client_factors, weights
from privaudit.mechanisms.dp_fedlora.client import ClientUpdate
from privaudit.mechanisms.dp_fedlora.partition import new_participation_levels
from privaudit.mechanisms.dp_fedlora.plan import FedLoraOptions, FedLoraPlan, events_before_round

Dispatch = Callable[[int, Sequence[int], Mapping[str, torch.Tensor]], list[ClientUpdate]]
SERVER_VIEW_TENSORS = "server_view.safetensors"
SERVER_VIEW_JSON = "server_view.json"


@dataclass
class ServerView:
    """Everything the server saw: per round, the global state it sent (``r<t>.global.<name>``) and each
    client's released tensors reconstructed as absolute factors (``r<t>.c<k>.<name>``)."""

    keep: bool = True
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def record(self, rnd: int, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
               factors: Sequence[Mapping[str, torch.Tensor]], w: Sequence[float]) -> None:
        self.rounds.append({"round": rnd, "clients": [u.client for u in updates], "weights": list(w),
                            "n_records": [u.n_records for u in updates], "kind": [u.kind for u in updates]})
        if not self.keep:
            return
        for n, v in global_state.items():
            self.tensors[f"r{rnd}.global.{n}"] = v.detach().to("cpu").contiguous().clone()
        for u, f in zip(updates, factors):
            for n, v in f.items():
                self.tensors[f"r{rnd}.c{u.client}.{n}"] = v.detach().to("cpu").contiguous().clone()


def run_rounds(plan: FedLoraPlan, opts: FedLoraOptions, schedule: Sequence[Sequence[int]],
               global_state: dict[str, torch.Tensor], init_state: Mapping[str, torch.Tensor], scaling: float,
               dispatch: Dispatch, *, ledger: Any = None, view: ServerView | None = None,
               progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> dict[str, torch.Tensor]:
    """Run every round of ``schedule``; returns the final global state."""
    levels = new_participation_levels(schedule, plan.num_clients)  # the server sees whom it sampled
    expected = plan.clients_per_round if opts.client_sampling == "poisson" else None
    for rnd, clients in enumerate(schedule):
        if ledger is not None:
            for ev in events_before_round(plan, levels[rnd]):
                ledger.append(ev)  # write-ahead: durable before any client of this round releases
        updates = dispatch(rnd, list(clients), global_state) if clients else []
        updates = sorted(updates, key=lambda u: u.client)
        if [u.client for u in updates] != sorted(clients):
            raise RuntimeError(f"round {rnd}: expected updates from clients {sorted(clients)}, "
                               f"got {[u.client for u in updates]}")
        factors = [client_factors(u, global_state) for u in updates]
        w = weights(updates, opts.sample_weighted, expected) if updates else []
        if view is not None:
            view.record(rnd, global_state, updates, factors, w)
        global_state = aggregate(global_state, factors, w, opts.aggregation, init_state, scaling)
        if progress is not None:
            progress(rnd + 1, len(schedule), {"clients": list(clients),
                                              "local_loss": [u.local_loss for u in updates]})
    return global_state
