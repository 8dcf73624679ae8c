"""Encryption backends for HE-LoRA's remote linear products, and the quantization around them.

One small interface (:class:`HEBackend`): the owner calls :meth:`HEBackend.keygen` and gets a
:class:`ClientSession` that holds the secret key, encrypts quantized rows and decrypts products; the
worker builds a :class:`ServerSession` from the *evaluation* key bytes alone and multiplies
ciphertexts by clear integer weights. Two backends:

* ``glwe``: Zama's GLWE encrypted×clear matrix product (``concrete-ml-extensions``, the scheme of the
  HE-LoRA paper, arXiv 2505.07329): leveled, no bootstrapping; rows of a uint matrix are encrypted,
  the worker returns compressed GLWE results; the low bits of each result carry encryption noise
  (tens of units in a 27-bit accumulator with the default parameters). 128-bit security is the
  library's stated target for its default parameter set. Optional dependency: ``privaudit[he]``.
* ``simulate``: the same integers multiplied exactly, without encryption (its "ciphertexts" are the
  clear quantized values): identical quantization, for fast tests and large models. Never to be
  sent off the machine.

Quantization (the paper's scheme): dynamic per-row (per-token) asymmetric quantization of the input
to ``n_bits`` unsigned integers, static per-output-channel symmetric quantization of the weight to
``n_bits`` signed integers, integer product, then zero-point correction and dequantization:

    y[t, j] = s_x[t] · s_w[j] · (Σ_i q_x[t, i] q_w[i, j] − z_x[t] · Σ_i q_w[i, j])

Accumulator bound: |Σ_i q_x q_w| < k · 2^n · 2^(n−1), which fits the signed accumulator of
``reserved_bits`` bits when ``2·n_bits + log2(k) ≤ reserved_bits`` (27 for the GLWE default).
Configurations that break it are refused (:func:`check_accumulator`).

This module depends on numpy only (the worker process does not import torch).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

GLWE_PACKAGE = "concrete-ml-extensions"
GLWE_SCHEME = "tfhe-glwe"
GLWE_SECURITY_BITS = 128  # the library's stated target for its default parameters
SIMULATE_RESERVED_BITS = 27  # same bound as the GLWE default, so that simulate refuses what execute would


# ----------------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedRows:
    """``values`` (rows, k) int64 in [0, 2^n − 1]; ``x ≈ scale[:, None] · (values − zero_point[:, None])``."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


@dataclass(frozen=True)
class QuantizedWeight:
    """``values`` (k, n) int64 in [−(2^(n−1) − 1), 2^(n−1) − 1]; ``w ≈ values · scale[None, :]``;
    ``col_sums`` = Σ_i values[i, j] (for the zero-point correction)."""

    values: np.ndarray
    scale: np.ndarray
    col_sums: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])


def _check_n_bits(n_bits: int) -> None:
    if not isinstance(n_bits, (int, np.integer)) or isinstance(n_bits, bool) or not 2 <= n_bits <= 16:
        raise ValueError(f"n_bits: must be an integer in [2, 16], got {n_bits!r}")


def _finite_matrix(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as a float64 2-d array of finite numbers (a ``ValueError`` naming ``name`` otherwise)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinity (cannot quantize)")
    return a


def quantize_rows(x: np.ndarray, n_bits: int) -> QuantizedRows:
    """Dynamic asymmetric quantization of each row of ``x`` (rows, k) to ``n_bits`` unsigned ints.

    The range of each row is [min(x, 0), max(x, 0)] so that 0 is exact; a constant-zero row gets
    scale 1 and zero point 0.
    """
    _check_n_bits(n_bits)
    x = _finite_matrix(x, "x")
    qmax = (1 << n_bits) - 1
    lo = np.minimum(x.min(axis=1, initial=0.0), 0.0)
    hi = np.maximum(x.max(axis=1, initial=0.0), 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.int64)
    q = np.clip(np.rint(x / scale[:, None]) + zp[:, None], 0, qmax).astype(np.int64)
    return QuantizedRows(q, scale, zp)


def quantize_channels(w: np.ndarray, n_bits: int) -> QuantizedWeight:
    """Static symmetric quantization of each column (output channel) of ``w`` (k, n)."""
    _check_n_bits(n_bits)
    w = _finite_matrix(w, "weight")
    qmax = (1 << (n_bits - 1)) - 1
    amax = np.abs(w).max(axis=0, initial=0.0)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.rint(w / scale[None, :]), -qmax, qmax).astype(np.int64)
    return QuantizedWeight(q, scale, q.sum(axis=0))


