"""Run directories: ``train`` writes one, ``load_run`` reads one (safetensors and JSON only).

A run directory holds

* ``manifest.json`` — config, mechanism, base model (and a local model folder's fingerprint,
  ``base_model_fingerprint``), library versions, data fingerprint, utility
  metrics, privacy section {noise_multiplier, sample_rate, steps, delta, epsilon: {rdp, pld, prv}},
  ledger head hash, status (``running`` / ``complete``) and any resumes;
* ``ledger.jsonl`` — the write-ahead privacy ledger (one event per update, appended *before* it);
* ``adapter.safetensors`` — the trained weights (trainable parameters and LoRA factors only);
* ``adapter_init.safetensors`` — the same parameters at initialisation, θ₀ (data-independent);
* ``audit_key.json`` — the auditor's secret: canary and record membership, gradient-canary key. Keep
  it apart from anything released;
* ``checkpoint/`` while training — weights, optimizer state and the *secret* sampling/noise RNG
  states; removed when the run completes.

Resuming (``train(..., resume=True)``) continues from the newest checkpoint. Events for steps after
that checkpoint (appended, maybe applied, then the crash) stay in the ledger and the redone steps
append their own: a resumed run may over-count by up to ``checkpoint_every`` steps per crash, never
under-count (fail-closed). The manifest lists each resume with the ledger's count at that moment.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pydantic import ValidationError

from privaudit.accounting.summary import epsilon_section
from privaudit.config import (
    DataSection,
    PrivacyPlan,
    RunConfig,
    claims_of,
    config_to_dict,
    parse_config,
    resolve_plan,
)
from privaudit.ledger.durable import write_atomic
from privaudit.ledger.events import (
    ClaimEvent,
    Event,
    GaussianEvent,
    Neighbouring,
    PlaintextEvent,
)
from privaudit.ledger.ledger import Ledger, LedgerCorruptError
from privaudit.mechanisms.distributed import init_world, world_from_env
from privaudit.safe_read import (
    check_run_file,
    read_json_file,
    walk_run_dir,
)

if TYPE_CHECKING:
    from privaudit.mechanisms.training import DataBundle

MANIFEST = "manifest.json"
LEDGER = "ledger.jsonl"
ADAPTER = "adapter.safetensors"
ADAPTER_INIT = "adapter_init.safetensors"
AUDIT_KEY = "audit_key.json"
CHECKPOINT_DIR = "checkpoint"
RUN_LOCK = ".train.lock"  # held by the one process writing the run directory; removed when it is done
REFUSED_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]

    @property
    def privacy(self) -> dict[str, Any]:
        return self.manifest["privacy"]

    def summary(self) -> dict[str, Any]:
        """One JSON-able summary (what ``privaudit train --json`` prints)."""
        return {"run_dir": str(self.run_dir), "status": self.manifest["status"],
                "mechanism": self.manifest["mechanism"], "metrics": self.metrics, "privacy": self.privacy,
                "ledger_head_hash": self.manifest["ledger_head_hash"],
                "ledger_seal": self.manifest.get("ledger_seal")}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("privaudit", "torch", "transformers", "peft", "numpy", "safetensors", "opacus",
                "dp-accounting", "prv-accountant"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False).encode("utf-8"))


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of a run directory: a regular file inside it, at most ``MAX_JSON_BYTES``."""
    return read_json_file(path, what, root=path.parent)


