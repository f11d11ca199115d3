"""`asft rl`: GRPO / DAPO / Dr.GRPO (TRL's GRPOTrainer) from an asft run, with verifiable rewards."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..errors import UsageError
from ..io import METRICS_FILE, RUN_FILE, write_json
from ..models import lora_description
from ..rl.args import ALGORITHMS, RLArguments, check_rl_args
from ..rl.start import load_problems, load_start, resolve_start
from ..rl.trainer import build_trainer, describe
from ..training.checkpoints import check_output_dir, resolve_resume, resuming_line
from .args import argv_with_yaml, check_known_flags, dataclass_parser, stopped_message, yaml_file_of


def _parser():
    from trl import GRPOConfig

    return dataclass_parser((RLArguments, GRPOConfig), prog="asft rl")


def _given(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def parse_rl_args(argv: list[str]):
    """(RLArguments, GRPOConfig) from a YAML file and/or flags; the algorithm preset fills what is not given."""
    import argparse

    yaml_file = yaml_file_of(argv)
    argv = argv_with_yaml(argv)
    parser = _parser()
    check_known_flags(argv, parser, yaml_file)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--algorithm", default="dapo")
    algorithm = pre.parse_known_args(argv)[0].algorithm
    if algorithm not in ALGORITHMS:
        raise UsageError(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    given = _given(argv)
    defaults = {**ALGORITHMS[algorithm], "report_to": "none", "bf16": "false", "logging_steps": "1"}
    for key, value in defaults.items():
        if key not in given and not (key == "bf16" and "fp16" in given):
            argv += [f"--{key}", value]
    try:
        script, config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # GRPOConfig's own checks (batch divisibility, num_generations >= 2, ...)
        raise UsageError(str(e).splitlines()[0]) from None
    check_rl_args(script, config)
    return script, config


def prepare(argv: list[str]):
    """Parse, check everything a user wrote (flags, data rows, reward imports), load the start, build the trainer.
    Returns (trainer, script, config, resume checkpoint or None)."""
    script, config = parse_rl_args(argv)
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    check_output_dir(config.output_dir, script.overwrite_output_dir, resume is not None)
    if resume is not None:
        print(resuming_line(resume, config.max_steps if config.max_steps > 0 else None), flush=True)

    from ..models import load_tokenizer
    from ..rl.rewards import load_user_reward

    # The data (file:line:field) and the reward imports fail here, before a model is loaded.
    start = resolve_start(script.model_name_or_path)
    tokenizer = load_tokenizer(start, base_model=script.base_model)
    dataset, template = load_problems(script.data_path, script.reward, tokenizer, script.template)
    for spec in (script.reward_funcs or "").split(","):
        if spec.strip():
            load_user_reward(spec.strip())
    print(f"Data: {len(dataset)} problems", flush=True)

    model, tokenizer, peft_config, reference = load_start(script, config.output_dir)
    trainer = build_trainer(script, config, model, tokenizer, dataset, peft_config)
    if trainer.is_world_process_zero():
        print(describe(script, config, trainer, reference, template), flush=True)
        write_json(Path(config.output_dir) / "rl_args.json", asdict(script))
        write_json(Path(config.output_dir) / RUN_FILE, run_description(script, config, trainer), indent=1)
    return trainer, script, config, resume


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0
    trainer, script, config, resume = prepare(argv)
    result = trainer.train(resume_from_checkpoint=resume)
    _report_reward_failures(trainer)
    if trainer.stopper.signum is not None:
        print(stopped_message(trainer.state.global_step, config.output_dir), flush=True)
        return 128 + trainer.stopper.signum
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(config.output_dir)
        is_peft = hasattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config")
        print(summary(trainer, result.metrics), flush=True)
        print(
            f"Saved the RL-trained {'adapter' if is_peft else 'model'} to {config.output_dir}; per-step metrics "
            f"in {Path(config.output_dir) / METRICS_FILE}",
            flush=True,
        )
    return 0


def summary(trainer, metrics: dict) -> str:
    """The end-of-run line, as train's: steps, time, and the last step's reward terms."""
    last = next((r for r in reversed(trainer.state.log_history) if "reward" in r), {})
    terms = ", ".join(
        f"{k} {last[k]:.4g}"
        for k in ("reward", "reward_std", "accuracy", "kl", "entropy", "completions/mean_length")
        if isinstance(last.get(k), (int, float))
    )
    runtime = trainer.prior_totals.get("runtime", 0.0) + metrics.get("train_runtime", 0.0)  # the whole run's
    return f"Done: {trainer.state.global_step} steps in {runtime:.1f} s; final step: {terms or '-'}"


def run_description(script, config, trainer) -> dict:
    """asft_run.json of an RL run: what `asft compare` tabulates (the mode is the algorithm)."""
    lora = lora_description(trainer.accelerator.unwrap_model(trainer.model))
    return {
        "mode": f"rl:{script.algorithm}",
        "learning_rate": config.learning_rate,
        "beta": config.beta,
        "max_steps": config.max_steps,
        "lora": lora,
        "model": script.model_name_or_path,
        "rewards": list(trainer.reward_func_names),
    }


def _report_reward_failures(trainer) -> None:
    for fn in trainer.reward_funcs:
        if getattr(fn, "errors", 0) or getattr(fn, "timeouts", 0):
            print(
                f"reward {fn.__name__}: {fn.errors} completion(s) raised, {fn.timeouts} timed out; each scored 0",
                flush=True,
            )
