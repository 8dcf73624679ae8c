"""Ledger seals and their Ed25519 signatures.

A finished run *seals* its ledger: the last line records the number of event lines, the releases
(sum of ``count`` over every event except claims) and the hash of the line before it (the chain head).
The seal is hash-chained like every other line, so without a key it detects accidental damage, lost
tails and naive edits. Anyone can recompute hashes, so a deliberate rewrite that re-hashes the chain
and writes a new seal is *not* detected without a key. With a signing key (``privaudit keygen``) the
seal carries an Ed25519 signature over the chain head; a reader given the public key rejects any
ledger not signed by the matching private key (any forgery by someone without the key).

The seal also *covers* what a reader trusts from the run directory besides the ledger
(:func:`seal_covers`): a SHA-256 of the canonical JSON of each manifest field in
:data:`COVERED_MANIFEST_FIELDS` (the config — σ, canary seed, target ε, model name —, the plan, the
data fingerprints, the base model's fingerprint, the privacy and metrics sections) and of the bytes of
the run's audit key and adapter files (:data:`COVERED_RUN_FILES`) when the run has them. The covers are part of the hash-chained seal line and of
what a signature signs, so an edited config is detected like an edited ledger line: always when the
seal is left as it was, and with a public key also when the attacker re-hashes the seal. Seals
written before covers existed have none; readers say the manifest is "not covered by the seal
(older run)".

Key files: the private key is unencrypted PKCS#8 PEM (mode 0600), the public key SubjectPublicKeyInfo
PEM. Both are read with a size cap (hostile input).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

from privaudit.canonical import canonical_json
from privaudit.safe_read import check_run_file

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["generate_keypair", "load_signing_key", "load_public_key", "key_id", "signed_payload",
           "sign_seal", "check_signature", "PublicKeyLike", "SigningKeyLike", "COVERED_MANIFEST_FIELDS",
           "COVERED_RUN_FILES", "seal_covers", "check_covers", "validate_covers"]

MAX_KEY_FILE_BYTES = 16 * 1024

#: Manifest fields a seal covers: every one a reader relies on that is final when the run seals (the
#: status, ``ledger_seal``, ``ledger_head_hash``, ``finished`` and a sweep's ``name`` are written after
#: the seal and are not covered; ``run_id`` is compared with the ledger header instead).
COVERED_MANIFEST_FIELDS = ("mechanism", "task", "base_model", "observer", "config", "base_model_fingerprint",
                           "plan", "data", "privacy", "metrics")
#: Run-directory files a seal covers (by their bytes) when the run has them: the auditor's secret and
#: the released adapter with its initialisation (what an audit scores).
COVERED_RUN_FILES = ("audit_key.json", "adapter.safetensors", "adapter_init.safetensors")
#: Largest covered file hashed, in bytes (streamed; a LoRA adapter is far smaller).
MAX_COVERED_FILE_BYTES = 16 * 1024**3
_MAX_COVERS = 64

PublicKeyLike = Union[Ed25519PublicKey, str, os.PathLike, None]
SigningKeyLike = Union[Ed25519PrivateKey, str, os.PathLike, None]


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {p} ({exc.strerror or exc})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{what}: {p} is larger than {MAX_KEY_FILE_BYTES} bytes; not a key file")
    return data


def generate_keypair(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str] | None = None
                     ) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair (private PEM, mode 0600, never overwritten; public PEM beside it as
    ``<private>.pub`` unless ``public_path`` is given). Returns both paths."""
    priv = Path(private_path)
    pub = Path(public_path) if public_path is not None else priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() or p.is_symlink():
            raise ValueError(f"key: {p} already exists (refusing to overwrite a key)")
        if not p.parent.is_dir():
            raise ValueError(f"key: folder {p.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub_pem)
    return priv, pub


def load_signing_key(key: SigningKeyLike) -> Ed25519PrivateKey | None:
    """An Ed25519 private key from a PEM file (or the key itself; None passes through)."""
    if key is None or isinstance(key, Ed25519PrivateKey):
        return key
    data = _read_key_file(key, "signing_key")
    try:
        k = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"signing_key: {key} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(k, Ed25519PrivateKey):
        raise ValueError(f"signing_key: {key} is not an Ed25519 key (make one with `privaudit keygen`)")
    return k


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey | None:
    """An Ed25519 public key from a PEM file (or the key itself; None passes through)."""
    if key is None or isinstance(key, Ed25519PublicKey):
        return key
    data = _read_key_file(key, "public_key")
    try:
        k = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"public_key: {key} is not a PEM public key ({exc})") from None
    if not isinstance(k, Ed25519PublicKey):
        raise ValueError(f"public_key: {key} is not an Ed25519 key (make one with `privaudit keygen`)")
    return k


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 of the raw public key (a name, not a secret)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_payload(seal: dict[str, Any], run_id: str) -> bytes:
    """What a seal's signature covers: the seal without its signature, and the ledger's run id. The
    seal's ``head`` is the hash of the line before it, which by the chain covers every earlier line."""
    body = {k: v for k, v in seal.items() if k != "signature"}
    body["run_id"] = run_id
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sign_seal(seal: dict[str, Any], run_id: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The seal with ``key_id`` and ``signature`` (hex) added."""
    out = dict(seal)
    out["key_id"] = key_id(key.public_key())
    out["signature"] = key.sign(signed_payload(out, run_id)).hex()
    return out


def check_signature(seal: dict[str, Any], run_id: str, public: Ed25519PublicKey) -> str | None:
    """None if ``seal`` is signed by ``public``'s private key, else the reason it is not."""
    sig = seal.get("signature")
    if not isinstance(sig, str):
        return "the seal is not signed, but a public key was given"
    try:
        raw = bytes.fromhex(sig)
    except ValueError:
        return "the seal's signature is not hex"
    try:
        public.verify(raw, signed_payload(seal, run_id))
    except InvalidSignature:
        return (f"the seal's signature does not verify with the given public key (key id "
                f"{key_id(public)}): rewritten by someone without the signing key, or signed by another key")
    return None


def _json_digest(value: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``value`` as it reads back from a JSON file (a JSON
    round trip first, so that e.g. integer dict keys hash as the strings a reader sees)."""
    plain = json.loads(json.dumps(value, allow_nan=False))
    return hashlib.sha256(canonical_json(plain).encode("utf-8")).hexdigest()


def _file_digest(run_dir: Path, name: str) -> str | None:
    """SHA-256 of ``run_dir/name``'s bytes, None if absent. Streamed; the file must be a regular file
    inside the run directory (no symlink out of it, no device) of at most ``MAX_COVERED_FILE_BYTES``."""
    import stat

    path = run_dir / name
    if not path.exists() and not path.is_symlink():
        return None
    check_run_file(path, run_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"{name}: {path} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name}: {path} is not a regular file; refused")
        if st.st_size > MAX_COVERED_FILE_BYTES:
            raise ValueError(f"{name}: {path} is larger than {MAX_COVERED_FILE_BYTES} bytes")
        h = hashlib.sha256()
        total = 0
        while chunk := f.read(1 << 20):
            total += len(chunk)
            if total > MAX_COVERED_FILE_BYTES:
                raise ValueError(f"{name}: {path} is larger than {MAX_COVERED_FILE_BYTES} bytes")
            h.update(chunk)
    return h.hexdigest()


def seal_covers(manifest: dict[str, Any], run_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """What a run's seal covers: ``{"manifest.<field>": sha256, ..., "audit_key.json": sha256, ...}`` for
    the fields of :data:`COVERED_MANIFEST_FIELDS` present in ``manifest`` and the files of
    :data:`COVERED_RUN_FILES` present in ``run_dir``. Call it with the manifest exactly as it is
    written to disk, after the covered files are written."""
    covers = {f"manifest.{k}": _json_digest(manifest[k]) for k in COVERED_MANIFEST_FIELDS if k in manifest}
    if run_dir is not None:
        for name in COVERED_RUN_FILES:
            d = _file_digest(Path(run_dir), name)
            if d is not None:
                covers[name] = d
    return covers


def validate_covers(covers: Any) -> dict[str, str]:
    """``ValueError`` naming the field unless ``covers`` (a seal's) maps at most 64 names to hex SHA-256s."""
    if not isinstance(covers, dict) or len(covers) > _MAX_COVERS:
        raise ValueError(f"seal.covers: not an object of at most {_MAX_COVERS} digests")
    for k, v in covers.items():
        if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(f"seal.covers.{str(k)[:40]}: not a SHA-256 hex digest")
    return covers


def check_covers(covers: dict[str, str], manifest: dict[str, Any], run_dir: str | os.PathLike[str] | None
                 ) -> str | None:
    """None if ``manifest`` (and ``run_dir``'s audit key) are the ones the seal covers, else why not
    (naming the first field that differs)."""
    for name, digest in covers.items():
        if name.startswith("manifest."):
            field = name[len("manifest."):]
            if field not in manifest:
                return f"{name} is missing, but the ledger seal covers it (the manifest was edited after the run)"
            try:
                actual = _json_digest(manifest[field])
            except (ValueError, TypeError, RecursionError):
                actual = None
            if actual != digest:
                return f"{name} does not match the ledger seal (the manifest was edited after the run)"
        elif name in COVERED_RUN_FILES:
            if run_dir is None:
                continue
            try:
                actual = _file_digest(Path(run_dir), name)
            except ValueError as exc:
                return f"{name} cannot be checked against the ledger seal ({exc})"
            if actual is None:
                return f"{name} is missing, but the ledger seal covers it"
            if actual != digest:
                return f"{name} does not match the ledger seal (the file was replaced or edited after the run)"
        else:
            return f"seal.covers names {name[:60]!r}, which this version of privaudit does not know"
    return None
