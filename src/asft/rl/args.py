"""`asft rl`'s settings beyond TRL's GRPOConfig, the algorithm presets (GRPO / DAPO / Dr.GRPO) and their checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import UsageError
from ..fields import arg
from ..models import ModelArguments

# transformers deprecates `gradient_checkpointing` (GRPOConfig's field, TRL's calls) in favour of
# `activation_checkpointing`: raised on every `asft rl` call, about names a user does not choose.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)

ALGORITHMS = {
    # GRPO (DeepSeekMath): per-sequence mean, symmetric clipping, std-scaled group advantages, KL to the reference.
    "grpo": {"loss_type": "grpo", "scale_rewards": "group", "beta": "0.04"},
    # DAPO (Yu et al. 2025): token-level loss, clip-higher, no KL, dynamic sampling, soft overlong punishment.
    "dapo": {"loss_type": "dapo", "scale_rewards": "group", "beta": "0.0", "epsilon_high": "0.28"},
    # Dr. GRPO (Liu et al. 2025): sum over tokens / a constant, no std scaling, no KL.
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": "0.0"},
}


@dataclass
class RLArguments(ModelArguments):
    """What `asft rl` needs beyond TRL's GRPOConfig (whose flags keep their own names)."""

    model_name_or_path: str = arg(
        None,
        "Starting point and RL reference: an asft run folder, a model folder, a .gguf file, "
        "'embedded:smollm2-135m-instruct', or a LoRA adapter folder.",
    )
    data_path: str = arg(
        None,
        "Problem files `asft eval` reads (comma-separated): math (GSM8K, MATH, MATH-500, AIME, "
        "AMC) for --reward math; MedQA / MedMCQA / MMLU for --reward choice.",
    )
    reward: str = arg(
        None,
        "Correctness reward: math (math-verify, as `asft eval --task math`) or choice (the option "
        "letter, as `asft eval --task medical`).",
    )
    format_reward: bool = arg(False, "Add a format reward (math: a closed \\boxed{}; choice: a readable letter).")
    format_reward_weight: float = arg(0.2, "Weight of the format reward (when --reward_weights is not given).")
    reward_funcs: str | None = arg(
        None,
        "Extra rewards, comma-separated module:function, with TRL's signature "
        "f(prompts, completions, **kwargs) -> list[float]; the columns gold and letters are passed.",
    )
    reward_timeout: float = arg(5.0, "Seconds per completion before its grading counts as timed out (scores 0).")
    algorithm: str = arg(
        "dapo",
        "Preset of GRPOConfig values (flags you give win): grpo (loss_type grpo, beta 0.04), dapo "
        "(loss_type dapo, epsilon_high 0.28, beta 0, dynamic sampling, overlong punishment), "
        "dr_grpo (loss_type dr_grpo, scale_rewards none, beta 0).",
    )
    dynamic_sampling: bool | None = arg(
        None, "Mask out of the loss the groups whose correctness rewards are all equal (default: on for dapo)."
    )
    overlong_buffer: int | None = arg(
        None,
        "DAPO's soft overlong punishment: completions longer than max_completion_length - buffer "
        "lose up to 1 reward linearly (default: max_completion_length // 5 for dapo, else off; 0 "
        "turns it off).",
    )
    monitor_kl: bool = arg(
        True,
        "With beta = 0 (dapo, dr_grpo), still log `kl` to the starting point each step (TRL's k3 "
        "estimate at generation time; never in the loss). Full fine-tuning holds a frozen copy of "
        "the start for it; false saves that memory and two forwards a step.",
    )
    template: str = arg(
        "auto",
        "Prompt rendering, as training and evaluation: auto, alpaca, chat, none.",
        choices=["auto", "alpaca", "chat", "none"],
    )
    base_model: str | None = arg(None, "Base of a LoRA adapter start (default: the adapter's base_model_name_or_path).")
    merge_adapter: bool = arg(
        False,
        "Merge a LoRA adapter start into its base first and train all weights (the merged model, "
        "written to <output_dir>/start-merged, is the reference).",
    )
    overwrite_output_dir: bool = arg(False, "Allow training into an output directory that holds another run.")


def check_rl_args(script: RLArguments, config) -> None:
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
        raise UsageError(
            f"overlong_buffer: must be in [0, max_completion_length={config.max_completion_length}), "
            f"got {script.overlong_buffer}"
        )
    if config.beta < 0:
        raise UsageError(f"beta: must be >= 0, got {config.beta}")
    if script.use_lora and script.merge_adapter:
        raise UsageError("use_lora: with --merge_adapter the merged model is trained in full; pick one")
    if getattr(config, "use_vllm", False):  # as eval and cache-reference say it: one line, before any load
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None:
            raise UsageError("use_vllm: needs the vllm package (pip install 'asft[vllm]') and a CUDA GPU")
        if not torch.cuda.is_available():
            raise UsageError("use_vllm: needs a CUDA GPU and none is visible")


def dynamic_sampling_on(script: RLArguments) -> bool:
    return script.algorithm == "dapo" if script.dynamic_sampling is None else script.dynamic_sampling


def overlong_buffer(script: RLArguments, config) -> int:
    if script.overlong_buffer is not None:
        return script.overlong_buffer
    return config.max_completion_length // 5 if script.algorithm == "dapo" else 0
