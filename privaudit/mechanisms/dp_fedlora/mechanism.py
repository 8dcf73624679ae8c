"""``dp_fedlora``: federated LoRA with client-side clipping and noise (DP-FedLoRA, REFERENCES §1).

N clients hold a partition of the training set (IID, or Dirichlet label skew); each round the server
samples K of them (fixed K, or Poisson with rate K/N), each trains the global adapter for
``training.steps`` local steps, clips and perturbs what it sends (see the modes in
:mod:`.federated.plan` and :mod:`.federated.client`), and the server aggregates (FedAvg of the factors
as in the authors' code, or FLoRA stacking as in the paper: :mod:`.federated.aggregation`).

Observer: the **server**, which sees every sampled client's noisy release every round. Privacy unit:
client (``paper``, ``client_dp``) or record (``record_dp``); neighbours per ``privacy.neighbouring``.
The ledger is written ahead of each round (see :mod:`.federated.plan` for what it holds).

Options live in ``RunConfig.options`` (:class:`.federated.plan.FedLoraOptions`); ``backend: flower``
runs the same clients as Flower ``ClientApp`` s in Flower's simulation engine
(:mod:`.federated.flower_app`, extra ``privaudit[federated]``). The run directory additionally holds
``server_view.safetensors`` / ``server_view.json`` (what the server received, for the auditor's
per-round attacks) and the client partition in ``audit_key.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from privaudit.config import PrivacyPlan, RunConfig
from privaudit.data import Record
from privaudit.ledger.events import Event
from privaudit.mechanisms.dp_fedlora.partition import (
    client_schedule,
    dirichlet_partition,
    iid_partition,
    new_participation_levels,
)
from privaudit.mechanisms.dp_fedlora.plan import (
    FedLoraOptions,
    FedLoraPlan,
    all_events,
    claim_event,
    paper_noise_multiplier,
    parse_options,
    participation_events,
    tensor_inventory,
)

NAME = "dp_fedlora"
OBSERVER = "server"
RESUMABLE = False  # no checkpoints: an interrupted run is restarted in a new directory


def make_partition(opts: FedLoraOptions, records: Sequence[Record]) -> list[list[int]]:
    """Record indices per client (deterministic in ``options.partition_seed``)."""
    if opts.partition == "iid":
        return iid_partition(len(records), opts.num_clients, opts.partition_seed)
    return dirichlet_partition([r.label for r in records], opts.num_clients, opts.dirichlet_alpha,
                               opts.partition_seed)


def _noise_multiplier(cfg: RunConfig, opts: FedLoraOptions, q: float, steps: int) -> tuple[float, float | None, str | None]:
    """(z, calibrated ε, accountant). paper: the paper's Eq. 9 with ε = target per tensor; otherwise the
    given σ or one calibrated so that the ledger's composed ε ≤ target."""
    pv = cfg.privacy
    if pv.noise_multiplier is not None:
        if pv.noise_multiplier <= 0:
            raise ValueError("privacy.noise_multiplier: dp_fedlora needs noise (> 0); a non-private federation "
                             "makes no guarantee against the server")
        return float(pv.noise_multiplier), None, None
    assert pv.target_epsilon is not None
    if opts.mode == "paper":
        return paper_noise_multiplier(pv.target_epsilon, pv.delta), None, None
    if steps <= 0:
        raise ValueError("options.rounds: no client ever takes part; nothing to calibrate")
    from privaudit.accounting.calibrate import calibrate_noise

    res = calibrate_noise(pv.target_epsilon, pv.delta, q, steps, accountant=pv.accountant,
                          neighbouring=pv.neighbouring)
    return float(res.noise_multiplier), float(res.epsilon), str(res.accountant)


