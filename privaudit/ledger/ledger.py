"""Append-only, hash-chained, write-ahead privacy ledger (JSON Lines).

Line 1 is the header; every later line is one event. Each line carries ``seq``, ``prev`` (the hash of
the previous line, ``"0"*64`` for the header) and ``hash`` (SHA-256 of the line's canonical JSON without
``hash``). ``append`` makes the event durable (write + flush + fsync) before it returns, so callers
append *before* the release the event accounts for: a crash can over-count, never under-count.

Consecutive identical events are merged by ``count``: the head line is then replaced by an atomic
rename of a rewritten file (the file on disk is always either the old or the new valid chain).
A second concurrent writer is refused by an exclusive lock on ``<ledger>.lock``.

A finished run *seals* the ledger (:meth:`Ledger.seal`): a last line with the number of event lines,
the releases and the chain head, optionally signed with Ed25519 (see :mod:`privaudit.ledger.seal`). A
ledger without its seal is ``incomplete``. Every consumer reads through :func:`read_ledger` (one
streaming pass, bounded memory: :data:`MAX_LINE_BYTES` per line, :data:`MAX_DISTINCT_EVENTS`
distinct events) and :func:`load_ledger` (raises unless the ledger verifies).
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privaudit.canonical import canonical_json
from privaudit.ledger.durable import fsync_dir, write_atomic, write_fd
from privaudit.ledger.events import (
    MAX_COUNT,
    ClaimEvent,
    Event,
    Neighbouring,
    format_validation_error,
    parse_event,
)

FORMAT_VERSION = 1
GENESIS = "0" * 64


class LedgerHeader(BaseModel):
    """What every guarantee in a ledger is about.

    ``privacy_unit``: the unit whose participation is protected (``record``, ``user``, ``client``).
    ``neighbouring``: ``add_remove`` (one unit added or removed) or ``replace`` (one unit swapped).
    ``observer``: who the guarantee is against (``released model``, ``server``, ``worker`` ...).
    ``claims``: guarantees asserted by a paper or user for this configuration, to be checked.
    """

    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)

    format_version: int = FORMAT_VERSION
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    mechanism: str = "unspecified"
    base_model: str | None = None
    dataset_fingerprint: str | None = None
    dataset_size: int | None = Field(None, ge=0)
    privacy_unit: Literal["record", "user", "client"] = "record"
    neighbouring: Neighbouring = "add_remove"
    target_delta: float | None = Field(None, gt=0, lt=1)
    observer: str = "released model"
    claims: list[ClaimEvent] = Field(default_factory=list)
    noise_source: str | None = Field(None, description="where the DP noise and secret sampling came from")
    noise_secure: bool | None = Field(None, description="False: seeded (reproducible, NOT secure)")


def line_hash(line: dict[str, Any]) -> str:
    body = {k: v for k, v in line.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class LedgerLockedError(RuntimeError):
    """Another writer holds this ledger."""


class LedgerCorruptError(ValueError):
    """The ledger cannot be read as a valid chain."""


def _read_raw_lines(path: Path) -> tuple[list[bytes], bool]:
    """Lines of the file and whether the last one ends with a newline."""
    data = path.read_bytes()
    if not data:
        return [], True
    complete = data.endswith(b"\n")
    lines = data.split(b"\n")
    if complete:
        lines = lines[:-1]
    return lines, complete


MAX_LINE_BYTES = 1 << 20
"""Longest ledger line accepted (bytes). A header with many claims is a few KiB; an event < 1 KiB."""
MAX_ORDERED_RUNS = 100_000
"""Readers return events in file order (consecutive equal events merged) up to this many runs of
equal events (~10 MB); beyond it, equal events are merged wherever they are (order is lost, which
composition does not need)."""
MAX_DISTINCT_EVENTS = 10_000
"""Most *distinct* events (equal up to ``count``) a reader keeps. Reading streams the file line by
line and merges equal events, so memory is O(distinct events), not O(file size); a ledger with more
distinct events is refused (unreadable: one clear line, CLI exit 2). 10,000 distinct events take ~20 MB to hold."""


class LedgerUnreadableError(ValueError):
    """The ledger cannot be read at all (missing, not a ledger, no header): a bad input (CLI exit 2)."""


class LedgerSealedError(ValueError):
    """The ledger is sealed (its run finished): it is never appended to again."""


class LedgerIncompleteError(LedgerCorruptError):
    """The chain is valid but not sealed: the run did not finish, or the ledger's tail was lost."""


