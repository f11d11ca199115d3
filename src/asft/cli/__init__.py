"""`asft` command line: one module per command, dispatched by `main`. `python -m asft.cli` works too (the
accelerate presets launch it that way)."""

from __future__ import annotations

import importlib
import sys
import warnings

from ..errors import ConfigError, DataError, ModelLoadError, StoppedWithoutCheckpoint, TrainingDivergedError

USAGE = """usage: asft COMMAND [ARGS]

commands:
  train       fine-tune a causal LM with sft | dft | sft_kl | asft | iw_sft
  eval        evaluate a model (medical, math, judge, drift, code)
  merge-lora  merge a LoRA adapter into its base model
  data        download, convert and inspect training data
  cache-reference  store the reference's top-k log-probs over the training set (asft train --reference_cache)
  launch      run `asft train` under `accelerate launch` with a preset: ddp, fsdp, zero2, zero3 (or a config file)
  config-path print the path of a shipped preset (ddp fsdp zero2 zero3 ds_zero2_bf16 ds_zero3_bf16)
  rl          GRPO / DAPO / Dr.GRPO from an asft run with verifiable rewards (math, choice, your own)
  plot        training curves of runs (metrics.jsonl), or --kind probs: the histogram of p(y_t) per model
  compare     one report comparing runs and evaluations (markdown table, plots, CSV, JSON)
  quickstart  offline ASFT demo on the embedded SmolLM2-135M-Instruct (about 5 minutes on 2 CPU cores)

`asft COMMAND --help` describes each command."""


# command -> (module of asft.cli, function); each module is imported only when its command runs.
COMMANDS = {name: (name, "main") for name in ("train", "eval", "data", "rl", "quickstart")}
COMMANDS.update({"merge-lora": ("merge", "main"), "cache-reference": ("cache", "main")})
COMMANDS.update({"launch": ("launch", "launch"), "config-path": ("launch", "config_path")})
COMMANDS.update({"plot": ("report", "plot_main"), "compare": ("report", "compare_main")})


# What an interrupt outside a run's graceful stop (which explains itself) leaves, by command.
INTERRUPTED = {
    "train": "stopped before training began (nothing was trained): run the same command again",
    "rl": "stopped before training began (nothing was trained): run the same command again",
    "cache-reference": "the finished shards are kept: run the same command again to continue the build",
    None: "run the same command again",
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line ("UserWarning: ..."), without the Python source line that raised it."""
    return f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--local_rank="):  # the deepspeed launcher puts it before our command
        argv = argv[1:] + argv[:1]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    warnings.formatwarning = _one_line_warning
    if command not in COMMANDS:
        print(f"asft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command]
    try:  # from the first heavy import on: a Ctrl-C while importing or loading is one line, not a traceback
        if command in ("train", "quickstart", "eval", "rl", "cache-reference"):
            from .args import quiet_cpu_noise

            quiet_cpu_noise()
        command_main = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        return command_main(rest)
    except StoppedWithoutCheckpoint as e:  # a second Ctrl-C while a run was stopping
        print(f"asft {command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # not inside a run's graceful stop: imports, data or model loading, a cache build
        print(f"asft {command}: interrupted; {INTERRUPTED.get(command, INTERRUPTED[None])}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, ModelLoadError, FileExistsError) as e:
        # Our own validation errors (data file:line:field, config values, model paths): one clear line.
        print(f"asft {command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"asft {command}: error: {e}", file=sys.stderr)
        return 3
