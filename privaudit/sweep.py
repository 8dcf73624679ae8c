"""Sweeps: train, account and audit one config at several privacy levels; resumable.

A sweep point sets either ``privacy.noise_multiplier`` (0 = the non-private baseline) or
``privacy.target_epsilon`` of a base config. Each point gets its own run directory under
``OUT/runs/<name>``; re-running a sweep skips completed runs and audits, resumes interrupted runs
from their checkpoints, and then renders the report ``OUT/report.pdf``.

The points come from flags or from a ``sweep:`` block in the config file::

    sweep:
      noise_multipliers: [0, 0.8, 1.5]
      target_epsilons: [1, 4, 16]
      set:                                   # other axes: dotted config paths -> values
        lora.rank+lora.alpha: [[4, 8], [8, 16], [16, 32]]   # '+' links paths (values zipped)
        options.a_secret: [false, true]

Axes (``--set lora.rank=4,8,16`` on the command line; ``--set lora.rank+lora.alpha=4+8,8+16``
links paths) combine as a grid with each other and with the privacy levels; without privacy levels
the config's own privacy section is kept. A point's run directory is named by its axis values
(``rank_4-alpha_8-a_secret_false-non_private``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from privaudit.config import RunConfig, parse_config

SweepProgress = Callable[[str], None]


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: a privacy level (at most one of ``noise_multiplier`` and
    ``target_epsilon``; neither = the base config's own) and ``settings``, (dotted path, value) pairs."""

    name: str
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    def apply(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The base config (a mapping) with this point's settings and privacy level."""
        cfg = json.loads(json.dumps(base))
        for path, value in self.settings:
            _set_path(cfg, path, value)
        if self.noise_multiplier is None and self.target_epsilon is None:
            return cfg
        privacy = dict(cfg.get("privacy", {}))
        privacy.pop("noise_multiplier", None)
        privacy.pop("target_epsilon", None)
        if self.noise_multiplier is not None:
            privacy["noise_multiplier"] = self.noise_multiplier
        else:
            privacy["target_epsilon"] = self.target_epsilon
        cfg["privacy"] = privacy
        return cfg


@dataclass(frozen=True)
class SweepResult:
    out_dir: Path
    run_dirs: tuple[Path, ...]
    report: Path | None
    points: tuple[dict[str, Any], ...] = field(default_factory=tuple)


#: Paths that the privacy axis owns (``--noise-multipliers`` / ``--target-epsilons``).
_PRIVACY_PATHS = ("privacy.noise_multiplier", "privacy.target_epsilon")


@dataclass(frozen=True)
class SweepAxis:
    """One grid axis: the dotted config ``paths`` are set together to each entry of ``values`` (one
    tuple per point, zipped with ``paths``)."""

    paths: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]

    @property
    def key(self) -> str:
        return "+".join(self.paths)


def _check_path(path: str) -> str:
    parts = path.split(".")
    if not path or not all(p.isidentifier() for p in parts):
        raise ValueError(f"set: {path!r} is not a dotted config path (like lora.rank)")
    if path in _PRIVACY_PATHS:
        raise ValueError(f"set: {path} is the privacy axis (use noise_multipliers / target_epsilons)")
    return path


def make_axis(key: str, values: Sequence[Any]) -> SweepAxis:
    """An axis from a key (``lora.rank``, or linked paths ``lora.rank+lora.alpha``) and its values (for
    linked paths each value is a list with one entry per path). ``ValueError`` starting ``set``."""
    paths = tuple(_check_path(p.strip()) for p in str(key).split("+"))
    if len(set(paths)) != len(paths):
        raise ValueError(f"set: {key!r} repeats a path")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"set.{key}: give a non-empty list of values")
    rows: list[tuple[Any, ...]] = []
    for v in values:
        row = tuple(v) if len(paths) > 1 and isinstance(v, (list, tuple)) else (v,)
        if len(row) != len(paths):
            raise ValueError(f"set.{key}: each value needs {len(paths)} entries (one per linked path), "
                             f"got {v!r}")
        rows.append(row)
    if len({json.dumps(r, sort_keys=True) for r in rows}) != len(rows):
        raise ValueError(f"set.{key}: duplicate values")
    return SweepAxis(paths, tuple(rows))


