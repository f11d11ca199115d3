"""The ASFT paper's comparison in miniature: sft, dft, sft_kl, asft and iw_sft on the same data, budget and seed.

Model: the embedded SmolLM2-135M-Instruct, full fine-tuning in float32 on CPU. Task: `reasoning_task.py`
(multi-step arithmetic word problems with worked solutions ending in \\boxed{}; held-out problems never seen in
training). Every run logs `kl` to the base model at every step (`--monitor_kl` for sft / dft; the other modes
have a reference anyway) and is evaluated on the held-out problems during training (`--eval_task math`, greedy,
math-verify). After training, drift is measured with `asft eval --task drift` on two sets:

- task:     the held-out problems with their worked solutions (KL to the base on the task's own text);
- off-task: generic instructions this script writes, answered by the *base model itself* (greedy): the KL and
            NLL increase there measure how much of its original behaviour each run kept.

Everything a run writes stays: `<output_dir>/task/` (train.jsonl, test.jsonl, test_pairs.jsonl, offtask.jsonl),
`<output_dir>/runs/<mode>/` (final model, metrics.jsonl, eval_task/, eval-drift-task/, eval-drift-offtask/),
`<output_dir>/base/` (the base model's held-out evaluation), `<output_dir>/report/` (`asft compare`, figures).

    PYTHONPATH=src python benchmarks/replicate.py [--output_dir outputs/replicate] [--quick] [--reuse]

The printed claims (each `yes` or `no`, whatever this run shows; the task is never tuned to make one hold):
  (a) DFT's final KL to the base (task set) is at least twice ASFT's;
  (b) ASFT's held-out accuracy is at least DFT's and SFT's;
  (c) ASFT's off-task drift (KL to the base, off-task set) is lower than DFT's.
Last line: `claim_a=yes|no claim_b=yes|no claim_c=yes|no`. Printed, never asserted. With `--seeds 0,1,2` every mode
runs once per seed, the table shows the seeds' mean +- std, and each claim is decided against the seeds' spread
(`asft.reporting.separated`): a difference no larger than it is `not separated`, never `yes`.

Budget: the defaults are sized for about 40 minutes on an idle 2-core machine (32 steps x 8 examples of ~150
tokens per mode, 64 held-out problems evaluated at steps 16 and 32); the total is printed. `--quick` runs the
whole pipeline on a few examples (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SRC))

from asft.cli.args import flags_to_argv  # noqa: E402
from asft.objectives import uses_kl  # noqa: E402
from asft.reporting import spread  # noqa: E402
from reasoning_task import INSTRUCTION, write_task  # noqa: E402

MODES = ("sft", "dft", "sft_kl", "asft", "iw_sft")
MODEL = "embedded:smollm2-135m-instruct"

# Generic instructions, far from arithmetic: the base model's own answers to them are the off-task set.
OFF_TASK = [
    "Give three tips for staying healthy.",
    "Describe the water cycle in simple terms.",
    "Write a short poem about the sea.",
    "Explain what a computer virus is.",
    "Suggest a name for a small bakery and say why.",
    "What are the benefits of reading books?",
    "Write a polite email declining a meeting invitation.",
    "Explain the difference between weather and climate.",
    "List some ways to reduce household waste.",
    "Describe a typical morning routine.",
    "Why is sleep important for people?",
    "Write a two-sentence story about a lost key.",
    "Explain how a bicycle works.",
    "What should someone pack for a weekend camping trip?",
    "Give advice to a student starting at a new school.",
    "Describe the taste of a lemon to someone who never had one.",
    "Explain what photosynthesis is.",
    "Write a thank-you note to a neighbour.",
    "What are some good habits for working from home?",
    "Describe the city of Paris in a few sentences.",
    "Explain why the sky looks blue.",
    "Suggest three hobbies for a rainy day.",
    "How can someone become a better listener?",
    "Write a short product description for a wooden chair.",
    "Explain what a library is for.",
    "Describe how to make a cup of tea.",
    "What makes a good friend?",
    "Explain the rules of tic-tac-toe.",
    "Give a short summary of why exercise matters.",
    "Describe autumn to a child.",
    "Write a haiku about mountains.",
    "Explain what recycling means.",
]


def settings(a) -> dict:
    common = dict(lr=a.learning_rate, kl_weight=a.kl_weight, seed=a.seed, seeds=a.seeds)
    if a.quick:
        return dict(
            common,
            n_train=16,
            n_test=4,
            max_steps=2,
            batch=2,
            eval_steps=1,
            max_new_tokens=32,
            n_off_task=4,
            off_task_tokens=24,
        )
    size = dict(n_train=a.n_train, n_test=a.n_test, max_steps=a.max_steps, batch=a.batch_size, eval_steps=a.eval_steps)
    return dict(
        common, **size, max_new_tokens=a.max_new_tokens, n_off_task=len(OFF_TASK), off_task_tokens=a.off_task_tokens
    )


def asft(*args: str) -> None:
    """Run an `asft` command in-process (evaluations, reports); a failure stops the benchmark."""
    from asft.cli import main

    rc = main(list(args))
    if rc != 0:
        sys.exit(f"replicate: `asft {' '.join(args)}` failed with exit code {rc}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_sets(task_dir: Path, base: str, s: dict) -> dict[str, Path]:
    """The task files, the held-out problems as prompt/response pairs, and the base model's off-task answers."""
    paths = write_task(task_dir, n_train=s["n_train"], n_test=s["n_test"], seed=s["seed"], n_train_eval=s["n_test"])
    pairs = []
    for line in paths["test"].read_text().splitlines():
        row = json.loads(line)
        pairs.append({"instruction": f"{row['question']}\n{INSTRUCTION}", "response": row["answer"].split("\n####")[0]})
    paths["test_pairs"] = task_dir / "test_pairs.jsonl"
    write_jsonl(paths["test_pairs"], pairs)
    paths["offtask"] = task_dir / "offtask.jsonl"
    if not paths["offtask"].exists():
        write_jsonl(paths["offtask"], base_answers(base, OFF_TASK[: s["n_off_task"]], s["off_task_tokens"]))
    return paths


