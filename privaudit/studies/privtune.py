"""PrivTune study: utility and attack success over a grid of noise modes and η.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privaudit.attacks.views.privtune import attack_server_view
from privaudit.data import Record
from privaudit.ledger.events import format_validation_error
from privaudit.mechanisms.privtune.dchi import (
    VocabGeometry,
    build_geometry,
)
from privaudit.mechanisms.privtune.mechanism import (
    NAME,
    build_split_model,
    fit,
    settings_of,
)
from privaudit.mechanisms.split_model import (
    special_token_ids,
    vocabulary_representations,
)


class StudyGrid(BaseModel):
    """Grid of the study: every ``mode`` × every ``eta`` (``none`` once)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    mode: list[Literal["privtune", "dchi", "gaussian", "none"]] = Field(
        default_factory=lambda: ["none", "dchi", "privtune", "gaussian"])
    eta: list[float] = Field(default_factory=lambda: [0.1, 0.05, 0.025])

class StudyAttack(BaseModel):
    """The attacker: ``aux_fraction`` of the training *people* (all their records) is set aside as the
    attacker's auxiliary data and never trained on; inversion attacks target the first ``victims``
    training records, attribute attacks the first ``attribute_victims`` (cheap: a larger sample gives
    a tighter interval against the majority baseline)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    aux_fraction: float = Field(0.25, gt=0, lt=1)
    victims: int = Field(150, ge=1)
    attribute_victims: int = Field(600, ge=1)
    which: list[str] = Field(default_factory=lambda: list(_all_attacks()))
    learned_steps: int = Field(300, ge=0)
    optim_steps: int = Field(60, ge=0)
    seed: int = 0

def _all_attacks() -> tuple[str, ...]:
    from privaudit.attacks.inversion import ALL_ATTACKS

    return ALL_ATTACKS

class StudyConfig(BaseModel):
    """``base``: a run config (``mechanism: privtune``); ``grid`` and ``attack`` as above;
    ``max_utility_drop``: the utility-drop threshold of the summary (absolute accuracy);
    ``vocabulary``: ``all`` (the model's vocabulary) or ``corpus`` (only the tokens occurring in the
    study's corpus — a faster setting for small studies and tests: the n-hop graph and the attack
    candidates are then restricted to them, which also hands the attacker a domain prior)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    base: dict[str, Any]
    vocabulary: Literal["all", "corpus"] = "all"
    grid: StudyGrid = Field(default_factory=StudyGrid)
    attack: StudyAttack = Field(default_factory=StudyAttack)
    max_utility_drop: float = Field(0.05, ge=0, le=1)

def load_study(source: Any) -> StudyConfig:
    """A :class:`StudyConfig` from a mapping, a YAML path or a StudyConfig."""
    from pathlib import Path

    import yaml

    if isinstance(source, StudyConfig):
        return source
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise ValueError(f"config: {p} does not exist")
        source = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    try:
        return StudyConfig.model_validate(source)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None

