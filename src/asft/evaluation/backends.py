"""The generation backend named by --backend: transformers (`hf`) or vLLM (`vllm`, GPU only)."""

from __future__ import annotations

from ..models import load_model_and_tokenizer
from .generation import HFBackend


def make_backend(args, tokenizer):
    """The backend named by --backend, loading the model now (the first moment it is needed)."""
    if args.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(
            args.model,
            base_model=args.base_model,
            tokenizer=tokenizer,
            dtype=args.dtype,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len,
        )
    model, _ = load_model_and_tokenizer(
        args.model,
        dtype=args.dtype,
        device=args.device,
        base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
        merge_adapter=args.merge_adapter,
    )
    return HFBackend(model, tokenizer)
