"""`asft rl`: GRPO / DAPO / Dr.GRPO from an asft run (or a base model, or a LoRA adapter) with verifiable rewards.

The RL itself is TRL's GRPOTrainer: generation, group advantages, the clipped policy loss, the KL term to the
reference and its loss aggregations. This module adds what TRL leaves to the user: the problem files `asft eval`
reads, rendered with the same prompt templates; the rewards of `asft.rl_rewards`; the algorithm presets; DAPO's
dynamic sampling (TRL has none; see `AsftGRPOTrainer._drop_flat_groups`); and the run safety of `asft train`
(metrics.jsonl, SIGTERM -> checkpoint, resume, an error on a non-finite loss).

Which parts of DAPO are whose:
  token-level loss       TRL  loss_type=dapo (normalised by the active tokens of the whole accumulated batch)
  clip-higher            TRL  epsilon_high (0.28 by default here, as the DAPO paper)
  overlong punishment    TRL  trl.rewards.get_soft_overlong_punishment, added as a reward (--overlong_buffer)
  dynamic sampling       ours groups whose correctness rewards are all equal are masked out of the loss (not
                              refilled by over-sampling as in the paper: the step's batch shrinks instead)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cli import UsageError, _argv_with_yaml, check_output_dir, resolve_resume
from .trainer import GracefulStopCallback, MetricsFileCallback, TrainingDivergedError, last_checkpoint

ALGORITHMS = {
    # GRPO (DeepSeekMath): per-sequence mean, symmetric clipping, std-scaled group advantages, KL to the reference.
    "grpo": {"loss_type": "grpo", "scale_rewards": "group", "beta": "0.04"},
    # DAPO (Yu et al. 2025): token-level loss, clip-higher, no KL, dynamic sampling, soft overlong punishment.
    "dapo": {"loss_type": "dapo", "scale_rewards": "group", "beta": "0.0", "epsilon_high": "0.28"},
    # Dr. GRPO (Liu et al. 2025): sum over tokens / a constant, no std scaling, no KL.
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": "0.0"},
}


@dataclass
class RLArguments:
    """What `asft rl` needs beyond TRL's GRPOConfig (whose flags keep their own names)."""

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Starting point and RL reference: an asft run folder, a model folder, a .gguf file, "
                          "'embedded:smollm2-135m-instruct', or a LoRA adapter folder."})
    data_path: str = field(
        default=None,
        metadata={"help": "Problem files `asft eval` reads (comma-separated): math (GSM8K, MATH, MATH-500, AIME, "
                          "AMC) for --reward math; MedQA / MedMCQA / MMLU for --reward choice."})
    reward: str = field(
        default=None,
        metadata={"help": "Correctness reward: math (math-verify, as `asft eval --task math`) or choice (the option "
                          "letter, as `asft eval --task medical`)."})
    format_reward: bool = field(
        default=False, metadata={"help": "Add a format reward (math: a closed \\boxed{}; choice: a readable letter)."})
    format_reward_weight: float = field(
        default=0.2, metadata={"help": "Weight of the format reward (when --reward_weights is not given)."})
    reward_funcs: str | None = field(
        default=None,
        metadata={"help": "Extra rewards, comma-separated module:function, with TRL's signature "
                          "f(prompts, completions, **kwargs) -> list[float]; the columns gold and letters are passed."})
    reward_timeout: float = field(
        default=5.0, metadata={"help": "Seconds per completion before its grading counts as timed out (scores 0)."})
    algorithm: str = field(
        default="dapo",
        metadata={"help": "Preset of GRPOConfig values (flags you give win): grpo (loss_type grpo, beta 0.04), dapo "
                          "(loss_type dapo, epsilon_high 0.28, beta 0, dynamic sampling, overlong punishment), "
                          "dr_grpo (loss_type dr_grpo, scale_rewards none, beta 0)."})
    dynamic_sampling: bool | None = field(
        default=None,
        metadata={"help": "Mask out of the loss the groups whose correctness rewards are all equal (default: on for "
                          "dapo)."})
    overlong_buffer: int | None = field(
        default=None,
        metadata={"help": "DAPO's soft overlong punishment: completions longer than max_completion_length - buffer "
                          "lose up to 1 reward linearly (default: max_completion_length // 5 for dapo, else off; 0 "
                          "turns it off)."})
    monitor_kl: bool = field(
        default=True,
        metadata={"help": "With beta = 0 (dapo, dr_grpo), still log `kl` to the starting point each step (TRL's k3 "
                          "estimate at generation time; never in the loss). Full fine-tuning holds a frozen copy of "
                          "the start for it; false saves that memory and two forwards a step."})
    template: str = field(
        default="auto",
        metadata={"help": "Prompt rendering, as training and evaluation: auto, alpaca, chat, none.",
                  "choices": ["auto", "alpaca", "chat", "none"]})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base of a LoRA adapter start (default: the adapter's base_model_name_or_path)."})
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Merge a LoRA adapter start into its base first and train all weights (the merged model, "
                          "written to <output_dir>/start-merged, is the reference)."})
    use_lora: bool = field(default=False, metadata={"help": "Train a new LoRA adapter on a full-model start."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --use_lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "LoRA target modules, or all-linear."})
    model_dtype: str = field(
        default="float32", metadata={"help": "dtype of the trainable weights (use --bf16 for mixed precision).",
                                     "choices": ["float32", "bfloat16", "float16"]})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output directory that holds another run."})


