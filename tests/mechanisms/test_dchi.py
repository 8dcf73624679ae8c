"""The d_χ sampler, the n-hop graph, the optimal shift and the PrivTune noiser (statistical tests)."""

from __future__ import annotations

import hashlib
import math
from collections import deque

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from privaudit.ledger.events import DchiEvent, GaussianEvent, PlaintextEvent
from privaudit.mechanisms import rng
from privaudit.mechanisms.privtune.dchi import (
    NoiseSettings,
    TokenNoiser,
    absolute_eta,
    build_geometry,
    gaussian_matched_sigma,
    importance_weights,
    n_hop_sets,
    noise_scales,
    optimal_shift,
    sample_dchi,
    scale_floor,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def gen(seed: int = 0, kind: str = "torch") -> torch.Generator | rng.SecureGenerator:
    """A seeded torch.Generator, or (``kind="secure"``) a SecureGenerator under a fixed key: the
    CSPRNG path with a deterministic keystream, so the statistical tests stay reproducible."""
    if kind == "secure":
        return rng.SecureGenerator(key=hashlib.sha256(f"dchi-{seed}".encode()).digest())
    return torch.Generator().manual_seed(seed)


KINDS = ["torch", "secure"]


# ----------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim,eta", [(1, 3.0), (8, 2.0), (64, 40.0)])
def test_magnitude_is_gamma_d_over_eta(dim: int, eta: float, kind: str) -> None:
    z = sample_dchi(4000, dim, eta, generator=gen(dim, kind))
    assert z.shape == (4000, dim) and z.dtype == torch.float32
    r = z.double().norm(dim=1).numpy()
    ks = stats.kstest(r, stats.gamma(a=dim, scale=1 / eta).cdf)
    assert ks.pvalue > 1e-3
    se = math.sqrt(dim) / eta / math.sqrt(r.size)  # sd of Gamma(d, 1/eta) is sqrt(d)/eta
    assert abs(r.mean() - dim / eta) < 5 * se


@pytest.mark.parametrize("kind", KINDS)
def test_ks_rejects_wrong_eta(kind: str) -> None:
    """The magnitude test can fail: a sample at 1.1·η is rejected against Gamma(d, 1/η)."""
    r = sample_dchi(4000, 16, 2.2, generator=gen(1, kind)).double().norm(dim=1).numpy()
    assert stats.kstest(r, stats.gamma(a=16, scale=1 / 2.0).cdf).pvalue < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_direction_is_uniform_on_the_sphere(kind: str) -> None:
    n, d = 20000, 6
    z = sample_dchi(n, d, 1.0, generator=gen(2, kind)).double()
    u = (z / z.norm(dim=1, keepdim=True)).numpy()
    # mean 0: each coordinate has variance 1/d
    assert np.abs(u.mean(0)).max() < 5 * math.sqrt(1 / d / n)
    # second moment I/d: entries of u u^T have sd <= 1/d * sqrt(2)/sqrt(n)-ish; allow 6 sd
    m2 = u.T @ u / n
    assert np.abs(m2 - np.eye(d) / d).max() < 6 * math.sqrt(2.0 / n) / d * math.sqrt(3)
    # the projection on a fixed axis has the Beta law of a uniform direction: (u1+1)/2 ~ Beta((d-1)/2, (d-1)/2)
    a = (d - 1) / 2
    assert stats.kstest((u[:, 0] + 1) / 2, stats.beta(a, a).cdf).pvalue > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_eta_and_units(kind: str) -> None:
    eta = torch.tensor([1.0, 4.0]).repeat(3000)
    z = sample_dchi(eta.numel(), 10, eta, generator=gen(3, kind)).norm(dim=1)
    assert z[0::2].mean() == pytest.approx(10.0, rel=0.05)
    assert z[1::2].mean() == pytest.approx(2.5, rel=0.05)
    assert absolute_eta(0.1, "per_dimension", 384) == pytest.approx(38.4)
    assert absolute_eta(0.1, "absolute", 384) == 0.1
    with pytest.raises(ValueError, match="^eta"):
        sample_dchi(3, 2, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="^eta_unit"):
        absolute_eta(1.0, "per_token", 3)  # type: ignore[arg-type]


def test_gaussian_matches_expected_squared_norm() -> None:
    d, eta = 12, 3.0
    z = sample_dchi(20000, d, eta, generator=gen(4)).double()
    sigma = gaussian_matched_sigma(eta, d)
    assert (z.norm(dim=1) ** 2).mean().item() == pytest.approx(d * sigma**2, rel=0.03)


# ----------------------------------------------------------------------------------------------
# graph and shift
# ----------------------------------------------------------------------------------------------
def _bfs_exact(adj: list[set[int]], src: int, n: int) -> set[int]:
    dist = {src: 0}
    q = deque([src])
    while q:
        v = q.popleft()
        for w in adj[v]:
            if w not in dist:
                dist[w] = dist[v] + 1
                q.append(w)
    return {v for v, k in dist.items() if k == n}


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_n_hop_sets_match_bfs(hops: int) -> None:
    rng = np.random.default_rng(hops)
    v, k = 60, 3
    knn = torch.from_numpy(np.stack([rng.choice([j for j in range(v) if j != i], k, replace=False) for i in range(v)]))
    indptr, indices = n_hop_sets(knn, hops)
    adj = [set() for _ in range(v)]
    for i in range(v):
        for j in knn[i].tolist():
            adj[i].add(j)
            adj[j].add(i)
    for i in range(v):
        got = set(indices[indptr[i]:indptr[i + 1]].tolist())
        assert got == _bfs_exact(adj, i, hops)


def test_optimal_shift_solves_the_objective() -> None:
    h, t = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[3.0, 0.0, 1.0]])
    lam = 2.5
    num = optimize.minimize(lambda x: np.sum((h.numpy()[0] + x - t.numpy()[0]) ** 2) + lam * np.sum(x**2),
                            np.zeros(3)).x
    np.testing.assert_allclose(optimal_shift(h, t, lam).numpy()[0], num, atol=1e-5)
    capped = optimal_shift(h, t, lam, max_norm=0.1)
    cons = optimize.minimize(lambda x: np.sum((h.numpy()[0] + x - t.numpy()[0]) ** 2) + lam * np.sum(x**2),
                             np.zeros(3), constraints=[{"type": "ineq", "fun": lambda x: 0.01 - np.sum(x**2)}]).x
    np.testing.assert_allclose(capped.numpy()[0], cons, atol=1e-4)
    assert capped.norm().item() == pytest.approx(0.1, rel=1e-5)


