"""Shipped launch presets (`src/asft/configs/`, also reachable as `configs/` at the repository root).

accelerate configs: ddp, fsdp (FSDP2, full shard), zero2, zero3 (DeepSpeed, settings inline).
DeepSpeed JSON configs: ds_zero2_bf16, ds_zero3_bf16 ("auto" wherever transformers fills the value from the
training arguments: batch sizes, accumulation, clipping, bf16, bucket sizes).

A preset is used by name (`zero3`, `zero3.yaml`) or a config file by path; `asft launch` runs `asft train` under
`accelerate launch` with one, `asft config-path NAME` prints a preset's path for scripts (SLURM, deepspeed).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
KINDS = {"accelerate": ".yaml", "deepspeed": ".json"}


def presets(kind: str | None = None) -> dict[str, Path]:
    """Shipped presets by name (file stem); `kind` 'accelerate' or 'deepspeed' keeps that kind only."""
    suffixes = [KINDS[kind]] if kind else list(KINDS.values())
    return {p.stem: p for p in sorted(PRESETS_DIR.iterdir()) if p.suffix in suffixes}


def resolve_preset(value: str, kind: str | None = None, field: str = "config") -> str:
    """An existing file path as given; else the shipped preset of that name; else a ConfigError naming `field`."""
    if Path(value).is_file():
        return value
    found, shipped = presets(kind), presets()
    name = Path(value).name
    stem = Path(name).stem if Path(name).suffix in KINDS.values() else name
    # A bare name only: a path that does not exist is a typo, never silently replaced by a preset.
    if name == value and stem in found:
        return str(found[stem])
    hint = ""
    if name == value and stem in shipped:
        hint = f" ({stem} is {'an accelerate' if shipped[stem].suffix == '.yaml' else 'a DeepSpeed'} preset)"
    raise ConfigError(
        f"{field}: {value!r} is neither an existing file nor a shipped preset{hint}; presets: {', '.join(found)}"
    )


LAUNCH_USAGE = """usage: asft launch [--accelerate_config NAME|PATH] [accelerate launch options] train [train options]

Runs `accelerate launch --config_file CONFIG [options] -m asft.cli train ...` on this machine.
Presets: {presets}. Examples:
  asft launch --accelerate_config zero3 --num_processes 8 train --model_name_or_path M --data_path D ...
  asft launch --accelerate_config fsdp --num_machines 2 --num_processes 16 --machine_rank 0 \\
      --main_process_ip HOST --main_process_port 29500 train ...
Every `accelerate launch` option is accepted before `train` (`accelerate launch --help` lists them)."""


def launch_argv(argv: list[str]) -> list[str]:
    """`asft launch` arguments -> `accelerate launch` arguments (without the leading 'accelerate launch')."""
    if "train" not in argv:
        raise ConfigError("asft launch: expected `train` followed by the training options (asft launch --help)")
    split = argv.index("train")
    launch_args, train_args = [], argv[split + 1 :]
    rest = iter(argv[:split])
    for a in rest:
        if a.split("=")[0] != "--accelerate_config":
            launch_args.append(a)
            continue
        value = a.split("=", 1)[1] if "=" in a else next(rest, None)
        if not value:
            raise ConfigError("accelerate_config: expected a preset name or a file path after --accelerate_config")
        launch_args += ["--config_file", resolve_preset(value, "accelerate", "accelerate_config")]
    return launch_args + ["-m", "asft.cli", "train"] + train_args


def launch(argv: list[str]) -> int:
    """`asft launch`: `asft train` under `accelerate launch` with a preset (or any accelerate config file)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(LAUNCH_USAGE.format(presets=", ".join(presets("accelerate"))))
        return 0
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(launch_argv(argv)))
    return 0


def config_path(argv: list[str]) -> int:
    """`asft config-path NAME`: print a shipped preset's path (for `accelerate launch --config_file $(...)`)."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        asked = argv in (["-h"], ["--help"])
        usage = f"usage: asft config-path NAME\npresets: {', '.join(presets())}"
        print(usage, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    print(resolve_preset(argv[0], None, "config-path"))
    return 0
