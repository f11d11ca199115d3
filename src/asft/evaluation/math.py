"""Math problems in the Qwen2.5-Math harness formats, graded with math-verify.

Formats, detected per file from its first row:
  gsm8k   {"question", "answer": "... #### 42"}
  math    {"problem", "solution": "... \\boxed{42} ..."}        (MATH)
  answer  {"problem" or "question", "answer" or "final_answer"}  (MATH-500, AIME, AMC, OlympiadBench; a list
          of final answers, as OlympiadBench stores them, is joined with ", ")

The prompt appends the harness's chain-of-thought instruction. Greedy by default; with `--num_samples n
--temperature t` the metric is avg@n (mean accuracy over the n samples) and pass@1 (accuracy of the first
sample) is reported next to it, with pass@n (any sample right).

Grading timeouts: math-verify bounds each parse and comparison with SIGALRM, which only works in the main
thread. `is_correct` uses that timeout in the main thread and runs without one elsewhere (a caller grading in
threads must bound the time itself, e.g. with a process pool).
"""

from __future__ import annotations

import re
import threading

from ..data.formats import Row
from ..data.templates import encode_prompt, render_prompt
from ..errors import DataError
from .datafiles import Dataset, Item, load_file, require
from .generation import GenSettings
from .report import DatasetResult

NAME = "math"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EXPECTED = (
    "GSM8K (question, answer with '#### n'), MATH (problem, solution with \\boxed{}), or problem/question "
    "with answer/final_answer"
)
_ANSWER_IS = re.compile(r"the (?:final )?answer is[:\s]*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


# ---------------------------------------------------------------------------------------------------- answers


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; also `\\boxed 5`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text[i : i + 1] == " ":
        return text[i + 1 :].split("$")[0].split()[0] if text[i + 1 :].strip() else None
    if text[i : i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unbalanced: the completion was cut off inside the box


def extract_answer(completion: str) -> str:
    """The final answer: the last \\boxed{}, else what follows the last "the answer is", else the last number."""
    boxed = last_boxed(completion)
    if boxed:
        return boxed
    matches = list(_ANSWER_IS.finditer(completion))
    if matches:
        rest = completion[matches[-1].end() :].split("\n")[0].strip().rstrip(".").strip().strip("$").strip()
        if rest:
            return rest
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else ""


def _plain(text: str) -> str:
    return re.sub(r"\s+", "", str(text)).strip("$").rstrip(".")


def answers_match(prediction: str, gold: str, timeout: int | None = 5) -> bool:
    """Whether an extracted answer equals the gold one, by math-verify (symbolic and numeric equivalence)."""
    from math_verify import parse, verify

    if not prediction or not str(gold).strip():
        return False
    if _plain(prediction) == _plain(gold):
        return True
    if threading.current_thread() is not threading.main_thread():
        timeout = None  # SIGALRM cannot be set off the main thread: see the module's docstring
    gold_parsed = parse("\\boxed{" + str(gold) + "}", parsing_timeout=timeout)
    pred_parsed = parse("\\boxed{" + prediction + "}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def is_correct(completion: str, gold: str, timeout: int | None = 5) -> bool:
    """Whether a model's completion reaches the gold answer (extraction, then math-verify)."""
    return answers_match(extract_answer(completion), gold, timeout)


# ------------------------------------------------------------------------------------------------------- files


def detect(data: dict) -> str | None:
    if "question" in data and isinstance(data.get("answer"), str) and "####" in data["answer"]:
        return "gsm8k"
    has_text = "problem" in data or "question" in data
    if has_text and ("answer" in data or "final_answer" in data):
        return "answer"
    if "problem" in data and "solution" in data:
        return "math"
    return None


def _final_answer(row: Row) -> str:
    key = "answer" if "answer" in row.data else "final_answer"
    value = require(row, key, (str, int, float, list))
    if isinstance(value, list):
        if not value or not all(isinstance(v, (str, int, float)) for v in value):
            raise DataError(row.source, row.line, key, "expected a non-empty list of answers")
        value = ", ".join(str(v).strip().strip("$") for v in value)
    return str(value).strip().strip("$").strip()


def parse(row: Row, fmt: str, index: int) -> Item:
    if fmt == "gsm8k":
        question, answer = require(row, "question"), require(row, "answer")
        if "####" not in answer:
            raise DataError(row.source, row.line, "answer", "no '#### <answer>' line")
        gold = answer.split("####")[-1].strip().replace(",", "")
    elif fmt == "math":
        question = require(row, "problem")
        gold = last_boxed(require(row, "solution"))
        if not gold:
            raise DataError(row.source, row.line, "solution", "no \\boxed{} answer")
    else:
        question = require(row, "problem" if "problem" in row.data else "question")
        gold = _final_answer(row)
    return Item(index, row.line, prompt=f"{question}\n{INSTRUCTION}", gold=gold)


def load(path: str, args=None) -> tuple[str, list[Item]]:
    return load_file(path, detect, parse, EXPECTED)


# ------------------------------------------------------------------------------------------------------ running


def gen_settings(args) -> GenSettings:
    return GenSettings(args.max_new_tokens, args.temperature, args.top_p, args.num_samples, args.seed)


def settings(args) -> dict:
    return {**vars(gen_settings(args)), "instruction": INSTRUCTION}


def generate(run, batch: list[Item], s: GenSettings) -> list[list[dict]]:
    prompts = [encode_prompt(render_prompt(it.prompt, run.template, run.tokenizer), run.tokenizer) for it in batch]
    return [[{"completion": c} for c in texts] for texts in run.backend.generate(prompts, s)]


def evaluate(run, ds: Dataset) -> DatasetResult:
    s = gen_settings(run.args)
    outputs = run.complete(
        ds, ds.items, lambda batch: generate(run, batch, s), samples=s.num_samples, length=lambda it: len(it.prompt)
    )
    predictions = []
    for it in ds.items:
        completions = [o["completion"] for o in outputs[it.index]]
        answers = [extract_answer(c) for c in completions]
        correct = [answers_match(a, it.gold, run.args.math_timeout) for a in answers]
        row = {
            "index": it.index,
            "prediction": answers[0],
            "gold": it.gold,
            "correct": correct[0],
            "completion": completions[0],
        }
        if s.num_samples > 1:
            row.update(
                num_correct=sum(correct),
                samples=[
                    {"prediction": a, "correct": c, "completion": t} for a, c, t in zip(answers, correct, completions)
                ],
            )
        predictions.append(row)
    return summarize(ds, predictions, s.num_samples)


def summarize(ds: Dataset, predictions: list[dict], n_samples: int) -> DatasetResult:
    n = len(predictions)
    first = sum(p["correct"] for p in predictions) / n if n else None
    if n_samples == 1:
        return DatasetResult(ds.name, ds.path, ds.format, "accuracy", first, n, predictions=predictions)
    avg = sum(p["num_correct"] / n_samples for p in predictions) / n if n else None
    any_right = sum(p["num_correct"] > 0 for p in predictions) / n if n else None
    extra = {"pass@1": first, f"pass@{n_samples}": any_right, "num_samples": n_samples}
    return DatasetResult(ds.name, ds.path, ds.format, f"avg@{n_samples}", avg, n, extra, predictions)