def dequantize_product(acc: np.ndarray, rows: QuantizedRows, weight: QuantizedWeight) -> np.ndarray:
    """Float64 ``x @ w`` from the integer accumulator ``acc`` = q_x @ q_w (rows, n)."""
    acc = np.asarray(acc, dtype=np.float64)
    corrected = acc - rows.zero_point[:, None].astype(np.float64) * weight.col_sums[None, :].astype(np.float64)
    return corrected * rows.scale[:, None] * weight.scale[None, :]


def integer_product(q_rows: np.ndarray, q_weight: np.ndarray) -> np.ndarray:
    """Exact int64 product of two integer matrices whose accumulators stay below 2^53 (float64 BLAS)."""
    out = np.asarray(q_rows, dtype=np.float64) @ np.asarray(q_weight, dtype=np.float64)
    return np.rint(out).astype(np.int64)


def accumulator_bits(n_bits: int, k: int) -> float:
    """2·n_bits + log2(k): the bits an n-bit × n-bit dot product of length k needs (sign included)."""
    return 2 * n_bits + math.log2(max(int(k), 1))


def max_n_bits(k: int, reserved_bits: int) -> int:
    """The largest n with 2n + log2(k) ≤ reserved_bits."""
    return int(math.floor((reserved_bits - math.log2(max(int(k), 1))) / 2))


def check_accumulator(n_bits: int, k: int, reserved_bits: int, where: str = "") -> None:
    """Refuse (``ValueError`` naming ``n_bits``) a product whose accumulator may overflow."""
    _check_n_bits(n_bits)
    need = accumulator_bits(n_bits, k)
    if need > reserved_bits:
        at = f" for {where}" if where else ""
        raise ValueError(
            f"n_bits: 2*{n_bits} + log2({k}) = {need:.2f} bits exceeds the {reserved_bits} bits the scheme "
            f"reserves for the accumulator{at}; use n_bits <= {max_n_bits(k, reserved_bits)}"
        )


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------
class ClientSession(ABC):
    """Owner side: holds the secret key. Never hand this object (or its key) to a worker."""

    @abstractmethod
    def server_key(self) -> bytes:
        """The evaluation key the worker needs (no secret material)."""

    @abstractmethod
    def encrypt_rows(self, q: np.ndarray) -> bytes:
        """Serialised encryption of the rows of ``q`` (rows, k), integers in [0, 2^n)."""

    @abstractmethod
    def decrypt_product(self, blob: bytes, rows: int, cols: int) -> np.ndarray:
        """The (rows, cols) int64 accumulator from the worker's serialised result."""

    @abstractmethod
    def secret_key_bytes(self) -> bytes:
        """Serialised secret key (tests: to check that it never crosses the wire)."""


class ServerSession(ABC):
    """Worker side: built from evaluation-key bytes only."""

    @abstractmethod
    def matmul(self, blob: bytes, rows: int, weight: np.ndarray) -> bytes:
        """Serialised product of the ciphertext ``blob`` ((rows, k) encrypted) and ``weight`` (k, n) int64."""


class HEBackend(ABC):
    """A scheme for encrypted × clear integer matrix products."""

    name: str = "base"
    encrypted: bool = True

    @property
    @abstractmethod
    def scheme(self) -> str: ...

    @property
    @abstractmethod
    def security_bits(self) -> int: ...

    @property
    @abstractmethod
    def reserved_bits(self) -> int:
        """Bits of the signed accumulator that hold an exact result."""

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """JSON-able parameters (enough for a worker to rebuild the backend)."""

    @abstractmethod
    def keygen(self) -> ClientSession: ...

    @abstractmethod
    def server(self, server_key: bytes) -> ServerSession: ...

    @abstractmethod
    def request_nbytes(self, rows: int, k: int) -> int:
        """Exact size of ``encrypt_rows`` for a (rows, k) matrix."""

    @abstractmethod
    def response_nbytes(self, rows: int, n: int) -> int:
        """Exact size of a serialised (rows, n) product."""


