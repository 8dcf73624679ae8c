"""Membership scores for language models from ONE batched scoring pass per model.

:func:`token_scores` runs a causal LM once over a list of texts (length-sorted batches, right
padding done here, no gradients) and keeps, for every record, the per-token log-probabilities
ℓ_t = log p(x_t | x_<t) of the tokens it predicts (t = 2..T; the first token has no context) and,
when asked, the mean μ_t and variance σ_t² of log p(z | x_<t) over the vocabulary z ~ p(· | x_<t),
computed exactly from the logits (for Min-K%++). Every causal-LM attack is a function of these
arrays (formulas: ``REFERENCES.md`` §9); **higher score = more likely a member** throughout:

* ``loss`` (Yeom et al. 2018): (1/T) Σ ℓ_t = −mean token NLL (nats).
* ``zlib`` (Carlini et al. 2021): −[(1/T) Σ −ℓ_t] / zlib_len(x), zlib_len = bytes of the
  zlib-compressed UTF-8 text (level 9).
* ``lowercase`` (Carlini et al. 2021): loss(lowercase(x)) − loss(x), mean token NLLs in nats (a second
  pass over the lower-cased texts).
* ``min_k`` (Min-K% Prob, Shi et al. 2024): mean of the ⌊k·T⌋ (at least 1) smallest ℓ_t.
* ``min_k_pp`` (Min-K%++, Zhang et al. 2024): mean of the ⌊k·T⌋ (at least 1) smallest
  z_t = (ℓ_t − μ_t)/σ_t.
* ``ref`` (reference calibration, Carlini et al. 2021): loss_ref(x) − loss_target(x) (mean token
  NLLs); with a LoRA adapter the base model (adapter disabled) is a free reference.

Sequence classifiers (:func:`classifier_scores`), from softmax probabilities p of one pass: ``loss``
(−cross-entropy), ``confidence`` (p_y), ``entropy`` (−H(p)) and ``modified_entropy`` (−Mentr, Song &
Mittal 2021: Mentr = −(1 − p_y) log p_y − Σ_{i≠y} p_i log(1 − p_i)).

The functions take a loaded model and tokenizer and return per-record arrays in the input order;
turn two of them (members, non-members) into AUC / TPR at low FPR with
:func:`privaudit.attacks.metrics.membership_metrics`.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from privaudit.mechanisms.distributed import sharded_map, world_from_env

if TYPE_CHECKING:
    import torch

__all__ = [
    "CAUSAL_LM_ATTACKS",
    "CLASSIFIER_ATTACKS",
    "TokenScores",
    "adapter_disabled",
    "classifier_scores",
    "classifier_scores_from_probs",
    "llm_scores",
    "loss_score",
    "min_k_pp_score",
    "min_k_score",
    "token_scores",
    "zlib_length",
    "zlib_score",
]

CAUSAL_LM_ATTACKS: tuple[str, ...] = ("loss", "zlib", "lowercase", "min_k", "min_k_pp", "ref")
CLASSIFIER_ATTACKS: tuple[str, ...] = ("loss", "confidence", "entropy", "modified_entropy")
_EPS = 1e-12


@dataclass(frozen=True)
class TokenScores:
    """Per-record token statistics of one model (input order). ``logprobs[i]``: ℓ_t of record i's
    predicted tokens (float64, nats, length ``n_tokens[i]``). ``mu`` / ``var``: E and Var of
    log p(z | x_<t) over the vocabulary at the same positions (None unless requested)."""

    logprobs: tuple[NDArray[np.float64], ...]
    mu: tuple[NDArray[np.float64], ...] | None = None
    var: tuple[NDArray[np.float64], ...] | None = None

    @property
    def n_tokens(self) -> NDArray[np.int64]:
        return np.array([lp.size for lp in self.logprobs], dtype=np.int64)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: expected a sequence of strings")
    if len(texts) == 0:
        raise ValueError("texts: must not be empty")
    return list(texts)


def _model_device(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _encode_each(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def _padded(ids: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids (pad id 0: masked, and with right padding a causal model's real tokens
    never attend to it) and the attention mask."""
    import torch

    width = max(len(x) for x in ids)
    inp = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return inp.to(device), mask.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first: an out-of-memory error shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def token_scores(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
                 max_length: int = 512, vocab_stats: bool = False) -> TokenScores:
    """ONE batched pass of a causal LM over ``texts``: ℓ_t per record and, with ``vocab_stats``, μ_t
    and σ_t² over the vocabulary (see the module docstring). Texts are tokenized with the tokenizer's
    defaults (special tokens included) and truncated to ``max_length`` tokens (at most the model's
    position limit); a record of fewer than
    2 tokens is a ``ValueError``. The model is put in eval mode on its own device."""
    import torch

    texts = _check_texts(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: must be an integer >= 2, got {max_length!r}")
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int) and limit >= 2:
        max_length = min(max_length, limit)  # longer inputs would index past the position table
    ids = _encode_each(tokenizer, texts, max_length)
    short = [i for i, x in enumerate(ids) if len(x) < 2]
    if short:
        raise ValueError(f"texts: {len(short)} record(s) have fewer than 2 tokens (first: index {short[0]})")
    device = _model_device(model)
    model.eval()

    def score(indices: Sequence[int]) -> list[tuple[Any, Any, Any]]:
        """ℓ_t (μ_t, σ_t²) of the records ``indices``, in that order, batched by length."""
        sub = [ids[int(i)] for i in indices]
        out: list[tuple[Any, Any, Any]] = [(None, None, None)] * len(sub)
        with torch.inference_mode():
            for idx in _batches([len(x) for x in sub], batch_size):
                inp, mask = _padded([sub[i] for i in idx], device)
                valid = mask[:, 1:].bool()
                flat = model(input_ids=inp, attention_mask=mask).logits[:, :-1][valid]  # (predicted tokens, V)
                tgt = inp[:, 1:][valid]
                tok, mu, var = _token_stats(flat, tgt, vocab_stats)
                del flat
                pos = 0
                for i in idx:  # boolean indexing is row-major: each record's tokens are contiguous
                    n = len(sub[i]) - 1
                    out[i] = (tok[pos:pos + n], mu[pos:pos + n] if vocab_stats else None,  # type: ignore[index]
                              var[pos:pos + n] if vocab_stats else None)  # type: ignore[index]
                    pos += n
        return out

    # under torchrun the records are split across the ranks and gathered in order (one process: all here)
    rows = sharded_map(world_from_env(), len(texts), score)
    return TokenScores(tuple(r[0] for r in rows),
                       tuple(r[1] for r in rows) if vocab_stats else None,
                       tuple(r[2] for r in rows) if vocab_stats else None)


