"""The LoRA-with-frozen-A rank study: membership AUC and ε_lower against rank, A public vs secret.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privaudit.config import RunConfig
from privaudit.ledger.events import format_validation_error
from privaudit.mechanisms.lora_sketch.mechanism import NAME, _finite


class PrivacyLevel(BaseModel):
    """One added-noise level: exactly one of ``noise_multiplier`` (> 0) and ``target_epsilon``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)

    def name(self) -> str:
        return f"sigma{self.noise_multiplier:g}" if self.noise_multiplier is not None else f"eps{self.target_epsilon:g}"

class StudySpec(BaseModel):
    """The ``study:`` block of a rank-study file (``base:`` + ``study:``). The same study also runs as a
    plain ``privaudit sweep`` over rank (``examples/lora_sketch_study.yaml``, ``--set lora.rank=...``).

    Every rank × ``a_secret`` is run without added noise; each ``noise`` level is run at
    ``noise_ranks`` (default: every rank) × ``noise_a_secret``. ``scale_alpha`` keeps s = alpha/r at the
    base config's value (so E[ΔW] is the same at every rank and only the sketch noise changes).
    ``reference_models`` (LiRA/RMIA) apply to runs with a public A only: the auditor's reference models
    are evaluated with their own A, which an observer without A cannot do."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64])
    a_secret: list[bool] = Field(default_factory=lambda: [False, True])
    noise: list[PrivacyLevel] = Field(default_factory=list)
    noise_ranks: list[int] | None = None
    noise_a_secret: list[bool] = Field(default_factory=lambda: [False])
    scale_alpha: bool = True
    attacks: list[str] | None = None
    reference_models: int = Field(0, ge=0)
    audit_seed: int = 0
    max_records: int = Field(1000, ge=2)

@dataclass(frozen=True)
class StudyPoint:
    name: str
    rank: int
    a_secret: bool
    level: PrivacyLevel | None

    def sweep_point(self, base: Mapping[str, Any], scale_alpha: bool) -> Any:
        """This point as a :class:`privaudit.sweep.SweepPoint` over the run config ``base``: rank (and
        alpha, keeping s = alpha/r when ``scale_alpha``), A frozen, A secret or public, privacy level."""
        from privaudit.sweep import SweepPoint

        lora = base.get("lora") or {}
        settings: list[tuple[str, Any]] = [("mechanism", NAME), ("lora.rank", self.rank), ("lora.freeze_a", True),
                                           ("options.a_secret", self.a_secret)]
        if scale_alpha:
            settings.append(("lora.alpha", float(lora.get("alpha", 16.0)) * self.rank / int(lora.get("rank", 8))))
        if self.level is None:
            return SweepPoint(self.name, noise_multiplier=0.0, settings=tuple(settings))
        return SweepPoint(self.name, noise_multiplier=self.level.noise_multiplier,
                          target_epsilon=self.level.target_epsilon, settings=tuple(settings))

def study_points(spec: StudySpec) -> list[StudyPoint]:
    pts = [StudyPoint(f"r{r}-{'secret' if s else 'public'}", r, s, None) for r in spec.ranks for s in spec.a_secret]
    for lvl in spec.noise:
        for r in (spec.noise_ranks or spec.ranks):
            for s in spec.noise_a_secret:
                pts.append(StudyPoint(f"r{r}-{'secret' if s else 'public'}-{lvl.name()}", r, s, lvl))
    names = [p.name for p in pts]
    if len(set(names)) != len(names):
        raise ValueError("study: duplicate points (repeated ranks or noise levels)")
    if not pts:
        raise ValueError("study.ranks: no points")
    return pts

@dataclass(frozen=True)
class RankStudyResult:
    out_dir: Path
    rows: tuple[dict[str, Any], ...]
    run_dirs: tuple[Path, ...]
    table: str
    report: Path | None = None

def study_row(run_dir: Path) -> dict[str, Any]:
    """One table row from a run directory (manifest.json and audit.json)."""
    man = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    cfg = man["config"]
    priv = man.get("privacy", {})
    eps = priv.get("epsilon", {}) or {}
    row: dict[str, Any] = {
        "name": man.get("name") or run_dir.name, "rank": cfg["lora"]["rank"],
        "a_secret": bool(cfg.get("options", {}).get("a_secret", False)),
        "noise_multiplier": priv.get("noise_multiplier"),
        "accounted_epsilon": eps.get("pld") if priv.get("guarantee") != "none" else math.inf,
        "accounted_reason": priv.get("reason"),
        "claimed_epsilon": min((c["epsilon"] for c in cfg["privacy"].get("claims", [])), default=None),
        "heldout_accuracy": (man.get("metrics", {}).get("heldout") or {}).get("accuracy"),
    }
    stats = ((man.get("metrics", {}).get("sketch") or {}).get("stats") or {})
    row["sketch_relative_noise"] = stats.get("mean_relative_noise")
    row["sketch_expected_relative_noise"] = stats.get("expected_relative_noise")
    row["sketch_mc_max_abs_z"] = stats.get("monte_carlo_max_abs_z")
    audit_path = run_dir / "audit.json"
    if audit_path.exists():
        audit = json.loads(audit_path.read_text(encoding="utf-8"))
        el = audit.get("epsilon_lower") or {}
        row["epsilon_lower"] = el.get("value")
        row["epsilon_lower_attack"] = el.get("attack")
        row["verdict"] = audit.get("verdict")
        for a in audit.get("attacks", []):
            row[f"auc_{a['name']}"] = (a.get("metrics") or {}).get("auc")
            if a.get("epsilon_lower"):
                row[f"eps_lower_{a['name']}"] = a["epsilon_lower"].get("value")
    return row

def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "secret" if v else "public"
    if isinstance(v, float):
        return "∞ (none)" if math.isinf(v) else f"{v:.3f}"
    return str(v)

def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the study rows (ε = ∞ (none): no formal guarantee)."""
    auc_cols = sorted({k for r in rows for k in r if k.startswith("auc_")})
    cols = (["name", "rank", "a_secret", "noise_multiplier", "accounted_epsilon", "claimed_epsilon",
             "heldout_accuracy"] + auc_cols + ["epsilon_lower", "epsilon_lower_attack", "verdict",
                                               "sketch_relative_noise", "sketch_expected_relative_noise"])
    head = "| " + " | ".join(c.replace("auc_", "AUC ") for c in cols) + " |"
    sep = "|" + "---|" * len(cols)
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])

