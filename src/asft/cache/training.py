"""The trainer's side of the cache: opening and checking it against the training data, the example index that
travels with each batch, and the reference source that reads a batch's rows."""

from __future__ import annotations

import torch

from ..data import resolve_template
from ..errors import ConfigError
from ..io import IGNORE_INDEX
from .store import EXAMPLE_COLUMN, ReferenceCache, model_fingerprint


def open_for_training(args, ref_model, trainer_kwargs: dict, model=None):
    """The cache of `args.reference_cache`, checked against the trainer's tokenizer, max length and every training
    example (named on a mismatch), and the train_dataset with the stable example index column added.

    A policy whose starting weights are not the cache's reference is trained, with a warning: the KL then anchors
    to the model the cache was built from (intended with `cache-reference --reference_model_path`)."""
    import warnings

    import datasets

    if ref_model is not None:
        raise ConfigError("ref_model: with reference_cache no reference model is used; pass one or the other")
    cache = ReferenceCache(args.reference_cache)
    if (
        model is not None
        and not isinstance(model, str)
        and not hasattr(model, "get_base_model")
        and not any(hasattr(p, "ds_id") for p in model.parameters())
    ):  # a plain model (not PEFT, not ZeRO-3 shards)
        if model_fingerprint(model) != cache.manifest["reference"]["fingerprint"]:
            warnings.warn(
                f"reference_cache: the cache's reference ({cache.manifest['reference']['path']}) is not "
                "the model being trained (other weights or config): the KL anchors to that model",
                stacklevel=3,
            )
    cache.check_settings(tokenizer=trainer_kwargs.get("processing_class"), max_length=args.max_length)
    if trainer_kwargs.get("eval_dataset") is not None:
        raise ConfigError(
            "eval_data_path: the reference cache covers the training set only; evaluate without "
            "reference_cache, or leave out the held-out data"
        )
    ds = trainer_kwargs.get("train_dataset")
    if not isinstance(ds, datasets.Dataset) or not {"input_ids", "labels"} <= set(ds.column_names):
        raise ConfigError(
            "reference_cache: train_dataset must be a tokenized datasets.Dataset with input_ids and "
            "labels (asft.data.build_dataset makes one)"
        )
    cache.check_dataset(ds)
    if EXAMPLE_COLUMN not in ds.column_names:
        ds = ds.add_column(EXAMPLE_COLUMN, list(range(len(ds))))
    return cache, {**trainer_kwargs, "train_dataset": ds}


def check_for_cli(path: str, dataset, tokenizer, template: str, max_length) -> None:
    """`asft train --reference_cache`: the cache against the data and settings, before any model is loaded."""
    cache = ReferenceCache(path)
    cache.check_settings(tokenizer=tokenizer, template=resolve_template(template, tokenizer), max_length=max_length)
    cache.check_dataset(dataset)


def check_prepared(cache: ReferenceCache, dataset) -> None:
    """After the trainer's preparation (its truncation, filtering, shuffling): each row is still its cached example."""
    if EXAMPLE_COLUMN not in dataset.column_names:
        raise ConfigError(f"reference_cache: the prepared dataset lost its {EXAMPLE_COLUMN!r} column (packing?)")
    for row in dataset:
        e = int(row[EXAMPLE_COLUMN])
        cache.check_example(e, row["input_ids"], row["labels"], cache.origins[e] + ", after the trainer's truncation")


class ExampleIndexCollator:
    """Wraps the trainer's collator: the examples' `asft_example` indices travel with the batch as a tensor."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        index = [int(ex[EXAMPLE_COLUMN]) for ex in examples]
        batch = self.inner([{k: v for k, v in ex.items() if k != EXAMPLE_COLUMN} for ex in examples])
        batch[EXAMPLE_COLUMN] = torch.tensor(index, dtype=torch.long)
        return batch


class CachedReference:
    """A reference cache (`asft.cache.ReferenceCache`): each batch carries its examples' stable indices in the
    `asft_example` column, which the trainer keeps through shuffling, accumulation, ranks, resume and epochs."""

    def __init__(self, cache):
        self.cache = cache

    def rows(self, inputs: dict, labels: torch.Tensor):
        """The CachedRows of the batch's response tokens, in `select_response` order (row by row)."""
        if EXAMPLE_COLUMN not in inputs:
            raise RuntimeError(
                f"the batch has no {EXAMPLE_COLUMN!r} column: a cached reference needs the trainer's "
                "example index (was the dataset prepared by AnchoredSFTTrainer?)"
            )
        examples = inputs[EXAMPLE_COLUMN].reshape(-1).tolist()
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
        for e, n in zip(examples, counts):
            if self.cache.tokens[e] != n:
                raise RuntimeError(
                    f"example {e} ({self.cache.origins[e]}) has {n} response tokens in this batch, "
                    f"the cache {self.cache.tokens[e]}: the data changed after the cache was checked"
                )
        return self.cache.rows(examples).to(labels.device)

    def loss_kwargs(self, inputs: dict, fused: bool) -> dict:
        return {"ref_cache": self.rows(inputs, inputs["labels"])}
