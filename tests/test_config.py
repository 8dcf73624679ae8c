"""Run configs: loading YAML/TOML, validation errors naming the field, planned events."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from privaudit.ledger.events import GaussianEvent, PlaintextEvent
from privaudit.config import load_config, parse_config, resolve_plan
from privaudit.runs import planned_events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE = {
    "task": "classification",
    "model": {"name": "tiny-gpt2"},
    "data": {"synthetic": {"n_people": 20, "n_canaries": 4}},
    "training": {"steps": 10, "batch_size": 8},
    "privacy": {"noise_multiplier": 1.0},
}


def _with(path: str, value: object) -> dict:
    import copy

    data = copy.deepcopy(BASE)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("dp_lora_*.yaml")))
def test_examples_load(example: str) -> None:
    cfg = load_config(EXAMPLES / example)
    assert cfg.mechanism == "dp_lora"


def test_examples_cover_both_tasks() -> None:
    tasks = {load_config(p).task for p in EXAMPLES.glob("dp_lora_*.yaml")}
    assert tasks == {"classification", "causal_lm"}


def test_toml_and_yaml_agree(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'task = "classification"\n[model]\nname = "tiny-gpt2"\n[data.synthetic]\nn_people = 20\nn_canaries = 4\n'
        "[training]\nsteps = 10\nbatch_size = 8\n[privacy]\nnoise_multiplier = 1.0\n"
    )
    import yaml

    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump(BASE))
    assert load_config(toml) == load_config(yml)


@pytest.mark.parametrize(
    "path,value,prefix",
    [
        ("training.batch_size", -1, "training.batch_size:"),
        ("training.learning_rate", 0, "training.learning_rate:"),
        ("training.lr", 0.1, "training.lr:"),  # unknown field (typo)
        ("training.steps", _DELETE, "training.steps:"),  # neither steps nor epochs
        ("training.sample_rate", 0.1, "training.batch_size:"),  # both batch_size and sample_rate
        ("privacy.clip_norm", 0, "privacy.clip_norm:"),
        ("privacy.delta", 1.5, "privacy.delta:"),
        ("privacy.target_epsilon", 3.0, "privacy.noise_multiplier:"),  # both given
        ("privacy.noise_multiplier", -0.5, "privacy.noise_multiplier:"),
        ("privacy.neighbouring", "swap", "privacy.neighbouring:"),
        ("lora.rank", 0, "lora.rank:"),
        ("lora.init_a", "zeros", "lora.init_a:"),
        ("data.source", "csv", "data.path:"),
        ("data.heldout_fraction", 1.0, "data.heldout_fraction:"),
        ("task", "translation", "task:"),
        ("mechanism", "dp_magic", "mechanism:"),
        ("audit.gradient_canaries", -3, "audit.gradient_canaries:"),
    ],
)
def test_bad_values_name_the_field(path: str, value: object, prefix: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_config(_with(path, value))
    assert str(info.value).startswith(prefix), str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^config: .* does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ValueError, match="^config: .* not valid YAML"):
        load_config(bad)
    other = tmp_path / "c.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="^config: .*unsupported file type"):
        load_config(other)


def test_relative_data_path_resolved_against_config(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
    data = _with("data", {"source": "jsonl", "path": "d.jsonl"})
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(data))
    assert load_config(cfg_path).data.path == str((tmp_path / "d.jsonl").resolve())


def test_cli_bad_config_exit_2_one_line(tmp_path: Path) -> None:
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("training.batch_size", 0)))
    for args in (["train", str(bad), "-o", str(tmp_path / "run")], ["epsilon", "--config", str(bad)]):
        proc = subprocess.run([sys.executable, "-m", "privaudit", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: training.batch_size:"), proc.stderr
    assert not (tmp_path / "run").exists()


def test_plan_poisson_from_batch_size_and_epochs() -> None:
    cfg = parse_config(_with("training", {"epochs": 2, "batch_size": 10}))
    plan = resolve_plan(cfg, 100)
    assert plan.sample_rate == pytest.approx(0.1) and plan.steps == 20 and plan.sampling == "poisson"
    cfg = parse_config(_with("training", {"steps": 7, "sample_rate": 0.25}))
    plan = resolve_plan(cfg, 100)
    assert plan.sample_rate == 0.25 and plan.steps == 7
    with pytest.raises(ValueError, match="^training.batch_size"):
        resolve_plan(parse_config(_with("training.batch_size", 500)), 100)


def test_plan_fixed_batch_and_calibration() -> None:
    cfg = parse_config(_with("training", {"epochs": 1.5, "batch_size": 10, "sampling": "fixed_batch"}))
    plan = resolve_plan(cfg, 95)
    assert plan.steps == math.ceil(1.5 * 95 / 10) and plan.batch_size == 10

    cfg = parse_config(_with("privacy", {"target_epsilon": 4.0, "delta": 1e-5, "accountant": "rdp"}))
    plan = resolve_plan(cfg, 80)
    from privaudit.accounting.base import compute_epsilon

    ev = GaussianEvent(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, count=plan.steps)
    eps = compute_epsilon([ev], 1e-5, "rdp").epsilon
    assert eps <= 4.0 and eps > 3.0  # calibrated: at the target, never above
    assert plan.calibrated_epsilon == pytest.approx(eps)


def test_planned_events() -> None:
    cfg = parse_config(BASE)
    planned = planned_events(cfg)
    assert planned.delta == 1e-5 and planned.neighbouring == "add_remove" and planned.claims == []
    (ev,) = planned.events
    assert isinstance(ev, GaussianEvent)
    assert ev.count == 10 and ev.noise_multiplier == 1.0 and ev.clip_norm == 1.0
    assert ev.sample_rate == pytest.approx(8 / planned.plan.dataset_size)

    cfg = parse_config(_with("privacy", {"noise_multiplier": 0.0, "claims": [{"epsilon": 1.0, "source": "x"}]}))
    planned = planned_events(cfg)
    (ev,) = planned.events
    assert isinstance(ev, PlaintextEvent) and ev.count == 10
    assert planned.claims[0].epsilon == 1.0


def test_planned_events_for_a_jsonl_source(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "text": f"record number {i}", "label": i % 2} for i in range(50)]
    (tmp_path / "d.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    cfg = parse_config(_with("data", {"source": "jsonl", "path": str(tmp_path / "d.jsonl"),
                                      "heldout_fraction": 0.2}))
    planned = planned_events(cfg)
    assert planned.plan.dataset_size == 40
    assert planned.events[0].sample_rate == pytest.approx(8 / 40)
    bad = parse_config(_with("data", {"source": "jsonl", "path": str(tmp_path / "d.jsonl"),
                                      "text_column": "body"}))
    with pytest.raises(ValueError, match="^data.text_column"):
        planned_events(bad)
