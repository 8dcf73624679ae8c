"""Append-only, hash-chained, write-ahead privacy ledger (JSON Lines).

Line 1 is the header; every later line is one event. Each line carries ``seq``, ``prev`` (the hash of
the previous line, ``"0"*64`` for the header) and ``hash`` (SHA-256 of the line's canonical JSON without
``hash``). ``append`` makes the event durable (write + flush + fsync) before it returns, so callers
append *before* the release the event accounts for: a crash can over-count, never under-count.

Consecutive identical events are merged by ``count``: the head line is then replaced by an atomic
rename of a rewritten file (the file on disk is always either the old or the new valid chain).
A second concurrent writer is refused by an exclusive lock on ``<ledger>.lock``.
"""

from __future__ import annotations

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

from privaudit.audit.events import (
    ClaimEvent,
    Event,
    Neighbouring,
    format_validation_error,
    parse_event,
)
from privaudit.durable import fsync_dir, write_atomic, write_fd

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


def canonical_json(obj: Any) -> str:
    """Deterministic JSON used for hashing: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def line_hash(line: dict[str, Any]) -> str:
    body = {k: v for k, v in line.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class LedgerLockedError(RuntimeError):
    """Another writer holds this ledger."""


class LedgerCorruptError(ValueError):
    """The ledger cannot be read as a valid chain."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_ledger`.

    ``status``: ``intact``, ``tampered`` (a line was changed, dropped, reordered or is incomplete)
    or ``unreadable``. ``valid_lines``: number of leading lines that form a valid chain.
    """

    status: Literal["intact", "tampered", "unreadable"]
    message: str
    valid_lines: int = 0
    bad_line: int | None = None
    head_hash: str | None = None
    last_seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "intact"


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


def verify_ledger(path: str | os.PathLike[str]) -> VerifyResult:
    """Check the whole chain: hashes, links, sequence numbers, header and event schemas."""
    p = Path(path)
    try:
        raw, complete = _read_raw_lines(p)
    except OSError as exc:
        return VerifyResult("unreadable", f"cannot read {p}: {exc.strerror or exc}")
    if not raw:
        return VerifyResult("unreadable", f"{p} is empty: no header")
    prev = GENESIS
    head: str | None = None
    last_seq: int | None = None
    for i, b in enumerate(raw):
        lineno = i + 1
        is_last = i == len(raw) - 1
        try:
            obj = json.loads(b.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if is_last and not complete:
                return VerifyResult(
                    "tampered",
                    f"line {lineno}: truncated (incomplete last write); chain intact up to line {i}",
                    valid_lines=i, bad_line=lineno, head_hash=head, last_seq=last_seq,
                )
            if i == 0:
                return VerifyResult("unreadable", f"line 1: header is not JSON ({exc})", bad_line=1)
            return VerifyResult("tampered", f"line {lineno}: not valid JSON", valid_lines=i,
                                bad_line=lineno, head_hash=head, last_seq=last_seq)

        def bad(why: str) -> VerifyResult:
            return VerifyResult("tampered", f"line {lineno}: {why}", valid_lines=i, bad_line=lineno,
                                head_hash=head, last_seq=last_seq)

        if obj.get("seq") != i:
            return bad(f"seq is {obj.get('seq')!r}, expected {i} (line dropped, inserted or reordered)")
        if obj.get("prev") != prev:
            return bad("prev does not match the hash of the previous line (line dropped or reordered)")
        if obj.get("hash") != line_hash(obj):
            return bad("hash does not match the line's content (line edited)")
        try:
            if i == 0:
                if obj.get("kind") != "header":
                    return bad("first line is not a header")
                LedgerHeader.model_validate(obj["header"])
            else:
                if obj.get("kind") != "event":
                    return bad(f"unexpected kind {obj.get('kind')!r}")
                parse_event(obj["event"])
        except (KeyError, ValueError, ValidationError) as exc:
            return bad(f"invalid content ({exc})")
        prev = obj["hash"]
        head = prev
        last_seq = i
    if not complete:
        # The last line parsed and hashed correctly but its newline is missing: still incomplete.
        return VerifyResult("tampered", f"line {len(raw)}: missing final newline (incomplete write)",
                            valid_lines=len(raw), bad_line=len(raw), head_hash=head, last_seq=last_seq)
    return VerifyResult("intact", f"{len(raw) - 1} event lines, chain intact", valid_lines=len(raw),
                        head_hash=head, last_seq=last_seq)


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
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True, repair: bool = True) -> "Ledger":
        """Open an existing ledger. With ``writable`` the ledger is locked for appending.

        A torn last line (a write interrupted by a crash before ``append`` returned) accounts for a
        release that never happened; with ``repair`` it is dropped. Any other damage raises
        :class:`LedgerCorruptError`.
        """
        p = Path(path)
        if not p.exists():
            raise ValueError(f"ledger: {p} does not exist")
        ledger = cls(path=p, header=LedgerHeader(), writable=writable)
        if writable:
            ledger._acquire_lock()
        try:
            result = verify_ledger(p)
            torn = result.status == "tampered" and result.bad_line == result.valid_lines + 1 and (
                "truncated" in result.message or "missing final newline" in result.message
            )
            if not result.ok and not (torn and repair and result.valid_lines >= 1):
                raise LedgerCorruptError(f"ledger: {p}: {result.message}")
            raw, _ = _read_raw_lines(p)
            lines = [json.loads(b) for b in raw[: result.valid_lines]]
            if not result.ok and "missing final newline" in result.message:
                lines = lines[:-1]  # not durable: the append never returned
            ledger._lines = lines
            ledger.header = LedgerHeader.model_validate(lines[0]["header"])
            if not result.ok and writable:
                ledger._rewrite()
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "Ledger":
        """Open read-only (no lock, no repair of a torn tail: it is ignored)."""
        return cls.open(path, writable=False, repair=True)

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

    # -- reading ------------------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        return [parse_event(line["event"]) for line in self._lines[1:]]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self._lines) - 1

    @property
    def head_hash(self) -> str:
        return self._lines[-1]["hash"]

    @property
    def claims(self) -> list[ClaimEvent]:
        return list(self.header.claims) + [e for e in self.events if isinstance(e, ClaimEvent)]

    def summary(self) -> dict[str, Any]:
        """Events by type, total releases, head hash."""
        by_type: dict[str, dict[str, int]] = {}
        for ev in self.events:
            d = by_type.setdefault(ev.type, {"lines": 0, "count": 0})  # type: ignore[attr-defined]
            d["lines"] += 1
            d["count"] += ev.count
        return {
            "path": str(self.path),
            "run_id": self.header.run_id,
            "mechanism": self.header.mechanism,
            "privacy_unit": self.header.privacy_unit,
            "neighbouring": self.header.neighbouring,
            "observer": self.header.observer,
            "target_delta": self.header.target_delta,
            "event_lines": len(self),
            "events": by_type,
            "head_hash": self.head_hash,
        }
