"""Ledger seals and their Ed25519 signatures.

A finished run *seals* its ledger: the last line records the number of event lines, the releases
(sum of ``count`` over every event except claims) and the hash of the line before it (the chain head).
The seal is hash-chained like every other line, so without a key it detects accidental damage, lost
tails and naive edits. Anyone can recompute hashes, so a deliberate rewrite that re-hashes the chain
and writes a new seal is *not* detected without a key. With a signing key (``privaudit keygen``) the
seal carries an Ed25519 signature over the chain head; a reader given the public key rejects any
ledger not signed by the matching private key (any forgery by someone without the key).

Key files: the private key is unencrypted PKCS#8 PEM (mode 0600), the public key SubjectPublicKeyInfo
PEM. Both are read with a size cap (hostile input).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["generate_keypair", "load_signing_key", "load_public_key", "key_id", "signed_payload",
           "sign_seal", "check_signature", "PublicKeyLike", "SigningKeyLike"]

MAX_KEY_FILE_BYTES = 16 * 1024

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
