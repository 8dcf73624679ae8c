"""Where DP noise and secret sampling get their randomness: one factory for every mechanism.

Default (no seed): :class:`SecureGenerator`, a cryptographically secure generator — an AES-256-CTR
keystream (``cryptography``/OpenSSL, AES-NI) under a key from ``os.urandom``. Uniforms use 53 random
bits each, Gaussians come from the Box–Muller transform in float64 (tails to ≈ 8.5σ, i.e. a
truncated mass of ~1e-17 per coordinate, far below any δ) and are cast to the tensor's dtype.
torch's and numpy's PRNGs (Mersenne Twister, Philox, PCG64) are fast but not cryptographic: whoever
sees part of their output or learns their state can predict the rest, and with it the noise or the
sampled batches. A seed makes a run reproducible (tests, CI): :func:`noise_generator` and
:func:`sampling_rng` then return torch's / numpy's seeded generators, and the ledger header records
``noise_secure: false``.

Call sites draw through :func:`randn` (torch.randn's signature, any of the two generators). A
generator's state (key and counter) is secret: it lives in checkpoints only, never in the released
run directory.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SecureGenerator", "noise_generator", "sampling_rng", "randn", "describe_noise_source",
           "SECURE_SOURCE", "SEEDED_SOURCE"]

SECURE_SOURCE = "csprng: AES-256-CTR keystream keyed from os.urandom"
SEEDED_SOURCE = "seeded from privacy.noise_seed: reproducible, NOT SECURE"
PRNG_SOURCE = "torch/numpy PRNG seeded from OS entropy: not a CSPRNG"
SECURE_MECHANISMS = frozenset({"dp_lora", "dp_fedlora", "lora_sketch", "he_lora", "privtune", "pae_mobillm"})
"""Mechanisms whose DP noise and secret sampling draw from :class:`SecureGenerator` (the DP-SGD
loop of :class:`~privaudit.mechanisms.dp_lora.DPLoraTrainer`; DP-FedLoRA's per-(round, client)
substreams of one master key, :func:`derive`; lora_sketch's secret A, :func:`keyed_generator`;
HE-LoRA's owner-side sampling and noise; PrivTune's d_χ / Gaussian token noise, random n-hop targets,
batch sampling and evaluation noise; PAE-MobiLLM's activation and prediction-difference noise)."""

_BLOCK = 16
_TWO_PI = 2.0 * math.pi


class SecureGenerator:
    """AES-256-CTR keystream → uniforms, permutations and Gaussians (see the module docstring).

    Offers the parts of ``numpy.random.Generator`` the samplers use (``random``, ``permutation``,
    ``choice`` without replacement, ``bit_generator.state``) and :meth:`randn` for noise tensors.
    """

    def __init__(self, key: bytes | None = None, counter: int = 0) -> None:
        self._key = os.urandom(32) if key is None else bytes(key)
        if len(self._key) != 32:
            raise ValueError("key: an AES-256 key has 32 bytes")
        self._counter = int(counter)

    # -- raw stream -------------------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        """``n`` bytes of keystream (the counter advances by whole 16-byte blocks)."""
        blocks = -(-int(n) // _BLOCK)
        enc = Cipher(algorithms.AES(self._key), modes.CTR(self._counter.to_bytes(16, "big"))).encryptor()
        out = enc.update(bytes(blocks * _BLOCK))
        self._counter = (self._counter + blocks) % (1 << 128)
        return out[:n]

    def random(self, size: int | Sequence[int] | None = None) -> Any:
        """Uniforms in the open interval (0, 1), 53 random bits each (float64 array, or a float)."""
        n = 1 if size is None else int(np.prod(size))
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64) >> np.uint64(11)
        u = (words.astype(np.float64) + 0.5) * 2.0 ** -53
        return float(u[0]) if size is None else u.reshape(size)

    def permutation(self, n: int) -> np.ndarray:
        """A uniformly random permutation of ``range(n)`` (argsort of 53-bit uniforms)."""
        return np.argsort(self.random(int(n)), kind="stable").astype(np.int64)

    def choice(self, a: int, size: int, replace: bool = False) -> np.ndarray:
        if replace:
            raise ValueError("choice: only sampling without replacement is supported")
        if size > a:
            raise ValueError("choice: size larger than the population")
        return self.permutation(a)[:size]

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` standard Gaussians (float64), Box–Muller on 53-bit uniforms."""
        m = -(-int(n) // 2)
        u = self.random(2 * m)
        r = np.sqrt(-2.0 * np.log(u[:m]))
        theta = _TWO_PI * u[m:]
        return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]

    def randn(self, *size: Any, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        n = int(np.prod(shape)) if shape else 1
        z = torch.from_numpy(self.standard_normal(n)).reshape(shape)
        return z.to(device=device or "cpu", dtype=dtype or torch.get_default_dtype())

    # -- state (secret: checkpoints only) ------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        return {"bit_generator": "aes-256-ctr", "key": self._key.hex(), "counter": self._counter}

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict) or value.get("bit_generator") != "aes-256-ctr":
            raise ValueError("rng: saved state is not an aes-256-ctr generator's")
        key = bytes.fromhex(str(value["key"]))
        if len(key) != 32:
            raise ValueError("rng: saved key has the wrong length")
        self._key, self._counter = key, int(value["counter"])

    @property
    def bit_generator(self) -> "SecureGenerator":  # numpy.random.Generator compatibility
        return self


def noise_generator(seed: int | None, device: Any = "cpu") -> "SecureGenerator | torch.Generator":
    """The DP-noise generator: secure without a seed, torch's seeded generator with one."""
    if seed is None:
        return SecureGenerator()
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def sampling_rng(seed: int | None) -> "SecureGenerator | np.random.Generator":
    """The secret sampling generator: secure without a seed, numpy's PCG64 with one."""
    if seed is None:
        return SecureGenerator()
    return np.random.Generator(np.random.PCG64(seed))


def randn(*size: Any, generator: Any = None, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn`` for either generator."""
    if isinstance(generator, SecureGenerator):
        return generator.randn(*size, device=device, dtype=dtype)
    return torch.randn(*size, generator=generator, device=device, dtype=dtype)


def describe_noise_source(noise_seed: int | None, mechanism: str | None = None) -> dict[str, Any]:
    """Ledger-header fields naming the noise source of a run (``noise_secure`` false unless the
    mechanism draws from :class:`SecureGenerator` and no seed is set)."""
    if noise_seed is not None:
        return {"noise_source": SEEDED_SOURCE, "noise_secure": False}
    if mechanism is not None and mechanism not in SECURE_MECHANISMS:
        return {"noise_source": PRNG_SOURCE, "noise_secure": False}
    return {"noise_source": SECURE_SOURCE, "noise_secure": True}


# -- keyed substreams (csprng2): independent, reproducible streams under one secret master key -------
__all__ += ["derive", "derive_key", "keyed_generator"]
_DERIVE_INFO = b"privaudit.rng.derive/v1\x00"


def _label(parts: Sequence[int | str]) -> bytes:
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise ValueError(f"derive: a substream label is made of ints and strings, got {p!r}")
    return _DERIVE_INFO + json.dumps(list(parts), separators=(",", ":")).encode()


def derive_key(key: bytes, *parts: int | str) -> bytes:
    """The 32-byte key of substream ``parts`` (e.g. ``(round, client, "noise")``) under ``key``:
    HKDF-SHA256 (RFC 5869) with ``key`` as input keying material and the JSON label of ``parts`` as
    ``info``. Distinct labels give computationally independent keys; one label always the same key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_label(parts)).derive(bytes(key))


def derive(master: SecureGenerator, *parts: int | str) -> SecureGenerator:
    """A fresh :class:`SecureGenerator` (counter 0) for substream ``parts`` of ``master``'s key.

    Deterministic in (master key, parts) and independent of how far ``master`` itself has been read:
    a run keeps one secret master generator and draws, say, round t / client k's noise from
    ``derive(master, t, k, "noise")`` — clients need no shared state, any substream can be rebuilt
    from the master key (resume, another process), and none reveals another or the master key."""
    return SecureGenerator(key=derive_key(master._key, *parts))


def keyed_generator(secret: int, *parts: int | str) -> SecureGenerator:
    """A :class:`SecureGenerator` keyed from an integer secret (e.g. a 256-bit value from
    ``secrets.randbits(256)`` kept in an audit key) by :func:`derive_key`. As secret as ``secret``: a
    small or published integer makes a reproducible, NOT secure stream."""
    return SecureGenerator(key=derive_key(str(int(secret)).encode(), *parts))



# ---------------------------------------------------------------------------------------------
# csprng1: uniform and Gamma draws from the keystream (the d_χ sampler of PrivTune, its random n-hop
# targets) and the generator-agnostic helpers the PrivTune / PAE-MobiLLM call sites use.
# ---------------------------------------------------------------------------------------------
__all__ += ["secure_or", "standard_gamma", "rand", "gamma"]


def secure_or(generator: Any) -> Any:
    """``generator`` itself, or a fresh :class:`SecureGenerator` when it is None: a noise call site
    handed no generator draws from a CSPRNG, never from torch's global PRNG."""
    return SecureGenerator() if generator is None else generator


def standard_gamma(gen: SecureGenerator, shape: float, n: int) -> np.ndarray:
    """``n`` Gamma(``shape``, scale 1) draws (float64) from the keystream.

    Method: Marsaglia & Tsang (ACM TOMS 26(3), 2000), an *exact* rejection sampler for shape a ≥ 1:
    with d = a − 1/3 and c = 1/√(9d), draw x ~ N(0, 1) (:meth:`SecureGenerator.standard_normal`) and
    u ~ U(0, 1) (:meth:`SecureGenerator.random`), set v = (1 + c·x)³, and accept d·v when v > 0 and
    log u < x²/2 + d − d·v + d·log v (acceptance ≥ 95 % for every a ≥ 1, → 1 as a grows). For
    0 < a < 1, Gamma(a) = Gamma(a + 1)·U^(1/a) (exact). The only departures from the exact law are
    those of the inputs: uniforms on a 2^-53 grid, normals from Box–Muller whose tails end at ≈ 8.5σ
    (mass ~1e-17 per draw). Rejection is vectorised: rounds of ⌈1.1·missing⌉ + 8 candidates until
    ``n`` are accepted, so the number of keystream bytes consumed is random (the stream stays
    secret, and a seeded replay via ``SecureGenerator(key=...)`` repeats it exactly).
    """
    a = float(shape)
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"shape: must be a finite number > 0, got {shape!r}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n: must be an integer >= 0, got {n!r}")
    if a < 1.0:
        return standard_gamma(gen, a + 1.0, n) * gen.random(n) ** (1.0 / a)
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = np.empty(n, dtype=np.float64)
    filled = 0
    while filled < n:
        m = int(math.ceil(1.1 * (n - filled))) + 8
        x = gen.standard_normal(m)
        u = gen.random(m)
        t = 1.0 + c * x
        ok = t > 0
        logv = 3.0 * np.log(np.where(ok, t, 1.0))
        v = np.exp(logv)
        ok &= np.log(u) < 0.5 * x * x + d - d * v + d * logv
        acc = d * v[ok]
        take = min(acc.size, n - filled)
        out[filled:filled + take] = acc[:take]
        filled += take
    return out


def rand(*size: Any, generator: Any = None, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.rand`` for either generator (a :class:`SecureGenerator` gives 53-bit uniforms in
    (0, 1), computed in float64 and cast to ``dtype``: a float32 cast may round the largest to 1.0)."""
    if isinstance(generator, SecureGenerator):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        u = torch.from_numpy(np.asarray(generator.random(int(np.prod(shape)) if shape else 1), dtype=np.float64))
        return u.reshape(shape).to(device=device or "cpu", dtype=dtype or torch.get_default_dtype())
    return torch.rand(*size, generator=generator, device=device, dtype=dtype)


def gamma(shape: float, n: int, *, generator: Any, device: Any = None,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` Gamma(``shape``, 1) draws as a tensor: Marsaglia–Tsang on the keystream
    (:func:`standard_gamma`) for a :class:`SecureGenerator`; for a seeded ``torch.Generator`` (integer
    shape only) the sum of ``shape`` Exp(1) variables drawn with ``Tensor.exponential_`` — exact, and
    the draws a seeded run has always made, so seeded runs replay unchanged."""
    if isinstance(generator, SecureGenerator):
        return torch.from_numpy(standard_gamma(generator, shape, n)).to(device=device or "cpu", dtype=dtype)
    k = int(shape)
    if k != shape or k < 1:
        raise ValueError(f"shape: a torch.Generator draws Gamma for integer shapes >= 1 only, got {shape!r}")
    e = torch.empty(n, k, device=device, dtype=torch.float64).exponential_(1.0, generator=generator)
    return e.sum(dim=1).to(dtype)


