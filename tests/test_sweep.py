"""Sweeps: the privacy axis and generic ``--set`` axes (grid, names, sweep: block, resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from privaudit.config import parse_config
from privaudit.sweep import (
    SweepSpec,
    load_sweep_config,
    load_sweep_spec,
    make_axis,
    make_grid,
    make_points,
    parse_set,
    run_sweep,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY: dict[str, Any] = {
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 16, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 20, "n_canaries": 4}, "max_heldout": 10},
    "training": {"steps": 3, "batch_size": 8, "learning_rate": 0.01, "checkpoint_every": 2},
    "privacy": {"noise_multiplier": 1.0, "noise_seed": 3},
}


def test_parse_set_reads_yaml_scalars_and_linked_paths() -> None:
    ax = parse_set("lora.rank=4,8,16")
    assert ax.paths == ("lora.rank",) and ax.values == ((4,), (8,), (16,))
    assert parse_set("options.a_secret=false,true").values == ((False,), (True,))
    assert parse_set("training.learning_rate=0.5,1e-3").values == ((0.5,), (0.001,))
    assert parse_set("lora.init_a=peft_default,gaussian_1_over_r").values[0] == ("peft_default",)
    linked = parse_set("lora.rank+lora.alpha=4+8,8+16")
    assert linked.paths == ("lora.rank", "lora.alpha") and linked.values == ((4, 8), (8, 16))
    assert linked.key == "lora.rank+lora.alpha"


@pytest.mark.parametrize("text", ["lora.rank", "lora.rank=", "=4,8", "lora..rank=4", "lora.rank=4,,8",
                                  "lora.rank=4,4", "lora.rank+lora.alpha=4,8", "lora.rank+lora.rank=1+1,2+2",
                                  "privacy.noise_multiplier=0,1", "privacy.target_epsilon=1,4"])
def test_bad_set_is_a_value_error_naming_set(text: str) -> None:
    with pytest.raises(ValueError, match=r"^set"):
        parse_set(text)


def test_grid_is_a_product_named_by_values_privacy_innermost() -> None:
    axes = [parse_set("lora.rank+lora.alpha=4+8,8+16"), parse_set("options.a_secret=false,true")]
    points = make_grid(axes, make_points([0.0], [4.0]))
    assert [p.name for p in points] == [
        f"rank_{r}-alpha_{2 * r}-a_secret_{s}-{lvl}" for r in (4, 8) for s in ("false", "true")
        for lvl in ("non_private", "eps_4")]
    cfg = points[-1].apply({"lora": {"rank": 2, "alpha": 4}, "privacy": {"noise_multiplier": 1.0}})
    assert cfg["lora"] == {"rank": 8, "alpha": 16} and cfg["options"] == {"a_secret": True}
    assert cfg["privacy"] == {"target_epsilon": 4.0}
    # without a privacy axis the base config's privacy section stays as it is
    only = make_grid([parse_set("lora.rank=4,8")])
    assert [p.name for p in only] == ["rank_4", "rank_8"]
    assert only[0].apply({"privacy": {"noise_multiplier": 0.7}})["privacy"] == {"noise_multiplier": 0.7}
    # the privacy axis alone keeps its old names (resumes sweeps made before the set axes)
    assert [p.name for p in make_grid((), make_points([0.0, 1.5]))] == ["non_private", "sigma_1.5"]


def test_grid_rejects_clashes() -> None:
    with pytest.raises(ValueError, match=r"^set"):
        make_grid([parse_set("lora.rank=4,8"), parse_set("lora.rank+lora.alpha=4+8,8+16")])
    with pytest.raises(ValueError, match=r"^sweep"):
        make_grid([], [])
    # same leaf on two paths: the full path names them
    pts = make_grid([parse_set("lora.rank=2"), parse_set("options.rank=3")])
    assert pts[0].name == "lora_rank_2-options_rank_3"
    # a path through a value (lora.rank is a number, not a section)
    point = make_grid([parse_set("lora.rank.x=1")])[0]
    with pytest.raises(ValueError, match=r"^set: lora\.rank is not a section"):
        point.apply({"lora": {"rank": 2}})


def test_sweep_block_with_set_axes(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**TINY, "sweep": {"target_epsilons": [2], "set": {
        "lora.rank+lora.alpha": [[2, 4], [4, 8]], "training.learning_rate": [0.01, 0.1]}}}))
    base, spec = load_sweep_spec(p)
    assert [ax.key for ax in spec.axes] == ["lora.rank+lora.alpha", "training.learning_rate"]
    assert len(spec.points()) == 4 and all(pt.target_epsilon == 2.0 for pt in spec.points())
    for pt in spec.points():
        parse_config(pt.apply(base))
    # flags: privacy levels replace the block's; an axis replaces the block's axis of the same key
    over = spec.override(make_points([0.0]), [parse_set("training.learning_rate=0.5"), parse_set("lora.dropout=0")])
    assert [pt.name for pt in over.points()] == ["rank_2-alpha_4-learning_rate_0.5-dropout_0-non_private",
                                                "rank_4-alpha_8-learning_rate_0.5-dropout_0-non_private"]
    assert load_sweep_config(p)[1] is not None and len(load_sweep_config(p)[1] or []) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "sweep": {"set": {"lora.rank": 4}}}))
    with pytest.raises(ValueError, match=r"^set\.lora\.rank"):
        load_sweep_spec(bad)
    bad.write_text(yaml.safe_dump({**TINY, "sweep": {"ranks": [4]}}))
    with pytest.raises(ValueError, match=r"^sweep\.ranks"):
        load_sweep_spec(bad)
    assert load_sweep_spec(tmp_path / "s.yaml")[1] != SweepSpec()


def test_lora_sketch_study_file_is_a_rank_sweep() -> None:
    base, spec = load_sweep_spec(EXAMPLES / "lora_sketch_study.yaml")
    points = spec.points()
    assert len(points) == 10 and base["mechanism"] == "lora_sketch"
    seen = set()
    for pt in points:
        cfg = parse_config(pt.apply(base))
        assert cfg.lora.alpha / cfg.lora.rank == pytest.approx(2.0) and cfg.privacy.noise_multiplier == 0
        seen.add((cfg.lora.rank, cfg.options["a_secret"]))
        assert pt.name == (f"rank_{cfg.lora.rank}-alpha_{cfg.lora.alpha:g}-"
                           f"a_secret_{str(cfg.options['a_secret']).lower()}-non_private")
    assert seen == {(r, s) for r in (4, 8, 16, 32, 64) for s in (False, True)}


@pytest.mark.slow
def test_cli_sweep_over_rank_trains_each_point_and_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "sw"
    args = [sys.executable, "-m", "privaudit", "sweep", str(cfg), "-o", str(out), "--no-audit", "--json",
            "--set", "lora.rank=1,3", "--noise-multipliers", "0,2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    names = [p["name"] for p in res["points"]]
    assert names == ["rank_1-non_private", "rank_1-sigma_2", "rank_3-non_private", "rank_3-sigma_2"]
    for p in res["points"]:
        man = json.loads((Path(p["run_dir"]) / "manifest.json").read_text())
        assert man["config"]["lora"]["rank"] == p["settings"]["lora.rank"] and man["name"] == p["name"]
        assert man["privacy"]["noise_multiplier"] == p["noise_multiplier"]
    mtimes = {n: (out / "runs" / n / "manifest.json").stat().st_mtime_ns for n in names}
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)  # resumes: nothing retrained
    assert again.returncode == 0, again.stderr
    assert {n: (out / "runs" / n / "manifest.json").stat().st_mtime_ns for n in names} == mtimes
    bad = subprocess.run(args[:-4] + ["--set", "lora.rank"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: set")


def test_run_sweep_keeps_settings_in_summary(tmp_path: Path) -> None:
    pts = make_grid([make_axis("lora.rank", [1])], make_points([0.0]))
    res = run_sweep(TINY, pts, tmp_path / "sw", audit=False, report=False, quiet=True)
    assert res.points[0]["settings"] == {"lora.rank": 1} and res.points[0]["name"] == "rank_1-non_private"


def test_lora_sketch_study_file_runs_as_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`privaudit study` (lora_sketch.run_study_file) on the sweep-format example runs that sweep."""
    import privaudit.sweep as sw
    from privaudit.studies import lora_sketch_rank as rank_study

    seen: dict[str, Any] = {}

    def fake_run_sweep(base: Any, points: Any, out_dir: Any, **kw: Any) -> sw.SweepResult:
        seen["names"] = [p.name for p in points]
        seen["mechanism"] = base["mechanism"]
        return sw.SweepResult(Path(out_dir), (), None, ())

    monkeypatch.setattr(sw, "run_sweep", fake_run_sweep)
    res = rank_study.run_study_file(EXAMPLES / "lora_sketch_study.yaml", tmp_path / "st", progress=lambda m: None)
    assert seen["mechanism"] == "lora_sketch" and len(seen["names"]) == 10 and res.rows == ()


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_sweep_resumes_a_local_folder_model_on_file_data(tmp_path: Path) -> None:
    """A point interrupted after its first checkpoint, whose model is a local folder and whose data is
    a JSONL file: the sweep resumes it with the folder and file of the base config given now (never
    those its manifest names) and audits it; a base config naming another folder is refused."""
    from privaudit.models import load_base_model, model_folder_fingerprint
    from privaudit.runs import load_run, train

    model, tok = load_base_model("tiny-gpt2", "classification", n_layer=1, n_embd=16, n_head=2)
    folder = tmp_path / "my-model"
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": f"record {i} says {'yes' if i % 2 else 'no'}",
                                        "label": i % 2}) + "\n" for i in range(30)), encoding="utf-8")
    base = {**TINY, "model": {"name": str(folder), "max_length": 16},
            "data": {"source": "jsonl", "path": str(data), "max_heldout": 10}}
    points = make_points([1.0])
    out = tmp_path / "sw"
    rd = out / "runs" / points[0].name

    def crash_after_3(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):  # steps 1-3 released, the step-2 checkpoint kept
        train(parse_config(points[0].apply({**base, "training": {**TINY["training"], "steps": 4}})), rd,
              progress=crash_after_3)
    assert (rd / "checkpoint").exists()
    other = tmp_path / "other-model"
    other.mkdir()
    with pytest.raises(ValueError, match="^model.name: .*other-model"):
        run_sweep({**base, "model": {"name": str(other), "max_length": 16}}, points, out, audit=False,
                  report=False, quiet=True)
    with pytest.raises(ValueError, match="^config: differs"):  # the run was started with steps: 4
        run_sweep(base, points, out, audit=False, report=False, quiet=True)
    base["training"] = {**TINY["training"], "steps": 4}
    conf = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(conf + b"\n")  # the same name, other bytes: not the run's model
    with pytest.raises(ValueError, match="^model.name: .*base_model_fingerprint"):
        run_sweep(base, points, out, audit=False, report=False, quiet=True)
    (folder / "config.json").write_bytes(conf)
    res = run_sweep(base, points, out, audit=True, report=False, quiet=True)
    man = json.loads((rd / "manifest.json").read_text())
    assert man["status"] == "complete" and man["resumes"][0]["from_step"] == 2
    assert man["privacy"]["ledger_releases"] == 4 + 1  # step 3 redone from the step-2 checkpoint: counted twice
    assert res.points[0]["verdict"] in ("consistent", "inconclusive", "violation")
    assert json.loads((rd / "audit.json").read_text())["verdict"] == res.points[0]["verdict"]
    assert man["base_model_fingerprint"] == model_folder_fingerprint(folder)
    with pytest.raises(ValueError, match="^model_path: .*base_model_fingerprint"):
        load_run(rd, model_path=other, data_path=data)
