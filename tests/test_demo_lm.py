"""The demo's language-model part (SmolLM2-135M, non-private vs ε = 8): the contrast its headline states.

Reads ``$PRIVAUDIT_DEMO_DIR/lm`` when that demo ran with ``--lm`` (``make demo-quick``); otherwise runs
the quick LM part here (slow: SmolLM2 on CPU). Checks trends and CI conditions, not exact values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.demo]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("PRIVAUDIT_DEMO_DIR")
    if given and (Path(given) / "lm" / "lm_summary.json").exists():
        return Path(given) / "lm"
    from privaudit.demo_lm import run_lm_demo

    d = tmp_path_factory.mktemp("demo_lm")
    run_lm_demo(d, quick=True, quiet=True, noise_seed=0)
    return d


def _lm_points(lm_dir: Path) -> tuple[dict, dict]:
    points = json.loads((lm_dir / "lm_summary.json").read_text())["points"]
    assert len(points) == 2
    nonprivate = next(p for p in points if p["epsilon"] is None)
    private = next(p for p in points if p["epsilon"] is not None)
    return nonprivate, private


def test_lm_part_non_private_memorises_and_dp_does_not(lm_dir: Path) -> None:
    nonprivate, private = _lm_points(lm_dir)
    assert private["epsilon"] <= 8.0 + 1e-9 and private["verdict"] in ("consistent", "inconclusive")
    assert nonprivate["verdict"] == "no guarantee"
    ref_np, ref_dp = nonprivate["attacks"]["reference"], private["attacks"]["reference"]
    exp_np, exp_dp = nonprivate["exposure"], private["exposure"]
    n_inc = len(exp_np["fraction_of_max_included"])
    text = (f"reference AUC {ref_np['auc']:.3f} {ref_np['auc_ci']} vs {ref_dp['auc']:.3f} {ref_dp['auc_ci']}; "
            f"included canaries near max exposure {exp_np['included_near_max']}/{n_inc} vs "
            f"{exp_dp['included_near_max']}/{n_inc}")
    # non-private: clear leakage (the criterion: the reference-calibrated AUC's CI above 0.75, or
    # most included canaries' exposure near its maximum)
    assert ref_np["auc_ci"][0] > 0.75 or exp_np["included_near_max"] > n_inc / 2, text
    # DP: no clear leakage: the reference attack's CI reaches down near chance, exposure is not at its max
    assert ref_dp["auc_ci"][0] < 0.6, text
    assert exp_dp["included_near_max"] <= max(1, n_inc // 4), text
    # the trend: the private run leaks less on both
    assert ref_dp["auc"] < ref_np["auc"] and exp_dp["included_near_max"] <= exp_np["included_near_max"], text
    # extraction: an excluded canary's secret (never seen) is not produced; private extracts no more
    assert nonprivate["extraction"]["excluded_extracted"] == private["extraction"]["excluded_extracted"] == 0
    assert private["extraction"]["included_extracted"] <= nonprivate["extraction"]["included_extracted"]


def test_lm_part_perplexity_is_reported(lm_dir: Path) -> None:
    nonprivate, private = _lm_points(lm_dir)
    for p in (nonprivate, private):
        assert p["perplexity"] is not None and 1.0 < p["perplexity"] < 1e4
        assert p["perplexity_before"] is not None
    # fine-tuning on the (templated) corpus improves held-out perplexity over the base model
    assert nonprivate["perplexity"] < nonprivate["perplexity_before"]
