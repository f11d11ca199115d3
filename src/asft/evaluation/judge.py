"""AlpacaEval-style judging: generate answers to instructions, then compare them pairwise with reference outputs
using any OpenAI-compatible chat endpoint as the judge.

Input: alpaca_eval's format, a JSON list or JSONL of {"instruction", "output" (the reference), "generator",
"dataset"}; "input" is appended to the instruction when present. References may come instead from
--reference_outputs (alpaca_eval format), matched by instruction text.

Each pair is judged twice, the model's output first and then second, and the item scores the mean of the two
verdicts (1 = model better both times, 0.5 = split, 0 = reference better both times): a judge that always
prefers one position scores every item 0.5, so position bias cancels. The judge is asked to answer "1" or "2"
(JUDGE_PROMPT); the first standalone 1 or 2 in its reply is taken, and a reply with none counts as malformed
and is retried. The win rate is the mean item score with a percentile-bootstrap 95% interval. An item whose
judgments fail after retries is listed in results.json under "failed" and left out of the win rate, never
counted as a win or a loss. Verdicts are cached in judgments.jsonl, keyed by the exact request.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from ..data.formats import Row
from ..data.templates import encode_prompt, render_prompt
from ..errors import DataError, EvalError, JudgeFailure
from ..io import write_json
from .datafiles import Dataset, Item, file_rows, require
from .generation import GenSettings
from .judge_http import JudgeClient
from .report import DatasetResult
from .store import JUDGMENTS, JsonlLog

NAME = "judge"
JUDGE_SYSTEM = "You are a careful, impartial judge of the answers AI assistants give to instructions."
JUDGE_PROMPT = """Which of the two outputs below follows the instruction better? Consider helpfulness, correctness, \
and clarity. The order of the outputs and their length must not influence you.

## Instruction
{instruction}

## Output 1
{output_1}

## Output 2
{output_2}

Answer with a single character: 1 if Output 1 is better, 2 if Output 2 is better."""
ORDERS = ("model_first", "reference_first")
_VERDICT = re.compile(r"(?<![\w.])([12])(?![\w.])")


# ------------------------------------------------------------------------------------------------------- files


def _references(path: str) -> dict[str, str]:
    refs = {}
    for row in file_rows(path):
        refs[require(row, "instruction")] = require(row, "output")
    return refs


def _parse(row: Row, index: int, refs: dict[str, str] | None) -> Item:
    instruction = require(row, "instruction")
    extra = row.data.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(row.source, row.line, "input", "expected a string")
    if refs is not None:
        if instruction not in refs:
            raise DataError(
                row.source, row.line, "instruction", "no reference output for this instruction in --reference_outputs"
            )
        reference = refs[instruction]
    elif "output" in row.data:
        reference = require(row, "output")
    else:
        raise DataError(
            row.source,
            row.line,
            "output",
            "missing: the reference output to compare against (or pass --reference_outputs)",
        )
    return Item(
        index, row.line, prompt=instruction, gold=reference, meta={"input": extra, "dataset": row.data.get("dataset")}
    )


def load(path: str, args=None) -> tuple[str, list[Item]]:
    refs = _references(args.reference_outputs) if args is not None and args.reference_outputs else None
    rows = file_rows(path)
    if "instruction" not in rows[0].data:
        keys = ", ".join(sorted(rows[0].data)) or "none"
        raise DataError(path, rows[0].line, "instruction", f"missing (keys: {keys}); expected alpaca_eval's format")
    return "alpaca_eval", [_parse(row, i, refs) for i, row in enumerate(rows)]


# ------------------------------------------------------------------------------------------------- the judge


def api_key(args) -> str | None:
    """The judge's key, from the environment variable --judge_api_key_env names (never from a flag or a file)."""
    key = os.environ.get(args.judge_api_key_env) or None
    if key is None and args.judge_model and urlparse(args.judge_base_url).hostname == "api.openai.com":
        raise EvalError(
            f"--judge_base_url {args.judge_base_url} needs an API key in the environment variable "
            f"{args.judge_api_key_env} (see --judge_api_key_env), which is not set"
        )
    return key


