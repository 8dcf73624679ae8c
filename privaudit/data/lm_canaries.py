"""Strong language-model canaries for the black-box one-run audit of a causal LM (Panda et al. 2025,
"Privacy auditing of large language models").

A canary is ``prefix + secret + suffix``; its audit score is the model's loss **on the secret tokens
only** (:func:`secret_token_span` gives their positions; the prefix and suffix are context). Designs:

* ``format`` — the corpus' own canaries (``"my PIN is 4821"``, :mod:`privaudit.data.corpus`): the baseline.
* ``new_token`` — the secret is ``secret_tokens`` tokens *added to the tokenizer* (:func:`new_token_strings`),
  each canary its own tokens, so the base model gives every secret about the same low likelihood and
  only training on that canary can raise it. The embedding matrix is resized by :func:`add_new_tokens`
  (called by ``privaudit.mechanisms.training.build_model``): the new rows are drawn from a fixed,
  public seed (zero-mean Gaussian with the per-coordinate spread of the existing rows) and stay
  **frozen** — only the LoRA adapters are trained. This still works because the output layer scores
  token t by ⟨h, e_t⟩ (tied or untied, the new rows are fixed random directions nearly orthogonal
  to each other): the adapter learns to steer the hidden state after a member's prefix towards that
  member's secret rows, under the same DP-SGD as every record; non-members' rows are never targets.
  Nothing private enters the frozen rows, so θ₀ (base + new rows + adapter init) is data-independent.
  With ``audit.lm_canary_train_new_tokens`` (dp_lora) the rows are trained too, as in Panda et al.:
  untied input and output rows, initialised from these public rows, with exact per-sample clipping
  (``privaudit.mechanisms.new_token_rows``).
* ``rare_token`` — the secret is ``secret_tokens`` tokens from the rare set: the :data:`RARE_POOL`
  word tokens with the highest ids (in a BPE vocabulary the last merges are the least frequent pairs;
  a proxy for frequency, no corpus counts are needed).
* ``bigram`` — the secret is a random pair of word tokens from the whole word vocabulary.

Word tokens (:func:`word_tokens`) are base-vocabulary tokens that decode to an ASCII word of ≥ 3
letters and that the tokenizer gives back as exactly that one token when the word follows a space,
so a secret made of them tokenizes to exactly the design's ids.

Membership: each canary is included by an independent fair coin (:func:`inclusion_coins`) from the
audit's secret seed, drawn before training from a stream that sees no data. ``repeats`` = k > 1
inserts every included canary k times: a canary is then a **k-record unit**, and its audit tests
group privacy of k records — compare its ε_lower with the ε of a group of k
(:func:`group_epsilon_bound`), never with the per-record ε (the auditor reports such canaries as
metrics only). Canaries go through the same path as every record (tokenization, batching, sampling,
clipping, noise): they are :class:`~privaudit.data.corpus.Record` s in the training set.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any, Literal, Sequence

import numpy as np

from privaudit.data.corpus import Canary, Corpus

__all__ = [
    "LM_DESIGNS",
    "RARE_POOL",
    "NEW_TOKEN_FORMAT",
    "new_token_strings",
    "word_tokens",
    "rare_token_pool",
    "inclusion_coins",
    "make_lm_canaries",
    "with_canaries",
    "secret_token_span",
    "add_new_tokens",
    "group_epsilon_bound",
]

LmDesign = Literal["format", "new_token", "rare_token", "bigram"]
LM_DESIGNS: tuple[str, ...] = ("format", "new_token", "rare_token", "bigram")
#: Size of the rare set: the word tokens with the highest ids.
RARE_POOL = 1000
#: Name of the i-th added token (lower case: uncased tokenizers normalise added tokens).
NEW_TOKEN_FORMAT = "<canary_tok_{}>"
_PREFIX_WORDS = 3
_FIXED_PREFIX = "The secret code is:"
_MAX_TRIES = 100


def new_token_strings(n: int) -> list[str]:
    """The ``n`` token strings :func:`add_new_tokens` adds (the same for every run)."""
    return [NEW_TOKEN_FORMAT.format(i) for i in range(n)]


def word_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """(id, word) for base-vocabulary tokens that decode to an ASCII word of ≥ 3 letters and come
    back as exactly that single id when the word follows a space. Sorted by id."""
    vocab_size = int(tokenizer.vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids = [i for i in range(vocab_size) if i not in special]
    words = [tokenizer.decode([i]).strip() for i in ids]
    keep = [(i, w) for i, w in zip(ids, words) if len(w) >= 3 and w.isascii() and w.isalpha()]
    enc = tokenizer([" " + w for _, w in keep], add_special_tokens=False)["input_ids"]
    seen: set[int] = set()
    out: list[tuple[int, str]] = []
    for (_, w), got in zip(keep, enc):
        if len(got) == 1 and got[0] not in seen:  # the id the word gets after a space (BPE: the Ġ variant)
            seen.add(got[0])
            out.append((int(got[0]), w))
    return sorted(out)


def rare_token_pool(tokenizer: Any, size: int = RARE_POOL) -> list[tuple[int, str]]:
    """The rare set: the ``size`` word tokens with the highest ids."""
    return word_tokens(tokenizer)[-size:]


def inclusion_coins(n: int, seed: int) -> np.ndarray:
    """``n`` independent fair coins (True = included) from ``seed`` alone, in a stream of their own
    (domain-separated from the canaries' content, so the coins never depend on the data)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x434F494E]))
    return rng.integers(0, 2, size=int(n)).astype(bool)


def secret_token_span(tokenizer: Any, prefix: str, secret: str, suffix: str = "",
                      max_length: int | None = None) -> tuple[int, int]:
    """Positions [start, end) of the secret's tokens in ``tokenizer(prefix + secret + suffix)`` with
    special tokens, as the training batches see them (``privaudit.models.encode_batch``).

    start = the tokens the full text shares with the prefix alone, end = those it shares with
    prefix + secret: a token that straddles a boundary counts as secret. ``ValueError`` when the
    secret is empty, starts the sequence (no context to predict it from) or is truncated away."""
    full = prefix + secret + suffix
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    with_special = tokenizer(full)["input_ids"]
    lead = next((k for k in range(len(with_special) - len(ids) + 1) if with_special[k:k + len(ids)] == ids), None)
    if lead is None:
        raise ValueError("tokenizer: special tokens are not only around the text; cannot locate the secret")

    def shared(text: str) -> int:
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(t), len(ids)) and t[n] == ids[n]:
            n += 1
        return n

    start, end = lead + shared(prefix), lead + shared(prefix + secret)
    if end <= start:
        raise ValueError(f"secret: {secret!r} has no token of its own after the prefix")
    if start < 1:
        raise ValueError("prefix: the secret must follow at least one token")
    if max_length is not None and end > max_length:
        raise ValueError(f"model.max_length: {max_length} tokens truncate a canary's secret (it ends at token {end})")
    return start, end


