"""Sealed and signed ledgers: every damage case against every reader (epsilon, show, verify, report,
audit), through the CLI's exit-code contract (0 ok, 1 check failed, 2 unreadable / bad input)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from privaudit.ledger.events import ClaimEvent, GaussianEvent
from privaudit.ledger.ledger import Ledger, LedgerCorruptError, LedgerSealedError, line_hash, read_ledger, verify_ledger
from privaudit.canonical import canonical_json
from privaudit.ledger.seal import generate_keypair, load_signing_key, sign_seal
from privaudit.cli import main

DELTA = 1e-5


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process with its exit-code contract; (code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def make_ledger(path: Path, *, seal: bool = True, key: Any = None, events: bool = True) -> Path:
    with Ledger.create(path, mechanism="dp_lora", target_delta=DELTA,
                       claims=[ClaimEvent(epsilon=1.0, delta=DELTA, source="test")]) as led:
        if events:
            led.append(GaussianEvent(noise_multiplier=1.1, sample_rate=0.01, clip_norm=1.0, count=24))
            led.append(GaussianEvent(noise_multiplier=1.3, sample_rate=0.01, clip_norm=1.0, count=24))
        if seal:
            led.seal(key)
    return path


def rewrite(path: Path, edit: Callable[[list[dict[str, Any]]], None], *, reseal: bool = True,
            key: Any = None) -> None:
    """What an attacker without the signing key can do: edit lines, re-hash the whole chain and
    write a fresh seal (unsigned, or signed with their own key)."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    old_seal = lines.pop() if lines[-1]["kind"] == "seal" else None
    edit(lines)
    prev = "0" * 64
    for i, ln in enumerate(lines):
        ln["seq"], ln["prev"] = i, prev
        ln["hash"] = line_hash(ln)
        prev = ln["hash"]
    if reseal:
        evs = [ln["event"] for ln in lines[1:]]
        seal: dict[str, Any] = {"event_lines": len(evs), "head": prev, "sealed": "2026-01-01T00:00:00+00:00",
                                "releases": sum(e.get("count", 1) for e in evs if e["type"] != "claim")}
        if key is not None:
            seal = sign_seal(seal, lines[0]["header"]["run_id"], key)
        ln = {"seq": len(lines), "kind": "seal", "seal": seal, "prev": prev}
        ln["hash"] = line_hash(ln)
        lines.append(ln)
    elif old_seal is not None:
        lines.append(old_seal)
    path.write_text("".join(canonical_json(x) + "\n" for x in lines))


def sigma_times_10(lines: list[dict[str, Any]]) -> None:
    for ln in lines[1:]:
        ln["event"]["noise_multiplier"] *= 10


def count_to_1(lines: list[dict[str, Any]]) -> None:
    lines[1]["event"]["count"] = 1


def header_delta(lines: list[dict[str, Any]]) -> None:
    lines[0]["header"]["target_delta"] = 0.5


def drop_last(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def drop_last_event(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2] + lines[-1:]))


