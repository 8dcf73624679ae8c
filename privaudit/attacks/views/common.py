"""The auditor's attacks on an observer's view (not the released model), one function per mechanism.

Registered by the mechanism modules at import (keyed by mechanism name, see
:func:`privaudit.attacks.views.register_view_attack`):

* :func:`privtune_server_view` (``privtune``): what PrivTune's server received — the noisy bottom
  outputs of training records, released once each through the run's mechanism (the bottom is frozen
  and public, so the view does not depend on the trained top) — attacked by
  :func:`privaudit.attacks.views.privtune.attack_server_view`: nearest-neighbour, learned and
  optimisation inversion (token recovery, F1, exact PII recovery) and attribute inference (logistic
  regression, MLP, kNN against the majority baseline);
* :func:`he_worker_view` (``he_lora``): what HE-LoRA's worker received — the ciphertexts of the first
  remote layer's quantized inputs (:mod:`privaudit.attacks.views.he_lora`) — attacked by the same
  nearest-neighbour and learned inversion and attribute inference, next to a *positive control*: the
  same attacks on the unencrypted quantized rows (what a worker would see without encryption).

The attacker's auxiliary data is never a victim's: for the generated corpus, records of fictional
people generated independently (another seed, no canaries); for loaded data, held-out records (which
may share people with the training set when records are not grouped by person; stated in the note).
Every rate comes with a Clopper–Pearson interval (token positions of one record are not independent,
so the token-level interval is optimistic; the record count is given beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from privaudit.attacks.interface import AttackScores, AuditContext
from privaudit.attacks.metrics import clopper_pearson

if TYPE_CHECKING:
    from privaudit.data import Record

__all__ = ["ViewBudget", "PRIVTUNE_BUDGET", "HE_BUDGET",
           "auxiliary_records", "with_intervals"]

_AUX_SEED_OFFSET = 0x5EED_A0C5


@dataclass(frozen=True)
class ViewBudget:
    """How much the view attacks do: victims for inversion and attribute inference (each capped by the
    audit's ``max_records``), auxiliary people generated for the attacker, attack steps."""

    inversion_victims: int = 100
    attribute_victims: int = 400
    aux_people: int = 200
    learned_steps: int = 300
    optim_steps: int = 60
    max_vocabulary: int = 3000  # HE view: candidate tokens encrypted for the nearest-neighbour attack
    learned_hidden: int = 512


PRIVTUNE_BUDGET = ViewBudget()
HE_BUDGET = ViewBudget(inversion_victims=40, attribute_victims=40, aux_people=40, learned_steps=150,
                       max_vocabulary=1500, learned_hidden=256)


def with_intervals(result: dict[str, Any], confidence: float = 0.95) -> dict[str, Any]:
    """Add Clopper–Pearson intervals to an attack result's rates (in place; returns it):
    ``token_recovery_ci``, ``pii_exact_ci`` and ``beats_chance`` (the interval's lower end above the
    chance rate) for inversion; attribute results carry ``accuracy_ci`` already."""
    m = result.get("metrics") or {}
    alpha = 1 - confidence
    n = m.get("n_tokens")
    if m.get("token_recovery") is not None and n:
        k = int(round(m["token_recovery"] * n))
        m["token_recovery_ci"] = list(clopper_pearson(k, int(n), alpha))
        chance = m.get("chance_rate")
        if chance is not None:
            m["beats_chance"] = bool(m["token_recovery_ci"][0] > chance)
    nf = m.get("n_pii_fields")
    if m.get("pii_exact") is not None and nf:
        m["pii_exact_ci"] = list(clopper_pearson(int(round(m["pii_exact"] * nf)), int(nf), alpha))
    if m:
        m.setdefault("confidence", confidence)
    return result


def auxiliary_records(ctx: AuditContext, n_people: int) -> tuple[list["Record"], str]:
    """(records, description) of the attacker's auxiliary data (see the module docstring)."""
    cfg = ctx.run.config
    if cfg.data.source == "synthetic":
        from privaudit.data import generate_corpus

        s = cfg.data.synthetic
        seed = (int(s.seed) + _AUX_SEED_OFFSET + ctx.seed) % (2 ** 31)
        corpus = generate_corpus(n_people=n_people, records_per_person=s.records_per_person, n_canaries=0, seed=seed)
        return list(corpus.records), (f"{len(corpus.records)} records of {n_people} fictional people generated "
                                      f"independently (corpus seed {seed}), never trained on")
    train_ids = {r.id for r in ctx.data.train}
    held = [r for r in ctx.data.corpus.records if r.id not in train_ids and r.canary_id is None]
    return held, (f"{len(held)} held-out records (not trained on; they may share people with the training "
                  "set where records are not grouped by person)")


def _victims(ctx: AuditContext, n: int) -> list["Record"]:
    members = [r for r in ctx.data.train if r.canary_id is None]
    rng = np.random.default_rng([ctx.seed, 0x56494557])
    idx = np.sort(rng.permutation(len(members))[: min(n, len(members))])
    return [members[int(i)] for i in idx]


def _has_attribute(records: Sequence["Record"]) -> bool:
    return len({r.sensitive for r in records if r.sensitive}) >= 2


def _to_scores(results: Sequence[dict[str, Any]], prefix: str, note: str, confidence: float) -> list[AttackScores]:
    out = []
    for r in results:
        r = with_intervals(dict(r, metrics=dict(r.get("metrics") or {})), confidence)
        metrics = dict(r["metrics"])
        if r.get("skipped"):
            metrics["skipped"] = r["skipped"]
        out.append(AttackScores(prefix + r["name"], r["kind"], metrics=metrics, note=note))
    return out


# --------------------------------------------------------------------------------------------------
# HE-LoRA: the worker's view

_CLIENTS: dict[str, Any] = {}
