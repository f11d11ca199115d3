"""Run folders and checkpoints: which checkpoint is complete, where a run resumes, and what a resume must match."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..cache.store import example_fingerprint
from ..errors import UsageError
from ..io import METRICS_FILE, RUN_FILE
from .callbacks import run_settings

# What a training run writes at the top of its folder (besides checkpoint-N/): `--overwrite_output_dir` removes
# these, and nothing else, so a folder holds one run and no file a user put there is touched.
RUN_FILES = (
    METRICS_FILE,
    RUN_FILE,
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "trainer_state.json",
    "training_args.bin",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "training_curves.png",
)


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete once its trainer_state.json, the last file the Trainer writes, parses."""
    try:
        json.loads((Path(path) / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders of output_dir, newest (largest N) first, complete or not."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in output_dir; one cut short by a kill during saving is passed over."""
    return next((path for path in checkpoints(output_dir) if is_complete_checkpoint(path)), None)


def dataset_fingerprint(dataset) -> str | None:
    """A fingerprint of the training examples (token ids and labels, in order), None for untokenized data."""
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" not in columns:
        return None
    labels = dataset["labels"] if "labels" in columns else [[]] * len(dataset)
    h = hashlib.sha256()
    for ids, lab in zip(dataset["input_ids"], labels):
        h.update(example_fingerprint(ids, lab).encode())
    return f"{len(dataset)} examples #{h.hexdigest()[:16]}"


def clear_run(output_dir: str) -> list[str]:
    """Remove the previous run from output_dir (--overwrite_output_dir): its checkpoints and the files a run
    writes (RUN_FILES; the model card README.md only when asft wrote it). Returns what went."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    gone = []
    for path in sorted(checkpoints(out)):
        shutil.rmtree(path)
        gone.append(path.name)
    for pattern in RUN_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()
                gone.append(path.name)
    card = out / "README.md"
    if card.is_file() and "tags: [asft" in card.read_text(errors="replace")[:200]:
        card.unlink()
        gone.append(card.name)
    return gone


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


def check_resume(checkpoint: str, config, accept: bool, identity: dict | None = None) -> bool:
    """Refuse to continue a run with other data, another model, objective, length or learning rate (unless
    accepted); say where it resumes. Returns True when the checkpoint already finished the run: nothing to do."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step, planned = state.get("global_step", 0), state.get("max_steps")
    recorded = next((p for p in (Path(checkpoint) / RUN_FILE, Path(config.output_dir) / RUN_FILE) if p.exists()), None)
    before, now = json.loads(recorded.read_text()) if recorded else {}, {**run_settings(config), **(identity or {})}
    changed = [
        f"{k}: {before[k]} -> {now[k]}"
        for k in now
        if k in before and now[k] is not None and str(before[k]) != str(now[k])
    ]
    if changed and not accept:
        raise UsageError(
            f"resume_from_checkpoint: {Path(checkpoint).name} belongs to a run with other settings "
            f"({'; '.join(changed)}); pass --accept_changed_settings to continue it with the new ones, or "
            "--overwrite_output_dir (without --resume_from_checkpoint) to start a new run"
        )
    target = config.max_steps if config.max_steps > 0 else planned
    if target and step >= target:
        print(f"{Path(checkpoint).name} finished the run (step {step} of {target}): nothing to do", flush=True)
        return True
    print(resuming_line(checkpoint, target), flush=True)
    if changed:
        print(f"Continuing with changed settings: {'; '.join(changed)}", flush=True)
    return False


def resuming_line(checkpoint: str, target: int | None = None) -> str:
    """'Resuming from checkpoint-N (step N of M)', as train and rl print it."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    target = target or state.get("max_steps")
    return f"Resuming from {Path(checkpoint).name} (step {state.get('global_step', 0)} of {target or '?'})"


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
