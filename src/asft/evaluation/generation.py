"""Prompts, model loading and the transformers backend (the vLLM one lives in vllm_backend.py).

Both backends take prompts as token ids, tokenized here once, so that they see exactly the same input and agree
on greedy settings. Sampling parameters are always set explicitly: a model's own generation_config (top_k=20,
repetition_penalty=1.05, ...) never leaks in, in either backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, TEMPLATES
from . import EvalError


# `--template alpaca` at evaluation: the paper's *evaluation* prompt, which (unlike its training script, whose text
# asft train renders: asft.data.ALPACA_PROMPT) ends with "### Response:" plus a newline. Kept so that figures
# compare with the paper's; the one-token difference is stated in --help and in results.json.
ALPACA_TEMPLATE = ALPACA_PROMPT + "\n"
ALPACA_TEMPLATE_WITH_INPUT = ALPACA_PROMPT_WITH_INPUT + "\n"
ALPACA_NOTE = ("alpaca: the paper's evaluation prompt, ending '### Response:' + newline (its training prompt, used "
               "by asft train, has no newline)")


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ prompts


def resolve_template(template: str, tokenizer) -> str:
    """auto -> chat when the tokenizer has a chat template, else alpaca."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template not in TEMPLATES:
        raise EvalError(f"--template: unknown value {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "chat" and not has_chat:
        raise EvalError("--template chat: the tokenizer has no chat template; use --template alpaca or none")
    return template


def render_prompt(prompt: str, template: str, tokenizer, input: str = "") -> str:
    if template == "chat":
        content = prompt + (f"\n\n{input}" if input.strip() else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    if template == "alpaca":
        if input.strip():
            return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=prompt, input=input)
        return ALPACA_TEMPLATE.format(instruction=prompt)
    return prompt + (f"\n\n{input}" if input.strip() else "")


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt, with BOS the way the training data code adds it (never twice)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


# ---------------------------------------------------------------------------------------------- model loading


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU; bfloat16 on a GPU that supports it (what the paper evaluates in), else float16."""
    from ..models import DTYPES

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise EvalError(f"--dtype: unknown value {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def tokenizer_source(path: str, base_model: str | None = None) -> str:
    """An adapter folder usually carries the tokenizer it was trained with; else its base's."""
    from ..models import adapter_base, is_adapter_dir, resolve_model_path

    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        return resolve_model_path(base_model or adapter_base(path))
    return path


def load_tokenizer(path: str, *, base_model: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer, left-padded for batched generation, with pad = eos when it has no pad token."""
    from ..models import ModelLoadError, load_tokenizer as _load, resolve_model_path

    source = tokenizer_source(resolve_model_path(path, trust_remote_code), base_model)
    try:
        tokenizer = _load(source, trust_remote_code)
    except OSError as e:  # offline hub id, missing files: one line, not a traceback
        raise ModelLoadError(f"model: cannot load a tokenizer from {source}: {e}") from None
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: str, *, dtype=None, device=None, base_model: str | None = None,
               trust_remote_code: bool = False, merge_adapter: bool = False):
    """Load `(model, tokenizer)` from a folder, a hub id, a .gguf file or a LoRA adapter folder.

    An adapter (adapter_config.json present) is applied with peft to its base: `base_model` when given, else the
    adapter's `base_model_name_or_path`; it stays unmerged (so drift can switch it off) unless `merge_adapter`.
    """
    from ..models import ModelLoadError, load_model as _load

    device = resolve_device(device)
    try:
        model = _load(path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
                      base_model=base_model)
    except OSError as e:
        raise ModelLoadError(f"model: cannot load {path}: {e}") from None
    if merge_adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(device).eval()
    return model, load_tokenizer(path, base_model=base_model, trust_remote_code=trust_remote_code)


def model_identity(path: str | None) -> str | None:
    """What identifies a model for resuming: its absolute path and the size and mtime of its weight files.

    Retraining into the same folder changes the weights' mtime, so stale generations are never reused.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return path  # a hub id (or embedded:...): its name is all we know
    p = p.resolve()
    files = sorted(f for f in (p.iterdir() if p.is_dir() else [p])
                   if f.suffix in (".safetensors", ".bin", ".gguf", ".pt") or f.name == "adapter_config.json")
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{p}#{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------- transformers


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
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
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
            max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0, num_return_sequences=s.num_samples,
            repetition_penalty=1.0, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(getattr(self.model, "generation_config", None), self.tokenizer), **sampling)

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
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        n = s.num_samples
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

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


# --------------------------------------------------------------------------------------------------- backends


def check_backend(name: str) -> None:
    """Fail fast, before any file or model is read, when the vLLM backend cannot run here."""
    if name == "hf":
        return
    if name != "vllm":
        raise EvalError(f"--backend: unknown value {name!r}; expected hf or vllm")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise EvalError("--backend vllm needs the vllm package (pip install 'asft[vllm]') and a CUDA GPU; "
                        "use --backend hf")
    if not torch.cuda.is_available():
        raise EvalError("--backend vllm needs a CUDA GPU and none is visible; use --backend hf")


def make_backend(args, tokenizer):
    """The backend named by --backend, loading the model now (the first moment it is needed)."""
    if args.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(args.model, base_model=args.base_model, tokenizer=tokenizer, dtype=args.dtype,
                           seed=args.seed, trust_remote_code=args.trust_remote_code,
                           gpu_memory_utilization=args.gpu_memory_utilization,
                           tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len)
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device, base_model=args.base_model,
                          trust_remote_code=args.trust_remote_code, merge_adapter=args.merge_adapter)
    return HFBackend(model, tokenizer)
