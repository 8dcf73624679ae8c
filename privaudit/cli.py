"""The ``privaudit`` command. Thin: parses arguments, calls the API, prints.

Exit codes: 0 success, 1 a check failed (tampered ledger, audit violation), 2 bad input.
A user's mistake is one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import click


class CheckFailed(Exception):
    """A check ran and failed (exit code 1)."""


def fail_input(message: str) -> NoReturn:
    """Abort with exit code 2 and one line on stderr."""
    raise click.UsageError(message)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=False, allow_nan=False))


def _positive_float(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        fail_input(f"{name}: must be a finite number > 0, got {value}")


def _unit_interval(name: str, value: float | None, *, closed_right: bool) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and 0 < value and (value <= 1 if closed_right else value < 1)
    if not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        fail_input(f"{name}: must be in {interval}, got {value}")


def _format_eps(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.4f}"


class _Group(click.Group):
    """A group whose command list shows each command's whole first sentence (wrapped, not cut)."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=300)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _plain() -> bool:
    """True when stdout is not a terminal (a pipe or a file): print plain text, never cut columns."""
    return not sys.stdout.isatty()


def print_table(title: str, columns: list[str], rows: list[list[str]], right: tuple[str, ...] = ()) -> None:
    """A table on stdout: rich on a terminal; aligned plain text (nothing truncated) when piped."""
    if _plain():
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]

        def line(cells: list[str]) -> str:
            return "  ".join(x.rjust(w) if c in right else x.ljust(w)
                             for x, w, c in zip(cells, widths, columns)).rstrip()

        click.echo(title)
        click.echo(line(columns))
        for r in rows:
            click.echo(line(r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left", overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def say(text: str, bold: bool = False) -> None:
    """One line on stdout (rich markup only on a terminal)."""
    if _plain():
        click.echo(text)
    else:
        from rich.console import Console
        from rich.markup import escape

        Console().print(f"[bold]{escape(text)}[/bold]" if bold else escape(text))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="privaudit")
def cli() -> None:
    """privaudit: private fine-tuning, privacy ledgers, accountants, audits and reports."""


# --------------------------------------------------------------------------------------------
# epsilon / calibrate
# --------------------------------------------------------------------------------------------
ACCOUNTANT_CHOICES = ["rdp", "pld", "prv", "all"]


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Run config (YAML/TOML).")
@click.option("--ledger", "ledger_path", type=click.Path(path_type=Path),
              help="A ledger.jsonl file, or a run directory (its ledger, checked against its manifest).")
@click.option("--noise-multiplier", type=float, help="Noise std / clip norm.")
@click.option("--sample-rate", type=float, help="Poisson sampling rate q in (0, 1].")
@click.option("--steps", type=str, metavar="INTEGER", help="Number of steps (a non-negative integer).")
@click.option("--delta", type=float, help="Target delta in (0, 1) (default: the ledger's or config's).")
@click.option("--accountant", type=click.Choice(ACCOUNTANT_CHOICES), default="all", show_default=True,
              help="Accountant(s) to report: pld and prv are tight, rdp a looser upper bound; all: each.")
@click.option("--neighbouring", type=click.Choice(["add_remove", "replace"]), default=None,
              help="Neighbouring relation (default: the ledger's, else add_remove).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 public key (PEM): the ledger's seal must be signed by its private key.")
@click.option("--allow-incomplete", is_flag=True,
              help="Account an unsealed ledger (a running or crashed run): ε of what it records so far.")
def epsilon(config_path: Path | None, ledger_path: Path | None, noise_multiplier: float | None,
            sample_rate: float | None, steps: str | None, delta: float | None, accountant: str,
            neighbouring: str | None, as_json: bool, public_key: Path | None, allow_incomplete: bool) -> None:
    """ε(δ) of a config, a ledger, or a DP-SGD setting (σ, q, steps). A ledger must verify (exit 1
    naming the first bad line otherwise) and be sealed unless --allow-incomplete."""
    from privaudit.accounting.base import accountant_names, get_accountant, segments_from_events
    from privaudit.ledger.events import GaussianEvent

    sources = [config_path is not None, ledger_path is not None,
               any(v is not None for v in (noise_multiplier, sample_rate, steps))]
    if sum(sources) != 1:
        fail_input("give exactly one of --config, --ledger, or --noise-multiplier/--sample-rate/--steps")
    claims: list[dict[str, Any]] = []
    relation = neighbouring
    integrity: str | None = None
    no_releases = False
    if ledger_path is not None:
        from privaudit.ledger.ledger import Ledger

        ledger = _read_ledger(ledger_path, public_key, allow_incomplete)
        integrity, no_releases = ledger.reading.integrity, ledger.reading.no_releases
        events = ledger.events
        relation = relation or ledger.header.neighbouring
        delta = delta if delta is not None else ledger.header.target_delta
        claims = [c.model_dump(mode="json") for c in ledger.claims]
        del Ledger
    elif config_path is not None:
        from privaudit.config import load_config
        from privaudit.runs import planned_events

        cfg = load_config(config_path)
        planned = planned_events(cfg)
        events = planned.events
        relation = relation or planned.neighbouring
        delta = delta if delta is not None else planned.delta
        claims = [c.model_dump(mode="json") for c in planned.claims]
    else:
        if noise_multiplier is None:
            fail_input("--noise-multiplier: missing (needed with --sample-rate and --steps)")
        if sample_rate is None:
            fail_input("--sample-rate: missing (needed with --noise-multiplier and --steps)")
        if steps is None:
            fail_input("--steps: missing (needed with --noise-multiplier and --sample-rate)")
        _positive_float("--noise-multiplier", noise_multiplier)
        _noise_range(noise_multiplier)
        _unit_interval("--sample-rate", sample_rate, closed_right=True)
        n_steps = _parse_steps(steps)
        events = [GaussianEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                count=n_steps)] if n_steps > 0 else []
    if delta is None:
        fail_input("--delta: missing (the source names no target delta)")
    _unit_interval("--delta", delta, closed_right=False)
    _delta_floor(delta)
    names = accountant_names() if accountant == "all" else [accountant]
    reduction = segments_from_events(events, relation or "add_remove")  # type: ignore[arg-type]
    results, unavailable = [], []
    for n in names:
        try:
            results.append(get_accountant(n).epsilon(reduction, delta))
        except ValueError as exc:  # e.g. PRV's mesh for huge ε; with --accountant all the others still answer
            if len(names) == 1:
                raise
            unavailable.append({"accountant": n, "reason": str(exc)})
    if not results:  # no accountant could answer: one clear line, never an empty table
        fail_input(f"{unavailable[0]['reason']} (no accountant could compute ε)")
    setting = _gaussian_setting(events)
    if as_json:
        out: dict[str, Any] = {"delta": delta, "results": [r.to_json() for r in results]}
        if setting:
            out["gaussian"] = setting
        if integrity is not None:
            out["ledger"] = integrity
            out["no_releases_recorded"] = no_releases
        if unavailable:
            out["unavailable"] = unavailable
        if claims:
            out["claims"] = claims
        emit_json(out)
        return
    if config_path is not None or ledger_path is not None:
        say("Gaussian releases used: " + ("; ".join(f"σ = {g['noise_multiplier']:.6g}, q = {g['sample_rate']:.6g}, "
                                                    f"steps = {g['steps']}" for g in setting) or "none"))
    print_table(f"ε at δ = {delta:g} ({relation or 'add_remove'} neighbours)", ["accountant", "ε", "lower", "upper"],
                [[r.accountant, _format_eps(r.epsilon), _format_eps(r.epsilon_lower), _format_eps(r.epsilon_upper)]
                 for r in results], right=("ε", "lower", "upper"))
    if integrity is not None:
        say(f"ledger: {integrity}" + ("; no releases recorded" if no_releases else ""))
    for u in unavailable:
        say(f"{u['accountant']}: unavailable ({u['reason']})")
    for r in results:
        if not r.has_guarantee:
            say(f"no formal guarantee ({r.accountant}): {r.reason}", bold=True)
            break
    for c in claims:
        say(f"claimed: ε = {c['epsilon']:g}, δ = {c['delta']:g} ({c.get('scope', '')}; "
            f"source: {c.get('source', '')})")