@dataclass(frozen=True)
class VerifyResult:
    """What reading a ledger found (:func:`read_ledger`, :func:`verify_ledger`).

    ``status``:

    * ``intact`` — every line hashes and links, the seal matches (count, releases, head), a given
      public key verifies the seal's signature and a given manifest names the same head and seal;
    * ``incomplete`` — every line is valid but there is no seal: the run did not finish (or is still
      running), or the tail of the ledger (events and seal) was removed;
    * ``tampered`` — a line was changed, dropped, inserted, reordered or cut mid-line, the seal does
      not match, the signature does not verify, or the manifest disagrees;
    * ``unreadable`` — not a ledger (missing, no header, not JSON at line 1) or above a reader's bound.

    ``valid_lines``: leading lines forming a valid chain; ``bad_line``: the first bad line (1-based).
    ``events``: the events in file order, consecutive equal ones merged (``count`` summed); above
    :data:`MAX_ORDERED_RUNS` runs, equal events merged wherever they are (first-appearance order:
    composition does not depend on order). ``event_lines``: event lines read.
    ``releases``: sum of ``count`` over every event except claims. ``signature``: ``valid`` (checked
    against a given key), ``unchecked`` (signed, no key given), ``unsigned`` or None (no seal).
    ``coverage`` (only when read with a manifest and sealed): ``covered`` (the seal covers the
    manifest's fields and the audit key, and they match: see :func:`privaudit.ledger.seal.seal_covers`),
    ``older run`` (a seal written before covers existed: the manifest is not covered) or
    ``external audit`` (an external audit's manifest, which describes the audit, not the run).
    """

    status: Literal["intact", "incomplete", "tampered", "unreadable"]
    message: str
    valid_lines: int = 0
    bad_line: int | None = None
    head_hash: str | None = None
    last_seq: int | None = None
    header: "LedgerHeader | None" = None
    events: tuple[Event, ...] = ()
    event_lines: int = 0
    lines_by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    releases: int = 0
    seal: dict[str, Any] | None = None
    signature: str | None = None
    path: str | None = None
    coverage: str | None = None

    @property
    def ok(self) -> bool:
        """No damage found: ``intact`` or ``incomplete`` (a valid chain that may lack its seal). A
        consumer that accounts needs :attr:`verified` (see :func:`load_ledger`)."""
        return self.status in ("intact", "incomplete")

    @property
    def verified(self) -> bool:
        """``intact``: valid chain, sealed, signature and manifest checked where given."""
        return self.status == "intact"

    @property
    def sealed(self) -> bool:
        return self.seal is not None

    @property
    def no_releases(self) -> bool:
        """True when the ledger records no release (only claims, or nothing): "no releases recorded"."""
        return self.releases == 0

    @property
    def integrity(self) -> str:
        """One line for every output: status, seal and signature."""
        if self.status == "intact":
            sig = {"valid": "signature verified", "unchecked": "signed, signature not checked (no public key)",
                   "unsigned": "unsigned seal"}.get(self.signature or "", "")
            cov = {"covered": "; manifest covered by the seal",
                   "older run": "; manifest not covered by the seal (older run)",
                   "external audit": "; manifest not covered by the seal (external audit)"}.get(self.coverage or "", "")
            return f"intact, sealed ({sig}){cov}"
        return f"{self.status.upper()}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "message": self.message,
                "valid_lines": self.valid_lines, "bad_line": self.bad_line, "head_hash": self.head_hash,
                "sealed": self.sealed, "signature": self.signature, "event_lines": self.event_lines,
                "releases": self.releases, "coverage": self.coverage}


def _identity_key(raw_ev: dict[str, Any]) -> Any:
    """A hashable key equal for two raw events that differ at most in ``count`` (types included)."""
    key = tuple(sorted((k, type(v).__name__, v) for k, v in raw_ev.items() if k != "count"))
    try:
        hash(key)
    except TypeError:  # lists or objects inside (plaintext shapes, encryption parameters)
        return canonical_json({k: v for k, v in raw_ev.items() if k != "count"})
    return key


