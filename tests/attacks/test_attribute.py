"""Attribute inference (logistic regression, MLP, kNN) on pooled representations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from privaudit.attacks.attribute import attribute_attacks, pool_representations
from privaudit.mechanisms.privtune.dchi import sample_dchi


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


CLASSES = ["diabetes", "asthma", "hypertension", "depression"]
PRIOR = [0.4, 0.2, 0.2, 0.2]


def _records(n: int, rng: np.random.Generator, centres: np.ndarray, eta: float | None, g: torch.Generator):
    """Per record: 10 token representations whose mean depends on the attribute."""
    labels = rng.choice(len(CLASSES), size=n, p=PRIOR)
    reps = []
    for y in labels:
        x = torch.from_numpy(centres[y] + rng.normal(0, 1.0, size=(10, centres.shape[1]))).float()
        if eta is not None:
            x = x + sample_dchi(10, centres.shape[1], eta, generator=g)
        reps.append(x)
    return reps, [CLASSES[y] for y in labels]


def test_clean_beats_majority_and_strong_noise_does_not() -> None:
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    centres = rng.normal(0, 1.0, size=(4, 16))
    aux, aux_y = _records(300, rng, centres, None, g)
    vic, vic_y = _records(200, rng, centres, None, g)
    res = attribute_attacks(aux, aux_y, vic, vic_y)
    assert [r["name"] for r in res] == ["attribute_logreg", "attribute_mlp", "attribute_knn"]
    for r in res:
        m = r["metrics"]
        assert r["kind"] == "attribute"
        assert m["beats_baseline"] and m["accuracy"] > m["majority_baseline"] + 0.3
        assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
        assert m["majority_value"] == "diabetes"
    json.dumps(res, allow_nan=False)

    aux, aux_y = _records(300, rng, centres, 0.05, g)  # E|Z| = 320 per token vs centres ~4 apart
    vic, vic_y = _records(200, rng, centres, 0.05, g)
    noisy = attribute_attacks(aux, aux_y, vic, vic_y)
    for r in noisy:
        m = r["metrics"]
        assert not m["beats_baseline"]
        assert abs(m["accuracy"] - m["majority_baseline"]) < 0.15


def test_pooling_and_errors() -> None:
    x = pool_representations([torch.ones(3, 4), torch.zeros(4)])
    assert x.shape == (2, 4) and x[0, 0] == 1.0
    with pytest.raises(ValueError, match="^representations"):
        pool_representations([torch.ones(3, 4), torch.ones(5)])
    with pytest.raises(ValueError, match="^aux_attribute"):
        attribute_attacks([torch.ones(4)] * 3, ["a", "b"], [torch.ones(4)], ["a"])
    with pytest.raises(ValueError, match="^which"):
        attribute_attacks([torch.ones(4), torch.zeros(4)], ["a", "b"], [torch.ones(4)], ["a"], which=["svm"])
    # a single auxiliary class: every attack guesses it
    res = attribute_attacks([torch.ones(4), torch.zeros(4)], ["a", "a"], [torch.ones(4), torch.zeros(4)], ["a", "b"])
    assert all(r["metrics"]["accuracy"] == 0.5 == r["metrics"]["majority_baseline"] for r in res)