def _gaussian_setting(events: Any) -> list[dict[str, Any]]:
    """The Gaussian releases as (σ, q, steps) runs, merging consecutive lines with the same σ and q."""
    from privaudit.ledger.events import GaussianEvent

    out: list[dict[str, Any]] = []
    for ev in events:
        if not isinstance(ev, GaussianEvent):
            continue
        if out and out[-1]["noise_multiplier"] == ev.noise_multiplier and out[-1]["sample_rate"] == ev.sample_rate:
            out[-1]["steps"] += int(ev.count)
        else:
            out.append({"noise_multiplier": float(ev.noise_multiplier), "sample_rate": float(ev.sample_rate),
                        "steps": int(ev.count)})
    return out


def _parse_steps(steps: str) -> int:
    from privaudit.accounting.limits import MAX_STEPS

    try:
        value = float(steps)
    except ValueError:
        fail_input(f"--steps: must be a non-negative integer, got {steps!r}")
    if not math.isfinite(value) or value < 0 or value != int(value):
        fail_input(f"--steps: must be a non-negative integer, got {steps!r}")
    if value > MAX_STEPS:
        fail_input(f"--steps: at most {MAX_STEPS:.0e}, got {steps!r}")
    return int(value)


def _delta_floor(value: float) -> None:
    from privaudit.accounting.limits import MIN_DELTA

    if value < MIN_DELTA:
        fail_input(f"--delta: at least {MIN_DELTA:g}, got {value:g}")


