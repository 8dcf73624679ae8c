"""CLI contract: flags, --json shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from privaudit.ledger.events import ClaimEvent, GaussianEvent
from privaudit.ledger.ledger import Ledger


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privaudit", *args], capture_output=True, text=True,
                          timeout=300)


def assert_bad_input(proc: subprocess.CompletedProcess[str], field: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert field in lines[0]


def test_epsilon_json_shape() -> None:
    proc = run("epsilon", "--noise-multiplier", "1.1", "--sample-rate", str(256 / 60000),
               "--steps", "14063", "--delta", "1e-5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["delta"] == 1e-5
    by_name = {r["accountant"]: r for r in out["results"]}
    assert set(by_name) == {"rdp", "pld", "prv"}
    for r in out["results"]:
        assert set(r) >= {"accountant", "epsilon", "epsilon_lower", "epsilon_upper"}
    assert by_name["rdp"]["epsilon"] == pytest.approx(2.5967, rel=1e-3)
    assert by_name["pld"]["epsilon"] == pytest.approx(2.3818, abs=0.01)


def test_epsilon_single_accountant_and_table() -> None:
    proc = run("epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250",
               "--delta", "1e-5", "--accountant", "rdp", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["accountant"] for r in out["results"]] == ["rdp"]
    assert out["results"][0]["epsilon"] == pytest.approx(7.3293, rel=1e-3)
    proc = run("epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250",
               "--delta", "1e-5", "--accountant", "rdp")
    assert proc.returncode == 0 and "7.32" in proc.stdout


EPSILON_ARGS = {"--noise-multiplier": "1", "--sample-rate": "0.1", "--steps": "10", "--delta": "1e-5"}
CALIBRATE_ARGS = {"--target-epsilon": "1", "--delta": "1e-5", "--sample-rate": "0.01", "--steps": "100"}


def one_bad(base: dict[str, str], option: str, value: str | None) -> tuple[list[str], str]:
    """(arguments, field): ``base`` with ``option`` set to ``value`` (None: left out); the one-line
    error must name ``option``."""
    opts = {**base, option: value}
    return [a for k, v in opts.items() if v is not None for a in (k, v)], option


@pytest.mark.parametrize(
    "args, field",
    [one_bad(EPSILON_ARGS, option, value) for option, value in [
        ("--noise-multiplier", "0"), ("--noise-multiplier", "-1"), ("--noise-multiplier", "nan"),
        ("--sample-rate", "1.5"), ("--sample-rate", "0"), ("--steps", "-3"), ("--steps", "2.5"),
        ("--delta", "1"), ("--delta", "inf"), ("--delta", None), ("--sample-rate", None),
        ("--accountant", "magic"),
    ]],
)
def test_epsilon_bad_input(args: list[str], field: str) -> None:
    assert_bad_input(run("epsilon", *args), field)


def test_calibrate_json_and_never_overshoots() -> None:
    proc = run("calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate",
               str(256 / 60000), "--steps", "14063", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"noise_multiplier", "epsilon", "accountant", "target_epsilon", "delta", "sample_rate",
                        "steps", "neighbouring"}
    assert (out["delta"], out["sample_rate"], out["steps"]) == (1e-5, 256 / 60000, 14063)
    assert out["epsilon"] <= 3.0
    check = run("epsilon", "--noise-multiplier", repr(out["noise_multiplier"]), "--sample-rate",
                str(256 / 60000), "--steps", "14063", "--delta", "1e-5", "--accountant",
                out["accountant"], "--json")
    assert json.loads(check.stdout)["results"][0]["epsilon"] <= 3.0


@pytest.mark.parametrize(
    "args, field",
    [one_bad(CALIBRATE_ARGS, option, value) for option, value in [
        ("--target-epsilon", "0"), ("--delta", "0"), ("--sample-rate", "2"), ("--steps", "x"),
        ("--target-epsilon", None),
    ]],
)
def test_calibrate_bad_input(args: list[str], field: str) -> None:
    assert_bad_input(run("calibrate", *args), field)


def _ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    with Ledger.create(path, mechanism="dp_lora", target_delta=1e-5,
                       claims=[ClaimEvent(epsilon=1.0, delta=1e-5, source="test claim")]) as led:
        led.append(GaussianEvent(noise_multiplier=1.1, sample_rate=0.01, clip_norm=1.0, count=500))
        led.append(GaussianEvent(noise_multiplier=1.3, sample_rate=0.01, clip_norm=1.0, count=500))
        led.seal()
    return path


def test_epsilon_from_ledger_uses_header_delta(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    proc = run("epsilon", "--ledger", str(path), "--accountant", "rdp", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["delta"] == 1e-5
    assert out["results"][0]["epsilon"] > 0
    assert out["claims"][0]["epsilon"] == 1.0


def test_ledger_verify_and_show(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    ok = run("ledger", "verify", str(path))
    assert ok.returncode == 0 and "intact" in ok.stdout
    show = run("ledger", "show", str(path), "--json")
    assert show.returncode == 0
    summary = json.loads(show.stdout)
    assert summary["events"]["gaussian"] == {"lines": 2, "count": 1000}
    lines = path.read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    bad = run("ledger", "verify", str(path))
    assert bad.returncode == 1
    assert "line 2" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("ledger", "verify", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_epsilon_with_plaintext_ledger_says_no_guarantee(tmp_path: Path) -> None:
    from privaudit.ledger.events import PlaintextEvent

    path = tmp_path / "l.jsonl"
    with Ledger.create(path, target_delta=1e-5) as led:
        led.append(PlaintextEvent(what="non-private model update", count=10))
        led.seal()
    proc = run("epsilon", "--ledger", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    for r in json.loads(proc.stdout)["results"]:
        assert r["epsilon"] is None and r["guarantee"] == "none" and r["reason"]
    human = run("epsilon", "--ledger", str(path))
    assert "no formal guarantee" in human.stdout


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_epsilon_from_config_names_the_setting_it_used() -> None:
    proc = run("epsilon", "--config", str(EXAMPLES / "dp_lora_causal_lm.yaml"), "--accountant", "rdp")
    assert proc.returncode == 0, proc.stderr
    assert "σ = 1, q = 0.0653061, steps = 40" in proc.stdout
    proc = run("epsilon", "--config", str(EXAMPLES / "dp_lora_causal_lm.yaml"), "--accountant", "rdp", "--json")
    (g,) = json.loads(proc.stdout)["gaussian"]
    assert g["noise_multiplier"] == 1.0 and g["steps"] == 40 and g["sample_rate"] == pytest.approx(0.0653061)


def test_help_texts() -> None:
    top = " ".join(run("--help").stdout.split())
    commands = top.split("Commands:")[1]
    assert "(manifest, ledger, adapter, audit key)" in commands and "..." not in commands  # whole sentences
    cal = run("calibrate", "--help").stdout
    assert "--steps INTEGER" in cal and "TEXT" not in cal and "Accountant whose ε must not exceed" in cal
    assert "--steps INTEGER" in run("epsilon", "--help").stdout
    audit = " ".join(run("audit", "--help").stdout.split())
    assert "RUN_DIR: a run directory written by `privaudit train`" in audit and "inconclusive" in audit


def test_piped_output_is_plain_and_whole(tmp_path: Path) -> None:
    """stdout is a pipe here: no box drawing, no column cut to "…"."""
    proc = run("epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5",
               "--accountant", "rdp")
    assert proc.returncode == 0 and "┃" not in proc.stdout and "│" not in proc.stdout
    assert proc.stdout.splitlines()[1].split() == ["accountant", "ε", "lower", "upper"]
    p = tmp_path / "ledger.jsonl"
    with Ledger.create(p, mechanism="dp_lora", target_delta=1e-5) as led:
        led.append(GaussianEvent(noise_multiplier=1.0, sample_rate=0.01, count=5))
        led.seal()
    out = run("ledger", "show", str(p)).stdout
    assert "┃" not in out and "…" not in out and "gaussian" in out


def test_mistyped_config_section_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("traning: {steps: 1}\nprivacy: {noise_multiplier: 1.0}\n")
    proc = run("epsilon", "--config", str(cfg))
    assert_bad_input(proc, "traning: unknown key (did you mean 'training'?)")
