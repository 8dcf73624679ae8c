"""HE backend: quantization, the accumulator bound, the simulate backend, and the GLWE backend
(concrete-ml-extensions; those tests skip only if the package does not import)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privaudit.mechanisms.he_lora.backend import (
    SimulateBackend,
    accumulator_bits,
    check_accumulator,
    dequantize_product,
    get_backend,
    glwe_available,
    integer_product,
    max_n_bits,
    quantize_channels,
    quantize_rows,
)

needs_glwe = pytest.mark.skipif(not glwe_available(), reason="concrete-ml-extensions not installed")
# Decryption noise of the default GLWE parameters lies in the low bits of the 27-bit accumulator
# (tens of units measured); anything near 2^8 would mean a broken product.
GLWE_NOISE = 256


# ----------------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bits", [4, 7, 8])
def test_quantize_rows_error_within_half_step(n_bits: int) -> None:
    rng = np.random.default_rng(n_bits)
    x = rng.normal(size=(5, 33)) * rng.uniform(0.1, 10, size=(5, 1)) + rng.normal(size=(5, 1))
    q = quantize_rows(x, n_bits)
    assert q.values.min() >= 0 and q.values.max() <= 2**n_bits - 1
    back = q.scale[:, None] * (q.values - q.zero_point[:, None])
    assert np.all(np.abs(back - x) <= q.scale[:, None] / 2 + 1e-12)
    # per-row scales: a row 100x larger gets a 100x larger scale
    x2 = np.vstack([x[0], 100 * x[0]])
    q2 = quantize_rows(x2, n_bits)
    assert q2.scale[1] == pytest.approx(100 * q2.scale[0])


def test_quantize_rows_zero_and_one_sided_rows() -> None:
    x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    q = quantize_rows(x, 8)
    back = q.scale[:, None] * (q.values - q.zero_point[:, None])
    assert np.allclose(back[0], 0.0)
    assert np.all(np.abs(back - x) <= q.scale[:, None] / 2 + 1e-12)
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        quantize_rows(np.array([[np.nan, 1.0]]), 8)
    with pytest.raises(ValueError, match=r"^n_bits:"):
        quantize_rows(x, 1)


def test_quantize_channels_symmetric_per_column() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(20, 6)) * np.array([0.01, 0.1, 1, 10, 100, 0])[None, :]
    q = quantize_channels(w, 8)
    assert np.abs(q.values).max() <= 127
    assert np.array_equal(q.col_sums, q.values.sum(axis=0))
    assert np.all(np.abs(q.values * q.scale[None, :] - w) <= q.scale[None, :] / 2 + 1e-12)
    assert np.all(q.values[:, 5] == 0)  # an all-zero channel stays zero


def test_dequantized_integer_product_approximates_float_product() -> None:
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(7, 64)), rng.normal(size=(64, 9))
    for n_bits, tol in ((4, 0.25), (8, 0.02)):
        qr, qw = quantize_rows(x, n_bits), quantize_channels(w, n_bits)
        y = dequantize_product(integer_product(qr.values, qw.values), qr, qw)
        rel = np.abs(y - x @ w).max() / np.abs(x @ w).max()
        assert rel < tol, (n_bits, rel)
    # the zero-point correction matters: without it the result is far off
    qr, qw = quantize_rows(x - 3.0, 8), quantize_channels(w, 8)
    acc = integer_product(qr.values, qw.values)
    no_correction = acc * qr.scale[:, None] * qw.scale[None, :]
    ref = (x - 3.0) @ w
    assert np.abs(no_correction - ref).max() > 0.5 * np.abs(ref).max()
    assert np.abs(dequantize_product(acc, qr, qw) - ref).max() < 0.02 * np.abs(ref).max()


# ----------------------------------------------------------------------------------------------
# accumulator bound
# ----------------------------------------------------------------------------------------------
def test_accumulator_bound() -> None:
    assert accumulator_bits(8, 2048) == 27
    check_accumulator(8, 2048, 27)
    check_accumulator(7, 8192, 27)  # the paper's 7-bit mode for Llama's MLP
    with pytest.raises(ValueError, match=r"^n_bits: 2\*8 \+ log2\(2049\)") as exc:
        check_accumulator(8, 2049, 27, "mlp.c_proj")
    assert "mlp.c_proj" in str(exc.value) and "n_bits <= 7" in str(exc.value)
    assert max_n_bits(3072, 27) == 7 and max_n_bits(16, 27) == 11


@pytest.mark.parametrize("n_bits,k", [(8, 2048), (7, 8192), (11, 16)])
def test_bound_implies_no_overflow(n_bits: int, k: int) -> None:
    """At the bound, the extreme accumulator still fits the signed 27-bit range."""
    extreme = k * (2**n_bits - 1) * (2 ** (n_bits - 1) - 1)
    assert extreme < 2 ** (27 - 1)
    assert math.log2(k) + 2 * n_bits <= 27


# ----------------------------------------------------------------------------------------------
# simulate backend
# ----------------------------------------------------------------------------------------------
def test_simulate_backend_is_exact_and_sizes_match() -> None:
    b = get_backend("simulate")
    assert isinstance(b, SimulateBackend) and not b.encrypted
    client = b.keygen()
    server = b.server(client.server_key())
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, size=(4, 10))
    w = rng.integers(-127, 128, size=(10, 5))
    blob = client.encrypt_rows(q)
    res = server.matmul(blob, 4, w)
    assert len(blob) == b.request_nbytes(4, 10) and len(res) == b.response_nbytes(4, 5)
    assert np.array_equal(client.decrypt_product(res, 4, 5), q @ w)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match=r"^backend: unknown 'ckks'"):
        get_backend("ckks")


# ----------------------------------------------------------------------------------------------
# GLWE backend (concrete-ml-extensions)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glwe() -> tuple:
    b = get_backend("glwe")
    client = b.keygen()
    key = client.server_key()
    return b, client, key, b.server(key)


@needs_glwe
def test_glwe_product_matches_exact_within_noise(glwe: tuple) -> None:
    b, client, _, server = glwe
    assert b.reserved_bits == 27 and b.security_bits == 128 and b.encrypted
    rng = np.random.default_rng(4)
    for rows, k, n in ((1, 5, 3), (3, 40, 7), (2, 16, 16)):
        q = rng.integers(0, 256, size=(rows, k))
        w = rng.integers(-127, 128, size=(k, n))
        blob = client.encrypt_rows(q)
        res = server.matmul(blob, rows, w)
        assert len(blob) == b.request_nbytes(rows, k), (rows, k)
        assert len(res) == b.response_nbytes(rows, n), (rows, n)
        acc = client.decrypt_product(res, rows, n)
        exact = q @ w
        assert acc.shape == (rows, n)
        assert np.abs(acc - exact).max() < GLWE_NOISE
        assert np.abs(exact).max() > 100 * GLWE_NOISE  # the check is not vacuous


@needs_glwe
def test_glwe_extreme_accumulator_decrypts_with_sign(glwe: tuple) -> None:
    """Results near ±2^26 (the bound for 8 bits, k = 2048) come back with the right sign."""
    _, client, _, server = glwe
    k = 2048
    q = np.full((1, k), 255)
    w = np.stack([np.full(k, 127), np.full(k, -127)], axis=1)
    acc = client.decrypt_product(server.matmul(client.encrypt_rows(q), 1, w), 1, 2)
    exact = q @ w
    assert abs(int(exact[0, 0])) > 2**25
    assert np.abs(acc - exact).max() < GLWE_NOISE


@needs_glwe
def test_glwe_ciphertexts_are_randomised_and_keys_separate(glwe: tuple) -> None:
    _, client, key, _ = glwe
    q = np.zeros((1, 8), dtype=np.int64)
    assert client.encrypt_rows(q) != client.encrypt_rows(q)
    secret = client.secret_key_bytes()
    assert len(secret) > 1000
    for off in range(0, len(secret) - 256, max(1, (len(secret) - 256) // 8)):
        assert secret[off:off + 256] not in key
