"""The report refuses to state a guarantee for a ledger that does not verify or is incomplete."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privaudit.ledger.events import GaussianEvent
from privaudit.reports import build_report
from privaudit.reports.integrity import ledger_integrity
from privaudit.reports.runs_table import load_run_record
from tests.reports.conftest import make_four_runs, requires_poppler, run_tool


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    return make_four_runs(tmp_path / "runs")


def _tamper(run: Path) -> None:
    """Edit the noise multiplier of a recorded release (the hash chain no longer verifies)."""
    p = run / "ledger.jsonl"
    lines = p.read_text().splitlines()
    assert '"noise_multiplier":0.6' in lines[1].replace(" ", "")
    lines[1] = re.sub(r'("noise_multiplier":\s*)0\.6', r"\g<1>6.0", lines[1])
    p.write_text("\n".join(lines) + "\n")


def test_intact_run_passes(runs: list[Path]) -> None:
    st = ledger_integrity(runs[2])
    assert st.ok and st.state == "intact" and st.head_compared == "matches"
    assert st.head_hash == st.manifest_head == json.loads((runs[2] / "manifest.json").read_text())["ledger_head_hash"]


def test_edited_ledger_is_refused(runs: list[Path]) -> None:
    _tamper(runs[2])
    st = ledger_integrity(runs[2])
    assert not st.ok and st.state == "tampered" and "does not verify" in st.reason
    r = load_run_record(runs[2])
    assert r.guarantee_refused and r.has_guarantee is None and r.primary_epsilon == (None, None)
    assert r.recheck is None  # nothing compared with an ε the report does not state


def test_ledger_extended_after_the_run_is_incomplete(runs: list[Path]) -> None:
    # a valid chain, but not the one the run recorded: a sealed ledger is never reopened, so the extension
    # is written by hand (an event line chained to the seal)
    from privaudit.canonical import canonical_json
    from privaudit.ledger.ledger import line_hash

    path = runs[2] / "ledger.jsonl"
    last = json.loads(path.read_text().splitlines()[-1])
    line = {"kind": "event", "seq": last["seq"] + 1, "prev": last["hash"],
            "event": GaussianEvent(noise_multiplier=0.6, sample_rate=0.02, clip_norm=1.0, count=1).model_dump(mode="json")}
    line["hash"] = line_hash(line)
    with path.open("a") as f:
        f.write(canonical_json(line) + "\n")
    st = ledger_integrity(runs[2])
    assert not st.ok and st.state == "tampered" and "after the seal" in st.reason


def test_unfinished_run_and_missing_head(runs: list[Path]) -> None:
    m = json.loads((runs[2] / "manifest.json").read_text())
    (runs[2] / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    assert ledger_integrity(runs[2]).state == "incomplete"
    del m["ledger_head_hash"]
    (runs[2] / "manifest.json").write_text(json.dumps(m))
    st = ledger_integrity(runs[2])
    # a complete run's manifest without the head hash: the ledger reader calls that tampered
    assert not st.ok and st.state in ("unverifiable", "tampered") and st.head_compared == "not recorded in the manifest"
    (runs[2] / "ledger.jsonl").unlink()
    assert ledger_integrity(runs[2]).state == "missing"


def test_a_run_without_guarantee_still_says_so(runs: list[Path]) -> None:
    m = json.loads((runs[0] / "manifest.json").read_text())
    del m["ledger_head_hash"]
    (runs[0] / "manifest.json").write_text(json.dumps(m))
    r = load_run_record(runs[0])
    assert r.guarantee_refused and r.has_guarantee is False  # refusing a guarantee never invents one


@requires_poppler
def test_report_on_an_edited_ledger_has_a_red_banner_and_exits_1(runs: list[Path], tmp_path: Path) -> None:
    _tamper(runs[2])
    out = tmp_path / "r.pdf"
    proc = subprocess.run([sys.executable, "-m", "privaudit", "report", str(runs[1]), str(runs[2]), "-o", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("check failed:") and "dp-weak" in lines[0], proc.stderr
    assert out.exists()
    page1 = " ".join(run_tool("pdftotext", "-f", "1", "-l", "1", str(out), "-").split())
    assert "LEDGER INTEGRITY FAILED: no privacy guarantee is stated for dp-weak" in page1
    assert "dp-weak [not stated (ledger)]" in page1 and "NOT STATED: the ledger does not verify" in page1
    assert "dp-strong [consistent]" in page1  # the intact run keeps its guarantee
    text = " ".join(run_tool("pdftotext", str(out), "-").split())
    assert "Nothing is guaranteed by this report: the ledger does not verify" in text
    assert "8.402" not in text  # the manifest's ε for the edited run is not stated anywhere


def test_build_report_is_unchanged_for_intact_runs(runs: list[Path], tmp_path: Path) -> None:
    out = build_report(runs[1:2], tmp_path / "x.pdf", steps_points=0)
    assert all(r.integrity is not None and r.integrity.ok for r in out.records)
