"""Ledger: hash chain, write-ahead durability, compression, locking, tamper detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from privaudit.ledger.events import (
    ClaimEvent,
    DchiEvent,
    EncryptedEvent,
    GaussianEvent,
    LaplaceEvent,
    PlaintextEvent,
    SketchEvent,
    parse_event,
)
from privaudit.ledger.ledger import (
    Ledger,
    LedgerCorruptError,
    LedgerLockedError,
    verify_ledger,
)


def _make(tmp_path: Path, n_distinct: int = 4) -> Path:
    path = tmp_path / "ledger.jsonl"
    with Ledger.create(path, mechanism="dp_lora", target_delta=1e-5, dataset_size=1000) as led:
        for i in range(n_distinct):
            led.append(GaussianEvent(noise_multiplier=1.0 + i / 10, sample_rate=0.01, clip_norm=1.0))
    return path


def test_roundtrip_all_event_types(tmp_path: Path) -> None:
    events = [
        GaussianEvent(noise_multiplier=1.1, sample_rate=0.01, clip_norm=1.0, count=3),
        GaussianEvent(noise_multiplier=2.0, sampling="fixed_batch", sample_rate=1.0, batch_size=10,
                      dataset_size=100),
        LaplaceEvent(scale=2.0, sensitivity=1.0),
        DchiEvent(eta=10.0, dimension=384, count=640),
        SketchEvent(rank=8, batch_size=32, steps=100, a_distribution="normal_1_over_r", a_secret=True),
        EncryptedEvent(scheme="glwe", security_bits=128, bytes_to_server=10, bytes_from_server=20),
        PlaintextEvent(what="activations", shape=[4, 16, 64]),
        ClaimEvent(epsilon=25.0, delta=1e-5, scope="per tensor", source="paper"),
    ]
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, mechanism="test") as led:
        led.extend(events)
    reread = Ledger.read(path)
    assert reread.events == events
    assert verify_ledger(path).ok
    assert reread.header.mechanism == "test"
    assert [c.epsilon for c in reread.claims] == [25.0]


def test_identical_consecutive_events_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    ev = GaussianEvent(noise_multiplier=1.1, sample_rate=0.01, clip_norm=1.0)
    with Ledger.create(path) as led:
        for _ in range(50):
            led.append(ev)
        led.append(GaussianEvent(noise_multiplier=1.2, sample_rate=0.01, clip_norm=1.0))
        led.append(ev)
    lines = path.read_text().splitlines()
    assert len(lines) == 4  # header + 3 event lines
    events = Ledger.read(path).events
    assert [e.count for e in events] == [50, 1, 1]
    assert verify_ledger(path).ok


def test_append_is_durable_before_return(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    led = Ledger.create(path)
    led.append(GaussianEvent(noise_multiplier=1.0, sample_rate=0.5))
    # Another reader sees the event immediately, with no close/flush by the writer.
    assert len(Ledger.read(path).events) == 1
    led.append(GaussianEvent(noise_multiplier=1.0, sample_rate=0.5))
    assert Ledger.read(path).events[0].count == 2
    led.close()


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    led = Ledger.create(path)
    with pytest.raises(LedgerLockedError):
        Ledger.open(path)
    code = textwrap.dedent(f"""
        from privaudit.ledger.ledger import Ledger, LedgerLockedError
        try:
            Ledger.open({str(path)!r})
        except LedgerLockedError:
            raise SystemExit(3)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    led.close()
    Ledger.open(path).close()  # free again