def cut_mid_line(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def naive_edit(path: Path) -> None:
    """σ edited in place without re-hashing."""
    path.write_text(path.read_text().replace('"noise_multiplier":1.1', '"noise_multiplier":11.0'))


def rehash_no_reseal(path: Path) -> None:
    rewrite(path, sigma_times_10, reseal=False)


# (name, damage, expected status from a bare ledger reader, exit code of epsilon/show/verify)
DAMAGE: list[tuple[str, Callable[[Path], None], str, int]] = [
    ("drop the seal (last line)", drop_last, "incomplete", 1),
    ("drop the last event line", drop_last_event, "tampered", 1),
    ("cut mid-line", cut_mid_line, "tampered", 1),
    ("naive edit", naive_edit, "tampered", 1),
    ("re-hashed, old seal kept", rehash_no_reseal, "tampered", 1),
    ("header delta changed", lambda p: p.write_text(p.read_text().replace('"target_delta":1e-05',
                                                                              '"target_delta":0.5')),
     "tampered", 1),
]


@pytest.mark.parametrize("name,damage,status,code", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_against_bare_ledger_readers(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                            damage: Callable[[Path], None], status: str, code: int) -> None:
    path = make_ledger(tmp_path / "ledger.jsonl")
    assert read_ledger(path).status == "intact"
    damage(path)
    res = read_ledger(path)
    assert res.status == status, res.message
    assert res.events == ()  or status == "incomplete"
    for cmd in (["ledger", "verify"], ["ledger", "show"], ["epsilon", "--accountant", "rdp", "--ledger"]):
        rc, out, err = invoke(capsys, *cmd, str(path))
        assert rc == code, (cmd, out, err)
        assert status.upper() in err and "Traceback" not in err
        assert "ε" not in out  # no number is printed for a ledger that does not verify
        if status == "tampered":
            assert f"line {res.bad_line}" in err  # the first bad line is named
    if status == "incomplete":  # readable on request, and says so
        rc, out, _ = invoke(capsys, "epsilon", "--accountant", "rdp", "--ledger", str(path), "--allow-incomplete")
        assert rc == 0 and "INCOMPLETE" in out


def test_truncation_is_tampered_for_every_reader_not_repaired(tmp_path: Path) -> None:
    path = make_ledger(tmp_path / "ledger.jsonl", seal=False)
    cut_mid_line(path)
    with pytest.raises(LedgerCorruptError, match="truncated"):
        Ledger.read(path)
    from privaudit.accounting.base import compute_epsilon

    with pytest.raises(LedgerCorruptError):
        compute_epsilon(path, DELTA, "rdp")
    # resuming the crashed writer repairs the torn tail (a release that never happened)
    with Ledger.open(path) as led:
        assert len(led) == 1


def test_rewrite_and_rehash_verifies_without_key_but_not_with_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    priv, pub = generate_keypair(tmp_path / "key")
    key = load_signing_key(priv)
    for edit in (sigma_times_10, count_to_1, header_delta):
        path = make_ledger(tmp_path / f"{edit.__name__}.jsonl", key=key)
        rc, out, _ = invoke(capsys, "ledger", "verify", str(path), "--public-key", str(pub))
        assert rc == 0 and "signature verified" in out
        rewrite(path, edit)  # re-hashed from line 1 on, fresh unsigned seal
        assert verify_ledger(path).status == "intact"  # undetectable without a key (README)
        rc, _, err = invoke(capsys, "ledger", "verify", str(path), "--public-key", str(pub))
        assert rc == 1 and "not signed" in err
        rewrite(path, lambda lines: None, key=load_signing_key(_attacker_key(tmp_path)))
        for cmd in (["ledger", "verify"], ["ledger", "show"], ["epsilon", "--accountant", "rdp", "--ledger"]):
            rc, out, err = invoke(capsys, *cmd, str(path), "--public-key", str(pub))
            assert rc == 1 and "does not verify with the given public key" in err, (cmd, err)


def _attacker_key(tmp_path: Path) -> Path:
    p = tmp_path / "attacker"
    if not p.exists():
        generate_keypair(p)
    return p


def test_empty_ledger_is_no_releases_recorded_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    path = make_ledger(tmp_path / "ledger.jsonl", events=False)
    rc, out, _ = invoke(capsys, "epsilon", "--ledger", str(path), "--accountant", "rdp")
    assert rc == 0 and "no releases recorded" in out
    rc, out, _ = invoke(capsys, "ledger", "show", str(path))
    assert rc == 0 and "no releases recorded" in out
    rc, out, _ = invoke(capsys, "epsilon", "--ledger", str(path), "--accountant", "rdp", "--json")
    assert rc == 0 and json.loads(out)["no_releases_recorded"] is True
    # a header-only ledger never sealed (a failed run) is incomplete, not ε = 0
    unsealed = make_ledger(tmp_path / "unsealed.jsonl", events=False, seal=False)
    rc, out, err = invoke(capsys, "epsilon", "--ledger", str(unsealed))
    assert rc == 1 and "INCOMPLETE" in err and "ε" not in out
    # an empty file is unreadable: exit 2 from every bare reader
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for cmd in (["ledger", "verify"], ["ledger", "show"], ["epsilon", "--ledger"]):
        rc, _, err = invoke(capsys, *cmd, str(empty))
        assert rc == 2 and len(err.strip().splitlines()) == 1, (cmd, err)


def test_sealed_ledger_refuses_appends_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, target_delta=DELTA) as led:
        led.append(GaussianEvent(noise_multiplier=1.0, sample_rate=0.1))
        led.seal()
        with pytest.raises(LedgerSealedError):
            led.append(GaussianEvent(noise_multiplier=1.0, sample_rate=0.1))
    with pytest.raises(LedgerSealedError, match="sealed"):
        Ledger.open(path)
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[1])
    assert read_ledger(path).status == "tampered"  # nothing may follow the seal


