"""The auditor's attacks on an observer's view (not the released model), one function per mechanism.

Registered by the mechanism modules at import (keyed by mechanism name, see
:func:`privaudit.audit.auditor.register_view_attack`):

* :func:`privtune_server_view` (``privtune``): what PrivTune's server received — the noisy bottom
  outputs of training records, released once each through the run's mechanism (the bottom is frozen
  and public, so the view does not depend on the trained top) — attacked by
  :func:`privaudit.mechanisms.privtune.attack_server_view`: nearest-neighbour, learned and
  optimisation inversion (token recovery, F1, exact PII recovery) and attribute inference (logistic
  regression, MLP, kNN against the majority baseline);
* :func:`he_worker_view` (``he_lora``): what HE-LoRA's worker received — the ciphertexts of the first
  remote layer's quantized inputs (:mod:`privaudit.attacks.worker_view`) — attacked by the same
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

from privaudit.audit.auditor import AttackScores, AuditContext
from privaudit.audit.bounds import clopper_pearson

if TYPE_CHECKING:
    from privaudit.data import Record

__all__ = ["ViewBudget", "PRIVTUNE_BUDGET", "HE_BUDGET", "privtune_server_view", "he_worker_view",
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
# PrivTune: the server's view


def privtune_server_view(ctx: AuditContext) -> list[AttackScores]:
    """Inversion and attribute attacks on what a PrivTune server received (see the module docstring)."""
    from privaudit.attacks.inversion import ALL_ATTACKS, InversionSettings
    from privaudit.mechanisms import privtune as pt
    from privaudit.models import resolve_device

    cfg = ctx.run.config
    budget = PRIVTUNE_BUDGET
    confidence = float(ctx.settings.get("confidence", 0.95))
    cap = int(ctx.settings.get("max_records", 1000))
    inv_victims = _victims(ctx, min(budget.inversion_victims, cap))
    attr_victims = _victims(ctx, min(budget.attribute_victims, cap))
    aux, aux_text = auxiliary_records(ctx, budget.aux_people)
    settings = pt.settings_of(cfg)
    num_labels = max(2, len(ctx.run.manifest.get("data", {}).get("label_names", [])))
    ctx.log("privtune: the server's view (vocabulary at the split)")
    split = pt.build_split_model(cfg, settings, num_labels, resolve_device(cfg.model.device))
    inv_names = [a for a in ALL_ATTACKS if a.startswith("inversion_")]
    att_names = [a for a in ALL_ATTACKS if a.startswith("attribute_")]
    attack_settings = InversionSettings(learned_steps=budget.learned_steps, optim_steps=budget.optim_steps)
    note = (f"server's view: one release of each victim training record through the run's mechanism (mode "
            f"{settings.mode}, η = {settings.eta} {settings.eta_unit}); attacker's auxiliary data: {aux_text}")
    try:
        ctx.log(f"privtune: inversion attacks on {len(inv_victims)} records")
        results = pt.attack_server_view(cfg, inv_victims, aux, which=inv_names, split=split,
                                        attack_settings=attack_settings, seed=ctx.seed, num_labels=num_labels)
        if _has_attribute(attr_victims) and _has_attribute(aux):
            ctx.log(f"privtune: attribute inference on {len(attr_victims)} records")
            results += pt.attack_server_view(cfg, attr_victims, aux, which=att_names, split=split,
                                             attack_settings=attack_settings, seed=ctx.seed, num_labels=num_labels)
        else:
            results += [{"name": a, "kind": "attribute", "metrics": {},
                         "skipped": "the data has no sensitive attribute with two or more values"} for a in att_names]
    finally:
        split.remove_hooks()
    return _to_scores(results, "", note, confidence)


# --------------------------------------------------------------------------------------------------
# HE-LoRA: the worker's view

_CLIENTS: dict[str, Any] = {}


def _client(backend: Any) -> Any:
    """One key pair per backend parameter set and process (key generation takes seconds)."""
    import json

    key = json.dumps(backend.parameters(), sort_keys=True, default=str)
    if key not in _CLIENTS:
        _CLIENTS[key] = backend.keygen()
    return _CLIENTS[key]


def he_worker_view(ctx: AuditContext) -> list[AttackScores]:
    """Inversion and attribute attacks on the ciphertexts an HE-LoRA worker received, with the same
    attacks on the unencrypted quantized rows as a positive control (see the module docstring).

    The victims' rows are encrypted under a fresh key of the run's scheme (the run's key is not kept;
    ciphertexts under any key of the scheme are identically distributed). The attacker is *stronger*
    than the real worker: it may encrypt its auxiliary records and the vocabulary under that same key
    (an encryption oracle), and it trains its inverter on those pairs."""
    import torch

    from privaudit.attacks.inversion import AuxData, BottomInfo, attack_representations
    from privaudit.attacks.worker_view import ciphertext_view, first_remote_inputs, quantized_view, vocabulary_inputs
    from privaudit.mechanisms.he_backend import get_backend, glwe_available
    from privaudit.mechanisms.he_lora import HESettings

    cfg = ctx.run.config
    settings = HESettings.from_options(cfg.options)
    budget = HE_BUDGET
    confidence = float(ctx.settings.get("confidence", 0.95))
    cap = int(ctx.settings.get("max_records", 1000))
    victims = _victims(ctx, min(budget.inversion_victims, cap))
    aux, aux_text = auxiliary_records(ctx, budget.aux_people)
    model, tok = ctx.run.model, ctx.run.tokenizer
    ctx.log(f"he_lora: the worker's view of {len(victims)} records")
    x_vic, ids_vic, layer = first_remote_inputs(model, tok, victims, cfg, settings.remote_lm_head)
    x_aux, ids_aux, _ = first_remote_inputs(model, tok, aux, cfg, settings.remote_lm_head)
    special = frozenset(int(i) for i in tok.all_special_ids)
    cand = sorted({int(t) for ids in ids_vic + ids_aux for t in ids.tolist()} - special)
    if len(cand) < budget.max_vocabulary:  # more of the corpus' tokens, as candidates the attacker may consider
        extra = sorted({int(t) for r in ctx.data.corpus.records[:500] for t in tok(r.text)["input_ids"]}
                       - special - set(cand))
        cand += extra[: budget.max_vocabulary - len(cand)]
    cand = sorted(cand)
    vocab_ids = torch.tensor(cand, dtype=torch.long)
    vocab_x = vocabulary_inputs(model, tok, vocab_ids, settings.remote_lm_head)
    which = ["inversion_nn", "inversion_learned"]
    attribute = _has_attribute(victims) and _has_attribute(aux)
    if attribute:
        which += ["attribute_logreg", "attribute_mlp", "attribute_knn"]
    from privaudit.attacks.inversion import InversionSettings, pii_token_spans

    inv_settings = InversionSettings(learned_steps=budget.learned_steps, learned_hidden=budget.learned_hidden)
    spans = [pii_token_spans(tok, ids, r.fields) for ids, r in zip(ids_vic, victims)]
    sens_vic = [r.sensitive for r in victims]
    sens_aux = [r.sensitive for r in aux]

    def run(vic: list[Any], aux_view: list[Any], vocab: Any) -> list[dict[str, Any]]:
        return attack_representations(vic, ids_vic, AuxData(aux_view, ids_aux, sens_aux),
                                      BottomInfo(vocab_ids, vocab, special), which=which, sensitive=sens_vic,
                                      pii_spans=spans, settings=inv_settings, seed=ctx.seed)

    n = settings.n_bits
    ctx.log("he_lora: positive control on the unencrypted quantized rows")
    control = run(quantized_view(x_vic, n), quantized_view(x_aux, n), torch.stack(quantized_view([vocab_x], n))[0])
    base = (f"first remote layer '{layer}', {n}-bit per-token quantization; attacker's auxiliary data: {aux_text}; "
            f"{len(cand)} candidate tokens")
    out = _to_scores(control, "control_unencrypted_",
                     "positive control: the same attack on the quantized rows a worker would receive WITHOUT "
                     f"encryption (shows the attack's power); {base}", confidence)
    not_applicable = {"name": "inversion_optim", "kind": "inversion", "metrics": {},
                      "skipped": "not applicable: without the secret key a ciphertext is not a differentiable "
                                 "function of the input"}
    if settings.mode == "clear":
        skipped = [dict(not_applicable, name=w, skipped="clear mode: the run used no worker") for w in which]
        return out + _to_scores(skipped, "worker_", "nothing was sent to a worker", confidence)
    if not glwe_available():
        skipped = [dict(not_applicable, name=w, skipped="the glwe backend (concrete-ml-extensions) is not installed")
                   for w in which]
        return out + _to_scores(skipped, "worker_", base, confidence)
    ctx.log("he_lora: encrypting the worker's view (GLWE)")
    backend = get_backend(settings.backend)
    client = _client(backend)
    enc_vic = ciphertext_view(x_vic, n, client)
    enc_aux = ciphertext_view(x_aux, n, client)
    enc_vocab = ciphertext_view([vocab_x], n, client)[0]
    worker = run(enc_vic, enc_aux, enc_vocab) + [not_applicable]
    note = (f"worker's view: each token row's {backend.scheme} ciphertext ({backend.security_bits}-bit security "
            f"stated), as uint64 words; the attacker gets an encryption oracle under the victims' key (stronger "
            f"than the real worker); the run was in {settings.mode} mode; {base}")
    return out + _to_scores(worker, "worker_", note, confidence)
