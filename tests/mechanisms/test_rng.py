"""The noise/sampling generator factory: a CSPRNG by default, seeded generators only on request."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

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
    assert rng.describe_noise_source(None, "not_switched")["noise_secure"] is False  # not a CSPRNG: said so


def test_seeded_state_cannot_be_loaded_into_a_secure_sampler() -> None:
    state = PoissonSampler(30, 0.5, seed=1).state_dict()
    with pytest.raises(ValueError, match="aes-256-ctr"):
        PoissonSampler(30, 0.5).load_state_dict(state)


# -- keyed substreams ------------------------------------------------------------------------------
def _hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 by hand (no salt: 32 zero bytes; one output block)."""
    import hashlib
    import hmac

    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_derived_substreams_are_distinct_per_label_and_deterministic_for_a_key() -> None:
    master = rng.SecureGenerator()
    labels = [(r, c, "noise") for r in range(3) for c in range(4)] + [(12, 3), (1, 23), ("1", 23)]
    keys = [rng.derive(master, *lab).state["key"] for lab in labels]
    assert len(set(keys)) == len(labels)  # every (round, client, purpose) its own stream
    first = [rng.derive(master, 2, 1, "noise").randn(64)]
    master.randn(1000)  # reading the master does not move its substreams
    twin = rng.SecureGenerator(key=bytes.fromhex(master.state["key"]))
    assert torch.equal(rng.derive(twin, 2, 1, "noise").randn(64), first[0])
    assert not torch.equal(rng.derive(rng.SecureGenerator(), 2, 1, "noise").randn(64), first[0])
    # HKDF-SHA256 as documented, with the JSON label as info
    key = bytes.fromhex(master.state["key"])
    assert rng.derive_key(key, 2, 1, "noise") == _hkdf_sha256(key, b'privaudit.rng.derive/v1\x00[2,1,"noise"]')
    assert rng.derive(master, 0).state["counter"] == 0
    with pytest.raises(ValueError, match="derive"):
        rng.derive(master, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="derive"):
        rng.derive(master, True)


def test_keyed_generator_and_uniforms() -> None:
    a, b = rng.keyed_generator(5, "x"), rng.keyed_generator(5, "x")
    assert torch.equal(rng.rand(3, 4, generator=a), rng.rand((3, 4), generator=b))
    assert not torch.equal(rng.keyed_generator(6, "x").randn(8), rng.keyed_generator(5, "x").randn(8))
    assert not torch.equal(rng.keyed_generator(5, "y").randn(8), rng.keyed_generator(5, "x").randn(8))
    u = rng.rand(20_000, generator=rng.SecureGenerator(), dtype=torch.float64)
    assert u.shape == (20_000,) and float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    seeded = torch.Generator().manual_seed(1)
    assert torch.equal(rng.rand(5, generator=seeded), torch.rand(5, generator=torch.Generator().manual_seed(1)))


def test_the_switched_mechanisms_say_secure_unless_seeded() -> None:
    for mech in ("dp_fedlora", "lora_sketch", "he_lora"):
        assert rng.describe_noise_source(None, mech) == {"noise_source": rng.SECURE_SOURCE, "noise_secure": True}
        assert rng.describe_noise_source(0, mech)["noise_secure"] is False


# ---------------------------------------------------------------------------------------------
# Gamma and uniform draws from the keystream (PrivTune's d_χ radius, random targets)
# ---------------------------------------------------------------------------------------------
def keyed(label: str) -> rng.SecureGenerator:
    """A SecureGenerator under a fixed key: a deterministic keystream, so the statistical tests below
    give the same verdict on every run (and fail when the sampler is wrong)."""
    return rng.SecureGenerator(key=hashlib.sha256(label.encode()).digest())


@pytest.mark.parametrize("shape", [0.3, 1.0, 3.7, 64.0, 768.0])
def test_secure_gamma_follows_the_gamma_law(shape: float) -> None:
    """Marsaglia–Tsang (shape >= 1) and the U^(1/a) boost (shape < 1) against scipy's Gamma CDF,
    mean and variance (5 standard errors; Gamma(a) has variance a and kurtosis 3 + 6/a). The same
    KS test rejects a sample of a 5 % larger shape, so it can fail."""
    n = 100_000
    x = rng.standard_gamma(keyed(f"gamma-{shape}"), shape, n)
    assert x.shape == (n,) and x.dtype == np.float64 and (x > 0).all()
    assert stats.kstest(x, stats.gamma(a=shape).cdf).pvalue > 1e-3
    assert stats.kstest(x, stats.gamma(a=1.05 * shape).cdf).pvalue < 1e-4
    assert abs(x.mean() - shape) < 5 * math.sqrt(shape / n)
    assert abs(x.var() / shape - 1) < 5 * math.sqrt((2 + 6 / shape) / n)


def test_secure_gamma_replays_under_its_key_and_checks_its_arguments() -> None:
    a, b = keyed("replay"), keyed("replay")
    assert np.array_equal(rng.standard_gamma(a, 7.0, 100), rng.standard_gamma(b, 7.0, 100))
    assert a.state == b.state  # the same number of keystream blocks consumed
    assert not np.array_equal(rng.standard_gamma(keyed("other"), 7.0, 100), rng.standard_gamma(a, 7.0, 100))
    assert rng.standard_gamma(a, 2.0, 0).shape == (0,)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="^shape"):
            rng.standard_gamma(a, bad, 3)


def test_gamma_and_rand_tensors_for_either_generator() -> None:
    g = keyed("tensors")
    u = rng.rand(2000, generator=g, dtype=torch.float64)
    assert u.shape == (2000,) and u.dtype == torch.float64 and 0 < float(u.min()) and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert rng.rand((3, 4), generator=g).dtype == torch.get_default_dtype()
    t = torch.Generator().manual_seed(4)
    assert torch.equal(rng.rand(5, generator=torch.Generator().manual_seed(4)), torch.rand(5, generator=t))
    # a seeded torch.Generator draws Gamma(k) as the sum of k exponentials (what seeded runs always drew)
    e = torch.empty(6, 3, dtype=torch.float64).exponential_(1.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(rng.gamma(3, 6, generator=torch.Generator().manual_seed(9)), e.sum(1))
    with pytest.raises(ValueError, match="^shape"):
        rng.gamma(2.5, 6, generator=torch.Generator())
    x = rng.gamma(16, 5000, generator=g, dtype=torch.float32)
    assert x.dtype == torch.float32 and stats.kstest(x.double().numpy(), stats.gamma(a=16).cdf).pvalue > 1e-3
    assert isinstance(rng.secure_or(None), rng.SecureGenerator) and rng.secure_or(t) is t


def test_privtune_and_pae_mobillm_headers_say_secure_unless_seeded() -> None:
    for mech in ("privtune", "pae_mobillm"):
        assert rng.describe_noise_source(None, mech) == {"noise_source": rng.SECURE_SOURCE, "noise_secure": True}
        assert rng.describe_noise_source(7, mech) == {"noise_source": rng.SEEDED_SOURCE, "noise_secure": False}