def _noise_range(value: float) -> None:
    from privaudit.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

    if not MIN_NOISE_MULTIPLIER <= value <= MAX_NOISE_MULTIPLIER:
        fail_input(f"--noise-multiplier: must be in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}], got {value:g}")


@cli.command()
@click.option("--target-epsilon", type=float, required=True, help="Target ε (> 0).")
@click.option("--delta", type=float, required=True, help="δ in (0, 1).")
@click.option("--sample-rate", type=float, required=True, help="Poisson sampling rate q in (0, 1].")
@click.option("--steps", type=str, required=True, metavar="INTEGER", help="Number of steps (a positive integer).")
@click.option("--accountant", type=click.Choice(["rdp", "pld", "prv"]), default="pld", show_default=True,
              help="Accountant whose ε must not exceed the target (pld, prv: tight; rdp: a looser bound, so "
                   "more noise).")
@click.option("--neighbouring", type=click.Choice(["add_remove", "replace"]), default="add_remove",
              show_default=True, help="Neighbouring relation the ε is for.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: str, accountant: str,
              neighbouring: str, as_json: bool) -> None:
    """The smallest noise multiplier whose ε does not exceed the target."""
    from privaudit.accounting.calibrate import calibrate_noise
    from privaudit.accounting.limits import MAX_TARGET_EPSILON

    _positive_float("--target-epsilon", target_epsilon)
    if target_epsilon > MAX_TARGET_EPSILON:
        fail_input(f"--target-epsilon: at most {MAX_TARGET_EPSILON:g}, got {target_epsilon:g}")
    _unit_interval("--delta", delta, closed_right=False)
    _delta_floor(delta)
    _unit_interval("--sample-rate", sample_rate, closed_right=True)
    n_steps = _parse_steps(steps)
    if n_steps == 0:
        fail_input("--steps: must be a positive integer, got 0")
    res = calibrate_noise(target_epsilon, delta, sample_rate, n_steps, accountant=accountant,
                          neighbouring=neighbouring)  # type: ignore[arg-type]
    if as_json:
        emit_json({"noise_multiplier": res.noise_multiplier, "epsilon": res.epsilon,
                   "accountant": res.accountant, "target_epsilon": target_epsilon, "delta": delta,
                   "sample_rate": sample_rate, "steps": n_steps, "neighbouring": neighbouring})
    else:
        click.echo(f"noise multiplier σ = {res.noise_multiplier:.6g} gives ε = {res.epsilon:.4f} "
                   f"≤ {target_epsilon:g} at δ = {delta:g} ({res.accountant}; q = {sample_rate:g}, "
                   f"{n_steps} steps, {neighbouring})")


# --------------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------------
@cli.group(cls=_Group)
def ledger() -> None:
    """Inspect and verify privacy ledgers."""


