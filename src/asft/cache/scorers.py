"""Scorers: the reference's cached rows of a batch, with transformers (HFScorer) or vLLM's prompt log-probs
(VLLMScorer)."""

from __future__ import annotations

import torch

from ..data import right_pad
from ..fused import lm_head_of
from ..objectives import CachedRows, select_response
from .store import reference_rows


class HFScorer:
    """The reference's cached rows of a batch with transformers: one forward of the backbone, the lm_head on the
    response rows only (in chunks), then log-softmax and top-k in float32."""

    def __init__(self, model, pad_id: int, chunk_size: int = 1024):
        self.model, self.pad_id, self.chunk_size = model, pad_id, chunk_size
        self.head = lm_head_of(model)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, batch: dict, k: int) -> tuple[list[CachedRows], list[int]]:
        features = [{"input_ids": x, "labels": y} for x, y in zip(batch["input_ids"], batch["labels"])]
        padded = right_pad(features, self.pad_id, self.device)
        ids, labels, mask = padded["input_ids"], padded["labels"], padded["attention_mask"]
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        h, y, rows = select_response(hidden, labels)
        parts = [
            reference_rows(self.head.logits(h[s : s + self.chunk_size]), y[s : s + self.chunk_size], k)
            for s in range(0, y.numel(), self.chunk_size)
        ]
        counts = torch.bincount(rows, minlength=ids.shape[0]).tolist()
        return [CachedRows(*(t.cpu() for t in (p.ids, p.logp, p.tail, p.label))) for p in parts], counts


class VLLMScorer:
    """The same rows with vLLM's prompt log-probs (GPU): `prompt_logprobs=k` gives, for every prompt position t, the
    log-probabilities of the k most likely tokens and of the actual token t given the tokens before it.

    vLLM reports only those k (+1) values, so the tail is log(1 - sum_K rho) computed in float64 as
    log(-expm1(logsumexp(top-k))): below ~1e-6 the tail mass is rounding noise of vLLM's float32 log-probs.
    """

    def __init__(
        self,
        model_path: str,
        *,
        k: int,
        dtype: str | None,
        max_length: int | None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.8,
        trust_remote_code: bool = False,
    ):
        from vllm import LLM

        # max_logprobs: vLLM's default (20) caps prompt_logprobs; one more position than max_length for the one
        # token it must generate.
        self.llm = LLM(
            model=model_path,
            dtype=dtype or "auto",
            seed=seed,
            max_logprobs=k,
            max_model_len=None if max_length is None else max_length + 1,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            generation_config="vllm",
        )

    def __call__(self, batch: dict, k: int) -> tuple[list[CachedRows], list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(x)) for x in batch["input_ids"]]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        parts, counts = [], []
        for out, labels in zip(outputs, batch["labels"]):
            lp = out.prompt_logprobs  # [T] of dict token -> Logprob; entry t scores token t given tokens < t
            keep = [t for t in range(1, len(labels)) if labels[t] != -100]
            ids = torch.zeros(len(keep), k, dtype=torch.long)
            logp = torch.zeros(len(keep), k, dtype=torch.float64)
            label = torch.zeros(len(keep), dtype=torch.float64)
            for i, t in enumerate(keep):
                ranked = sorted(lp[t].items(), key=lambda kv: -kv[1].logprob)
                top = [(tok, v.logprob) for tok, v in ranked if v.rank is None or v.rank <= k][:k]
                ids[i] = torch.tensor([tok for tok, _ in top])
                logp[i] = torch.tensor([v for _, v in top], dtype=torch.float64)
                label[i] = lp[t][labels[t]].logprob
            tail = torch.log(-torch.expm1(torch.logsumexp(logp, -1).clamp(max=-1e-12)))
            parts.append(CachedRows(ids, logp.float(), tail.float(), label.float()))
            counts.append(len(keep))
        return parts, counts
