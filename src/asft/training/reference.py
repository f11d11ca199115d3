"""Where the reference distribution comes from, behind one small interface.

- LoRA (any adapter): the policy itself with its adapters disabled; no extra weights in memory.
- Full fine-tuning: a frozen copy loaded from the same checkpoint, in eval mode, without gradients, prepared
  like the policy (`prepare_reference`: sharded under ZeRO-3 / FSDP, replicated otherwise).
- Cached (`asft cache-reference`): the reference's top-k log-probs per response token, read from disk; no model
  (`asft.cache.training.CachedReference`).

Each source's `loss_kwargs(inputs, fused)` gives what the loss functions take as the reference: full logits
(`ref_logits`, the naive loss), last hidden states plus the lm_head (`ref_hidden`, `ref_head`, the fused loss), or
the cached rows of the batch's response tokens (`ref_cache`, either loss).
Hidden states always come through the model's own top-level forward, where DeepSpeed's and FSDP's hooks gather
the sharded weights; the lm_head, which the fused loss reads directly, is gathered by `full_heads`.
"""

from __future__ import annotations

import copy
import types
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from torch import nn

from ..fused import lm_head_of


def _backbone(causal_lm):
    # `base_model` is the decoder stack (LlamaModel, Qwen2Model, ...) without the lm_head.
    return causal_lm.base_model


def forward_kwargs(inputs: dict) -> dict:
    """A batch as keyword arguments of a plain forward: no labels, loss counts, cache flag or None values."""
    return {
        k: v
        for k, v in inputs.items()
        if k not in ("labels", "num_items_in_batch", "use_cache", "asft_example") and v is not None
    }


_FUSED_FLAG = "_asft_fused_forward"  # set on a model whose forward accepts asft_loss_fn


def has_fused_forward(causal_lm) -> bool:
    return getattr(causal_lm, _FUSED_FLAG, False)


def add_fused_forward(causal_lm: nn.Module) -> None:
    """Let `causal_lm(..., asft_loss_fn=fn)` run the backbone and return `fn(last_hidden_state, causal_lm)`.

    The loss is computed inside the model's forward so that DDP, FSDP and DeepSpeed see one ordinary forward
    (their hooks gather sharded weights and synchronise gradients around it). Without `asft_loss_fn` the forward
    is the original one, so generation and saving are unchanged.
    """
    if has_fused_forward(causal_lm):
        return
    original_forward = causal_lm.forward

    def forward(self, *args, asft_loss_fn=None, **kwargs):
        if asft_loss_fn is None:
            return original_forward(*args, **kwargs)
        hidden = self.base_model(*args, **forward_kwargs(kwargs), use_cache=False).last_hidden_state
        return asft_loss_fn(hidden, self)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    setattr(causal_lm, _FUSED_FLAG, True)


def _last_hidden(model, causal_lm, inputs: dict) -> torch.Tensor:
    """Last hidden states of `causal_lm`, called as `model` (its DeepSpeed / FSDP / PEFT wrapper, or itself).

    With the trainer's fused forward (`asft_loss_fn`) the call goes through the top-level forward, so sharded
    weights are gathered by the engine's hooks (calling the backbone directly would skip FSDP's root unshard).
    """
    if has_fused_forward(causal_lm):
        return model(**forward_kwargs(inputs), asft_loss_fn=lambda hidden, _: hidden)
    return _backbone(causal_lm)(**forward_kwargs(inputs), use_cache=False).last_hidden_state


