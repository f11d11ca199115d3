"""Reading evaluation files: rows with their line numbers, per-file format detection, dataset names and hashes.

Each task supplies `detect(row) -> format | None` and `parse(row, format) -> Item`; everything here is shared.
All files are read and validated before any model is loaded, so a bad row costs nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.formats import Row, read_rows
from ..errors import DataError


@dataclass
class Item:
    """One evaluation item: `index` is its 0-based position in the file (the resume key), `line` for messages."""

    index: int
    line: int
    prompt: str = ""
    gold: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class Dataset:
    name: str
    path: str
    format: str
    items: list[Item]
    sha256: str


def split_paths(data: str) -> list[str]:
    return [p.strip() for p in data.split(",") if p.strip()]


def file_rows(path: str) -> list[Row]:
    """Every row of a JSONL / JSON / parquet file; a bad JSON line is raised here with its line number."""
    if not Path(path).is_file():
        raise DataError(path, None, None, "file not found")
    rows = list(read_rows(path))
    for row in rows:
        if isinstance(row.data, DataError):
            raise row.data
        if not isinstance(row.data, dict):
            raise DataError(row.source, row.line, None, f"expected a JSON object, got {type(row.data).__name__}")
    if not rows:
        raise DataError(path, None, None, "no rows")
    return rows


def load_file(
    path: str, detect: Callable[[dict], str | None], parse: Callable[[Row, str, int], Item], expected: str
) -> tuple[str, list[Item]]:
    """Detect the file's format from its first row, then validate and parse every row."""
    rows = file_rows(path)
    fmt = detect(rows[0].data)
    if fmt is None:
        keys = ", ".join(sorted(rows[0].data)) or "none"
        raise DataError(path, rows[0].line, None, f"unknown format (keys: {keys}); expected {expected}")
    return fmt, [parse(row, fmt, i) for i, row in enumerate(rows)]


def require(row: Row, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """row.data[key], checked for presence, type and (for strings) non-emptiness."""
    if key not in row.data or row.data[key] is None:
        raise DataError(row.source, row.line, key, "missing")
    value = row.data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(row.source, row.line, key, f"expected {names}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(row.source, row.line, key, "empty")
    return value


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_names(paths: list[str]) -> list[str]:
    """File stems, made unique ("test", "test-2") so that two files named alike keep separate results."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).name.split(".")[0] or "data"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def load_datasets(data: str, load: Callable[[str], tuple[str, list[Item]]], limit: int | None) -> list[Dataset]:
    paths = split_paths(data)
    if not paths:
        raise DataError(str(data), None, None, "no data file given")
    out = []
    for name, path in zip(dataset_names(paths), paths):
        fmt, items = load(path)
        out.append(Dataset(name, path, fmt, items[:limit] if limit else items, sha256_file(path)))
    return out