def run_rank_study(cfg: RunConfig | Mapping[str, Any], ranks: Sequence[int], out_dir: str | Path, *,
                   spec: StudySpec | None = None, report: bool = True, quiet: bool = True,
                   log: Callable[[str], None] | None = None) -> RankStudyResult:
    """Train and audit ``cfg`` (a ``lora_sketch`` config) at each rank (× A public/secret, and the
    added-noise levels of ``spec``) as a :func:`privaudit.sweep.run_sweep` (resumable: completed runs
    and audits are skipped). Writes ``OUT/runs/<point>``, ``OUT/sweep.json``, ``OUT/study.json``,
    ``OUT/study.csv``, ``OUT/study.md``, ``OUT/rank_study.png`` (the report's rank figure) and
    (``report``) ``OUT/report.pdf``."""
    from privaudit.reports import figures as F
    from privaudit.reports.runs_table import load_run_record
    from privaudit.sweep import SweepPoint, run_sweep

    spec = spec or StudySpec()
    spec = spec.model_copy(update={"ranks": [int(r) for r in ranks]})
    if any(r < 1 for r in spec.ranks):
        raise ValueError(f"ranks: each must be >= 1, got {list(ranks)!r}")
    base = json.loads(cfg.model_dump_json()) if isinstance(cfg, RunConfig) else dict(cfg)
    study = study_points(spec)
    a_secret = {p.name: p.a_secret for p in study}

    def audit_settings(point: SweepPoint) -> dict[str, Any]:
        # reference models are evaluated with their own A: only an observer who knows A can run them
        refs = 0 if a_secret[point.name] else spec.reference_models
        attacks = spec.attacks
        if attacks is not None and refs == 0:
            attacks = [a for a in attacks if a not in ("lira_online", "lira_offline", "rmia")]
        return {"attacks": attacks, "reference_models": refs, "seed": spec.audit_seed,
                "max_records": spec.max_records}

    res = run_sweep(base, [p.sweep_point(base, spec.scale_alpha) for p in study], out_dir, report=report,
                    quiet=quiet, log=log, audit_settings=audit_settings)
    out = Path(res.out_dir)
    rows = [study_row(rd) for rd in res.run_dirs]
    table = format_table(rows)
    (out / "study.json").write_text(json.dumps({"spec": spec.model_dump(mode="json"), "rows": _finite(rows)},
                                               indent=2), encoding="utf-8")
    (out / "study.md").write_text(table + "\n", encoding="utf-8")
    cols = sorted({k for r in rows for k in r})
    with (out / "study.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()})
    F.save_png(F.attack_vs_rank([load_run_record(rd) for rd in res.run_dirs]), out / "rank_study.png")
    return RankStudyResult(out, tuple(rows), tuple(res.run_dirs), table, res.report)

def load_study(path: str | Path) -> tuple[dict[str, Any], StudySpec]:
    """Read a study file: ``base`` (a lora_sketch run config) and ``study`` (:class:`StudySpec`)."""
    import yaml

    from privaudit.config import parse_config

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"study: {p} is not a file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"study: {p} is not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or "base" not in raw:
        raise ValueError("base: the study file needs a 'base' run config and a 'study' block")
    unknown = set(raw) - {"base", "study"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (use base, study)")
    try:
        spec = StudySpec.model_validate(raw.get("study") or {})
    except ValidationError as exc:
        raise ValueError(f"study.{format_validation_error(exc)}") from None
    if not isinstance(raw["base"], dict):
        raise ValueError("base: must be a mapping (a lora_sketch run config)")
    cfg = parse_config({**raw["base"], "mechanism": NAME}, base_dir=p.parent)  # validates, resolves paths
    return json.loads(cfg.model_dump_json()), spec

def run_study_file(path: str | Path, out_dir: str | Path, *, progress: Callable[[str], None] | None = None,
                   **kwargs: Any) -> RankStudyResult:
    """:func:`run_rank_study` on a study file (``base:`` run config + ``study:`` block); a ``privaudit
    sweep`` config with a ``sweep:`` block (``examples/lora_sketch_study.yaml``) runs as that sweep and
    is summarised as the same study table. ``progress`` receives one line per stage."""
    if progress is not None:
        kwargs.setdefault("log", progress)
    if _is_sweep_file(path):
        from privaudit.sweep import load_sweep_spec, run_sweep

        base, sweep = load_sweep_spec(path)
        res = run_sweep(base, sweep.points(), out_dir, report=kwargs.get("report", True),
                        quiet=kwargs.get("quiet", True), log=kwargs.get("log"))
        rows = [study_row(rd) for rd in res.run_dirs]
        return RankStudyResult(Path(res.out_dir), tuple(rows), tuple(res.run_dirs), format_table(rows), res.report)
    base, spec = load_study(path)
    return run_rank_study(base, spec.ranks, out_dir, spec=spec, **kwargs)

def _is_sweep_file(path: str | Path) -> bool:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and "base" not in raw and "sweep" in raw