def test_absurd_event_values_are_rejected_naming_the_field(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for field, value in (("count", 1e30), ("noise_multiplier", 1e-300), ("sample_rate", 1e-300),
                         ("clip_norm", 1e300)):
        path = make_ledger(tmp_path / f"{field}.jsonl")
        rewrite(path, lambda lines: lines[1]["event"].__setitem__(field, value))
        res = read_ledger(path)
        assert res.status == "tampered" and field in res.message, res.message
        rc, _, err = invoke(capsys, "epsilon", "--ledger", str(path))
        assert rc == 1 and field in err and "Traceback" not in err


def test_many_distinct_events_stream_with_bounded_memory_or_are_refused(tmp_path: Path, monkeypatch:
                                                                        pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]
                                                                        ) -> None:
    import privaudit.ledger.ledger as L

    path = tmp_path / "big.jsonl"
    with Ledger.create(path, target_delta=DELTA) as led:
        for i in range(300):  # distinct events: no merging by the writer
            led.append(GaussianEvent(noise_multiplier=1.0 + (i % 100) / 100, sample_rate=0.01))
        led.seal()
    res = read_ledger(path)
    assert res.verified and res.event_lines == 300 and len(res.events) == 300  # file order kept
    monkeypatch.setattr(L, "MAX_ORDERED_RUNS", 50)
    res = read_ledger(path)
    assert res.verified and len(res.events) == 100  # too long to keep in order: equal events merged
    assert sum(e.count for e in res.events) == 300
    assert [e.noise_multiplier for e in res.events] == [1.0 + i / 100 for i in range(100)]
    monkeypatch.setattr(L, "MAX_DISTINCT_EVENTS", 50)
    rc, _, err = invoke(capsys, "epsilon", "--ledger", str(path))
    assert rc == 2 and "distinct events" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# run directories: audit and report compare the ledger with the manifest (and the public key)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.test_runs import cfg_with

    from privaudit.runs import train

    root = tmp_path_factory.mktemp("signed")
    priv, pub = generate_keypair(root / "key")
    rd = root / "run"
    train(cfg_with(training={"steps": 4}), rd, progress=False, signing_key=priv)
    return rd, pub


def _manifest_follows(rd: Path) -> None:
    """The attacker also rewrites the manifest's head hash and seal to match the forged ledger."""
    res = read_ledger(rd / "ledger.jsonl")
    m = json.loads((rd / "manifest.json").read_text())
    m["ledger_head_hash"], m["ledger_seal"] = res.head_hash, res.seal
    (rd / "manifest.json").write_text(json.dumps(m))


def _bad_manifest_head(rd: Path) -> None:
    m = json.loads((rd / "manifest.json").read_text())
    m["ledger_head_hash"] = "f" * 64
    (rd / "manifest.json").write_text(json.dumps(m))