# ------------------------------------------------------------------------------------------------- arguments


def _parser():
    from transformers import HfArgumentParser
    from trl import GRPOConfig

    parser = HfArgumentParser((RLArguments, GRPOConfig))

    def error(message):  # argparse would print the whole (very long) usage first
        raise UsageError(message)

    parser.error = error
    return parser


def _given(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def parse_rl_args(argv: list[str]):
    """(RLArguments, GRPOConfig) from a YAML file and/or flags; the algorithm preset fills what is not given."""
    import argparse
    import difflib

    argv = _argv_with_yaml(argv)
    parser = _parser()
    known = {a.split("=")[0] for action in parser._actions for a in action.option_strings}
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u
                 for u in unknown]
        raise UsageError(f"unknown option(s): {', '.join(hints)}")
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
    _check(script, config)
    return script, config


def _check(script: RLArguments, config) -> None:
    if not script.model_name_or_path:
        raise UsageError("--model_name_or_path is required")
    if not script.data_path:
        raise UsageError("--data_path is required")
    if script.reward not in (None, "math", "choice"):
        raise UsageError(f"reward: {script.reward!r} is not one of math, choice")
    if not script.reward and not script.reward_funcs:
        raise UsageError("reward: give --reward math|choice and/or --reward_funcs module:function")
    if script.format_reward and not script.reward:
        raise UsageError("format_reward: needs --reward math|choice")
    if script.reward_timeout <= 0:
        raise UsageError(f"reward_timeout: must be > 0 seconds, got {script.reward_timeout}")
    if script.overlong_buffer is not None and not 0 <= script.overlong_buffer < config.max_completion_length:
        raise UsageError(f"overlong_buffer: must be in [0, max_completion_length={config.max_completion_length}), "
                         f"got {script.overlong_buffer}")
    if config.beta < 0:
        raise UsageError(f"beta: must be >= 0, got {config.beta}")
    if script.use_lora and script.merge_adapter:
        raise UsageError("use_lora: with --merge_adapter the merged model is trained in full; pick one")


def dynamic_sampling_on(script: RLArguments) -> bool:
    return script.algorithm == "dapo" if script.dynamic_sampling is None else script.dynamic_sampling


def overlong_buffer(script: RLArguments, config) -> int:
    if script.overlong_buffer is not None:
        return script.overlong_buffer
    return config.max_completion_length // 5 if script.algorithm == "dapo" else 0


# ------------------------------------------------------------------------------------------------------ data


