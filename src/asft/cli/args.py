"""The argv plumbing every command shares: YAML files as flags, unknown flags with a suggestion, one-line parser
errors, the end-of-run messages, and quieting CPU-only noise."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError


def yaml_to_argv(path: str) -> list[str]:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise UsageError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values")
    return flags_to_argv(config)


def flags_to_argv(flags: dict) -> list[str]:
    """Command-line flags from a mapping (a YAML file's, or a script's): `--key value` each, booleans as true /
    false, lists as several values, mappings as JSON; None leaves the flag out."""
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, list):
            argv += [str(v) for v in value]
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def given(argv: list[str], *names: str) -> list[tuple[str, str | None]]:
    """(flag, value) for each occurrence of the given flags (either spelling, `--f v` or `--f=v`)."""
    spellings = {n for name in names for n in (name, name.replace("_", "-"))}
    found = []
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in spellings:
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            found.append((flag, value if eq else nxt))
    return found


def quiet_cpu_noise() -> None:
    """Silence what means nothing on a machine without a GPU: DeepSpeed's 'Setting accelerator to CPU' warning
    (told the accelerator instead of guessing it) and the DataLoader's pin_memory warning (see config.py)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def argv_with_yaml(argv: list[str]) -> list[str]:
    return yaml_to_argv(argv[0]) + argv[1:] if argv and argv[0].endswith((".yaml", ".yml")) else list(argv)


def check_known_flags(argv: list[str], parser, yaml_file: str | None = None) -> None:
    """Refuse flags the parser does not know, suggesting the nearest known one; a key of `yaml_file` (the config
    the argv started with) is named by its file and line, not as a command-line flag."""
    import difflib

    known = {a.split("=")[0] for action in parser._actions for a in action.option_strings}
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    if not unknown:
        return
    yaml_lines = _yaml_key_lines(yaml_file) if yaml_file else {}
    hints = []
    for u in unknown:
        match = difflib.get_close_matches(u, known, 1)
        if u[2:] in yaml_lines:
            hint = f" (did you mean {match[0][2:]}?)" if match else ""
            hints.append(f"{yaml_file}:{yaml_lines[u[2:]]}: unknown key {u[2:]!r}{hint}")
        else:
            hints.append(f"{u} (did you mean {match[0]}?)" if match else u)
    raise UsageError(f"unknown option(s): {', '.join(hints)}")


def _yaml_key_lines(path: str) -> dict[str, int]:
    """The line (1-based) of each top-level key of a YAML config."""
    import re

    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for number, line in enumerate(lines, 1):
        if m := re.match(r"^([A-Za-z_][\w.-]*)\s*:", line):
            found.setdefault(m.group(1), number)
    return found


def yaml_file_of(argv: list[str]) -> str | None:
    """The YAML config an argv starts with (`asft train config.yaml --flag ...`), if any."""
    return argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else None


