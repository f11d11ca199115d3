"""The one evaluation driver, used by `asft eval`, evaluation during training and code grading.

Order of work: flags, backend availability, every data file validated, the tokenizer, the resume store; the
model is loaded only when something is left to compute. Results go to DIR/results.json (per dataset: metric,
value, n; a macro average; the model, task and settings) and DIR/predictions.jsonl (one line per item), and a
markdown table is printed.
"""

from __future__ import annotations

import argparse
import sys

from ..data.templates import ALPACA_NOTE, TEMPLATES, resolve_template
from ..errors import EvalError
from ..models import (
    BACKENDS,
    DTYPE_NAMES,
    adapter_base,
    check_backend,
    is_adapter_dir,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from . import code, drift, judge, medical
from . import math as math_task
from .datafiles import load_datasets
from .report import print_report, write_results
from .runner import Run
from .store import Store

TASKS = {"medical": medical, "math": math_task, "judge": judge, "drift": drift, "code": code}
DEFAULT_MAX_NEW_TOKENS = {"math": 2048, "judge": 1024}
DEFAULT_BATCH_SIZE = {"hf": 8, "vllm": 256}  # vLLM batches internally: this is only how often results are saved


class _HelpFormatter(argparse.HelpFormatter):
    """Show a flag's default when it has a meaningful one and the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asft eval",
        formatter_class=_HelpFormatter,
        description="Evaluate a model (or a LoRA adapter) on medical multiple choice, math, AlpacaEval-style "
        "judging, or drift from its base. Writes DIR/results.json and DIR/predictions.jsonl and prints a "
        "markdown table; a rerun into the same DIR reuses finished work.",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument(
        "--model",
        default=None,
        help="model folder, hub id, .gguf file, or LoRA adapter folder "
        "(applied to its base); required unless --task code --samples",
    )
    g.add_argument(
        "--base_model",
        default=None,
        help="base model: for an adapter, the base to apply it to "
        "(default: the adapter's base_model_name_or_path); for --task drift, the reference",
    )
    g.add_argument(
        "--task",
        required=True,
        choices=sorted(TASKS),
        help="medical: option-letter accuracy; math: "
        "generated answers graded by math-verify; judge: pairwise win rate against reference outputs; "
        "drift: KL(reference || model) and NLL per response token; code: programs run against their "
        "tests in a sandbox, pass@k",
    )
    g.add_argument(
        "--data", required=True, help="data file(s), comma-separated (JSONL, JSON or parquet); format detected per file"
    )
    g.add_argument(
        "--output_dir", required=True, help="where results.json, predictions.jsonl and the stored generations go"
    )
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each file")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard results stored in --output_dir by a run with other settings, instead of refusing",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    g = p.add_argument_group("model and backend")
    g.add_argument(
        "--backend", default="hf", choices=BACKENDS, help="hf: transformers; vllm: a GPU, pip install 'asft[vllm]'"
    )
    g.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="items per batch (default: 8 with hf; with vllm, 256 items between saves)",
    )
    g.add_argument(
        "--template",
        default="auto",
        choices=list(TEMPLATES),
        help="prompt wrapping: alpaca (the "
        "paper's evaluation prompt, which ends '### Response:' plus a newline, unlike its training prompt "
        "that asft train renders), chat (the tokenizer's chat template, one user turn), none (raw), "
        "auto (chat when the "
        "tokenizer has a chat template, else alpaca)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_NAMES],
        help="weights' dtype; auto: float32 on CPU, bfloat16 (else float16) on GPU",
    )
    g.add_argument("--device", default="auto", help="hf backend device: auto, cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--merge_adapter",
        action="store_true",
        help="merge a LoRA adapter into its base after loading (faster generation with hf)",
    )
    g.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code to run")
    g.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm: share of GPU memory to use")
    g.add_argument("--tensor_parallel_size", type=int, default=1, help="vllm: GPUs to shard the model over")
    g.add_argument("--max_model_len", type=int, default=None, help="vllm: context length (default: the model's)")

    g = p.add_argument_group("generation (math, judge)")
    g.add_argument("--max_new_tokens", type=int, help="tokens to generate per answer (default: math 2048, judge 1024)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding; > 0 samples")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (when sampling)")
    g.add_argument(
        "--num_samples",
        type=int,
        default=1,
        help="math: samples per problem; > 1 reports avg@n "
        "(mean accuracy over samples), pass@1 (first sample) and pass@n; code: samples for pass@k",
    )
    g.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    g.add_argument("--math_timeout", type=int, default=5, help="math: seconds per math-verify parse or comparison")

    g = p.add_argument_group("judge")
    g.add_argument(
        "--reference_outputs",
        default=None,
        help="alpaca_eval-format file of reference outputs, matched by instruction (default: each row's 'output')",
    )
    g.add_argument(
        "--judge_base_url",
        default="https://api.openai.com/v1",
        help="OpenAI-compatible endpoint (.../v1; /chat/completions is appended)",
    )
    g.add_argument(
        "--judge_model",
        default=None,
        help="judge model name; without it, answers and model_outputs.json are written but not judged",
    )
    g.add_argument(
        "--judge_api_key_env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key (the key itself is never printed or stored)",
    )
    g.add_argument(
        "--judge_max_retries",
        type=int,
        default=5,
        help="retries per judgment on 429, 5xx, timeouts and malformed replies",
    )
    g.add_argument(
        "--judge_retry_delay", type=float, default=1.0, help="first retry delay in seconds; doubles each retry"
    )
    g.add_argument("--judge_timeout", type=float, default=120.0, help="seconds to wait for one judge reply")
    g.add_argument("--judge_concurrency", type=int, default=4, help="judge requests in flight at once")
    g.add_argument(
        "--bootstrap_samples", type=int, default=1000, help="resamples for the win rate's 95%% confidence interval"
    )
    g.add_argument(
        "--generator", default=None, help="generator name in model_outputs.json (default: the model folder's name)"
    )

    code.add_arguments(p)

    g = p.add_argument_group("drift")
    g.add_argument("--max_length", type=int, help="truncate prompt+response to this many tokens (--model_max_length)")
    return p


def check_args(args) -> None:
    if args.model is None and not (args.task == "code" and args.samples):
        raise EvalError("--model is required (only --task code --samples FILE grades without a model)")
    if args.samples and args.task != "code":
        raise EvalError("--samples grades given completions with --task code only")
    for flag in (
        "limit",
        "batch_size",
        "max_new_tokens",
        "num_samples",
        "judge_concurrency",
        "bootstrap_samples",
        "max_length",
        "tensor_parallel_size",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag}: must be >= 1, got {value}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise EvalError("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.num_samples > 1 and args.temperature == 0:
        raise EvalError("--num_samples > 1 needs --temperature > 0 (greedy samples would all be the same)")
    if args.judge_max_retries < 0 or args.judge_retry_delay < 0:
        raise EvalError("--judge_max_retries and --judge_retry_delay must be >= 0")
    check_backend(args.backend)
    if hasattr(TASKS[args.task], "check_args"):
        TASKS[args.task].check_args(args)


def fill_defaults(args) -> None:
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(args.task, 512)
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE[args.backend]


def fingerprint(args, template: str) -> dict:
    """Everything that changes what is stored: a rerun must match it to reuse finished work."""
    device = "cuda" if args.backend == "vllm" else resolve_device(args.device)
    path = resolve_model_path(args.model, args.trust_remote_code)
    base = args.base_model or (adapter_base(path) if is_adapter_dir(path) else None)
    return {
        "task": args.task,
        "model": model_identity(args.model),
        "base_model": model_identity(base),
        "template": template,
        "backend": args.backend,
        "dtype": str(resolve_dtype(args.dtype, device)),
        "merge_adapter": args.merge_adapter,
        **TASKS[args.task].settings(args),
    }


def evaluate(args) -> int:
    """`asft eval`: flags checked, every data file validated, the tokenizer, the resume store; the model is loaded
    only when something is left to compute."""
    check_args(args)
    fill_defaults(args)
    task = TASKS[args.task]
    if args.task == "code" and args.samples:
        return code.grade_samples(args)
    datasets = load_datasets(args.data, lambda path: task.load(path, args), args.limit)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code, base_model=args.base_model, padding_side="left")
    template = resolve_template(args.template, tokenizer)
    settings = fingerprint(args, template)
    store = Store(args.output_dir, settings, {ds.name: ds.sha256 for ds in datasets}, overwrite=args.overwrite)
    header = {
        "model": args.model,
        "base_model": args.base_model,
        "task": args.task,
        "backend": args.backend,
        "settings": {**settings, "limit": args.limit, "batch_size": args.batch_size},
    }
    if template == "alpaca":
        print(f"Template {ALPACA_NOTE}", file=sys.stderr)
    report = run_task(Run(args, tokenizer, template, store), datasets, header)
    print_report(report, store.dir)
    # A dataset with items but no score at all (every judgment failed) is a failed evaluation, not a result.
    unscored = [name for name, r in report["datasets"].items() if r.get("value") is None and r.get("n_failed")]
    if unscored:
        print(
            f"asft eval: error: {', '.join(unscored)}: every item failed ({args.task}); nothing was scored. "
            f"The errors are under 'failed' in {store.dir / 'results.json'}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_task(run: Run, datasets: list, header: dict) -> dict:
    """Evaluate `run.args.task` on every dataset (prepare, evaluate, finish), write results.json and
    predictions.jsonl into the store's folder, and return the report."""
    task = TASKS[run.args.task]
    if hasattr(task, "prepare"):
        task.prepare(run, datasets)
    results = [task.evaluate(run, ds) for ds in datasets]
    if hasattr(task, "finish"):
        task.finish(run, datasets, results)
    header = dict(header)
    if run.template == "alpaca":
        header["template_note"] = ALPACA_NOTE
    if hasattr(task, "report_header"):
        header.update(task.report_header(run))
    return write_results(run.store.dir, header, results)


def task_args(task: str, data: str, **settings):
    """The settings `asft eval` would build for a task (its parser's defaults, then `settings`), checked and
    completed: what evaluation during training runs with."""
    args = build_parser().parse_args(["--task", task, "--data", data, "--output_dir", "-"])
    for key, value in settings.items():
        if not hasattr(args, key):
            raise AttributeError(f"asft eval has no setting {key!r}")
        setattr(args, key, value)
    check_args(args)
    fill_defaults(args)
    return args