def _seal_of(obj: dict[str, Any]) -> dict[str, Any]:
    seal = obj.get("seal")
    if not isinstance(seal, dict):
        raise ValueError("seal: not an object")
    for k in ("event_lines", "releases"):
        if not isinstance(seal.get(k), int) or isinstance(seal.get(k), bool) or seal[k] < 0:
            raise ValueError(f"seal.{k}: not a non-negative integer")
    if not isinstance(seal.get("head"), str):
        raise ValueError("seal.head: missing")
    if "covers" in seal:
        from privaudit.ledger.seal import validate_covers

        validate_covers(seal["covers"])
    return seal


def read_ledger(path: str | os.PathLike[str], *, public_key: Any = None,
                manifest: dict[str, Any] | None = None, collect: bool = True,
                run_dir: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Read and verify a ledger in one streaming pass: the one reading function every consumer uses.

    Memory is bounded: lines are read one at a time (each at most :data:`MAX_LINE_BYTES`) and equal
    events merged (at most :data:`MAX_DISTINCT_EVENTS` distinct ones); time is linear in the file size.
    Checks: hashes, links, sequence numbers, header/event/seal schemas, the seal's count, releases and
    head; with ``public_key`` (an Ed25519 key or PEM path) the seal's signature; with ``manifest`` (a
    run's manifest dict) that its ``ledger_head_hash`` and ``ledger_seal`` match the ledger, that its
    ``run_id`` is the header's and that its covered fields (and ``run_dir``'s audit key; ``run_dir``
    defaults to the folder holding the ledger) are the ones the seal covers. Never
    raises for the file's content: the result's ``status`` says what was found (see
    :class:`VerifyResult`); events are returned only when the status is ``intact`` or ``incomplete``.
    ``ValueError`` for an unreadable public key.
    """
    from privaudit.ledger.seal import check_covers, check_signature, load_public_key

    pub = load_public_key(public_key)
    p = Path(path)
    sp = str(p)
    merged: dict[Any, list[Any]] = {}  # identity key -> [event, count]
    by_type: dict[str, dict[str, int]] = {}
    header: LedgerHeader | None = None
    prev = GENESIS
    head: str | None = None
    last_seq: int | None = None
    seal: dict[str, Any] | None = None
    releases = 0
    event_lines = 0
    i = 0

    ordered: list[list[Any]] | None = []  # [slot, event, count] runs of consecutive equal events

    def result(status: str, message: str, bad: int | None = None) -> VerifyResult:
        keep = status in ("intact", "incomplete") and collect
        if not keep:
            evs: tuple[Event, ...] = ()
        elif ordered is not None:
            evs = tuple(ev.with_count(n) for _, ev, n in ordered)
        else:
            evs = tuple(ev.with_count(n) for ev, n in merged.values())
        return VerifyResult(status, message, valid_lines=i, bad_line=bad, head_hash=head,  # type: ignore[arg-type]
                            last_seq=last_seq, header=header, events=evs, event_lines=event_lines,
                            lines_by_type=by_type if keep else {}, releases=releases, seal=seal,
                            signature=None, path=sp)

    try:
        f = open(p, "rb")
    except OSError as exc:
        return result("unreadable", f"cannot read {p}: {exc.strerror or exc}")
    with f:
        while True:
            try:
                b = f.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                return result("unreadable", f"cannot read {p}: {exc.strerror or exc}")
            if not b:
                break
            lineno = i + 1
            if len(b) > MAX_LINE_BYTES:
                return result("unreadable" if i == 0 else "tampered",
                              f"line {lineno}: longer than {MAX_LINE_BYTES} bytes (not a ledger line)", lineno)
            if not b.endswith(b"\n"):
                return result("tampered", f"line {lineno}: truncated, cut mid-line (no final newline: an incomplete "
                              f"write or a truncated file); chain valid up to line {i}", lineno)
            if seal is not None:
                return result("tampered", f"line {lineno}: a line after the seal", lineno)
            try:
                obj = json.loads(b.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                if i == 0:
                    return result("unreadable", f"line 1: header is not JSON ({str(exc)[:80]})", 1)
                return result("tampered", f"line {lineno}: not valid JSON", lineno)

            def bad(why: str) -> VerifyResult:
                return result("tampered", f"line {lineno}: {why}", lineno)

            if obj.get("seq") != i:
                return bad(f"seq is {str(obj.get('seq'))[:20]!r}, expected {i} (line dropped, inserted or reordered)")
            if obj.get("prev") != prev:
                return bad("prev does not match the hash of the previous line (line dropped or reordered)")
            try:
                h = line_hash(obj)
            except (ValueError, TypeError):
                return bad("content cannot be hashed (non-finite number)")
            if obj.get("hash") != h:
                return bad("hash does not match the line's content (line edited)")
            kind = obj.get("kind")
            try:
                if i == 0:
                    if kind != "header":
                        return result("unreadable", "line 1: not a ledger header", 1)
                    header = LedgerHeader.model_validate(obj["header"])
                elif kind == "event":
                    raw_ev = obj["event"]
                    if not isinstance(raw_ev, dict):
                        raise ValueError("event: not an object")
                    key = _identity_key(raw_ev)
                    slot = merged.get(key)
                    if slot is None:
                        if len(merged) >= MAX_DISTINCT_EVENTS:
                            return result("unreadable", f"line {lineno}: more than {MAX_DISTINCT_EVENTS} distinct "
                                          "events; privaudit reads ledgers of at most "
                                          f"{MAX_DISTINCT_EVENTS} distinct events (refused)", lineno)
                        ev = parse_event(raw_ev)
                        slot = merged[key] = [ev, 0]
                        n = ev.count
                    else:  # already validated but for its count
                        c = raw_ev.get("count", 1)
                        n = c if type(c) is int and 1 <= c <= MAX_COUNT else parse_event(raw_ev).count
                    etype = slot[0].type  # type: ignore[attr-defined]
                    if etype != "claim":
                        releases += n
                    if releases > MAX_COUNT:
                        return bad(f"event.count: total releases exceed {MAX_COUNT:.0e}")
                    slot[1] += n
                    if ordered is not None:
                        if ordered and ordered[-1][0] is slot:  # the same distinct event as the last run
                            ordered[-1][2] += n
                        else:
                            ordered.append([slot, slot[0], n])
                            if len(ordered) > MAX_ORDERED_RUNS:
                                ordered = None  # too long to keep in order: equal events aggregated
                    d = by_type.setdefault(etype, {"lines": 0, "count": 0})
                    d["lines"] += 1
                    d["count"] += n
                    event_lines += 1
                elif kind == "seal":
                    s = _seal_of(obj)
                    if s["event_lines"] != event_lines:
                        return bad(f"seal counts {s['event_lines']} event lines, the ledger has {event_lines} "
                                   "(lines dropped or added)")
                    if s["releases"] != releases:
                        return bad(f"seal counts {s['releases']} releases, the events sum to {releases} "
                                   "(events edited)")
                    if s["head"] != prev:
                        return bad("seal's head hash does not match the chain")
                    seal = s
                else:
                    return bad(f"unexpected kind {str(kind)[:20]!r}")
            except (KeyError, TypeError, ValueError, ValidationError) as exc:
                msg = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
                return bad(f"invalid content ({msg[:200]})")
            prev = h
            head = h
            last_seq = i
            i += 1
    if i == 0:
        return result("unreadable", f"{p} is empty: no header")
    assert header is not None
    sig_status: str | None = None
    if seal is not None:
        if pub is not None:
            why = check_signature(seal, header.run_id, pub)
            if why is not None:
                return result("tampered", f"line {i}: {why}", i)
            sig_status = "valid"
        else:
            sig_status = "unchecked" if "signature" in seal else "unsigned"
    coverage: str | None = None
    if manifest is not None:
        why = compare_manifest(manifest, head, seal)
        if why is None and isinstance(manifest, dict):
            external = manifest.get("kind") == "external_audit" and "config" not in manifest
            m_run = manifest.get("run_id")
            if seal is not None and external:
                coverage = "external audit"
            elif seal is not None and "covers" not in seal:
                coverage = "older run"  # read as before covers existed
            elif seal is not None:
                why = check_covers(seal["covers"], manifest, Path(run_dir) if run_dir is not None else p.parent)
                if why is None and m_run is not None and m_run != header.run_id:
                    why = (f"manifest.run_id {str(m_run)[:40]!r} differs from the ledger header's "
                           f"{header.run_id!r}")
                coverage = "covered"
        if why is not None:
            return result("tampered", why)
    if seal is None:
        if pub is not None:
            return result("incomplete", f"no seal (so no signature to check): the run did not finish or the "
                          f"ledger's tail was lost; {event_lines} event lines read")
        return result("incomplete", f"no seal: the run did not finish or the ledger's tail (events and seal) "
                      f"was lost; {event_lines} event lines read")
    out = result("intact", f"{event_lines} event lines, {releases} releases, chain and seal intact")
    return dataclasses.replace(out, signature=sig_status, coverage=coverage)


def compare_manifest(manifest: dict[str, Any], head: str | None, seal: dict[str, Any] | None) -> str | None:
    """None if a run manifest agrees with the ledger's head hash and seal, else why not."""
    if not isinstance(manifest, dict):
        return "manifest: not a JSON object"
    m_head = manifest.get("ledger_head_hash")
    m_seal = manifest.get("ledger_seal")
    if manifest.get("status") == "complete":
        if not isinstance(m_head, str):
            return "manifest: a complete run's manifest records no ledger_head_hash"
        if seal is None:
            return ("the run is complete but its ledger has no seal: the ledger's tail (events and seal) was "
                    "removed or lost")
    if isinstance(m_head, str) and m_head != head:
        return (f"the manifest's ledger head hash {m_head[:16]}… differs from the ledger's "
                f"{(head or 'none')[:16]}… (the ledger or the manifest changed after the run)")
    if m_seal is not None and m_seal != seal:
        return "the manifest's ledger_seal differs from the ledger's seal"
    return None


