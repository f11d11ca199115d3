"""Dataclass fields with their help text, TRL's config style (argparse flags and YAML keys come from them) in one
call: `lora_r: int = arg(8, "LoRA rank.")` instead of `field(default=8, metadata={"help": "LoRA rank."})`."""

from __future__ import annotations

from dataclasses import field


def arg(default, help: str, choices=None):
    """A field whose default is `default`, documented by `help`; `choices` restricts its values on the command line."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": list(choices)}
    return field(default=default, metadata=metadata)