def _ledger_source(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """``path`` as a ledger file, or a run directory: its ``ledger.jsonl`` and its manifest (read with a
    size cap; exit 2 if unreadable), which the ledger's seal is then compared with."""
    if not path.is_dir():
        return path, None
    from privaudit.safe_read import read_json_file

    try:
        manifest = read_json_file(path / "manifest.json", "manifest", root=path)
    except ValueError as exc:
        fail_input(str(exc))
    if not isinstance(manifest, dict):
        fail_input(f"manifest: {path / 'manifest.json'} must hold a JSON object, not {type(manifest).__name__}")
    return path / "ledger.jsonl", manifest


def _read_ledger(path: Path, public_key: Path | None = None, allow_incomplete: bool = False) -> Any:
    """The ledger through the one reading function: unreadable (or above a bound) exit 2, tampered or
    (unless allowed) unsealed exit 1 naming the first bad line. ``path``: a ledger file or a run
    directory (its ledger, compared with its manifest and audit key)."""
    from privaudit.ledger.ledger import Ledger, LedgerCorruptError, LedgerUnreadableError

    path, manifest = _ledger_source(path)
    try:
        led = Ledger.read(path, public_key=public_key, manifest=manifest)
    except LedgerCorruptError as exc:
        raise CheckFailed(str(exc)) from None
    except LedgerUnreadableError as exc:
        fail_input(str(exc))
    if led.status == "incomplete" and not allow_incomplete:
        raise CheckFailed(f"ledger {path}: INCOMPLETE: {led.reading.message} (--allow-incomplete to read it "
                          "anyway)")
    return led


_PUBLIC_KEY_OPTION = click.option(
    "--public-key", type=click.Path(path_type=Path), default=None,
    help="Ed25519 public key (PEM, from `privaudit keygen`): the seal must be signed by its private key.")
_INCOMPLETE_OPTION = click.option("--allow-incomplete", is_flag=True,
                                  help="Accept an unsealed ledger (a running or crashed run): exit 0.")


@ledger.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_PUBLIC_KEY_OPTION
@_INCOMPLETE_OPTION
def ledger_verify(path: Path, as_json: bool, public_key: Path | None, allow_incomplete: bool) -> None:
    """Check the hash chain and seal: exit 0 intact, 1 tampered or incomplete (unsealed), 2 unreadable.
    PATH: a ledger file, or a run directory (its ledger, also compared with its manifest and audit key)."""
    from privaudit.ledger.ledger import verify_ledger

    path, manifest = _ledger_source(path)
    res = verify_ledger(path, public_key=public_key, manifest=manifest)
    if as_json:
        emit_json(res.to_json())
    if res.status == "unreadable":
        fail_input(f"ledger: {res.message}")
    if res.status == "tampered":
        raise CheckFailed(f"ledger {path}: TAMPERED: {res.message}")
    if res.status == "incomplete" and not allow_incomplete:
        raise CheckFailed(f"ledger {path}: INCOMPLETE: {res.message}")
    if not as_json:
        click.echo(f"ledger {path}: {res.integrity} ({res.message}); head {res.head_hash}")


@ledger.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_PUBLIC_KEY_OPTION
@_INCOMPLETE_OPTION
def ledger_show(path: Path, as_json: bool, public_key: Path | None, allow_incomplete: bool) -> None:
    """Summary of a ledger: integrity, events by type, releases, head hash (exit codes as verify)."""
    led = _read_ledger(path, public_key, allow_incomplete)
    summary = led.summary()
    if as_json:
        emit_json(summary)
        return
    say(f"{path}  run {summary['run_id']}  mechanism {summary['mechanism']}", bold=True)
    say(f"unit {summary['privacy_unit']}, {summary['neighbouring']} neighbours, observer "
        f"'{summary['observer']}', target δ {summary['target_delta']}")
    print_table("", ["event", "lines", "releases (count)"],
                [[kind, str(d["lines"]), str(d["count"])] for kind, d in summary["events"].items()],
                right=("lines", "releases (count)"))
    if summary["no_releases_recorded"]:
        say("no releases recorded")
    say(f"head hash {summary['head_hash']}")
    say(f"ledger: {summary['integrity']}")
    if summary.get("noise_secure") is False:
        say(f"noise: {summary['noise_source']}")


@cli.command()
@click.argument("key_path", metavar="KEY", type=click.Path(path_type=Path))
def keygen(key_path: Path) -> None:
    """Write an Ed25519 key pair for signing ledger seals: KEY (private, mode 0600; pass it to
    `train --signing-key`) and KEY.pub (public; give it to reviewers for `--public-key`)."""
    from privaudit.ledger.seal import generate_keypair

    priv, pub = generate_keypair(key_path)
    click.echo(f"private key {priv} (keep it secret); public key {pub}")


@cli.command("he-worker")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: a free port, printed once listening).")
@click.option("--once", is_flag=True, help="Exit after the first data owner's session.")
def he_worker(port: int, once: bool) -> None:
    """Serve HE-LoRA encrypted products on loopback (127.0.0.1 only); never holds a secret key."""
    from privaudit.mechanisms.he_lora.worker import serve

    serve(port, once=once)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run directory to write (must be new or empty, unless --resume).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in RUN_DIR from its last checkpoint (ledger events of steps "
                   "after that checkpoint stay counted: a resumed run may over-count, never under-count).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary.")
@click.option("--signing-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (PEM, from `privaudit keygen`) that signs the ledger's seal.")
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Processes (one per GPU, or CPU processes with gloo): runs `torchrun --nproc-per-node N -m "
                   "privaudit train ...` (dp_lora only).")
