"""Run folders and checkpoints: which checkpoint is complete, where a run resumes, and what a resume must match."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..io import METRICS_FILE, RUN_FILE
from .callbacks import run_settings


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete once its trainer_state.json, the last file the Trainer writes, parses."""
    try:
        json.loads((Path(path) / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in output_dir; one cut short by a kill during saving is passed over."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a directory that holds another run, unless asked to."""
    out = Path(output_dir)
    if resuming or overwrite or not out.exists():
        return
    markers = [METRICS_FILE, "config.json", "adapter_config.json", "trainer_state.json"]
    if any((out / m).exists() for m in markers) or any(out.glob("checkpoint-*")):
        raise UsageError(
            f"output_dir: {out} holds another run; pass --overwrite_output_dir to train into it, or "
            "--resume_from_checkpoint to continue it"
        )


def check_resume(checkpoint: str, config, accept: bool) -> None:
    """Say where the run resumes, and refuse to continue it with another objective or learning rate."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step, planned = state.get("global_step", 0), state.get("max_steps")
    print(f"Resuming from {Path(checkpoint).name} (step {step} of {planned or '?'})", flush=True)
    recorded = next((p for p in (Path(checkpoint) / RUN_FILE, Path(config.output_dir) / RUN_FILE) if p.exists()), None)
    if recorded is None:
        return
    before, now = json.loads(recorded.read_text()), run_settings(config)
    changed = [f"{k}: {before[k]} -> {now[k]}" for k in now if k in before and str(before[k]) != str(now[k])]
    if changed and not accept:
        raise UsageError(
            f"resume_from_checkpoint: the run was trained with other settings ({'; '.join(changed)}); "
            "pass --accept_changed_settings to continue it with the new ones"
        )
    if changed:
        print(f"Continuing with changed settings: {'; '.join(changed)}", flush=True)


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint last` -> the newest complete checkpoint; a path must be a complete one."""
    if not value or value.lower() in ("false", "no", "none"):
        return None
    if value.lower() in ("last", "latest", "true"):
        found = last_checkpoint(output_dir)
        if found is None:
            raise UsageError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
        return str(found)
    if not is_complete_checkpoint(Path(value)):
        raise UsageError(f"resume_from_checkpoint: {value} is not a complete checkpoint (no trainer_state.json)")
    return value
