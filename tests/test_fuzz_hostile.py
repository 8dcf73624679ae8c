"""Fuzzing the CLI with hostile arguments, config values and run-directory contents (issue 15).

Every call runs :func:`privaudit.cli.main` in-process under a time cap and an address-space cap
(``tests.hostile_harness``). The contract for any input: no traceback, no hang, no allocation past the
cap, exit 0/1/2, and a rejection is one line on stderr (exit 2; a failed check is exit 1, one line).

The normal suite runs a few hundred derandomized examples (``N_*`` below); ``-m slow`` runs more,
randomized, with the heavier accountants. Known and left to the accountants' owners: calibrating
with PRV at target ε ≥ 100, or with PLD at q ≈ 1e-9 (ε flat at 0 in σ), takes minutes (each evaluation
seconds, up to 200 of them) in bounded memory; the PLD calibration fuzz therefore draws q ≥ 1e-4.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from privaudit.config import config_to_dict, parse_config
from tests.hostile_harness import TINY, assert_clean, crafted_run, run_cli

# examples per test in the normal suite (their sum is reported in the closing note)
N_EPSILON, N_CALIBRATE, N_CONFIG_VALUES, N_CONFIG_TEXT, N_MANIFEST, N_RUN_FILES, N_REPORT = 70, 40, 50, 30, 40, 25, 4

FAST = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
SLOW = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

EDGE_NUMBERS = ["0", "-0", "1", "-1", "0.5", "1e-300", "5e-324", "1e-4", "1e6", "1e308", "1e309", "inf", "-inf",
                "nan", "1e9", "1e15", "1e30", "2.5", "true", "", " ", "0x10", "1_000", "1e-5", "0.999999", "10"]
number_text = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**40, 10**40).map(str),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6),
)



def plausible(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    """Mostly a valid value, sometimes a hostile one or none: so that one hostile value often meets
    valid others and reaches the computation."""
    hostile: st.SearchStrategy[str | None] = st.one_of(number_text, st.none())
    return st.integers(0, 3).flatmap(lambda i: hostile if i == 0 else valid)


SIGMA = plausible(st.floats(1e-4, 1e4).map(repr))
RATE = plausible(st.floats(1e-9, 1.0).map(repr))
STEPS = plausible(st.integers(0, 10**6).map(str))
DELTA = plausible(st.sampled_from(["1e-5", "1e-9", "0.01", "0.5", "1e-300", "5e-324"]))
TARGET = plausible(st.floats(1e-3, 1e3).map(repr))


def options(names: list[str], values: list[str | None]) -> list[str]:
    out: list[str] = []
    for n, v in zip(names, values):
        if v is not None:
            out += [n, v]
    return out


# ----------------------------------------------------------------------------------------------
# epsilon / calibrate arguments
# ----------------------------------------------------------------------------------------------
EPS_FLAGS = ["--noise-multiplier", "--sample-rate", "--steps", "--delta"]


def _epsilon(values: list[str | None], accountant: str) -> None:
    res = run_cli(["epsilon", *options(EPS_FLAGS, values), "--accountant", accountant, "--json"])
    assert_clean(res, allowed=(0, 2))
    if res.code == 0:
        out = json.loads(res.stdout)
        assert all(r["epsilon"] is None or r["epsilon"] >= 0 for r in out["results"])


@settings(FAST, max_examples=N_EPSILON)
@given(st.tuples(SIGMA, RATE, STEPS, DELTA).map(list), st.sampled_from(["rdp", "rdp", "pld", "all"]))
@example(["1", "0.01", "1e30", "1e-5"], "all")  # the crafted cases of issue 15 (OverflowError, ZeroDivisionError)
@example(["1e-300", "0.01", "10", "1e-5"], "all")
@example(["1e-3", "1", "1e9", "1e-5"], "all")
def test_fuzz_epsilon_arguments(values: list[str | None], accountant: str) -> None:
    _epsilon(values, accountant)


@pytest.mark.slow
@settings(SLOW, max_examples=200)
@given(st.tuples(SIGMA, RATE, STEPS, DELTA).map(list), st.sampled_from(["pld", "prv", "all"]))
def test_fuzz_epsilon_arguments_all_accountants(values: list[str | None], accountant: str) -> None:
    _epsilon(values, accountant)


CAL_FLAGS = ["--target-epsilon", "--delta", "--sample-rate", "--steps"]


def _calibrate(values: list[str | None], accountant: str) -> None:
    res = run_cli(["calibrate", *options(CAL_FLAGS, values), "--accountant", accountant, "--json"])
    assert_clean(res, allowed=(0, 2))
    if res.code == 0:
        out = json.loads(res.stdout)
        assert out["noise_multiplier"] > 0 and out["epsilon"] <= float(values[0]) * (1 + 1e-9)  # type: ignore[arg-type]


@settings(FAST, max_examples=N_CALIBRATE)
@given(st.tuples(TARGET, DELTA, RATE, STEPS).map(list), st.just("rdp"))
@example(["1e9", "1e-5", "0.01", "100"], "pld")  # the crafted cases of issue 15 (67.7 GiB; a hang)
@example(["1", "1e-5", "0.01", "1e15"], "pld")
def test_fuzz_calibrate_arguments(values: list[str | None], accountant: str) -> None:
    _calibrate(values, accountant)


@pytest.mark.slow
@settings(SLOW, max_examples=60)
@given(st.tuples(TARGET, DELTA, plausible(st.floats(1e-4, 1.0).map(repr)), STEPS).map(list), st.just("pld"))
def test_fuzz_calibrate_arguments_tight_accountants(values: list[str | None], accountant: str) -> None:
    _calibrate(values, accountant)


# ----------------------------------------------------------------------------------------------
# config values (train with bad configs; epsilon --config with small valid ones)
# ----------------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

BASE = config_to_dict(parse_config(TINY))
PATHS = sorted({f"{s}.{k}" for s, v in BASE.items() if isinstance(v, dict) for k in v}
               | {"data.synthetic.n_people", "data.synthetic.records_per_person", "data.synthetic.n_canaries",
                  "options.anything", "model.overrides.n_layer", "model.overrides.trust_remote_code", "mechanism",
                  "task", "extra_section"})


def with_value(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node = data
    *head, last = path.split(".")
    for key in head:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def _small(cfg: Any) -> bool:
    syn = cfg.data.synthetic
    return syn.n_people * syn.records_per_person <= 2000 and syn.n_canaries <= 200


@settings(FAST, max_examples=N_CONFIG_VALUES)
@given(st.sampled_from(PATHS), json_values)
def test_fuzz_config_values(path: str, value: Any) -> None:
    data = with_value(path, value)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "c.yaml"
        cfg_path.write_text(yaml.safe_dump(data), encoding="utf-8")
        try:
            cfg = parse_config(data)
        except ValueError:
            out = Path(tmp) / "out"
            res = run_cli(["train", str(cfg_path), "-o", str(out), "--quiet"])
            assert_clean(res, allowed=(2,))
            assert not out.exists()  # nothing written for a rejected config
            return
        if _small(cfg):  # a valid config: what it will spend, without training it
            assert_clean(run_cli(["epsilon", "--config", str(cfg_path), "--accountant", "rdp", "--json"]),
                         allowed=(0, 2))


@settings(FAST, max_examples=N_CONFIG_TEXT)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       st.sampled_from([".yaml", ".toml", ".yml", ".json"]))
def test_fuzz_config_text(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / f"c{suffix}"
        cfg_path.write_bytes(text.encode("utf-8", "surrogatepass"))
        out = Path(tmp) / "out"
        assert_clean(run_cli(["train", str(cfg_path), "-o", str(out), "--quiet"]), allowed=(2,))
        assert not out.exists()


# ----------------------------------------------------------------------------------------------
# run-directory contents (audit, report, train --resume)
# ----------------------------------------------------------------------------------------------
@settings(FAST, max_examples=N_MANIFEST)
@given(st.one_of(json_values, st.tuples(st.sampled_from(PATHS), json_values)),
       st.sampled_from(["audit", "resume"]))
def test_fuzz_manifest(content: Any, command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(content, tuple):  # a manifest whose config has one hostile value
            rd = crafted_run(Path(tmp), with_value(*content), status="running" if command == "resume" else "complete")
        else:  # any JSON at all
            rd = crafted_run(Path(tmp))
            (rd / "manifest.json").write_text(json.dumps(content), encoding="utf-8")
        if command == "audit":
            res = run_cli(["audit", str(rd), "--quiet", "--json"])
            assert_clean(res, allowed=(1, 2))
        else:
            cfg_path = Path(tmp) / "c.yaml"
            cfg_path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
            res = run_cli(["train", str(cfg_path), "-o", str(rd), "--resume", "--quiet"])
            assert_clean(res, allowed=(1, 2))
        assert not (rd / ".train.lock").exists()


RUN_FILES = ["manifest.json", "ledger.jsonl", "adapter.safetensors", "adapter_init.safetensors", "audit_key.json",
             "audit.json"]
file_contents = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(["symlink:/dev/zero", "symlink:/dev/urandom", "symlink:/etc/hostname", "dir", "fifo"]),
)


def _plant(path: Path, content: bytes | str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif isinstance(content, str):
        os.symlink(content.removeprefix("symlink:"), path)
    else:
        path.write_bytes(content)


@settings(FAST, max_examples=N_RUN_FILES)
@given(st.sampled_from(RUN_FILES), file_contents)
def test_fuzz_run_dir_files(name: str, content: bytes | str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rd = crafted_run(Path(tmp))
        _plant(rd / name, content)
        assert_clean(run_cli(["audit", str(rd), "--quiet", "--json"], seconds=30), allowed=(1, 2))


def _report(name: str, content: bytes | str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rd = crafted_run(Path(tmp))
        if name != "ledger.jsonl":  # the ledger file's own reading is the ledger's (issue 15, ledger part)
            _plant(rd / name, content)
        assert_clean(run_cli(["report", str(rd), "-o", str(Path(tmp) / "r.pdf"), "--quiet"], seconds=60))


@settings(FAST, max_examples=N_REPORT)
@given(st.sampled_from(RUN_FILES), file_contents)
def test_fuzz_report_run_dir(name: str, content: bytes | str) -> None:
    _report(name, content)


@pytest.mark.slow
@settings(SLOW, max_examples=60)
@given(st.sampled_from(RUN_FILES), file_contents)
def test_fuzz_report_run_dir_more(name: str, content: bytes | str) -> None:
    _report(name, content)