def train(config_path: Path, run_dir: Path, resume: bool, quiet: bool, as_json: bool,
          signing_key: Path | None, nproc: int) -> None:
    """Train a config and write the run directory (manifest, ledger, adapter, audit key)."""
    from privaudit.ledger.ledger import LedgerLockedError
    from privaudit.config import load_config
    from privaudit.runs import train as train_run

    cfg = load_config(config_path)
    if nproc > 1:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "privaudit", "train", str(config_path), "-o", str(run_dir)]
        cmd += [flag for flag, on in (("--resume", resume), ("--quiet", quiet), ("--json", as_json)) if on]
        cmd += ["--signing-key", str(signing_key)] if signing_key is not None else []
        raise SystemExit(subprocess.call(cmd))
    try:
        result = train_run(cfg, run_dir, resume=resume, progress=not quiet, signing_key=signing_key)
    except LedgerLockedError as exc:
        fail_input(str(exc))
    if result.manifest.get("status") == "worker":  # a torchrun rank other than 0: rank 0 reports
        return
    if as_json:
        emit_json(result.summary())
        return
    privacy = result.privacy
    eps = privacy.get("epsilon", {})
    eps_text = ", ".join(f"{k} {_format_eps(v if v is not None else math.inf)}" for k, v in eps.items())
    click.echo(f"run {run_dir}: {result.manifest['status']}; {privacy['steps']} steps, "
               f"σ = {privacy['noise_multiplier']:.4g}, q = {privacy['sample_rate']:.4g}; "
               f"ε at δ = {privacy['delta']:g}: {eps_text}")
    if privacy.get("guarantee") == "none":
        click.echo(f"no formal guarantee: {privacy.get('reason')}")
    seal = result.manifest.get("ledger_seal") or {}
    click.echo(f"ledger sealed: {seal.get('event_lines')} event lines, {seal.get('releases')} releases, "
               + (f"signed (key id {seal['key_id']})" if seal.get("signature") else "unsigned"))
    md = privacy.get("metric_dp") or {}
    if md.get("eta") is not None:
        click.echo(f"metric DP ({md.get('guarantee')}): η = {md['eta']:.4g} per unit distance; ε = "
                   f"{md.get('epsilon_at_median_nn', math.nan):.4g} between tokens at the median nearest-neighbour "
                   f"distance {md.get('median_nn_distance', math.nan):.4g}")
    if privacy.get("against_worker"):
        click.echo(f"against the worker: {privacy['against_worker'].get('statement')}")
    if privacy.get("released_model"):
        rm = privacy["released_model"]
        click.echo(f"released model: {rm.get('guarantee')} ({rm.get('reason')})")
    heldout = result.metrics.get("heldout", {})
    click.echo("held-out utility: " + ", ".join(f"{k} {v:.4g}" for k, v in heldout.items()))


# --------------------------------------------------------------------------------------------
# audit
# --------------------------------------------------------------------------------------------
_SHORT_BOUND = {"one_run_steinke": "Steinke", "one_run_fdp": "f-DP",
                "one_run_fdp_accounted": "f-DP accounted"}  # the bound behind a table's ε lower


@cli.command()
@click.argument("run_dir", metavar="[RUN_DIR]", type=click.Path(path_type=Path), required=False)
@click.option("--model", default=None, help="Audit a checkpoint instead of a run: HF model name (local cache) or path.")
@click.option("--adapter", type=click.Path(path_type=Path), default=None, help="PEFT adapter directory on --model.")
@click.option("--members", type=click.Path(path_type=Path), default=None, help="Member texts (.jsonl/.csv/HF dir).")
@click.option("--non-members", type=click.Path(path_type=Path), default=None, help="Non-member texts.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output directory for audit.json and manifest.json (checkpoint audits).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default=None, help="Label column (sequence classifiers).")
@click.option("--reference-model", default=None, help="NAME_OR_PATH, 'base' or 'none' (default: base with an adapter).")
@click.option("--epsilon", type=float, default=None, help="Claimed ε to check (with --delta).")
@click.option("--delta", type=float, default=None, help="δ of the claim or ledger (default: the ledger's, else 1e-5).")
@click.option("--ledger", type=click.Path(path_type=Path), default=None, help="Ledger whose accounted ε is checked.")
@click.option("--canaries", type=click.Path(path_type=Path), default=None,
              help="JSONL canaries (prefix, secret, included by fair coins; optional suffix, format).")
@click.option("--members-by-coin-flip", is_flag=True, help="Assert each record's membership was a fair coin flip.")
@click.option("--max-records", type=int, default=None, help="Records scored per side (default 1000).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Scoring batch size.")
@click.option("--attacks", default=None, help="Comma-separated attacks (default: all that fit the run).")
@click.option("--reference-models", type=int, default=0, show_default=True,
              help="Reference models to train for LiRA/RMIA (0: none, else >= 2).")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="Confidence of the empirical ε lower bound (Bonferroni over all bounds).")