def base_answers(base: str, instructions: list[str], max_new_tokens: int) -> list[dict]:
    """The base model's greedy answers, generated with `asft eval`'s own prompt rendering and backend."""
    from asft.data.templates import encode_prompt, render_prompt, resolve_template
    from asft.evaluation.generation import GenSettings, HFBackend
    from asft.models import load_model_and_tokenizer as load_model

    print(f"Generating the base model's answers to {len(instructions)} off-task instructions ...", flush=True)
    model, tokenizer = load_model(base, device="cpu")
    template = resolve_template("auto", tokenizer)
    backend, rows = HFBackend(model, tokenizer), []
    for start in range(0, len(instructions), 8):
        batch = instructions[start : start + 8]
        prompts = [encode_prompt(render_prompt(i, template, tokenizer), tokenizer) for i in batch]
        for instruction, [answer] in zip(batch, backend.generate(prompts, GenSettings(max_new_tokens=max_new_tokens))):
            if answer.strip():
                rows.append({"instruction": instruction, "response": answer.strip()})
    return rows


def train(mode: str, base: str, paths: dict, out: Path, s: dict, seed: int | None = None) -> float:
    """`asft train` in a child process (a fresh interpreter per mode: nothing carries over between runs)."""
    run = dict(model_name_or_path=base, data_path=paths["train"], output_dir=out)
    objective = dict(
        mode=mode, kl_weight=s["kl_weight"] if uses_kl(mode) else None, monitor_kl=True
    )  # others refuse it
    budget = dict(max_steps=s["max_steps"], per_device_train_batch_size=s["batch"], learning_rate=s["lr"])
    schedule = dict(lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_strategy="no")
    quiet = dict(seed=s["seed"] if seed is None else seed, use_cpu=True, disable_tqdm=True, report_to="none")
    evaluation = dict(eval_task="math", eval_task_data=paths["test"], eval_task_steps=s["eval_steps"])
    evaluation.update(eval_task_max_new_tokens=s["max_new_tokens"], eval_task_batch_size=16)
    argv = [sys.executable, *"-m asft.cli train".split(), *flags_to_argv(run), "--overwrite_output_dir"]
    argv += flags_to_argv({**objective, **budget, **schedule, **quiet, **evaluation})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    print(f"\n=== {mode}: {s['max_steps']} steps x {s['batch']} examples ===", flush=True)
    start = time.time()
    subprocess.run(argv, check=True, env=env)
    return time.time() - start


def drift(model: Path, base: str, data: Path, out: Path) -> dict:
    what = dict(task="drift", model=model, base_model=base, data=data, output_dir=out)
    asft("eval", *flags_to_argv(what), "--overwrite", "--quiet")
    [r] = json.loads((out / "results.json").read_text())["datasets"].values()
    return {"kl": r["value"], "nll": r["nll"], "ref_nll": r["ref_nll"]}