def _aux_split(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, aux): a ``fraction`` of the people (all their records) goes to aux."""
    import random

    people = sorted({r.person_id if r.person_id >= 0 else -1 - i for i, r in enumerate(records)})
    rng = random.Random(f"privaudit-aux:{seed}")
    rng.shuffle(people)
    aux_people = set(people[: max(1, round(fraction * len(people)))])
    key = [r.person_id if r.person_id >= 0 else -1 - i for i, r in enumerate(records)]
    train = [r for r, k in zip(records, key) if k not in aux_people]
    aux = [r for r, k in zip(records, key) if k in aux_people]
    return train, aux

def run_study(cfg: Any, progress: Callable[[str], None] | None = None,
              out_path: str | None = None) -> list[dict[str, Any]]:
    """Train PrivTune and its baselines over the grid and attack each server view.

    For each grid point: the top is trained on the training records (minus the attacker's people);
    utility is held-out accuracy (or perplexity) through the noisy pipeline; the attacker gets the
    released representations of ``victims`` training records (one release each) and the same public
    pipeline applied to its auxiliary records, and runs ``attack.which``. Returns one JSON-able row per
    grid point: mode, eta, utility, utility_drop (against mode ``none``; None if it is not in the
    grid), the attacks' results and, for d_χ modes, the metric-DP report. ``out_path``: also append
    each row to this JSON Lines file as soon as it is done (without ``utility_drop``).
    """
    from privaudit.attacks.inversion import InversionSettings
    from privaudit.config import parse_config
    from privaudit.mechanisms.training import prepare_data

    study = load_study(cfg)
    base = dict(study.base)
    base["mechanism"] = NAME
    base_cfg = parse_config(base)
    base_settings = settings_of(base_cfg)
    data = prepare_data(base_cfg)
    train, aux = _aux_split(data.train, study.attack.aux_fraction, study.attack.seed)
    victims = train[: study.attack.victims]
    attr_victims = train[: study.attack.attribute_victims]
    say = progress or (lambda msg: None)
    points: list[tuple[str, float]] = []
    for mode in study.grid.mode:
        if mode == "none":
            points.append(("none", base_settings.eta))
        else:
            points += [(mode, float(e)) for e in study.grid.eta]
    inv_settings = InversionSettings(learned_steps=study.attack.learned_steps, optim_steps=study.attack.optim_steps)
    rows: list[dict[str, Any]] = []
    geometry: VocabGeometry | None = None
    if study.vocabulary == "corpus":
        from privaudit.models import resolve_device

        probe = build_split_model(base_cfg, base_settings, len(data.label_names), resolve_device(base_cfg.model.device))
        tok = probe.tokenizer
        vocab_size = probe.model.get_input_embeddings().weight.shape[0]
        ids = sorted({i for r in data.corpus.records for i in tok(r.text)["input_ids"] if i < vocab_size}
                     - set(special_token_ids(tok)))
        ids_t = torch.tensor(ids, dtype=torch.long)
        geometry = build_geometry(ids_t, vocabulary_representations(probe, ids_t, base_settings.vocab_batch_size),
                                  vocab_size, knn_k=base_settings.knn_k, hops=base_settings.hops)
        probe.remove_hooks()
    for mode, eta in points:
        options = {**base_cfg.options, "mode": mode, "eta": eta}
        run_cfg = base_cfg.model_copy(update={"options": options})
        say(f"privtune study: mode={mode} eta={eta}: training")
        res = fit(run_cfg, train, data.heldout, num_labels=len(data.label_names), geometry=geometry)
        assert res.split is not None and res.noiser is not None and res.geometry is not None
        geometry = res.geometry
        say(f"privtune study: mode={mode} eta={eta}: attacks")
        inv = [w for w in study.attack.which if w.startswith("inversion_")]
        att = [w for w in study.attack.which if not w.startswith("inversion_")]
        found: dict[str, dict[str, Any]] = {}
        for names, targets in ((inv, victims), (att, attr_victims)):
            if names:
                for a in attack_server_view(run_cfg, targets, aux, which=names, split=res.split, geometry=res.geometry,
                                            attack_settings=inv_settings, seed=study.attack.seed):
                    found[a["name"]] = a
        attacks = [found[w] for w in study.attack.which]
        res.split.remove_hooks()
        rows.append({
            "mode": mode, "eta": eta if mode != "none" else None,
            "eta_unit": base_settings.eta_unit, "eta_absolute": res.metrics["eta_absolute"] if mode != "none" else None,
            "split_layer": base_settings.split_layer, "model": base_cfg.model.name,
            "utility": res.metrics["heldout"], "attacks": attacks,
            "metric_dp": res.metrics.get("metric_dp"), "events": res.metrics["events"],
            "mean_shift_norm": res.metrics["mean_shift_norm"], "min_scale": res.metrics["min_scale"],
            "vocab_median_nn_distance": res.metrics["vocab_median_nn_distance"],
            "releases_per_record": res.metrics["releases_per_record"],
            "n_train": len(train), "n_aux": len(aux), "n_victims": len(victims),
            "n_attribute_victims": len(attr_victims),
        })
        if out_path is not None:
            with open(out_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rows[-1], allow_nan=False) + "\n")
    key = "accuracy" if base_cfg.task == "classification" else "perplexity"
    clean = next((r["utility"].get(key) for r in rows if r["mode"] == "none"), None)
    for r in rows:
        val = r["utility"].get(key)
        if clean is None or val is None:
            r["utility_drop"] = None
        else:
            r["utility_drop"] = (clean - val) if key == "accuracy" else (val - clean) / clean
    return rows

def summarise_study(rows: Sequence[dict[str, Any]], max_utility_drop: float = 0.05) -> dict[str, Any]:
    """For each mode, the strongest-noise (smallest eta) grid point whose utility drop is at most
    ``max_utility_drop``, with each attack's headline number (token recovery / accuracy)."""
    def headline(a: dict[str, Any]) -> float | None:
        m = a.get("metrics", {})
        return m.get("token_recovery") if a["kind"] == "inversion" else m.get("accuracy")

    out: dict[str, Any] = {"max_utility_drop": max_utility_drop, "modes": {}}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ok = [r for r in rows if r["mode"] == mode and r.get("utility_drop") is not None
              and r["utility_drop"] <= max_utility_drop]
        if not ok:
            out["modes"][mode] = None
            continue
        best = min(ok, key=lambda r: r["eta"] if r["eta"] is not None else math.inf)
        out["modes"][mode] = {"eta": best["eta"], "utility": best["utility"], "utility_drop": best["utility_drop"],
                              "attacks": {a["name"]: headline(a) for a in best["attacks"]}}
    return out
