"""benchmarks/gpu_suite.py cannot rot unnoticed: its dry run, at its smallest, runs every step on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_suite.py"),
            "--dry_run",
            "--size",
            "tiny",
            "--out",
            str(out),
            "--budget_s",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for i, step in enumerate(["tests", "loss_memory", "overhead", "syncs", "large"], 1):
        record = json.loads((out / f"{i}_{step}.json").read_text())
        assert (out / f"{i}_{step}.log").exists()
        assert record["status"] == "ok" or (record["status"] == "skipped" and record["reason"]), record
        for key, result in record.get("results", {}).items():
            assert result["status"] == "ok", (step, key, result)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["steps"]) == {"tests", "loss_memory", "overhead", "syncs", "large"}
    assert "## large" in (out / "summary.md").read_text() and "## large" in proc.stdout
