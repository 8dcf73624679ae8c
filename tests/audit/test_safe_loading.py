"""A run directory is data, never code: pickle-based files are refused before anything is read, and
nothing in them is ever executed (the auditor and the CLI exit 2 with one line)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from privaudit.audit.auditor import audit_run
from privaudit.config import parse_config
from privaudit.runs import train


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = parse_config({
        "task": "classification",
        "model": {"name": "tiny-gpt2", "max_length": 16, "overrides": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
        "lora": {"rank": 2, "alpha": 4},
        "data": {"synthetic": {"n_people": 10, "n_canaries": 2}},
        "training": {"steps": 2, "batch_size": 4},
        "privacy": {"noise_multiplier": 1.0, "noise_seed": 0},
    })
    run = tmp_path_factory.mktemp("safe") / "run"
    train(cfg, run, progress=False)
    return run


def test_the_payload_really_creates_the_marker(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(malicious_pickle(marker))  # the test's own control: this is what must never happen
    assert marker.exists()


PLANTS = ["model.pkl", "pytorch_model.bin", "weights.pt", "checkpoint/optimizer.pth", "extra/state.pickle"]


@pytest.mark.parametrize("name", PLANTS)
def test_pickle_based_files_are_refused_and_never_executed(tiny_run: Path, tmp_path: Path, name: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).write_bytes(malicious_pickle(marker))

    with pytest.raises(ValueError, match=r"^run_dir: .*(pickle|\.bin|\.pt)") as exc:
        audit_run(run)
    assert Path(name).name in str(exc.value)
    with pytest.raises(SystemExit) as code:
        main(["audit", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: run_dir:") and "Traceback" not in err
    assert not marker.exists()
    assert not (run / "audit.json").exists()


def test_a_pickle_disguised_as_safetensors_is_not_executed(tiny_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    (run / "adapter.safetensors").write_bytes(malicious_pickle(marker))
    # the seal covers the adapter's bytes: the swapped file is refused before it is parsed
    with pytest.raises(ValueError, match="adapter.safetensors does not match the ledger seal"):
        audit_run(run)
    with pytest.raises(SystemExit) as code:
        main(["audit", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()
    # a run sealed before seals covered files (or a re-hashed seal, without a key): the safetensors
    # parser itself refuses the pickle
    from tests.ledger.test_ledger_seal import _reseal

    _reseal(run, drop_covers=True)
    with pytest.raises(ValueError, match="^run_dir: .*not valid safetensors"):
        audit_run(run)
    with pytest.raises(SystemExit) as code:
        main(["audit", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()


def test_cli_refuses_a_pickle_in_a_fresh_process(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    (run / "adapter.bin").write_bytes(malicious_pickle(marker))
    proc = subprocess.run([sys.executable, "-m", "privaudit", "audit", str(run), "--quiet"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "adapter.bin" in lines[0] and "refused" in lines[0]
    assert not marker.exists()


def test_the_untouched_run_is_audited(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = audit_run(run, n_bootstrap=0)
    assert res.verdict == "inconclusive" and (run / "audit.json").exists()
    assert res.attack("loss").metrics["auc_ci"] is None  # no bootstrap asked
