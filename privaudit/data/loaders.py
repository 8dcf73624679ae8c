"""Read users' datasets into ``Record`` lists: JSON Lines, CSV, and HF ``datasets`` saved with
``save_to_disk``.

Labels: integers are kept (they must be >= 0; ``label_names`` are ``"0" .. str(max)``); strings are
mapped to ints by their sorted unique values (``label_names`` = those values). CSV cells are all text,
so a CSV label column whose every value is an integer literal is read as integers. With
``label_column=None`` every record gets label 0 (e.g. text for causal-LM fine-tuning).

Each loaded record is its own privacy unit unless ``person_column`` names a user/person column
(values mapped to ints by sorted unique value). Ids come from ``id_column`` when present, else
``"r000000"``, ``"r000001"``, ... in file order. Nothing here executes code from the file (no pickle).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from privaudit.data.corpus import Record

_INT_RE = re.compile(r"^[+-]?\d+$")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def load_records(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str | None = "label",
    sensitive_column: str | None = None,
    *,
    id_column: str = "id",
    person_column: str | None = None,
    kind_column: str | None = None,
    split: str | None = None,
) -> list[Record]:
    """Records from a ``.jsonl``/``.ndjson`` file, a ``.csv`` file or a saved HF dataset directory.

    See ``load_records_with_labels`` (same arguments) for the label names.
    """
    records, _ = load_records_with_labels(
        path,
        text_column,
        label_column,
        sensitive_column,
        id_column=id_column,
        person_column=person_column,
        kind_column=kind_column,
        split=split,
    )
    return records


def load_records_with_labels(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str | None = "label",
    sensitive_column: str | None = None,
    *,
    id_column: str = "id",
    person_column: str | None = None,
    kind_column: str | None = None,
    split: str | None = None,
) -> tuple[list[Record], tuple[str, ...]]:
    """Records and label names (index ``i`` names label ``i``). ``split`` picks a split of a saved
    ``DatasetDict`` (default ``"train"`` when there is one). Problems raise ``ValueError`` naming the
    argument: missing/empty file, unknown type, malformed JSON (with line number), missing column,
    missing/non-text values, bad labels, duplicate ids.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"path: {str(p)!r} does not exist")
    class_names: dict[str, tuple[str, ...]] = {}
    if p.is_dir():
        rows, columns, where = _read_hf_dir(p, split, class_names)
        typed = True
    elif not p.is_file():  # a device or FIFO (e.g. a symlink to /dev/zero) is never read
        raise ValueError(f"path: {str(p)!r} is not a regular file")
    elif p.suffix.lower() in _JSONL_SUFFIXES:
        rows, columns, where = _read_jsonl(p)
        typed = True
    elif p.suffix.lower() == ".csv":
        rows, columns, where = _read_csv(p)
        typed = False
    else:
        raise ValueError(
            f"path: unsupported file type {p.suffix or '(none)'!r} for {str(p)!r} "
            "(expected .jsonl, .ndjson, .csv or a directory saved with datasets' save_to_disk)"
        )
    if not rows:
        raise ValueError(f"path: {str(p)!r} is empty (no records)")

    for arg, col in (
        ("text_column", text_column),
        ("label_column", label_column),
        ("sensitive_column", sensitive_column),
        ("person_column", person_column),
        ("kind_column", kind_column),
    ):
        if col is not None and col not in columns:
            raise ValueError(f"{arg}: column {col!r} not found in {str(p)!r}; columns: {sorted(columns)}")

    texts = [_text_value(row, text_column, "text_column", where(i)) for i, row in enumerate(rows)]
    if label_column is None:
        labels, label_names = [0] * len(rows), ("0",)
    else:
        raw = [_required(row, label_column, "label_column", where(i)) for i, row in enumerate(rows)]
        labels, label_names = _map_labels(raw, typed, [where(i) for i in range(len(rows))])
        if label_column in class_names:  # a datasets ClassLabel: keep its names
            names = class_names[label_column]
            if max(labels) >= len(names):
                raise ValueError(f"label_column: label {max(labels)} outside ClassLabel names {list(names)}")
            label_names = names
    if person_column is None:
        persons = list(range(len(rows)))
    else:
        raw_p = [str(_required(row, person_column, "person_column", where(i))) for i, row in enumerate(rows)]
        index = {v: k for k, v in enumerate(sorted(set(raw_p)))}
        persons = [index[v] for v in raw_p]

    has_ids = id_column in columns
    ids: list[str] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        rid = str(_required(row, id_column, "id_column", where(i))) if has_ids else f"r{i:06d}"
        if rid in seen:
            raise ValueError(f"id_column: duplicate id {rid!r} at {where(i)} (first at {where(seen[rid])})")
        seen[rid] = i
        ids.append(rid)

    records = [
        Record(
            id=ids[i],
            text=texts[i],
            label=labels[i],
            sensitive="" if sensitive_column is None else _str_or_empty(row.get(sensitive_column)),
            person_id=persons[i],
            kind="record" if kind_column is None else _str_or_empty(row.get(kind_column)) or "record",
            canary_id=None,
            fields={},
        )
        for i, row in enumerate(rows)
    ]
    return records, label_names


