"""``privaudit study CONFIG -o DIR``: run a mechanism's study file, dispatched on its mechanism.

A study file names its mechanism with a top-level ``mechanism:`` key or in its ``base`` run config;
a file with a ``grid`` block and no mechanism is a PrivTune study (``examples/privtune_study.yaml``);
``study: lm_canaries`` compares language-model canary designs (:mod:`privaudit.studies.lm_canaries`).
:data:`STUDIES` maps a mechanism to ``"module:function"``, called as ``function(path, out_dir, progress=...)``.

PrivTune (:func:`run_privtune_study`): writes ``rows.jsonl`` (each grid point as soon as it is done),
``study.json`` (rows with utility drops and the summary at the study's ``max_utility_drop``), the
figure ``attack_vs_utility_drop.png`` and ``study.pdf``.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

STUDIES: dict[str, str] = {
    "privtune": "privaudit.studies:run_privtune_study",
    "lora_sketch": "privaudit.mechanisms.lora_sketch.mechanism:run_study_file",
    "lm_canaries": "privaudit.studies.lm_canaries:run_study_file",
}

__all__ = ["STUDIES", "study_mechanism", "run_study_file", "run_privtune_study", "write_study_pdf"]


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: {p} is not a file")
    from privaudit.config import read_config_data  # bounded, alias-free

    raw = read_config_data(p) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: {p} must hold a mapping")
    return raw


def study_mechanism(raw: dict[str, Any]) -> str:
    """The mechanism a study file is for (see the module docstring); ``ValueError`` if none."""
    base = raw.get("base") if isinstance(raw.get("base"), dict) else {}
    name = raw.get("mechanism") or base.get("mechanism")
    if raw.get("study") == "lm_canaries":  # a study of canary designs, not of a mechanism
        name = "lm_canaries"
    if name is None and "grid" in raw:
        name = "privtune"
    if name is None:
        raise ValueError("mechanism: the study file names no mechanism (add 'mechanism: NAME')")
    if name not in STUDIES:
        raise ValueError(f"mechanism: no study for {name!r} (studies: {', '.join(sorted(STUDIES))})")
    return str(name)


def run_study_file(path: str | Path, out_dir: str | Path, progress: Callable[[str], None] | None = None) -> Any:
    """Run the study in ``path`` into ``out_dir`` with its mechanism's study runner."""
    name = study_mechanism(_read(path))
    module, func = STUDIES[name].split(":")
    return getattr(import_module(module), func)(path, out_dir, progress=progress)


def run_privtune_study(path: str | Path, out_dir: str | Path,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """PrivTune's study (:func:`privaudit.studies.privtune.run_study`) with its outputs on disk."""
    from privaudit.studies import privtune as privtune_study
    from privaudit.reports import figures as F

    raw = _read(path)
    raw.pop("mechanism", None)
    study = privtune_study.load_study(raw)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    rows = privtune_study.run_study(study, progress=progress, out_path=str(out / "rows.jsonl"))
    summary = privtune_study.summarise_study(rows, study.max_utility_drop)
    result = {"mechanism": "privtune", "config": study.model_dump(mode="json"), "rows": rows, "summary": summary}
    (out / "study.json").write_text(json.dumps(result, indent=1, allow_nan=False), encoding="utf-8")
    fig = F.save_png(F.attack_success_vs_utility_drop(rows), out / "attack_vs_utility_drop.png")
    write_study_pdf(result, [fig], out / "study.pdf")
    return {**result, "out_dir": str(out), "pdf": str(out / "study.pdf"), "figures": [str(fig)]}


def write_study_pdf(result: dict[str, Any], figures: list[Path], out_pdf: Path) -> Path:
    """A short PDF of a PrivTune study: the grid's utility and attack success, the summary, figures."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate, Spacer

    from privaudit.reports.pdf import _image, _p, _styles, _table, register_fonts

    register_fonts()
    st = _styles()
    width = A4[0] - 36 * mm
    rows = result["rows"]
    names = list(dict.fromkeys(a["name"] for r in rows for a in r["attacks"]))

    def headline(a: dict[str, Any] | None) -> str:
        if a is None:
            return "—"
        m = a.get("metrics", {})
        v = m.get("token_recovery") if a["kind"] == "inversion" else m.get("accuracy")
        return "—" if v is None else f"{v:.3f}"

    table = [["mode", "η", "utility", "drop", "ε at median NN", *[n.replace("_", " ") for n in names]]]
    for r in rows:
        u = r["utility"].get("accuracy", r["utility"].get("perplexity"))
        md = r.get("metric_dp") or {}
        eps = md.get("epsilon_at_median_nn")
        table.append([r["mode"], "—" if r["eta"] is None else f"{r['eta']:g}",
                      "—" if u is None else f"{u:.3f}",
                      "—" if r.get("utility_drop") is None else f"{r['utility_drop']:.3f}",
                      "—" if eps is None else f"{eps:.3g}",
                      *[headline(next((a for a in r["attacks"] if a["name"] == n), None)) for n in names]])
    n_cols = len(table[0])
    story: list[Any] = [
        _p("PrivTune study: attack success against utility", st["title"]),
        _p("Inversion: token recovery of the server's view; attribute: accuracy (majority baseline "
           f"{_baseline(rows)}). ε at the median nearest-neighbour distance is the metric-DP ε of one "
           "token release (no (ε, δ) guarantee: the labels reach the server in plaintext).", st["body"]),
        Spacer(1, 4), _table(table, [width / n_cols] * n_cols, st), Spacer(1, 6),
        _p(f"At most {result['summary']['max_utility_drop']:.0%} utility drop (strongest noise per mode)", st["h2"]),
    ]
    srows = [["mode", "η", "utility drop", *names]]
    for mode, s in result["summary"]["modes"].items():
        if s is None:
            srows.append([mode, "no point within the threshold", "", *[""] * len(names)])
        else:
            srows.append([mode, "—" if s["eta"] is None else f"{s['eta']:g}", f"{s['utility_drop']:.3f}",
                          *["—" if s["attacks"].get(n) is None else f"{s['attacks'][n]:.3f}" for n in names]])
    story.append(_table(srows, [width / len(srows[0])] * len(srows[0]), st))
    for fig in figures:
        story += [Spacer(1, 6), _image(fig, width, 110 * mm)]
    SimpleDocTemplate(str(out_pdf), pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm,
                      topMargin=16 * mm, bottomMargin=16 * mm, title="privaudit study").build(story)
    return out_pdf


def _baseline(rows: list[dict[str, Any]]) -> str:
    vals = [a["metrics"].get("majority_baseline") for r in rows for a in r["attacks"] if a["kind"] == "attribute"]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return f"{sorted(vals)[len(vals) // 2]:.3f}" if vals else "n/a"
