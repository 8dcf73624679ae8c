"""Audit any checkpoint: a Hugging Face model, or a PEFT LoRA adapter on its base, against member and
non-member texts that the user supplies (:func:`audit_model`; CLI ``privaudit audit --model ...``).

What is attacked: the released model (black box: per-token log-probabilities), record level, the
records as given. Attacks (:mod:`privaudit.attacks.llm_scores`): for causal LMs ``loss``, ``zlib``,
``lowercase``, ``min_k``, ``min_k_pp`` and ``ref`` (reference-model calibration; the base model of an
adapter is the default reference); for sequence classifiers ``loss``, ``confidence``, ``entropy``,
``modified_entropy``. Each reports AUC with a bootstrap interval, TPR at 0.1% and 1% FPR and its ROC.
With a canary file (JSON Lines with ``prefix``, ``secret``, ``included`` and optionally ``suffix`` and
``format``): ``canary_membership``, ``canary_exposure`` (Secret Sharer, when the format is known) and
``canary_extraction`` (greedy and top-k sampled continuations of the prefix; exact-secret rate).

Statistics (fail-closed):

* An ε lower bound (the one-run audit of Steinke, Nasr, Jagielski 2023) needs every scored unit to be
  included independently with probability ½. That holds for canaries whose ``included`` flags were
  drawn by fair coins (the canary file asserts it) and for the member/non-member records only when the
  user asserts it (``members_by_coin_flip=True``). A split chosen any other way (a held-out set from a
  different time or source, a dataset's own split) supports no bound: an attack may separate the two
  sides by their distribution alone, so its success is reported as a measurement and the verdict is
  ``inconclusive`` with that reason.
* Score functions are fixed in advance (no threshold or attack parameter is fitted on the audited
  data); the one-run bound tests a grid of guess counts fixed before the labels are seen, Bonferroni-
  corrected, and the maximum over attacks and δ values is Bonferroni-corrected too, as in
  :func:`privaudit.audit.auditor.audit_run`.
* With coin-flip membership, ``max_records`` subsamples the union uniformly (so inclusion stays a fair
  coin per scored record); otherwise each side is subsampled separately.

Loading (:func:`load_model`): safetensors and JSON only — a model or adapter directory whose weights
exist only as pickle (``.bin``/``.pt``/``.pth``/``.pkl``/``.ckpt``) is refused naming the file; a name
resolves from a local path or the local HF cache (never a download); ``trust_remote_code`` is never
set; CUDA when present, CPU otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privaudit.audit.auditor import AUDIT_FILE, AuditResult, _accounted, _verdict, score_attacks
from privaudit.attacks.interface import AttackScores
from privaudit.attacks.released_model import _derived_seed

__all__ = [
    "MANIFEST_FILE",
    "PICKLE_SUFFIXES",
    "Canary",
    "LoadedModel",
    "audit_model",
    "load_model",
    "read_canaries",
    "read_texts",
]

MANIFEST_FILE = "manifest.json"
LEDGER_FILE = "ledger.jsonl"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SAMPLES_PER_CANARY = 8
_NO_BOUND_REASON = (
    "membership of the audited records was not decided by independent fair coins (a member/non-member "
    "split chosen by the user), so no ε lower bound follows: the two sides may differ in distribution and "
    "an attack can separate them without any leakage; the attack metrics are measurements only (use "
    "--canaries with coin-flip inclusion, or --members-by-coin-flip if each record was included by a fair coin)"
)


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedModel:
    """A model ready to score: ``task`` is ``causal_lm`` or ``classification``; ``info`` describes what
    was loaded (for the manifest); ``has_adapter``: a PEFT adapter is active (its base = ``reference
    'base'``)."""

    model: Any
    tokenizer: Any
    task: str
    info: dict[str, Any] = field(default_factory=dict)
    has_adapter: bool = False


def _sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        done = 0
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
            if limit is not None and done >= limit:
                break
    return h.hexdigest()


def _check_weights(directory: Path, what: str, stem: str | None = None) -> list[Path]:
    """The safetensors weights in ``directory``; pickle-only weights are refused naming the file."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    st = [p for p in files if p.suffix == ".safetensors" and (stem is None or p.name.startswith(stem))]
    if not st:
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(f"{what}: {pickles[0]} is a pickle-based checkpoint; privaudit reads safetensors and "
                             "JSON only (convert it with safetensors first)")
        raise ValueError(f"{what}: no {stem or '*'}*.safetensors weights in {directory}")
    return st


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: {path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: {path} is not a JSON object")
    return obj


def _resolve(name_or_path: str | os.PathLike[str], what: str) -> Path:
    """A local directory, or the local HF cache's snapshot of a hub id (never a download)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{what}: {p} is a file; give the model's directory")
    name = str(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, invalid repo id, ...
        raise ValueError(f"{what}: {name!r} is neither a local directory nor in the local Hugging Face cache "
                         f"(privaudit never downloads; {type(exc).__name__})") from None


def _device(device: str | None) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _task_of(config: Any, task: str | None) -> str:
    if task is not None:
        if task not in ("causal_lm", "classification"):
            raise ValueError(f"task: must be 'causal_lm' or 'classification', got {task!r}")
        return task
    archs = list(getattr(config, "architectures", None) or [])
    return "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def _load_base(location: Path, name: str, task: str | None, device: Any) -> tuple[Any, str, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from privaudit.models import _quiet_transformers

    if not (location / "config.json").is_file():
        raise ValueError(f"model: {location} has no config.json")
    weights = _check_weights(location, "model")
    try:
        config = AutoConfig.from_pretrained(str(location), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model: config of {name!r} cannot be read without remote code "
                         f"({' '.join(str(exc).split())[:160]})") from None
    task = _task_of(config, task)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(str(location), local_files_only=True, trust_remote_code=False,
                                        use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"model: {name!r} cannot be loaded as {cls.__name__} "
                         f"({' '.join(str(exc).split())[:160]})") from None
    info = {
        "name": name, "path": str(location), "task": task, "architecture": type(model).__name__,
        "config_sha256": _sha256_file(location / "config.json"),
        "weights": [{"file": w.name, "bytes": w.stat().st_size} for w in weights],
    }
    return model.to(device).eval(), task, info


def _load_tokenizer(locations: Sequence[Path], name: str, task: str) -> Any:
    from transformers import AutoTokenizer

    last: Exception | None = None
    for loc in locations:
        if not any((loc / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                  "tokenizer.model", "vocab.json")):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(loc), local_files_only=True, trust_remote_code=False)
            break
        except (OSError, ValueError, KeyError) as exc:
            last = exc
    else:
        why = f" ({type(last).__name__})" if last is not None else ""
        raise ValueError(f"tokenizer: no readable tokenizer for {name!r} in {', '.join(map(str, locations))}{why}")
    return _with_pad(tok, task, name)


def _with_pad(tok: Any, task: str, name: str) -> Any:
    """Classifiers need a pad token (batched inputs); without one the eos token is used, else refused.
    Causal LMs are padded by the scoring pass itself (no pad token needed)."""
    if task == "classification" and getattr(tok, "pad_token", None) is None:
        if getattr(tok, "eos_token", None) is None:
            raise ValueError(f"tokenizer: the tokenizer of {name!r} has neither a pad nor an eos token; "
                             "a classifier cannot be scored in batches")
        tok.pad_token = tok.eos_token
    return tok


def _check_adapter_dir(adapter: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], Path]:
    d = Path(adapter).expanduser()
    if not d.is_dir():
        raise ValueError(f"adapter: {d} is not a directory")
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise ValueError(f"adapter: {d} has no adapter_config.json")
    cfg = _read_json_object(cfg_path, "adapter")
    weights = _check_weights(d, "adapter", "adapter_model")
    return d, cfg, weights[0]


def _attach_adapter(model: Any, adapter_dir: Path, weights: Path, base_name: str) -> Any:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            file_shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:
        raise ValueError(f"adapter: {weights} is not valid safetensors ({type(exc).__name__})") from None
    mismatch = f"adapter: {adapter_dir} does not fit the base model {base_name!r}"
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False, local_files_only=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"{mismatch} ({' '.join(str(exc).split())[:160]})") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    unknown = [k for k in file_shapes if k not in expected]
    wrong = [k for k in file_shapes if k in expected and expected[k] != file_shapes[k]]
    if unknown or wrong:
        k = (unknown or wrong)[0]
        raise ValueError(f"{mismatch} ({len(unknown)} tensors name no module of the base, {len(wrong)} have "
                         f"other shapes; first: {k})")
    return peft_model.eval()


def load_model(name_or_path: str | os.PathLike[str] | None, *, adapter: str | os.PathLike[str] | None = None,
               task: str | None = None, device: str | None = None) -> LoadedModel:
    """Load a base model (and optionally a PEFT LoRA adapter on it) for scoring; see the module docstring.

    ``name_or_path``: a local directory or an HF id in the local cache; None (or a directory holding
    ``adapter_config.json``) takes the base named by the adapter's ``base_model_name_or_path``.
    ``task``: ``causal_lm`` / ``classification`` (default: from the config's architectures).
    Every problem is a ``ValueError`` naming ``model``, ``adapter`` or ``tokenizer``.
    """
    if name_or_path is not None and adapter is None and (Path(name_or_path) / "adapter_config.json").is_file():
        adapter, name_or_path = name_or_path, None
    adapter_info: dict[str, Any] | None = None
    adapter_dir = adapter_weights = None
    if adapter is not None:
        adapter_dir, acfg, adapter_weights = _check_adapter_dir(adapter)
        base_from_cfg = acfg.get("base_model_name_or_path")
        if name_or_path is None:
            if not isinstance(base_from_cfg, str) or not base_from_cfg:
                raise ValueError(f"adapter: {adapter_dir}/adapter_config.json names no base model; pass --model")
            name_or_path = base_from_cfg
        adapter_info = {
            "path": str(adapter_dir), "weights": adapter_weights.name,
            "sha256": _sha256_file(adapter_weights), "peft_type": acfg.get("peft_type"),
            "base_model_name_or_path": base_from_cfg, "r": acfg.get("r"), "lora_alpha": acfg.get("lora_alpha"),
            "target_modules": acfg.get("target_modules"),
        }
    if name_or_path is None:
        raise ValueError("model: give a model name or path (or an adapter whose config names its base)")
    name = str(name_or_path)
    location = _resolve(name_or_path, "model")
    dev = _device(device)
    model, task, info = _load_base(location, name, task, dev)
    tok_locations = ([adapter_dir] if adapter_dir is not None else []) + [location]
    tokenizer = _load_tokenizer(tok_locations, name, task)
    if task == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter_dir is not None and adapter_weights is not None:
        model = _attach_adapter(model, adapter_dir, adapter_weights, name)
        info["adapter"] = adapter_info
    info["device"] = str(dev)
    return LoadedModel(model, tokenizer, task, info, has_adapter=adapter_dir is not None)


# --------------------------------------------------------------------------------------------------
# data


def _texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def read_texts(path: str | os.PathLike[str], what: str, text_column: str = "text",
               label_column: str | None = None) -> tuple[list[str], list[str] | None, dict[str, Any]]:
    """(texts, raw labels as strings or None, description) from a ``.jsonl``/``.csv`` file or a saved
    HF dataset directory (:func:`privaudit.data.loaders.load_records_with_labels`); problems are a
    ``ValueError`` starting with ``what``."""
    from privaudit.data.loaders import load_records_with_labels

    p = Path(path)
    try:
        records, names = load_records_with_labels(p, text_column=text_column, label_column=label_column,
                                                  id_column="\x00no-id")
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {p} is not readable ({type(exc).__name__})") from None
    texts = [r.text for r in records]
    if not any(t.strip() for t in texts):
        raise ValueError(f"{what}: {p} holds only empty texts")
    labels = None if label_column is None else [names[r.label] for r in records]
    desc = {"file": str(p), "records": len(texts), "texts_sha256": _texts_fingerprint(texts)}
    if p.is_file():
        desc["file_sha256"] = _sha256_file(p)
    return texts, labels, desc


@dataclass(frozen=True)
class Canary:
    """A canary: ``prefix + secret + suffix`` was inserted in the training data iff ``included``
    (decided by a fair coin, as the canary file asserts). ``format``: the secret's shape (e.g.
    ``pin``, ``ssn``, ``phone`` or a pattern with ``#`` digits) for exposure; None when unknown."""

    prefix: str
    secret: str
    included: bool
    suffix: str = ""
    format: str | None = None

    @property
    def text(self) -> str:
        return f"{self.prefix}{self.secret}{self.suffix}"


def read_canaries(path: str | os.PathLike[str]) -> list[Canary]:
    """Canaries from a JSON Lines file (``prefix``, ``secret``, ``included``; optional ``suffix``,
    ``format``). ``ValueError`` naming ``canaries`` and the line on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"canaries: {p} does not exist or is not a file")
    out: list[Canary] = []
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"canaries: {p} is not readable ({type(exc).__name__})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"canaries: {p} line {n} is not valid JSON") from None
        if not isinstance(row, dict):
            raise ValueError(f"canaries: {p} line {n} is not a JSON object")
        for key in ("prefix", "secret"):
            if not isinstance(row.get(key), str) or (key == "secret" and not row[key]):
                raise ValueError(f"canaries: {p} line {n}: '{key}' must be a{' non-empty' if key == 'secret' else ''} "
                                 "string")
        if not isinstance(row.get("included"), bool):
            raise ValueError(f"canaries: {p} line {n}: 'included' must be true or false")
        fmt = row.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise ValueError(f"canaries: {p} line {n}: 'format' must be a string")
        suffix = row.get("suffix", "")
        if not isinstance(suffix, str):
            raise ValueError(f"canaries: {p} line {n}: 'suffix' must be a string")
        out.append(Canary(row["prefix"], row["secret"], row["included"], suffix, fmt))
    if len(out) < 2:
        raise ValueError(f"canaries: {p} holds {len(out)} canaries; need at least 2")
    if all(c.included for c in out) or not any(c.included for c in out):
        raise ValueError(f"canaries: {p}: every canary has included = {out[0].included}; a fair-coin audit needs both")
    return out


def _as_texts(x: Any, what: str, text_column: str, label_column: str | None
              ) -> tuple[list[str], list[str] | None, dict[str, Any]]:
    """Texts (and raw labels) from a path, a sequence of strings, or a ``datasets.Dataset``."""
    if isinstance(x, (str, os.PathLike)) and (Path(x).exists() or Path(x).suffix):
        return read_texts(x, what, text_column, label_column)
    if hasattr(x, "column_names") and hasattr(x, "__getitem__"):  # a datasets.Dataset
        cols = list(x.column_names)
        if text_column not in cols:
            raise ValueError(f"{what}: column {text_column!r} not found; columns: {sorted(cols)}")
        texts = list(x[text_column])
        labels = None
        if label_column is not None:
            if label_column not in cols:
                raise ValueError(f"{what}: column {label_column!r} not found; columns: {sorted(cols)}")
            labels = [str(v) for v in x[label_column]]
        src = "datasets.Dataset"
    else:
        if isinstance(x, str) or not isinstance(x, Sequence):
            raise ValueError(f"{what}: expected a file path, a sequence of texts or a datasets.Dataset")
        texts, labels, src = list(x), None, "python sequence"
        if label_column is not None:
            raise ValueError(f"{what}: labels for a sequence of texts go in {what}_labels")
    if not texts:
        raise ValueError(f"{what}: no records")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what}: every record must be a string")
    if not any(t.strip() for t in texts):
        raise ValueError(f"{what}: only empty texts")
    return texts, labels, {"source": src, "records": len(texts), "texts_sha256": _texts_fingerprint(texts)}


def _label_ids(raw: Sequence[str], model: Any, what: str) -> list[int]:
    cfg = getattr(model, "config", None)
    n = int(getattr(cfg, "num_labels", 0) or 0)
    label2id = {str(k): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
    out = []
    for v in raw:
        s = str(v).strip()
        if s in label2id:
            out.append(label2id[s])
        elif s.lstrip("+-").isdigit():
            out.append(int(s))
        else:
            raise ValueError(f"{what}: label {s!r} is neither an integer nor one of the model's labels "
                             f"{sorted(label2id)}")
        if n and not 0 <= out[-1] < n:
            raise ValueError(f"{what}: label {out[-1]} is outside the model's {n} classes")
    return out


# --------------------------------------------------------------------------------------------------
# canary attacks


def _sequence_nll_total(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int
                        ) -> NDArray[np.float64]:
    from privaudit.attacks.llm_scores import token_scores

    ts = token_scores(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return np.array([-float(lp.sum()) for lp in ts.logprobs])


def _generate(model: Any, tokenizer: Any, prefix: str, n_new: int, *, sample: int, top_k: int, seed: int
              ) -> list[str]:
    """Greedy (``sample=0``) or ``sample`` top-k sampled continuations of ``prefix`` (decoded text)."""
    import torch

    ids = list(tokenizer(prefix)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if len(ids) > 1 and eos is not None and ids[-1] == eos:
        ids = ids[:-1]  # tokenizers that close every text (BERT-style [SEP]) would make generation start anew
    device = next(model.parameters()).device
    inp = torch.tensor([ids], device=device)
    kwargs: dict[str, Any] = {"max_new_tokens": n_new, "pad_token_id": eos if eos is not None else 0,
                              "attention_mask": torch.ones_like(inp)}
    if sample:
        kwargs.update(do_sample=True, top_k=top_k, num_return_sequences=sample)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(inp, **kwargs)
    else:
        kwargs.update(do_sample=False)
        out = model.generate(inp, **kwargs)
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out]


def _contains(text: str, secret: str) -> bool:
    squash = "".join(text.split())
    return secret in text or "".join(secret.split()) in squash


def _canary_attacks(lm: LoadedModel, canaries: Sequence[Canary], reference: Any, ref_tok: Any, settings: Mapping[str, Any],
                    seed: int, log: Callable[[str], None]) -> list[AttackScores]:
    from privaudit.attacks.canaries import canary_membership_scores, candidate_space, exposure_from_log_perplexities
    from privaudit.attacks.llm_scores import adapter_disabled

    bs, ml = int(settings["batch_size"]), int(settings["max_length"])
    included = np.array([c.included for c in canaries], dtype=bool)
    texts = [c.text for c in canaries]
    out: list[AttackScores] = []
    log(f"canary membership: {len(canaries)} canaries")
    n_tok = np.array([max(len(lm.tokenizer(t)["input_ids"]) - 1, 1) for t in texts], dtype=np.float64)
    target = _sequence_nll_total(lm.model, lm.tokenizer, texts, bs, ml) / n_tok
    ref_loss = None
    if reference == "base":
        with adapter_disabled(lm.model) as base:
            ref_loss = _sequence_nll_total(base, lm.tokenizer, texts, bs, ml) / n_tok
    elif reference is not None:
        ref_texts_tok = ref_tok if ref_tok is not None else lm.tokenizer
        n_ref = np.array([max(len(ref_texts_tok(t)["input_ids"]) - 1, 1) for t in texts], dtype=np.float64)
        ref_loss = _sequence_nll_total(reference, ref_texts_tok, texts, bs, ml) / n_ref
    cs = canary_membership_scores(target, included, reference_losses=ref_loss)
    out.append(AttackScores("canary_membership", "canary", cs.member_scores, cs.nonmember_scores, bound="one_run",
                            note="score = " + ("reference loss − target loss" if ref_loss is not None else "−loss")
                                 + " of each canary (mean token NLL); inclusion by fair coins, as the canary file asserts"))

    from privaudit.data.corpus import CANARY_FORMATS

    fmt_idx = [i for i, c in enumerate(canaries) if c.format]
    if fmt_idx:
        exposures = np.full(len(canaries), np.nan)
        for j, i in enumerate(fmt_idx):
            c = canaries[i]
            log(f"canary exposure: canary {j + 1}/{len(fmt_idx)}")
            pattern = CANARY_FORMATS[c.format][0] if c.format in CANARY_FORMATS else c.format
            try:
                space = candidate_space(pattern, n=int(settings["exposure_candidates"]),
                                        seed=_derived_seed(seed, i, 0x455850), secret=c.secret)
            except ValueError as exc:
                raise ValueError(f"canaries: canary {i + 1}: {exc}") from None
            nll = _sequence_nll_total(lm.model, lm.tokenizer, [f"{c.prefix}{s}{c.suffix}" for s in space.candidates],
                                      bs, ml)
            exposures[i] = exposure_from_log_perplexities(nll, space)
        inc_f, exc_f = included[fmt_idx], ~included[fmt_idx]
        ex = exposures[fmt_idx]
        extra = {"exposure_mean_included": float(ex[inc_f].mean()) if inc_f.any() else None,
                 "exposure_mean_excluded": float(ex[exc_f].mean()) if exc_f.any() else None,
                 "exposure_max": float(ex.max()), "canaries_with_format": len(fmt_idx),
                 "candidates_per_canary": int(settings["exposure_candidates"])}
        out.append(AttackScores("canary_exposure", "canary", ex[inc_f], ex[exc_f], bound="one_run", metrics=extra,
                                note="score = Secret-Sharer exposure (bits) of the secret among candidates of its format"))

    log("canary extraction: greedy and top-k sampled continuations")
    greedy_hit = np.zeros(len(canaries), dtype=bool)
    sampled_hits = np.zeros(len(canaries))
    examples: list[dict[str, Any]] = []
    for i, c in enumerate(canaries):
        n_new = len(lm.tokenizer(c.secret, add_special_tokens=False)["input_ids"]) + 2
        g = _generate(lm.model, lm.tokenizer, c.prefix, n_new, sample=0, top_k=0, seed=0)[0]
        greedy_hit[i] = _contains(g, c.secret)
        samples = _generate(lm.model, lm.tokenizer, c.prefix, n_new, sample=_SAMPLES_PER_CANARY,
                            top_k=int(settings["top_k"]), seed=_derived_seed(seed, i, 0x47454E))
        sampled_hits[i] = float(np.mean([_contains(s, c.secret) for s in samples]))
        if len(examples) < 5:
            examples.append({"prefix": c.prefix[-60:], "greedy": g[:80], "included": c.included,
                             "secret_found": bool(greedy_hit[i])})
    score = greedy_hit.astype(np.float64) + sampled_hits
    rate = lambda m, sel: float(m[sel].mean()) if sel.any() else None
    extra = {"exact_secret_rate_greedy_included": rate(greedy_hit, included),
             "exact_secret_rate_greedy_excluded": rate(greedy_hit, ~included),
             "exact_secret_rate_sampled_included": rate(sampled_hits, included),
             "exact_secret_rate_sampled_excluded": rate(sampled_hits, ~included),
             "samples_per_canary": _SAMPLES_PER_CANARY, "top_k": int(settings["top_k"]), "examples": examples}
    out.append(AttackScores("canary_extraction", "canary", score[included], score[~included], bound="none",
                            metrics=extra, note="score = greedy hit + share of top-k samples containing the secret; "
                                                "metrics only"))
    return out


# --------------------------------------------------------------------------------------------------
# the audit


def _check_common(confidence: float, max_records: int, batch_size: int, seed: int, n_bootstrap: int,
                  delta: float | None, epsilon: float | None) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    for name, v, lo in (("max_records", max_records, 2), ("batch_size", batch_size, 1), ("n_bootstrap", n_bootstrap, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta: must be in (0, 1), got {delta!r}")
    if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")


def _subsample(m: list[Any], nm: list[Any], max_records: int, coin_flip: bool, seed: int
               ) -> tuple[list[int], list[int]]:
    """Indices kept on each side (see the module docstring: the union when membership is by coin flip)."""
    rng = random.Random(_derived_seed(seed, 0x535542))
    if coin_flip:
        union = [(0, i) for i in range(len(m))] + [(1, i) for i in range(len(nm))]
        if len(union) > 2 * max_records:
            union = rng.sample(union, 2 * max_records)
        return sorted(i for s, i in union if s == 0), sorted(i for s, i in union if s == 1)
    a = sorted(rng.sample(range(len(m)), max_records)) if len(m) > max_records else list(range(len(m)))
    b = sorted(rng.sample(range(len(nm)), max_records)) if len(nm) > max_records else list(range(len(nm)))
    return a, b


def _resolve_reference(reference: Any, lm: LoadedModel, device: str | None
                       ) -> tuple[Any, Any, dict[str, Any] | None]:
    """(reference model or 'base' or None, its tokenizer, manifest description)."""
    if reference == "auto":
        reference = "base" if lm.has_adapter else None
    if reference is None or reference == "none":
        return None, None, None
    if reference == "base":
        if not lm.has_adapter:
            raise ValueError("reference: 'base' needs an adapter (the base model is the adapter's); give "
                             "--reference-model NAME_OR_PATH or none")
        return "base", None, {"kind": "base model of the adapter (adapter disabled)"}
    if isinstance(reference, (str, os.PathLike)):
        ref = load_model(reference, task="causal_lm", device=device)
        return ref.model, ref.tokenizer, {"kind": "model", **ref.info}
    if isinstance(reference, LoadedModel):
        return reference.model, reference.tokenizer, {"kind": "model", **reference.info}
    if isinstance(reference, tuple) and len(reference) == 2:
        return reference[0], reference[1], {"kind": "model", "name": type(reference[0]).__name__}
    return reference, None, {"kind": "model", "name": type(reference).__name__}


def _as_loaded(model: Any, tokenizer: Any, adapter: Any, task: str | None, device: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("tokenizer: give a tokenizer only with a loaded model (a name loads its own)")
        return load_model(model, adapter=adapter, task=task, device=device)
    if adapter is not None:
        raise ValueError("adapter: give an adapter with a model name or path; a loaded model already carries it")
    if tokenizer is None:
        raise ValueError("tokenizer: required with a loaded model")
    name = type(model).__name__
    t = task or ("classification" if name.endswith("ForSequenceClassification")
                 or getattr(getattr(model, "base_model", None), "model", None).__class__.__name__.endswith(
                     "ForSequenceClassification") else "causal_lm")
    tokenizer = _with_pad(tokenizer, t, name)
    has_adapter = callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or name
    return LoadedModel(model, tokenizer, t, {"name": str(base_name), "architecture": name, "task": t,
                                             "loaded_by": "caller"}, has_adapter)


def _write_out(out_dir: Path, result: AuditResult, manifest: dict[str, Any], ledger_path: Path | None) -> Path:
    from privaudit.runs import _write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    if ledger_path is not None:
        shutil.copyfile(ledger_path, out_dir / LEDGER_FILE)
    _write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    path = out_dir / AUDIT_FILE
    _write_json_atomic(path, result.to_json())
    return path


def audit_model(
    model: Any,
    tokenizer: Any = None,
    members: Any = None,
    non_members: Any = None,
    *,
    adapter: str | os.PathLike[str] | None = None,
    reference: Any = "auto",
    task: str | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    members_labels: Sequence[int] | None = None,
    non_members_labels: Sequence[int] | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    ledger: str | os.PathLike[str] | None = None,
    canaries: str | os.PathLike[str] | Sequence[Canary] | None = None,
    members_by_coin_flip: bool = False,
    attacks: Sequence[str] | str | None = None,
    confidence: float = 0.95,
    max_records: int = 1000,
    batch_size: int = 16,
    max_length: int = 512,
    k: float = 0.2,
    exposure_candidates: int = 1000,
    top_k: int = 40,
    n_bootstrap: int = 200,
    seed: int = 0,
    device: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Audit a model against member and non-member texts; returns an :class:`AuditResult` and, with
    ``out_dir``, writes ``audit.json`` and ``manifest.json`` there (see the module docstring).

    ``model``: a loaded ``transformers``/PEFT model (then ``tokenizer`` is required), a
    :class:`LoadedModel`, or a name/path (loaded with :func:`load_model`; ``adapter`` adds a PEFT
    adapter). ``members`` / ``non_members``: file paths (``.jsonl``/``.csv``/HF dataset dir), sequences
    of strings or ``datasets.Dataset`` objects (column ``text_column``). Classifiers need labels:
    ``label_column`` or ``members_labels``/``non_members_labels``. ``reference``: ``"auto"`` (the base
    when an adapter is loaded, else none), ``"base"``, ``"none"``/None, a name/path, a loaded model or
    a ``(model, tokenizer)`` pair. ``epsilon``/``delta``: a claimed guarantee to check; ``ledger``: a
    ledger file whose accounted ε is checked (δ: ``delta`` or the ledger's target δ). ``canaries``: a
    canary file or :class:`Canary` list (inclusion by fair coins). ``members_by_coin_flip``: assert that
    each member/non-member record was included by an independent fair coin (enables an ε lower bound).
    Bad input: ``ValueError`` naming the argument; nothing is written.
    """
    from privaudit.attacks.llm_scores import CAUSAL_LM_ATTACKS, CLASSIFIER_ATTACKS, classifier_scores, llm_scores

    _check_common(confidence, max_records, batch_size, seed, n_bootstrap, delta, epsilon)
    if epsilon is not None and ledger is not None:
        raise ValueError("epsilon: give a claimed ε or a ledger, not both")
    if epsilon is not None and delta is None:
        raise ValueError("delta: a claimed ε needs its δ")
    if members is None or non_members is None:
        raise ValueError("members: both members and non_members are required")
    say = progress or (lambda _m: None)
    out_path = None if out_dir is None else Path(out_dir)
    if out_path is not None and out_path.exists() and not out_path.is_dir():
        raise ValueError(f"out_dir: {out_path} exists and is not a directory")

    # -- data first (cheap checks before loading any model) ------------------------------------
    m_texts, m_raw, m_desc = _as_texts(members, "members", text_column, label_column)
    n_texts, n_raw, n_desc = _as_texts(non_members, "non_members", text_column, label_column)
    both = set(m_texts) & set(n_texts)
    if both:
        n_both = sum(1 for t in n_texts if t in both)
        raise ValueError(f"non_members: {len(both)} distinct texts ({n_both} records) also occur in members; "
                         "a record cannot be both (remove them from one side)")
    cans: list[Canary] | None = None
    if canaries is not None:
        cans = read_canaries(canaries) if isinstance(canaries, (str, os.PathLike)) else list(canaries)
    ledger_obj = None
    ledger_path: Path | None = None
    if ledger is not None:
        from privaudit.ledger.ledger import Ledger, LedgerCorruptError

        ledger_path = Path(ledger)
        if not ledger_path.is_file():
            raise ValueError(f"ledger: {ledger_path} does not exist or is not a file")
        try:
            ledger_obj = Ledger.read(ledger_path)
        except LedgerCorruptError as exc:
            raise ValueError(f"ledger: {ledger_path}: {exc}") from None
        if ledger_obj.status != "intact":
            raise ValueError(f"ledger: {ledger_path} is {ledger_obj.status} (not sealed): a ledger whose ε is "
                             "checked must be complete and sealed")
        if delta is None:
            delta = ledger_obj.header.target_delta
        if delta is None:
            raise ValueError("delta: the ledger header names no target_delta; pass --delta")
    delta = 1e-5 if delta is None else float(delta)

    # -- the model -----------------------------------------------------------------------------
    say("loading the model")
    lm = _as_loaded(model, tokenizer, adapter, task, device)
    known = CAUSAL_LM_ATTACKS if lm.task == "causal_lm" else CLASSIFIER_ATTACKS
    canary_names = ("canary_membership", "canary_exposure", "canary_extraction")
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",")]
    wanted = None if attacks is None else list(dict.fromkeys(attacks))
    if wanted is not None:
        for a in wanted:
            if a not in known and a not in canary_names:
                raise ValueError(f"attacks: unknown attack {a!r} for a {lm.task} model "
                                 f"(known: {', '.join(known + canary_names)})")
        if any(a in canary_names for a in wanted) and cans is None:
            raise ValueError("attacks: canary attacks need a canary file (--canaries)")
    if cans is not None and lm.task != "causal_lm":
        raise ValueError("canaries: canary attacks apply to causal language models only")
    ref_model, ref_tok, ref_desc = _resolve_reference(reference, lm, device) if lm.task == "causal_lm" else (
        None, None, None)
    if lm.task == "classification":
        if reference not in ("auto", None, "none"):
            raise ValueError("reference: reference calibration applies to causal language models only")
        if m_raw is None and members_labels is None:
            raise ValueError("label_column: a sequence classifier needs labels (--label-column)")
    record_attacks = [a for a in (wanted if wanted is not None else known)
                      if a in known and (a != "ref" or ref_model is not None)]
    if wanted is not None and "ref" in wanted and ref_model is None:
        raise ValueError("attacks: 'ref' needs a reference model (--reference-model, or an adapter's base)")

    keep_m, keep_n = _subsample(m_texts, n_texts, max_records, members_by_coin_flip, seed)
    m_sel, n_sel = [m_texts[i] for i in keep_m], [n_texts[i] for i in keep_n]
    if not m_sel or not n_sel:
        raise ValueError("max_records: the subsample left one side empty; raise max_records")
    settings: dict[str, Any] = {"batch_size": batch_size, "max_length": max_length, "exposure_candidates": exposure_candidates,
                                "top_k": top_k}

    # -- record-level attacks: one scoring pass per model over members ∪ non-members --------------
    outcomes: list[AttackScores] = []
    bound = "one_run" if members_by_coin_flip else "none"
    if record_attacks:
        texts = m_sel + n_sel
        say(f"scoring {len(texts)} records ({', '.join(record_attacks)})")
        if lm.task == "causal_lm":
            scores = llm_scores(lm.model, lm.tokenizer, texts, batch_size=batch_size, attacks=record_attacks,
                                reference=ref_model, reference_tokenizer=ref_tok, k=k, max_length=max_length)
        else:
            if m_raw is not None and n_raw is not None:
                ml, nl = _label_ids(m_raw, lm.model, "members"), _label_ids(n_raw, lm.model, "non_members")
            else:
                if members_labels is None or non_members_labels is None:
                    raise ValueError("non_members_labels: labels are needed for both sides")
                ml, nl = list(members_labels), list(non_members_labels)
                if len(ml) != len(m_texts) or len(nl) != len(n_texts):
                    raise ValueError("members_labels: need one label per record on each side")
            labels = [ml[i] for i in keep_m] + [nl[i] for i in keep_n]
            scores = classifier_scores(lm.model, lm.tokenizer, texts, labels, batch_size=batch_size,
                                       max_length=max_length, attacks=record_attacks)
        nm = len(m_sel)
        notes = {"loss": "score = −mean token NLL" if lm.task == "causal_lm" else "score = −cross-entropy",
                 "ref": "score = reference loss − target loss (mean token NLL)",
                 "min_k": f"Min-K% Prob, k = {k:g}", "min_k_pp": f"Min-K%++, k = {k:g}",
                 "zlib": "score = −loss / zlib length", "lowercase": "score = loss(lowercased) − loss"}
        for a in record_attacks:
            s = np.asarray(scores[a], dtype=np.float64)
            outcomes.append(AttackScores(a, "membership", s[:nm], s[nm:], bound=bound,  # type: ignore[arg-type]
                                         note=notes.get(a)))
    if cans is not None and (wanted is None or any(a in canary_names for a in wanted)):
        got = _canary_attacks(lm, cans, ref_model, ref_tok, settings, seed, say)
        outcomes.extend(o for o in got if wanted is None or o.name in wanted)

    # -- metrics, bounds (Bonferroni over attacks × δ values), verdict ---------------------------
    say("metrics, bounds and verdict")
    claims_in: list[dict[str, Any]] = []
    if epsilon is not None:
        claims_in.append({"epsilon": float(epsilon), "delta": float(delta), "source": "claimed by the user",
                          "scope": "record"})
    if ledger_obj is not None:
        claims_in += [{"epsilon": float(c.epsilon), "delta": float(c.delta), "source": c.source, "scope": c.scope}
                      for c in ledger_obj.claims]
    if ledger_obj is not None:
        accounted, compared, compared_by = _accounted(ledger_obj, delta)
    else:
        accounted, compared, compared_by = ({"delta": delta, "epsilon": {}, "guarantee": "none",
                                             "reason": "no ledger given (a claimed ε, if any, is checked instead)"},
                                            math.inf, None)
    has_guarantee = math.isfinite(compared)
    deltas = sorted({delta} | {c["delta"] for c in claims_in})
    results, bounded, n_bounds, per_conf = score_attacks(outcomes, delta, deltas, confidence, seed, n_bootstrap)
    with_bounds = [r for r in results if r.epsilon_lower is not None]
    top = max(with_bounds, key=lambda r: r.epsilon_lower.value) if with_bounds else None  # type: ignore[union-attr]
    claimed = []
    for c in claims_in:
        best = max(((r.bounds[c["delta"]].value, r.name) for r in with_bounds), default=(0.0, None))
        claimed.append({**c, "epsilon_lower": best[0] if with_bounds else None, "attack": best[1],
                        "status": ("refuted" if best[0] > c["epsilon"] else "not refuted") if with_bounds
                        else "not tested (no ε lower bound is valid for this audit)"})
    if top is not None:
        tb = top.epsilon_lower
        assert tb is not None
        eps_lower: dict[str, Any] = {
            "value": tb.value, "confidence": confidence, "method": tb.method, "attack": top.name, "delta": delta,
            "per_bound_confidence": per_conf, "correction": "bonferroni", "n_bounds": n_bounds,
            "note": f"maximum over {n_bounds} bounds ({len(bounded)} attacks × {len(deltas)} δ values), "
                    f"each at confidence 1 − {1 - confidence:g}/{n_bounds}"}
        verdict, reason = _verdict(has_guarantee, compared, compared_by, delta, tb, top.name, claimed,
                                   len(outcomes), "released model", confidence)
        if not members_by_coin_flip and record_attacks:
            reason += ("; the bound comes from the canaries only: the member/non-member split was not decided by "
                       "fair coins, so the record-level attacks report metrics only")
    else:
        why_none = _NO_BOUND_REASON if record_attacks else "no attack with fair-coin membership was run"
        eps_lower = {"value": None, "confidence": confidence, "method": "none", "attack": None, "delta": delta,
                     "n_bounds": 0, "reason": why_none}
        verdict, reason = "inconclusive", f"no ε lower bound: {why_none}"
    membership = {
        "records": ("independent fair coins (asserted by the user: members_by_coin_flip)" if members_by_coin_flip
                    else "the user's member/non-member split (not asserted to be fair coins)"),
        "canaries": None if cans is None else "independent fair coins (asserted by the canary file's 'included')",
    }
    public_settings = {
        "attacks_requested": wanted, "reference": ref_desc, "confidence": confidence, "seed": seed,
        "max_records": max_records, "batch_size": batch_size, "max_length": max_length, "k": k,
        "n_bootstrap": n_bootstrap, "n_members_scored": len(m_sel), "n_nonmembers_scored": len(n_sel),
        "n_canaries": 0 if cans is None else len(cans), "membership_decided_by": membership,
        "multiple_testing": {"method": "bonferroni", "n_bounds": n_bounds, "deltas": deltas,
                             "family_confidence": confidence, "per_bound_confidence": per_conf},
        "attacks_run": [o.name for o in outcomes],
    }
    data_desc = {"members": m_desc, "non_members": n_desc,
                 "canaries": None if cans is None else {"count": len(cans), "included": int(sum(c.included for c in cans)),
                                                        **({"file": str(canaries), "file_sha256": _sha256_file(Path(canaries))}
                                                           if isinstance(canaries, (str, os.PathLike)) else {})}}
    ident = hashlib.sha256(json.dumps([lm.info.get("name"), (lm.info.get("adapter") or {}).get("sha256"),
                                       m_desc["texts_sha256"], n_desc["texts_sha256"]]).encode()).hexdigest()
    run_id = f"external-{ident[:12]}"
    created = datetime.now(UTC).isoformat()
    result = AuditResult(run_id=run_id, observer="released model", accounted=accounted, claimed=tuple(claimed),
                         attacks=tuple(results), epsilon_lower=eps_lower, verdict=verdict,  # type: ignore[arg-type]
                         verdict_reason=reason, created=created, settings=public_settings)
    from privaudit.mechanisms.distributed import world_from_env

    if out_path is not None and world_from_env().is_main:  # under torchrun only rank 0 writes
        manifest = {
            "format_version": 1, "kind": "external_audit", "status": "complete", "run_id": run_id,
            "name": f"audit of {lm.info.get('name')}" + (" + adapter" if lm.has_adapter else ""),
            "mechanism": "external checkpoint", "task": lm.task, "observer": "released model",
            "base_model": lm.info.get("name"), "created": created,
            "audited": {"model": lm.info, "reference": ref_desc},
            "dataset": {"fingerprint": m_desc["texts_sha256"], "size": len(m_texts),
                        "source": "members file" if "file" in m_desc else m_desc.get("source")},
            "data": data_desc, "membership_decided_by": membership,
            "privacy": {"delta": delta, **({"claimed_epsilon": float(epsilon)} if epsilon is not None else {})},
            "ledger": None if ledger_path is None else {"file": str(ledger_path), "copied_to": LEDGER_FILE},
            **({} if ledger_obj is None else {"ledger_head_hash": ledger_obj.head_hash,
                                              "ledger_seal": ledger_obj.reading.seal if ledger_obj.reading else None}),
            "versions": _versions(),
        }
        path = _write_out(out_path, result, manifest, ledger_path)
        result = replace(result, path=path)
    return result


