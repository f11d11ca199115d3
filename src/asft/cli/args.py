"""The argv plumbing every command shares: YAML files as flags, unknown flags with a suggestion, one-line parser
errors, the end-of-run messages, and quieting CPU-only noise."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from ..training.checkpoints import last_checkpoint


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
    argv = []
    for key, value in config.items():
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


def check_known_flags(argv: list[str], parser) -> None:
    """Refuse flags the parser does not know, suggesting the nearest known one."""
    import difflib

    known = {a.split("=")[0] for action in parser._actions for a in action.option_strings}
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u for u in unknown]
        raise UsageError(f"unknown option(s): {', '.join(hints)}")


def dataclass_parser(dataclasses: tuple, prog: str):
    """An HfArgumentParser over `dataclasses` whose errors are one line (not argparse's long usage first) and whose
    boolean flags take both `--flag` and `--flag true|false`."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    class Parser(HfArgumentParser):
        def error(self, message):
            raise UsageError(message)

    parser = Parser(dataclasses, prog=prog)
    for action in parser._actions:
        # `bool | None` fields (--bf16, --gradient_checkpointing, ...) get no bare form from HfArgumentParser.
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    return parser


def stopped_message(step: int, output_dir: str) -> str:
    """What a run stopped by a signal prints: where its checkpoint is and how to continue."""
    return (
        f"Stopped at step {step}; checkpoint: {last_checkpoint(output_dir)}. "
        "To continue, run the same command with --resume_from_checkpoint last"
    )
