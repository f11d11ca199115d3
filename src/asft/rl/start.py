"""What RL starts from: the problems (rendered as in evaluation) and the starting model (a run's final model or
adapter), whose frozen copy is the reference."""

from __future__ import annotations

from pathlib import Path

from ..data.templates import render_prompt, resolve_template
from ..errors import DataError, UsageError
from ..models import DTYPES, adapter_base, is_adapter_dir, load_tokenizer, merge_lora, resolve_model_path
from ..training.checkpoints import last_checkpoint
from .args import RLArguments


def load_problems(data_path: str, reward: str | None, tokenizer, template: str):
    """The problem files as a datasets.Dataset: prompt (rendered as in evaluation), gold, letters."""
    from datasets import Dataset

    from ..evaluation import math as math_task
    from ..evaluation import medical
    from ..evaluation.datafiles import file_rows, split_paths

    template = resolve_template(template, tokenizer)
    rows = []
    paths = split_paths(data_path)
    if not paths:
        raise DataError(str(data_path), None, None, "no data file given")
    for path in paths:
        kind = reward
        if kind is None:  # user rewards only: the file's format says which problems these are
            first = file_rows(path)[0].data
            kind = "math" if math_task.detect(first) else "choice"
        _, items = (math_task if kind == "math" else medical).load(path)
        for it in items:
            rows.append(
                {
                    "prompt": render_prompt(it.prompt, template, tokenizer),
                    "gold": str(it.gold),
                    "letters": it.meta.get("letters", ""),
                }
            )
    return Dataset.from_list(rows), template


def resolve_start(name: str) -> str:
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        last = last_checkpoint(path)
        if last is not None:
            raise UsageError(
                f"model_name_or_path: {path} holds no final model (the run did not finish); start "
                f"from its last checkpoint {last}, or finish it with `asft train ... "
                "--resume_from_checkpoint last`"
            )
    return resolve_model_path(name)


def load_start(script: RLArguments, output_dir: str):
    """(model, tokenizer, peft_config, what the reference is). The reference is always the starting point:
    TRL loads a frozen copy from the start's folder (full model), copies the starting adapter into a frozen
    "ref" adapter (LoRA continued), or disables a new adapter (--use_lora)."""
    from transformers import AutoModelForCausalLM

    path = resolve_start(script.model_name_or_path)
    dtype = DTYPES[script.model_dtype]
    peft_config = None
    if is_adapter_dir(path) and script.merge_adapter:
        merged = Path(output_dir) / "start-merged"
        if not (merged / "config.json").exists():  # on resume the merged start is already there
            merge_lora(script.base_model or adapter_base(path), path, str(merged), overwrite=True)
        path = str(merged)
    if is_adapter_dir(path):
        from peft import PeftModel

        base_path = resolve_model_path(script.base_model or adapter_base(path))
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=True)
        reference = f"the starting adapter {path} (a frozen copy)"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        reference = f"{path} (a frozen copy)"
        if script.use_lora:
            peft_config = script.peft_config()
            reference = f"{path} (the adapter-disabled model)"
    tokenizer = load_tokenizer(path, base_model=script.base_model, padding_side="left")
    return model, tokenizer, peft_config, reference