def test_scale_floor() -> None:
    for s in [0.5, 0.37, 1.0, 0.999, 1.7, 2.0]:
        f = scale_floor(s)
        assert f <= s + 1e-12 and f * 2 ** (1 / 8) > s
        assert math.log2(f) * 8 == pytest.approx(round(math.log2(f) * 8))


# ----------------------------------------------------------------------------------------------
# the noiser
# ----------------------------------------------------------------------------------------------
SPECIAL = {0, 1}  # 0 = pad, 1 = [CLS]-like


def _geometry(v: int = 40, d: int = 8, seed: int = 0):
    reps = torch.randn(v, d, generator=gen(seed))
    ids = torch.arange(2, v + 2)  # token ids 2.. (0 and 1 are special)
    return build_geometry(ids, reps, v + 2, knn_k=4, hops=2)


def test_shift_moves_the_mean_to_the_optimal_vector_toward_the_n_hop_target() -> None:
    geo = _geometry()
    settings = NoiseSettings(mode="privtune", eta=20.0, eta_unit="absolute", target_choice="nearest",
                             utility_weight=1.0, importance="none")
    noiser = TokenNoiser(settings, geo, SPECIAL)
    tok, row = 7, 5
    tgt = int(noiser.geometry.nearest_target[row])
    assert tgt >= 0
    n = 4000
    h = geo.representations[row].expand(n, 1, -1).clone()
    ids = torch.full((n, 1), tok)
    rel = noiser.release(h, ids, torch.ones(n, 1, dtype=torch.long), gen(5))
    diff = (rel.values - h)[:, 0].double()
    expected = optimal_shift(h[0, 0], geo.representations[tgt], 1.0).double()
    sd = (8 / 20.0) / math.sqrt(8) * math.sqrt(8 + 1)  # per-coordinate sd of d_chi noise
    assert (diff.mean(0) - expected).abs().max() < 5 * sd / math.sqrt(n)
    # the mean is closer to the target than the token itself is
    mean = h[0, 0].double() + diff.mean(0)
    assert (mean - geo.representations[tgt].double()).norm() < (h[0, 0].double() - geo.representations[tgt]).norm()
    # ... and the exact n-hop target lies at exactly two hops
    members = geo.hop_indices[geo.hop_indptr[row]:geo.hop_indptr[row + 1]].tolist()
    assert tgt in members and tgt not in geo.knn_idx[row].tolist()
    assert rel.events == (DchiEvent(eta=20.0, dimension=8, count=n, shifted_mean=True),)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_dchi_mode_is_unbiased_and_random_targets_stay_in_the_hop_set(kind: str) -> None:
    geo = _geometry()
    n = 3000
    h = geo.representations[3].expand(n, 1, -1).clone()
    ids = torch.full((n, 1), 5)
    plain = TokenNoiser(NoiseSettings(mode="dchi", eta=20.0, eta_unit="absolute"), geo, SPECIAL)
    diff = (plain.release(h, ids, torch.ones(n, 1, dtype=torch.long), gen(6, kind)).values - h)[:, 0]
    assert diff.mean(0).abs().max() < 5 * 0.4 / math.sqrt(n) * 1.2
    rnd = TokenNoiser(NoiseSettings(mode="privtune", eta=20.0, eta_unit="absolute", importance="none"), geo, SPECIAL)
    rows = torch.full((4000,), 3)
    tg = rnd.targets(rows, gen(7, kind))
    allowed = geo.hop_indices[geo.hop_indptr[3]:geo.hop_indptr[4]].tolist()
    assert set(tg.tolist()) <= set(allowed)
    # uniform over the n-hop set (chi-square)
    counts = [int((tg == a).sum()) for a in allowed]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_noiser_without_a_generator_draws_from_the_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    """No generator given: the noise and the random targets come from a fresh SecureGenerator, never
    from torch's global PRNG (patched to fail here) — and two calls give different noise."""
    geo = _geometry()
    h = torch.randn(2, 4, 8, generator=gen(12))
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]])
    mask = (ids != 0).long()
    state = torch.get_rng_state()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("drew from torch's PRNG")

    for name in ("randn", "rand"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "exponential_", forbidden)
    for mode in ("privtune", "dchi", "gaussian"):
        noiser = TokenNoiser(NoiseSettings(mode=mode, eta=5.0, eta_unit="absolute"), geo, SPECIAL)
        a, b = noiser.release(h, ids, mask).values, noiser.release(h, ids, mask).values
        assert not torch.equal(a, b) and torch.equal(a[mask == 0], torch.zeros_like(a[mask == 0]))
    assert sample_dchi(5, 3, 1.0).shape == (5, 3)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(AssertionError, match="PRNG"):  # the patch bites: a seeded generator draws through it
        sample_dchi(5, 3, 1.0, generator=gen(0))


