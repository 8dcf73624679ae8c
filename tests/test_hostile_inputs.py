"""Hostile run directories, configs and arguments (issue 15): no code from a run directory ever runs,
every crafted input is one line on stderr with exit 2 within a time and memory cap, ``train`` takes its
directory's lock before writing anything and leaves nothing half-made behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import save_file

from privaudit.ledger.ledger import LedgerLockedError
from privaudit.config import load_config, parse_config
from privaudit.models import load_base_model, minilm_path
from privaudit.runs import RUN_LOCK, _lock_run_dir, _unlock_run_dir, load_run, train
from tests.hostile_harness import (
    TINY,
    assert_clean,
    assert_rejected,
    crafted_run,
    run_cli,
    tiny,
)


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# code execution
# ----------------------------------------------------------------------------------------------
def evil_model_dir(root: Path, marker: Path) -> Path:
    """A model folder whose config.json maps the Auto classes (``auto_map``) to its own
    ``modeling_evil.py``/``configuration_evil.py``: importing either creates ``marker``."""
    d = root / "evil_model"
    d.mkdir(parents=True)
    src = minilm_path()
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy(f, d / f.name)
    os.symlink(src / "model.safetensors", d / "model.safetensors")
    conf = json.loads((src / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
                        "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(conf))
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
    (d / "configuration_evil.py").write_text(
        payload + "from transformers import BertConfig\n\nclass EvilConfig(BertConfig):\n    pass\n")
    (d / "modeling_evil.py").write_text(
        payload + "from transformers import BertForSequenceClassification\n\n"
        "class EvilModel(BertForSequenceClassification):\n    pass\n")
    return d


def evil_config(model_dir: Path, trust: bool) -> dict[str, Any]:
    overrides = {"trust_remote_code": True} if trust else {}
    return tiny(model={"name": str(model_dir), "max_length": 16, "overrides": overrides})


def test_control_the_crafted_model_runs_its_code_when_trusted(tmp_path: Path) -> None:
    """The test's own control: transformers with trust_remote_code=True does run the folder's code,
    so the tests below would see the marker if privaudit ever let it through."""
    from transformers import AutoConfig

    marker = tmp_path / "marker"
    d = evil_model_dir(tmp_path, marker)
    AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=True)
    assert marker.exists()


@pytest.mark.parametrize("trust", [True, False])
def test_audit_never_runs_code_from_a_crafted_run_dir(tmp_path: Path, trust: bool) -> None:
    marker = tmp_path / "marker"
    rd = crafted_run(tmp_path, evil_config(evil_model_dir(tmp_path, marker), trust))
    res = run_cli(["audit", str(rd), "--quiet"])
    assert_rejected(res, "model.overrides.trust_remote_code" if trust else "manifest.config.model.name")
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_remote_code" if trust else "never taken from a run directory"):
        load_run(rd)
    assert not marker.exists()


def test_a_user_chosen_model_folder_loads_without_its_code(tmp_path: Path) -> None:
    """--model-path / a user's own config may name the folder: it loads with transformers' own
    classes (auto_map ignored), never the folder's Python."""
    marker = tmp_path / "marker"
    d = evil_model_dir(tmp_path, marker)
    model, _ = load_base_model(str(d), "classification")
    assert type(model).__module__.startswith("transformers.") and not marker.exists()
    rd = crafted_run(tmp_path, evil_config(d, trust=False))
    res = run_cli(["audit", str(rd), "--quiet", "--model-path", str(d)])
    assert_rejected(res)  # the empty adapter does not fit: rejected only after the model was built
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_base_model(str(d), "classification", trust_remote_code=True)
    with pytest.raises(ValueError, match="revision: not a"):
        load_base_model(str(d), "classification", revision="main")
    assert not marker.exists()