def parse_set(text: str) -> SweepAxis:
    """``PATH=v1,v2,...`` or ``P1+P2=a1+a2,b1+b2`` (linked paths); each value is read as YAML
    (``4`` an int, ``0.5`` a float, ``true`` a bool, else a string)."""
    key, sep, vals = str(text).partition("=")
    if not sep or not key.strip() or not vals.strip():
        raise ValueError(f"set: expected PATH=v1,v2,... (e.g. lora.rank=4,8,16), got {text!r}")
    n = len(key.split("+"))
    items = [v.strip() for v in vals.split(",")]
    if any(not v for v in items):
        raise ValueError(f"set.{key.strip()}: empty value in {vals!r}")
    values: list[Any] = []
    for item in items:
        parts = [_yaml_scalar(x.strip()) for x in item.split("+")] if n > 1 else [_yaml_scalar(item)]
        values.append(parts if n > 1 else parts[0])
    return make_axis(key.strip(), values)


def _yaml_scalar(text: str) -> Any:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", v):
        return float(v)  # YAML 1.1 reads 1e-3 as a string
    return v if isinstance(v, (int, float, bool, str)) or v is None else text


def _set_path(cfg: dict[str, Any], path: str, value: Any) -> None:
    node: Any = cfg
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"set: {'.'.join(parts[:i + 1])} is not a section, cannot set {path}")
        node = nxt
    node[parts[-1]] = value


def _value_name(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        text = str(v).lower()
    elif isinstance(v, float):
        text = f"{v:g}"
    else:
        text = str(v)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


def make_grid(axes: Sequence[SweepAxis] = (), privacy: Sequence[SweepPoint] = ()) -> list[SweepPoint]:
    """Every combination of the axes' values (first axis outermost) and the privacy levels (innermost;
    none = the base config's). Points are named by their values, e.g. ``rank_4-a_secret_true-eps_4``."""
    if not axes:
        if not privacy:
            raise ValueError("sweep: no points (give noise multipliers, target epsilons or set axes)")
        return list(privacy)
    keys = [ax.key for ax in axes]
    if len(set(keys)) != len(keys):
        raise ValueError("set: an axis is given twice")
    paths = [p for ax in axes for p in ax.paths]
    if len(set(paths)) != len(paths):
        raise ValueError("set: a path is on two axes")
    leaves = [p.rsplit(".", 1)[-1] for p in paths]
    label = {p: (leaf if leaves.count(leaf) == 1 else p.replace(".", "_")) for p, leaf in zip(paths, leaves)}
    combos: list[tuple[tuple[str, Any], ...]] = [()]
    for ax in axes:
        combos = [c + tuple(zip(ax.paths, row)) for c in combos for row in ax.values]
    out: list[SweepPoint] = []
    for combo in combos:
        stem = "-".join(f"{label[p]}_{_value_name(v)}" for p, v in combo)
        for pp in (privacy or [None]):
            if pp is None:
                out.append(SweepPoint(name=stem, settings=combo))
            else:
                out.append(SweepPoint(name=f"{stem}-{pp.name}", noise_multiplier=pp.noise_multiplier,
                                      target_epsilon=pp.target_epsilon, settings=combo))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError("sweep: two points get the same name (values differing only in punctuation)")
    return out


def make_points(noise_multipliers: Sequence[float] = (), target_epsilons: Sequence[float] = ()) -> list[SweepPoint]:
    """Points from lists of σ (0 = non-private) and target ε; ``ValueError`` naming a bad value."""
    points: list[SweepPoint] = []
    for s in noise_multipliers:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ValueError(f"noise_multipliers: each must be a finite number >= 0, got {s!r}")
        name = "non_private" if s == 0 else f"sigma_{s:g}"
        points.append(SweepPoint(name=name, noise_multiplier=float(s)))
    for e in target_epsilons:
        if not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0):
            raise ValueError(f"target_epsilons: each must be a finite number > 0, got {e!r}")
        points.append(SweepPoint(name=f"eps_{e:g}", target_epsilon=float(e)))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError("sweep: duplicate privacy levels")
    if not points:
        raise ValueError("sweep: no points (give noise multipliers or target epsilons)")
    return points


