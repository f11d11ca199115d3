"""Evaluation during training: `asft train --eval_task medical|math --eval_task_data FILES --eval_task_steps N`.

Every N optimizer steps and once at the end, the current weights go through the very code of `asft eval`
(`asft.evaluation`: the same prompts, scoring, grading and result files), in the training process, on the main
process only. Each evaluation writes `<output_dir>/eval_task/<task>/step-<N>/results.json` and
`predictions.jsonl`, and appends one record to `<output_dir>/metrics.jsonl`:

    {"step": N, "math/test/accuracy": 0.41, "math/macro_average": 0.41}

(keys `<task>/<dataset>/<metric>` and `<task>/macro_average`), so `asft plot` draws it against the training
terms. Data files are read and validated when the callback is built, before any model is loaded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from ..data.templates import resolve_template
from ..errors import ConfigError
from ..fields import arg
from ..io import METRICS_FILE
from .datafiles import load_datasets
from .driver import TASKS, run_task, task_args
from .generation import HFBackend
from .runner import Run
from .store import Store

TRAINING_TASKS = ("medical", "math")


@dataclass
class TaskEvalArguments:
    """The flags of `asft train` for evaluation during training (TRL's --eval_steps / --eval_strategy stay the
    held-out *loss* evaluation)."""

    eval_task: str | None = arg(
        None,
        "Evaluate the current weights during training with `asft eval`'s task: medical (option "
        "letter accuracy) or math (generated answers graded by math-verify).",
        choices=TRAINING_TASKS,
    )
    eval_task_data: str | None = arg(None, "--eval_task's data file(s), comma-separated (the formats of asft eval).")
    eval_task_steps: int | None = arg(
        None, "Run --eval_task every N optimizer steps (and always at the end of training); default: at the end only."
    )
    eval_task_limit: int | None = arg(None, "Evaluate only the first N items of each --eval_task_data file.")
    eval_task_max_new_tokens: int = arg(512, "math: tokens generated per answer (greedy).")
    eval_task_batch_size: int = arg(8, "Items per generation / scoring batch.")


def check_task_eval_args(a: TaskEvalArguments) -> None:
    if a.eval_task is None:
        if a.eval_task_data or a.eval_task_steps:
            raise ConfigError("eval_task: --eval_task_data / --eval_task_steps need --eval_task medical|math")
        return
    if a.eval_task not in TRAINING_TASKS:
        raise ConfigError(f"eval_task: unknown value {a.eval_task!r}; expected one of {', '.join(TRAINING_TASKS)}")
    if not a.eval_task_data:
        raise ConfigError("eval_task_data: --eval_task needs its data file(s)")
    for name in ("eval_task_steps", "eval_task_limit", "eval_task_max_new_tokens", "eval_task_batch_size"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")


class TaskEvalCallback(TrainerCallback):
    """Run an `asft eval` task on the weights being trained; build it, then `attach(trainer)` before training."""

    def __init__(self, a: TaskEvalArguments, tokenizer, template: str = "auto", quiet: bool = False):
        check_task_eval_args(a)
        self.steps = a.eval_task_steps
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer)
        self.args = task_args(
            a.eval_task,
            a.eval_task_data,
            model="(weights being trained)",
            template=self.template,
            max_new_tokens=a.eval_task_max_new_tokens,
            batch_size=a.eval_task_batch_size,
            limit=a.eval_task_limit,
            quiet=quiet,
        )
        self.task = TASKS[a.eval_task]
        # Read and validate every file now: a bad row costs no training.
        self.datasets = load_datasets(self.args.data, lambda path: self.task.load(path, self.args), self.args.limit)
        self.trainer = None
        self.last_step = None

    def attach(self, trainer) -> TaskEvalCallback:
        from accelerate.utils import DistributedType

        state = trainer.accelerator.state
        sharded = state.distributed_type == DistributedType.FSDP or (
            state.distributed_type == DistributedType.DEEPSPEED
            and trainer.accelerator.state.deepspeed_plugin
            and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded:
            raise ConfigError(
                "eval_task: the weights are sharded (FSDP / ZeRO-3), so one process cannot generate "
                "alone; save checkpoints and run `asft eval` on them instead"
            )
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------------------------------------ events

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps and state.global_step % self.steps == 0:
            self.evaluate(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        stopper = getattr(self.trainer, "stopper", None)
        if stopper is not None and stopper.signum is not None:
            return  # stopping on a signal: leave promptly, the checkpoint can be evaluated later
        if self.last_step != state.global_step:
            self.evaluate(args, state)

    # ------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, args, state) -> dict | None:
        """Evaluate the current weights (main process only; the others wait at a barrier)."""
        self.last_step = state.global_step
        metrics = None
        if state.is_world_process_zero:
            metrics = self._evaluate_here(Path(args.output_dir), state.global_step)
        self.trainer.accelerator.wait_for_everyone()
        return metrics

    def _evaluate_here(self, output_dir: Path, step: int) -> dict:
        import torch

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        out = output_dir / "eval_task" / self.args.task / f"step-{step:06d}"
        settings = {
            "task": self.args.task,
            "model": f"{output_dir} at step {step}",
            "template": self.template,
            "backend": "hf",
            "dtype": str(next(model.parameters()).dtype),
            **self.task.settings(self.args),
        }
        # overwrite: a retrained output_dir must never reuse another run's generations for this step.
        store = Store(out, settings, {ds.name: ds.sha256 for ds in self.datasets}, overwrite=True)
        args = type(self.args)(**{**vars(self.args), "output_dir": str(out)})
        # The weights in memory instead of a loaded folder.
        run = Run(args, self.tokenizer, self.template, store, backend=HFBackend(model, self.tokenizer))
        print(
            f"\n[eval_task] step {step}: {self.args.task} on {', '.join(d.name for d in self.datasets)}",
            file=sys.stderr,
            flush=True,
        )
        header = {
            "model": settings["model"],
            "base_model": None,
            "task": self.args.task,
            "backend": "hf",
            "step": step,
            "settings": {**settings, "limit": self.args.limit, "batch_size": self.args.batch_size},
        }
        model.eval()
        try:
            with torch.no_grad(), self.trainer.accelerator.autocast():
                report = run_task(run, self.datasets, header)
        finally:
            model.train(was_training)
        metrics = {f"{self.args.task}/{name}/{r['metric']}": r["value"] for name, r in report["datasets"].items()}
        metrics[f"{self.args.task}/macro_average"] = report["macro_average"]["value"]
        with (output_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        print(
            "[eval_task] " + ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items() if v is not None),
            file=sys.stderr,
            flush=True,
        )
        return metrics


def make_task_eval(script, tokenizer, disable_tqdm: bool = False) -> TaskEvalCallback | None:
    """The callback `asft train` adds when --eval_task is given (None otherwise); validates flags and files."""
    check_task_eval_args(script)
    if script.eval_task is None:
        return None
    return TaskEvalCallback(script, tokenizer, template=script.template, quiet=bool(disable_tqdm))