def verify_ledger(path: str | os.PathLike[str], *, public_key: Any = None,
                  manifest: dict[str, Any] | None = None) -> VerifyResult:
    """Check the whole chain (see :func:`read_ledger`), without keeping the events."""
    return read_ledger(path, public_key=public_key, manifest=manifest, collect=False)


def load_ledger(path: str | os.PathLike[str], *, public_key: Any = None, manifest: dict[str, Any] | None = None,
                allow_incomplete: bool = False) -> VerifyResult:
    """:func:`read_ledger` for a consumer that accounts: raises unless the ledger verifies.

    ``LedgerUnreadableError`` (a ``ValueError``; CLI exit 2) if unreadable or above a bound,
    ``LedgerCorruptError`` (CLI exit 1) naming the first bad line if tampered,
    ``LedgerIncompleteError`` (a ``LedgerCorruptError``) if not sealed, unless ``allow_incomplete``.
    """
    res = read_ledger(path, public_key=public_key, manifest=manifest)
    if res.status == "unreadable":
        raise LedgerUnreadableError(f"ledger: {res.message}")
    if res.status == "tampered":
        raise LedgerCorruptError(f"ledger {path}: TAMPERED: {res.message}")
    if res.status == "incomplete" and not allow_incomplete:
        raise LedgerIncompleteError(f"ledger {path}: INCOMPLETE: {res.message}")
    return res