@click.option("--seed", type=int, default=0, show_default=True, help="The auditor's seed.")
@click.option("--model-path", type=click.Path(path_type=Path), default=None,
              help="The base model's folder, when the run's model is neither bundled nor in the local HF cache "
                   "(a path named in the run's manifest is never loaded); it must match the folder "
                   "fingerprint the run recorded, if any.")
@click.option("--data-path", type=click.Path(path_type=Path), default=None,
              help="The run's data file (.jsonl/.csv or a saved HF dataset folder), for a run trained on one: "
                   "a data path named in the run's manifest is never opened; the file must match the data "
                   "fingerprints the run recorded. Synthetic data needs none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (audit.json).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_PUBLIC_KEY_OPTION
def audit(run_dir: Path | None, attacks: str | None, reference_models: int, confidence: float, seed: int,
          model_path: Path | None, data_path: Path | None, as_json: bool, quiet: bool, public_key: Path | None,
          **external: Any) -> None:
    """Audit a run: attacks, empirical ε lower bound, verdict; writes RUN_DIR/audit.json (exit 1 on a
    violation). With --model/--adapter: audit any checkpoint against --members/--non-members into -o.

    RUN_DIR: a run directory written by `privaudit train` (manifest.json, ledger.jsonl, the adapter as
    safetensors and audit_key.json, the auditor's record of which records and canaries were members).
    Everything in RUN_DIR is untrusted: its manifest never chooses a model folder or a data file to open
    (pass your own with --model-path / --data-path).
    Verdicts: consistent, inconclusive (the audit could not test the accounted ε), violation, no guarantee."""
    from privaudit.audit.auditor import audit_run, bound_name
    from privaudit.ledger.ledger import LedgerCorruptError

    if external["model"] is not None or external["adapter"] is not None:
        if data_path is not None or model_path is not None:
            fail_input("--data-path/--model-path: these options audit a run directory; a checkpoint audit "
                       "takes --model and --members/--non-members")
        from privaudit.audit.external import audit_from_cli

        result = audit_from_cli(run_dir=run_dir, attacks=attacks, confidence=confidence, seed=seed,
                                quiet=quiet or as_json, **external)
        run_dir = external["out_dir"]
        from privaudit.mechanisms.distributed import world_from_env

        if not world_from_env().is_main:  # torchrun: the scoring was sharded; rank 0 reports
            return
    elif run_dir is None:
        fail_input("RUN_DIR: give a run directory, or --model/--adapter with --members, --non-members and -o")
    elif any(v not in (None, False, "text", 16) for v in external.values()):
        fail_input("--members/-o/...: these options audit a checkpoint and need --model or --adapter")
    else:
        names = None if attacks is None else [a.strip() for a in attacks.split(",")]
        try:
            result = audit_run(run_dir, attacks=names, reference_models=reference_models, confidence=confidence,
                               seed=seed, progress=not quiet, public_key=public_key,
                               model_path=model_path, data_path=data_path)
        except LedgerCorruptError as exc:
            raise CheckFailed(f"ledger of {run_dir}: {exc}") from None
    if as_json:
        emit_json(result.to_json())
    else:
        rows: list[list[str]] = []
        for a in result.attacks:
            m = a.metrics
            ci = m.get("auc_ci")
            auc = "-" if m.get("auc") is None else f"{m['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            tpr = [("-" if m.get(k) is None else f"{m[k]:.3f}") for k in ("tpr_at_0.1%_fpr", "tpr_at_1%_fpr")]
            rows.append([a.name, a.kind, auc, *tpr,
                         "-" if a.epsilon_lower is None else
                         f"{_format_eps(a.epsilon_lower.value)} "
                         f"({_SHORT_BOUND.get(bound_name(a.epsilon_lower), bound_name(a.epsilon_lower))})",
                         "-" if a.power is None else _format_eps(a.power)])
        print_table(f"audit of {run_dir} (observer: {result.observer})",
                    ["attack", "kind", "AUC [CI]", "TPR@0.1%FPR", "TPR@1%FPR", "ε lower (bound)", "power"], rows,
                    right=("AUC [CI]", "TPR@0.1%FPR", "TPR@1%FPR", "ε lower (bound)", "power"))
        acc = result.accounted
        eps_text = ", ".join(f"{k} {_format_eps(v if v is not None else math.inf)}" for k, v in acc["epsilon"].items())
        say(f"accounted ε at δ = {acc['delta']:g}: {eps_text}")
        if acc.get("ledger"):
            say(f"ledger: {acc['ledger']}" + ("; no releases recorded" if acc.get("note") else ""))
        el = result.epsilon_lower
        power = el.get("power")
        say(f"empirical ε lower bound: {_format_eps(el['value'])} at {100 * el['confidence']:g}% "
            f"confidence ({el.get('attack') or 'no bound'}"
            + (f", {el['bound']} bound" + ((" assuming the accounted schedule at some noise scale"
                                            if el.get("assumption") == "accounted_family"
                                            else " assuming a Gaussian trade-off curve") if el.get("assumption") else "")
               if el.get("bound") else "") + ")"
            + (f"; the most this audit could certify: {_format_eps(power)}" if power is not None else ""))
        tt = acc.get("tradeoff_test")
        if isinstance(tt, dict) and "refuted" in tt:
            say("test against the accountant's own trade-off curve (pld): "
                + ("REJECTED by " + ", ".join(tt.get("refuted_by", [])) if tt["refuted"] else "not rejected"))
        for c in result.claimed:
            say(f"claimed ε = {c['epsilon']:g} at δ = {c['delta']:g} ({c['source'] or 'no source'}): {c['status']}")
        say(f"verdict: {result.verdict} — {result.verdict_reason}", bold=True)
        if result.path is not None:
            say(f"written: {result.path}")
    if result.verdict == "violation":
        raise CheckFailed(f"audit of {run_dir}: VIOLATION: {result.verdict_reason}")


# --------------------------------------------------------------------------------------------
# report / sweep / demo
# --------------------------------------------------------------------------------------------
@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_pdf", type=click.Path(path_type=Path), required=True,
              help="PDF to write; figures (PNG) and tables (CSV, JSON) go beside it.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object listing what was written.")
