"""The vLLM backend (optional extra, GPU only): same interface and results as HFBackend.

`import vllm` happens here only, when --backend vllm was asked for and `check_backend` found vllm and a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models import adapter_base, is_adapter_dir, resolve_dtype, resolve_model_path, tokenizer_source
from .generation import GenSettings, stop_token_ids

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank


def _generation_config(path: str):
    """The model's generation_config, read for its EOS ids only (vLLM is told to ignore its sampling defaults)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        base_model: str | None,
        tokenizer,
        dtype: str | None,
        seed: int,
        trust_remote_code: bool,
        gpu_memory_utilization: float,
        tensor_parallel_size: int,
        max_model_len: int | None,
    ):
        from vllm import LLM

        path = resolve_model_path(model, trust_remote_code)
        kwargs = dict(
            dtype=str(resolve_dtype(dtype, "cuda")).removeprefix("torch."),
            seed=seed,
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            # Ignore the model's generation_config defaults, as HFBackend does: same greedy results.
            generation_config="vllm",
        )
        # Detokenize with the tokenizer the prompts were encoded with (an adapter folder may carry its own).
        kwargs["tokenizer"] = tokenizer_source(path, base_model)
        self.lora = None
        if is_adapter_dir(path):
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8)
            kwargs.update(enable_lora=True, max_lora_rank=next((r for r in _LORA_RANKS if r >= rank), rank))
            self.lora = LoRARequest("asft-adapter", 1, str(Path(path).resolve()))
            path = resolve_model_path(base_model or adapter_base(path), trust_remote_code)
        self.llm = LLM(model=path, **kwargs)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(_generation_config(path), tokenizer)

    def _run(self, prompts: list[list[int]], params):
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        return self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)

    def generate(self, prompts: list[list[int]], s: GenSettings, stop: tuple[str, ...] = ()) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=s.num_samples,
            temperature=s.temperature,
            top_p=s.top_p if s.temperature else 1.0,
            max_tokens=s.max_new_tokens,
            seed=s.seed if s.temperature else None,
            repetition_penalty=1.0,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
            stop=list(stop) or None,
        )
        return [[c.text for c in out.outputs] for out in self._run(prompts, params)]

    def next_token_logprobs(self, prompts: list[list[int]], candidates: list[int]) -> list[list[float]]:
        """Score each candidate as one appended prompt token: prompt_logprobs give its exact log-probability,
        where top-k generation logprobs might leave a letter out."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outs = self._run([p + [c] for p in prompts for c in candidates], params)
        scores = [out.prompt_logprobs[-1][c].logprob for out, c in zip(outs, candidates * len(prompts))]
        k = len(candidates)
        return [scores[i * k : (i + 1) * k] for i in range(len(prompts))]
