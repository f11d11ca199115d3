"""results.json, predictions.jsonl and the markdown table: one format for every task and backend."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..io import RESULTS_FILE, atomic_path, write_json


@dataclass
class DatasetResult:
    name: str
    file: str
    format: str
    metric: str
    value: float | None  # None when nothing could be scored (e.g. judge without a judge model)
    n: int
    extra: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "file": self.file,
            "format": self.format,
            "metric": self.metric,
            "value": self.value,
            "n": self.n,
            **self.extra,
        }


def macro_average(results: list[DatasetResult]) -> dict:
    values = [r.value for r in results if r.value is not None and r.n > 0]
    metrics = sorted({r.metric for r in results})
    return {
        "metric": metrics[0] if len(metrics) == 1 else "/".join(metrics),
        "value": sum(values) / len(values) if values else None,
        "n_datasets": len(values),
    }


def write_results(out_dir: Path, header: dict, results: list[DatasetResult]) -> dict:
    from ..version import __version__

    report = {
        **header,
        "asft_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(),
        "datasets": {r.name: r.summary() for r in results},
        "macro_average": macro_average(results),
    }
    write_json(out_dir / RESULTS_FILE, report)
    with atomic_path(out_dir / "predictions.jsonl", overwrite=True) as tmp, tmp.open("w") as f:
        for r in results:
            for p in r.predictions:
                f.write(json.dumps({"dataset": r.name, **p}, ensure_ascii=False) + "\n")
    return report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    # Four decimals for scores, significant digits for small values (a KL of 7.9e-06 is not 0.0000).
    return f"{value:.4g}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"


def _numeric(r: dict) -> dict:
    """Every number a dataset's results hold beside its main metric (drift's nll, pass@k, avg@n, ...)."""
    skip = {"value", "n", r.get("metric")}
    return {k: v for k, v in r.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown_table(report: dict) -> str:
    """One row per dataset: the main metric, then every other number results.json holds for it."""
    extra = []
    for r in report["datasets"].values():
        extra += [k for k in _numeric(r) if k not in extra]
    lines = [
        "| dataset | metric | value | n |" + "".join(f" {k} |" for k in extra),
        "|---|---|---:|---:|" + "---:|" * len(extra),
    ]
    for name, r in report["datasets"].items():
        nums = _numeric(r)
        lines.append(
            f"| {name} | {r['metric']} | {_fmt(r['value'])} | {r['n']} |"
            + "".join(f" {_fmt(nums.get(k))} |" for k in extra)
        )
    avg = report["macro_average"]
    lines.append(
        f"| **macro average** | {avg['metric']} | {_fmt(avg['value'])} | {avg['n_datasets']} datasets |"
        + " |" * len(extra)
    )
    return "\n".join(lines)


def print_report(report: dict, out_dir: Path, what: str = "per item") -> None:
    """Print a report's markdown table and where its files are."""
    print(markdown_table(report))
    print(f"\nResults: {out_dir / RESULTS_FILE}; {what}: {out_dir / 'predictions.jsonl'}")