RUN_DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("drop the seal", lambda rd: drop_last(rd / "ledger.jsonl"), "no seal"),
    ("drop the last event line", lambda rd: drop_last_event(rd / "ledger.jsonl"), "line"),
    ("cut mid-line", lambda rd: cut_mid_line(rd / "ledger.jsonl"), "truncated"),
    ("header delta changed", lambda rd: rewrite(rd / "ledger.jsonl", header_delta, reseal=False), "line 3"),
    ("re-hashed and resealed", lambda rd: rewrite(rd / "ledger.jsonl", sigma_times_10), "head hash"),
    ("manifest head hash mismatch", _bad_manifest_head, "head hash"),
]


@pytest.mark.parametrize("name,damage,why", RUN_DAMAGE, ids=[d[0] for d in RUN_DAMAGE])
def test_damage_against_run_dir_readers(signed_run: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], name: str,
                                        damage: Callable[[Path], None], why: str) -> None:
    from privaudit.reports.runs_table import load_run_record

    src, _ = signed_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    assert load_run_record(rd).ledger_status == "intact"
    damage(rd)
    rc, _, err = invoke(capsys, "audit", str(rd), "--quiet")
    assert rc == 1 and why in err and "Traceback" not in err, err
    rec = load_run_record(rd)
    assert rec.ledger_status in ("tampered", "incomplete") and why in rec.ledger_message
    assert all(a.recomputed is None for a in rec.accounted)  # no ε from a ledger that does not verify
    rc, _, err = invoke(capsys, "report", str(rd), "-o", str(tmp_path / "r.pdf"), "--quiet")
    assert rc == 1 and why in err and "Traceback" not in err, err


