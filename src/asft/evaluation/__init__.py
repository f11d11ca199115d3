"""Evaluation the way the ASFT paper reports it: `asft eval --task medical | math | judge | drift | code`.

Layout: `driver.py` holds the flags and runs a task (for `asft eval`, evaluation during training and code
grading); `callback.py` evaluates during training; `datafiles.py` reads and validates the input files; `store.py`
keeps finished generations so a rerun resumes; `generation.py` (transformers), `vllm_backend.py` and `backends.py`
generate; `report.py` writes results.json, predictions.jsonl and the markdown table; one file per task (medical,
math, judge, drift, code; `sandbox.py` runs model-written code).
"""

from __future__ import annotations

from ..errors import EvalDataError, EvalError

__all__ = ["EvalDataError", "EvalError"]