def resolve_plan(cfg: RunConfig, train_records: Sequence[Record], num_labels: int | None = None) -> FedLoraPlan:
    """The federated plan for ``train_records`` (schedule, participations, σ, tensor counts)."""
    if isinstance(train_records, int):
        raise ValueError("data: dp_fedlora resolves its plan from the training records (their partition)")
    opts = parse_options(cfg)
    n = len(train_records)
    if n < 1:
        raise ValueError("data: the training set is empty")
    partition = make_partition(opts, train_records)
    sizes = tuple(len(p) for p in partition)
    secret = opts.client_sample_secret
    schedule = None if secret else client_schedule(opts.num_clients, opts.clients_per_round, opts.rounds,
                                                   opts.client_sampling, opts.schedule_seed)
    # a secret schedule is unknown until the run: plan for the worst case, a client in every round
    participations = opts.rounds if schedule is None else sum(new_participation_levels(schedule, opts.num_clients))
    local_steps = int(cfg.training.steps or 0)
    batch = int(cfg.training.batch_size or 1)
    q_local = min(1.0, batch / min(sizes)) if opts.mode == "record_dp" else None
    if opts.mode == "record_dp":
        z, cal, acc = _noise_multiplier(cfg, opts, q_local, local_steps * int(participations or 0))  # type: ignore[arg-type]
        q = q_local
    else:  # the server sees whom it sampled: every participation is a full release
        q = 1.0
        z, cal, acc = _noise_multiplier(cfg, opts, 1.0, int(participations or 0))
    c = cfg.privacy.clip_norm
    clips = {"A": opts.clip_a or c, "B": opts.clip_b or c, "other": opts.clip_other or c}
    counts: dict[str, int] = {}
    if opts.mode == "paper":
        labels = num_labels or max(2, max(r.label for r in train_records) + 1)
        for t in tensor_inventory(cfg, opts, labels):
            counts[t.group] = counts.get(t.group, 0) + 1
    paper_eps = cfg.privacy.target_epsilon if opts.mode == "paper" and cfg.privacy.noise_multiplier is None else None
    return FedLoraPlan(
        noise_multiplier=z, sample_rate=float(q), steps=opts.rounds, sampling=cfg.training.sampling,  # type: ignore[arg-type]
        batch_size=batch, dataset_size=n, clip_norm=c, delta=cfg.privacy.delta,
        neighbouring=cfg.privacy.neighbouring, calibrated_epsilon=cal, calibration_accountant=acc,
        mode=opts.mode, privacy_unit="record" if opts.mode == "record_dp" else "client", rounds=opts.rounds,
        local_steps=local_steps, num_clients=opts.num_clients, clients_per_round=opts.clients_per_round,
        client_sample_secret=secret, participations=participations, client_sizes=sizes,
        local_sample_rate_max=q_local, clips=clips, tensor_counts=counts,
        schedule=None if schedule is None else tuple(tuple(s) for s in schedule),
        paper_epsilon_per_tensor=paper_eps,
    )


def _as_fed_plan(cfg: RunConfig, plan: PrivacyPlan | None, records: Sequence[Record] | None) -> FedLoraPlan:
    if isinstance(plan, FedLoraPlan):
        return plan
    if records is None:
        raise ValueError("plan: dp_fedlora needs its own plan (privaudit.mechanisms.dp_fedlora.mechanism.resolve_plan)")
    return resolve_plan(cfg, records)


def planned_events(cfg: RunConfig, plan: PrivacyPlan) -> list[Event]:
    """Every event a finished run appends (its claim first). Needs no weights when ``options.shapes``
    is given (paper mode), none at all in the other modes."""
    return all_events(_as_fed_plan(cfg, plan, None))


def ledger_header_extra(cfg: RunConfig) -> dict[str, Any]:
    """Header fields (runs hook): the privacy unit of the mode and how the federation is accounted."""
    opts = parse_options(cfg)
    return {
        "privacy_unit": "record" if opts.mode == "record_dp" else "client",
        "federated": {
            "mode": opts.mode, "rounds": opts.rounds, "num_clients": opts.num_clients,
            "clients_per_round": opts.clients_per_round, "local_steps": cfg.training.steps,
            "client_sampling": opts.client_sampling, "client_sample_secret": opts.client_sample_secret,
            "amplification_by_client_sampling": False,
            "observer_sees_sample": True,
            "aggregation": opts.aggregation,
            "accounting": "the releases of the most-participating client, no amplification (the server knows "
                          "whom it sampled)",
            "observer_assumption": ("the server receives and stores each sampled client's release under the "
                                    "client's id (no secure aggregation), so it learns the sample"
                                    + ("; the secret schedule is hidden from everyone else"
                                       if opts.client_sample_secret else "")),
        },
    }


