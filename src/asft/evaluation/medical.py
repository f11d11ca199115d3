"""Medical multiple choice (MedQA, MedMCQA, MMLU): the option letter with the highest next-token log-probability.

Formats, detected per file from its first row:
  medqa    {"question", "options": {"A": ..., "B": ...}, "answer_idx": "A"}   (options may also be a list of
           {"key", "value"}, as in some MedQA dumps)
  medmcqa  {"question", "opa", "opb", "opc", "opd", "cop": 0-3}
  mmlu     {"question", "choices": [...], "answer": 0-based int}

The prompt is the paper's, `Question: {q}\\n\\nOptions:\\nA. ...\\nB. ...\\n\\nAnswer:`, wrapped by --template.
A letter's score is the best log-probability over the tokenizer's single-token variants of it ("A", " A"), so
the answer is found whether the template ends in a newline ("A") or in "Answer:" (" A").
"""

from __future__ import annotations

import string

from ..data.formats import Row
from ..data.templates import encode_prompt, render_prompt
from ..errors import DataError, EvalError
from .datafiles import Dataset, Item, load_file, require
from .report import DatasetResult

NAME = "medical"
LETTERS = string.ascii_uppercase
EXPECTED = (
    "MedQA (question, options, answer_idx), MedMCQA (question, opa..opd, cop) or MMLU (question, choices, answer)"
)


def detect(data: dict) -> str | None:
    if "options" in data or "answer_idx" in data:
        return "medqa"
    if "opa" in data or "cop" in data:
        return "medmcqa"
    if "choices" in data:
        return "mmlu"
    return None


def _medqa_options(row: Row) -> list[str]:
    options = require(row, "options", (dict, list))
    if isinstance(options, list):  # [{"key": "A", "value": ...}, ...]
        if not all(isinstance(o, dict) and "key" in o and "value" in o for o in options):
            raise DataError(row.source, row.line, "options", "expected {letter: text} or a list of {key, value}")
        options = {o["key"]: o["value"] for o in options}
    keys = sorted(options)
    if not keys or keys != list(LETTERS[: len(keys)]):
        raise DataError(row.source, row.line, "options", f"keys must be A, B, C, ... in order, got {keys}")
    for k in keys:
        if not isinstance(options[k], str):
            raise DataError(row.source, row.line, f"options.{k}", "expected a string")
    return [options[k] for k in keys]


def _answer_index(row: Row, key: str, n: int) -> int:
    value = require(row, key, (int, str))
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n] and len(value.strip()) == 1:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and 0 <= value < n:
        return value
    raise DataError(row.source, row.line, key, f"{value!r} is not one of the {n} options")


def parse(row: Row, fmt: str, index: int) -> Item:
    question = require(row, "question")
    if fmt == "medqa":
        options = _medqa_options(row)
        gold = require(row, "answer_idx")
        if gold not in LETTERS[: len(options)] or len(gold) != 1:
            raise DataError(row.source, row.line, "answer_idx", f"{gold!r} is not one of the option letters")
        answer = LETTERS.index(gold)
    elif fmt == "medmcqa":
        options = [require(row, key) for key in ("opa", "opb", "opc", "opd")]
        answer = _answer_index(row, "cop", 4)
    else:
        options = require(row, "choices", list)
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise DataError(row.source, row.line, "choices", "expected a list of at least two strings")
        answer = _answer_index(row, "answer", len(options))
    letters = LETTERS[: len(options)]
    return Item(
        index, row.line, prompt=format_question(question, options), gold=letters[answer], meta={"letters": letters}
    )


def format_question(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, options))
    return f"Question: {question}\n\nOptions:\n{lines}\n\nAnswer:"


def load(path: str, args=None) -> tuple[str, list[Item]]:
    return load_file(path, detect, parse, EXPECTED)


def settings(args) -> dict:
    return {"scoring": "next-token letter log-probability, best of 'X' and ' X'"}


def letter_variants(tokenizer, letters: str) -> dict[str, list[int]]:
    """Token ids that spell each letter as a single token ("A", " A"); letters must not share one."""
    variants, owner = {}, {}
    for letter in letters:
        ids = [tokenizer.encode(v, add_special_tokens=False) for v in (letter, " " + letter)]
        variants[letter] = sorted({i[0] for i in ids if len(i) == 1})
        if not variants[letter]:
            raise EvalError(
                f"the tokenizer spells the option letter {letter!r} with several tokens in every form; "
                "next-token scoring needs a single-token letter"
            )
        for t in variants[letter]:
            if owner.setdefault(t, letter) != letter:
                raise EvalError(f"token {t} spells both {owner[t]!r} and {letter!r}")
    return variants


def prepare(run, datasets: list[Dataset]) -> None:
    """Check the tokenizer can spell every option letter before any model is loaded."""
    letters = max((it.meta["letters"] for ds in datasets for it in ds.items), key=len, default="")
    letter_variants(run.tokenizer, letters)


def score(run, batch: list[Item]) -> list[list[dict]]:
    letters = max((it.meta["letters"] for it in batch), key=len)
    variants = letter_variants(run.tokenizer, letters)
    candidates = sorted({t for ids in variants.values() for t in ids})
    column = {t: i for i, t in enumerate(candidates)}
    prompts = [encode_prompt(render_prompt(it.prompt, run.template, run.tokenizer), run.tokenizer) for it in batch]
    logprobs = run.backend.next_token_logprobs(prompts, candidates)
    return [
        [{"scores": {L: max(row[column[t]] for t in variants[L]) for L in it.meta["letters"]}}]
        for it, row in zip(batch, logprobs)
    ]


def evaluate(run, ds: Dataset) -> DatasetResult:
    outputs = run.complete(ds, ds.items, lambda batch: score(run, batch), length=lambda it: len(it.prompt))
    predictions = []
    for it in ds.items:
        scores = outputs[it.index][0]["scores"]
        guess = max(scores, key=scores.get)  # ties go to the earlier letter
        predictions.append(
            {"index": it.index, "prediction": guess, "gold": it.gold, "correct": guess == it.gold, "scores": scores}
        )
    n = len(predictions)
    value = sum(p["correct"] for p in predictions) / n if n else None
    return DatasetResult(ds.name, ds.path, ds.format, "accuracy", value, n, predictions=predictions)