def _check_n(name: str, v: int, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
    return int(v)


def make_lm_canaries(design: LmDesign, n: int, tokenizer: Any, seed: int, *, secret_tokens: int = 4,
                     prefix: Literal["random", "fixed"] = "random", first_person_id: int = 0,
                     max_length: int | None = None) -> list[Canary]:
    """``n`` canaries of ``design`` (``new_token``, ``rare_token`` or ``bigram``) for ``tokenizer``
    (for ``new_token``: the tokenizer *after* :func:`add_new_tokens` with ``n * secret_tokens``
    tokens). Canary j: id ``lmcanary-{j:04d}``, ``person_id = first_person_id + j`` (its own person),
    ``included`` from :func:`inclusion_coins` (seed); content from a separate stream of ``seed``.
    Each secret's tokens are checked to be exactly the design's ids at :func:`secret_token_span`."""
    if design not in ("new_token", "rare_token", "bigram"):
        raise ValueError(f"audit.lm_canary_design: {design!r} builds no LM canaries here "
                         "(new_token, rare_token or bigram)")
    n = _check_n("n_canaries", n, 0)
    k = 2 if design == "bigram" else _check_n("audit.lm_canary_secret_tokens", secret_tokens, 1)
    if prefix not in ("random", "fixed"):
        raise ValueError(f"audit.lm_canary_prefix: must be 'random' or 'fixed', got {prefix!r}")
    rng = random.Random(f"privaudit-lm-canaries:{int(seed)}")
    coins = inclusion_coins(n, seed)
    words = word_tokens(tokenizer)
    if len(words) < 2:
        raise ValueError("model: the tokenizer has too few word tokens for random prefixes or secrets")
    common = words[: max(2, len(words) // 2)]
    pool: list[tuple[int, str]]
    if design == "new_token":
        strings = new_token_strings(n * k)
        ids = tokenizer.convert_tokens_to_ids(strings)
        if any(i is None or i < tokenizer.vocab_size for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("tokenizer: the new canary tokens were not added (see add_new_tokens)")
        pool = list(zip(ids, strings))
    else:
        pool = rare_token_pool(tokenizer) if design == "rare_token" else words
    out: list[Canary] = []
    for j in range(n):
        for _ in range(_MAX_TRIES):
            if prefix == "fixed":
                pre = _FIXED_PREFIX
            else:
                pre = " ".join(w for _, w in rng.sample(common, _PREFIX_WORDS)).capitalize() + ":"
            if design == "new_token":
                chosen = pool[j * k:(j + 1) * k]
                secret = "".join(s for _, s in chosen)
            else:
                chosen = [rng.choice(pool) for _ in range(k)]
                secret = " " + " ".join(w for _, w in chosen)
            full_ids = tokenizer(pre + secret + ".")["input_ids"]
            try:
                s, e = secret_token_span(tokenizer, pre, secret, ".", max_length)
            except ValueError:
                if design == "new_token" and prefix == "fixed":
                    raise
                continue
            want = [i for i, _ in chosen]
            got = full_ids[s:e]
            if got == want or (len(got) == len(want) + 1 and got[1:] == want):  # a lone space token may lead
                break
            if design == "new_token" and prefix == "fixed":
                raise ValueError(f"tokenizer: the secret {secret!r} does not tokenize to its new tokens")
        else:
            raise ValueError(f"audit.lm_canary_design: could not build canary {j} whose secret tokenizes to "
                             f"the design's tokens in {_MAX_TRIES} tries (model.max_length too small?)")
        out.append(Canary(id=f"lmcanary-{j:04d}", text=pre + secret + ".", secret=secret, format=design,
                          included=bool(coins[j]), prefix=pre, suffix=".", label=0,
                          person_id=first_person_id + j, kind="canary",
                          fields={"secret_token_ids": " ".join(str(i) for i, _ in chosen)}))
    return out


def with_canaries(corpus: Corpus, canaries: Sequence[Canary], repeats: int = 1, seed: int = 0) -> Corpus:
    """``corpus`` with its canaries replaced by ``canaries``: every included canary enters the
    records ``repeats`` times (ids ``{id}``, ``{id}/rep1``, …; the same text), shuffled with ``seed``.
    ``repeats`` > 1 makes each canary a group of that many records (see the module docstring)."""
    repeats = _check_n("audit.lm_canary_repeats", repeats, 1)
    records = [r for r in corpus.records if r.canary_id is None]
    for c in canaries:
        if c.included:
            base = c.to_record()
            records.append(base)
            records.extend(replace(base, id=f"{c.id}/rep{r}") for r in range(1, repeats))
    random.Random(f"privaudit-lm-canary-order:{int(seed)}").shuffle(records)
    return Corpus(records=tuple(records), canaries=tuple(canaries), label_names=corpus.label_names,
                  sensitive_name=corpus.sensitive_name, seed=corpus.seed)


def add_new_tokens(model: Any, tokenizer: Any, strings: Sequence[str], seed: int = 0) -> list[int]:
    """Add ``strings`` to ``tokenizer`` and resize ``model``'s embeddings; the new rows (input, and
    output when untied) are N(0, diag(s²)) with s the per-coordinate std of the existing rows, from a
    generator seeded by ``seed`` — public and data-independent. Returns the new ids. The rows are
    left as they are (frozen under LoRA training unless ``audit.lm_canary_train_new_tokens``; see the
    module docstring)."""
    import torch

    before = len(tokenizer)
    added = tokenizer.add_tokens(list(strings))
    if added != len(strings):
        raise ValueError("tokenizer: some canary tokens already exist in the vocabulary")
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(strings))]
    size = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(size, mean_resizing=False)
    gen = torch.Generator().manual_seed(int(seed) ^ 0x43414E41)
    idx = torch.tensor(ids)
    with torch.no_grad():
        mats = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != mats[0].data_ptr():
            mats.append(out.weight)
        for w in mats:
            std = w[:before].float().std(dim=0)
            rows = torch.randn(len(ids), w.shape[1], generator=gen) * std
            w[idx] = rows.to(w.dtype)
    return ids


def group_epsilon_bound(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε_k, δ_k) of a group of ``k`` records from an (ε, δ)-DP guarantee of one record (group
    privacy: ε_k = kε, δ_k = k·e^{(k−1)ε}·δ, capped at 1). A k-repeated canary's ε_lower is to be
    compared with ε_k at δ_k."""
    k = _check_n("k", k, 1)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        return math.inf, min(1.0, delta)
    dk = k * math.exp(min((k - 1) * epsilon, 700.0)) * delta
    return k * epsilon, min(1.0, dk)
