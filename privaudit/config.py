"""Run configs: pydantic models, YAML/TOML loading, and the privacy events a config will spend.

A config names a mechanism (``dp_lora``), a task (``classification`` or ``causal_lm``), a base model,
LoRA settings, a data source, training settings and the privacy parameters. Validation errors are a
``ValueError`` whose message starts with the field path (``training.batch_size: ...``).

Privacy conventions: the protected unit is one record (``privacy.privacy_unit: record``); the
neighbouring relation is ``add_remove`` unless ``privacy.neighbouring: replace`` (then the per-step
sensitivity is 2·C). ``noise_multiplier`` is noise std / clip norm. ``training.batch_size`` is the
*expected* batch size under Poisson sampling (q = batch_size / N_train) and the exact one under
``fixed_batch`` sampling.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from privaudit.accounting.limits import MAX_STEPS, MAX_TARGET_EPSILON, MIN_DELTA
from privaudit.ledger.events import (
    ClaimEvent,
    Neighbouring,
    format_validation_error,
)
from privaudit.models import LoraSettings
from privaudit.safe_read import read_bounded, reject_bool_numbers

Task = Literal["classification", "causal_lm"]

# Documented limits: a config (or a manifest's config) beyond them is refused before any data is
# generated or any model is built, so hostile values cannot make a run hang or exhaust memory.
MAX_SEED = 2**32 - 1  #: seeds are in [0, MAX_SEED]
MAX_RECORDS = 200_000  #: synthetic records (n_people × records_per_person; ≈ 1 min to generate)
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-4, 1e6  #: σ > 0 lies in this range
MAX_BATCH = 10**7  #: batch sizes (records)
MAX_CONFIG_BYTES = 1 << 20  #: a config file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return reject_bool_numbers(cls.model_fields, data)


class ModelSection(_Section):
    """Base model: a bundled name (``minilm``, ``tiny-gpt2``, ``tiny-llama``), an HF id or a local path
    (always loaded with ``local_files_only``). ``overrides`` go to the model config (tiny models)."""

    name: str = "minilm"
    overrides: dict[str, Any] = Field(default_factory=dict)
    max_length: int = Field(64, ge=2, le=8192, description="tokens per record (truncation)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps")

    @field_validator("overrides")
    @classmethod
    def _no_remote_code(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "trust_remote_code" in v:
            raise ValueError("trust_remote_code: refused: privaudit never runs code shipped with a model "
                             "(remove it; models load with the classes transformers itself provides)")
        return v


class SyntheticSection(_Section):
    """Parameters of :func:`privaudit.data.generate_corpus`."""

    n_people: int = Field(400, ge=1, le=MAX_RECORDS)
    records_per_person: int = Field(3, ge=1, le=1000)
    n_canaries: int = Field(32, ge=0, le=10_000)
    canary_inclusion: float = Field(0.5, ge=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    canary_formats: list[str] = Field(default_factory=lambda: ["pin4", "ssn", "phone", "card"], max_length=100)

    @model_validator(mode="after")
    def _check_size(self) -> "SyntheticSection":
        if self.n_people * self.records_per_person > MAX_RECORDS:
            raise ValueError(f"n_people: n_people × records_per_person = {self.n_people * self.records_per_person}"
                             f" records, more than the limit of {MAX_RECORDS}")
        return self


class DataSection(_Section):
    """``source: synthetic`` generates the PII corpus; ``jsonl``/``csv``/``hf`` read ``path`` (a file,
    or a directory saved with ``datasets.save_to_disk``); relative paths are relative to the config."""

    source: Literal["synthetic", "jsonl", "csv", "hf"] = "synthetic"
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    path: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    sensitive_column: str | None = None
    id_column: str = "id"
    split: str | None = None
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    max_heldout: int | None = Field(None, ge=1, description="evaluate on at most this many records")

    @model_validator(mode="after")
    def _check_source(self) -> "DataSection":
        if self.source == "synthetic":
            if self.path is not None:
                raise ValueError("path: only for source jsonl, csv or hf (source is synthetic)")
            return self
        if not self.path:
            raise ValueError(f"path: required for source {self.source!r}")
        suffix = Path(self.path).suffix.lower()
        if self.source == "jsonl" and suffix not in (".jsonl", ".ndjson"):
            raise ValueError(f"path: source jsonl needs a .jsonl/.ndjson file, got {self.path!r}")
        if self.source == "csv" and suffix != ".csv":
            raise ValueError(f"path: source csv needs a .csv file, got {self.path!r}")
        return self


class TrainingSection(_Section):
    """Exactly one of ``steps``/``epochs``; for Poisson sampling exactly one of ``batch_size``
    (expected size) / ``sample_rate``. ``physical_batch_size`` splits a logical batch into chunks
    (memory only: the result is the same)."""

    steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    epochs: float | None = Field(None, gt=0)
    sampling: Literal["poisson", "fixed_batch"] = "poisson"
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    sample_rate: float | None = Field(None, gt=0, le=1)
    physical_batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate over the run's steps: constant, linear decay to 0, or cosine "
        "decay to 0 (dp_lora and lora_sketch; data-independent, so it costs no privacy)")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (train only)")
    eval_batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    eval_before: bool = Field(False, description="also measure held-out utility before training")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="model init, LoRA init and dropout")

    @model_validator(mode="after")
    def _check(self) -> "TrainingSection":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("steps: give exactly one of training.steps and training.epochs")
        if self.sampling == "poisson":
            if (self.batch_size is None) == (self.sample_rate is None):
                raise ValueError("batch_size: give exactly one of training.batch_size and training.sample_rate")
        else:
            if self.batch_size is None:
                raise ValueError("batch_size: required with sampling fixed_batch")
            if self.sample_rate is not None:
                raise ValueError("sample_rate: only for Poisson sampling (fixed_batch uses batch_size)")
        return self


class ClaimSection(_Section):
    epsilon: float = Field(..., ge=0)
    delta: float = Field(0.0, ge=0, lt=1)
    scope: str = "per run"
    source: str = ""


class PrivacySection(_Section):
    """Exactly one of ``noise_multiplier`` (0 = non-private baseline: no guarantee) and
    ``target_epsilon`` (σ calibrated with ``accountant`` so that ε ≤ target at ``delta``)."""

    noise_multiplier: float | None = Field(None, ge=0, le=MAX_NOISE_MULTIPLIER)
    target_epsilon: float | None = Field(None, gt=0, le=MAX_TARGET_EPSILON)
    clip_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, ge=MIN_DELTA, lt=1)
    accountant: Literal["rdp", "pld", "prv"] = "pld"
    neighbouring: Literal["add_remove", "replace"] = "add_remove"
    privacy_unit: Literal["record"] = "record"
    norm_method: Literal["auto", "ghost", "materialise"] = "auto"
    noise_seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="None (default): noise and secret sampling from a CSPRNG keyed from OS entropy. A fixed seed makes "
        "the run reproducible but lets whoever holds the config regenerate the noise: tests only.")
    claims: list[ClaimSection] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _check(self) -> "PrivacySection":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("noise_multiplier: give exactly one of privacy.noise_multiplier and "
                             "privacy.target_epsilon")
        if self.noise_multiplier is not None and 0 < self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise ValueError(f"noise_multiplier: must be 0 (non-private) or at least {MIN_NOISE_MULTIPLIER:g}, "
                             f"got {self.noise_multiplier:g}")
        return self


class AuditSection(_Section):
    """White-box gradient canaries for one-run audits (see ``privaudit.mechanisms.training``)."""

    gradient_canaries: int = Field(0, ge=0, le=1_000_000, description="≤ 100,000 with Gaussian directions")
    gradient_canary_seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: drawn from OS entropy")
    gradient_canary_directions: Literal["auto", "dirac", "gaussian"] = Field(
        "auto", description="dirac: each canary its own trainable coordinate (mutually orthogonal; needs "
                            "gradient_canaries <= trainable coordinates); gaussian: a seeded Gaussian direction "
                            "each; auto: dirac when they fit, else gaussian")
    record_canary_steps: bool = Field(
        False, description="dp_lora: keep every step's noisy gradient sum projected on the gradient canaries "
                           "(canary_steps.safetensors) for a white-box auditor who sees every step")
    lm_canary_design: Literal["format", "new_token", "rare_token", "bigram"] = Field(
        "format", description="causal LM, synthetic data: the design of the data canaries "
                              "(privaudit.data.lm_canaries): format = the corpus' PIN/SSN/phone/card canaries; "
                              "new_token = a secret of tokens added to the tokenizer; rare_token = a secret of the "
                              "rarest word tokens; bigram = a random pair of word tokens")
    lm_canary_repeats: int = Field(
        1, ge=1, le=64, description="copies of each included canary in the training data; > 1 makes a canary a "
                                    "k-record unit: its audit tests group privacy of k records (metrics only "
                                    "in the auditor's verdict)")
    lm_canary_secret_tokens: int = Field(4, ge=1, le=64, description="secret length in tokens (new_token, "
                                                                      "rare_token; bigram is always 2)")
    lm_canary_prefix: Literal["random", "fixed"] = Field(
        "random", description="random: each canary gets its own prefix of random words; fixed: one prefix for all")
    lm_canary_train_new_tokens: bool = Field(
        False, description="new_token design, dp_lora: train the new tokens' input and output rows (untied, "
                           "exact per-sample clipping, privaudit.mechanisms.new_token_rows) besides LoRA; "
                           "False: the rows stay frozen at their public random values")
    lm_canary_seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="secret seed of the LM canaries' content and inclusion coins; "
                                             "None: derived from data.synthetic.seed")


class RunConfig(_Section):
    mechanism: str = "dp_lora"
    task: Task = "classification"
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection
    privacy: PrivacySection
    audit: AuditSection = Field(default_factory=AuditSection)
    options: dict[str, Any] = Field(default_factory=dict, description="mechanism-specific settings")

    @field_validator("mechanism")
    @classmethod
    def _known_mechanism(cls, v: str) -> str:

        if v not in mechanism_names():
            raise ValueError(f"unknown mechanism {v!r} (choose from {', '.join(mechanism_names())})")
        return v

    @model_validator(mode="after")
    def _check_options(self) -> "RunConfig":
        if self.options and self.mechanism in _NO_OPTIONS:  # other mechanisms validate their own
            raise ValueError(f"options: unknown option {next(iter(self.options))!r} ({self.mechanism} "
                             "takes no options)")
        if self.training.lr_schedule != "constant" and self.mechanism not in _LR_SCHEDULED:
            raise ValueError(f"lr_schedule: {self.training.lr_schedule!r} is supported by "
                             f"{', '.join(sorted(_LR_SCHEDULED))} only ({self.mechanism} trains at a constant rate)")
        if self.audit.lm_canary_design != "format" or self.audit.lm_canary_repeats > 1:
            if self.task != "causal_lm":
                raise ValueError("audit.lm_canary_design: the LM canary designs and repeats need task causal_lm")
            if self.data.source != "synthetic":
                raise ValueError("audit.lm_canary_design: the LM canary designs and repeats need data.source "
                                 "synthetic (the canaries are generated with the corpus)")
            if self.audit.lm_canary_design == "new_token" and self.mechanism in ("privtune", "pae_mobillm"):
                raise ValueError(f"audit.lm_canary_design: new_token needs a mechanism that builds its model with "
                                 f"the canary tokens (training.build_model); {self.mechanism} does not")
            if self.audit.lm_canary_design != "format" and self.data.synthetic.canary_inclusion != 0.5:
                raise ValueError("data.synthetic.canary_inclusion: the LM canary designs include each canary by a "
                                 "fair coin (0.5)")
        if self.audit.lm_canary_train_new_tokens:
            if self.task != "causal_lm" or self.audit.lm_canary_design != "new_token":
                raise ValueError("audit.lm_canary_train_new_tokens: trains the rows of the new_token canaries' "
                                 "tokens; needs task causal_lm and audit.lm_canary_design new_token")
            if self.mechanism not in _TRAINS_NEW_TOKEN_ROWS:
                raise ValueError(f"audit.lm_canary_train_new_tokens: supported by "
                                 f"{', '.join(sorted(_TRAINS_NEW_TOKEN_ROWS))} only (per-sample clipping of the "
                                 f"rows with the LoRA factors); {self.mechanism} does not train them")
        return self


#: Mechanisms without an ``options`` block (any key there is a mistake).
_NO_OPTIONS = frozenset({"dp_lora"})
#: Mechanisms whose DP-SGD loop follows ``training.lr_schedule`` (the DPLoraTrainer loop).
_LR_SCHEDULED = frozenset({"dp_lora", "lora_sketch"})
#: Mechanisms that train the new-token canaries' rows (``audit.lm_canary_train_new_tokens``): the plain
#: DP-SGD loop, whose per-sample clipping and noise cover every trainable parameter.
_TRAINS_NEW_TOKEN_ROWS = frozenset({"dp_lora"})


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def parse_config(data: Any, base_dir: str | Path | None = None) -> RunConfig:
    """Validate a mapping as a :class:`RunConfig`; relative data paths are resolved against
    ``base_dir``. Raises ``ValueError`` naming the field path."""
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_field_error(exc)) from None
    if base_dir is not None and cfg.data.path is not None and not Path(cfg.data.path).is_absolute():
        path = str((Path(base_dir) / cfg.data.path).resolve())
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": path})})
    return cfg


def _field_error(exc: ValidationError) -> str:
    """``a.b.c: message`` — prefixing the section path when a section validator names a field."""
    errors = exc.errors()
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    if extra:  # a mistyped key first: it also explains a "Field required" for the key meant
        return _unknown_key(extra[0], [e for e in errors if e.get("type") == "missing"])
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    head, sep, rest = msg.partition(": ")
    if sep and head.isidentifier() and err.get("type") == "value_error":
        # a model validator's message "field: ..." -> full path "section.field: ..."
        return f"{'.'.join(loc + [head])}: {rest}"
    return format_validation_error(exc)


OptionsT = TypeVar("OptionsT", bound=BaseModel)


def parse_options(settings: type[OptionsT], options: Mapping[str, Any] | None) -> OptionsT:
    """A mechanism's ``options`` block validated as its ``settings`` model; a ``ValueError`` starting
    ``options.<field>:`` (or ``options:`` when no field is to blame) otherwise."""
    opts = dict(options or {})
    try:
        reject_bool_numbers(settings.model_fields, opts)
    except ValueError as exc:
        raise ValueError(f"options.{exc}") from None
    try:
        return settings.model_validate(opts)
    except ValidationError as exc:
        text = _field_error(exc)
        head = text.partition(": ")[0]
        named = bool(exc.errors()[0].get("loc")) or head.isidentifier()
        raise ValueError(f"options.{text}" if named else f"options: {text}") from None


def _unknown_key(err: Any, missing: list[Any]) -> str:
    """``a.b: unknown key (did you mean 'c'?)``, suggesting a missing key at the same level first."""
    import difflib

    loc = [str(p) for p in err.get("loc", ())]
    parent = loc[:-1]
    node: Any = RunConfig
    for part in parent:  # the model the unknown key sits in, for its known keys
        field = getattr(node, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if node is None:
            break
    known = list(getattr(node, "model_fields", {}) or {})
    wanted = [str(m["loc"][-1]) for m in missing if [str(p) for p in m["loc"][:-1]] == parent]
    close = difflib.get_close_matches(loc[-1], wanted, n=1) or difflib.get_close_matches(loc[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else (f" (known: {', '.join(known)})" if known else "")
    return f"{'.'.join(loc)}: unknown key{hint}"


def merge_config(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    """Merge the nested overrides ``src`` into the raw config dict ``dst`` in place (sections merge,
    other values are replaced)."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            merge_config(dst[k], v)
        else:
            dst[k] = v


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) run config."""
    p = Path(path)
    data = read_config_data(p)
    return parse_config(data if data is not None else {}, base_dir=p.parent)


def read_config_data(path: str | Path) -> Any:
    """The parsed content of a YAML or TOML config file: a regular file of at most
    ``MAX_CONFIG_BYTES``, YAML without aliases; a ``ValueError`` starting ``config:`` otherwise."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config: {p} does not exist")
    if p.is_dir():
        raise ValueError(f"config: {p} is a directory, not a config file")
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ValueError(f"config: {p}: unsupported file type {suffix or '(none)'!r} (use .yaml or .toml)")
    try:
        text = read_bounded(p, "config", MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config: {p} is not UTF-8 text") from None
    try:
        data = load_yaml_text(text) if suffix != ".toml" else tomllib.loads(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"config: {p} is not valid YAML ({' '.join(str(exc).split())})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config: {p} is not valid TOML ({exc})") from None
    except RecursionError:
        raise ValueError(f"config: {p} is nested too deeply") from None
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a few lines of nested aliases expand to
    billions of nodes for whatever walks the result (the "billion laughs" bomb)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not supported "
                                              "in privaudit files; write the value out", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` without aliases (see :class:`_NoAliasLoader`); ``yaml.YAMLError`` if bad.
    Callers bound the text's size."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


# ----------------------------------------------------------------------------------------------
# privacy plan and planned events
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivacyPlan:
    """What a run will do, resolved for a training set of ``dataset_size`` records.

    ``sample_rate`` is q (Poisson) or batch_size/N (fixed batches, for gradient canaries only);
    ``noise_multiplier`` σ = 0 means a non-private run.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: Literal["poisson", "fixed_batch"]
    batch_size: int | None
    dataset_size: int
    clip_norm: float
    delta: float
    neighbouring: Neighbouring
    calibrated_epsilon: float | None = None
    calibration_accountant: str | None = None

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "sampling": self.sampling,
            "batch_size": self.batch_size,
            "dataset_size": self.dataset_size,
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "neighbouring": self.neighbouring,
            "calibrated_epsilon": self.calibrated_epsilon,
            "calibration_accountant": self.calibration_accountant,
        }


def resolve_plan(cfg: RunConfig, dataset_size: int) -> PrivacyPlan:
    """σ, q and the number of steps of ``cfg`` for a training set of ``dataset_size`` records
    (calibrating σ when the config gives ``target_epsilon``)."""
    if dataset_size < 1:
        raise ValueError("data: the training set is empty")
    t, pv = cfg.training, cfg.privacy
    if t.sampling == "poisson":
        if t.sample_rate is not None:
            q = float(t.sample_rate)
        else:
            assert t.batch_size is not None
            if t.batch_size > dataset_size:
                raise ValueError(f"training.batch_size: {t.batch_size} exceeds the training set size "
                                 f"{dataset_size}")
            q = t.batch_size / dataset_size
        batch_size = None
        steps = t.steps if t.steps is not None else math.ceil(float(t.epochs) / q)  # type: ignore[arg-type]
    else:
        assert t.batch_size is not None
        if t.batch_size > dataset_size:
            raise ValueError(f"training.batch_size: {t.batch_size} exceeds the training set size "
                             f"{dataset_size}")
        batch_size = t.batch_size
        q = batch_size / dataset_size
        steps = t.steps if t.steps is not None else math.ceil(float(t.epochs) * dataset_size / batch_size)  # type: ignore[arg-type]
    calibrated: float | None = None
    acc: str | None = None
    if pv.target_epsilon is not None:
        if steps == 0:
            raise ValueError("training.steps: must be > 0 to calibrate the noise to a target epsilon")
        from privaudit.accounting.calibrate import calibrate_noise

        if t.sampling == "poisson":
            res = calibrate_noise(pv.target_epsilon, pv.delta, q, steps, accountant=pv.accountant,
                                  neighbouring=pv.neighbouring)
        else:  # fixed batches: ceil(steps*B/N) full-batch releases, no amplification, sensitivity 2·C
            releases = math.ceil(steps * batch_size / dataset_size)  # type: ignore[operator]
            res = calibrate_noise(pv.target_epsilon, pv.delta, 1.0, releases, accountant=pv.accountant,
                                  neighbouring=pv.neighbouring)
        sigma = float(res.noise_multiplier)
        if t.sampling == "fixed_batch" and pv.neighbouring == "add_remove":
            # an added record pushes another out of its fixed-size batch: sensitivity 2·C, not C
            # (``dp_lora.step_event``); replace already calibrated at 2·C. Same ε, twice the σ.
            sigma *= 2.0
        calibrated, acc = float(res.epsilon), str(res.accountant)
    else:
        sigma = float(pv.noise_multiplier)  # type: ignore[arg-type]
    return PrivacyPlan(sigma, q, int(steps), t.sampling, batch_size, dataset_size, pv.clip_norm, pv.delta,
                       pv.neighbouring, calibrated, acc)


def claims_of(cfg: RunConfig) -> list[ClaimEvent]:
    return [ClaimEvent(**c.model_dump()) for c in cfg.privacy.claims]


MECHANISM_MODULES: dict[str, str] = {
    "dp_lora": "privaudit.mechanisms.dp_lora",
    "dp_fedlora": "privaudit.mechanisms.dp_fedlora.mechanism",
    "lora_sketch": "privaudit.mechanisms.lora_sketch.mechanism",
    "privtune": "privaudit.mechanisms.privtune.mechanism",
    "he_lora": "privaudit.mechanisms.he_lora.mechanism",
    "pae_mobillm": "privaudit.mechanisms.pae_mobillm.mechanism",
}

def register_mechanism(name: str, module: str) -> None:
    """Make the mechanism implemented by module path ``module`` available as ``name``."""
    MECHANISM_MODULES[name] = module

def mechanism_names() -> list[str]:
    return sorted(MECHANISM_MODULES)
