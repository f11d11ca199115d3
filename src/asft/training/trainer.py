"""AnchoredSFTTrainer: TRL's SFTTrainer with the anchored objectives. Wiring and metrics only; the math lives in
`asft.objectives` (naive, from logits) and `asft.fused` (chunked, from hidden states)."""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput
from trl import SFTTrainer

from ..cache import CachedReference, ExampleIndexCollator, check_prepared, open_for_training
from ..cache.store import EXAMPLE_COLUMN
from ..errors import DataError, TrainingDivergedError
from ..fused import fused_token_loss, lm_head_of
from ..io import IGNORE_INDEX, write_text
from ..models import DTYPES
from ..objectives import token_loss
from ..version import __version__
from .callbacks import (
    GracefulStopCallback,
    MetricsFileCallback,
    ProgressTermsCallback,
    RunSettingsCallback,
    RunTotalsCallback,
    read_totals,
)
from .checkpoints import dataset_fingerprint, last_checkpoint
from .config import AnchoredSFTConfig
from .reference import (
    AdapterDisabledReference,
    FrozenModelReference,
    add_fused_forward,
    full_heads,
    load_frozen_copy,
    prepare_reference,
)

# The private SFTTrainer methods AnchoredSFTTrainer overrides (trl 1.16.0); tests fail, naming one, if it goes.
TRL_PRIVATE_NAMES = ("_set_signature_columns_if_needed",)

# Raised by PEFT / transformers for every LoRA run, about an internal API: nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def fused_loss_fn(mode, labels, ref_hidden=None, ref_head=None, ref_cache=None, **loss_kwargs):
    """The `asft_loss_fn` of a fused forward: `fused_token_loss` from the policy's last hidden states.

    It runs inside the policy's forward, where ZeRO-3 / FSDP let the lm_heads be gathered (`full_heads`) and the
    gradient it stashes for a trainable head is reduced by their hooks as usual.
    """

    def loss_fn(hidden, causal_lm):
        with full_heads(lm_head_of(causal_lm), ref_head) as (head, full_ref_head):
            return fused_token_loss(
                mode, hidden, labels, head, ref_hidden, full_ref_head, ref_cache=ref_cache, **loss_kwargs
            )

    return loss_fn


class AnchoredSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is one of sft | dft | sft_kl | asft | iw_sft | eaft | prift (see `asft.objectives`).

    Use it as TRL's SFTTrainer; `ref_model` optionally gives the frozen reference for full fine-tuning
    (a model or a path). Under LoRA (`peft_config`, or a PeftModel) the reference is the adapter-disabled policy.
    """

    _tag_names = ["trl", "sft", "asft"]

    def __init__(self, model, args: AnchoredSFTConfig | None = None, *, ref_model=None, **kwargs):
        if args is None:
            args = AnchoredSFTConfig(output_dir="asft-output")
        if not isinstance(args, AnchoredSFTConfig):
            raise TypeError("args must be an AnchoredSFTConfig")
        self.reference_cache = None
        check_trainable_rows(kwargs.get("train_dataset"))
        self._given_train_dataset = kwargs.get("train_dataset")  # as given, for `data_fingerprint`
        if args.reference_cache:  # checked against the data before anything is prepared or computed
            self.reference_cache, kwargs = open_for_training(args, ref_model, kwargs, model)
        super().__init__(model, args=args, **kwargs)
        if self.reference_cache is not None:
            check_prepared(self.reference_cache, self.train_dataset)
            self.data_collator = ExampleIndexCollator(self.data_collator)
        self.add_callback(MetricsFileCallback())
        self.run_description: dict = {}  # written into asft_run.json beside the settings (the CLI puts the data here)
        self.add_callback(RunSettingsCallback(self.run_identity, self.run_description))
        self.add_callback(ProgressTermsCallback(self))
        self.add_callback(RunTotalsCallback(self))
        self.response_tokens = 0.0  # trained response tokens (the whole run's after a resume), for tokens/s
        self.prior_totals = {}  # what the run had done at the checkpoint it resumed from (RunTotalsCallback)
        self.base_model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or (
            model if isinstance(model, str) else None
        )
        self.stopper = GracefulStopCallback(last_checkpoint)
        self.add_callback(self.stopper)
        # Global normalisation: the loss divides by the step's response tokens itself, so the Trainer must count
        # them (num_items_in_batch) and must not divide by the accumulation steps again.
        global_norm = args.loss_normalization == "global"
        self.model_accepts_loss_kwargs = global_norm
        self.loss_is_scaled_for_ga = global_norm
        # The rule, its parameters and the anchor, validated once (the config's `objective` builds them anew).
        self.objective = args.objective
        self._term_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._warn_low_precision_weights()

        unwrapped = self.accelerator.unwrap_model(self.model)
        self.is_peft = hasattr(unwrapped, "disable_adapter") and hasattr(unwrapped, "get_base_model")
        causal_lm = unwrapped.get_base_model() if self.is_peft else unwrapped
        self.fused = args.loss_implementation == "fused" and _has_plain_head(causal_lm)
        if args.loss_implementation == "fused" and not self.fused:
            warnings.warn(
                "the model's output embedding is not a plain Linear layer: using the naive loss", stacklevel=2
            )
        if self.fused:
            add_fused_forward(causal_lm)

        self.reference = None
        self.ref_model = None
        if args.needs_reference:
            self.reference = self._build_reference(unwrapped, ref_model)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Trainer.train; after a resume, the summary (runtime, tokens, train_loss) covers the whole run."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = last_checkpoint(self.args.output_dir)
        self.prior_totals = read_totals(checkpoint) if checkpoint else {}
        self.response_tokens = self.prior_totals.get("response_tokens", 0.0)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _whole_run_summary(self, logs: dict) -> None:
        """Turn the end-of-train metrics of this call into the whole run's (in place: they are also returned)."""
        prior = self.prior_totals
        if not prior or "train_runtime" not in logs:
            return
        steps_now = self.state.global_step - prior["steps"]
        if "train_loss" in logs and self.state.global_step:
            logs["train_loss"] = (prior["loss_sum"] + logs["train_loss"] * steps_now) / self.state.global_step
        runtime = logs["train_runtime"] + prior["runtime"]
        for key in ("train_samples_per_second", "train_steps_per_second"):
            if key in logs and runtime:
                logs[key] = round(
                    logs[key] * logs["train_runtime"] / runtime * self.state.global_step / max(steps_now, 1), 3
                )
        logs["train_runtime"] = round(runtime, 4)

    @functools.cached_property
    def data_fingerprint(self) -> str | None:
        """The training examples' fingerprint (a pass over the data): computed when a run file first needs it; the
        CLI, which already computed it to check a resume, sets it instead."""
        return dataset_fingerprint(self._given_train_dataset)

    def run_identity(self) -> dict:
        """What, besides the settings, a resume must match: the training examples and the base model."""
        return {"data_fingerprint": self.data_fingerprint, "base_model": self.base_model_name}

    # ------------------------------------------------------------------------------------------- reference

    def _build_reference(self, unwrapped, ref_model):
        if self.reference_cache is not None:  # no reference model at all, full fine-tuning and LoRA alike
            return CachedReference(self.reference_cache)
        if self.is_peft and ref_model is None:
            return AdapterDisabledReference(unwrapped)
        dtype = DTYPES[self.args.reference_dtype] if self.args.reference_dtype else None
        if ref_model is None or isinstance(ref_model, str):
            ref_model = load_frozen_copy(
                unwrapped,
                ref_model or self.args.reference_model_path,
                dtype,
                trust_remote_code=self.args.trust_remote_code,
            )
        if self.fused:
            add_fused_forward(ref_model)
        # Frozen (eval, no grad); sharded under ZeRO-3 / FSDP like the policy, a replica under DDP / ZeRO-0-2.
        self.ref_model = ref_model = prepare_reference(ref_model, self.accelerator)
        return FrozenModelReference(ref_model)

    # TRL private override (read from trl 1.16.0, SFTTrainer._set_signature_columns_if_needed, itself transformers'
    # Trainer's): the cache's example index column must survive remove_unused_columns.
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.reference_cache is not None and EXAMPLE_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXAMPLE_COLUMN]  # kept by remove_unused_columns

    def _warn_low_precision_weights(self):
        dtypes = {p.dtype for p in self.model.parameters() if p.requires_grad}
        if dtypes & {torch.bfloat16, torch.float16}:
            warnings.warn(
                "trainable weights are stored in half precision: AdamW steps on bf16/fp16 weights lose most small "
                "updates (the model barely trains). Load the model in float32 and pass --bf16 / --fp16 for mixed "
                "precision with float32 master weights.",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------------ loss

    def _loss_kwargs(self, num_items_in_batch):
        a = self.args
        return dict(num_items_in_batch=num_items_in_batch if a.loss_normalization == "global" else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        split = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", EXAMPLE_COLUMN)}
        model_inputs["use_cache"] = False
        mode, kwargs = self.objective, self._loss_kwargs(num_items_in_batch)

        ref = {}
        if self.reference is not None:
            with self.accelerator.autocast():  # same precision as the policy's (wrapped) forward
                ref = self.reference.loss_kwargs(inputs, self.fused)
        if self.fused:
            loss_fn = fused_loss_fn(mode, labels, **ref, chunk_size=self.args.fused_chunk_size, **kwargs)
            loss, terms = model(**model_inputs, asft_loss_fn=loss_fn)
        else:
            logits = model(**model_inputs).logits
            loss, terms = token_loss(mode, logits, labels, **ref, **kwargs)

        if not math.isfinite(loss.item()):
            self._raise_diverged(loss, terms)
        # `num_items_in_batch` counts the tokens of every rank while DDP averages gradients across ranks.
        if self.args.average_tokens_across_devices and kwargs["num_items_in_batch"] is not None:
            loss = loss * self.accelerator.num_processes
        self._accumulate_terms(split, terms)
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss

    def _raise_diverged(self, loss, terms):
        bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["loss"]
        last = last_checkpoint(self.args.output_dir)
        raise TrainingDivergedError(
            f"step {self.state.global_step + 1}: the loss is {loss.item()}; non-finite term(s): {', '.join(bad)}. "
            + (f"The last good checkpoint is {last}." if last else "No checkpoint was saved before this step.")
            + " Lower the learning rate, or use --bf16 instead of fp16."
        )

    # --------------------------------------------------------------------------------------------- metrics

    def _accumulate_terms(self, split, terms):
        n = terms.get("num_tokens", 0.0)
        if split == "train":
            self.response_tokens += n
        sums = self._term_sums[split]
        sums["num_tokens"] += n
        for key, value in terms.items():
            if key != "num_tokens":
                sums[key] += value * n

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._whole_run_summary(logs)
        split = "train" if self.model.training else "eval"
        sums = self._term_sums[split]
        if sums:
            keys = sorted(k for k in sums if k != "num_tokens")
            values = torch.tensor(
                [sums["num_tokens"]] + [sums[k] for k in keys], device=self.accelerator.device, dtype=torch.float64
            )
            values = self.accelerator.reduce(values, reduction="sum")
            tokens = values[0].item()
            prefix = "eval_" if split == "eval" else ""
            for key, total in zip(keys, values[1:].tolist()):
                logs[prefix + key] = total / tokens if tokens else 0.0
            sums.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ model card

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """A model card that names the base model and the objective (TRL's says 'trained with SFT')."""
        if not self.is_world_process_zero():
            return
        write_text(Path(self.args.output_dir) / "README.md", model_card(self, model_name))


def check_trainable_rows(dataset) -> None:
    """The rows `asft train` refuses are refused here too (the Python API): an empty completion, or a tokenized
    example with no response token, would train on nothing but the EOS (or on nothing at all)."""
    columns = getattr(dataset, "column_names", None) or []
    where = "train_dataset"
    if "completion" in columns:
        for i, completion in enumerate(dataset["completion"]):
            if isinstance(completion, str) and not completion.strip():
                raise DataError(where, i + 1, "completion", "empty: nothing to train on")
    if "labels" in columns:
        for i, labels in enumerate(dataset["labels"]):
            if labels is not None and all(label == IGNORE_INDEX for label in labels):
                raise DataError(where, i + 1, "labels", "every label is -100: no response token to train on")


def kl_phrase(direction: str) -> str:
    return "KL(reference || policy)" if direction == "forward" else "KL(policy || reference)"


def model_card(trainer, model_name=None) -> str:
    a = trainer.args
    objective = ", ".join([f"`{a.mode}`", *a.objective.details()])
    base = trainer.base_model_name or "unknown"
    kind = "LoRA adapter" if trainer.is_peft else "full fine-tuning"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [asft, trl, " + a.mode + (", anchored" if a.anchor else "") + "]",
        "---",
        "",
        f"# {model_name or Path(a.output_dir).name}",
        "",
        f"Fine-tuned from `{base}` ({kind}) with asft {__version__}, objective {objective}.",
        "",
        "| setting | value |",
        "|---|---|",
        *[
            f"| {k} | {getattr(a, k)} |"
            for k in (
                "learning_rate",
                "num_train_epochs",
                "max_steps",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "max_length",
                "loss_normalization",
                "seed",
            )
        ],
        "",
        "Per-step terms (loss, nll, weighted_nll, kl, mean_prob, ...) are in `metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def _has_plain_head(causal_lm) -> bool:
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    return isinstance(head, nn.Linear) and type(head) is nn.Linear