def test_scaling_by_s_multiplies_the_expected_magnitude_by_s() -> None:
    """Three content tokens: two nearly identical (they attend to each other), one apart; the scales
    differ and each position's mean noise magnitude is s_t · d/η."""
    d, eta, n = 8, 16.0, 3000
    geo = _geometry(d=d)
    a = torch.zeros(d)
    a[0] = 3.0
    b = torch.zeros(d)
    b[1] = 3.0
    seq = torch.stack([a, a * 1.01, b, torch.zeros(d)])  # last = padding
    h = seq.expand(n, -1, -1).clone()
    ids = torch.tensor([5, 6, 7, 0]).expand(n, -1).clone()
    mask = torch.tensor([1, 1, 1, 0]).expand(n, -1).clone()
    settings = NoiseSettings(mode="privtune", eta=eta, eta_unit="absolute", utility_weight=1e9, importance="attention",
                             scale_min=0.25, scale_max=4.0)
    noiser = TokenNoiser(settings, geo, SPECIAL)
    real = mask.bool()
    content = real & ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    s = noise_scales(importance_weights(h[:1], real[:1], content[:1]), content[:1], 1.0, 0.25, 4.0)[0]
    assert s[2] > 1.2 * s[0]  # the isolated token receives less attention: more noise
    rel = noiser.release(h, ids, mask, gen(8))
    mag = (rel.values - h).norm(dim=-1)  # shift ≈ 0 (utility_weight huge)
    for t in range(3):
        assert mag[:, t].mean().item() == pytest.approx(float(s[t]) * d / eta, rel=0.05)
    assert (rel.values[:, 3] == 0).all()  # padding: released as zeros
    ev = rel.events[0]
    assert isinstance(ev, DchiEvent) and ev.count == 3 * n
    assert ev.eta == pytest.approx(eta / scale_floor(float(s.min())))
    assert ev.eta >= eta / float(s.min())  # fail-closed: the weakest token's eta or more


def test_special_tokens_and_baseline_events() -> None:
    geo = _geometry()
    h = torch.randn(2, 4, 8, generator=gen(9))
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]])
    mask = (ids != 0).long()
    noised = TokenNoiser(NoiseSettings(mode="privtune", eta=5.0, eta_unit="absolute"), geo, SPECIAL)
    rel = noised.release(h, ids, mask, gen(10))
    assert rel.n_tokens == 5 and not torch.equal(rel.values[:, 0], h[:, 0])  # [CLS] noised
    clean = TokenNoiser(NoiseSettings(mode="privtune", eta=5.0, eta_unit="absolute", special_tokens="clean"), geo,
                        SPECIAL)
    rel = clean.release(h, ids, mask, gen(10))
    assert torch.equal(rel.values[:, 0], h[:, 0]) and rel.n_tokens == 3
    assert any(isinstance(e, PlaintextEvent) and e.count == 2 for e in rel.events)
    public = TokenNoiser(clean.settings, geo, SPECIAL, specials_public=True)
    assert all(isinstance(e, DchiEvent) for e in public.release(h, ids, mask, gen(10)).events)
    none = TokenNoiser(NoiseSettings(mode="none"), geo, SPECIAL).release(h, ids, mask)
    assert torch.equal(none.values[mask.bool()], h[mask.bool()])
    assert none.events == (PlaintextEvent(what="token representations at the split point", shape=[8], count=5),)
    gauss = TokenNoiser(NoiseSettings(mode="gaussian", eta=5.0, eta_unit="absolute"), geo, SPECIAL)
    ev = gauss.release(h, ids, mask, gen(11)).events[0]
    assert isinstance(ev, GaussianEvent) and ev.count == 5
    assert ev.noise_multiplier * ev.clip_norm == pytest.approx(gaussian_matched_sigma(5.0, 8))
    with pytest.raises(ValueError, match="scale_min"):
        NoiseSettings(scale_min=1.5)