def last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r and "train_runtime" not in r]
    return values[-1] if values else None


def measure(mode: str, run: Path, base: str, paths: dict) -> dict:
    from asft.reporting import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    task = drift(run, base, paths["test_pairs"], run / "eval-drift-task")
    off = drift(run, base, paths["offtask"], run / "eval-drift-offtask")
    return {
        "mode": mode,
        "accuracy": last(records, "math/test/accuracy"),
        "train_kl": last(records, "kl"),
        "task_kl": task["kl"],
        "offtask_kl": off["kl"],
        "offtask_nll_increase": off["nll"] - off["ref_nll"],
        "accuracy_by_step": {r["step"]: r["math/test/accuracy"] for r in records if "math/test/accuracy" in r},
    }


def fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def claims(rows: dict[str, dict], per_seed: dict[str, list[dict]] | None = None) -> dict[str, str]:
    """The three claims, each `yes` or `no`; with several seeds decided against their spread (asft.reporting.separated):
    a difference no larger than the seeds' spread is `not separated`, never `yes`."""

    def yes(cond):
        return "yes" if cond else "no"

    a, d, s = rows.get("asft"), rows.get("dft"), rows.get("sft")
    out = {}
    if per_seed and len(next(iter(per_seed.values()))) > 1:
        from asft.reporting import separated

        def vals(mode, key, factor=1.0):
            return [factor * r[key] for r in per_seed.get(mode, [])]

        if a and d:
            out["claim_a"] = separated(vals("dft", "task_kl"), vals("asft", "task_kl", 2.0))
            out["claim_c"] = separated(vals("dft", "offtask_kl"), vals("asft", "offtask_kl"))
        if a and d and s:
            both = [separated(vals("asft", "accuracy"), vals(m, "accuracy")) for m in ("dft", "sft")]
            out["claim_b"] = "no" if "no" in both else ("yes" if all(v == "yes" for v in both) else "not separated")
        return {k: out.get(k, "n/a") for k in ("claim_a", "claim_b", "claim_c")}
    if a and d:
        out["claim_a"] = yes(d["task_kl"] >= 2 * a["task_kl"])
        out["claim_c"] = yes(a["offtask_kl"] < d["offtask_kl"])
    if a and d and s:
        out["claim_b"] = yes(a["accuracy"] >= d["accuracy"] and a["accuracy"] >= s["accuracy"])
    return {k: out.get(k, "n/a") for k in ("claim_a", "claim_b", "claim_c")}


