"""The noise/sampling generator factory: a CSPRNG by default, seeded generators only on request."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privaudit.mechanisms import rng
from privaudit.mechanisms.sampling import PoissonSampler, ShuffledBatchSampler
from privaudit.mechanisms.training import generator_state, set_generator_state


def test_secure_gaussians_have_the_right_moments_and_tails() -> None:
    g = rng.SecureGenerator()
    z = g.randn(200_000, dtype=torch.float64)
    assert z.shape == (200_000,) and z.dtype == torch.float64
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.01
    # P(|Z| > 3) = 0.0027: the tails are Gaussian, not truncated or inflated
    assert 0.0018 < float((z.abs() > 3).double().mean()) < 0.0036
    # Kolmogorov-Smirnov distance to the normal CDF
    xs = np.sort(z.numpy())
    cdf = 0.5 * (1 + np.vectorize(math.erf)(xs / math.sqrt(2)))
    ks = np.max(np.abs(cdf - np.arange(1, len(xs) + 1) / len(xs)))
    assert ks < 0.005
    assert g.randn(3, 4, dtype=torch.float32).shape == (3, 4)


def test_uniforms_permutations_and_state_roundtrip() -> None:
    g = rng.SecureGenerator()
    u = g.random(10_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    p = g.permutation(100)
    assert sorted(p.tolist()) == list(range(100))
    state = generator_state(g)
    a = g.randn(50)
    h = rng.SecureGenerator()
    set_generator_state(h, state)
    assert torch.equal(h.randn(50), a)  # resume continues the same secret stream
    assert not torch.equal(rng.SecureGenerator().randn(50), rng.SecureGenerator().randn(50))
    assert json.loads(state)["bit_generator"] == "aes-256-ctr"


def test_factory_secure_by_default_seeded_on_request() -> None:
    assert isinstance(rng.noise_generator(None), rng.SecureGenerator)
    assert isinstance(rng.noise_generator(5), torch.Generator)
    assert torch.equal(rng.randn(8, generator=rng.noise_generator(5)), rng.randn(8, generator=rng.noise_generator(5)))
    assert isinstance(PoissonSampler(100, 0.1).rng, rng.SecureGenerator)
    assert isinstance(PoissonSampler(100, 0.1, seed=3).rng, np.random.Generator)
    for s in (PoissonSampler(50, 0.2), ShuffledBatchSampler(50, 7)):
        s.next_batch()
        state = json.loads(json.dumps(s.state_dict()))
        nxt = s.next_batch()
        t = type(s)(50, 0.2) if isinstance(s, PoissonSampler) else type(s)(50, 7)
        t.load_state_dict(state)
        assert np.array_equal(t.next_batch(), nxt)
    assert rng.describe_noise_source(None, "dp_lora") == {"noise_source": rng.SECURE_SOURCE, "noise_secure": True}
    assert rng.describe_noise_source(3, "dp_lora")["noise_secure"] is False
    assert rng.describe_noise_source(None, "privtune")["noise_secure"] is False  # not yet switched: said so


def test_seeded_state_cannot_be_loaded_into_a_secure_sampler() -> None:
    state = PoissonSampler(30, 0.5, seed=1).state_dict()
    with pytest.raises(ValueError, match="aes-256-ctr"):
        PoissonSampler(30, 0.5).load_state_dict(state)
