"""The cached reference distribution: the reference's top-k log-probs per response token, computed once over the
training set, stored on disk (memory-mapped) and read back every epoch, so that training loads no reference model.

`store` is the on-disk format (fingerprints, the build plan, shards, `ReferenceCache`), `scorers` compute the rows
(transformers or vLLM), `training` is the trainer's side (checks against the data, the example index, the
reference source). The KL taken from a cache is `asft.objectives.bucketed_kl`.
"""

from __future__ import annotations

from ..errors import CacheMismatchError
from .scorers import HFScorer, VLLMScorer
from .store import (
    EXAMPLE_COLUMN,
    FORMAT,
    STORE_DTYPES,
    VERSION,
    ReferenceCache,
    build_cache,
    build_plan,
    example_fingerprint,
    finish_cache,
    ids_dtype,
    model_fingerprint,
    prepare_output,
    reference_rows,
    shard_name,
    tokenizer_fingerprint,
)
from .training import CachedReference, ExampleIndexCollator, check_for_cli, check_prepared, open_for_training

__all__ = [
    "EXAMPLE_COLUMN",
    "FORMAT",
    "STORE_DTYPES",
    "VERSION",
    "CacheMismatchError",
    "CachedReference",
    "ExampleIndexCollator",
    "HFScorer",
    "ReferenceCache",
    "VLLMScorer",
    "build_cache",
    "build_plan",
    "check_for_cli",
    "check_prepared",
    "example_fingerprint",
    "finish_cache",
    "ids_dtype",
    "model_fingerprint",
    "open_for_training",
    "prepare_output",
    "reference_rows",
    "shard_name",
    "tokenizer_fingerprint",
]
