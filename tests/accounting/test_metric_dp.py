"""Metric-DP accounting of dchi events."""

from __future__ import annotations

import json

import pytest
import torch

from privaudit.accounting.base import segments_from_events
from privaudit.ledger.events import ClaimEvent, DchiEvent, GaussianEvent, PlaintextEvent
from privaudit.ledger.ledger import Ledger
from privaudit.accounting.metric_dp import header_info, median_nn_distance, metric_dp_report, nearest_neighbours


def _reps(v: int = 50, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def test_nearest_neighbours_match_brute_force() -> None:
    x = _reps(130, 5)
    dist, idx = nearest_neighbours(x, 3, chunk=17)
    full = torch.cdist(x.double(), x.double())
    full.fill_diagonal_(float("inf"))
    val, ref = full.topk(3, largest=False)
    assert torch.equal(idx, ref)
    torch.testing.assert_close(dist.double(), val, atol=1e-4, rtol=1e-4)
    assert median_nn_distance(x) == pytest.approx(float(val[:, 0].median()), rel=1e-4)


def test_report_epsilon_at_median_nn_distance_and_composition() -> None:
    x = _reps()
    d_med = median_nn_distance(x)
    events = [DchiEvent(eta=2.0, dimension=6, count=100), DchiEvent(eta=3.0, dimension=6, count=50)]
    rep = metric_dp_report(events, x)
    assert rep.eta == 3.0 and rep.eta_min == 2.0  # the weakest release is reported
    assert rep.epsilon_at_median_nn == pytest.approx(3.0 * d_med)
    assert rep.eta_per_dimension == pytest.approx(0.5)
    assert rep.token_releases == 150 and rep.guarantee == "metric_dp"
    assert rep.epsilon_composed_at_median_nn is None
    assert any("releases per record unknown" in c for c in rep.caveats)
    rep4 = metric_dp_report(events, x, releases_per_record=4)
    assert rep4.epsilon_composed_at_median_nn == pytest.approx(12.0 * d_med)
    json.dumps(rep4.to_json(), allow_nan=False)


def test_shifted_mean_and_data_dependent_scale_are_stated() -> None:
    x = _reps()
    shifted = x * 0.5
    events = [DchiEvent(eta=1.0, dimension=6, count=10, shifted_mean=True)]
    rep = metric_dp_report(events, x, shifted_vocab_representations=shifted)
    assert rep.guarantee == "metric_dp_shifted"
    assert rep.median_nn_distance_shifted == pytest.approx(0.5 * median_nn_distance(x), rel=1e-4)
    assert rep.epsilon_at_median_nn_shifted == pytest.approx(rep.median_nn_distance_shifted)
    assert any("shifted points" in c for c in rep.caveats)
    cond = metric_dp_report(events, x, data_dependent_scale=True)
    assert cond.guarantee == "conditional" and any("unbounded" in c for c in cond.caveats)


def test_other_releases_are_listed_and_errors() -> None:
    x = _reps()
    events = [ClaimEvent(epsilon=1.0), PlaintextEvent(what="labels", count=3), DchiEvent(eta=1.0, dimension=6),
              GaussianEvent(noise_multiplier=1.0)]
    rep = metric_dp_report(events, x, median_nn=2.0)
    assert rep.epsilon_at_median_nn == 2.0
    assert any("labels" in o for o in rep.other_releases) and any("gaussian" in o for o in rep.other_releases)
    with pytest.raises(ValueError, match="^events"):
        metric_dp_report([PlaintextEvent(what="x")], x)
    with pytest.raises(ValueError, match="^vocab_representations"):
        metric_dp_report([DchiEvent(eta=1.0, dimension=7)], x)
    with pytest.raises(ValueError, match="^releases_per_record"):
        metric_dp_report([DchiEvent(eta=1.0, dimension=6)], x, releases_per_record=0)
    # the (epsilon, delta) accountants refuse dchi events and point here
    with pytest.raises(ValueError, match="metric_dp"):
        segments_from_events([DchiEvent(eta=1.0, dimension=6)])


def test_report_from_a_ledger_reads_the_header(tmp_path) -> None:
    led = Ledger.create(tmp_path / "ledger.jsonl", mechanism="privtune", observer="server",
                        metric_dp=header_info(mean_shift=True, importance_scaling=True))
    led.append(DchiEvent(eta=1.5, dimension=6, count=4, shifted_mean=True))
    led.append(DchiEvent(eta=1.5, dimension=6, count=4, shifted_mean=True))
    led.close()
    rep = metric_dp_report(tmp_path / "ledger.jsonl", _reps())
    assert rep.token_releases == 8 and rep.n_events == 1
    assert rep.data_dependent_scale and rep.guarantee == "conditional"