@pytest.mark.slow
def test_report_cli_exits_1_on_a_forged_run(signed_run: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src, pub = signed_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    rewrite(rd / "ledger.jsonl", sigma_times_10)
    _manifest_follows(rd)  # a consistent forgery: only the signature exposes it
    rc, _, err = invoke(capsys, "report", str(rd), "-o", str(tmp_path / "r.pdf"), "--quiet")
    assert rc == 0, err
    rc, _, err = invoke(capsys, "report", str(rd), "-o", str(tmp_path / "r2.pdf"), "--quiet", "--public-key", str(pub))
    assert rc == 1 and "not signed" in err
    shutil.rmtree(rd)
    shutil.copytree(src, rd)
    drop_last(rd / "ledger.jsonl")
    rc, _, err = invoke(capsys, "report", str(rd), "-o", str(tmp_path / "r3.pdf"), "--quiet")
    assert rc == 1 and "no seal" in err


def test_forgery_consistent_with_the_manifest_needs_the_public_key(signed_run: tuple[Path, Path],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit.runs import load_run

    src, pub = signed_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    assert read_ledger(rd / "ledger.jsonl", public_key=pub).signature == "valid"
    rewrite(rd / "ledger.jsonl", sigma_times_10)
    _manifest_follows(rd)
    assert read_ledger(rd / "ledger.jsonl", manifest=json.loads((rd / "manifest.json").read_text())).verified
    with pytest.raises(LedgerCorruptError, match="not signed"):
        load_run(rd, public_key=pub)
    rc, _, err = invoke(capsys, "audit", str(rd), "--quiet", "--public-key", str(pub))
    assert rc == 1 and "not signed" in err


class _Crash(Exception):
    pass


def test_resume_continues_an_unsealed_ledger_and_refuses_a_sealed_one(tmp_path: Path) -> None:
    from tests.test_runs import cfg_with

    from privaudit.runs import train

    cfg = cfg_with(training={"steps": 6, "checkpoint_every": 2})
    rd = tmp_path / "run"

    def crash(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(cfg, rd, progress=crash)
    assert read_ledger(rd / "ledger.jsonl").status == "incomplete"  # crashed: no seal
    res = train(None, rd, resume=True, progress=False)
    final = read_ledger(rd / "ledger.jsonl", manifest=res.manifest)
    assert final.verified and final.seal == res.manifest["ledger_seal"]
    assert final.releases == res.privacy["ledger_releases"] >= 6
    # a crash after sealing, before the manifest was completed: the sealed ledger is never reopened
    m = json.loads((rd / "manifest.json").read_text())
    m["status"] = "running"
    (rd / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LedgerSealedError, match="sealed"):
        train(None, rd, resume=True, progress=False)
    assert read_ledger(rd / "ledger.jsonl").seal == final.seal  # untouched


def test_too_many_distinct_segments_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from privaudit.accounting.base import accountant_names, get_accountant

    for name in accountant_names():
        monkeypatch.setattr(type(get_accountant(name)), "max_segments", 8)
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, target_delta=DELTA) as led:
        for i in range(20):
            led.append(GaussianEvent(noise_multiplier=1.0 + i / 10, sample_rate=0.01))
        led.seal()
    rc, _, err = invoke(capsys, "epsilon", "--ledger", str(path), "--accountant", "rdp")
    assert rc == 2 and "at most 8" in err and len(err.strip().splitlines()) == 1
    rc, _, err = invoke(capsys, "epsilon", "--ledger", str(path))
    assert rc == 2 and "at most" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# the seal covers the manifest (config, plan, data, privacy...) and the audit key
# ---------------------------------------------------------------------------------------------------
def _edit_manifest(rd: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((rd / "manifest.json").read_text())
    edit(m)
    (rd / "manifest.json").write_text(json.dumps(m, indent=2))


def _sigma(m: dict[str, Any]) -> None:
    m["config"]["privacy"]["noise_multiplier"] = 10.0


def _canary_seed(m: dict[str, Any]) -> None:
    m["config"]["audit"]["gradient_canary_seed"] = 6


def _model_name(m: dict[str, Any]) -> None:
    m["config"]["model"]["name"] = "distilgpt2"


def _recorded_sigma(m: dict[str, Any]) -> None:
    m["privacy"]["noise_multiplier"] = 10.0


def _reseal(rd: Path, key: Any = None, drop_covers: bool = False) -> None:
    """What an attacker does after editing the manifest: recompute the covers, re-hash the seal line
    (signed with their own key when given) and make the manifest's seal and head follow."""
    from privaudit.ledger.seal import seal_covers

    path = rd / "ledger.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    seal = {k: v for k, v in lines[-1]["seal"].items() if k not in ("signature", "key_id")}
    m = json.loads((rd / "manifest.json").read_text())
    if drop_covers:
        seal.pop("covers")
    else:
        seal["covers"] = seal_covers(m, rd)
    if key is not None:
        seal = sign_seal(seal, lines[0]["header"]["run_id"], key)
    ln = {k: v for k, v in lines[-1].items() if k != "hash"}
    ln["seal"] = seal
    ln["hash"] = line_hash(ln)
    lines[-1] = ln
    path.write_text("".join(canonical_json(x) + "\n" for x in lines))
    m["ledger_seal"], m["ledger_head_hash"] = seal, ln["hash"]
    (rd / "manifest.json").write_text(json.dumps(m, indent=2))


MANIFEST_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("sigma", _sigma, "manifest.config does not match the ledger seal"),
    ("canary seed", _canary_seed, "manifest.config does not match the ledger seal"),
    ("model name", _model_name, "manifest.config does not match the ledger seal"),
    ("recorded sigma", _recorded_sigma, "manifest.privacy does not match the ledger seal"),
]


def test_untouched_run_verifies_and_says_the_manifest_is_covered(signed_run: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rd, pub = signed_run
    seal = read_ledger(rd / "ledger.jsonl").seal
    assert seal is not None and {"manifest.config", "manifest.privacy", "manifest.data", "audit_key.json",
                                 "adapter.safetensors", "adapter_init.safetensors"} <= set(seal["covers"])
    rc, out, err = invoke(capsys, "ledger", "verify", str(rd), "--public-key", str(pub))
    assert rc == 0 and "manifest covered by the seal" in out and "signature verified" in out, err
    rc, out, err = invoke(capsys, "epsilon", "--ledger", str(rd), "--accountant", "rdp")
    assert rc == 0 and "manifest covered by the seal" in out, err


@pytest.mark.parametrize("name,edit,why", MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_manifest_edit_after_the_seal_is_refused_by_every_reader(signed_run: tuple[Path, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str], name: str,
                                                                 edit: Callable[[dict[str, Any]], None],
                                                                 why: str) -> None:
    from privaudit.reports.runs_table import load_run_record

    src, _ = signed_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    _edit_manifest(rd, edit)
    for args in (("ledger", "verify", str(rd)), ("ledger", "show", str(rd)),
                 ("epsilon", "--ledger", str(rd), "--accountant", "rdp"), ("audit", str(rd), "--quiet"),
                 ("report", str(rd), "-o", str(tmp_path / "r.pdf"), "--quiet")):
        rc, _, err = invoke(capsys, *args)
        assert rc == 1 and why in err and "Traceback" not in err, (args, err)
        if args[0] != "report":  # the report writes its PDF (red banner) and says why on stderr
            assert len(err.strip().splitlines()) == 1, (args, err)
    rec = load_run_record(rd)
    assert rec.ledger_status == "tampered" and why in rec.ledger_message
    assert all(a.recomputed is None for a in rec.accounted)


def test_audit_key_or_adapter_replaced_after_the_seal_is_refused(signed_run: tuple[Path, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = signed_run
    rd = tmp_path / "adapter"
    shutil.copytree(src, rd)  # the trained adapter swapped for its untrained initialisation
    shutil.copyfile(rd / "adapter_init.safetensors", rd / "adapter.safetensors")
    rc, _, err = invoke(capsys, "audit", str(rd), "--quiet")
    assert rc == 1 and "adapter.safetensors does not match the ledger seal" in err, err
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    key = json.loads((rd / "audit_key.json").read_text())
    key["gradient_canaries"] = None
    (rd / "audit_key.json").write_text(json.dumps(key))
    rc, _, err = invoke(capsys, "audit", str(rd), "--quiet")
    assert rc == 1 and "audit_key.json does not match the ledger seal" in err, err
    (rd / "audit_key.json").unlink()
    rc, _, err = invoke(capsys, "ledger", "verify", str(rd))
    assert rc == 1 and "audit_key.json is missing" in err, err


def test_resealed_manifest_edit_needs_the_public_key(signed_run: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit.runs import load_run

    src, pub = signed_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    _edit_manifest(rd, _sigma)
    _reseal(rd, key=load_signing_key(_attacker_key(tmp_path)))  # consistent, signed with the wrong key
    rc, _, err = invoke(capsys, "ledger", "verify", str(rd))
    assert rc == 0, err  # without a key a re-hashed seal is not detected (documented)
    rc, _, err = invoke(capsys, "ledger", "verify", str(rd), "--public-key", str(pub))
    assert rc == 1 and "does not verify with the given public key" in err and len(err.strip().splitlines()) == 1
    rc, _, err = invoke(capsys, "epsilon", "--ledger", str(rd), "--public-key", str(pub))
    assert rc == 1 and "does not verify" in err
    with pytest.raises(LedgerCorruptError, match="does not verify"):
        load_run(rd, public_key=pub)
    _reseal(rd)  # unsigned re-hash: "not signed" with the key
    rc, _, err = invoke(capsys, "ledger", "verify", str(rd), "--public-key", str(pub))
    assert rc == 1 and "not signed" in err


def test_old_seal_without_covers_still_reads_and_says_not_covered(signed_run: tuple[Path, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit.reports.integrity import ledger_integrity

    src, _ = signed_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd)
    _reseal(rd, drop_covers=True)  # a seal as privaudit wrote it before covers existed
    assert "covers" not in read_ledger(rd / "ledger.jsonl").seal
    rc, out, err = invoke(capsys, "ledger", "verify", str(rd))
    assert rc == 0 and "not covered by the seal (older run)" in out, err
    _edit_manifest(rd, _sigma)  # an older run's manifest is not covered: read as before
    rc, out, err = invoke(capsys, "ledger", "verify", str(rd))
    assert rc == 0 and "not covered by the seal (older run)" in out, err
    integ = ledger_integrity(rd)
    assert integ.ok and "older run" in integ.reason
    res = read_ledger(rd / "ledger.jsonl")  # the bare ledger: no manifest, nothing said about coverage
    assert res.verified and res.coverage is None


def test_covers_without_training(tmp_path: Path) -> None:
    """The covers' edge cases on a hand-made run directory: the manifest's run_id, an external audit's
    manifest (which describes the audit, not the run), a cover this version does not know, malformed covers."""
    from privaudit.ledger.seal import seal_covers

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "audit_key.json").write_text('{"k": 1}')
    manifest: dict[str, Any] = {"config": {"privacy": {"noise_multiplier": 1.0}}, "data": {1: "int key"}}
    with Ledger.create(rd / "ledger.jsonl", mechanism="dp_lora", target_delta=DELTA) as led:
        led.append(GaussianEvent(noise_multiplier=1.0, sample_rate=0.01, count=3))
        seal = led.seal(covers=seal_covers(manifest, rd))
        run_id = led.header.run_id
    manifest = json.loads(json.dumps({**manifest, "ledger_seal": seal, "ledger_head_hash": None,
                                      "status": "complete", "run_id": run_id}))
    manifest["ledger_head_hash"] = read_ledger(rd / "ledger.jsonl").head_hash
    res = read_ledger(rd / "ledger.jsonl", manifest=manifest)  # as read back from disk (int keys → strings)
    assert res.verified and res.coverage == "covered" and "manifest covered by the seal" in res.integrity
    assert "not match" in read_ledger(rd / "ledger.jsonl", manifest={**manifest, "data": {"1": "x"}}).message
    assert "manifest.run_id" in read_ledger(rd / "ledger.jsonl", manifest={**manifest, "run_id": "other"}).message
    assert "manifest.config is missing" in read_ledger(
        rd / "ledger.jsonl", manifest={k: v for k, v in manifest.items() if k != "config"}).message
    external = {"kind": "external_audit", "run_id": "external-1", "status": "complete",
                "ledger_seal": seal, "ledger_head_hash": manifest["ledger_head_hash"]}
    res = read_ledger(rd / "ledger.jsonl", manifest=external)
    assert res.verified and res.coverage == "external audit"
    for covers, why in (({"manifest.config": "zz"}, "seal.covers.manifest.config"),
                        ({"weights.bin": "0" * 64}, "does not know")):
        path = tmp_path / f"l{len(why)}.jsonl"
        with Ledger.create(path, target_delta=DELTA) as led:
            if why.startswith("seal."):
                with pytest.raises(ValueError, match=why):
                    led.seal(covers=covers)
            else:
                s = led.seal(covers=covers)
                res = read_ledger(path, manifest={"ledger_seal": s})
                assert res.status == "tampered" and why in res.message
    bad = tmp_path / "bad.jsonl"
    make_ledger(bad)
    rewrite(bad, lambda lines: None, reseal=True)
    lines = [json.loads(x) for x in bad.read_text().splitlines()]
    lines[-1]["seal"]["covers"] = {"manifest.config": "not hex"}
    lines[-1]["hash"] = line_hash(lines[-1])
    bad.write_text("".join(canonical_json(x) + "\n" for x in lines))
    res = read_ledger(bad)
    assert res.status == "tampered" and "seal.covers.manifest.config" in res.message
