"""AnchoredSFTConfig: TRL's SFTConfig plus the anchored objectives' knobs (every field documented)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from trl import SFTConfig

from ..errors import ConfigError
from ..fields import arg
from ..objectives import IW_LEVELS, KL_DIRECTIONS, MODE_ALIASES, MODES, ObjectiveSettings, normalize_mode

MODE_CHOICES = (*MODES, *[a for a in MODE_ALIASES if a == "sft+kl"])


def ignored_settings(config, given: set[str]) -> list[str]:
    """The settings in `given` (names set by the user) that `config`'s objective does not use, each with why. The
    weight rule's own parameters are checked by ObjectiveSettings (`asft.objectives.WEIGHT_RULES` lists them)."""
    objective, ignored = config.objective, []
    if "kl_weight" in given and not objective.anchored:
        ignored.append(f"kl_weight: mode {objective.mode!r} has no KL anchor (sft_kl, asft, or --anchor on a rule)")
    for name in ("iw_max", "iw_level"):
        if name in given and name not in objective.rule.params:
            ignored.append(f"{name}: mode {objective.mode!r} does not use it (only iw_sft)")
    if "iw_max" in given and objective.mode == "iw_sft" and objective.iw_level == "token":
        ignored.append("iw_max: --iw_level token clamps the ratio to [0.2, 1.8] and does not use it")
    return ignored


