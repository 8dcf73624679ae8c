"""Sketch statistics: moments of A, the ((n+1)/r)·‖G‖² sketch noise, and full-weight gradients."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from privaudit.config import parse_config
from privaudit.mechanisms.lora_sketch.sketch_stats import (
    ata_scale,
    draw_a,
    entry_moments,
    expected_relative_sketch_noise,
    layer_gradients,
    lora_layers,
    measure_layer_sketch,
    monte_carlo_sketch_noise,
    sketch_noise,
)
from privaudit.mechanisms.training import build_model, encode, prepare_data


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def tiny_cfg(init_a: str = "gaussian_1_over_r", rank: int = 4) -> Any:
    return parse_config({
        "mechanism": "lora_sketch", "task": "classification",
        "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2}},
        "lora": {"rank": rank, "alpha": 2 * rank, "freeze_a": True, "init_a": init_a},
        "data": {"synthetic": {"n_people": 20, "n_canaries": 0}},
        "training": {"steps": 1, "batch_size": 4},
        "privacy": {"noise_multiplier": 0.0},
    })


def test_closed_forms() -> None:
    assert ata_scale("gaussian_1_over_r", 8, 384) == pytest.approx(1.0)
    assert ata_scale("peft_default", 8, 384) == pytest.approx(8 / (3 * 384))
    for n, r in [(16, 4), (384, 8), (768, 64)]:
        assert expected_relative_sketch_noise("gaussian_1_over_r", r, n) == pytest.approx((n + 1) / r)
        assert expected_relative_sketch_noise("peft_default", r, n) == pytest.approx((n - 0.2) / r)
    with pytest.raises(ValueError, match="^distribution"):
        entry_moments("gaussian", 4, 16)
    with pytest.raises(ValueError, match="^rank"):
        ata_scale("gaussian_1_over_r", 0, 16)


@pytest.mark.parametrize("dist", ["gaussian_1_over_r", "peft_default"])
def test_empirical_ata_mean_is_c_identity(dist: str) -> None:
    r, n, k = 4, 12, 20000
    a = draw_a(dist, r, n, torch.Generator().manual_seed(0), draws=k, dtype=torch.float64)
    mean = (a.transpose(1, 2) @ a).mean(0)
    c = ata_scale(dist, r, n)
    v, mu4 = entry_moments(dist, r, n)
    # entry (i, j) of AᵀA is a sum of r products; standard error of its mean over k draws
    se_diag = math.sqrt(r * (mu4 - v * v) / k)
    se_off = math.sqrt(r * v * v / k)
    assert (mean.diagonal() - c).abs().max() < 5 * se_diag
    assert (mean - torch.diag(mean.diagonal())).abs().max() < 5 * se_off


def test_peft_default_moments_match_peft_init() -> None:
    cfg = tiny_cfg("peft_default", rank=4)
    model, _ = build_model(cfg, 2, torch.device("cpu"))
    for lay in lora_layers(model):
        a = lay.a.detach().double()
        v, _ = entry_moments("peft_default", lay.rank, lay.in_features)
        assert float(a.abs().max()) <= 1 / math.sqrt(lay.in_features) + 1e-7
        se = math.sqrt((1 / (5 * lay.in_features ** 2) - v * v) / a.numel())
        assert abs(float(a.square().mean()) - v) < 5 * se


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_monte_carlo_sketch_noise_matches_n_plus_one_over_r(rank: int) -> None:
    """E_A‖G(AᵀA − I)‖² = ((n+1)/r)·‖G‖² for A ~ N(0, 1/r); the alternatives n/r (a plausible slip)
    and PEFT's "gaussian" init (std 1/r, so E[AᵀA] ≠ I) are rejected by the same test."""
    gen = torch.Generator().manual_seed(rank)
    n = 16
    g = torch.randn(6, n, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    mc = monte_carlo_sketch_noise(g, rank, "gaussian_1_over_r", draws=20000, seed=10 + rank)
    gsq = float(g.square().sum())
    assert mc.expected == pytest.approx((n + 1) / rank * gsq)
    assert abs(mc.z) < 4.5, mc
    wrong = n / rank * gsq
    assert abs(mc.mean - wrong) / mc.std_error > 6  # the test has the power to tell n from n + 1
    # PEFT's init_lora_weights="gaussian": std 1/r
    a = torch.randn(4000, rank, n, generator=gen, dtype=torch.float64) / rank
    peft_gauss = ((g @ a.transpose(1, 2)) @ a - g).square().sum((1, 2))
    se = float(peft_gauss.std()) / math.sqrt(4000)
    assert abs(float(peft_gauss.mean()) - mc.expected) / max(se, mc.std_error) > 6 or rank == 1


def test_monte_carlo_peft_default_matches() -> None:
    g = torch.randn(5, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mc = monte_carlo_sketch_noise(g, 4, "peft_default", draws=20000, seed=3)
    assert abs(mc.z) < 4.5 and mc.expected_relative == pytest.approx((20 - 0.2) / 4)


def test_sketch_noise_of_one_a() -> None:
    g = torch.randn(3, 5, dtype=torch.float64)
    a = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]  # orthogonal: AᵀA = I
    assert sketch_noise(g, a) == pytest.approx(0.0, abs=1e-20)
    assert sketch_noise(g, a, scale=0.0) == pytest.approx(float(g.square().sum()))
    with pytest.raises(ValueError, match="^grad"):
        sketch_noise(g, torch.randn(2, 4))


def test_layer_gradient_gives_b_gradient_through_the_sketch() -> None:
    """∂L/∂B = s·G·Aᵀ with G = ∂L/∂W in the Linear convention (GPT-2's Conv1D stores Wᵀ)."""
    cfg = tiny_cfg()
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    with torch.no_grad():
        for lay in lora_layers(model):
            lay.b.normal_(0, 0.1)  # away from B = 0, so the test sees a general point
    data = prepare_data(cfg)
    batch = encode(tok, data.train[:6], cfg, torch.device("cpu"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = layer_gradients(model, batch, cfg.task)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    from privaudit.mechanisms.training import per_sample_losses

    model.eval()
    per_sample_losses(model, batch, cfg.task).mean().backward()
    layers = lora_layers(model)
    assert layers and all(lay.fan_in_fan_out for lay in layers)
    for lay in layers:
        g = grads[lay.name]
        assert g.shape == (lay.out_features, lay.in_features)
        expected = lay.scaling * g @ lay.a.detach().T
        torch.testing.assert_close(lay.b.grad, expected, rtol=1e-4, atol=1e-7)


def test_measure_layer_sketch_on_a_model() -> None:
    cfg = tiny_cfg(rank=4)
    model, tok = build_model(cfg, 2, torch.device("cpu"))
    data = prepare_data(cfg)
    stats = measure_layer_sketch(model, tok, data.heldout[:8], cfg, torch.device("cpu"), mc_draws=3000, seed=1)
    assert len(stats) == 2
    for s in stats:
        assert s.rank == 4 and s.in_features == 32 and s.expected_relative == pytest.approx(33 / 4)
        assert s.monte_carlo is not None and abs(s.monte_carlo.z) < 4.5
        assert s.noise > 0 and math.isfinite(s.ratio)
    with pytest.raises(ValueError, match="^records"):
        measure_layer_sketch(model, tok, [], cfg, torch.device("cpu"))
