"""The rank figure: membership AUC and ε lower bound against LoRA rank (A public vs secret)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privaudit.ledger.events import ClaimEvent, GaussianEvent, SketchEvent
from privaudit.reports import figures as F
from privaudit.reports.runs_table import RunRecord, load_runs
from tests.reports.conftest import DELTA, _attack, install_fake_accountants, make_four_runs, make_run

RANKS = (4, 16, 64)
CLAIM = 1.0


def _lower(rank: int, secret: bool) -> float:
    return round(0.3 * RANKS.index(rank) + (0.2 if secret else 0.9), 3)


def _auc(rank: int, secret: bool) -> float:
    return round(0.9 - 0.05 * RANKS.index(rank) - (0.1 if secret else 0.0), 3)


def make_rank_runs(root: Path) -> list[Path]:
    """Noise-free frozen-A runs at three ranks, A public and secret, plus one noisy run at each rank."""
    dirs: list[Path] = []
    claim = ClaimEvent(epsilon=CLAIM, delta=DELTA, scope="per run", source="sketching paper")
    for rank in RANKS:
        for secret in (False, True):
            el = _lower(rank, secret)
            dirs.append(make_run(
                root, f"rank_{rank}-a_secret_{str(secret).lower()}", mechanism="lora_sketch",
                events=[SketchEvent(rank=rank, batch_size=16, steps=50, a_distribution="gaussian_1_over_r",
                                    a_secret=secret)],
                claims=[claim], eps_fallback={"rdp": None, "pld": None, "prv": None}, noise=0.0,
                audit={"accounted": {"delta": DELTA, "epsilon": {}},
                       "claimed": [{"epsilon": CLAIM, "delta": DELTA, "source": "paper", "scope": "per run"}],
                       "attacks": [_attack("sketch_canaries_one_run", _auc(rank, secret), (0.5, 0.95), 0.0, 0.1,
                                           eps_lower=el)],
                       "epsilon_lower": {"value": el, "confidence": 0.95, "method": "one_run",
                                         "attack": "sketch_canaries_one_run"},
                       "verdict": "violation" if el > CLAIM else "no guarantee"}))
        dirs.append(make_run(
            root, f"rank_{rank}-a_secret_false-eps_4", mechanism="lora_sketch", noise=1.0, q=0.1,
            events=[SketchEvent(rank=rank, batch_size=16, steps=50, a_distribution="gaussian_1_over_r",
                                a_secret=False, noise_multiplier=1.0),
                    GaussianEvent(noise_multiplier=1.0, sample_rate=0.1, clip_norm=1.0, count=50)],
            eps_fallback={"rdp": 4.2, "pld": 3.9, "prv": 3.9},
            audit={"accounted": {"delta": DELTA, "epsilon": {"pld": 3.9}}, "claimed": [],
                   "attacks": [_attack("sketch_canaries_one_run", 0.55, (0.45, 0.65), 0.0, 0.01, eps_lower=0.1)],
                   "epsilon_lower": {"value": 0.1, "confidence": 0.95, "method": "one_run",
                                     "attack": "sketch_canaries_one_run"},
                   "verdict": "consistent"}))
    for d, rank, secret in zip(dirs, [r for r in RANKS for _ in range(3)], [False, True, False] * 3):
        m = json.loads((d / "manifest.json").read_text())
        m["config"] = {"lora": {"rank": rank, "alpha": 2 * rank}, "options": {"a_secret": secret}}
        (d / "manifest.json").write_text(json.dumps(m))
    return dirs


@pytest.fixture(scope="module")
def rank_records(tmp_path_factory: pytest.TempPathFactory) -> list[RunRecord]:
    with pytest.MonkeyPatch.context() as mp:
        install_fake_accountants(mp)
        return load_runs(make_rank_runs(tmp_path_factory.mktemp("rank_runs")), steps_points=0)


def test_records_carry_rank_and_a_secret(rank_records: list[RunRecord]) -> None:
    by_label = {r.label: r for r in rank_records}
    assert by_label["rank_16-a_secret_true"].lora_rank == 16 and by_label["rank_16-a_secret_true"].a_secret
    assert by_label["rank_64-a_secret_false"].a_secret is False


def test_rank_figure_plots_auc_and_lower_bound_per_rank(rank_records: list[RunRecord]) -> None:
    fig = F.attack_vs_rank(rank_records)
    assert F.has_data(fig)
    ax_auc, ax_eps = fig.axes[:2]
    for ax in (ax_auc, ax_eps):
        assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["4", "16", "64"]
    lines = {ln.get_label(): ln for ln in ax_eps.get_lines()}
    for secret in (False, True):
        key = f"A {'secret' if secret else 'public'}, no noise: ε lower bound"
        assert list(lines[key].get_xdata()) == list(RANKS)
        assert list(lines[key].get_ydata()) == pytest.approx([_lower(r, secret) for r in RANKS])
    # the claimed ε as a horizontal line, and the noisy runs' accounted ε beside their lower bound
    claim = lines[f"claimed ε = {CLAIM:g}"]
    assert set(claim.get_ydata()) == {CLAIM}
    noisy = [lab for lab in lines if "σ = 1" in lab]
    assert any("accounted ε" in lab for lab in noisy) and any("lower bound" in lab for lab in noisy)
    acc_line = next(lines[lab] for lab in noisy if "accounted ε" in lab)
    assert all(y > 0.1 for y in acc_line.get_ydata())
    # AUC panel: one series per (A public/secret × noise) with the runs' AUCs in rank order
    auc_lines = {c.get_label(): c.lines[0] for c in ax_auc.containers}
    secret_auc = auc_lines["A secret, no noise: sketch_canaries_one_run"]
    assert list(secret_auc.get_ydata()) == pytest.approx([_auc(r, True) for r in RANKS])


def test_rank_figure_only_when_ranks_differ(tmp_path: Path, rank_records: list[RunRecord]) -> None:
    from privaudit.reports import build_report

    with pytest.MonkeyPatch.context() as mp:
        install_fake_accountants(mp)
        same = load_runs(make_four_runs(tmp_path / "same"), steps_points=0)
        assert not F.has_data(F.attack_vs_rank(same))
        out = build_report([r.path for r in same], tmp_path / "same.pdf")
        assert "attack_vs_rank" not in out.figures
        out = build_report([r.path for r in rank_records], tmp_path / "ranks.pdf")
    assert out.figures["attack_vs_rank"].exists()
