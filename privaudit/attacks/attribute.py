"""Attribute inference on released representations (Song & Raghunathan, CCS 2020 style).

The attacker holds auxiliary records (representations it produced itself through the same public
pipeline, with their sensitive attribute) and trains a classifier from *pooled* representations to
the attribute: L2-regularised logistic regression (C = 0.05), an MLP (128 hidden units, L2 weight
1.0) and 10-nearest neighbours (scikit-learn, features standardised on the auxiliary set; the strong
regularisation suits a few hundred auxiliary records in hundreds of dimensions). It is then applied to the victims' released representations.

Pooling: a (T, d) per-token tensor is averaged over its T positions (whatever was released for the
record); a 1-D tensor is used as it is (already pooled, e.g. a pivot token's activations).

Metric: accuracy on the victims against the *majority baseline* — the accuracy of always guessing
the auxiliary set's most frequent value (what an attacker without the representations gets) — with a
Clopper–Pearson interval and a one-sided binomial p-value of "accuracy > baseline".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from privaudit.attacks.metrics import accuracy_against_baseline

__all__ = ["ATTRIBUTE_ATTACKS", "pool_representations", "attribute_attacks"]

ATTRIBUTE_ATTACKS: tuple[str, ...] = ("logreg", "mlp", "knn")


def pool_representations(reps: Sequence[torch.Tensor | np.ndarray], name: str = "representations") -> np.ndarray:
    """(n, d) float64 array: each (T, d) entry averaged over T, each (d,) entry as is."""
    if len(reps) == 0:
        raise ValueError(f"{name}: empty")
    rows = []
    for i, r in enumerate(reps):
        a = r.detach().float().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r, dtype=np.float64)
        if a.ndim == 2:
            if a.shape[0] == 0:
                raise ValueError(f"{name}: entry {i} has no positions")
            a = a.mean(axis=0)
        elif a.ndim != 1:
            raise ValueError(f"{name}: entry {i} must be (T, d) or (d,), got shape {a.shape}")
        rows.append(a.astype(np.float64))
    dims = {r.shape[0] for r in rows}
    if len(dims) != 1:
        raise ValueError(f"{name}: entries of different dimensions {sorted(dims)}")
    out = np.stack(rows)
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return out


def _model(kind: str, n_train: int, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logreg":
        clf: Any = LogisticRegression(max_iter=3000, C=0.05)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1.0, max_iter=400, random_state=seed)
    elif kind == "knn":
        clf = KNeighborsClassifier(n_neighbors=max(1, min(10, n_train)))
    else:
        raise ValueError(f"which: unknown attribute attack {kind!r} (choose from {', '.join(ATTRIBUTE_ATTACKS)})")
    return make_pipeline(StandardScaler(), clf)


def attribute_attacks(
    aux_representations: Sequence[torch.Tensor | np.ndarray],
    aux_attribute: Sequence[Any],
    victim_representations: Sequence[torch.Tensor | np.ndarray],
    victim_attribute: Sequence[Any],
    *,
    which: Sequence[str] = ATTRIBUTE_ATTACKS,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Train each classifier on the auxiliary records, score it on the victims.

    Returns one ``{"name": "attribute_<kind>", "kind": "attribute", "metrics": {...}}`` per attack with
    ``accuracy``, ``accuracy_ci``, ``majority_baseline``, ``majority_value``, ``advantage``
    (accuracy − baseline), ``p_value`` (one-sided binomial test against the baseline rate),
    ``beats_baseline`` (the interval's lower end is above the baseline), ``n_train``, ``n_test``,
    ``n_classes``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    x_tr = pool_representations(aux_representations, "aux_representations")
    x_te = pool_representations(victim_representations, "victim_representations")
    y_tr = np.asarray([str(v) for v in aux_attribute])
    y_te = np.asarray([str(v) for v in victim_attribute])
    if y_tr.shape[0] != x_tr.shape[0]:
        raise ValueError(f"aux_attribute: {y_tr.shape[0]} values for {x_tr.shape[0]} representations")
    if y_te.shape[0] != x_te.shape[0]:
        raise ValueError(f"victim_attribute: {y_te.shape[0]} values for {x_te.shape[0]} representations")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"victim_representations: dimension {x_te.shape[1]} != auxiliary {x_tr.shape[1]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    values, counts = np.unique(y_tr, return_counts=True)
    majority = str(values[int(np.argmax(counts))])
    n = int(y_te.shape[0])
    baseline = float(np.mean(y_te == majority))
    results: list[dict[str, Any]] = []
    for kind in which:
        model = _model(kind, x_tr.shape[0], seed)
        if values.size < 2:
            pred = np.full(n, majority)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x_tr, y_tr)
            pred = model.predict(x_te)
        correct = int(np.sum(pred == y_te))
        results.append({
            "name": f"attribute_{kind}",
            "kind": "attribute",
            "metrics": {
                **accuracy_against_baseline(correct, n, baseline, confidence),
                "majority_value": majority,
                "n_train": int(x_tr.shape[0]),
                "n_test": n,
                "n_classes": int(values.size),
            },
        })
    return results