def _token_stats(flat: torch.Tensor, tgt: torch.Tensor, vocab_stats: bool
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, NDArray[np.float64] | None]:
    """ℓ_t (and μ_t, σ_t²) from logits ``(N, V)`` of predicted positions, in row chunks of ~16 MB so
    the float32 temporaries stay small (in-place ops; no padded positions are touched)."""
    import torch

    n, v = flat.shape
    chunk = max(1, (1 << 22) // max(v, 1))
    tok = torch.empty(n, dtype=torch.float32, device=flat.device)
    mu = torch.empty_like(tok) if vocab_stats else None
    var = torch.empty_like(tok) if vocab_stats else None
    for s in range(0, n, chunk):
        z = flat[s:s + chunk].float()
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # log p (a fresh tensor: flat is not modified)
        tok[s:s + chunk] = z.gather(-1, tgt[s:s + chunk, None])[:, 0]
        if vocab_stats:
            p = z.exp()
            m = (p * z).sum(-1)
            z.sub_(m[:, None]).square_()
            mu[s:s + chunk] = m  # type: ignore[index]
            var[s:s + chunk] = (p * z).sum(-1)  # type: ignore[index]

    def host(t: torch.Tensor | None) -> NDArray[np.float64] | None:
        return None if t is None else t.double().cpu().numpy()

    return host(tok), host(mu), host(var)  # type: ignore[return-value]


# -- the score formulas (each pinned by a hand-computed unit test) ---------------------------------


def _k_count(n: int, k: float) -> int:
    return max(1, int(n * k))


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k: must be a fraction in (0, 1], got {k!r}")
    return float(k)


def loss_score(logprobs: Sequence[NDArray[np.float64]]) -> NDArray[np.float64]:
    """(1/T) Σ ℓ_t per record (= −mean token NLL)."""
    return np.array([float(np.mean(lp)) for lp in logprobs])


def zlib_length(text: str) -> int:
    """Bytes of ``zlib.compress(text.encode('utf-8'), 9)``."""
    return len(zlib.compress(text.encode("utf-8"), 9))


def zlib_score(logprobs: Sequence[NDArray[np.float64]], texts: Sequence[str]) -> NDArray[np.float64]:
    """−[(1/T) Σ −ℓ_t] / zlib_len(x) per record."""
    if len(logprobs) != len(texts):
        raise ValueError(f"texts: {len(texts)} texts for {len(logprobs)} records")
    return np.array([float(np.mean(lp)) / zlib_length(t) for lp, t in zip(logprobs, texts)])


def min_k_score(logprobs: Sequence[NDArray[np.float64]], k: float = 0.2) -> NDArray[np.float64]:
    """Min-K% Prob: mean of the ⌊k·T⌋ (≥ 1) smallest ℓ_t per record."""
    k = _check_k(k)
    return np.array([float(np.mean(np.sort(lp)[:_k_count(lp.size, k)])) for lp in logprobs])


def min_k_pp_score(logprobs: Sequence[NDArray[np.float64]], mu: Sequence[NDArray[np.float64]],
                   var: Sequence[NDArray[np.float64]], k: float = 0.2) -> NDArray[np.float64]:
    """Min-K%++: mean of the ⌊k·T⌋ (≥ 1) smallest z_t = (ℓ_t − μ_t)/σ_t per record."""
    k = _check_k(k)
    out = []
    for lp, m, v in zip(logprobs, mu, var, strict=True):
        z = (lp - m) / np.sqrt(np.maximum(v, _EPS))
        out.append(float(np.mean(np.sort(z)[:_k_count(z.size, k)])))
    return np.array(out)


# -- model-level entry points ----------------------------------------------------------------------


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """The base model of a PEFT model (adapter layers bypassed) inside the block."""
    ctx = getattr(model, "disable_adapter", None)
    if ctx is None:
        raise ValueError("reference: 'base' needs a PEFT model (one with an adapter to disable)")
    with ctx():
        yield model


def _wanted(attacks: Sequence[str] | None, known: Sequence[str], has_ref: bool) -> list[str]:
    if attacks is None:
        return [a for a in known if a != "ref" or has_ref]
    names = list(dict.fromkeys(attacks))
    for a in names:
        if a not in known:
            raise ValueError(f"attacks: unknown attack {a!r} (known: {', '.join(known)})")
    if "ref" in names and not has_ref:
        raise ValueError("attacks: 'ref' needs a reference model")
    return names


def llm_scores(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
               reference: Any = None, reference_tokenizer: Any = None, attacks: Sequence[str] | None = None,
               k: float = 0.2, max_length: int = 512) -> dict[str, NDArray[np.float64]]:
    """Per-record membership scores of a causal LM, ``{attack: array(len(texts))}``, higher = member.

    One scoring pass of ``model`` (with vocabulary statistics only when ``min_k_pp`` is wanted), one
    of the reference when ``ref`` is wanted, one over lower-cased texts when ``lowercase`` is.
    ``reference``: None, another causal LM (tokenized with ``reference_tokenizer``, default: the
    target's tokenizer; losses are per token of each model's own tokenization), or ``"base"`` (the PEFT
    ``model`` with its adapter disabled). ``attacks``: a subset of :data:`CAUSAL_LM_ATTACKS` (default: all that apply).
    ``k``: the Min-K% fraction. Also returns ``n_tokens`` (predicted tokens per record).
    """
    texts = _check_texts(texts)
    names = _wanted(attacks, CAUSAL_LM_ATTACKS, reference is not None)
    k = _check_k(k)
    ts = token_scores(model, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                      vocab_stats="min_k_pp" in names)
    out: dict[str, NDArray[np.float64]] = {}
    loss = loss_score(ts.logprobs)
    if "loss" in names:
        out["loss"] = loss
    if "zlib" in names:
        out["zlib"] = zlib_score(ts.logprobs, texts)
    if "min_k" in names:
        out["min_k"] = min_k_score(ts.logprobs, k)
    if "min_k_pp" in names:
        assert ts.mu is not None and ts.var is not None
        out["min_k_pp"] = min_k_pp_score(ts.logprobs, ts.mu, ts.var, k)
    if "lowercase" in names:
        low = token_scores(model, tokenizer, [t.lower() for t in texts], batch_size=batch_size,
                           max_length=max_length)
        out["lowercase"] = loss - loss_score(low.logprobs)  # = loss(lower(x)) − loss(x) in NLL terms
    if "ref" in names:
        if isinstance(reference, str):
            if reference != "base":
                raise ValueError(f"reference: must be a model, 'base' or None, got {reference!r}")
            with adapter_disabled(model) as base:
                ref = token_scores(base, tokenizer, texts, batch_size=batch_size, max_length=max_length)
        else:
            ref = token_scores(reference, reference_tokenizer if reference_tokenizer is not None else tokenizer,
                               texts, batch_size=batch_size, max_length=max_length)
        out["ref"] = loss - loss_score(ref.logprobs)  # loss_ref − loss_target
    out["n_tokens"] = ts.n_tokens.astype(np.float64)
    return out


def classifier_scores_from_probs(probs: NDArray[np.float64], labels: NDArray[np.int64]
                                 ) -> dict[str, NDArray[np.float64]]:
    """The classifier attacks from softmax probabilities ``(n, C)`` and true labels ``(n,)``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"labels: need shape ({p.shape[0]},) for probabilities of shape {p.shape}")
    py = p[np.arange(p.shape[0]), y]
    one_minus = np.clip(1.0 - p, _EPS, 1.0)
    others = np.ones_like(p, dtype=bool)
    others[np.arange(p.shape[0]), y] = False
    mentr = -(1.0 - py) * np.log(py) - np.where(others, p * np.log(one_minus), 0.0).sum(axis=1)
    return {
        "loss": np.log(py),
        "confidence": py,
        "entropy": (p * np.log(p)).sum(axis=1),
        "modified_entropy": -mentr,
    }


def classifier_scores(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
                      batch_size: int = 16, max_length: int = 512, attacks: Sequence[str] | None = None
                      ) -> dict[str, NDArray[np.float64]]:
    """Per-record membership scores of a sequence classifier (one pass), ``{attack: array}``."""
    import torch

    from privaudit.models import encode_batch

    texts = _check_texts(texts)
    names = _wanted(attacks, CLASSIFIER_ATTACKS, False)
    y = np.asarray(list(labels))
    if y.shape != (len(texts),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels: need {len(texts)} integer labels")
    n_cls = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    if n_cls and ((y < 0).any() or (y >= n_cls).any()):
        raise ValueError(f"labels: must be integers in [0, {n_cls}) for this model")
    device = _model_device(model)
    model.eval()
    probs: list[NDArray[np.float64]] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = encode_batch(tokenizer, texts[start:start + batch_size], max_length, device=device)
            if not hasattr(getattr(model, "config", None), "type_vocab_size"):  # decoders: no segment ids
                batch.pop("token_type_ids", None)
            logits = model(**batch).logits.float()
            probs.append(torch.softmax(logits, dim=-1).double().cpu().numpy())
    out = classifier_scores_from_probs(np.concatenate(probs), y)
    return {k: v for k, v in out.items() if k in names}
