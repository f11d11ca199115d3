"""Where the reference distribution comes from, behind one small interface.

- LoRA (any adapter): the policy itself with its adapters disabled; no extra weights in memory.
- Full fine-tuning: a frozen copy loaded from the same checkpoint, in eval mode, without gradients, prepared
  like the policy (sharded under ZeRO-3 / FSDP, replicated otherwise).

Each source gives either full logits (the naive loss) or last hidden states plus its lm_head (the fused loss).
"""

from __future__ import annotations

import copy

import torch



def _backbone(causal_lm):
    # `base_model` is the decoder stack (LlamaModel, Qwen2Model, ...) without the lm_head.
    return causal_lm.base_model


def _clean(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "use_cache") and v is not None}


class AdapterDisabledReference:
    """The adapter-disabled policy: `peft_model` is the (unwrapped) PeftModel being trained."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def _context(self):
        return self.peft_model.disable_adapter()

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        with self._context():
            return self.peft_model(**_clean(inputs), use_cache=False).logits

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        with self._context():
            causal_lm = self.peft_model.get_base_model()
            return _backbone(causal_lm)(**_clean(inputs), use_cache=False).last_hidden_state

    def head(self):
        from .fused import lm_head_of

        return lm_head_of(self.peft_model)


class FrozenModelReference:
    """A separate frozen model (already prepared for the accelerator by the trainer)."""

    def __init__(self, model):
        self.model = model

    def _causal_lm(self):
        # DeepSpeed's engine wraps the model in `.module`; FSDP keeps the module itself.
        return getattr(self.model, "module", self.model)

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        return self.model(**_clean(inputs), use_cache=False).logits

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        return _backbone(self._causal_lm())(**_clean(inputs), use_cache=False).last_hidden_state

    def head(self):
        from .fused import lm_head_of

        return lm_head_of(self._causal_lm())


def load_frozen_copy(model, path: str | None = None, dtype: torch.dtype | None = None,
                     trust_remote_code: bool = False):
    """A frozen reference for full fine-tuning, loaded from `path` (default: the policy's own checkpoint).

    Loading from the checkpoint (rather than deep-copying) is what works under ZeRO-3, where the policy's
    parameters are partitioned at load time; a model built in memory with no checkpoint is deep-copied.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = path or getattr(model.config, "_name_or_path", None) or None
    dtype = dtype or next(model.parameters()).dtype
    if path:
        try:
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        except OSError:
            ref = None  # e.g. a config name that is no checkpoint; fall back below
        if ref is not None:
            if ref.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"reference {path} has vocab_size {ref.config.vocab_size}, the policy "
                                 f"{model.config.vocab_size}; pass reference_model_path")
            return _freeze(ref)
    if is_deepspeed_zero3_enabled():
        raise ValueError("under ZeRO-3 the reference must be loaded from a checkpoint: pass reference_model_path")
    return _freeze(copy.deepcopy(model).to(dtype))


def _freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model