@_PUBLIC_KEY_OPTION
def report(run_dirs: tuple[Path, ...], out_pdf: Path, quiet: bool, as_json: bool, public_key: Path | None) -> None:
    """Render runs (trained, optionally audited) as a PDF report with figures and tables.

    Exit 1 (the PDF is still written, with a red banner) when a run's ledger fails the integrity
    check (tampered, incomplete, unsealed or not matching its manifest): no guarantee is stated for it."""
    from privaudit.reports import build_report

    if not run_dirs:
        fail_input("RUN_DIR: give at least one run directory")
    if not out_pdf.parent.is_dir():  # never create folders the user did not ask for
        fail_input(f"-o: the folder {out_pdf.parent} does not exist")
    say = None if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    out = build_report(list(run_dirs), out_pdf, progress=say, public_key=public_key)
    if as_json:
        emit_json({"pdf": str(out.pdf), "figures": {k: str(v) for k, v in out.figures.items()},
                   "runs_csv": str(out.runs_csv), "runs_json": str(out.runs_json)})
    else:
        click.echo(f"report: {out.pdf} ({len(out.figures)} figures, tables beside it)")
    refused = [r for r in out.records if (r.guarantee_refused and r.has_guarantee is not False)
               or r.ledger_status not in ("intact", "missing")]
    if refused:
        raise CheckFailed("; ".join(f"{r.label}: {r.guarantee_refused or r.ledger_status + ': ' + r.ledger_message}"
                                    for r in refused)
                          + f" (no guarantee stated for {'it' if len(refused) == 1 else 'them'} in {out.pdf})")


def _float_list(name: str, text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail_input(f"{name}: expected comma-separated numbers, got {text!r}")


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Sweep directory (runs/<point>/, sweep.json, report.pdf). Re-running resumes, with the "
                   "model folder and data file of CONFIG (which must be the ones the runs recorded).")
@click.option("--noise-multipliers", default=None, help="Comma-separated σ values (0 = non-private).")
@click.option("--target-epsilons", default=None, help="Comma-separated target ε values.")
@click.option("--set", "set_axes", multiple=True, metavar="PATH=V1,V2,...",
              help="Another axis: a dotted config path and its values, e.g. lora.rank=4,8,16 "
                   "(P1+P2=a1+a2,b1+b2 links paths). Repeatable; combines as a grid with the noise axis.")
@click.option("--no-audit", is_flag=True, help="Train and account only.")
@click.option("--attacks", default=None, help="Comma-separated attacks for the audits.")
@click.option("--reference-models", type=int, default=0, show_default=True,
              help="Reference models per audit for LiRA/RMIA.")
