"""`privaudit study`: dispatch on the study's mechanism; the PrivTune study's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from privaudit.cli import cli
from privaudit.reports.figures import attack_success_vs_utility_drop, has_data
from privaudit.studies import study_mechanism


def test_study_mechanism_dispatch() -> None:
    assert study_mechanism({"grid": {}, "base": {}}) == "privtune"
    assert study_mechanism({"base": {"mechanism": "lora_sketch"}, "study": {}}) == "lora_sketch"
    with pytest.raises(ValueError, match="^mechanism: no study for 'dp_lora'"):
        study_mechanism({"mechanism": "dp_lora"})
    with pytest.raises(ValueError, match="^mechanism: the study file names no mechanism"):
        study_mechanism({"base": {}})


def test_figure_without_utility_drop_says_no_data() -> None:
    assert not has_data(attack_success_vs_utility_drop([{"mode": "dchi", "utility_drop": None, "attacks": []}]))


def test_privtune_study_cli_writes_json_figure_and_pdf(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    study = {
        "mechanism": "privtune",
        "base": {"model": {"name": "tiny-llama", "max_length": 16},
                 "data": {"synthetic": {"n_people": 24, "records_per_person": 2, "n_canaries": 0}},
                 "training": {"steps": 2, "batch_size": 6, "sampling": "fixed_batch"},
                 "privacy": {"noise_multiplier": 0, "noise_seed": 1},
                 "options": {"split_layer": 0, "knn_k": 5}},
        "vocabulary": "corpus",
        "grid": {"mode": ["none", "dchi"], "eta": [0.01]},
        "attack": {"victims": 8, "attribute_victims": 20, "learned_steps": 3, "optim_steps": 1},
        "max_utility_drop": 1.0,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = CliRunner().invoke(cli, ["study", str(path), "-o", str(tmp_path / "out"), "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)["summary"]
    assert set(summary["modes"]) == {"none", "dchi"}
    res = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["mode"] for r in res["rows"]] == ["none", "dchi"] and res["rows"][0]["utility_drop"] == 0.0
    assert (tmp_path / "out" / "attack_vs_utility_drop.png").stat().st_size > 1000
    assert (tmp_path / "out" / "study.pdf").read_bytes()[:4] == b"%PDF"
    assert has_data(attack_success_vs_utility_drop(res["rows"]))