def load_problems(data_path: str, reward: str | None, tokenizer, template: str):
    """The problem files as a datasets.Dataset: prompt (rendered as in evaluation), gold, letters."""
    from datasets import Dataset

    from .data import DataError
    from .evaluation import math as math_task
    from .evaluation import medical
    from .evaluation.datafiles import file_rows, split_paths
    from .evaluation.generation import render_prompt, resolve_template

    template = resolve_template(template, tokenizer)
    rows = []
    paths = split_paths(data_path)
    if not paths:
        raise DataError(str(data_path), None, None, "no data file given")
    for path in paths:
        kind = reward
        if kind is None:  # user rewards only: the file's format says which problems these are
            first = file_rows(path)[0].data
            kind = "math" if math_task.detect(first) else "choice"
        _, items = (math_task if kind == "math" else medical).load(path)
        for it in items:
            rows.append({"prompt": render_prompt(it.prompt, template, tokenizer), "gold": str(it.gold),
                         "letters": it.meta.get("letters", "")})
    return Dataset.from_list(rows), template


# ---------------------------------------------------------------------------------------------------- models


def resolve_start(name: str) -> str:
    from .models import resolve_model_path

    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        last = last_checkpoint(path)
        if last is not None:
            raise UsageError(f"model_name_or_path: {path} holds no final model (the run did not finish); start "
                             f"from its last checkpoint {last}, or finish it with `asft train ... "
                             "--resume_from_checkpoint last`")
    return resolve_model_path(name)


def load_start(script: RLArguments, output_dir: str):
    """(model, tokenizer, peft_config, what the reference is). The reference is always the starting point:
    TRL loads a frozen copy from the start's folder (full model), copies the starting adapter into a frozen
    "ref" adapter (LoRA continued), or disables a new adapter (--use_lora)."""
    from transformers import AutoModelForCausalLM

    from .models import DTYPES, adapter_base, is_adapter_dir, load_tokenizer, lora_config, merge_lora

    path = resolve_start(script.model_name_or_path)
    dtype = DTYPES[script.model_dtype]
    peft_config = None
    if is_adapter_dir(path) and script.merge_adapter:
        merged = Path(output_dir) / "start-merged"
        if not (merged / "config.json").exists():  # on resume the merged start is already there
            merge_lora(script.base_model or adapter_base(path), path, str(merged), overwrite=True)
        path = str(merged)
    tok_path = path
    if is_adapter_dir(path):
        from peft import PeftModel

        from .models import resolve_model_path

        base_path = resolve_model_path(script.base_model or adapter_base(path))
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=True)
        if not (Path(path) / "tokenizer_config.json").exists():
            tok_path = base_path
        reference = f"the starting adapter {path} (a frozen copy)"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        reference = f"{path} (a frozen copy)"
        if script.use_lora:
            peft_config = lora_config(script.lora_r, script.lora_alpha, script.lora_dropout,
                                      script.lora_target_modules)
            reference = f"{path} (the adapter-disabled model)"
    tokenizer = load_tokenizer(tok_path)
    tokenizer.padding_side = "left"
    return model, tokenizer, peft_config, reference


# --------------------------------------------------------------------------------------------------- trainer


