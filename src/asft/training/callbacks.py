"""The trainer's callbacks: metrics.jsonl, the run's settings file, the progress bar's terms, a graceful stop."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

from ..io import METRICS_FILE, RUN_FILE, write_json, write_text
from ..objectives import ObjectiveSettings


class MetricsFileCallback(TrainerCallback):
    """Append every log record to `<output_dir>/metrics.jsonl` (one JSON object a line, machine-readable).

    When training (re)starts at step N, records past step N, written by a run that was killed after its last
    checkpoint, are dropped first (atomically), so each step appears once however often the run was resumed.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            truncate_metrics(Path(args.output_dir) / METRICS_FILE, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = Path(args.output_dir) / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of metrics.jsonl up to `step` (and unreadable lines, never dropped); return how many went."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            past = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            past = False
        if past:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text(path, "".join(kept))
    return dropped


# The settings that define a run's objective: resuming with other values is refused unless accepted.
# Every field of the objective (the weight rule, its parameters, the anchor) is one of them.
RUN_SETTINGS = (*ObjectiveSettings.fields(), "loss_normalization", "learning_rate", "lr_scheduler_type", "weight_decay")


def run_settings(args) -> dict:
    return {key: getattr(getattr(args, key), "value", getattr(args, key)) for key in RUN_SETTINGS}  # enums by value


class RunSettingsCallback(TrainerCallback):
    """Write `asft_run.json` in the output folder at the start of training and into every checkpoint: the
    objective's settings (a resume compares them), and what `asft compare` tabulates (LoRA, model, every
    training argument, tokens redacted by transformers' to_dict)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.info = {**run_settings(args), **_run_description(args, model)}
            write_json(Path(args.output_dir) / RUN_FILE, self.info, indent=1)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir() and hasattr(self, "info"):
            write_json(checkpoint / RUN_FILE, self.info, indent=1)


def _run_description(args, model) -> dict:
    lora = None
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        c = next(iter(peft_config.values()))
        targets = c.target_modules
        lora = {
            "r": c.r,
            "alpha": c.lora_alpha,
            "dropout": c.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        }
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "monitor_kl": getattr(args, "monitor_kl", False),
        "lora": lora,
        "model": getattr(getattr(base, "config", None), "_name_or_path", None),
        "args": json.loads(args.to_json_string()),
    }


class ProgressTermsCallback(TrainerCallback):
    """Show the loss and the KL (where there is one) on the training progress bar."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        from transformers.trainer_callback import ProgressCallback

        bar = next(
            (
                getattr(c, "training_bar", None)
                for c in self.trainer.callback_handler.callbacks
                if isinstance(c, ProgressCallback)
            ),
            None,
        )
        shown = {k: f"{logs[k]:.4g}" for k in ("loss", "kl") if isinstance((logs or {}).get(k), (int, float))}
        if bar is not None and shown:
            bar.set_postfix(shown, refresh=False)


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM / SIGINT, finish the current step, save a checkpoint and stop (no half-written state).

    A second signal falls through to the previous handler (e.g. KeyboardInterrupt), for a user who insists.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        self.signum = signum
        print(
            f"\nReceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping.",
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
