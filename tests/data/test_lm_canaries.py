"""Language-model canary designs (privaudit.data.lm_canaries) and their audit on a tiny causal LM."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from privaudit.config import parse_config
from privaudit.data.lm_canaries import (
    group_epsilon_bound,
    inclusion_coins,
    make_lm_canaries,
    new_token_strings,
    rare_token_pool,
    secret_token_span,
    word_tokens,
)
from privaudit.mechanisms.training import build_model, prepare_data
from privaudit.models import load_tokenizer

TINY = {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}}
BASE: dict[str, Any] = {
    "task": "causal_lm",
    "model": TINY,
    "lora": {"rank": 2, "alpha": 4},
    "data": {"synthetic": {"n_people": 6, "records_per_person": 1, "n_canaries": 12}, "heldout_fraction": 0.5},
    "training": {"steps": 1, "batch_size": 4},
    "privacy": {"noise_multiplier": 0.0},
}


def _cfg(**audit: Any) -> Any:
    raw = copy.deepcopy(BASE)
    raw["audit"] = audit
    return parse_config(raw)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer("tiny-gpt2")


def _ids(tok: Any, c: Any) -> list[int]:
    s, e = secret_token_span(tok, c.prefix, c.secret, c.suffix)
    return tok(c.text)["input_ids"][s:e]


def test_rare_token_secrets_come_from_the_rare_set(tok: Any) -> None:
    rare = {i for i, _ in rare_token_pool(tok)}
    words = word_tokens(tok)
    assert len(rare) == 1000 and min(rare) > sorted(i for i, _ in words)[len(words) // 2]  # the high-id tail
    cs = make_lm_canaries("rare_token", 20, tok, seed=3, secret_tokens=4)
    for c in cs:
        ids = _ids(tok, c)
        assert len(ids) == 4 and set(ids) <= rare
        assert [int(x) for x in c.fields["secret_token_ids"].split()] == ids


def test_bigram_secrets_are_two_word_tokens(tok: Any) -> None:
    words = {i for i, _ in word_tokens(tok)}
    cs = make_lm_canaries("bigram", 20, tok, seed=3, secret_tokens=7)  # bigram: always 2
    pairs = [tuple(_ids(tok, c)) for c in cs]
    assert all(len(p) == 2 and set(p) <= words for p in pairs)
    assert len(set(pairs)) == len(pairs)  # random pairs: no two canaries share one


def test_new_token_secrets_are_added_tokens_outside_the_base_vocabulary() -> None:
    cfg = _cfg(lm_canary_design="new_token", lm_canary_secret_tokens=3)
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    base = load_tokenizer("tiny-gpt2")
    strings = new_token_strings(12 * 3)
    assert all(s not in base.get_vocab() for s in strings)
    new_ids = tok.convert_tokens_to_ids(strings)
    assert min(new_ids) >= base.vocab_size and len(set(new_ids)) == len(new_ids)
    data = prepare_data(cfg)
    seen: set[int] = set()
    for c in data.corpus.canaries:
        ids = _ids(tok, c)
        assert len(ids) == 3 and set(ids) <= set(new_ids) and not (set(ids) & seen)  # own tokens per canary
        seen |= set(ids)
    # the embedding holds the new rows, drawn from a public seed: a second build has the same θ₀
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= len(tok)
    model2, _ = build_model(cfg, 2, torch.device("cpu"))
    assert torch.equal(emb[new_ids], model2.get_input_embeddings().weight[new_ids])
    assert emb[new_ids].norm(dim=1).min() > 0
    assert not emb.requires_grad  # frozen: only LoRA is trained (see the module docstring)


def test_the_score_is_the_loss_of_the_secret_tokens_only(tok: Any) -> None:
    from privaudit.attacks.released_model import secret_nll

    cfg = _cfg(lm_canary_design="rare_token")
    torch.manual_seed(0)
    model, tk = build_model(cfg, 2, torch.device("cpu"))
    cs = make_lm_canaries("rare_token", 5, tk, seed=1, secret_tokens=3)
    got = secret_nll(model, tk, cs, cfg, torch.device("cpu"))
    for c, g in zip(cs, got):
        ids = torch.tensor([tk(c.text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        per_token = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0]  # NLL of token t at index t - 1
        s, e = secret_token_span(tk, c.prefix, c.secret, c.suffix)
        assert e - s == 3 and s >= 2 and e < ids.shape[1]  # prefix and suffix tokens exist outside the span
        assert g == pytest.approx(float(per_token[s - 1:e - 1].sum()), rel=1e-5)
        assert abs(g - float(per_token.sum())) > 1e-3  # the prefix and suffix are not scored
    # a different prefix changes only the context: the secret keeps its tokens and span length
    c = cs[0]
    other = type(c)(**{**c.__dict__, "prefix": "Another quite different prefix:", "text": "Another quite different "
                       "prefix:" + c.secret + c.suffix})
    assert _ids(tk, other) == _ids(tk, c)


def test_inclusion_coins_are_fair_independent_and_data_free(tok: Any) -> None:
    coins = inclusion_coins(20_000, seed=123)
    assert stats.binomtest(int(coins.sum()), coins.size, 0.5).pvalue > 1e-3
    # independence of consecutive coins: 2x2 table of (c_i, c_{i+1})
    table = np.histogram2d(coins[:-1].astype(int), coins[1:].astype(int), bins=2)[0]
    assert stats.chi2_contingency(table)[1] > 1e-3
    assert not np.array_equal(coins[:100], inclusion_coins(100, seed=124))
    # the coins depend on the seed alone: not on the design, the tokenizer, the secrets or the corpus
    a = [c.included for c in make_lm_canaries("rare_token", 30, tok, seed=9)]
    b = [c.included for c in make_lm_canaries("bigram", 30, tok, seed=9, prefix="fixed")]
    assert a == b == list(inclusion_coins(30, 9))
    d1 = prepare_data(_cfg(lm_canary_design="bigram", lm_canary_seed=5))
    raw = copy.deepcopy(BASE)
    raw["data"]["synthetic"]["n_people"] = 9
    raw["data"]["synthetic"]["seed"] = 4
    raw["audit"] = {"lm_canary_design": "bigram", "lm_canary_seed": 5}
    d2 = prepare_data(parse_config(raw))
    assert [c.included for c in d1.corpus.canaries] == [c.included for c in d2.corpus.canaries]


@pytest.mark.parametrize("design", ["format", "bigram"])
def test_repeats_put_each_included_canary_k_times_in_training(design: str) -> None:
    data = prepare_data(_cfg(lm_canary_design=design, lm_canary_repeats=3))
    counts: dict[str, int] = {}
    for r in data.train:
        if r.canary_id is not None:
            counts[r.canary_id] = counts.get(r.canary_id, 0) + 1
    for c in data.corpus.canaries:
        assert counts.get(c.id, 0) == (3 if c.included else 0)
    assert len({r.id for r in data.train}) == len(data.train)


def test_config_refuses_lm_designs_outside_causal_lm() -> None:
    raw = copy.deepcopy(BASE)
    raw["task"] = "classification"
    raw["audit"] = {"lm_canary_design": "new_token"}
    with pytest.raises(ValueError, match="^audit.lm_canary_design"):
        parse_config(raw)
    raw["task"] = "causal_lm"
    raw["mechanism"] = "pae_mobillm"
    with pytest.raises(ValueError, match="^audit.lm_canary_design: new_token needs"):
        parse_config(raw)
    raw["mechanism"] = "dp_lora"
    raw["data"]["synthetic"]["canary_inclusion"] = 0.3
    with pytest.raises(ValueError, match="^data.synthetic.canary_inclusion"):
        parse_config(raw)
    raw["audit"] = {"lm_canary_repeats": 0}
    with pytest.raises(ValueError, match="lm_canary_repeats"):
        parse_config(raw)


def test_group_bound() -> None:
    assert group_epsilon_bound(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = group_epsilon_bound(2.0, 1e-6, 3)
    assert eps == 6.0 and delta == pytest.approx(3 * math.exp(4.0) * 1e-6)
    assert group_epsilon_bound(8.0, 1e-5, 4)[1] == 1.0  # capped: no group guarantee left


@pytest.mark.slow
def test_a_non_private_run_with_repeated_new_token_canaries_is_caught(tmp_path: Path) -> None:
    """Non-private tiny LM, 24 new-token canaries, each included one repeated 4 times: the secret-only
    loss separates members (AUC ≥ 0.9); repeats make the attack metrics-only in the verdict."""
    from privaudit.audit.auditor import audit_run
    from privaudit.runs import train

    raw = copy.deepcopy(BASE)
    raw.update({
        "model": {**TINY, "max_length": 16},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "lm_head"]},
        "data": {"synthetic": {"n_people": 4, "records_per_person": 1, "n_canaries": 24}, "heldout_fraction": 0.5},
        "training": {"epochs": 10, "batch_size": 16, "learning_rate": 0.05, "optimizer": "adam"},
        "privacy": {"noise_multiplier": 0.0, "noise_seed": 1},
        "audit": {"lm_canary_design": "new_token", "lm_canary_repeats": 4, "lm_canary_secret_tokens": 2},
    })
    train(parse_config(raw), tmp_path / "run", progress=False)
    res = audit_run(tmp_path / "run", attacks=["lm_canary_membership"], n_bootstrap=50)
    att = res.attack("lm_canary_membership")
    assert att.metrics["auc"] >= 0.9
    assert att.metrics["secret_nll_mean_included"] < att.metrics["secret_nll_mean_excluded"]
    assert att.epsilon_lower is None and "group privacy" in (att.note or "")


def test_the_study_file_is_dispatched_and_checked() -> None:
    from privaudit.studies import study_mechanism
    from privaudit.studies.lm_canaries import load_study, summarise

    raw = {"study": "lm_canaries", "base": copy.deepcopy(BASE), "designs": ["new_token", "format"],
           "privacy": [{"noise_multiplier": 0}, {"target_epsilon": 8}]}
    assert study_mechanism(raw) == "lm_canaries"
    st = load_study(raw)
    assert [p.name for p in st.privacy] == ["nonprivate", "eps8"]
    with pytest.raises(ValueError, match="^privacy"):
        load_study({**raw, "privacy": [{"noise_multiplier": 1.0, "target_epsilon": 8}]})
    with pytest.raises(ValueError, match="^designs"):
        load_study({**raw, "designs": ["nope"]})
    bad = copy.deepcopy(raw)
    bad["base"]["task"] = "classification"
    with pytest.raises(ValueError, match="^audit.lm_canary_design"):
        load_study(bad)
    rows = [{"design": "new_token", "point": "eps8", "auc": 0.7, "epsilon_lower": 1.0, "bound": "one_run_fdp",
             "accounted_epsilon": 8.0, "ratio": 0.125}]
    want = {k: rows[0][k] for k in ("auc", "epsilon_lower", "bound", "accounted_epsilon", "ratio")}
    assert summarise(rows) == {"new_token": {"eps8": want}}


@pytest.mark.slow
def test_the_design_study_on_a_tiny_model(tmp_path: Path) -> None:
    """The study end to end on a tiny LM: one row per design, repeated canaries compared with the
    group bound (no guarantee without noise, so no group violation can be claimed)."""
    import json

    from privaudit.studies.lm_canaries import load_study, run_study

    base = copy.deepcopy(BASE)
    base.update({
        "model": {**TINY, "max_length": 16},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "lm_head"]},
        "data": {"synthetic": {"n_people": 4, "records_per_person": 1, "n_canaries": 16}, "heldout_fraction": 0.5},
        "training": {"epochs": 8, "batch_size": 8, "learning_rate": 0.05, "optimizer": "adam"},
        "privacy": {"noise_seed": 1},
        "audit": {"lm_canary_repeats": 3, "lm_canary_secret_tokens": 2},
    })
    study = load_study({"study": "lm_canaries", "base": base, "designs": ["new_token", "bigram"],
                        "privacy": [{"noise_multiplier": 0}]})
    rows = run_study(study, tmp_path)
    assert [r["design"] for r in rows] == ["new_token", "bigram"]
    assert [json.loads(x)["design"] for x in (tmp_path / "rows.jsonl").read_text().splitlines()] == ["new_token",
                                                                                                    "bigram"]
    for r in rows:
        assert r["n_canaries"] == 16 and r["repeats"] == 3 and r["epsilon_lower"] is None  # metrics only
        assert r["auc"] > 0.5 and r["group_k"] == 3 and r["group_epsilon"] is None  # σ = 0: no group bound
        assert r["group_epsilon_lower"] is not None and r["group_epsilon_lower"] >= 0
        assert r["group_violation"] is False