@click.option("--quiet", is_flag=True, help="No progress.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (sweep.json).")
def sweep(config_path: Path, out_dir: Path, noise_multipliers: str | None, target_epsilons: str | None,
          set_axes: tuple[str, ...], no_audit: bool, attacks: str | None, reference_models: int, quiet: bool,
          as_json: bool) -> None:
    """Train, account and audit a config at several privacy levels (and --set axes), then report."""
    from privaudit.sweep import load_sweep_spec, make_points, parse_set, run_sweep

    base, spec = load_sweep_spec(config_path)
    sigmas = _float_list("--noise-multipliers", noise_multipliers)
    targets = _float_list("--target-epsilons", target_epsilons)
    privacy = make_points(sigmas, targets) if (sigmas or targets) else []
    spec = spec.override(privacy, [parse_set(t) for t in set_axes])
    if not spec.privacy and not spec.axes:
        fail_input("sweep: give --noise-multipliers/--target-epsilons/--set or a sweep: block in the config")
    points = spec.points()
    names = None if attacks is None else [a.strip() for a in attacks.split(",")]
    say = None if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    res = run_sweep(base, points, out_dir, audit=not no_audit, attacks=names,
                    reference_models=reference_models, quiet=quiet or as_json, log=say)
    _print_sweep(res, as_json)


def _print_sweep(res: Any, as_json: bool) -> None:
    if as_json:
        emit_json({"out_dir": str(res.out_dir), "report": str(res.report) if res.report else None,
                   "points": list(res.points)})
        return
    rows: list[list[str]] = []
    for p in res.points:
        eps = (p.get("epsilon") or {}).get("pld")
        util = p.get("utility") or {}
        util_text = ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.3f}" for k, v in util.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool))
        lower = p.get("epsilon_lower")
        rows.append([p["name"], f"{p.get('noise_multiplier') or 0:.3g}",
                     _format_eps(eps if eps is not None else math.inf), util_text,
                     "-" if lower is None else f"{lower:.3f}", str(p.get("verdict", "-"))])
    print_table(f"sweep {res.out_dir}", ["point", "σ", "ε (pld)", "utility", "ε lower", "verdict"], rows)
    if res.report:
        click.echo(f"report: {res.report}")


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Study directory to write (study.json, figures, PDF).")
@click.option("--quiet", is_flag=True, help="No progress.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the study's summary).")
def study(config_path: Path, out_dir: Path, quiet: bool, as_json: bool) -> None:
    """Run a mechanism's study file (e.g. examples/privtune_study.yaml), dispatched on its mechanism."""
    from privaudit.studies import run_study_file

    say = None if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    res = run_study_file(config_path, out_dir, progress=say)
    summary = res.get("summary") if isinstance(res, dict) else getattr(res, "summary", None)
    if as_json:
        emit_json({"out_dir": str(out_dir), "summary": summary if isinstance(summary, dict) else None})
        return
    click.echo(f"study written to {out_dir}")
    if isinstance(summary, dict):
        click.echo(json.dumps(summary, indent=1, default=str))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def models_cmd(as_json: bool) -> None:
    """The bundled base models and whether each is ready to load offline (builds nothing)."""
    from privaudit.models import cache_dir, model_status

    rows = model_status()
    if as_json:
        emit_json({"cache_dir": str(cache_dir()), "models": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bundled models (any local causal LM / encoder path or cached HF id works too)")
    for col in ("model", "ready", "detail"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["ready"], row["detail"])
    Console().print(table)


@cli.command()
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("demo_out"),
              show_default=True, help="Output directory (re-running resumes).")
@click.option("--quick", is_flag=True, help="A smaller version (CI).")
@click.option("--quiet", is_flag=True, help="No progress.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seed", type=int, default=None,
              help="Seed the DP noise and sampling (reproducible runs, e.g. CI). Default: OS entropy, "
                   "as a real private run must use.")
@click.option("--lm/--no-lm", "with_lm", default=False, show_default=True,
              help="Also the language-model part (SmolLM2-135M, non-private vs ε = 8) into OUTPUT/lm "
                   "(`make demo` turns it on).")
def demo(out_dir: Path, quick: bool, quiet: bool, as_json: bool, seed: int | None, with_lm: bool) -> None:
    """The whole pipeline on bundled data: corpus, DP-LoRA sweep, audits, PDF report; then SmolLM2
    fine-tuned with and without DP and audited with causal-LM attacks."""
    from privaudit.demo import run_demo

    say = None if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    res = run_demo(out_dir, quick=quick, quiet=quiet or as_json, log=say, noise_seed=seed, lm=with_lm)
    _print_sweep(res, as_json)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Run the CLI with the project's exit-code and error-message contract."""
    try:
        with warnings.catch_warnings():  # numerical warnings are ours to handle, not the user's
            warnings.simplefilter("ignore", RuntimeWarning)
            cli.main(args=argv, prog_name="privaudit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except CheckFailed as exc:
        click.echo(f"check failed: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except (MemoryError, OverflowError, RecursionError) as exc:  # input beyond what can be computed
        click.echo(f"error: the input is too large to process ({type(exc).__name__}: "
                   f"{_one_line(str(exc))[:200]})", err=True)
        sys.exit(2)
    sys.exit(0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    main()
