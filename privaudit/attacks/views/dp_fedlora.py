"""The auditor's attacks on the server's view of a ``dp_fedlora`` run (registered for the mechanism).

* ``client_update_membership`` — membership of records from the clients' per-round releases. For
  each client k and round t the server holds the global state θ_t it sent and the client's noisy
  factors; a record x scores s_k(x) = mean over k's rounds of ℓ(x; θ_t) − ℓ(x; θ_t ⊕ release_{k,t})
  (how much the client's release lowers x's loss), and score(x) = max_k s_k(x): the attack does not
  need to know which client holds x. Members: training records; non-members: records outside the
  training set. Records are split at a fixed fraction: metrics only, no ε bound.
* ``client_update_canaries`` — the same score for the data canaries, which were included
  independently with probability ½: a one-run ε lower bound (record level, hence also below any
  client-level ε).
* ``global_loss``, ``global_canary_membership`` — the built-in loss and canary attacks on the final
  global model (which the server also holds).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from privaudit.attacks.interface import AttackScores, AuditContext
from privaudit.data import Record


@torch.no_grad()
def record_losses(model: torch.nn.Module, tokenizer: Any, records: Sequence[Record], cfg: Any,
                  device: torch.device) -> np.ndarray:
    """Per-record loss (cross-entropy, or mean token NLL) of ``records`` under ``model``."""
    from privaudit.mechanisms.training import encode, per_sample_losses

    model.eval()
    out: list[np.ndarray] = []
    bs = cfg.training.eval_batch_size
    for i in range(0, len(records), bs):
        batch = encode(tokenizer, list(records[i:i + bs]), cfg, device)
        out.append(per_sample_losses(model, batch, cfg.task).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def update_scores(model: torch.nn.Module, tokenizer: Any, records: Sequence[Record], cfg: Any,
                  device: torch.device, rounds: Sequence[Mapping[str, Any]],
                  tensors: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, int]:
    """max_k mean_t [ℓ(x; θ_t) − ℓ(x; θ_t ⊕ release_{k,t})] for every record; (scores, client-rounds)."""
    from privaudit.models import load_trainable_state_dict

    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    n_updates = 0
    for info in rounds:
        t = int(info["round"])
        if not info["clients"]:
            continue
        prefix = f"r{t}.global."
        g = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_trainable_state_dict(model, g)
        base = record_losses(model, tokenizer, records, cfg, device)
        for c in info["clients"]:
            cp = f"r{t}.c{c}."
            load_trainable_state_dict(model, {**g, **{k[len(cp):]: v for k, v in tensors.items() if k.startswith(cp)}})
            diff = base - record_losses(model, tokenizer, records, cfg, device)
            sums[c] = sums.get(c, 0.0) + diff  # type: ignore[assignment]
            counts[c] = counts.get(c, 0) + 1
            n_updates += 1
    if not sums:
        return np.zeros(len(records)), 0
    return np.max(np.stack([sums[c] / counts[c] for c in sums]), axis=0), n_updates


def server_view_attacks(ctx: AuditContext) -> list[AttackScores]:
    from safetensors.torch import load_file

    from privaudit.attacks.released_model import _canary_membership_attack, _canary_records, _loss_attack, _one_run_ok
    from privaudit.mechanisms.dp_fedlora.server import SERVER_VIEW_JSON, SERVER_VIEW_TENSORS
    from privaudit.mechanisms.training import build_model

    run, cfg = ctx.run, ctx.run.config
    out: list[AttackScores] = []
    device = next(run.model.parameters()).device
    # the final global model, which the server holds too
    if ctx.members and ctx.nonmembers:
        out.extend(replace(a, name="global_loss") for a in _loss_attack(ctx))
    if len(ctx.data.corpus.canaries) >= 2:
        out.extend(replace(a, name="global_canary_membership") for a in _canary_membership_attack(ctx))
    meta_path, t_path = run.run_dir / SERVER_VIEW_JSON, run.run_dir / SERVER_VIEW_TENSORS
    if not (meta_path.exists() and t_path.exists()):
        ctx.log("server view: not kept by this run (options.keep_server_view: false)")
        return out
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tensors = load_file(str(t_path))
    num_labels = max(2, len(run.manifest.get("data", {}).get("label_names", [])))
    model, tok = build_model(cfg, num_labels, device)
    ctx.log(f"server view: scoring records against {sum(len(r['clients']) for r in meta['rounds'])} client releases")
    if ctx.members and ctx.nonmembers:
        recs = list(ctx.members) + list(ctx.nonmembers)
        s, n_up = update_scores(model, tok, recs, cfg, device, meta["rounds"], tensors)
        m = len(ctx.members)
        out.append(AttackScores("client_update_membership", "membership", s[:m], s[m:],
                                metrics={"client_releases": n_up},
                                note="score = max over clients of the mean loss drop caused by the client's "
                                     "release; records split at a fixed fraction: metrics only"))
    canaries, included = _canary_records(ctx)
    if len(canaries) >= 2:
        s, n_up = update_scores(model, tok, canaries, cfg, device, meta["rounds"], tensors)
        bound, why = _one_run_ok(ctx)
        out.append(AttackScores("client_update_canaries", "canary", s[included], s[~included], bound=bound,
                                metrics={"client_releases": n_up},
                                note=why or "data canaries scored against every client release (key-free: "
                                            "max over clients)"))
    return out