def dataclass_parser(dataclasses: tuple, prog: str):
    """An HfArgumentParser over `dataclasses` whose errors are one line (not argparse's long usage first) and whose
    boolean flags take both `--flag` and `--flag true|false`."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    class Parser(HfArgumentParser):
        def error(self, message):
            raise UsageError(message)

        def parse_known_args(self, args=None, namespace=None):
            namespace, rest = super().parse_known_args(args, namespace)
            check_numbers(vars(namespace))  # before any dataclass's __post_init__ (and before any model load)
            return namespace, rest

    parser = Parser(dataclasses, prog=prog)
    for action in parser._actions:
        # `bool | None` fields (--bf16, --gradient_checkpointing, ...) get no bare form from HfArgumentParser.
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    return parser


# The range every numeric flag must lie in, by name, for every command (train, rl, cache-reference, eval,
# merge-lora): (lowest, highest, lowest allowed?, highest allowed?), None for no bound. Every float must be finite.
# A new flag is one entry here; `check_numbers` runs on the parsed flags before any model loads.
POSITIVE, NON_NEGATIVE, FRACTION = (0, None, False, False), (0, None, True, False), (0, 1, True, True)
NUMBER_RANGES = {
    # training (asft train, asft rl)
    "learning_rate": POSITIVE,
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "global_batch_size": POSITIVE,
    "warmup_steps": NON_NEGATIVE,
    "warmup_ratio": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_epsilon": POSITIVE,
    "num_train_epochs": NON_NEGATIVE,  # 0 only with --max_steps > 0 (check_numbers)
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "save_total_limit": POSITIVE,
    "seed": NON_NEGATIVE,
    "dataloader_num_workers": NON_NEGATIVE,
    # the objective
    "kl_weight": NON_NEGATIVE,
    "iw_max": POSITIVE,
    "fused_chunk_size": POSITIVE,
    "model_max_length": (2, None, True, False),
    "max_length": POSITIVE,
    # LoRA
    "lora_r": POSITIVE,
    "lora_alpha": POSITIVE,
    "lora_dropout": (0, 1, True, False),
    # rl
    "num_generations": (2, None, True, False),
    "max_completion_length": POSITIVE,
    "max_prompt_length": POSITIVE,
    "num_iterations": POSITIVE,
    "beta": NON_NEGATIVE,
    "epsilon": NON_NEGATIVE,
    "epsilon_high": NON_NEGATIVE,
    "temperature": NON_NEGATIVE,
    "top_p": (0, 1, False, True),
    # cache-reference and eval
    "top_k": NON_NEGATIVE,  # rl: 0 = no top-k sampling; cache-reference checks its own >= 1
    "batch_size": POSITIVE,
    "shard_size": POSITIVE,
    "gpu_memory_utilization": (0, 1, False, True),
    "tensor_parallel_size": POSITIVE,
    "max_model_len": POSITIVE,
    "max_new_tokens": POSITIVE,
    "num_samples": POSITIVE,
    "limit": POSITIVE,
    "math_timeout": POSITIVE,
    "judge_timeout": POSITIVE,
    "judge_concurrency": POSITIVE,
    "judge_retry_delay": NON_NEGATIVE,
    "bootstrap_samples": POSITIVE,
    "code_memory_mb": POSITIVE,
    "code_workers": POSITIVE,
    # data inspect
    "show": NON_NEGATIVE,
}


def _bound(value, ranges) -> str | None:
    low, high, low_ok, high_ok = ranges
    if low is not None and (value < low or (value == low and not low_ok)):
        return f">= {low}" if low_ok else f"> {low}"
    if high is not None and (value > high or (value == high and not high_ok)):
        return f"<= {high}" if high_ok else f"< {high}"
    return None


def check_numbers(values: dict) -> None:
    """Refuse a numeric flag out of its range (NUMBER_RANGES; every float finite), and zero or negative training
    lengths, before anything is loaded: a bad number fails here in one line, not after the model load (or,
    worse, trains nothing and says it trained)."""
    import math

    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name}: must be a finite number, got {value}")
        if name in NUMBER_RANGES and (need := _bound(value, NUMBER_RANGES[name])):
            raise UsageError(f"--{name}: must be {need}, got {value}")
    max_steps, epochs = values.get("max_steps"), values.get("num_train_epochs")
    if isinstance(max_steps, int) and (max_steps == 0 or max_steps < -1):
        raise UsageError(f"--max_steps: must be > 0 (or -1: train for --num_train_epochs), got {max_steps}")
    if max_steps == -1 and isinstance(epochs, (int, float)) and epochs <= 0:
        raise UsageError(f"--num_train_epochs: must be > 0 when --max_steps is not given, got {epochs}")
    if values.get("bf16") is True and values.get("fp16") is True:
        raise UsageError("--bf16 and --fp16: conflicting flags; give one precision")


def stopped_message(step: int, output_dir: str) -> str:
    """What a run stopped by a signal prints: where its checkpoint is and how to continue."""
    from ..training.checkpoints import last_checkpoint

    return (
        f"Stopped at step {step}; checkpoint: {last_checkpoint(output_dir)}. "
        "To continue, run the same command with --resume_from_checkpoint last"
    )