def test_create_refuses_existing(tmp_path: Path) -> None:
    path = _make(tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        Ledger.create(path)


def test_bad_header_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neighbouring"):
        Ledger.create(tmp_path / "x.jsonl", neighbouring="swap")
    with pytest.raises(ValueError, match="target_delta"):
        Ledger.create(tmp_path / "y.jsonl", target_delta=2.0)


def test_changed_byte_is_detected(tmp_path: Path) -> None:
    path = _make(tmp_path)
    data = bytearray(path.read_bytes())
    lines = data.split(b"\n")
    target = lines[2]
    i = target.index(b"1.1")
    target[i + 2] = ord("2")  # 1.1 -> 1.2 on line 3
    path.write_bytes(b"\n".join(lines))
    res = verify_ledger(path)
    assert res.status == "tampered" and res.bad_line == 3
    assert "hash" in res.message


def test_dropped_line_is_detected(tmp_path: Path) -> None:
    path = _make(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    del lines[2]
    path.write_text("".join(lines))
    res = verify_ledger(path)
    assert res.status == "tampered" and res.bad_line == 3


def test_dropped_last_line_is_detected_via_head(tmp_path: Path) -> None:
    """Dropping the tail keeps a valid chain; the head hash recorded elsewhere exposes it."""
    path = _make(tmp_path)
    head = Ledger.read(path).head_hash
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    res = verify_ledger(path)
    assert res.head_hash != head


def test_swapped_lines_are_detected(tmp_path: Path) -> None:
    path = _make(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_text("".join(lines))
    res = verify_ledger(path)
    assert res.status == "tampered" and res.bad_line == 3


def test_truncated_last_line_is_detected(tmp_path: Path) -> None:
    path = _make(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-25])
    res = verify_ledger(path)
    assert res.status == "tampered"
    assert res.bad_line == 5 and res.valid_lines == 4
    assert "truncated" in res.message


def test_rehashed_edit_breaks_the_next_link(tmp_path: Path) -> None:
    """An attacker who recomputes the edited line's hash still breaks the next line's prev."""
    from privaudit.canonical import canonical_json
    from privaudit.ledger.ledger import line_hash

    path = _make(tmp_path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[1]["event"]["noise_multiplier"] = 5.0
    lines[1]["hash"] = line_hash(lines[1])
    path.write_text("".join(canonical_json(x) + "\n" for x in lines))
    res = verify_ledger(path)
    assert res.status == "tampered" and res.bad_line == 3 and "prev" in res.message


def test_unreadable(tmp_path: Path) -> None:
    assert verify_ledger(tmp_path / "missing.jsonl").status == "unreadable"
    p = tmp_path / "garbage.jsonl"
    p.write_text("not json\n")
    assert verify_ledger(p).status == "unreadable"
    p.write_text("")
    assert verify_ledger(p).status == "unreadable"


def test_malformed_event_names_field() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        parse_event({"type": "gaussian", "noise_multiplier": -1.0})
    with pytest.raises(ValueError, match="sample_rate"):
        GaussianEvent(noise_multiplier=1.0, sample_rate=1.5)
    with pytest.raises(ValueError, match="count"):
        GaussianEvent(noise_multiplier=1.0, count=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianEvent(noise_multiplier=float("nan"))
    with pytest.raises(ValueError):
        parse_event({"type": "teleport"})


def test_open_repairs_torn_tail_and_continues(tmp_path: Path) -> None:
    path = _make(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # torn last append: that release never happened
    with Ledger.open(path) as led:
        assert len(led) == 3
        led.append(GaussianEvent(noise_multiplier=9.0, sample_rate=0.01, clip_norm=1.0))
    assert verify_ledger(path).ok
    assert len(Ledger.read(path)) == 4


def test_open_refuses_tampered(tmp_path: Path) -> None:
    path = _make(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    with pytest.raises(LedgerCorruptError):
        Ledger.open(path)


_WRITER = """
import sys
from privaudit.ledger.ledger import Ledger
from privaudit.ledger.events import GaussianEvent
path = sys.argv[1]
led = Ledger.create(path, mechanism="crash-test")
i = 0
while True:
    # alternate distinct events (plain appends) and repeats (atomic merges)
    sigma = 1.0 + (i // 3) * 0.001
    led.append(GaussianEvent(noise_multiplier=sigma, sample_rate=0.01))
    print(i, flush=True)
    i += 1
"""


def test_writer_killed_mid_append_leaves_verifiable_ledger(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    assert proc.stdout is not None
    deadline = time.time() + 60
    while acknowledged < 60 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert acknowledged >= 60
    res = verify_ledger(path)
    # Either intact, or only a torn last line; the chain holds up to its last complete event.
    # (A killed writer never sealed: "incomplete", never "intact".)
    assert res.status == "incomplete" or (res.status == "tampered" and res.bad_line == res.valid_lines + 1)
    led = Ledger.open(path)  # repairs a torn tail
    total = sum(e.count for e in led.events)
    led.close()
    assert verify_ledger(path).ok
    # Every append that returned (was acknowledged) is on disk: write-ahead.
    assert total >= acknowledged + 1


def test_create_rejects_a_mistyped_header_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^target_detla: unknown header field \(did you mean 'target_delta'\?\)"):
        Ledger.create(tmp_path / "l.jsonl", target_detla=1e-5)
    assert not (tmp_path / "l.jsonl").exists()
    with Ledger.create(tmp_path / "ok.jsonl", target_delta=1e-5, he_lora={"mode": "x"}) as led:  # extras stay allowed
        assert led.header.target_delta == 1e-5