def mean_rows(per_seed: dict[str, list[dict]]) -> dict[str, dict]:
    """Per mode, the seeds' mean of every numeric measure (the per-step accuracies of the first seed)."""
    rows = {}
    for mode, results in per_seed.items():
        row = dict(results[0])
        for key in ("accuracy", "train_kl", "task_kl", "offtask_kl", "offtask_nll_increase"):
            s = spread([r[key] for r in results if r.get(key) is not None])
            row[key] = s["mean"]
            if len(results) > 1 and s["n"] > 1:
                row[key + "_std"] = s["std"]
        rows[mode] = row
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/replicate")
    p.add_argument("--quick", action="store_true", help="smoke test: a few examples and steps (numbers mean nothing)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs already finished in output_dir with the same "
        "settings (after an interruption) instead of retraining them",
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--n_train", type=int, default=256)
    p.add_argument("--n_test", type=int, default=64)
    p.add_argument("--max_steps", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_steps", type=int, default=16, help="in-training held-out evaluation every N steps")
    p.add_argument("--max_new_tokens", type=int, default=128, help="held-out evaluation: tokens per answer")
    p.add_argument("--off_task_tokens", type=int, default=96, help="length of the base model's off-task answers")
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--kl_weight", type=float, default=0.05, help="sft_kl / asft (the paper's main runs: 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds (e.g. 0,1,2): every mode runs once per seed (runs/<mode>/seed-<s>), "
        "the table shows mean +- std and the claims are decided against the seeds' spread (default: --seed only)",
    )
    a = p.parse_args()
    a.seeds = [int(x) for x in a.seeds.split(",") if x.strip()] if a.seeds else None
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    s = settings(a)
    start = time.time()

    from asft.models import resolve_model_path

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "replicate_settings.json"
    reuse = a.reuse and stored.exists() and json.loads(stored.read_text()) == s
    stored.write_text(json.dumps(s, indent=2) + "\n")
    base = resolve_model_path(MODEL)
    print(f"Model: {MODEL} -> {base}\nSettings: {json.dumps(s)}", flush=True)
    if not reuse and (out / "task" / "offtask.jsonl").exists():
        (out / "task" / "offtask.jsonl").unlink()
    paths = write_sets(out / "task", base, s)

    base_eval = out / "base"
    if not (reuse and (base_eval / "results.json").exists()):
        asft(
            *"eval --task math --model".split(),
            base,
            "--data",
            str(paths["test"]),
            "--output_dir",
            str(base_eval),
            "--max_new_tokens",
            str(s["max_new_tokens"]),
            *"--batch_size 16 --overwrite --quiet".split(),
        )
    [base_result] = json.loads((base_eval / "results.json").read_text())["datasets"].values()

    seeds = s["seeds"] or [s["seed"]]
    per_seed, seconds = {}, {}
    run_dirs = {(m, seed): out / "runs" / m / (f"seed-{seed}" if s["seeds"] else "") for m in modes for seed in seeds}
    first_seed = [str(run_dirs[m, seeds[0]]) for m in modes]  # the figures show one run per mode
    for mode in modes:
        for seed in seeds:
            run = run_dirs[mode, seed]
            if not (reuse and (run / "model.safetensors").exists() and (run / "metrics.jsonl").exists()):
                seconds[mode] = seconds.get(mode, 0.0) + train(mode, base, paths, run, s, seed)
            per_seed.setdefault(mode, []).append(measure(mode, run, base, paths))
    rows = mean_rows(per_seed)

    report = out / "report"
    asft(
        "compare",
        *[str(r) for r in run_dirs.values()],
        str(base_eval),
        "--output_dir",
        str(report),
        *"--metrics loss nll kl mean_prob math/test/accuracy".split(),
    )
    asft("plot", *first_seed, *"--metrics math/test/accuracy kl --output".split(), str(report / "figure1.png"))
    asft(
        "plot",
        "--kind",
        "probs",
        MODEL,
        *first_seed,
        "--data",
        str(paths["test_pairs"]),
        "--output",
        str(report / "figure4_probs.png"),
    )
    (out / "replicate_results.json").write_text(
        json.dumps(
            {
                "settings": s,
                "base_accuracy": base_result["value"],
                "rows": rows,
                "per_seed": per_seed,
                "train_seconds": seconds,
            },
            indent=2,
        )
    )

    print(
        f"\nHeld-out problems: {s['n_test']}; training: {s['max_steps']} steps x {s['batch']} examples, lr "
        f"{s['lr']}, kl_weight {s['kl_weight']}, seeds {','.join(map(str, seeds))}; base model accuracy "
        f"{fmt(base_result['value'])}"
    )
    print(
        "\n| mode | held-out accuracy | KL to base, task | KL to base, off-task | off-task NLL increase | "
        "train kl (last step) | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        acc = fmt(r["accuracy"]) + (f" +- {fmt(r['accuracy_std'])}" if "accuracy_std" in r else "")
        print(
            f"| {mode} | {acc} | {fmt(r['task_kl'])} | {fmt(r['offtask_kl'])} | "
            f"{fmt(r['offtask_nll_increase'])} | {fmt(r['train_kl'])} | {fmt(seconds.get(mode), '.0f')} |"
        )
    print(f"\nReport: {report / 'report.md'}; figures: {report / 'figure1.png'}, {report / 'figure4_probs.png'}")
    print(f"Total time: {time.time() - start:.0f} s")
    c = claims(rows, per_seed)
    a_, d_, s_ = rows.get("asft", {}), rows.get("dft", {}), rows.get("sft", {})
    print(
        f"(a) DFT's KL to the base on the task set ({fmt(d_.get('task_kl'))}) >= 2 x ASFT's "
        f"({fmt(a_.get('task_kl'))}): {c['claim_a']}"
    )
    print(
        f"(b) ASFT's held-out accuracy ({fmt(a_.get('accuracy'))}) >= DFT's ({fmt(d_.get('accuracy'))}) and "
        f"SFT's ({fmt(s_.get('accuracy'))}): {c['claim_b']}"
    )
    print(
        f"(c) ASFT's off-task KL to the base ({fmt(a_.get('offtask_kl'))}) < DFT's ({fmt(d_.get('offtask_kl'))}): "
        f"{c['claim_c']}"
    )
    print(" ".join(f"{k}={v}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
