"""``build_report``: run directories -> PDF, figures (PNG) and tables (CSV, JSON) side by side.

Outputs beside ``out_pdf`` (stem = the PDF's name without ``.pdf``):

* ``<stem>_figures/*.png`` — comparison figures (each once) and, per run, ROC curves;
* ``<stem>_runs.csv`` / ``<stem>_runs.json`` — one row per run (the JSON also holds accountants,
  claims, attacks and ε over steps per run);
* ``<stem>_attacks.csv`` — one row per (run, attack).

ε in the tables: a number, ``"inf"`` for no formal guarantee, empty/null for not available.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from privaudit.reports import figures as F
from privaudit.reports.pdf import write_pdf
from privaudit.reports.runs_table import (
    RunRecord,
    attack_rows,
    load_runs,
    record_to_json,
    run_row,
    write_csv,
    write_json,
)

_CAPTIONS = {
    "eps_vs_utility": "Utility against accounted ε, one line per mechanism; runs without a formal "
                      "guarantee sit at the ∞ position.",
    "attack_success_vs_eps": "Attack AUC with its confidence interval against the accounted ε.",
    "empirical_vs_accounted": "Empirical ε lower bound against the accounted ε. Points above y = x (or "
                              "above a claimed ε bar) are violations.",
    "eps_over_steps": "ε spent as training proceeds, recomputed from each ledger on its first k steps "
                      "with the headline accountant (the last point is the run's accounted ε).",
    "attack_vs_rank": "Membership/canary AUC and the empirical ε lower bound against the LoRA rank (A "
                      "public vs secret, with and without noise), beside any claimed ε and the accounted "
                      "ε of noisy runs.",
}


_NOT_SHOWN = {
    "eps_vs_utility": "Utility vs ε: not shown (no run has both a utility metric and an ε).",
    "attack_success_vs_eps": "Attack success vs ε: not shown (no attack AUC with an accounted ε).",
    "empirical_vs_accounted": "Empirical vs accounted ε: not shown (no lower bound or claim with an "
                              "accounted ε).",
    "eps_over_steps": "ε over training steps: not shown (no ledger with Gaussian releases that an "
                      "installed accountant can recompute).",
}


@dataclass(frozen=True)
class ReportOutputs:
    """Paths written by :func:`build_report`."""

    pdf: Path
    figures: dict[str, Path]
    runs_csv: Path
    runs_json: Path
    attacks_csv: Path
    records: tuple[RunRecord, ...]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s[:60] or "run"


def build_report(run_dirs: Sequence[str | Path], out_pdf: str | Path, *,
                 progress: Callable[[str], None] | None = None, steps_points: int = 20,
                 public_key: Any = None) -> ReportOutputs:
    """Load ``run_dirs``, write the PDF at ``out_pdf`` and the figures and tables beside it.

    ``ValueError`` naming the directory if one does not exist or lacks manifest.json, or if
    ``out_pdf`` does not end in ``.pdf``. ``progress`` (optional) receives one line per stage.
    ``public_key`` (Ed25519 key or PEM path): ledgers must carry a seal signed by its private key.
    """
    out = Path(out_pdf)
    if out.suffix.lower() != ".pdf":
        raise ValueError(f"out_pdf: {out} must end in .pdf")
    say = progress or (lambda _msg: None)
    records = load_runs(run_dirs, progress=progress, steps_points=steps_points, public_key=public_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    fig_dir = out.parent / f"{stem}_figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    figures: dict[str, Path] = {}
    summary: list[tuple[str, Path]] = []
    not_shown: list[str] = []
    for name, fn in F.COMPARISON_FIGURES.items():
        say(f"figure: {name}")
        fig = fn(records)
        if name in F.OPTIONAL_FIGURES and not F.has_data(fig):
            continue  # does not apply to these runs (e.g. all at one rank)
        figures[name] = F.save_png(fig, fig_dir / f"{name}.png")
        if F.has_data(fig):
            summary.append((_CAPTIONS[name], figures[name]))
        else:
            not_shown.append(_NOT_SHOWN[name])
    per_run: dict[str, list[tuple[str, Path]]] = {}
    used: set[str] = set()
    for r in records:
        slug = _slug(r.label)
        while slug in used:
            slug += "_"
        used.add(slug)
        items: list[tuple[str, Path]] = []
        if r.attacks:
            say(f"figure: ROC curves of {r.label}")
            key = f"roc_{slug}"
            fig = F.roc_curves(r)
            figures[key] = F.save_png(fig, fig_dir / f"{key}.png")
            if F.has_data(fig):
                items.append((f"ROC curves of the attacks on {r.label} (log-log: the low false-positive "
                              "regime is where membership inference matters).", figures[key]))
            else:  # nothing to draw (e.g. view attacks only): no empty figure in the PDF or beside it
                figures.pop(key).unlink(missing_ok=True)
        per_run[r.run_id] = items

    for stale in fig_dir.glob("*.png"):  # figures of an earlier rendering that this one does not have
        if stale not in figures.values():
            stale.unlink()
    say("tables: CSV and JSON")
    runs_csv = write_csv([run_row(r) for r in records], out.parent / f"{stem}_runs.csv")
    attacks_csv = write_csv(attack_rows(records), out.parent / f"{stem}_attacks.csv")
    runs_json = write_json({
        "generated": datetime.now(timezone.utc).isoformat(),
        "pdf": out.name,
        "epsilon_encoding": "number; 'inf' = no formal guarantee; null = not available",
        "runs": [record_to_json(r) for r in records],
    }, out.parent / f"{stem}_runs.json")

    say(f"PDF: {out}")
    write_pdf(records, out, summary_figures=summary, run_figures=per_run, summary_notes=not_shown)
    return ReportOutputs(pdf=out, figures=figures, runs_csv=runs_csv, runs_json=runs_json,
                         attacks_csv=attacks_csv, records=tuple(records))