def check_args(args) -> None:
    if urlparse(args.judge_base_url).scheme not in ("http", "https"):
        raise EvalError(f"--judge_base_url: expected an http(s) URL, got {args.judge_base_url!r}")
    if args.num_samples != 1:
        raise EvalError("--num_samples: the judge task compares one output per instruction; use 1")
    if args.judge_model:
        api_key(args)


def parse_verdict(text: str) -> int:
    match = _VERDICT.search(text.strip())
    if not match:
        raise ValueError("no verdict (expected 1 or 2)")
    return int(match.group(1))


def judge_messages(instruction: str, output_1: str, output_2: str) -> list[dict]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, output_1=output_1, output_2=output_2)},
    ]


def _request(client: JudgeClient, instruction: str, model_output: str, reference: str, order: str):
    pair = (model_output, reference) if order == "model_first" else (reference, model_output)
    messages = judge_messages(instruction, *pair)
    key = hashlib.sha256(json.dumps([client.base_url, client.model, messages]).encode()).hexdigest()
    return key, messages


def judge_pairs(
    client: JudgeClient,
    pairs: list[tuple[str, str, str]],
    *,
    cache: JsonlLog | None = None,
    concurrency: int = 4,
    progress: bool = False,
) -> list[dict]:
    """Judge (instruction, model_output, reference) pairs in both orders.

    Returns per pair {"score": 1 | 0.5 | 0 | None, "verdicts": {order: "model" | "reference"}, "errors": {...}}.
    """
    from tqdm.auto import tqdm

    cached = {r["key"]: r["winner"] for r in (cache.read() if cache else [])}
    jobs = [(i, order, *_request(client, *pair, order)) for i, pair in enumerate(pairs) for order in ORDERS]
    todo = [j for j in jobs if j[2] not in cached]

    def one(job):
        i, order, key, messages = job
        try:
            verdict = client.ask(messages, parse_verdict)
        except JudgeFailure as e:
            return job, None, str(e)
        return job, "model" if (verdict == 1) == (order == "model_first") else "reference", None

    results = {j[2]: (cached[j[2]], None) for j in jobs if j[2] in cached}
    with (
        ThreadPoolExecutor(max(1, concurrency)) as pool,
        tqdm(
            total=len(jobs),
            initial=len(jobs) - len(todo),
            desc="judge",
            unit="judgment",
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        for job, winner, error in pool.map(one, todo):
            results[job[2]] = (winner, error)
            if cache and winner:  # written here, in one thread; failures are not cached: a rerun retries them
                cache.append([{"key": job[2], "winner": winner}])
            bar.update(1)
    per_pair = [[] for _ in pairs]
    for i, order, key, _ in jobs:
        per_pair[i].append((order, *results[key]))
    return [_combine(judged) for judged in per_pair]


def _combine(judged: list[tuple[str, str | None, str | None]]) -> dict:
    verdicts = {order: winner for order, winner, _ in judged if winner}
    errors = {order: error for order, _, error in judged if error}
    score = None if errors else sum(w == "model" for w in verdicts.values()) / len(verdicts)
    return {"score": score, "verdicts": verdicts, "errors": errors}


def bootstrap_ci(scores: list[float], samples: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean."""
    if not scores:
        return None, None
    rng, n = random.Random(seed), len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(samples))
    low = means[int((1 - level) / 2 * samples)]
    high = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return low, high


# ------------------------------------------------------------------------------------------------------ running


def gen_settings(args) -> GenSettings:
    return GenSettings(args.max_new_tokens, args.temperature, args.top_p, 1, args.seed)


def settings(args) -> dict:
    return vars(gen_settings(args))  # the judge prompt is not here: verdicts are cached by exact request


def generate(run, batch: list[Item], s: GenSettings) -> list[list[dict]]:
    prompts = [
        encode_prompt(render_prompt(it.prompt, run.template, run.tokenizer, it.meta["input"]), run.tokenizer)
        for it in batch
    ]
    return [[{"completion": texts[0].strip()}] for texts in run.backend.generate(prompts, s)]


def generator_name(args) -> str:
    return args.generator or Path(str(args.model).rstrip("/")).name


def evaluate(run, ds: Dataset) -> DatasetResult:
    s, args = gen_settings(run.args), run.args
    outputs = run.complete(ds, ds.items, lambda batch: generate(run, batch, s), length=lambda it: len(it.prompt))
    answers = [outputs[it.index][0]["completion"] for it in ds.items]
    result = DatasetResult(ds.name, ds.path, ds.format, "win_rate", None, 0)
    result.extra = {
        "mean_length_model": _mean_len(answers),
        "mean_length_reference": _mean_len([it.gold for it in ds.items]),
        "n_items": len(ds.items),
    }
    result.predictions = [
        {"index": it.index, "instruction": it.prompt, "prediction": a, "gold": it.gold, "correct": None}
        for it, a in zip(ds.items, answers)
    ]
    write_model_outputs(run, ds, answers)  # before judging: the answers are kept even if the judge fails
    if args.judge_model:
        _score(run, ds, result, answers)
    else:
        result.extra["judged"] = False
    return result


def _mean_len(texts: list[str]) -> float | None:
    return sum(len(t) for t in texts) / len(texts) if texts else None


def _score(run, ds: Dataset, result: DatasetResult, answers: list[str]) -> None:
    args = run.args
    client = JudgeClient(
        args.judge_base_url,
        args.judge_model,
        api_key(args),
        max_retries=args.judge_max_retries,
        retry_delay=args.judge_retry_delay,
        timeout=args.judge_timeout,
    )
    pairs = [
        ((it.prompt + (f"\n\n{it.meta['input']}" if it.meta["input"].strip() else "")), a, it.gold)
        for it, a in zip(ds.items, answers)
    ]
    judged = judge_pairs(
        client,
        pairs,
        cache=JsonlLog(run.store.dir / JUDGMENTS),
        concurrency=args.judge_concurrency,
        progress=not args.quiet,
    )
    failed = []
    for p, j in zip(result.predictions, judged):
        p.update(correct=j["score"], verdicts=j["verdicts"])
        if j["errors"]:
            p["errors"] = j["errors"]
            failed.append({"index": p["index"], "errors": j["errors"]})
    scores = [j["score"] for j in judged if j["score"] is not None]
    low, high = bootstrap_ci(scores, args.bootstrap_samples, args.seed)
    agree = [len(set(j["verdicts"].values())) == 1 for j in judged if j["score"] is not None]
    result.value = sum(scores) / len(scores) if scores else None
    result.n = len(scores)
    result.extra.update(
        ci_low=low,
        ci_high=high,
        ci_level=0.95,
        n_failed=len(failed),
        failed=failed,
        position_agreement=sum(agree) / len(agree) if agree else None,
        judge_model=args.judge_model,
        judge_base_url=args.judge_base_url,
    )
    if failed:
        print(
            f"judge {ds.name}: {len(failed)} item(s) could not be judged and are left out of the win rate "
            f"(listed under 'failed' in results.json)",
            file=sys.stderr,
        )


def write_model_outputs(run, ds: Dataset, answers: list[str]) -> None:
    """model_outputs.json in alpaca_eval's format: every dataset of this run in one list, told apart by the
    "dataset" field as alpaca_eval does."""
    name = generator_name(run.args)
    rows = run.state.setdefault("model_outputs", [])
    rows += [
        {"instruction": it.prompt, "output": a, "generator": name, "dataset": it.meta["dataset"] or ds.name}
        for it, a in zip(ds.items, answers)
    ]
    write_json(run.store.dir / "model_outputs.json", rows)


def finish(run, datasets: list[Dataset], results: list[DatasetResult]) -> None:
    if not run.args.judge_model:
        print(
            f"No --judge_model: answers are in {run.store.dir / 'model_outputs.json'} (alpaca_eval's format), not "
            "judged; rerun with --judge_model to judge them without generating again",
            file=sys.stderr,
        )