@dataclass
class Ledger:
    """A privacy ledger on disk. Create with :meth:`create`, reopen with :meth:`open`.

    Opening for writing takes an exclusive lock; :meth:`close` (or the context manager) releases it.
    Read-only access (:meth:`read`) takes no lock.
    """

    path: Path
    header: LedgerHeader
    _lines: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _lock_fd: int | None = field(default=None, repr=False)
    writable: bool = False
    _reading: VerifyResult | None = field(default=None, repr=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], **header: Any) -> "Ledger":
        """Create a new ledger; refuses to overwrite an existing one. Header fields: see LedgerHeader."""
        p = Path(path)
        for key in header:  # extra fields are allowed (mechanisms add theirs), a near-miss of a field is not
            close = [] if key in LedgerHeader.model_fields else difflib.get_close_matches(
                key, list(LedgerHeader.model_fields), n=1, cutoff=0.8)
            if close:
                raise ValueError(f"{key}: unknown header field (did you mean {close[0]!r}?)")
        try:
            hdr = LedgerHeader(**header)
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc)) from None
        p.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path=p, header=hdr, writable=True)
        ledger._acquire_lock()
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            ledger.close()
            raise ValueError(f"ledger: {p} already exists (open it to continue a run)") from None
        line = {"seq": 0, "kind": "header", "header": hdr.model_dump(mode="json"), "prev": GENESIS}
        line["hash"] = line_hash(line)
        write_fd(fd, (canonical_json(line) + "\n").encode("utf-8"))
        fsync_dir(p.parent)
        ledger._lines = [line]
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True, repair: bool = True,
             public_key: Any = None, manifest: dict[str, Any] | None = None) -> "Ledger":
        """Open an existing ledger. With ``writable`` the ledger is locked for appending.

        Read-only (``writable=False``): :func:`load_ledger` with ``allow_incomplete`` (an unsealed
        ledger can be read; ``ledger.status`` says ``incomplete``); tampered raises
        :class:`LedgerCorruptError`, unreadable :class:`LedgerUnreadableError`.

        Writable (resuming a crashed run): a torn last line (a write interrupted by a crash before
        ``append`` returned) accounts for a release that never happened; with ``repair`` it is
        dropped. A *sealed* ledger is refused (:class:`LedgerSealedError`): its run finished, and a
        sealed ledger is never appended to or unsealed — start a new run. Any other damage raises
        :class:`LedgerCorruptError`.
        """
        p = Path(path)
        if not p.exists():
            raise LedgerUnreadableError(f"ledger: {p} does not exist")
        if not writable:
            res = load_ledger(p, public_key=public_key, manifest=manifest, allow_incomplete=True)
            assert res.header is not None
            return cls(path=p, header=res.header, writable=False, _reading=res)
        ledger = cls(path=p, header=LedgerHeader(), writable=writable)
        ledger._acquire_lock()
        try:
            result = read_ledger(p, collect=False)
            if result.status == "unreadable":
                raise LedgerUnreadableError(f"ledger: {result.message}")
            if result.sealed:
                raise LedgerSealedError(f"ledger: {p} is sealed (its run finished); a sealed ledger is never "
                                        "appended to: start a new run")
            torn = result.status == "tampered" and "cut mid-line" in (result.message or "")
            if result.status == "tampered" and not (torn and repair and result.valid_lines >= 1):
                raise LedgerCorruptError(f"ledger: {p}: {result.message}")
            raw, _ = _read_raw_lines(p)
            ledger._lines = [json.loads(b) for b in raw[: result.valid_lines]]
            ledger.header = LedgerHeader.model_validate(ledger._lines[0]["header"])
            if torn:
                ledger._rewrite()
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    def read(cls, path: str | os.PathLike[str], *, public_key: Any = None,
             manifest: dict[str, Any] | None = None) -> "Ledger":
        """Open read-only: streamed and verified by :func:`read_ledger` (no lock), against a run's
        ``manifest`` and a ``public_key`` when given. Tampered or cut mid-line raises
        :class:`LedgerCorruptError`; unsealed is allowed (``status`` ``incomplete``)."""
        return cls.open(path, writable=False, public_key=public_key, manifest=manifest)

    # -- locking ------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLockedError(f"ledger: {self.path} is being written by another process") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self.writable = False

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- writing ------------------------------------------------------------------------------
    def append(self, event: Event) -> None:
        """Make ``event`` durable before returning. Call this *before* the release it describes."""
        if not self.writable or self._lock_fd is None:
            raise RuntimeError("ledger: opened read-only or closed")
        if not isinstance(event, Event):
            raise TypeError("ledger.append expects a privacy event")
        last = self._lines[-1]
        if last["kind"] == "seal":
            raise LedgerSealedError(f"ledger: {self.path} is sealed; nothing is appended after the seal")
        if last["kind"] == "event":
            prev_event = parse_event(last["event"])
            if prev_event.identity() == event.identity():
                merged = prev_event.with_count(prev_event.count + event.count)
                new_last = self._make_line(len(self._lines) - 1, merged, self._lines[-2]["hash"])
                old = self._lines[-1]
                self._lines[-1] = new_last
                try:
                    self._rewrite()
                except BaseException:
                    self._lines[-1] = old
                    raise
                return
        line = self._make_line(len(self._lines), event, last["hash"])
        data = (canonical_json(line) + "\n").encode("utf-8")
        write_fd(os.open(self.path, os.O_WRONLY | os.O_APPEND), data)
        self._lines.append(line)

    def extend(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.append(ev)

    @staticmethod
    def _make_line(seq: int, event: Event, prev: str) -> dict[str, Any]:
        line = {"seq": seq, "kind": "event", "event": event.model_dump(mode="json"), "prev": prev}
        line["hash"] = line_hash(line)
        return line

    def _rewrite(self) -> None:
        """Atomically replace the file with the in-memory chain (temp file + fsync + rename)."""
        write_atomic(self.path, "".join(canonical_json(line) + "\n" for line in self._lines).encode("utf-8"))

    def seal(self, signing_key: Any = None, covers: dict[str, str] | None = None) -> dict[str, Any]:
        """Seal the ledger (a finished run): append the seal line (event lines, releases, head hash,
        and ``covers``: the digests of the run's manifest fields and audit key from
        :func:`privaudit.ledger.seal.seal_covers`; signed with an Ed25519 ``signing_key`` — key or PEM
        path — when given). Returns the seal, which the run's manifest keeps as ``ledger_seal``.
        Nothing can be appended afterwards."""
        from privaudit.ledger.seal import load_signing_key, sign_seal

        if not self.writable or self._lock_fd is None:
            raise RuntimeError("ledger: opened read-only or closed")
        if self._lines[-1]["kind"] == "seal":
            raise LedgerSealedError(f"ledger: {self.path} is already sealed")
        key = load_signing_key(signing_key)
        events = [ln["event"] for ln in self._lines[1:]]
        seal: dict[str, Any] = {
            "event_lines": len(events),
            "releases": sum(int(e.get("count", 1)) for e in events if e.get("type") != "claim"),
            "head": self._lines[-1]["hash"],
            "sealed": datetime.now(timezone.utc).isoformat(),
        }
        if covers is not None:
            from privaudit.ledger.seal import validate_covers

            seal["covers"] = dict(validate_covers(covers))
        if key is not None:
            seal = sign_seal(seal, self.header.run_id, key)
        line = {"seq": len(self._lines), "kind": "seal", "seal": seal, "prev": self._lines[-1]["hash"]}
        line["hash"] = line_hash(line)
        write_fd(os.open(self.path, os.O_WRONLY | os.O_APPEND), (canonical_json(line) + "\n").encode("utf-8"))
        self._lines.append(line)
        return seal

    # -- reading ------------------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """The events in order (see :attr:`VerifyResult.events` for read-only ledgers)."""
        if self._reading is not None:
            return list(self._reading.events)
        return [parse_event(line["event"]) for line in self._lines[1:] if line["kind"] == "event"]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        """Number of event lines."""
        if self._reading is not None:
            return self._reading.event_lines
        return sum(1 for line in self._lines[1:] if line["kind"] == "event")

    @property
    def head_hash(self) -> str:
        if self._reading is not None:
            return self._reading.head_hash or GENESIS
        return self._lines[-1]["hash"]

    @property
    def sealed(self) -> bool:
        if self._reading is not None:
            return self._reading.sealed
        return self._lines[-1]["kind"] == "seal"

    @property
    def status(self) -> str:
        """``intact`` (sealed) or ``incomplete`` (not sealed)."""
        if self._reading is not None:
            return self._reading.status
        return "intact" if self.sealed else "incomplete"

    @property
    def reading(self) -> VerifyResult | None:
        """What reading found (read-only ledgers)."""
        return self._reading

    @property
    def claims(self) -> list[ClaimEvent]:
        return list(self.header.claims) + [e for e in self.events if isinstance(e, ClaimEvent)]

    def summary(self) -> dict[str, Any]:
        """Events by type (lines and releases), total releases, head hash, seal and status."""
        if self._reading is not None:
            by_type = {k: dict(v) for k, v in self._reading.lines_by_type.items()}
            releases = self._reading.releases
        else:
            by_type = {}
            for ev in self.events:
                d = by_type.setdefault(ev.type, {"lines": 0, "count": 0})  # type: ignore[attr-defined]
                d["lines"] += 1
                d["count"] += ev.count
            releases = sum(d["count"] for k, d in by_type.items() if k != "claim")
        r = self._reading
        return {
            "path": str(self.path),
            "status": self.status,
            "integrity": r.integrity if r is not None else self.status,
            "run_id": self.header.run_id,
            "mechanism": self.header.mechanism,
            "privacy_unit": self.header.privacy_unit,
            "neighbouring": self.header.neighbouring,
            "observer": self.header.observer,
            "target_delta": self.header.target_delta,
            "noise_source": self.header.noise_source,
            "noise_secure": self.header.noise_secure,
            "event_lines": len(self),
            "releases": releases,
            "no_releases_recorded": releases == 0,
            "events": by_type,
            "head_hash": self.head_hash,
            "sealed": self.sealed,
            "signature": r.signature if r is not None else None,
        }