@dataclass
class AnchoredSFTConfig(SFTConfig):
    """Configuration of [`AnchoredSFTTrainer`]: everything in TRL's `SFTConfig`, plus the objective.

    The loss of each mode is in `asft.objectives` (one objective, a token weight per mode); `kl_weight` only
    matters with the KL anchor (`sft_kl`, `asft`, or `anchor` on another mode), `iw_max` / `iw_level` only for
    `iw_sft`. A rule parameter (weight_power, weight_floor, eaft_*) given to a mode that ignores it is an error.
    """

    mode: str | None = arg(
        None,
        "Objective: sft | dft | sft_kl (alias sft+kl) | asft | iw_sft | eaft | prift (default: asft). "
        "Each is sg[w_t] * CE_t (+ kl_weight * KL_t when anchored) with its own token weight w_t: sft 1, dft "
        "p(y_t)^weight_power, sft_kl / asft the same two anchored, iw_sft the policy / reference ratio, eaft "
        "(top-k entropy / 3)^eaft_power, prift the reference's p(y_t).",
        choices=MODE_CHOICES,
    )
    loss_type: str | None = arg(
        None,
        "TRL's name for --mode, with the same choices; given with a different --mode it is an error.",
        choices=MODE_CHOICES,
    )
    kl_weight: float = arg(
        0.03,
        "Weight of the KL anchor to the frozen reference (sft_kl, asft). 0.03 is the authors' "
        "advice under bf16/fp16; the paper's main runs used 0.05.",
    )
    kl_direction: str = arg(
        "forward",
        "forward = KL(reference || policy), as the paper's code and LLaMA-Factory compute it; "
        "reverse = KL(policy || reference), as printed in the paper's first version.",
        choices=KL_DIRECTIONS,
    )
    iw_max: float = arg(16.0, "iw_sft: upper clamp of the sequence-level weight.")
    iw_level: str = arg(
        "sequence",
        "iw_sft: 'sequence' (the authors' default) or 'token' (ratio clamped to [0.2, 1.8]).",
        choices=IW_LEVELS,
    )
    weight_power: float = arg(
        1.0, "dft / asft: w = p(y_t)^ALPHA (Beyond Log Likelihood, arXiv 2510.00526): 1 is DFT, 0 is SFT."
    )
    weight_floor: float = arg(
        0.0,
        "Any weighted mode (dft, asft, iw_sft, eaft, prift): w = max(w, F), so that no token stops "
        "learning (0: off; 1 turns dft into sft).",
    )
    eaft_topk: int = arg(20, "eaft: the entropy H_t is over the softmax of the policy's top-K logits.")
    eaft_power: float = arg(1.0, "eaft: w = (H_t / 3.0)^ALPHA.")
    anchor: bool | None = arg(
        None,
        "Add the KL anchor (kl_weight x KL to the frozen reference) to the loss of dft, eaft, prift, "
        "iw_sft or sft (dft --anchor is asft spelled out). sft_kl and asft are anchored by definition.",
    )
    loss_normalization: str = arg(
        "global",
        "global: divide by the response tokens of the whole optimizer step (all accumulation "
        "steps and ranks), so the gradient does not depend on the batch split. micro_batch: mean "
        "per micro-batch, as the paper's script does (for exact comparisons).",
        choices=["global", "micro_batch"],
    )
    loss_implementation: str = arg(
        "fused",
        "fused: chunked loss from hidden states, never materialising [tokens x vocab] logits "
        "(falls back to naive when the model has no output embeddings). naive: full logits.",
        choices=["fused", "naive"],
    )
    fused_chunk_size: int = arg(1024, "Tokens per chunk of the fused loss.")
    reference_model_path: str | None = arg(
        None,
        "Full fine-tuning: checkpoint of the frozen reference (default: the policy's own "
        "starting checkpoint). Ignored under LoRA, where the reference is the adapter-disabled "
        "base.",
    )
    reference_cache: str | None = arg(
        None,
        "Folder of a reference cache built by `asft cache-reference` on the same data, template, "
        "tokenizer and max length: the KL anchor (and iw_sft's weights) come from the reference's "
        "stored top-k log-probs, and no reference model is loaded (full fine-tuning and LoRA). "
        "The KL is then taken over the top-k tokens plus one tail bucket (a lower bound, exact "
        "when k = vocabulary).",
    )
    reference_dtype: str | None = arg(
        None,
        "dtype of the frozen reference copy (float32 | bfloat16 | float16); default: the "
        "policy's. The reference is never updated, so bf16 is safe and halves its memory.",
    )

    max_length: int | None = arg(
        2048,
        "Tokens per example; longer ones are cut from the right, and asft train reports how many "
        "examples and response tokens that removes (also --model_max_length, the paper's name).",
    )
    logging_steps: float = arg(1, "Log every term every N optimizer steps (default 1, as the paper's script).")
    monitor_kl: bool = arg(
        False,
        "Modes without the anchor (sft, dft, iw_sft, eaft, prift): also log `kl`, the KL to the "
        "reference (in --kl_direction, per response token), without changing the loss or its gradient. Off by "
        "default: it costs a reference forward per step and, under full fine-tuning, a frozen copy of the "
        "model in memory (LoRA: the adapter-disabled base, no extra weights). Modes with a reference "
        "(sft_kl, asft, iw_sft, prift, anchored ones) always log kl.",
    )

    bf16: bool | None = arg(
        None,
        "bf16 mixed precision (float32 master weights, autocast). Default: on when a "
        "bf16-capable GPU is present, off on CPU. Works on CPU too (bf16 autocast).",
    )
    # TRL turns this on by default; here it stays off unless asked (--activation_checkpointing), as in
    # transformers: small models on CPU or one GPU train ~25% faster without it.
    gradient_checkpointing: bool | None = arg(None, "Deprecated alias of --activation_checkpointing (default off).")

    def __post_init__(self):
        if self.bf16 is None:
            import torch

            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinned memory only helps copies to a GPU (and warns without one)
        if self.bf16 and not self.use_cpu:
            import torch

            # transformers refuses bf16 without a bf16 GPU unless told to use the CPU, where bf16 autocast works.
            if not torch.cuda.is_available() and not _other_accelerator():
                self.use_cpu = True
        # Validate the objective before anything heavy happens (TRL's __post_init__ sets up devices).
        try:
            mode = normalize_mode(self.mode or self.loss_type or "asft")
            # "nll" is TRL's default loss_type: it names no objective of ours.
            if self.loss_type not in (None, "nll") and normalize_mode(self.loss_type) != mode:
                raise ConfigError(f"mode: {self.mode!r} conflicts with loss_type {self.loss_type!r}; give one")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # TRL's SFTTrainer would apply its own DFT loss for loss_type="dft": the objective is ours, `mode`.
        self.mode, self.loss_type = mode, "nll"
        try:  # every objective field at once, with the objective's own rules (asft.objectives)
            objective = self.objective
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.loss_normalization not in ("global", "micro_batch"):
            raise ConfigError(f"loss_normalization: unknown value {self.loss_normalization!r}")
        if self.loss_implementation not in ("fused", "naive"):
            raise ConfigError(f"loss_implementation: unknown value {self.loss_implementation!r}")
        if self.fused_chunk_size < 1:
            raise ConfigError(f"fused_chunk_size: must be >= 1, got {self.fused_chunk_size}")
        if self.reference_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"reference_dtype: unknown value {self.reference_dtype!r}")
        if self.reference_cache and self.reference_model_path:
            raise ConfigError(
                "reference_model_path: with reference_cache the reference is the cache's (pass "
                "--reference_model_path to asft cache-reference instead)"
            )
        if self.reference_cache and (self.packing or self.padding_free):
            raise ConfigError(
                "reference_cache: packing and padding_free are not supported with a cached reference "
                "(the cache is indexed by example)"
            )
        if objective.anchored and self.kl_weight == 0:
            warnings.warn(
                f"kl_weight=0 takes the KL anchor out of mode {self.mode!r}'s loss while still paying for the "
                "reference forward",
                stacklevel=2,
            )
        super().__post_init__()

    @property
    def objective(self) -> ObjectiveSettings:
        """The objective's settings (validated): what the loss functions take, and what a resume compares."""
        return ObjectiveSettings.of(self)

    @property
    def needs_reference(self) -> bool:
        # --monitor_kl gives an unanchored mode a reference whose only use is the logged kl (see asft.objectives).
        return self.objective.needs_reference or bool(self.monitor_kl)


def _other_accelerator() -> bool:
    import torch

    return any(
        getattr(torch, name, None) is not None and getattr(torch, name).is_available()
        for name in ("xpu", "mps", "npu")
        if hasattr(getattr(torch, name, None), "is_available")
    )
