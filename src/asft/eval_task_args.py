"""The `asft train` flags of evaluation during training (kept apart from the callback: importing them stays light).

See `asft.eval_callback` for what they do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

TASKS = ("medical", "math")


@dataclass
class TaskEvalArguments:
    """The flags of `asft train` for evaluation during training (TRL's --eval_steps / --eval_strategy stay the
    held-out *loss* evaluation)."""

    eval_task: str | None = field(
        default=None,
        metadata={"help": "Evaluate the current weights during training with `asft eval`'s task: medical (option "
                          "letter accuracy) or math (generated answers graded by math-verify).",
                  "choices": list(TASKS)})
    eval_task_data: str | None = field(
        default=None, metadata={"help": "--eval_task's data file(s), comma-separated (the formats of asft eval)."})
    eval_task_steps: int | None = field(
        default=None, metadata={"help": "Run --eval_task every N optimizer steps (and always at the end of "
                                        "training); default: at the end only."})
    eval_task_limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N items of each --eval_task_data file."})
    eval_task_max_new_tokens: int = field(
        default=512, metadata={"help": "math: tokens generated per answer (greedy)."})
    eval_task_batch_size: int = field(default=8, metadata={"help": "Items per generation / scoring batch."})


def check_task_eval_args(a: TaskEvalArguments) -> None:
    if a.eval_task is None:
        if a.eval_task_data or a.eval_task_steps:
            raise ConfigError("eval_task: --eval_task_data / --eval_task_steps need --eval_task medical|math")
        return
    if a.eval_task not in TASKS:
        raise ConfigError(f"eval_task: unknown value {a.eval_task!r}; expected one of {', '.join(TASKS)}")
    if not a.eval_task_data:
        raise ConfigError("eval_task_data: --eval_task needs its data file(s)")
    for name in ("eval_task_steps", "eval_task_limit", "eval_task_max_new_tokens", "eval_task_batch_size"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
