"""The trainer's callbacks: metrics.jsonl, the run's settings file, the progress bar's terms, a graceful stop."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from ..errors import StoppedWithoutCheckpoint
from ..io import METRICS_FILE, RUN_FILE, write_json, write_text
from ..models import lora_description
from ..objectives import ObjectiveSettings

TOTALS_FILE = "asft_totals.json"  # in each checkpoint: what the run did up to it (a resumed run's summary adds it)


class MetricsFileCallback(TrainerCallback):
    """Append every log record to `<output_dir>/metrics.jsonl` (one JSON object a line, machine-readable).

    When training (re)starts at step N, records past step N, written by a run that was killed after its last
    checkpoint, are dropped first (atomically), so each step appears once however often the run was resumed.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the summary of an earlier, stopped part goes too: a resume writes its own
            truncate_metrics(Path(args.output_dir) / METRICS_FILE, state.global_step, drop_summaries=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = Path(args.output_dir) / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def truncate_metrics(path: Path, step: int, drop_summaries: bool = False) -> int:
    """Keep the records of metrics.jsonl up to `step` (and unreadable lines, never dropped), without the end-of-run
    summaries when `drop_summaries`; return how many went."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
            past = record.get("step", 0) > step or (drop_summaries and "train_runtime" in record)
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
# Every field of the objective (the weight rule, its parameters, the anchor) is one of them, and the run's length.
RUN_SETTINGS = (
    *ObjectiveSettings.fields(),
    "loss_normalization",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "max_steps",
    "num_train_epochs",
)


def run_settings(args) -> dict:
    return {key: getattr(getattr(args, key), "value", getattr(args, key)) for key in RUN_SETTINGS}  # enums by value


class RunSettingsCallback(TrainerCallback):
    """Write `asft_run.json` in the output folder at the start of training and into every checkpoint: the
    objective's settings (a resume compares them), and what `asft compare` tabulates (LoRA, model, every
    training argument, tokens redacted by transformers' to_dict)."""

    def __init__(self, identity=dict, extra: dict | None = None):
        self.identity = identity  # () -> {"data_fingerprint": ..., "base_model": ...}: what else a resume must match
        self.extra = {} if extra is None else extra  # the caller's own description (the data), filled in later

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.info = {**run_settings(args), **self.identity(), **_run_description(args, model), **self.extra}
            write_json(Path(args.output_dir) / RUN_FILE, self.info, indent=1)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir() and hasattr(self, "info"):
            write_json(checkpoint / RUN_FILE, self.info, indent=1)


def _run_description(args, model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "monitor_kl": getattr(args, "monitor_kl", False),
        "lora": lora_description(model),
        "model": getattr(getattr(base, "config", None), "_name_or_path", None),
        "args": json.loads(args.to_json_string()),
    }


class RunTotalsCallback(TrainerCallback):
    """Write `checkpoint-N/asft_totals.json`: steps, seconds, response tokens and the sum of the per-step losses up
    to step N, so the summary of a resumed run covers the whole run (`trainer.prior_totals` holds the resumed
    checkpoint's, `trainer.response_tokens` counts from them)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.loss_sum, self.last_logged = time.perf_counter(), 0.0, state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and "train_runtime" not in logs:
            self.loss_sum += logs["loss"] * (state.global_step - self.last_logged)
            self.last_logged = state.global_step

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            prior = self.trainer.prior_totals
            totals = {
                "steps": state.global_step,
                "runtime": prior.get("runtime", 0.0) + time.perf_counter() - self.start,
                "response_tokens": self.trainer.response_tokens,
                "loss_sum": prior.get("loss_sum", 0.0) + self.loss_sum,
            }
            write_json(checkpoint / TOTALS_FILE, totals)


def read_totals(checkpoint) -> dict:
    """A checkpoint's totals (RunTotalsCallback); {} for a checkpoint written before them."""
    try:
        return json.loads((Path(checkpoint) / TOTALS_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return {}


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

    A second signal stops at once (StoppedWithoutCheckpoint, a KeyboardInterrupt) naming the last checkpoint.
    """

    def __init__(self, last_checkpoint=lambda output_dir: None):
        self.signum = None
        self._previous = {}
        self._output_dir = None
        self._last_checkpoint = last_checkpoint  # output_dir -> the newest complete checkpoint (checkpoints.py)

    def _handle(self, signum, frame):
        if self.signum is not None:  # the user insists: stop now, and say what is left
            last = self._last_checkpoint(self._output_dir) if self._output_dir else None
            raise StoppedWithoutCheckpoint(
                f"{signal.Signals(signum).name} again: stopping without a checkpoint; the last checkpoint is "
                + (f"{last} (continue with --resume_from_checkpoint last)" if last else "none (nothing was saved)")
            )
        self.signum = signum
        print(
            f"\nReceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping.",
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self._output_dir = args.output_dir
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
