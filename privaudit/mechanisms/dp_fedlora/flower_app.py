"""``backend: flower`` — the same clients as Flower ``ClientApp`` s under Flower's simulation engine.

Requires the optional extra ``privaudit[federated]`` (``flwr[simulation]``, which runs the ClientApps
in Ray worker processes; no GPU is needed). The ``ServerApp`` runs the same server loop as the
in-process backend (:func:`privaudit.mechanisms.dp_fedlora.server.run_rounds`): it appends each round's
events to the ledger before it sends the round's train messages, so the ledger is identical to the
in-process one. Each simulated SuperNode stands for one client; the message carries the client index
and round, and the ClientApp trains that client's partition (:class:`ClientRuntime`), building its
model once per worker process.

Across machines (Flower's deployment engine) the same ``make_client_app`` / ``make_server_app`` are
served by ``flower-supernode`` processes (one per client machine, each holding its own partition) and
a ``flower-superlink``; see the README section "Federated runs on Flower".
"""

from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import torch

from privaudit.mechanisms.dp_fedlora.client import ClientRuntime, ClientUpdate
from privaudit.mechanisms.dp_fedlora.plan import FedLoraOptions, FedLoraPlan
from privaudit.mechanisms.dp_fedlora.server import ServerView, run_rounds

_RUNTIMES: dict[str, ClientRuntime] = {}  # per worker process: one model per run


def _require_flwr() -> None:
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("options.backend: 'flower' needs the optional extra: pip install 'privaudit[federated]'") from None


def _state_record(state: Mapping[str, torch.Tensor]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def make_client_app(runtime: ClientRuntime, token: str) -> Any:
    """A ClientApp whose ``train`` handler trains the client named in the message."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # noqa: ARG001 - Flower's signature
        rt = _RUNTIMES.setdefault(token, runtime)
        conf = msg.content["config"]
        g = msg.content["global"].to_torch_state_dict()
        upd = rt.train(int(conf["client"]), int(conf["round"]), g)
        meta = ConfigRecord({"client": upd.client, "round": upd.round, "kind": upd.kind,
                             "n_records": upd.n_records,
                             "local_loss": upd.local_loss if math.isfinite(upd.local_loss) else -1.0})
        return Message(content=RecordDict({"tensors": _state_record(upd.tensors), "meta": meta}), reply_to=msg)

    return app


def _update_from(msg: Any) -> ClientUpdate:
    meta = msg.content["meta"]
    loss = float(meta["local_loss"])
    return ClientUpdate(int(meta["client"]), int(meta["round"]), str(meta["kind"]),  # type: ignore[arg-type]
                        {k: v.to(torch.float32) for k, v in msg.content["tensors"].to_torch_state_dict().items()},
                        int(meta["n_records"]), loss if loss >= 0 else math.nan)


def make_server_app(plan: FedLoraPlan, opts: FedLoraOptions, schedule: Sequence[Sequence[int]],
                    global_state: dict[str, torch.Tensor], init_state: Mapping[str, torch.Tensor], scaling: float,
                    result: dict[str, Any], *, ledger: Any = None, view: ServerView | None = None,
                    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                    num_nodes: int | None = None, timeout_s: float = 3600.0) -> Any:
    """A ServerApp running :func:`run_rounds` over the Flower grid; the final state (or the exception)
    is left in ``result``."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()
    want = num_nodes or plan.num_clients

    @app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ARG001
        try:
            deadline = time.monotonic() + 300
            nodes = sorted(grid.get_node_ids())
            while len(nodes) < want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower: only {len(nodes)} of {want} SuperNodes connected")
                time.sleep(0.05)
                nodes = sorted(grid.get_node_ids())

            def dispatch(rnd: int, clients: Sequence[int], g: Mapping[str, torch.Tensor]) -> list[ClientUpdate]:
                arrays = _state_record(g)
                msgs = [Message(content=RecordDict({"global": arrays,
                                                    "config": ConfigRecord({"round": rnd, "client": c})}),
                                message_type=MessageType.TRAIN, dst_node_id=nodes[c % len(nodes)],
                                group_id=str(rnd)) for c in clients]
                replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
                errors = [str(r.error) for r in replies if r.has_error()]
                if errors or len(replies) != len(msgs):
                    raise RuntimeError(f"flower: round {rnd}: {len(replies)} of {len(msgs)} replies; "
                                       f"errors: {errors[:2]}")
                return [_update_from(r) for r in replies]

            result["final"] = run_rounds(plan, opts, schedule, global_state, init_state, scaling, dispatch,
                                         ledger=ledger, view=view, progress=progress)
        except BaseException as exc:  # surfaced by run_on_flower
            result["error"] = exc

    return app


def run_on_flower(runtime: ClientRuntime, plan: FedLoraPlan, opts: FedLoraOptions, schedule: Sequence[Sequence[int]],
                  global_state: dict[str, torch.Tensor], init_state: Mapping[str, torch.Tensor], scaling: float, *,
                  ledger: Any = None, view: ServerView | None = None,
                  progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> dict[str, torch.Tensor]:
    """Run the federation under Flower's simulation engine (Ray); returns the final global state."""
    _require_flwr()
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    result: dict[str, Any] = {}
    token = uuid.uuid4().hex
    server = make_server_app(plan, opts, schedule, global_state, init_state, scaling, result, ledger=ledger,
                             view=view, progress=progress)
    cpus = os.cpu_count() or 1
    run_simulation(server, make_client_app(runtime, token), num_supernodes=plan.num_clients,
                   backend_config={"client_resources": {"num_cpus": min(opts.flower_num_cpus, cpus), "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "log_to_driver": False}})
    if "error" in result:
        raise result["error"]
    if "final" not in result:
        raise RuntimeError("flower: the simulation ended without a result")
    return result["final"]
