"""Generation settings and the transformers backend (the vLLM one lives in vllm_backend.py; `backends.py` picks).

Both backends take prompts as token ids, tokenized here once, so that they see exactly the same input and agree
on greedy settings. Sampling parameters are always set explicitly: a model's own generation_config (top_k=20,
repetition_penalty=1.05, ...) never leaks in, in either backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Where generation stops: the model's generation_config EOS ids (chat models often list several) and the
    tokenizer's EOS."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class HFBackend:
    """transformers: batched, left-padded, on CPU or GPU."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device

    def generation_config(self, s: GenSettings):
        from transformers import GenerationConfig

        # Unset fields are filled from the model's generation_config: set every one that changes the result.
        sampling = dict(temperature=s.temperature, top_p=s.top_p, top_k=0) if s.temperature > 0 else {}
        return GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.temperature > 0,
            num_return_sequences=s.num_samples,
            repetition_penalty=1.0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(getattr(self.model, "generation_config", None), self.tokenizer),
            **sampling,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], s: GenSettings, stop: tuple[str, ...] = ()) -> list[list[str]]:
        """`num_samples` completions per prompt (decoded, special tokens dropped); a completion may end early at
        a `stop` string (which it then includes: callers cut it off, as vLLM's output does not hold it)."""
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        if s.temperature > 0:
            torch.manual_seed(s.seed)
        config = self.generation_config(s)
        extra = {}
        if stop:
            config.stop_strings, extra["tokenizer"] = list(stop), self.tokenizer
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        n = s.num_samples
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def next_token_logprobs(self, prompts: list[list[int]], candidates: list[int]) -> list[list[float]]:
        """log p(candidate | prompt) for each prompt and candidate token, in float32."""
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        # Positions counted from each row's first real token: left padding then changes nothing, even for
        # models with absolute position embeddings.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        return logp[:, torch.tensor(candidates, device=logp.device)].tolist()