def test_train_resume_never_runs_code_from_a_crafted_run_dir(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    d = evil_model_dir(tmp_path, marker)
    rd = crafted_run(tmp_path, evil_config(d, trust=True), status="running")
    # the crafted config itself, and a clean config against the crafted manifest
    res = run_cli(["train", str(write_yaml(tmp_path / "evil.yaml", evil_config(d, trust=True))),
                   "-o", str(rd), "--resume", "--quiet"])
    assert_rejected(res, "trust_remote_code")
    res = run_cli(["train", str(write_yaml(tmp_path / "clean.yaml", evil_config(d, trust=False))),
                   "-o", str(rd), "--resume", "--quiet"])
    assert_rejected(res, "trust_remote_code")
    # a manifest naming the folder (no overrides): resuming from the manifest alone refuses the path
    rd2 = crafted_run(tmp_path / "b", evil_config(d, trust=False), status="running")
    with pytest.raises(ValueError, match="^manifest.config.model.name: .*never taken from a run directory"):
        train(None, rd2, resume=True, progress=False)
    assert not marker.exists()
    assert not (rd / RUN_LOCK).exists() and not (rd2 / RUN_LOCK).exists()


# ----------------------------------------------------------------------------------------------
# data files: the user names them, a manifest never does
# ----------------------------------------------------------------------------------------------
_WATCHED: dict[str, list[str]] = {}  # resolved path -> the opens seen while it is watched


def _open_hook(event: str, args: tuple[Any, ...]) -> None:
    if event in ("open", "os.listdir", "os.scandir") and _WATCHED and args and isinstance(args[0], (str, os.PathLike)):
        path = os.path.realpath(os.fspath(args[0]))
        for key, hits in _WATCHED.items():
            if path == key or path.startswith(key + os.sep):
                hits.append(event)


_HOOKED: list[bool] = []


@contextlib.contextmanager
def opens_of(path: Path | str) -> Iterator[list[str]]:
    """Every open (and directory listing) of ``path`` or of anything under it by this process while the
    block runs, seen by a ``sys`` audit hook (``open`` is raised by ``open``, ``io.open``, ``os.open``)."""
    if not _HOOKED:  # audit hooks cannot be removed: one for the whole session, idle when nothing is watched
        sys.addaudithook(_open_hook)
        _HOOKED.append(True)
    key = os.path.realpath(path)
    _WATCHED[key] = hits = []
    try:
        yield hits
    finally:
        del _WATCHED[key]


def write_records(path: Path, n: int = 40, changed: int | None = None) -> Path:
    """A labelled JSONL data file (``changed``: that record's text differs)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rows = [{"id": f"r{i}", "text": f"{words[i % 10]} {words[i * 3 % 10]} record {i}" + (" x" if i == changed else ""),
             "label": i % 2} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("source,target", [("jsonl", "outside/secret.jsonl"), ("hf", "outside/dataset"),
                                           ("hf", "/etc/passwd")])
def test_a_manifest_never_chooses_the_data_file(tmp_path: Path, source: str, target: str) -> None:
    """A crafted run directory whose manifest names a data file or folder outside it (a readable JSONL
    file, a folder, /etc/passwd): audit, load_run and resume refuse with one line asking for
    --data-path, and nothing there is ever opened or listed."""
    where = Path(target) if target.startswith("/") else tmp_path / target
    if target.endswith(".jsonl"):
        write_records(where)
    elif not target.startswith("/"):
        write_records(where / "data.jsonl")
    with opens_of(where) as hits:  # the spy's control: it sees an open of the file (or in the folder)
        (where if where.is_file() else where / "data.jsonl").read_bytes()
    assert hits == ["open"]
    target = where
    cfg = tiny(data={"source": source, "path": str(target)})
    rd = crafted_run(tmp_path / "a", cfg)
    resumable = crafted_run(tmp_path / "b", cfg, status="running")
    with opens_of(target) as hits:
        res = run_cli(["audit", str(rd), "--quiet"])
        assert_rejected(res, "manifest.config.data.path", "--data-path")
        with pytest.raises(ValueError, match="^manifest.config.data.path: .*never taken from a run directory"):
            load_run(rd)
        with pytest.raises(ValueError, match="^manifest.config.data.path: .*never taken from a run directory"):
            train(None, resumable, resume=True, progress=False)
        # the user's own file, but the crafted run records no fingerprint to check it against
        mine = write_records(tmp_path / "mine.jsonl")
        if source == "jsonl":
            assert_rejected(run_cli(["audit", str(rd), "--quiet", "--data-path", str(mine)]),
                            "data_path", "records no data fingerprint")
    assert hits == []


@pytest.mark.slow
def test_data_path_is_checked_against_the_recorded_fingerprint(tmp_path: Path) -> None:
    """A run trained on a JSONL file audits with the user's copy of it (--data-path; the path in the
    manifest is never opened); another file is refused naming the fingerprint; a synthetic run takes
    no data file."""
    original = write_records(tmp_path / "train_data" / "d.jsonl")
    rd = tmp_path / "run"
    train(parse_config(tiny(data={"source": "jsonl", "path": str(original)})), rd, progress=False)
    mine = tmp_path / "mine" / "copy.jsonl"
    mine.parent.mkdir()
    shutil.copy(original, mine)
    wrong = write_records(tmp_path / "wrong.jsonl", changed=3)
    with opens_of(original) as hits:
        assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "manifest.config.data.path", "--data-path")
        res = run_cli(["audit", str(rd), "--quiet", "--json", "--data-path", str(mine)])
        assert_clean(res, allowed=(0, 1))
        assert json.loads(res.stdout)["verdict"] in ("consistent", "inconclusive", "violation")
        line = assert_rejected(run_cli(["audit", str(rd), "--quiet", "--data-path", str(wrong)]),
                               "fingerprint", "data_path")
        assert line.startswith("error: ledger.header.dataset_fingerprint: ")
        from privaudit.audit.auditor import audit_run

        with pytest.raises(ValueError, match="^ledger.header.dataset_fingerprint: data_path .* fingerprint"):
            audit_run(rd, data_path=wrong, progress=False, _write=False)
        with pytest.raises(ValueError, match="^data_path: .* does not exist"):
            load_run(rd, data_path=tmp_path / "nope.jsonl")
        with pytest.raises(ValueError, match="^data_path: source jsonl needs a .jsonl"):
            load_run(rd, data_path=tmp_path)
        assert load_run(rd, data_path=mine).data is not None
    assert hits == []
    # the finished run's manifest edited to name another file: the seal covers the config, so the run is
    # refused as tampered (exit 1, one line) and the file is never opened
    original_manifest = (rd / "manifest.json").read_text()
    manifest = json.loads(original_manifest)
    secret = write_records(tmp_path / "outside" / "secret.jsonl")
    manifest["config"]["data"]["path"] = str(secret)
    (rd / "manifest.json").write_text(json.dumps(manifest))
    with opens_of(secret) as hits:
        for argv in (["audit", str(rd), "--quiet"], ["audit", str(rd), "--quiet", "--data-path", str(mine)]):
            res = run_cli(argv)
            assert_clean(res, allowed=(1,))
            assert "manifest.config does not match the ledger seal" in res.lines[0]
    assert hits == []
    # a forged manifest fingerprint is caught as well (by the seal, and the ledger header's agrees with the file)
    manifest = json.loads(original_manifest)
    manifest["data"]["corpus_fingerprint"] = "0" * 64
    (rd / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.data does not match the ledger seal"):
        load_run(rd, data_path=mine)
    synthetic = crafted_run(tmp_path / "s")
    assert_rejected(run_cli(["audit", str(synthetic), "--quiet", "--data-path", str(mine)]), "data_path", "synthetic")


# ----------------------------------------------------------------------------------------------
# run directories: bounded reads, shapes, sizes
# ----------------------------------------------------------------------------------------------
def test_run_dir_files_that_are_devices_or_point_outside_are_refused(tmp_path: Path) -> None:
    rd = crafted_run(tmp_path / "a")
    (rd / "ledger.jsonl").unlink()
    os.symlink("/dev/zero", rd / "ledger.jsonl")
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "ledger.jsonl", "outside the run directory")

    rd = crafted_run(tmp_path / "b")
    (rd / "manifest.json").unlink()
    os.symlink("/dev/urandom", rd / "manifest.json")
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "manifest")
    assert_rejected(run_cli(["report", str(rd), "-o", str(tmp_path / "r.pdf"), "--quiet"]), "manifest")
    assert_rejected(run_cli(["train", str(write_yaml(tmp_path / "c.yaml", TINY)), "-o", str(rd), "--resume",
                             "--quiet"]), "manifest")

    rd = crafted_run(tmp_path / "c")
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file({}, str(elsewhere))
    (rd / "adapter.safetensors").unlink()
    os.symlink(elsewhere, rd / "adapter.safetensors")
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "adapter.safetensors", "outside the run directory")

    rd = crafted_run(tmp_path / "d")
    (rd / "manifest.json").unlink()
    os.mkfifo(rd / "manifest.json")  # a FIFO nobody writes to must not block the reader
    assert_rejected(run_cli(["audit", str(rd), "--quiet"], seconds=20), "not a regular file")

    rd = crafted_run(tmp_path / "e", status="running")  # resume reads the checkpoint folder too
    (rd / "checkpoint").mkdir()
    os.symlink("/dev/zero", rd / "checkpoint" / "state.json")
    assert_rejected(run_cli(["train", str(write_yaml(tmp_path / "e.yaml", TINY)), "-o", str(rd), "--resume",
                             "--quiet"]), "state.json", "outside the run directory")


@pytest.mark.parametrize("manifest", [[1, 2, 3], "text", None, {"status": "complete"},
                                      {"status": "complete", "config": [1]}])
def test_malformed_manifests_are_one_line(tmp_path: Path, manifest: Any) -> None:
    rd = crafted_run(tmp_path)
    (rd / "manifest.json").write_text(json.dumps(manifest))
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "manifest")
    assert_clean(run_cli(["report", str(rd), "-o", str(tmp_path / "r.pdf"), "--quiet"]))


def test_oversized_audit_keys_and_configs_are_refused_before_any_work(tmp_path: Path) -> None:
    rd = crafted_run(tmp_path / "a")
    key = {"gradient_canaries": {"seed": 0, "count": 10**12, "param_names": [], "param_shapes": [],
                                 "clip_norm": 1.0, "sample_rate": 0.1, "included": []}}
    (rd / "audit_key.json").write_text(json.dumps(key))
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "audit_key.gradient_canaries.count")
    (rd / "audit_key.json").write_text(json.dumps([1]))
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "audit_key")

    huge = tiny(data={"synthetic": {"n_people": 10**8}})
    rd = crafted_run(tmp_path / "b", huge)
    assert_rejected(run_cli(["audit", str(rd), "--quiet"]), "data.synthetic.n_people")
    cfg = write_yaml(tmp_path / "huge.yaml", huge)
    assert_rejected(run_cli(["epsilon", "--config", str(cfg)]), "data.synthetic.n_people")
    assert_rejected(run_cli(["train", str(cfg), "-o", str(tmp_path / "out"), "--quiet"]), "data.synthetic.n_people")
    assert not (tmp_path / "out").exists()
    big_model = tiny(model={"name": "tiny-gpt2", "overrides": {"n_embd": 65536, "n_layer": 64, "n_head": 2}})
    with pytest.raises(ValueError, match="^overrides: .* parameters"):
        load_base_model("tiny-gpt2", "classification", **big_model["model"]["overrides"])


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = yaml.safe_dump(TINY) + "options:\n" + "".join(f"  {line}\n" for line in lines)
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb)
    for argv in (["train", str(cfg), "-o", str(tmp_path / "o"), "--quiet"], ["epsilon", "--config", str(cfg)],
                 ["sweep", str(cfg), "-o", str(tmp_path / "s"), "--noise-multipliers", "1", "--quiet"]):
        assert_rejected(run_cli(argv), "aliases")
    with pytest.raises(ValueError, match="aliases"):
        load_config(cfg)
    (tmp_path / "big.yaml").write_text("a: " + "x" * (2 << 20))
    with pytest.raises(ValueError, match="more than the limit"):
        load_config(tmp_path / "big.yaml")


# ----------------------------------------------------------------------------------------------
# arguments and config values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,field", [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "1e30", "--delta", "1e-5"], "--steps"),
    (["epsilon", "--noise-multiplier", "1e-300", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"],
     "--noise-multiplier"),
    (["calibrate", "--target-epsilon", "1e9", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100"],
     "--target-epsilon"),
    (["calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1e15"],
     "--steps"),
])
def test_resource_exhausting_arguments_are_one_line(argv: list[str], field: str) -> None:
    assert_rejected(run_cli(argv), field)


def test_accountants_keep_memory_bounded_at_the_limits() -> None:
    """The extremes the CLI accepts answer within the caps (an accountant that cannot is 'unavailable')."""
    for argv in (["epsilon", "--noise-multiplier", "1e-4", "--sample-rate", "1", "--steps", "1e9", "--delta", "1e-5",
                  "--json"],
                 ["epsilon", "--noise-multiplier", "0.01", "--sample-rate", "1", "--steps", "1e9", "--delta",
                  "1e-5", "--json"]):
        res = run_cli(argv)
        assert_clean(res, allowed=(0,))
        assert json.loads(res.stdout)["results"]


@pytest.mark.parametrize("section,update,field", [
    ("training", {"steps": True}, "training.steps"),
    ("training", {"batch_size": False, "steps": 2}, "training.batch_size"),
    ("privacy", {"noise_seed": -1}, "privacy.noise_seed"),
    ("privacy", {"noise_multiplier": 1e-300}, "privacy.noise_multiplier"),
    ("privacy", {"noise_multiplier": None, "target_epsilon": 1e9}, "privacy.target_epsilon"),
    ("lora", {"rank": True}, "lora.rank"),
    ("options", {"no_such_option": 1}, "no_such_option"),
    ("model", {"overrides": {"trust_remote_code": True}}, "model.overrides.trust_remote_code"),
    ("data", {"synthetic": {"n_people": 300_000, "records_per_person": 1}}, "data.synthetic.n_people"),
])
def test_config_values_are_checked_and_named(tmp_path: Path, section: str, update: dict[str, Any],
                                             field: str) -> None:
    data = tiny(**{section: update})
    with pytest.raises(ValueError, match=f"^{field}: " if field.startswith(section) else field):
        parse_config(data)
    cfg = write_yaml(tmp_path / "c.yaml", data)
    line = assert_rejected(run_cli(["train", str(cfg), "-o", str(tmp_path / "out"), "--quiet"]), field)
    assert line.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_bools_are_still_bools_and_numbers_still_numbers() -> None:
    cfg = parse_config(tiny(lora={"rank": 2, "train_head": False}, training={"steps": 2, "eval_before": True}))
    assert cfg.lora.train_head is False and cfg.training.eval_before is True and cfg.training.steps == 2


# ----------------------------------------------------------------------------------------------
# train: lock before writing, clean failure, no lock files left
# ----------------------------------------------------------------------------------------------
def test_a_second_train_into_a_locked_directory_writes_nothing(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    fd = _lock_run_dir(rd)  # another process is training into rd
    try:
        res = run_cli(["train", str(write_yaml(tmp_path / "c.yaml", TINY)), "-o", str(rd), "--quiet"])
        assert_rejected(res, "being written by another process")
        assert sorted(p.name for p in rd.iterdir()) == [RUN_LOCK]
        with pytest.raises(LedgerLockedError):
            train(parse_config(TINY), rd, progress=False)
        assert sorted(p.name for p in rd.iterdir()) == [RUN_LOCK]
    finally:
        _unlock_run_dir(rd, fd)
    assert list(rd.iterdir()) == []


def test_a_failed_train_leaves_no_half_directory(tmp_path: Path) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", tiny(model={"name": "does-not/exist"}))
    rd = tmp_path / "run"
    assert_rejected(run_cli(["train", str(bad), "-o", str(rd), "--quiet"]), "does-not/exist")
    assert not rd.exists()
    rd.mkdir()  # an existing empty directory stays, empty
    assert_rejected(run_cli(["train", str(bad), "-o", str(rd), "--quiet"]), "does-not/exist")
    assert rd.is_dir() and list(rd.iterdir()) == []


def test_report_refuses_a_missing_output_folder(tmp_path: Path) -> None:
    rd = crafted_run(tmp_path)
    out = tmp_path / "nonexistent" / "x.pdf"
    assert_rejected(run_cli(["report", str(rd), "-o", str(out), "--quiet"]), "-o", "does not exist")
    assert not out.parent.exists()


@pytest.mark.slow
def test_failed_then_fixed_train_and_lock_files(tmp_path: Path) -> None:
    """After a failed run the same directory trains cleanly; a finished run leaves no lock file."""
    rd = tmp_path / "run"
    with pytest.raises(ValueError, match="does-not/exist"):
        train(parse_config(tiny(model={"name": "does-not/exist"})), rd, progress=False)
    res = train(parse_config(TINY), rd, progress=False)
    assert res.manifest["status"] == "complete"
    assert not [p.name for p in rd.iterdir() if p.name.endswith(".lock")]
    assert_clean(run_cli(["audit", str(rd), "--quiet", "--json"]), allowed=(0, 1))
    assert not [p.name for p in rd.iterdir() if p.name.endswith(".lock")]
