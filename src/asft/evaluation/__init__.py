"""Evaluation the way the ASFT paper reports it: `asft eval --task medical | math | judge | drift | code`.

Layout: `cli.py` parses flags and runs a task; `datafiles.py` reads and validates the input files; `store.py`
keeps finished generations so a rerun resumes; `generation.py` loads models and holds the hf / vLLM backends;
`report.py` writes results.json, predictions.jsonl and the markdown table; one file per task.
"""

from __future__ import annotations

from ..data import DataError
from ..errors import ConfigError

# One exception for bad evaluation data, shared with training data: file, line (1-based) and field.
EvalDataError = DataError


class EvalError(ConfigError):
    """A wrong flag, combination or environment, reported as one line before any model is loaded."""


__all__ = ["EvalDataError", "EvalError"]
