"""Finished work kept in the output directory, so that a rerun resumes instead of recomputing.

`run.json` holds the settings fingerprint (model weights' identity, task, template, backend, dtype, generation
settings) and a SHA-256 per data file; `generations.jsonl` holds one line per (dataset, index, sample), appended
and flushed batch by batch, so an interrupted run loses at most one batch. A rerun whose settings or data differ
is refused with the differences named: results made under other settings are never mixed in silently, and
nothing is deleted unless --overwrite says so.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import EvalError
from ..io import write_json

RUN, GENERATIONS, JUDGMENTS = "run.json", "generations.jsonl", "judgments.jsonl"
OUTPUTS = ("results.json", "predictions.jsonl", "model_outputs.json")


class JsonlLog:
    """An append-only JSONL file that tolerates a truncated last line (the run was killed mid-write)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records, bad = [], 0
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
        if bad:
            print(
                f"{self.path}: ignored {bad} unreadable line(s) (an interrupted write); recomputing them",
                file=sys.stderr,
            )
        return records

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with self.path.open("a") as f:
            needs_newline = f.tell() > 0 and not self._ends_with_newline()
            if needs_newline:
                f.write("\n")
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Store:
    def __init__(self, out_dir: str | Path, settings: dict, datasets: dict[str, str], *, overwrite: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._discard()
        self._check(settings, datasets)
        self.log = JsonlLog(self.dir / GENERATIONS)
        self.done: dict[tuple[str, int], dict[int, object]] = {}
        for r in self.log.read():
            self.done.setdefault((r["dataset"], r["index"]), {})[r["sample"]] = r["output"]

    def _discard(self) -> None:
        gone = [name for name in (RUN, GENERATIONS, JUDGMENTS, *OUTPUTS) if (self.dir / name).exists()]
        for name in gone:
            (self.dir / name).unlink()
        if gone:
            print(f"--overwrite: removed {', '.join(gone)} from {self.dir}", file=sys.stderr)

    def _check(self, settings: dict, datasets: dict[str, str]) -> None:
        run = self.dir / RUN
        hint = f"use another --output_dir, or pass --overwrite to discard the stored results in {self.dir}"
        if not run.exists():
            if (self.dir / GENERATIONS).exists():
                raise EvalError(f"{self.dir / GENERATIONS} exists without {RUN}: its settings are unknown; {hint}")
            write_json(run, {"settings": settings, "datasets": datasets})
            return
        old = json.loads(run.read_text())
        diffs = _differences(old.get("settings", {}), settings)
        if diffs:
            raise EvalError(f"{self.dir} holds results made with other settings ({'; '.join(diffs)}); {hint}")
        changed = [n for n, sha in datasets.items() if old.get("datasets", {}).get(n, sha) != sha]
        if changed:
            raise EvalError(
                f"{self.dir} holds results for a different version of data file(s) {', '.join(changed)}; {hint}"
            )
        write_json(run, {"settings": settings, "datasets": {**old.get("datasets", {}), **datasets}})

    def get(self, dataset: str, index: int, samples: int = 1) -> list | None:
        """The stored outputs of an item's samples 0..samples-1, or None when any is missing."""
        found = self.done.get((dataset, index), {})
        if any(s not in found for s in range(samples)):
            return None
        return [found[s] for s in range(samples)]

    def put(self, dataset: str, index: int, outputs: list) -> None:
        self.put_many([(dataset, index, outputs)])

    def put_many(self, entries: list[tuple[str, int, list]]) -> None:
        records = []
        for dataset, index, outputs in entries:
            for sample, output in enumerate(outputs):
                self.done.setdefault((dataset, index), {})[sample] = output
                records.append({"dataset": dataset, "index": index, "sample": sample, "output": output})
        self.log.append(records)