def _versions() -> dict[str, str]:
    from privaudit.runs import library_versions

    return library_versions()


def audit_from_cli(*, run_dir: Path | None, model: str | None, adapter: Path | None, members: Path | None,
                   non_members: Path | None, out_dir: Path | None, text_column: str, label_column: str | None,
                   reference_model: str | None, epsilon: float | None, delta: float | None, ledger: Path | None,
                   canaries: Path | None, members_by_coin_flip: bool, attacks: str | None, confidence: float,
                   max_records: int | None, batch_size: int, seed: int, quiet: bool) -> AuditResult:
    """``privaudit audit --model ...``: check the option combination, then :func:`audit_model`.
    Every problem is a ``ValueError`` naming the option (the CLI prints it as one line, exit 2)."""
    if run_dir is not None:
        raise ValueError(f"RUN_DIR: give either a run directory ({run_dir}) or --model/--adapter, not both")
    for opt, val in (("--members", members), ("--non-members", non_members), ("-o/--output", out_dir)):
        if val is None:
            raise ValueError(f"{opt}: required when auditing a model (--model/--adapter)")
    ref: Any = "auto" if reference_model is None else reference_model
    if isinstance(ref, str) and ref.lower() in ("none", "base"):
        ref = ref.lower()
    say = None if quiet else (lambda msg: print(f"audit: {msg}", file=__import__("sys").stderr, flush=True))
    return audit_model(model, None, members, non_members, adapter=adapter, reference=ref, text_column=text_column,
                       label_column=label_column, epsilon=epsilon, delta=delta, ledger=ledger, canaries=canaries,
                       members_by_coin_flip=members_by_coin_flip, attacks=attacks, confidence=confidence,
                       max_records=1000 if max_records is None else max_records, batch_size=batch_size, seed=seed,
                       out_dir=out_dir, progress=say)
