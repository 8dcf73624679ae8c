"""The language-model score formulas on hand-computed examples, and the batched pass against a
per-record computation."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from privaudit.attacks.llm_scores import (
    classifier_scores_from_probs,
    llm_scores,
    loss_score,
    min_k_pp_score,
    min_k_score,
    token_scores,
    zlib_length,
    zlib_score,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_min_k_hand_example() -> None:
    lp = [np.array([-0.1, -2.0, -0.5, -3.0, -0.2, -1.0, -0.3, -0.4, -0.6, -0.7])]
    # k = 20% of 10 tokens = 2 smallest: -3.0, -2.0
    assert min_k_score(lp, 0.2)[0] == pytest.approx(-2.5)
    # k = 30% -> 3 smallest: -3, -2, -1
    assert min_k_score(lp, 0.3)[0] == pytest.approx(-2.0)
    # fewer tokens than 1/k: at least one token (the smallest)
    assert min_k_score([np.array([-0.5, -1.5])], 0.2)[0] == pytest.approx(-1.5)


def test_min_k_pp_hand_example() -> None:
    lp = [np.array([-1.0, -2.0, -0.5, -4.0])]
    mu = [np.array([-1.0, -1.0, -1.0, -2.0])]
    var = [np.array([1.0, 4.0, 0.25, 1.0])]
    # z = [0, -0.5, 2, -2]; k = 50% -> 2 smallest: -2, -0.5 -> mean -1.25
    assert min_k_pp_score(lp, mu, var, 0.5)[0] == pytest.approx(-1.25)
    # k = 25% -> one: -2
    assert min_k_pp_score(lp, mu, var, 0.25)[0] == pytest.approx(-2.0)


def test_zlib_and_loss_hand_example() -> None:
    text = "aaaaaaaaaaaaaaaaaaaaaaaa the quick brown fox"
    n = len(zlib.compress(text.encode("utf-8"), 9))
    assert zlib_length(text) == n
    lp = [np.array([-1.0, -2.0, -3.0])]
    assert loss_score(lp)[0] == pytest.approx(-2.0)
    assert zlib_score(lp, [text])[0] == pytest.approx(-2.0 / n)


def test_classifier_scores_hand_example() -> None:
    p = np.array([[0.7, 0.2, 0.1]])
    s = classifier_scores_from_probs(p, np.array([0]))
    assert s["loss"][0] == pytest.approx(math.log(0.7))
    assert s["confidence"][0] == pytest.approx(0.7)
    assert s["entropy"][0] == pytest.approx(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    mentr = -0.3 * math.log(0.7) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    assert s["modified_entropy"][0] == pytest.approx(-mentr)


@pytest.fixture(scope="module")
def tiny_lm():
    from privaudit.models import load_base_model

    model, tok = load_base_model("tiny-gpt2", "causal_lm", seed=3, n_layer=1, n_embd=32, n_head=2)
    return model, tok


def test_batched_pass_matches_per_record(tiny_lm) -> None:
    import torch

    model, tok = tiny_lm
    texts = ["alice paid the invoice on monday", "bob", "a much longer sentence about nothing in particular at all",
             "Carol Smith lives in Leeds"]
    ts = token_scores(model, tok, texts, batch_size=3, vocab_stats=True)
    for i, t in enumerate(texts):
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        want = logp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(ts.logprobs[i], want, atol=1e-4)
        p = logp.exp()
        mu = (p * logp).sum(-1).numpy()
        var = (p * logp ** 2).sum(-1).numpy() - mu ** 2
        np.testing.assert_allclose(ts.mu[i], mu, atol=1e-4)
        np.testing.assert_allclose(ts.var[i], var, atol=1e-3)
    scores = llm_scores(model, tok, texts, batch_size=2, reference=model)
    assert set(scores) >= {"loss", "zlib", "lowercase", "min_k", "min_k_pp", "ref"}
    np.testing.assert_allclose(scores["ref"], 0.0, atol=1e-9)  # the model as its own reference
    np.testing.assert_allclose(scores["loss"], [float(np.mean(x)) for x in ts.logprobs], atol=1e-9)
    with pytest.raises(ValueError, match="attacks"):
        llm_scores(model, tok, texts, attacks=["ref"])