@dataclass(frozen=True)
class SweepSpec:
    """A config file's ``sweep:`` block: privacy levels and other axes (either may be empty)."""

    privacy: tuple[SweepPoint, ...] = ()
    axes: tuple[SweepAxis, ...] = ()

    def points(self) -> list[SweepPoint]:
        return make_grid(self.axes, self.privacy)

    def override(self, privacy: Sequence[SweepPoint] = (), axes: Sequence[SweepAxis] = ()) -> "SweepSpec":
        """Command-line flags over the block: privacy levels replace the block's; an axis replaces the
        block's axis with the same key, new keys are added after the block's."""
        given = {ax.key: ax for ax in axes}
        merged = [given.pop(ax.key, ax) for ax in self.axes] + list(given.values())
        return SweepSpec(tuple(privacy) or self.privacy, tuple(merged))


def load_sweep_spec(path: str | Path) -> tuple[dict[str, Any], SweepSpec]:
    """Read a config file that may carry a ``sweep:`` block: (base config mapping, its spec)."""
    from privaudit.config import load_config

    p = Path(path)
    try:
        raw = _read_mapping(p) if p.is_file() else {}
    except Exception:  # unreadable or invalid: load_config says why, in its words
        raw = {}
    block = raw.get("sweep")
    if block is not None:  # validates everything but the sweep block, and resolves data paths
        cfg = parse_config({k: v for k, v in raw.items() if k != "sweep"}, base_dir=p.parent)
    else:
        cfg = load_config(p)
    base = json.loads(cfg.model_dump_json())
    if block is None:
        return base, SweepSpec()
    if not isinstance(block, dict):
        raise ValueError("sweep: must be a mapping with noise_multipliers, target_epsilons and/or set")
    unknown = set(block) - {"noise_multipliers", "target_epsilons", "set"}
    if unknown:
        raise ValueError(f"sweep.{sorted(unknown)[0]}: unknown key (use noise_multipliers, target_epsilons, set)")
    sigmas, targets = block.get("noise_multipliers") or (), block.get("target_epsilons") or ()
    privacy = make_points(sigmas, targets) if (sigmas or targets) else []
    sets = block.get("set") or {}
    if not isinstance(sets, dict):
        raise ValueError("sweep.set: must be a mapping of dotted config paths to lists of values")
    axes = [make_axis(k, v) for k, v in sets.items()]
    return base, SweepSpec(tuple(privacy), tuple(axes))


def load_sweep_config(path: str | Path) -> tuple[dict[str, Any], list[SweepPoint] | None]:
    """Read a config file that may carry a ``sweep:`` block: (base config mapping, points or None)."""
    base, spec = load_sweep_spec(path)
    if not spec.privacy and not spec.axes:
        return base, None
    return base, spec.points()


def _read_mapping(p: Path) -> dict[str, Any]:
    from privaudit.config import read_config_data  # bounded, alias-free

    data = read_config_data(p)
    return data if isinstance(data, dict) else {}


def _user_model_path(cfg: Any) -> str | None:
    """The sweep's own config names the model: a folder there is the user's choice, passed on to the
    audit (which never takes a folder from a manifest)."""
    from privaudit.models import is_model_path

    name = cfg.model.name if isinstance(cfg, RunConfig) else None
    return name if name is not None and is_model_path(name) else None


def _user_data_path(cfg: Any) -> str | None:
    """The sweep's own config names the data file (its path resolved when the config was read): the
    user's choice, passed on to the audit (which never opens a data path from a manifest)."""
    if not isinstance(cfg, RunConfig) or cfg.data.source == "synthetic":
        return None
    return cfg.data.path


def _resume(cfg: RunConfig, rd: Path, quiet: bool) -> None:
    """Resume the interrupted point ``rd`` with the config the user's base config gives it now (model
    folder and data file included: the stored manifest never chooses either), which must be the one
    the run recorded: the model name here; the whole config, the model folder's and the data's
    fingerprints in :func:`privaudit.runs.train`."""
    from privaudit.runs import _read_manifest, train

    saved = _read_manifest(rd).get("config")
    saved_model = saved.get("model") if isinstance(saved, dict) else None
    recorded = saved_model.get("name") if isinstance(saved_model, dict) else None
    if recorded != cfg.model.name:
        raise ValueError(f"model.name: the sweep's config names {cfg.model.name!r} but the interrupted run in {rd} "
                         f"was trained on {recorded!r}; resume with the base config it was started with")
    train(cfg, rd, resume=True, progress=not quiet)  # compares the config and the model and data fingerprints