def privacy_section(ledger: Any, plan: PrivacyPlan, cfg: RunConfig, metrics: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Manifest privacy fields (runs hook): ε of the ledger, the unit, and the federated summary (per
    tensor release, per client-round, per run, beside the paper's claim)."""
    from privaudit.accounting.summary import epsilon_section

    p = _as_fed_plan(cfg, plan, None)
    return {**epsilon_section(ledger, p.delta), "privacy_unit": p.privacy_unit,
            "federated": accounting_summary(p)}


def accounting_summary(plan: FedLoraPlan, accountant: str = "rdp") -> dict[str, Any]:
    """ε at the plan's δ: per tensor release, per client-round, per expected participation count
    (K·rounds/N client-rounds), and for the run (the ledger), next to the paper's per-tensor claim."""
    from privaudit.accounting.base import compute_epsilon
    from privaudit.ledger.events import GaussianEvent

    def eps(events: list[Event]) -> float | None:
        if not events:
            return 0.0
        e = compute_epsilon(events, plan.delta, accountant, plan.neighbouring).epsilon
        return float(e) if math.isfinite(e) else None

    one = participation_events(plan)
    expected = plan.clients_per_round * plan.rounds / plan.num_clients
    tensor = None
    if plan.mode == "paper":
        g = next(e for e in one if isinstance(e, GaussianEvent))
        tensor = eps([g.with_count(1)])
    claim = claim_event(plan)
    return {
        "accountant": accountant, "delta": plan.delta,
        "epsilon_per_tensor_release": tensor,
        "epsilon_per_client_round": eps(one),
        "expected_participations": expected,
        "epsilon_expected_participations": eps(one * max(1, round(expected))),
        "participations_accounted": plan.participations,
        "epsilon_run": eps([e for e in all_events(plan) if isinstance(e, GaussianEvent)]),
        "claimed_epsilon": None if claim is None else claim.epsilon,
        "claim_scope": None if claim is None else claim.scope,
    }


@dataclass
class FitResult:
    """The final global model (hooks removed), metrics, the plan; ``released_state`` = the global state
    (adapter, head and, with stacking, the merged base weights); ``run_files`` = the server's view."""

    model: nn.Module
    tokenizer: Any
    metrics: dict[str, Any]
    plan: FedLoraPlan
    theta_0: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient_canaries: Any = None
    released_state: dict[str, torch.Tensor] | None = None
    audit_key_extra: dict[str, Any] = field(default_factory=dict)
    run_files: dict[str, Any] = field(default_factory=dict)
    steps_done: int = 0
    resumed_from_step: int | None = None


def initial_global_state(model: nn.Module, opts: FedLoraOptions) -> dict[str, torch.Tensor]:
    """θ₀ as the server holds it: trainable tensors (+ the base weights of LoRA layers when stacking)."""
    from privaudit.models import trainable_state_dict

    state = trainable_state_dict(model, include_lora=True)
    if opts.aggregation == "stack":
        for n, p in model.named_parameters():
            if n.endswith(".base_layer.weight"):
                state[n] = p.detach().to("cpu", copy=True).contiguous()
    return state


def lora_scaling(cfg: RunConfig) -> float:
    return float(cfg.lora.alpha) / float(cfg.lora.rank)


def fit(cfg: RunConfig, train_records: Sequence[Record], heldout_records: Sequence[Record], *,
        ledger: Any = None, progress: Any = None, num_labels: int | None = None, plan: PrivacyPlan | None = None,
        checkpointer: Any = None, resume: bool = False) -> FitResult:
    """Run the federation (in-process or on Flower) and evaluate the final global model on
    ``heldout_records``. Appends the claim (paper mode) and every round's events to ``ledger`` ahead of
    the releases. No checkpoints: an interrupted run cannot resume (its ledger keeps what was spent)."""
    from privaudit.mechanisms.dp_fedlora.client import (
        SCHEDULE,
        ClientRuntime,
        RunSecret,
        derived_seed,
        set_state,
    )
    from privaudit.mechanisms.dp_fedlora.server import (
        SERVER_VIEW_JSON,
        SERVER_VIEW_TENSORS,
        ServerView,
        run_rounds,
    )
    from privaudit.mechanisms.training import build_model, evaluate
    from privaudit.models import resolve_device, trainable_state_dict

    if cfg.mechanism != NAME:
        raise ValueError(f"mechanism: {cfg.mechanism!r} is not {NAME!r}")
    if resume:
        raise ValueError("resume: dp_fedlora runs cannot be resumed; start a new run directory")
    opts = parse_options(cfg)
    if num_labels is None:
        labels = [r.label for r in list(train_records) + list(heldout_records)]
        num_labels = max(2, max(labels) + 1)
    fplan = plan if isinstance(plan, FedLoraPlan) else resolve_plan(cfg, train_records, num_labels)
    if fplan.dataset_size != len(train_records):
        raise ValueError(f"plan: made for {fplan.dataset_size} records, got {len(train_records)}")
    partition = make_partition(opts, train_records)
    secret = RunSecret.for_run(cfg.privacy.noise_seed)  # a CSPRNG master key unless seeded
    schedule = ([list(s) for s in fplan.schedule] if fplan.schedule is not None else
                client_schedule(opts.num_clients, opts.clients_per_round, opts.rounds, "poisson",
                                None if secret.secure else derived_seed(secret.seed, SCHEDULE),  # type: ignore[arg-type]
                                generator=secret.sampling(SCHEDULE) if secret.secure else None))
    device = resolve_device(cfg.model.device)
    model, tok = build_model(cfg, num_labels, device)
    theta_0 = trainable_state_dict(model)
    global_state = initial_global_state(model, opts)
    init_state = {k: v.clone() for k, v in global_state.items()}
    claim = claim_event(fplan)
    if ledger is not None and claim is not None:
        ledger.append(claim)
    view = ServerView(keep=opts.keep_server_view)
    runtime = ClientRuntime(cfg, opts, fplan, train_records, partition, secret, num_labels)
    metrics: dict[str, Any] = {}
    if cfg.training.eval_before:
        metrics["heldout_before"] = evaluate(model, tok, heldout_records, cfg, device)
    if opts.backend == "inprocess":
        runtime.attach(model, tok, device)

        def dispatch(rnd: int, clients: Sequence[int], g: Any) -> list[Any]:
            return [runtime.train(c, rnd, g) for c in clients]

        final = run_rounds(fplan, opts, schedule, global_state, init_state, lora_scaling(cfg), dispatch,
                           ledger=ledger, view=view, progress=progress)
    else:
        from privaudit.mechanisms.dp_fedlora.flower_app import run_on_flower

        final = run_on_flower(runtime, fplan, opts, schedule, global_state, init_state, lora_scaling(cfg),
                              ledger=ledger, view=view, progress=progress)
    set_state(model, final)
    model.eval()
    if heldout_records:
        metrics["heldout"] = evaluate(model, tok, heldout_records, cfg, device)
    metrics["federated"] = {"rounds": len(schedule), "client_rounds": sum(len(s) for s in schedule),
                            "participations_max": max(sum(c in s for s in schedule) for c in range(opts.num_clients))}
    run_files: dict[str, Any] = {}
    if opts.keep_server_view:
        run_files[SERVER_VIEW_TENSORS] = view.tensors
        run_files[SERVER_VIEW_JSON] = {
            "format_version": 1, "mode": fplan.mode, "aggregation": opts.aggregation, "rounds": view.rounds,
            "client_sizes": list(fplan.client_sizes), "lora_scaling": lora_scaling(cfg),
            "keys": "r<round>.global.<param> (the state sent to clients), r<round>.c<client>.<param> "
                    "(the client's release as absolute factors)",
        }
    key_extra = {"federated": {
        "partition": [[train_records[i].id for i in p] for p in partition],
        "partition_seed": opts.partition_seed, "schedule": schedule,
        "schedule_seed": None if opts.client_sample_secret else opts.schedule_seed,
        "noise_seed": "config" if cfg.privacy.noise_seed is not None else
                      "csprng: AES-256-CTR master key from os.urandom (not kept)",
    }}
    return FitResult(model, tok, metrics, fplan, theta_0, None, {k: v.contiguous() for k, v in final.items()},
                     key_extra, run_files, steps_done=len(schedule))
