"""Bounded reads of files that other people supply (run directories, configs).

Every file is opened once, checked on the open descriptor to be a regular file (never a device, FIFO
or directory: ``/dev/zero`` or ``/dev/urandom`` behind a symlink is refused, not read), and read up to
a size cap. A file inside a run directory must also resolve to a path inside that directory: a
symlink pointing out of it (``adapter.safetensors -> /home/alice/other.safetensors``) is refused.
JSON nested too deeply for the parser is a ``ValueError`` like any other malformed JSON.

Errors are ``ValueError`` starting with ``what:`` (the field or file role the caller names).
"""

from __future__ import annotations

import json
import os
import stat
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = ["MAX_JSON_BYTES", "MAX_RUN_DIR_ENTRIES", "check_run_file", "read_bounded", "read_json_file",
           "reject_bool_numbers", "walk_run_dir"]

#: Largest JSON file (manifest, audit key, audit result) read from a run directory, in bytes.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Most entries (files and folders) a run directory may hold when it is scanned.
MAX_RUN_DIR_ENTRIES = 100_000


def check_run_file(path: str | Path, root: str | Path, what: str) -> Path:
    """``path`` resolved, after checking that it lies inside the run directory ``root`` (a symlink
    to a file elsewhere is refused) and, if it exists, is a regular file."""
    p, r = Path(path), Path(root).resolve()
    resolved = p.resolve()
    if resolved != r and r not in resolved.parents:
        raise ValueError(f"{what}: {p} points outside the run directory {r} (a symlink to {resolved}); refused")
    if resolved.exists() and not resolved.is_file():
        raise ValueError(f"{what}: {p} is not a regular file")
    return resolved


def read_bounded(path: str | Path, what: str, max_bytes: int, *, root: str | Path | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``, else a ``ValueError``). With
    ``root``, the file must resolve inside that directory."""
    p = Path(path)
    if root is not None:
        check_run_file(p, root, what)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        raise ValueError(f"{what}: {p} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what}: {p} is a directory, not a file") from None
    except OSError as exc:
        raise ValueError(f"{what}: {p} cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what}: {p} is not a regular file (device, FIFO or directory); refused")
        if st.st_size > max_bytes:
            raise ValueError(f"{what}: {p} is {st.st_size} bytes, more than the limit of {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # grew while being read
            raise ValueError(f"{what}: {p} is more than the limit of {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json_file(path: str | Path, what: str, *, root: str | Path | None = None,
                   max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, read with :func:`read_bounded` (UTF-8)."""
    raw = read_bounded(path, what, max_bytes, root=root)
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{what}: {path} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({' '.join(str(exc).split())[:200]})") from None


def walk_run_dir(root: str | Path, max_entries: int = MAX_RUN_DIR_ENTRIES) -> list[Path]:
    """Every path under ``root`` (symlinked folders are listed, not entered); a ``ValueError`` past
    ``max_entries`` entries."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            out.append(Path(dirpath) / name)
            if len(out) > max_entries:
                raise ValueError(f"run_dir: {root} holds more than {max_entries} entries; refused")
    return out


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_bool(a) for a in typing.get_args(annotation))
    return False


def reject_bool_numbers(fields: Mapping[str, Any], data: Any) -> Any:
    """``data`` unchanged, after refusing ``true``/``false`` given for a field of ``fields`` (pydantic
    ``model_fields``) that does not take a boolean: pydantic would read them as 1/0, so
    ``training.steps: true`` would run one step. A ``ValueError`` ``field: ...``."""
    if isinstance(data, dict):
        for name, value in data.items():
            if isinstance(value, bool) and name in fields and not _accepts_bool(fields[name].annotation):
                raise ValueError(f"{name}: must be a number, not a boolean ({str(value).lower()})")
    return data