def _grpo_trainer_class():
    from trl import GRPOTrainer

    from .evaluation.generation import encode_prompt

    class AsftGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with asft's run safety, evaluation-identical prompt tokens and DAPO's dynamic sampling."""

        def __init__(self, *args, dynamic_sampling: bool = False, signal_column: int | None = 0,
                     monitor_kl: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.dynamic_sampling = dynamic_sampling
            self.monitor_kl = monitor_kl and self.beta == 0.0  # with beta > 0 TRL logs `kl` itself
            self._monitor_ref = None
            if self.monitor_kl:
                self._setup_kl_monitor(new_adapter=kwargs.get("peft_config") is not None)
            self.signal_column = signal_column  # the correctness reward: what "no signal" is judged by
            self._gathered_rewards = None
            self.add_callback(MetricsFileCallback())
            self.stopper = GracefulStopCallback()
            self.add_callback(self.stopper)

        def _tokenize_prompts(self, prompts):
            # Rendered prompts are tokenized as `asft eval` does (BOS once, no special tokens added twice).
            if prompts and isinstance(prompts[0], str):
                return [encode_prompt(p, self._tokenizer) for p in prompts], None, {}
            return super()._tokenize_prompts(prompts)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._gathered_rewards = rewards  # every process's rows: groups may straddle processes
            return rewards

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.monitor_kl and self.model.training:
                self._log_reference_kl(out)
            if self.dynamic_sampling and self.model.training:
                self._drop_flat_groups(out)
            return out

        def _setup_kl_monitor(self, new_adapter: bool):
            """The starting point, for `kl` when the loss has no KL term: as TRL builds its reference for beta > 0
            (a frozen copy loaded from the start's folder; a frozen "ref" copy of a continued adapter; a new
            adapter switched off)."""
            from accelerate.utils import is_peft_model
            from trl.trainer.utils import add_fused_lm_head, create_model_from_path, get_config_model_id

            model = self.accelerator.unwrap_model(self.model)
            if is_peft_model(model):
                if not new_adapter and "ref" not in model.peft_config:
                    model.add_adapter("ref", model.peft_config["default"])
                    for name, param in model.named_parameters():
                        if ".ref." in name:
                            param.requires_grad_(False)
                            param.data.copy_(model.get_parameter(name.replace(".ref.", ".default.")).data)
                return
            ref = create_model_from_path(get_config_model_id(model.config), dtype=model.dtype)
            ref.requires_grad_(False)
            # TRL scores tokens through a fused head it adds to its models (log-probs at its temperature)
            add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
            self._monitor_ref = self.accelerator.prepare_model(ref.eval(), evaluation_mode=True)

        @torch.no_grad()
        def _log_reference_kl(self, out):
            from trl.trainer.utils import use_adapter

            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            keep, batch = out["completion_ids"].size(1), self.args.per_device_train_batch_size
            logps = out.get("old_per_token_logps")
            if logps is None:
                logps = self._get_per_token_logps_and_entropies(self.model, ids, attention, keep, batch)[0]
            if self._monitor_ref is not None:
                ref = self._get_per_token_logps_and_entropies(self._monitor_ref, ids, attention, keep, batch)[0]
            else:
                model = self.accelerator.unwrap_model(self.model)
                with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                    ref = self._get_per_token_logps_and_entropies(self.model, ids, attention, keep, batch)[0]
            delta = ref - logps
            kl, mask = torch.exp(delta) - delta - 1, out["completion_mask"]  # TRL's estimator for its `kl`
            totals = self.accelerator.reduce(torch.stack([(kl * mask).sum(), mask.sum().float()]), reduction="sum")
            self._metrics["train"]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())

        def _drop_flat_groups(self, out):
            """DAPO's dynamic sampling, the smallest honest version: a group whose correctness rewards are all equal
            (all right or all wrong) has no advantage signal; its completions are masked out of the loss, so they
            neither dilute the token-level normaliser nor pull through the KL term. The paper refills the batch by
            sampling more prompts; here the batch shrinks (a step whose groups are all flat has zero loss)."""
            rewards = self._gathered_rewards
            if self.signal_column is not None:
                signal = rewards[:, self.signal_column]
            else:
                signal = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
            grouped = signal.view(-1, self.num_generations)
            flat = torch.nan_to_num(grouped.max(dim=1).values - grouped.min(dim=1).values, nan=0.0) == 0
            keep = (~flat).repeat_interleave(self.num_generations)
            n = out["completion_ids"].size(0)
            start = self.accelerator.process_index * n
            local = keep[start:start + n].to(out["completion_mask"].dtype)
            out["completion_mask"] = out["completion_mask"] * local.unsqueeze(1)
            loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
            out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
            self._metrics["train"]["dynamic_sampling/dropped_groups_frac"].append(flat.float().mean().item())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not math.isfinite(loss.detach().float().item()):
                last = last_checkpoint(self.args.output_dir)
                raise TrainingDivergedError(
                    f"step {self.state.global_step + 1}: the RL loss is {loss.item()}. "
                    + (f"The last good checkpoint is {last}." if last else "No checkpoint was saved before this step.")
                    + " Lower the learning rate, or use --bf16 instead of fp16.")
            return loss

    return AsftGRPOTrainer


def build_trainer(script: RLArguments, config, model, tokenizer, dataset, peft_config=None):
    from trl.rewards import get_soft_overlong_punishment

    from .rl_rewards import build_rewards

    specs = [s.strip() for s in (script.reward_funcs or "").split(",") if s.strip()]
    rewards = build_rewards(script.reward, script.format_reward, specs, script.reward_timeout)
    weights = [1.0] * len(rewards)
    if script.format_reward:
        weights[1] = script.format_reward_weight
    buffer = overlong_buffer(script, config)
    if buffer > 0:
        rewards.append(get_soft_overlong_punishment(config.max_completion_length, buffer))
        weights.append(1.0)
    if config.reward_weights is None:
        config.reward_weights = weights
    elif len(config.reward_weights) != len(rewards):
        names = ", ".join(getattr(r, "__name__", str(r)) for r in rewards)
        raise UsageError(f"reward_weights: {len(config.reward_weights)} weights for {len(rewards)} rewards ({names})")
    cls = _grpo_trainer_class()
    return cls(model, reward_funcs=rewards, args=config, train_dataset=dataset, processing_class=tokenizer,
               peft_config=peft_config, dynamic_sampling=dynamic_sampling_on(script),
               signal_column=0 if script.reward else None, monitor_kl=script.monitor_kl)


def describe(script: RLArguments, config, trainer, reference: str, template: str) -> str:
    parts = [f"RL: {script.algorithm} (loss_type={config.loss_type}, epsilon={config.epsilon}, "
             f"epsilon_high={trainer.epsilon_high}, scale_rewards={config.scale_rewards}, beta={config.beta})",
             "rewards: " + ", ".join(f"{n} x{w:g}" for n, w in zip(trainer.reward_func_names, config.reward_weights)),
             f"dynamic sampling: {'on' if trainer.dynamic_sampling else 'off'}",
             f"template: {template}",
             "reference: " + (reference if config.beta > 0 else
                              "none in the loss (beta=0)" + (f"; kl logged against {reference}"
                                                             if trainer.monitor_kl else ""))]
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------------- cli


def prepare(argv: list[str]):
    """Parse, check everything a user wrote (flags, data rows, reward imports), load the start, build the trainer.
    Returns (trainer, script, config, resume checkpoint or None)."""
    script, config = parse_rl_args(argv)
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    check_output_dir(config.output_dir, script.overwrite_output_dir, resume is not None)

    from .models import adapter_base, is_adapter_dir, load_tokenizer, resolve_model_path
    from .rl_rewards import load_user_reward

    # The data (file:line:field) and the reward imports fail here, before a model is loaded.
    start = resolve_start(script.model_name_or_path)
    tok_source = start
    if is_adapter_dir(start) and not (Path(start) / "tokenizer_config.json").exists():
        tok_source = resolve_model_path(script.base_model or adapter_base(start))
    dataset, template = load_problems(script.data_path, script.reward, load_tokenizer(tok_source), script.template)
    for spec in (script.reward_funcs or "").split(","):
        if spec.strip():
            load_user_reward(spec.strip())
    print(f"Data: {len(dataset)} problems", flush=True)

    model, tokenizer, peft_config, reference = load_start(script, config.output_dir)
    trainer = build_trainer(script, config, model, tokenizer, dataset, peft_config)
    if trainer.is_world_process_zero():
        print(describe(script, config, trainer, reference, template), flush=True)
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "rl_args.json").write_text(json.dumps(asdict(script), indent=2) + "\n")
    return trainer, script, config, resume


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0
    trainer, script, config, resume = prepare(argv)
    trainer.train(resume_from_checkpoint=resume)
    _report_reward_failures(trainer)
    if trainer.stopper.signum is not None:
        print(f"Stopped at step {trainer.state.global_step}; checkpoint: {last_checkpoint(config.output_dir)}. "
              "To continue, run the same command with --resume_from_checkpoint last", flush=True)
        return 128 + trainer.stopper.signum
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(config.output_dir)
        is_peft = hasattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config")
        print(f"Saved the RL-trained {'adapter' if is_peft else 'model'} to {config.output_dir}; per-step metrics "
              f"in {Path(config.output_dir) / 'metrics.jsonl'}", flush=True)
    return 0


def _report_reward_failures(trainer) -> None:
    for fn in trainer.reward_funcs:
        if getattr(fn, "errors", 0) or getattr(fn, "timeouts", 0):
            print(f"reward {fn.__name__}: {fn.errors} completion(s) raised, {fn.timeouts} timed out; each scored 0",
                  flush=True)
