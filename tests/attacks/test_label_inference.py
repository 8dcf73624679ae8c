"""Label inference from prediction differences δ = onehot(y) − softmax(z)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privaudit.attacks.label_inference import infer_labels, label_inference_attack
from privaudit.mechanisms.pae_mobillm.side_network import prediction_difference


def _deltas(n: int, k: int, sigma: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2.0  # a confident, often wrong backbone
    labels = torch.randint(0, k, (n,), generator=g)
    return prediction_difference(logits, labels, np.sqrt(2.0), sigma, g), labels.numpy()


def test_unperturbed_delta_reveals_every_label() -> None:
    d, y = _deltas(500, 4, 0.0, 0)
    assert (infer_labels(d) == y).all()
    m = label_inference_attack(d, y)["metrics"]
    assert m["accuracy"] == 1.0 and m["beats_baseline"] and m["n_classes"] == 4


def test_accuracy_falls_toward_the_baseline_as_noise_grows() -> None:
    accs = []
    for sigma in (0.0, 0.3, 1.0, 5.0, 50.0):
        d, y = _deltas(3000, 2, sigma, 1)
        accs.append(label_inference_attack(d, y)["metrics"])
    values = [m["accuracy"] for m in accs]
    assert values[0] == 1.0
    assert all(a > b for a, b in zip(values, values[1:-1]))  # strictly falls while above chance
    assert abs(values[-1] - accs[-1]["majority_baseline"]) < 0.05
    assert not accs[-1]["beats_baseline"] or accs[-1]["advantage"] < 0.05


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="^deltas"):
        infer_labels(np.zeros((3,)))
    with pytest.raises(ValueError, match="^labels"):
        label_inference_attack(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="^deltas"):
        infer_labels(np.full((2, 2), np.nan))