# ----------------------------------------------------------------------------------------------
# simulate: identical integers, no encryption
# ----------------------------------------------------------------------------------------------
class _SimClient(ClientSession):
    def server_key(self) -> bytes:
        return b""

    def encrypt_rows(self, q: np.ndarray) -> bytes:
        return np.ascontiguousarray(q, dtype="<i8").tobytes()

    def decrypt_product(self, blob: bytes, rows: int, cols: int) -> np.ndarray:
        return np.frombuffer(blob, dtype="<i8").reshape(rows, cols).astype(np.int64)

    def secret_key_bytes(self) -> bytes:
        return b""


class _SimServer(ServerSession):
    def matmul(self, blob: bytes, rows: int, weight: np.ndarray) -> bytes:
        k = weight.shape[0]
        q = np.frombuffer(blob, dtype="<i8").reshape(rows, k)
        return np.ascontiguousarray(integer_product(q, weight), dtype="<i8").tobytes()


class SimulateBackend(HEBackend):
    """Exact integer products without encryption (its messages are plaintext)."""

    name = "simulate"
    encrypted = False

    def __init__(self, reserved_bits: int = SIMULATE_RESERVED_BITS) -> None:
        self._reserved = int(reserved_bits)

    @property
    def scheme(self) -> str:
        return "simulate (no encryption)"

    @property
    def security_bits(self) -> int:
        return 0

    @property
    def reserved_bits(self) -> int:
        return self._reserved

    def parameters(self) -> dict[str, Any]:
        return {"reserved_bits": self._reserved}

    def keygen(self) -> ClientSession:
        return _SimClient()

    def server(self, server_key: bytes) -> ServerSession:
        return _SimServer()

    def request_nbytes(self, rows: int, k: int) -> int:
        return 8 * rows * k

    def response_nbytes(self, rows: int, n: int) -> int:
        return 8 * rows * n


# ----------------------------------------------------------------------------------------------
# glwe: concrete-ml-extensions
# ----------------------------------------------------------------------------------------------
def glwe_available() -> bool:
    """Whether ``concrete_ml_extensions`` imports (the ``privaudit[he]`` extra)."""
    try:
        import concrete_ml_extensions  # noqa: F401
    except ImportError:
        return False
    return True


def _fhext() -> Any:
    try:
        import concrete_ml_extensions as fx
    except ImportError:
        raise ValueError(
            f"backend: 'glwe' needs the {GLWE_PACKAGE} package (pip install 'privaudit[he]')"
        ) from None
    return fx


class _GlweClient(ClientSession):
    def __init__(self, backend: "GlweBackend") -> None:
        fx = _fhext()
        self._fx = fx
        self._params = backend._crypto_params()
        self._poly = backend.polynomial_size
        self._pkey, self._ckey = fx.create_private_key(self._params)

    def server_key(self) -> bytes:
        return bytes(self._ckey.serialize())

    def encrypt_rows(self, q: np.ndarray) -> bytes:
        data = np.ascontiguousarray(np.asarray(q, dtype=np.int64).astype(np.uint64))
        ct = self._fx.encrypt_matrix(pkey=self._pkey, crypto_params=self._params, data=data)
        return bytes(ct.serialize())

    def decrypt_product(self, blob: bytes, rows: int, cols: int) -> np.ndarray:
        fx = self._fx
        res = fx.CompressedResultEncryptedMatrix.deserialize(blob)
        last = cols % self._poly or self._poly
        out = fx.decrypt_matrix(res, self._pkey, self._params, last)
        out = np.asarray(out).astype(np.int64).reshape(rows, cols)
        return out

    def secret_key_bytes(self) -> bytes:
        return bytes(self._pkey.serialize())