class AdapterDisabledReference:
    """The adapter-disabled policy: `peft_model` is the (unwrapped) PeftModel being trained."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def _context(self):
        return self.peft_model.disable_adapter()

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        with self._context():
            return self.peft_model(**forward_kwargs(inputs), use_cache=False).logits

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        with self._context():
            return _last_hidden(self.peft_model, self.peft_model.get_base_model(), inputs)

    def head(self):
        return lm_head_of(self.peft_model)

    def loss_kwargs(self, inputs: dict, fused: bool) -> dict:
        return (
            {"ref_hidden": self.hidden(inputs), "ref_head": self.head()}
            if fused
            else {"ref_logits": self.logits(inputs)}
        )


class FrozenModelReference:
    """A separate frozen model (already prepared for the accelerator by the trainer)."""

    def __init__(self, model):
        self.model = model

    def _causal_lm(self):
        # DeepSpeed's engine wraps the model in `.module`; FSDP keeps the module itself.
        return getattr(self.model, "module", self.model)

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        return self.model(**forward_kwargs(inputs), use_cache=False).logits

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        return _last_hidden(self.model, self._causal_lm(), inputs)

    def head(self):
        return lm_head_of(self._causal_lm())

    loss_kwargs = AdapterDisabledReference.loss_kwargs


def prepare_reference(model, accelerator):
    """Prepare a frozen reference like the policy: sharded under ZeRO-3 and FSDP, replicated otherwise.

    DeepSpeed: TRL's `prepare_deepspeed` (an engine without optimizer; ZeRO-3 stays sharded, ZeRO-1/2 become
    ZeRO-0 replicas). FSDP2: accelerate's own `fsdp2_prepare_model`, the function that shards the policy: one unit
    per decoder layer (TRL's `prepare_fsdp` shards only the root, so the whole reference is gathered at once in its
    forward) and the rank-0 weights broadcast of `fsdp_cpu_ram_efficient_loading` (where the other ranks loaded
    nothing). DDP / one device: a plain replica, no wrapper (it is never trained).
    """
    from accelerate.utils import DistributedType

    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model).eval()
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(model, accelerator)
    return model.to(accelerator.device)


@contextmanager
def full_heads(*heads):
    """Yield the given LMHeads (None passes through) with full weights, for the fused loss's direct reads.

    DeepSpeed ZeRO-3 keeps every parameter partitioned outside its module's forward, and the fused loss never
    calls the lm_head module: the weights are gathered for the duration (TRL's `maybe_gather_lm_head_ctx`; a
    weight shared by two heads, LoRA's reference, is gathered once). Use it inside the policy's forward: the
    gradient the loss stashes for a trainable head is then reduce-scattered by ZeRO-3's hooks as usual.
    FSDP2: inside the forward the policy's head is unsharded (accelerate puts it in one unit with the final norm);
    a frozen head still sharded as a DTensor is gathered with `full_tensor()`. A trainable head that is still a
    DTensor, or a flat FSDP1 shard, is refused: its gradient would bypass FSDP's reduction.
    """
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    with ExitStack() as stack:
        for head in heads:
            if head is not None:
                stack.enter_context(maybe_gather_lm_head_ctx(head.weight, head.bias))
        yield tuple(None if head is None else _unshard(head) for head in heads)


def _unshard(head):
    weight, bias = head.weight, head.bias
    if _is_dtensor(weight):
        if weight.requires_grad:
            raise NotImplementedError(
                "the trainable lm_head is still sharded (a DTensor) in the forward: the fused "
                "loss needs FSDP to unshard it (accelerate's FSDP2 wrapping does); use "
                "loss_implementation='naive' with this wrapping"
            )
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    if weight.dim() != 2 or weight.numel() == 0:
        raise NotImplementedError(
            f"the lm_head weight is a shard here (shape {tuple(weight.shape)}; FSDP1?): use "
            "FSDP2 (the 'fsdp' preset) or loss_implementation='naive'"
        )
    return head if weight is head.weight else replace(head, weight=weight, bias=bias)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def load_frozen_copy(model, path: str | None = None, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
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
                raise ValueError(
                    f"reference {path} has vocab_size {ref.config.vocab_size}, the policy "
                    f"{model.config.vocab_size}; pass reference_model_path"
                )
            return _freeze(ref)
    if is_deepspeed_zero3_enabled():
        raise ValueError("under ZeRO-3 the reference must be loaded from a checkpoint: pass reference_model_path")
    ref = copy.deepcopy(model).to(dtype)
    # Forward patches set on an instance (TRL's fused lm_head, ours) close over the *policy's* original forward:
    # a copy that kept them would run the policy, and the KL would stay 0. The class's forward is the model's own.
    for module in ref.modules():
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_FUSED_FLAG, None)
    return _freeze(ref)


def _freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model
