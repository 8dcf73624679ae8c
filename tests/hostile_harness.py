"""Run the ``privaudit`` CLI in-process under a time cap and an address-space cap, for the hostile
input and fuzz tests.

``run_cli(argv)`` calls :func:`privaudit.cli.main` (the real entry point, exit codes included) with
stdout/stderr captured, ``RLIMIT_AS`` lowered to the current address space plus ``extra_bytes`` and
a ``SIGALRM`` timer of ``seconds``: an input that makes the CLI allocate beyond the cap ends in a
``MemoryError`` (which the CLI reports as "too large to process": :func:`assert_clean` counts that as
a failure), and one that runs past the timer raises :class:`Hang` out of the call.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import resource
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Address space a single CLI call may add (bytes).
MEMORY_CAP = 3 << 30
#: Seconds a single CLI call may run.
TIME_CAP = 60.0


class Hang(BaseException):
    """The CLI call ran past its time cap (a BaseException: nothing in privaudit swallows it)."""


@dataclass(frozen=True)
class CliOutcome:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [x for x in self.stderr.splitlines() if x.strip()]


def _address_space() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")  # pragma: no cover


@contextlib.contextmanager
def bounded(seconds: float = TIME_CAP, extra_bytes: int = MEMORY_CAP) -> Iterator[None]:
    """Time and address-space caps for the body (both restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: Sequence[str], seconds: float = TIME_CAP, extra_bytes: int = MEMORY_CAP) -> CliOutcome:
    """``privaudit ARGV`` in-process under :func:`bounded`; its exit code and captured output."""
    from privaudit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), bounded(seconds, extra_bytes):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliOutcome(code, out.getvalue(), err.getvalue())


def assert_clean(res: CliOutcome, allowed: Sequence[int] = (0, 1, 2)) -> None:
    """The contract for any input: no traceback, no resource blow-up, an allowed exit code, and a
    rejection (2) or failed check (1) is exactly one line on stderr."""
    assert "Traceback" not in res.stderr, res.stderr
    assert "too large to process" not in res.stderr, res.stderr  # a MemoryError under the cap
    assert res.code in allowed, (res.code, res.stderr)
    if res.code == 2:
        assert len(res.lines) == 1 and res.lines[0].startswith("error: "), res.stderr
    if res.code == 1:
        assert len(res.lines) == 1 and res.lines[0].startswith("check failed: "), res.stderr


def assert_rejected(res: CliOutcome, *fragments: str) -> str:
    """Exit 2 with one line on stderr containing every fragment; returns the line."""
    assert_clean(res, allowed=(2,))
    for f in fragments:
        assert f in res.lines[0], (f, res.lines[0])
    return res.lines[0]


TINY: dict[str, Any] = {
    "task": "classification",
    "model": {"name": "tiny-gpt2", "max_length": 16, "overrides": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 10, "n_canaries": 2}},
    "training": {"steps": 2, "batch_size": 4},
    "privacy": {"noise_multiplier": 1.0, "noise_seed": 0},
}


def tiny(**sections: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(TINY)
    for name, update in sections.items():
        data[name] = {**data.get(name, {}), **update}
    return data


def crafted_run(root: Path, config: dict[str, Any] | None = None, status: str = "complete") -> Path:
    """A run directory as someone else could hand it over: manifest (``config`` as given, unvalidated),
    a header-only ledger and an empty adapter. Nothing here is trained."""
    from safetensors.torch import save_file

    from privaudit.ledger.ledger import Ledger
    from privaudit.config import config_to_dict, parse_config

    rd = root / "run"
    rd.mkdir(parents=True)
    manifest = {"format_version": 1, "status": status, "mechanism": "dp_lora", "task": "classification",
                "config": config if config is not None else config_to_dict(parse_config(TINY)),
                "data": {"label_names": ["a", "b"]}}
    led = Ledger.create(rd / "ledger.jsonl", mechanism="dp_lora", target_delta=1e-5)
    if status == "complete":  # a finished run's ledger is sealed and the manifest keeps its head and seal
        manifest["ledger_seal"] = led.seal()
        manifest["ledger_head_hash"] = led.head_hash
    led.close()
    (rd / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (rd / "ledger.jsonl.lock").unlink(missing_ok=True)
    save_file({}, str(rd / "adapter.safetensors"))
    return rd