def _read_manifest(rd: Path) -> dict[str, Any]:
    """``manifest.json`` of ``rd``: a JSON object with a ``config`` object (else a ``ValueError``)."""
    manifest = _read_json(rd / MANIFEST, "manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest: {rd / MANIFEST} must hold a JSON object, not {type(manifest).__name__}")
    if not isinstance(manifest.get("config"), dict):
        raise ValueError(f"manifest.config: {rd / MANIFEST} holds no config object")
    for key, kind in (("data", dict), ("plan", dict), ("privacy", dict), ("metrics", dict), ("resumes", list)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise ValueError(f"manifest.{key}: must be a JSON {'object' if kind is dict else 'array'}")
    return manifest


def _lock_run_dir(rd: Path) -> int:
    """Take the run directory's exclusive lock (``RUN_LOCK``, flock) before anything is written; a
    :class:`LedgerLockedError` if another process holds it."""
    import fcntl

    from privaudit.ledger.ledger import LedgerLockedError

    path = rd / RUN_LOCK
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLockedError(f"run_dir: {rd} is being written by another process") from None
        try:  # the previous holder unlinks the file before unlocking: then lock the new one
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise LedgerLockedError(f"run_dir: {rd} is being written by another process")


def _unlock_run_dir(rd: Path, fd: int) -> None:
    """Remove the lock files (the run lock and the ledger's) and release the lock."""
    import fcntl

    for name in (LEDGER + ".lock", RUN_LOCK):
        (rd / name).unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _discard_unreleased(rd: Path, created: bool) -> None:
    """After a new run failed: if its ledger records no event (nothing was released), remove what the
    run wrote (the directory was empty before), so that a re-run starts cleanly. A ledger with events,
    or one that cannot be read, is kept: ``--resume`` continues from it."""
    import shutil

    ledger_path = rd / LEDGER
    if ledger_path.exists():
        try:
            if Ledger.read(ledger_path).events:
                return
        except Exception:  # damaged: keep it for inspection
            return
    for p in rd.iterdir():
        if p.name == RUN_LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if created:
        try:
            (rd / RUN_LOCK).unlink(missing_ok=True)
            rd.rmdir()
        except OSError:
            pass


def ledger_releases(ledger: Ledger) -> int:
    """Number of updates the ledger accounts for (Gaussian + plaintext release counts)."""
    return sum(e.count for e in ledger.events if isinstance(e, (GaussianEvent, PlaintextEvent)))


def noise_header(cfg: RunConfig) -> dict[str, Any]:
    """The ledger header's record of where the noise came from (see ``privaudit.mechanisms.rng``)."""
    from privaudit.mechanisms.rng import describe_noise_source

    return describe_noise_source(cfg.privacy.noise_seed, cfg.mechanism)


def _header_extra(mech: Any, cfg: RunConfig) -> dict[str, Any]:
    """The mechanism's extra ledger-header fields (hook ``ledger_header_extra``), or none."""
    hook = getattr(mech, "ledger_header_extra", None)
    return dict(hook(cfg)) if hook is not None else {}


def privacy_of(mech: Any, ledger: Ledger, plan: Any, cfg: RunConfig, metrics: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """The manifest's accounting: the mechanism's ``privacy_section`` hook where it has one, else
    :func:`epsilon_section` of the ledger at the plan's δ."""
    hook = getattr(mech, "privacy_section", None)
    if hook is None:
        return epsilon_section(ledger, plan.delta)
    return dict(hook(ledger, plan, cfg, metrics=metrics or {}))


def utility_of(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The headline utility of a run: held-out accuracy (classification, higher is better) or
    perplexity (causal LM, lower is better)."""
    heldout = metrics.get("heldout") or {}
    for name in ("accuracy", "perplexity"):
        if isinstance(heldout.get(name), (int, float)):
            return {"name": name, "value": float(heldout[name]), "split": "heldout"}
    return None


class _RichProgress:
    """A rich progress bar on stderr."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self._task = self._progress.add_task(description, total=None)
        self._progress.start()

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:
        self._progress.update(self._task, completed=step, total=total)

    def close(self) -> None:
        self._progress.stop()


def train(cfg: RunConfig | None, run_dir: str | Path, *, resume: bool = False,
          progress: bool | Callable[[int, int, dict[str, Any]], None] = True,
          signing_key: Any = None) -> RunResult:
    """Train ``cfg`` and write the run directory ``run_dir`` (see the module docstring).

    ``resume=True`` continues an interrupted run in ``run_dir`` (``cfg`` may then be None: the saved
    config is used, and its model name must be a bundled model or an HF id in the local cache, never
    a path: see :func:`privaudit.models.resolve_untrusted_model_name`, and its data synthetic: a data
    file is never taken from the manifest; if given it must equal the saved one, and a local model
    folder it names must still have the ``base_model_fingerprint`` the run recorded). ``progress``:
    True for a progress bar on stderr, False for none, or a callable ``(step, total, info)``.

    A finished run seals its ledger (event lines, releases, head hash), signed with ``signing_key``
    (an Ed25519 private key or PEM path, see ``privaudit keygen``) when given; the manifest keeps the
    seal (``ledger_seal``) and the head hash (``ledger_head_hash``). The seal covers the manifest's
    config, plan, data and model fingerprints, privacy and metrics sections, the audit key and the
    adapters (:func:`privaudit.ledger.seal.seal_covers`): every reader given the run directory detects an edit
    of them. A crashed run's ledger is unsealed
    and ``resume`` continues it; a sealed ledger is never reopened (``LedgerSealedError``).

    The directory's lock (``RUN_LOCK``) is taken before anything is written: a second process
    training into the same directory is refused (:class:`~privaudit.ledger.ledger.LedgerLockedError`)
    without touching it. Lock files are removed when the call returns. A new run that fails before
    its ledger records any event leaves no files behind (a re-run starts afresh); one that fails
    later is left for ``resume=True``.
    """
    rd = Path(run_dir)
    world = world_from_env()
    if world.distributed:  # torchrun: rank 0 writes the run directory, the other ranks only compute
        init_world(world)
        if not world.is_main:
            return _train_worker(world, rd)
    if rd.exists() and not rd.is_dir():
        raise ValueError(f"run_dir: {rd} exists and is not a directory")
    if resume and not (rd / MANIFEST).exists():
        raise ValueError(f"run_dir: {rd} holds no run to resume (no {MANIFEST})")
    if not resume and rd.exists() and any(p.name != RUN_LOCK for p in rd.iterdir()):
        raise ValueError(f"run_dir: {rd} exists and is not empty (use --resume to continue a run)")
    created = not rd.exists()
    try:
        rd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"run_dir: {rd} cannot be created ({exc.strerror})") from None
    fd = _lock_run_dir(rd)
    done = False
    try:
        result = _train_locked(cfg, rd, resume=resume, progress=progress, signing_key=signing_key)
        done = True
        return result
    finally:
        if not done and not resume:
            _discard_unreleased(rd, created)
        _unlock_run_dir(rd, fd)


def _train_locked(cfg: RunConfig | None, run_dir: str | Path, *, resume: bool,
                  progress: bool | Callable[[int, int, dict[str, Any]], None], signing_key: Any = None) -> RunResult:
    """:func:`train` once the run directory's lock is held."""
    from safetensors.torch import save_file

    from privaudit.ledger.seal import load_signing_key, seal_covers
    from privaudit.mechanisms import get_mechanism
    from privaudit.mechanisms.training import Checkpointer, prepare_data
    from privaudit.models import trainable_state_dict

    rd = Path(run_dir)
    world = world_from_env()
    manifest_path = rd / MANIFEST
    signing_key = load_signing_key(signing_key)  # a bad key fails before anything is written
    if resume:
        if not manifest_path.exists():
            raise ValueError(f"run_dir: {rd} holds no run to resume (no {MANIFEST})")
        _refuse_unsafe_files(rd)
        manifest = _read_manifest(rd)
        if manifest.get("status") == "complete":
            raise ValueError(f"run_dir: the run in {rd} is already complete")
        saved = parse_config(manifest["config"])
        if cfg is not None and config_to_dict(cfg) != config_to_dict(saved):
            raise ValueError(f"config: differs from the config of the interrupted run in {rd}")
        if cfg is not None:  # the user's model folder must still be the one the run started with
            check_model_folder(cfg.model.name, manifest.get("base_model_fingerprint"), "model.name")
        if cfg is None:  # the model comes from the manifest: bundled or HF cache only, never a path
            from privaudit.models import resolve_untrusted_model_name

            resolve_untrusted_model_name(saved.model.name, "manifest.config.model.name")
            if saved.data.source != "synthetic":  # nor does it choose which data file is opened
                raise ValueError(f"manifest.config.data.path: the run reads {saved.data.source} data from a file; a "
                                 "data path is never taken from a run directory (resume with your own config: "
                                 "privaudit train CONFIG -o RUN_DIR --resume)")
        cfg = saved
    else:
        if cfg is None:
            raise ValueError("config: required for a new run")
        if rd.exists() and (not rd.is_dir() or any(p.name != RUN_LOCK for p in rd.iterdir())):
            raise ValueError(f"run_dir: {rd} exists and is not empty (use --resume to continue a run)")
        manifest = {}

    if world.distributed:
        _share_config(world, cfg)
    mech = get_mechanism(cfg.mechanism)
    if resume and getattr(mech, "RESUMABLE", True) is False:
        raise ValueError(f"resume: {cfg.mechanism} runs cannot be resumed (their state is not checkpointed); "
                         "start a new run in an empty directory")
    data = prepare_data(cfg)
    plan_fn = getattr(mech, "resolve_plan", None)  # a mechanism may resolve its own plan (dp_fedlora)
    plan = plan_fn(cfg, data.train) if plan_fn is not None else resolve_plan(cfg, len(data.train))
    if resume:
        if manifest.get("data", {}).get("train_fingerprint") != data.fingerprint:
            raise ValueError("data: the training set differs from the interrupted run's (fingerprint mismatch)")
        if manifest.get("plan") != plan.to_json():
            raise ValueError("privacy: the resolved plan differs from the interrupted run's")
        ledger = Ledger.open(rd / LEDGER, writable=True)
    else:
        rd.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": 1,
            "status": "running",
            "created": datetime.now(timezone.utc).isoformat(),
            "mechanism": cfg.mechanism,
            "task": cfg.task,
            "base_model": cfg.model.name,
            "observer": mech.OBSERVER,
            "config": config_to_dict(cfg),
            "base_model_fingerprint": _model_folder_fingerprint(cfg.model.name),
            "plan": plan.to_json(),
            "data": {"source": cfg.data.source, "train_size": len(data.train), "heldout_size": len(data.heldout),
                     "train_fingerprint": data.fingerprint, "corpus_fingerprint": data.corpus.fingerprint(),
                     "label_names": list(data.label_names)},
            "versions": library_versions(),
            "resumes": [],
        }
        _write_json_atomic(manifest_path, manifest)
        header_extra = _header_extra(mech, cfg)  # may set the privacy unit (e.g. client level)
        ledger = Ledger.create(rd / LEDGER, mechanism=cfg.mechanism, base_model=cfg.model.name,
                               dataset_fingerprint=data.fingerprint, dataset_size=len(data.train),
                               privacy_unit=header_extra.pop("privacy_unit", cfg.privacy.privacy_unit),
                               neighbouring=cfg.privacy.neighbouring,
                               target_delta=cfg.privacy.delta, observer=mech.OBSERVER, claims=claims_of(cfg),
                               **noise_header(cfg), **header_extra)
    bar: _RichProgress | None = None
    callback: Callable[[int, int, dict[str, Any]], None] | None
    if progress is True:
        bar = _RichProgress(f"{cfg.mechanism} ({cfg.task})")
        callback = bar
    else:
        callback = progress or None
    try:
        checkpointer = Checkpointer(rd / CHECKPOINT_DIR, cfg.training.checkpoint_every)
        resuming = resume and checkpointer.latest() is not None
        if resume:
            manifest.setdefault("resumes", []).append({
                "at": datetime.now(timezone.utc).isoformat(),
                "from_step": checkpointer.latest().step if resuming else 0,  # type: ignore[union-attr]
                "ledger_releases_before": ledger_releases(ledger),
            })
            _write_json_atomic(manifest_path, manifest)
        result = mech.fit(cfg, data.train, data.heldout, ledger=ledger, progress=callback,
                          num_labels=len(data.label_names), plan=plan, checkpointer=checkpointer,
                          resume=resuming)
        released = getattr(result, "released_state", None)  # a mechanism may keep secret factors out
        save_file(released if released is not None else trainable_state_dict(result.model, include_lora=True),
                  str(rd / ADAPTER))
        save_file({k: v.contiguous() for k, v in result.theta_0.items()}, str(rd / ADAPTER_INIT))
        if released is None:  # the same adapter in PEFT's format (PeftModel.from_pretrained, external audits)
            from privaudit.peft_export import PEFT_DIR, peft_export_refusal, write_peft_adapter

            if not write_peft_adapter(result.model, rd / PEFT_DIR, base_model=cfg.model.name):
                manifest["peft_export"] = f"not written: {peft_export_refusal(result.model)}"
        for fname, content in (getattr(result, "run_files", None) or {}).items():  # e.g. the server's view
            if fname.endswith(".safetensors"):
                save_file({k: v.contiguous() for k, v in content.items()}, str(rd / fname))
            else:
                _write_json_atomic(rd / fname, content)
        key = data.audit_key()
        key["run_id"] = ledger.header.run_id
        key["gradient_canaries"] = None if result.gradient_canaries is None else result.gradient_canaries.to_json()
        key.update(getattr(result, "audit_key_extra", None) or {})  # mechanism secrets for the auditor
        _write_json_atomic(rd / AUDIT_KEY, key)
        manifest["metrics"] = {**result.metrics, "utility": utility_of(result.metrics)}
        manifest["privacy"] = {
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "sampling": plan.sampling, "batch_size": plan.batch_size, "clip_norm": plan.clip_norm,
            "delta": plan.delta, "neighbouring": plan.neighbouring, "privacy_unit": cfg.privacy.privacy_unit,
            "target_epsilon": cfg.privacy.target_epsilon, "ledger_releases": ledger_releases(ledger),
            **privacy_of(mech, ledger, plan, cfg, result.metrics),
        }
        # the seal covers the manifest's final fields, the audit key and adapters (written above); what follows the
        # seal (ledger_seal, ledger_head_hash, run_id, status, finished) is not covered
        manifest["ledger_seal"] = ledger.seal(signing_key, covers=seal_covers(manifest, rd))
        manifest["ledger_head_hash"] = ledger.head_hash
        manifest["run_id"] = ledger.header.run_id
        manifest["status"] = "complete"
        manifest["finished"] = datetime.now(timezone.utc).isoformat()
        _write_json_atomic(manifest_path, manifest)
        checkpointer.clear()
    finally:
        ledger.close()
        if bar is not None:
            bar.close()
    return RunResult(rd, manifest)


DISTRIBUTED_MECHANISMS = ("dp_lora",)


def _share_config(world: Any, cfg: RunConfig) -> None:
    """Rank 0: send the run's config (or the reason it cannot run across processes) to the other ranks."""
    from privaudit.mechanisms.distributed import broadcast_object

    if cfg.mechanism not in DISTRIBUTED_MECHANISMS:
        msg = (f"mechanism: {cfg.mechanism} runs in one process only (across processes: "
               f"{', '.join(DISTRIBUTED_MECHANISMS)}); federated runs scale out with options.backend: flower")
        broadcast_object(world, {"error": msg})
        raise ValueError(msg)
    broadcast_object(world, {"config": config_to_dict(cfg)})


def _train_worker(world: Any, rd: Path) -> RunResult:
    """A rank other than 0: the config from rank 0, the same data and plan, the steps' computation; it
    writes nothing (rank 0 holds the ledger, checkpoints and the run directory)."""
    from privaudit.mechanisms import get_mechanism
    from privaudit.mechanisms.distributed import broadcast_object
    from privaudit.mechanisms.training import prepare_data

    msg = broadcast_object(world, None)
    if "error" in msg:
        raise ValueError(msg["error"])
    cfg = parse_config(msg["config"])
    mech = get_mechanism(cfg.mechanism)
    data = prepare_data(cfg)
    plan = resolve_plan(cfg, len(data.train))
    mech.fit(cfg, data.train, data.heldout, ledger=None, progress=None, num_labels=len(data.label_names),
             plan=plan, checkpointer=None, resume=False)
    return RunResult(rd, {"status": "worker", "rank": world.rank})


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A run directory read back: the ledger is read-only; ``model`` has the adapter loaded (eval
    mode); ``theta_0`` are the initial trainable parameters; ``audit_key`` is None if absent."""

    run_dir: Path
    manifest: dict[str, Any]
    config: RunConfig
    ledger: Ledger
    model: Any
    tokenizer: Any
    audit_key: dict[str, Any] | None
    theta_0: dict[str, Any] | None
    #: The run's data from the file the caller gave (``load_run(data_path=...)``), already checked
    #: against the recorded fingerprints; None for synthetic data (regenerated from the config).
    data: "DataBundle | None" = None


def _refuse_unsafe_files(rd: Path) -> None:
    """Refuse pickle-based files, symlinks out of ``rd`` and anything that is neither a regular file nor
    a folder (devices, FIFOs): nothing of the kind is ever opened."""
    for p in walk_run_dir(rd):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            check_run_file(p, rd, "run_dir")
        if p.suffix.lower() in REFUSED_SUFFIXES:
            raise ValueError(
                f"run_dir: {rd} contains {p.relative_to(rd)}: pickle-based files ({', '.join(REFUSED_SUFFIXES)}) "
                "are refused; privaudit reads safetensors and JSON only"
            )


#: Most gradient canaries an audit key may list (the auditor scores each one).
MAX_GRADIENT_CANARIES = 1_000_000


def _check_audit_key(key: Any) -> None:
    """Shape and size checks of ``audit_key.json`` before the auditor uses it (``ValueError`` naming
    the field): an object; gradient canaries with a count ≤ ``MAX_GRADIENT_CANARIES`` that matches
    their ``included`` list."""
    if not isinstance(key, dict):
        raise ValueError(f"audit_key: must be a JSON object, not {type(key).__name__}")
    gc = key.get("gradient_canaries")
    if gc is not None:
        if not isinstance(gc, dict):
            raise ValueError("audit_key.gradient_canaries: must be an object or null")
        count, included = gc.get("count"), gc.get("included")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_GRADIENT_CANARIES:
            raise ValueError(f"audit_key.gradient_canaries.count: must be an integer in "
                             f"[0, {MAX_GRADIENT_CANARIES}], got {count!r}")
        if not isinstance(included, list) or len(included) != count:
            raise ValueError("audit_key.gradient_canaries.included: must list one flag per canary")
    for name in ("records", "canaries"):
        if key.get(name) is not None and not isinstance(key[name], (dict, list)):
            raise ValueError(f"audit_key.{name}: malformed")


def load_run(run_dir: str | Path, *, device: str | None = None, public_key: Any = None,
             model_path: str | Path | None = None, data_path: str | Path | None = None) -> LoadedRun:
    """Read a run directory (safetensors and JSON only; nothing in it is executed). A directory holding
    ``*.pkl``/``*.pickle``/``*.bin``/``*.pt``/``*.pth`` files is refused with a ``ValueError``, and so
    is a file of it that is not a regular file or is a symlink out of the directory.

    The ledger must verify against the manifest (sealed, same head hash and seal) and, with
    ``public_key`` (Ed25519 key or PEM path), carry a seal signed by its private key: otherwise
    ``LedgerCorruptError`` naming the first bad line or the disagreement.

    Everything the manifest says is untrusted: the base model it names must be a bundled model or an
    HF id in the local cache (:func:`privaudit.models.resolve_untrusted_model_name`); a model folder
    is used only when the caller passes it as ``model_path`` (it then replaces the manifest's name,
    and must have the ``base_model_fingerprint`` the run recorded, if any). ``trust_remote_code`` is
    refused wherever it appears. Likewise the data: synthetic data is regenerated from the config's
    (bounded) values; a run trained on a file (``data.source`` jsonl, csv or hf) needs the caller's
    ``data_path`` — the path in the manifest is never opened — and that
    file must give the training set and corpus whose fingerprints the run recorded (the ledger
    header's ``dataset_fingerprint``, the manifest's ``data.train_fingerprint`` and
    ``data.corpus_fingerprint``; at least one must be recorded). The data so read is ``LoadedRun.data``."""
    from safetensors.torch import load_file

    from privaudit.mechanisms.training import build_model
    from privaudit.models import load_trainable_state_dict, resolve_device

    rd = Path(run_dir)
    if not rd.is_dir():
        raise ValueError(f"run_dir: {rd} is not a directory")
    _refuse_unsafe_files(rd)
    manifest = _read_manifest(rd)
    if manifest.get("status") != "complete":
        raise ValueError(f"run_dir: the run in {rd} is not complete (status {manifest.get('status')!r})")
    for name in (LEDGER, ADAPTER, ADAPTER_INIT, AUDIT_KEY):
        check_run_file(rd / name, rd, f"run_dir: {name}")
    # the ledger first: its seal covers the manifest's config and the audit key, so an edited config is
    # refused as tampered before anything it names is resolved
    ledger = Ledger.read(rd / LEDGER, public_key=public_key, manifest=manifest)
    if ledger.status != "intact":  # pragma: no cover - a complete manifest already demands the seal
        raise LedgerCorruptError(f"ledger {rd / LEDGER}: {ledger.status}")
    cfg = parse_config(manifest["config"])
    cfg = _with_user_data_path(cfg, data_path)  # before anything is read: a missing path is refused now
    if model_path is not None:  # the user's own choice of model folder, the one the run recorded
        if not Path(model_path).is_dir():
            raise ValueError(f"model_path: {model_path} is not a directory")
        check_model_folder(model_path, manifest.get("base_model_fingerprint"), "model_path")
        location = str(Path(model_path).resolve())
    else:
        from privaudit.models import resolve_untrusted_model_name

        location = resolve_untrusted_model_name(cfg.model.name, "manifest.config.model.name")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": location})})
    adapter_path = rd / ADAPTER
    if not adapter_path.exists():
        raise ValueError(f"run_dir: {rd} has no {ADAPTER}")
    key_path = rd / AUDIT_KEY  # checked before anything expensive is built
    audit_key = _read_json(key_path, "audit_key") if key_path.exists() else None
    if audit_key is not None:
        _check_audit_key(audit_key)
    data_section = manifest.get("data")
    labels = data_section.get("label_names") if isinstance(data_section, dict) else None
    num_labels = max(2, len(labels) if isinstance(labels, list) else 0)
    if num_labels > 100_000:  # the classification head is built with one row per label
        raise ValueError(f"manifest.data.label_names: {num_labels} labels, more than the limit of 100000")
    data = None
    if data_path is not None:  # the user's file, checked before the model is built
        from privaudit.mechanisms.training import prepare_data

        try:
            data = prepare_data(cfg)
        except ValueError as exc:
            raise ValueError(f"data_path: {str(exc).removeprefix('data.path: ')}") from None
        check_data_fingerprints(data, manifest, ledger.header.dataset_fingerprint, f"data_path {data_path}")
    from privaudit.mechanisms import get_mechanism

    loader = getattr(get_mechanism(cfg.mechanism), "load_released_model", None)  # e.g. a side network
    if loader is not None:
        model, tok = loader(cfg, num_labels, resolve_device(device or cfg.model.device), load_file(str(adapter_path)))
    else:
        model, tok = build_model(cfg, num_labels, resolve_device(device or cfg.model.device))
        load_trainable_state_dict(model, load_file(str(adapter_path)))
    model.eval()
    init_path = rd / ADAPTER_INIT
    theta_0 = load_file(str(init_path)) if init_path.exists() else None
    return LoadedRun(rd, manifest, cfg, ledger, model, tok, audit_key, theta_0, data)


def _model_folder_fingerprint(name: str) -> str | None:
    """The fingerprint of the base model when ``name`` is a local folder (``manifest.base_model_fingerprint``,
    :func:`privaudit.models.model_folder_fingerprint`); None for a bundled model or an HF id."""
    from privaudit.models import is_model_path, model_folder_fingerprint

    return model_folder_fingerprint(name) if is_model_path(name) and Path(name).is_dir() else None


def check_model_folder(folder: str | Path, recorded: Any, field: str) -> None:
    """``ValueError`` naming ``field`` unless the model folder the user gives has the fingerprint the
    run recorded (``manifest.base_model_fingerprint``; runs written before it was recorded, and runs on
    a bundled model or HF id, have none: then nothing is compared)."""
    if recorded is None or not Path(folder).is_dir():
        return
    from privaudit.models import model_folder_fingerprint

    got = model_folder_fingerprint(folder)
    if got != recorded:
        raise ValueError(f"{field}: the model folder {str(folder)!r} is not the run's base model: its fingerprint "
                         f"{got[:16]}… differs from manifest.base_model_fingerprint {str(recorded)[:16]}…")


def _with_user_data_path(cfg: RunConfig, data_path: str | Path | None) -> RunConfig:
    """``cfg`` (parsed from a manifest) with its data file replaced by the caller's ``data_path``.
    Synthetic data needs none (a ``data_path`` is then a ``ValueError``); data from a file needs one:
    the manifest's ``data.path`` is never used, nor even checked for existence."""
    if cfg.data.source == "synthetic":
        if data_path is not None:
            raise ValueError("data_path: the run's data is synthetic (regenerated from its config); "
                             "give no data file")
        return cfg
    if data_path is None:
        raise ValueError(f"manifest.config.data.path: the run was trained on a {cfg.data.source} data file; a "
                         "data path is never taken from a run directory: pass the file yourself "
                         "(privaudit audit RUN_DIR --data-path FILE, or data_path=)")
    p = Path(data_path)
    if not p.exists():
        raise ValueError(f"data_path: {str(p)!r} does not exist")
    fields = {**cfg.data.model_dump(), "path": str(p.resolve())}
    try:
        section = DataSection.model_validate(fields)
    except ValidationError as exc:  # e.g. the file's suffix does not fit the run's source
        msg = str(exc.errors()[0].get("msg", "invalid"))
        raise ValueError(f"data_path: {msg.removeprefix('Value error, ').removeprefix('path: ')}") from None
    return cfg.model_copy(update={"data": section})


def check_data_fingerprints(data: "DataBundle", manifest: Mapping[str, Any], header_fingerprint: str | None,
                            what: str) -> None:
    """``ValueError`` unless ``data`` is the data the run recorded: its training-set fingerprint equals
    the ledger header's ``dataset_fingerprint`` and the manifest's ``data.train_fingerprint``, and its
    corpus fingerprint the manifest's ``data.corpus_fingerprint`` (each where recorded; a run that
    records none of them cannot be checked and is refused). ``what`` names the data's origin."""
    section = manifest.get("data")
    section = section if isinstance(section, Mapping) else {}
    train_fp, corpus_fp = data.fingerprint, data.corpus.fingerprint()
    recorded = [("ledger.header.dataset_fingerprint", header_fingerprint, train_fp, "training-set"),
                ("manifest.data.train_fingerprint", section.get("train_fingerprint"), train_fp, "training-set"),
                ("manifest.data.corpus_fingerprint", section.get("corpus_fingerprint"), corpus_fp, "corpus")]
    present = [r for r in recorded if r[1] is not None]
    if not present:
        raise ValueError(f"manifest.data.train_fingerprint: the run records no data fingerprint, so {what} "
                         "cannot be checked against the data it was trained on")
    for field, want, got, kind in present:
        if want != got:
            raise ValueError(f"{field}: {what} is not the run's data: its {kind} fingerprint {got[:16]}… differs "
                             f"from the recorded {str(want)[:16]}…")


@dataclass(frozen=True)
class PlannedEvents:
    """The events a finished run of a config will have in its ledger (same ε by construction)."""

    events: list[Event]
    neighbouring: Neighbouring
    delta: float
    claims: list[ClaimEvent]
    plan: PrivacyPlan | None = None

def planned_events(cfg: RunConfig) -> PlannedEvents:
    """Load the config's data (for N), resolve σ/q/steps, and list the events the run will append."""
    from privaudit.mechanisms import get_mechanism
    from privaudit.mechanisms.training import prepare_data

    data = prepare_data(cfg)
    mech = get_mechanism(cfg.mechanism)
    plan_fn = getattr(mech, "resolve_plan", None)  # a mechanism may resolve its own plan (dp_fedlora)
    plan = plan_fn(cfg, data.train) if plan_fn is not None else resolve_plan(cfg, len(data.train))
    events = mech.planned_events(cfg, plan)
    claims = claims_of(cfg) + [e for e in events if isinstance(e, ClaimEvent)]  # claims a mechanism records
    return PlannedEvents([e for e in events if not isinstance(e, ClaimEvent)], cfg.privacy.neighbouring,
                         cfg.privacy.delta, claims, plan)