# --------------------------------------------------------------------------------------------------
# Readers: each returns (rows, columns, where) with where(i) describing row i for error messages.


def _read_jsonl(p: Path) -> tuple[list[dict[str, Any]], set[str], Any]:
    rows: list[dict[str, Any]] = []
    line_of: list[int] = []
    columns: set[str] = set()
    with p.open("r", encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"path: {str(p)!r} line {lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"path: {str(p)!r} line {lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            rows.append(obj)
            line_of.append(lineno)
            columns.update(obj)
    return rows, columns, lambda i: f"line {line_of[i]} of {str(p)!r}"


def _read_csv(p: Path) -> tuple[list[dict[str, Any]], set[str], Any]:
    with p.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            rows = [dict(row) for row in reader]
        except csv.Error as exc:
            raise ValueError(f"path: {str(p)!r} line {reader.line_num}: malformed CSV ({exc})") from None
        columns = set(reader.fieldnames or [])
    for i, row in enumerate(rows):
        if None in row:  # more cells than header fields
            raise ValueError(f"path: {str(p)!r} row {i + 2}: more values than header columns")
    # row i is on line i + 2 when no cell spans lines (header is line 1)
    return rows, columns, lambda i: f"row {i + 2} of {str(p)!r}"


def _read_hf_dir(
    p: Path, split: str | None, class_names: dict[str, tuple[str, ...]]
) -> tuple[list[dict[str, Any]], set[str], Any]:
    markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    if not any((p / m).exists() for m in markers):
        raise ValueError(f"path: directory {str(p)!r} is not a dataset saved with datasets' save_to_disk")
    from datasets import ClassLabel, DatasetDict, load_from_disk  # local import: heavy

    try:
        ds: Any = load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - report any reader failure as bad input
        raise ValueError(f"path: cannot read saved dataset {str(p)!r}: {exc}") from None
    if isinstance(ds, DatasetDict):
        names = sorted(ds)
        chosen = split if split is not None else ("train" if "train" in ds else None)
        if chosen is None:
            raise ValueError(f"split: {str(p)!r} holds splits {names}; choose one with split=")
        if chosen not in ds:
            raise ValueError(f"split: {chosen!r} not in {str(p)!r}; splits: {names}")
        ds = ds[chosen]
    elif split is not None:
        raise ValueError(f"split: {str(p)!r} is a single dataset without splits")
    columns = set(ds.column_names)
    for name, feature in ds.features.items():
        if isinstance(feature, ClassLabel):
            class_names[name] = tuple(feature.names)
    rows = ds.to_list()
    return rows, columns, lambda i: f"row {i} of {str(p)!r}"


# --------------------------------------------------------------------------------------------------
# Values


def _required(row: dict[str, Any], col: str, arg: str, where: str) -> Any:
    value = row.get(col)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{arg}: value of {col!r} is missing at {where}")
    return value


def _text_value(row: dict[str, Any], col: str, arg: str, where: str) -> str:
    value = _required(row, col, arg, where)
    if not isinstance(value, str):
        raise ValueError(f"{arg}: value of {col!r} at {where} is {type(value).__name__}, expected text")
    return value


def _str_or_empty(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _map_labels(raw: Sequence[Any], typed: bool, wheres: Sequence[str]) -> tuple[list[int], tuple[str, ...]]:
    """Integers (and integral floats) kept as they are; strings mapped by sorted unique value."""
    if not typed and all(isinstance(v, str) and _INT_RE.match(v.strip()) for v in raw):
        raw = [int(v) for v in raw]
    kinds = {"str" if isinstance(v, str) else "num" for v in raw}
    if kinds == {"str"}:
        names = tuple(sorted(set(raw)))
        index = {v: k for k, v in enumerate(names)}
        return [index[v] for v in raw], names
    if kinds == {"str", "num"}:
        first_str = next(i for i, v in enumerate(raw) if isinstance(v, str))
        raise ValueError(f"label_column: mixes text and numeric labels (text label at {wheres[first_str]})")
    labels: list[int] = []
    for v, where in zip(raw, wheres):
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int):
            raise ValueError(f"label_column: label {v!r} at {where} is not an integer or text")
        if v < 0:
            raise ValueError(f"label_column: negative label {v} at {where}")
        labels.append(v)
    return labels, tuple(str(i) for i in range(max(labels) + 1))


def records_to_rows(records: Iterable[Record]) -> list[dict[str, Any]]:
    """Plain dicts (JSON-able) for writing records back out, e.g. as JSON Lines."""
    return [
        {
            "id": r.id,
            "text": r.text,
            "label": r.label,
            "sensitive": r.sensitive,
            "person_id": r.person_id,
            "kind": r.kind,
            "canary_id": r.canary_id,
        }
        for r in records
    ]