def point_status(run_dir: Path) -> str:
    """``new``, ``interrupted``, ``trained`` or ``audited``."""
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        return "new"
    try:
        status = json.loads(manifest.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return "interrupted"
    if status != "complete":
        return "interrupted"
    return "audited" if (run_dir / "audit.json").exists() else "trained"


def run_sweep(base: Mapping[str, Any] | RunConfig, points: Sequence[SweepPoint], out_dir: str | Path, *,
              audit: bool = True, attacks: Sequence[str] | None = None, reference_models: int = 0,
              report: bool = True, quiet: bool = False, log: SweepProgress | None = None,
              audit_settings: Callable[[SweepPoint], Mapping[str, Any]] | None = None) -> SweepResult:
    """Train, account and audit every point, then render ``OUT/report.pdf``. Resumable.
    ``audit_settings(point)``: keyword arguments of :func:`~privaudit.audit.auditor.audit_run` for that
    point, overriding ``attacks`` and ``reference_models``."""
    from privaudit.runs import train

    base_map = json.loads(base.model_dump_json()) if isinstance(base, RunConfig) else dict(base)
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: None)
    cfgs = [(p, parse_config(p.apply(base_map))) for p in points]  # validate every point first
    run_dirs: list[Path] = []
    summaries: list[dict[str, Any]] = []
    for i, (point, cfg) in enumerate(cfgs, 1):
        rd = out / "runs" / point.name
        status = point_status(rd)
        say(f"[{i}/{len(cfgs)}] {point.name}: {status}")
        if status == "new":
            train(cfg, rd, progress=not quiet)
        elif status == "interrupted":
            if (rd / "checkpoint").exists():
                _resume(cfg, rd, quiet)
            else:  # interrupted before its first checkpoint: nothing was trained yet worth keeping
                _clear_dir(rd)
                train(cfg, rd, progress=not quiet)
        _label(rd, point.name)
        if audit and point_status(rd) != "audited":
            from privaudit.audit.auditor import audit_run

            say(f"[{i}/{len(cfgs)}] {point.name}: auditing")
            kwargs = {"attacks": attacks, "reference_models": reference_models,
                      **(audit_settings(point) if audit_settings is not None else {})}
            audit_run(rd, progress=not quiet,
                      **{"model_path": _user_model_path(cfg), "data_path": _user_data_path(cfg), **kwargs})
        run_dirs.append(rd)
        summaries.append(_summary(point, rd))
    (out / "sweep.json").write_text(json.dumps({"points": summaries}, indent=2), encoding="utf-8")
    pdf: Path | None = None
    if report:
        from privaudit.reports import build_report

        say("rendering the report")
        pdf = build_report(run_dirs, out / "report.pdf").pdf
    return SweepResult(out, tuple(run_dirs), pdf, tuple(summaries))


def _label(rd: Path, name: str) -> None:
    """Give the run the point's name in its manifest (the report's label for it)."""
    from privaudit.runs import _write_json_atomic

    path = rd / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("name") != name:
        manifest["name"] = name
        _write_json_atomic(path, manifest)


def _clear_dir(rd: Path) -> None:
    """Remove an interrupted run that never reached a checkpoint. Its ledger is kept beside it
    (renamed) so that nothing it recorded is lost."""
    import shutil
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if (rd / "ledger.jsonl").exists():
        (rd.parent / f"{rd.name}.abandoned-{stamp}.ledger.jsonl").write_bytes((rd / "ledger.jsonl").read_bytes())
    shutil.rmtree(rd)


def _summary(point: SweepPoint, rd: Path) -> dict[str, Any]:
    manifest = json.loads((rd / "manifest.json").read_text(encoding="utf-8"))
    out: dict[str, Any] = {"name": point.name, "run_dir": str(rd), "noise_multiplier":
                           manifest.get("privacy", {}).get("noise_multiplier"),
                           "target_epsilon": point.target_epsilon,
                           "settings": {k: v for k, v in point.settings},
                           "epsilon": manifest.get("privacy", {}).get("epsilon"),
                           "utility": manifest.get("metrics", {}).get("heldout")}
    audit_path = rd / "audit.json"
    if audit_path.exists():
        audit = json.loads(audit_path.read_text(encoding="utf-8"))
        out["verdict"] = audit.get("verdict")
        out["epsilon_lower"] = (audit.get("epsilon_lower") or {}).get("value")
        out["attacks"] = {a["name"]: a.get("metrics", {}).get("auc") for a in audit.get("attacks", [])}
    return out
