"""Files asft writes, and the names they have: every write is atomic (a kill leaves the old file or none, never
half a file); the run-folder names are spelled here once."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

IGNORE_INDEX = -100  # the label of a token the loss skips (prompt, padding), as transformers and TRL use it

METRICS_FILE = "metrics.jsonl"  # one JSON record a logged step, in every run folder
RUN_FILE = "asft_run.json"  # a run's objective and training settings (resume checks, `asft compare`)
RESULTS_FILE = "results.json"  # an evaluation's scores


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` to fill, renamed over `path` when the block succeeds: an interrupted write
    leaves the old file (or none), never half a file. An existing file is replaced only with `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if path.exists():
            shutil.copymode(path, tmp)
        else:  # mkstemp makes the file private; give it the mode a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Replace `path` with `obj` as JSON (non-ASCII kept, values JSON cannot hold written as strings), atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict], *, overwrite: bool = False) -> int:
    """Write rows as JSONL, atomically; return how many."""
    count = 0
    with atomic_path(path, overwrite) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    return count


def write_parquet(path: str | Path, rows: list[dict], *, overwrite: bool = False) -> int:
    """Write rows as a parquet file, atomically; return how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path, overwrite) as tmp:
        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    return len(rows)
