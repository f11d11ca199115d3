"""Training data: every accepted format -> one canonical form -> token ids with response-only labels.

`formats` reads and validates files (file, line and field named before any compute), `templates` renders
prompts for training and evaluation, `tokenization` turns examples into token ids and a training dataset.
"""

from __future__ import annotations

from ..errors import DataError
from ..io import IGNORE_INDEX, atomic_path, write_jsonl
from .formats import (
    FORMATS,
    REQUIRED_FIELDS,
    ROLES,
    Example,
    Row,
    detect_format,
    example_to_row,
    load_examples,
    read_rows,
    to_example,
)
from .templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, TEMPLATES, render, resolve_template
from .tokenization import build_dataset, right_pad, tokenize, tokenized_examples

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "REQUIRED_FIELDS",
    "ROLES",
    "TEMPLATES",
    "DataError",
    "Example",
    "Row",
    "atomic_path",
    "build_dataset",
    "detect_format",
    "example_to_row",
    "load_examples",
    "read_rows",
    "render",
    "resolve_template",
    "right_pad",
    "tokenize",
    "tokenized_examples",
    "to_example",
    "write_jsonl",
]