class _GlweServer(ServerSession):
    def __init__(self, backend: "GlweBackend", server_key: bytes) -> None:
        fx = _fhext()
        self._fx = fx
        try:
            self._ckey = fx.deserialize_compression_key(server_key)
        except Exception as exc:  # the library raises its own error types
            raise ValueError(f"server_key: not a valid GLWE compression key ({exc})") from None

    def matmul(self, blob: bytes, rows: int, weight: np.ndarray) -> bytes:
        fx = self._fx
        ct = fx.EncryptedMatrix.deserialize(blob)
        w = np.ascontiguousarray(np.asarray(weight, dtype=np.int64).astype(np.uint64))  # two's complement
        res = fx.matrix_multiplication(encrypted_matrix=ct, data=w, compression_key=self._ckey)
        return bytes(res.serialize())


class GlweBackend(HEBackend):
    """TFHE-rs GLWE encrypted × clear products via ``concrete-ml-extensions`` (default parameters).

    Message sizes (measured on concrete-ml-extensions 0.2.0, checked by the tests): a (rows, k)
    encryption is 24 + rows·(16 + ⌈k/N⌉·10072) bytes and a (rows, n) result 8 + rows·(6736 +
    8·⌈26·n/64⌉) bytes for n ≤ N = 2048 (one compressed GLWE per N outputs beyond; the multi-chunk
    size is extrapolated, and the owner checks every predicted size against the bytes it counts). The evaluation (compression)
    key is ~134 MB, sent once.
    """

    name = "glwe"
    encrypted = True

    def __init__(self, params_json: str | None = None) -> None:
        fx = _fhext()
        text = params_json if params_json is not None else fx.default_params()
        try:
            self._params_dict = json.loads(text)
            fx.MatmulCryptoParameters.deserialize(json.dumps(self._params_dict))
        except Exception as exc:
            raise ValueError(f"parameters: not valid GLWE crypto parameters ({exc})") from None
        self._params_json = json.dumps(self._params_dict, sort_keys=True)
        self.polynomial_size = int(self._params_dict["polynomial_size"])
        self._version = getattr(fx, "__version__", "unknown")

    def _crypto_params(self) -> Any:
        return _fhext().MatmulCryptoParameters.deserialize(self._params_json)

    @property
    def scheme(self) -> str:
        return GLWE_SCHEME

    @property
    def security_bits(self) -> int:
        return GLWE_SECURITY_BITS

    @property
    def reserved_bits(self) -> int:
        return int(self._params_dict["bits_reserved_for_computation"])

    def parameters(self) -> dict[str, Any]:
        return {"library": f"{GLWE_PACKAGE} {self._version}", "crypto": dict(self._params_dict)}

    def keygen(self) -> ClientSession:
        return _GlweClient(self)

    def server(self, server_key: bytes) -> ServerSession:
        return _GlweServer(self, server_key)

    def request_nbytes(self, rows: int, k: int) -> int:
        chunks = -(-int(k) // self.polynomial_size)
        return 24 + rows * (16 + chunks * 10072)

    def response_nbytes(self, rows: int, n: int) -> int:
        bits = int(self._params_dict["output_storage_ciphertext_modulus"])
        full, last = divmod(int(n), self.polynomial_size)
        sizes = [self.polynomial_size] * full + ([last] if last else [])
        per_row = sum(6736 + 8 * (-(-bits * c // 64)) for c in sizes)
        return 8 + rows * per_row


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
BACKENDS: tuple[str, ...] = ("glwe", "simulate")


def get_backend(name: str, parameters: dict[str, Any] | None = None) -> HEBackend:
    """A backend by name, rebuilt from :meth:`HEBackend.parameters` when given."""
    parameters = parameters or {}
    if name == "glwe":
        crypto = parameters.get("crypto")
        return GlweBackend(json.dumps(crypto) if crypto is not None else None)
    if name == "simulate":
        return SimulateBackend(int(parameters.get("reserved_bits", SIMULATE_RESERVED_BITS)))
    raise ValueError(f"backend: unknown {name!r} (choose from {', '.join(BACKENDS)})")


__all__ = [
    "BACKENDS",
    "ClientSession",
    "GlweBackend",
    "HEBackend",
    "QuantizedRows",
    "QuantizedWeight",
    "ServerSession",
    "SimulateBackend",
    "accumulator_bits",
    "check_accumulator",
    "dequantize_product",
    "get_backend",
    "glwe_available",
    "integer_product",
    "max_n_bits",
    "quantize_channels",
    "quantize_rows",
]
