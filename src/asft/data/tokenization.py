"""Tokenization: rendered segments -> token ids with response-only labels; a training set as a datasets.Dataset."""

from __future__ import annotations

from ..errors import DataError
from ..io import IGNORE_INDEX
from .formats import Example, load_examples
from .templates import render, resolve_template


def tokenize(example: Example, template: str, tokenizer, max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels (-100 on non-trainable tokens); truncated to max_length from the right.

    One prompt and one response (alpaca, prompt/completion) are tokenized as the paper's script (and Stanford
    Alpaca, and TRL) do: the whole text at once, with the first len(tokens(prompt)) tokens masked, so a token that
    BPE merges across the boundary comes out the same. Conversations are tokenized segment by segment.
    """
    segments = render(example, template, tokenizer)
    input_ids, labels = [], []
    if len(segments) == 2 and not segments[0][1] and segments[1][1]:
        n_prompt = len(tokenizer(segments[0][0], add_special_tokens=False)["input_ids"])
        input_ids = tokenizer(segments[0][0] + segments[1][0], add_special_tokens=False)["input_ids"]
        labels = [IGNORE_INDEX] * min(n_prompt, len(input_ids)) + input_ids[n_prompt:]
        segments = []
    for text, trainable in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    # BOS as the tokenizer would add it, but never twice (a chat template may already start with it).
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and input_ids[:1] != [bos]:
        input_ids, labels = [bos] + input_ids, [IGNORE_INDEX] + labels
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def tokenized_examples(examples, template: str, tokenizer, max_length=None, on_bad_rows="error", skipped=None):
    """Yield (example, features truncated to max_length, the untruncated labels) for every example training keeps.

    A bad row (including one whose prompt alone fills max_length: nothing left to train on) raises its DataError
    with on_bad_rows="error", else is appended to `skipped` and left out. The one loop behind `build_dataset` and
    the prior diagnostic, so both keep and refuse the same examples.
    """
    for ex in examples:
        try:
            item = tokenize(ex, template, tokenizer)
            full = item["labels"]
            if max_length is not None:
                item = {k: v[:max_length] for k, v in item.items()}
            if all(label == IGNORE_INDEX for label in item["labels"]):
                raise DataError(
                    ex.source, ex.line, None, f"the prompt alone fills max_length={max_length}: no response token left"
                )
        except DataError as e:
            if on_bad_rows == "error":
                raise
            if skipped is not None:
                skipped.append(e)
            continue
        yield ex, item, full


def build_dataset(
    paths,
    tokenizer,
    *,
    template: str = "auto",
    max_length: int | None = None,
    on_bad_rows: str = "error",
    log=print,
    origin: bool = False,
):
    """Load, validate and tokenize training files into a `datasets.Dataset` of input_ids / labels.

    An example whose prompt alone fills max_length (nothing left to train on) is a bad row. `origin` adds each
    example's `source` file and `line` as columns (the reference cache names examples with them).
    """
    import datasets

    template = resolve_template(template, tokenizer)
    examples, skipped = load_examples(paths, on_bad_rows)
    rows, truncated, kept, cut = [], 0, 0, 0
    for ex, item, full in tokenized_examples(examples, template, tokenizer, max_length, on_bad_rows, skipped):
        rows.append({**item, "source": ex.source, "line": ex.line} if origin else item)
        kept += sum(label != IGNORE_INDEX for label in item["labels"])
        if len(full) > len(item["labels"]):
            truncated += 1
            cut += sum(label != IGNORE_INDEX for label in full[len(item["labels"]) :])
    if skipped:
        lines = ", ".join(f"{e.source}:{e.line}" for e in skipped[:20]) + (" ..." if len(skipped) > 20 else "")
        log(f"Skipped {len(skipped)} bad rows: {lines}")
    if not rows:
        raise DataError(str(paths), None, None, "no valid examples")
    _report_truncation(log, max_length, len(rows), truncated, kept, cut)
    return datasets.Dataset.from_list(rows)


# More than this share of examples or response tokens cut by max_length is warned about, not just reported.
TRUNCATION_WARN = 0.02


def _report_truncation(log, max_length, n, truncated, kept, cut) -> None:
    if max_length is None:
        return
    share = cut / (kept + cut) if kept + cut else 0.0
    line = (
        f"max_length={max_length}: {truncated} of {n} examples truncated ({100 * truncated / n:.1f}%), "
        f"{cut} of {kept + cut} response tokens removed ({100 * share:.1f}%)"
    )
    if truncated / n > TRUNCATION_WARN or share > TRUNCATION_WARN:
        import warnings

        warnings.warn(line + "; raise --model_max_length to keep them", stacklevel=3)
    else:
        log("Truncation: " + line)


def right_pad(features: list[dict], pad_id: int, device) -> dict:
    """A batch of tokenized examples (input_ids, labels), right-padded: input_ids, attention_mask, labels."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
