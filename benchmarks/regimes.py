"""When does ASFT help? The regime map: objectives x tasks chosen by the base model's prior, with seeds' spread.

Model: the embedded SmolLM2-135M-Instruct, full fine-tuning in float32 on CPU, chat template. Tasks
(benchmarks/regimes_tasks.py, generated here, held-out items never in training): codeword, sentiment, arithmetic,
capitals. They were chosen by the prior diagnostic before any training, to span the prior from weak to strong and
leave the base model headroom. Measured before any training (48 training rows each, seed-0 split; held-out
accuracy: greedy, the answer alone on the first line, or the last \\boxed{} for arithmetic, 24-32 held-out items):

    PYTHONPATH=src python -m asft.cli data inspect TRAIN.jsonl --model embedded:smollm2-135m-instruct --prior

    task        mean p   median p   below 0.1   at/above 0.9   base held-out accuracy
    codeword    0.248    0.000      75.0%       25.0%          0.00
    capitals    0.469    0.271      42.9%       36.2%          0.00
    sentiment   0.559    0.751      33.3%       32.6%          0.00
    arithmetic  0.664    0.853      16.0%       44.2%          0.00

(Every response ends with <|im_end|>, which the base model finds improbable after a bare answer: it is part of
each task's low tail. Base accuracy is 0 everywhere because the base model answers in sentences: the headroom is
format and content together.)

Objectives: sft, dft, sft_kl, asft; the objective family (`--weight_floor`, `--weight_power 0.5`, prift) joins the
list by itself once `asft train` accepts it (PENDING_OBJECTIVES). On the weak task (the largest share below 0.1)
dft and asft also run with 4x the budget ("dft@4x", "asft@4x"). "sft->asft" (the SFT run's model, then ASFT for
half the budget, anchored to that model) runs on the task where asft loses most to sft. Seeds: 0, 1, 2 (the data
split is the same for every seed: runs differ only by the training seed). Per run: held-out accuracy, KL to the
base on the task (held-out pairs) and off-task (the base model's own answers to generic instructions), and the
per-bin table: held-out response tokens binned by the base model's p(y_t), per bin the mean p(y_t) after training.
The reference cache is built once per task and shared by every run with a reference. SFT's accuracy at half
the budget is measured too (from a checkpoint): the budget is on SFT's plateau when the two are not separated.

PREDICTIONS (committed before the first run of this script, full or --quick; decided against the seeds' spread):
  P1  sft's held-out accuracy is the highest or not separated from the highest on every task.
  P2  codeword (weak prior): dft and asft stay below sft, separated, at the default budget; with 4x the budget
      they close at least half of the gap to sft.
  P3  sentiment and capitals: asft is not separated from sft (it learns what the base model half-knows).
  P4  arithmetic: dft and asft stay far below sft (as in replicate.py), separated, although its mean p (0.664) is
      the highest of the four: the mean does not decide.
  P5  No single diagnostic number (mean p, median p, share below 0.1) orders the four tasks by where asft loses
      (arithmetic and codeword lose, at opposite ends of every one of them): the printed rule is `none`.
  P6  Mechanism: in the base [0, 0.1) bin, sft raises the mean p(y_t) at least twice as much as dft and asft do,
      on every task; in the [0.9, 1] bin every objective stays within 0.05 of the base.
  P7  sft_kl's accuracy is not separated from sft's, with a lower off-task KL; asft's off-task KL is the lowest.
  P8  sft->asft on the task where asft loses keeps sft's accuracy (not separated) at a lower off-task KL than sft.
RESULTS (the default run, 2026-12-06: `PYTHONPATH=src python benchmarks/regimes.py --output_dir outputs/regimes-full
--reuse` in one sitting, nothing reused; 72 runs in 4,631 s = 77 min on 2 idle cores, load average 1.8-1.9; then
the arithmetic check `--tasks arithmetic --objectives sft,dft,asft --grid_only`, 9 runs in 1,833 s = 31 min; neither
changed anything after its first run). Held-out accuracy, mean +- std over seeds 0, 1, 2:

    task        sft            dft            sft_kl         asft           floor0.1       p^0.5          prift
    codeword    0.625+-0.167   0.000+-0.000   0.639+-0.127   0.000+-0.000   0.472+-0.024   0.125+-0.217   0.000+-0.000
    capitals    0.333+-0.042   0.389+-0.064   0.389+-0.064   0.278+-0.064   0.375+-0.000   0.347+-0.087   0.375+-0.042
    sentiment   1.000+-0.000   1.000+-0.000   1.000+-0.000   1.000+-0.000   1.000+-0.000   1.000+-0.000   1.000+-0.000
    arithmetic  0.354+-0.065   0.031+-0.031   -              0.156+-0.083   -              -              -
    codeword, 4x budget: dft 0.000+-0.000, asft 0.000+-0.000; sft->asft 0.597+-0.241

  P1  held: sft is the highest or not separated from it on every task.
  P2  half held: on codeword dft and asft (0.000) are below sft (0.625), separated; but with 4x the budget they
      stay at 0.000: they closed none of the gap ("cannot learn" at this scale, not "learns slowly").
  P3  held, weakly: capitals asft 0.278 +- 0.064 against sft 0.333 +- 0.042, not separated; on sentiment every
      objective reached 1.000 in every seed, a ceiling that separates nothing.
  P4  held: on arithmetic dft (0.031 +- 0.031) and asft (0.156 +- 0.083) stay below sft (0.354 +- 0.065),
      separated, although its mean p (0.667) is the highest of the four.
  P5  held on the four tasks, failed on the default three. The default run printed `rule=asft loses to sft where
      frac_below_0.1 >= 0.589`: with codeword the only task where asft lost, and codeword at the far end of every
      number, any of them splits three tasks. With arithmetic (asft loses at 15.8% below 0.1, the fewest) the
      four-task map (`--tasks codeword,capitals,sentiment,arithmetic --objectives sft,dft,asft --grid_only --reuse`
      over both runs' folders) prints `rule=none`: no threshold on mean p, median p or the share below 0.1 splits
      the tasks where asft loses (codeword, arithmetic) from those where it does not (capitals, sentiment).
  P6  held on codeword only. In the base [0, 0.1) bin codeword's held-out tokens went from 0.0007 to 0.835 (sft)
      against 0.153 (dft) and 0.137 (asft); on capitals (0.022 -> sft 0.579, dft 0.606, asft 0.566) and sentiment
      (0.018 -> 1.000, 0.999, 0.941) the p-weighted rules moved the improbable tokens as far as sft did; on
      arithmetic (0.028 -> 0.953, 0.662, 0.668) less far, but more than half as far. The [0.9, 1]
      half failed on sentiment: every objective took that bin from 0.925 to 0.995 or more.
  P7  held on all three tasks: sft_kl's accuracy is not separated from sft's and its off-task KL is lower
      (codeword 0.164 +- 0.012 against 0.478 +- 0.014); asft's off-task KL is the lowest (0.023, 0.097, 0.040:
      a twentieth to a half of sft's; on codeword it learned nothing, so its low drift there costs nothing to have).
  P8  half held: sft->asft on codeword keeps sft's accuracy (0.597 +- 0.241, not separated); its off-task KL is
      lower in the mean (0.363 +- 0.126 against 0.478 +- 0.014) but not separated.
  SFT's plateau (its accuracy at half the budget, from a checkpoint): codeword 0.472 +- 0.024 at 12 steps against
  0.625 +- 0.167 at 24, not separated (a plateau, with a wide spread); sentiment 1.000 at both; capitals 0.444 +-
  0.024 at 12 steps against 0.333 +- 0.042 at 24: SFT was past its peak at the default budget (every objective
  sees its 48 facts 4 times), so capitals compares the objectives past their best. arithmetic: 0.312 +- 0.031 at
  16 steps against 0.354 +- 0.065 at 32, a plateau.
  Noticed after the run (a hypothesis for a next study, not a finding): what stalls dft and asft on codeword is
  not the share of tokens below 0.1 but how far below: its low tokens sit at 1e-9 to 1e-4 (median 8.6e-5), and the
  diagnostic's weight table gives them 0.0009 of SFT's weight, against 0.02-0.03 on the other tasks; a floor of
  0.1 (0.1 of SFT's weight) learned codeword, p^0.5 (0.016) did in one seed of three. Arithmetic breaks that
  too (0.029 of SFT's weight, the most of the four, and dft and asft lose), but in its own way: its 1,377 low
  tokens are 11 per answer, and dft / asft raised them to 0.66 where sft reached 0.95 (per-bin table), which over
  eleven tokens a correct answer needs compounds to a wrong one. The diagnostic's one number that splits all four
  tasks is the NLL of a whole response under the base model (`mean_response_nll`, added after this run): 37.7 and
  65.6 nats where dft / asft lost, 10.6 and 4.4 where they matched sft. Four tasks, found after the fact: a
  hypothesis to test on new tasks, not a rule.

Output in --output_dir: tasks/<task>/ (train.jsonl, test.jsonl, cache/), runs/<task>/<objective>/seed-<s>/,
regimes.md (mean +- std per task x objective), regimes.png (held-out accuracy against the diagnostic's share of
tokens below 0.1, one line per objective), regimes_results.json (per task: the diagnostic, and per objective
`mean`, `std`, `n` of the held-out accuracy and the other measures), and a last line
`regimes: tasks=N objectives=M seeds=K rule=<one-line rule or none>`.

    PYTHONPATH=src python benchmarks/regimes.py [--output_dir outputs/regimes] [--reuse] [--quick]

Budget: the default (3 tasks, 10 objectives with the 4x and sft->asft runs, 3 seeds: 72 runs) took 77 minutes on 2
idle cores (measured, above; the bar is 150). The default tasks are codeword, capitals and sentiment; arithmetic's
runs take about 3.5 minutes each (128 rows, 32 steps x 8, 32 held-out answers of up to 128 tokens), so the
four-task map with every objective (`--tasks codeword,capitals,sentiment,arithmetic`) takes about 90 minutes more.
`--grid_only` leaves out the 4x and sft->asft runs (to check one more task against the map). `--reuse` keeps every
finished run with the same settings (resumable after an interruption). `--quick` runs the whole pipeline on a toy
budget (2 tasks, sft and asft, 2 seeds, 2 steps), sized for at most 10 minutes on 2 idle cores (measured: 762 s on
2 cores shared with three other jobs): a smoke test whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]

from regimes_tasks import TASKS  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
OBJECTIVES = {
    "sft": ["--mode", "sft"],
    "dft": ["--mode", "dft"],
    "sft_kl": ["--mode", "sft_kl"],
    "asft": ["--mode", "asft"],
}
# The objective family (issue #22): each joins when `asft train` knows its flag or mode.
PENDING_OBJECTIVES = {
    "floor0.1": (["--mode", "dft", "--weight_floor", "0.1"], "weight_floor"),
    "p^0.5": (["--mode", "dft", "--weight_power", "0.5"], "weight_power"),
    "prift": (["--mode", "prift"], "prift"),
}
P_WEIGHTED = ("dft", "asft")
# A stored diagnostic.json of another version is computed again (2: the prior report has the response NLL).
DIAGNOSTIC_VERSION = 2
CPU_RUN = "--save_strategy no --use_cpu true --disable_tqdm true --report_to none --logging_steps 1".split()

FULL = dict(
    tasks=["codeword", "capitals", "sentiment"],  # + arithmetic with --tasks (about 100 more minutes)
    objectives=None,  # every available one
    seeds=[0, 1, 2],
    n_train={"codeword": 56, "sentiment": 64, "arithmetic": 128, "capitals": 48},
    n_test={"codeword": 24, "sentiment": 32, "arithmetic": 32, "capitals": 24},
    steps={"codeword": 24, "sentiment": 24, "arithmetic": 32, "capitals": 24},
    batch=8,
    lr=5e-5,
    kl_weight=0.05,
    weak_multiplier=4,
    n_off_task=16,
    off_task_tokens=64,
)
QUICK = dict(
    FULL,
    tasks=["codeword", "sentiment"],
    objectives=["sft", "asft"],
    seeds=[0, 1],
    n_train={"codeword": 12, "sentiment": 12},
    n_test={"codeword": 4, "sentiment": 4},
    steps={"codeword": 2, "sentiment": 2},
    batch=4,
    weak_multiplier=2,
    n_off_task=3,
    off_task_tokens=16,
)


def available_objectives(wanted: list[str] | None) -> dict[str, list[str]]:
    from asft.objectives import MODES
    from asft.training.config import AnchoredSFTConfig

    found = dict(OBJECTIVES)
    for name, (flags, needs) in PENDING_OBJECTIVES.items():
        if needs in MODES or needs in AnchoredSFTConfig.__dataclass_fields__:
            found[name] = flags
    if wanted:
        unknown = [w for w in wanted if w not in found]
        if unknown:
            sys.exit(f"regimes: unknown or unavailable objectives {unknown}; available: {list(found)}")
        found = {k: found[k] for k in wanted}
    return found


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def asft_cmd(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "asft.cli", *args], check=True, env=env)


# ----------------------------------------------------------------------------------------- in-process measures


class Scorer:
    """The base model, loaded once: greedy answers, p(y_t) and the KL of a trained model to it."""

    def __init__(self, base: str):
        from asft.data import resolve_template
        from asft.models import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(base, device="cpu")
        self.template = resolve_template("auto", self.tokenizer)

    def features(self, rows: list[dict]) -> list[dict]:
        from asft.data import Example, tokenize

        def ex(i, r):
            msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]
            return Example("regimes", i, messages=msgs)

        return [tokenize(ex(i, r), self.template, self.tokenizer) for i, r in enumerate(rows)]

    def accuracy(self, model, rows: list[dict], grade, max_new_tokens: int) -> float:
        from asft.data.templates import encode_prompt, render_prompt
        from asft.evaluation.generation import GenSettings, HFBackend

        backend = HFBackend(model, self.tokenizer)
        prompts = [
            encode_prompt(render_prompt(r["instruction"], self.template, self.tokenizer), self.tokenizer) for r in rows
        ]
        answers = []
        for start in range(0, len(prompts), 16):
            answers += backend.generate(prompts[start : start + 16], GenSettings(max_new_tokens=max_new_tokens))
        return sum(grade(a[0], r["answer"]) for a, r in zip(answers, rows)) / len(rows)

    def probs(self, model, features: list[dict]):
        from asft.diagnostics import score_features

        return score_features(model, features, self.tokenizer.pad_token_id).probs

    def kl(self, model, features: list[dict]) -> float:
        """Mean over response tokens of KL(base || model), full vocabulary, float32."""
        import torch

        from asft.data import right_pad
        from asft.objectives import kl_from_logprobs, select_response

        total, n = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(features), 8):
                inputs = right_pad(features[start : start + 8], self.tokenizer.pad_token_id, "cpu")
                labels = inputs.pop("labels")
                z, _, _ = select_response(model(**inputs).logits, labels)
                r, _, _ = select_response(self.model(**inputs).logits, labels)
                kl = kl_from_logprobs(torch.log_softmax(z.float(), -1), torch.log_softmax(r.float(), -1))
                total, n = total + float(kl.sum()), n + kl.numel()
        return total / max(n, 1)

    def off_task(self, instructions: list[str], max_new_tokens: int) -> list[dict]:
        from asft.data.templates import encode_prompt, render_prompt
        from asft.evaluation.generation import GenSettings, HFBackend

        backend = HFBackend(self.model, self.tokenizer)
        prompts = [encode_prompt(render_prompt(i, self.template, self.tokenizer), self.tokenizer) for i in instructions]
        answers = backend.generate(prompts, GenSettings(max_new_tokens=max_new_tokens))
        return [{"instruction": i, "response": a[0].strip()} for i, a in zip(instructions, answers) if a[0].strip()]


def load(path: Path):
    from asft.models import load_model

    return load_model(str(path)).eval()


# ------------------------------------------------------------------------------------------------------- runs


def objective(flags: list[str]):
    """The ObjectiveSettings an objective's flags give `asft train` (mode and anchor: what decides whether
    --kl_weight applies and whether a reference, here the task's cache, is needed)."""
    from asft.objectives import ObjectiveSettings

    return ObjectiveSettings(flags[flags.index("--mode") + 1], anchor="--anchor" in flags or None)


def train(start: str, data: Path, out: Path, flags: list[str], steps: int, seed: int, s: dict, extra=()) -> float:
    t = time.time()
    asft_cmd(
        "train",
        *["--model_name_or_path", start, "--data_path", str(data), "--output_dir", str(out), "--overwrite_output_dir"],
        *flags,
        *(["--kl_weight", str(s["kl_weight"])] if objective(flags).anchored else []),  # the others refuse it
        *["--max_steps", str(steps), "--per_device_train_batch_size"],
        *[str(s["batch"]), "--learning_rate", str(s["lr"]), "--lr_scheduler_type", "cosine", "--warmup_steps"],
        *[str(min(2, steps // 4)), "--seed", str(seed), *CPU_RUN, *extra],
    )
    return time.time() - t


def measure(sc: Scorer, model_dir: Path, task: dict) -> dict:
    model = load(model_dir)
    return {
        "accuracy": sc.accuracy(model, task["test"], task["grade"], task["max_new_tokens"]),
        "task_kl": sc.kl(model, task["test_features"]),
        "offtask_kl": sc.kl(model, task["offtask_features"]),
        "probs": sc.probs(model, task["test_features"]).tolist(),
    }


def run_one(sc, task, name, flags, seed, steps, s, reuse, start=None, cache=None, half_checkpoint=False) -> dict:
    """Train (unless --reuse finds it done with the same settings) and measure one run; its numbers in run.json."""
    out = task["dir"].parent.parent / "runs" / task["name"] / name / f"seed-{seed}"
    key = {"task": task["name"], "objective": name, "flags": flags, "seed": seed, "steps": steps, "start": start}
    key.update({k: s[k] for k in ("batch", "lr", "kl_weight")})
    done = out / "regimes_run.json"
    if reuse and done.exists() and json.loads(done.read_text()).get("key") == key:
        return {**json.loads(done.read_text()), "reused": True}
    extra = ["--reference_cache", str(cache)] if cache else []
    if half_checkpoint and steps >= 2:
        extra = ["--save_strategy", "steps", "--save_steps", str(steps // 2), "--save_only_model", "true"]
    print(f"\n=== {task['name']} / {name} / seed {seed}: {steps} steps x {s['batch']} ===", flush=True)
    seconds = train(start or task["base"], task["train_path"], out, flags, steps, seed, s, extra)
    result = {"key": key, "train_seconds": seconds, **measure(sc, out, task)}
    half = out / f"checkpoint-{steps // 2}"
    if half_checkpoint and half.is_dir():
        result["accuracy_half_budget"] = sc.accuracy(load(half), task["test"], task["grade"], task["max_new_tokens"])
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    done.write_text(json.dumps(result) + "\n")
    return result


def prepare_task(sc: Scorer, name: str, out: Path, s: dict, base: str, needs_cache: bool, off: list[dict]) -> dict:
    from asft.diagnostics import prior_report, score_features

    make, grade, max_new_tokens = TASKS[name]
    train_rows, test_rows = make(s["n_train"][name], s["n_test"][name], 0)
    d = out / "tasks" / name
    write_jsonl(d / "train.jsonl", [{"instruction": r["instruction"], "response": r["response"]} for r in train_rows])
    write_jsonl(d / "test.jsonl", test_rows)
    task = {"name": name, "dir": d, "base": base, "train_path": d / "train.jsonl", "test": test_rows}
    task.update(grade=grade, max_new_tokens=max_new_tokens)
    task["test_features"], task["offtask_features"] = sc.features(test_rows), sc.features(off)
    diag_file = d / "diagnostic.json"
    key = {"n_train": len(train_rows), "version": DIAGNOSTIC_VERSION}
    if diag_file.exists() and {k: json.loads(diag_file.read_text()).get(k) for k in key} == key:
        task.update(json.loads(diag_file.read_text())["stored"])
    else:
        scores = score_features(sc.model, sc.features(train_rows), sc.tokenizer.pad_token_id)
        report = prior_report(scores, sc.tokenizer)
        stored = {
            "diagnostic": {k: v for k, v in report.items() if k != "lowest_tokens"},
            "base_accuracy": sc.accuracy(sc.model, test_rows, grade, max_new_tokens),
            "base_probs": sc.probs(sc.model, task["test_features"]).tolist(),
        }
        diag_file.write_text(json.dumps({**key, "stored": stored}) + "\n")
        task.update(stored)
    if needs_cache and not (d / "cache" / "manifest.json").exists():
        asft_cmd(
            *"cache-reference --model_name_or_path".split(),
            base,
            "--data_path",
            str(d / "train.jsonl"),
            "--output_dir",
            str(d / "cache"),
            "--overwrite",
            "--disable_tqdm",
        )
    task["cache"] = d / "cache"
    return task


# ---------------------------------------------------------------------------------------------------- summary


def summarize(task: dict, runs: dict[str, list[dict]]) -> dict:
    from asft.diagnostics import bin_table
    from asft.reporting import spread

    entry = {"diagnostic": task["diagnostic"], "base_accuracy": task["base_accuracy"], "objectives": {}}
    for name, results in runs.items():
        acc = spread([r["accuracy"] for r in results])
        mean_probs = [sum(x) / len(results) for x in zip(*[r["probs"] for r in results])]
        entry["objectives"][name] = {
            **{k: acc[k] for k in ("mean", "std", "n", "ci95")},
            "task_kl": spread([r["task_kl"] for r in results]),
            "offtask_kl": spread([r["offtask_kl"] for r in results]),
            "bins": bin_table(task["base_probs"], {name: mean_probs}),
            "accuracies": [r["accuracy"] for r in results],
        }
        half = [r["accuracy_half_budget"] for r in results if "accuracy_half_budget" in r]
        if half:
            entry["objectives"][name]["accuracy_half_budget"] = {**spread(half), "accuracies": half}
    return entry


def find_rule(table: dict) -> str:
    """A threshold on one diagnostic number that splits the tasks where asft loses to sft (separated) from the
    others, or `none`."""
    from asft.reporting import separated

    loses = {}
    for name, t in table.items():
        o = t["objectives"]
        if "asft" in o and "sft" in o:
            loses[name] = separated(o["sft"]["accuracies"], o["asft"]["accuracies"]) == "yes"
    if len(loses) < 2 or not any(loses.values()) or all(loses.values()):
        return "none"
    for key in ("frac_below_0.1", "median_prob", "mean_prob"):
        values = sorted((table[n]["diagnostic"][key], loses[n]) for n in loses)
        flags = [lose for _, lose in values]
        for i in range(1, len(values)):
            if flags[:i] == [flags[0]] * i and flags[i:] == [not flags[0]] * (len(flags) - i):
                cut = (values[i - 1][0] + values[i][0]) / 2
                side = "<" if flags[0] else ">="
                return f"asft loses to sft where {key} {side} {cut:.3f}"
    return "none"


def report(table: dict, out: Path, s: dict) -> Path:
    names = list(dict.fromkeys(n for t in table.values() for n in t["objectives"]))

    def cell(o):
        return "-" if o is None or o["mean"] is None else f"{o['mean']:.3f} +- {o['std']:.3f} (n={o['n']})"

    lines = [
        "| task | mean p | below 0.1 | response NLL | base acc | " + " | ".join(names) + " |",
        "|---|---:|---:|---:|---:|" + "---|" * len(names),
    ]
    for task, t in table.items():
        d = t["diagnostic"]
        lines.append(
            f"| {task} | {d['mean_prob']:.3f} | {100 * d['frac_below_0.1']:.1f}% | {d['mean_response_nll']:.1f} | "
            f"{t['base_accuracy']:.3f} | " + " | ".join(cell(t["objectives"].get(n)) for n in names) + " |"
        )
    kl = ["", "Off-task KL to the base (mean +- std):", ""]
    for task, t in table.items():
        kl.append(f"- {task}: " + ", ".join(f"{n} {cell(o['offtask_kl'])}" for n, o in t["objectives"].items()))
    bins = ["", "Held-out tokens by the base model's p(y_t): mean p after training (mean over seeds)", ""]
    from asft.diagnostics import format_bin_table

    for task, t in table.items():
        rows = None
        for o in t["objectives"].values():
            if rows is None:
                rows = [dict(r, after=dict(r["after"])) for r in o["bins"]]
            else:
                for r, b in zip(rows, o["bins"]):
                    r["after"].update(b["after"])
        bins += [f"{task}:", "", format_bin_table(rows), ""]
    text = "\n".join(["# regimes", "", "Held-out accuracy, mean +- std over seeds.", "", *lines, *kl, *bins])
    (out / "regimes.md").write_text(text + "\n")
    print("\n" + "\n".join(lines + kl))
    figure(table, out / "regimes.png")
    return out / "regimes.md"


def figure(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.4))
    tasks = sorted(table, key=lambda t: table[t]["diagnostic"]["frac_below_0.1"])
    xs = [table[t]["diagnostic"]["frac_below_0.1"] for t in tasks]
    names = list(dict.fromkeys(n for t in table.values() for n in t["objectives"]))
    for n in names:
        pts = [(x, table[t]["objectives"][n]) for x, t in zip(xs, tasks) if n in table[t]["objectives"]]
        ax.errorbar(
            [p[0] for p in pts],
            [p[1]["mean"] for p in pts],
            yerr=[p[1]["std"] for p in pts],
            marker="o",
            capsize=3,
            label=n,
        )
    top = ax.secondary_xaxis("top")  # the task names where their diagnostic puts them
    top.set_xticks(xs, tasks, fontsize=8)
    ax.set_xlabel("share of response tokens with base p(y_t) < 0.1 (the prior diagnostic)")
    ax.set_ylabel("held-out accuracy (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/regimes")
    p.add_argument("--quick", action="store_true", help="smoke test: toy budget, numbers mean nothing")
    p.add_argument("--reuse", action="store_true", help="keep finished runs with the same settings")
    p.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--objectives", default=None, help="comma-separated subset (default: every available one)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument(
        "--grid_only",
        action="store_true",
        help="only tasks x objectives x seeds: no 4x runs, no sft->asft (a check of one more task against a map)",
    )
    a = p.parse_args()
    s = json.loads(json.dumps(QUICK if a.quick else FULL))
    if a.tasks:
        s["tasks"] = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.objectives:
        s["objectives"] = [o.strip() for o in a.objectives.split(",") if o.strip()]
    if a.seeds:
        s["seeds"] = [int(x) for x in a.seeds.split(",") if x.strip()]
    if a.quick:
        print("regimes --quick: a smoke test of the whole pipeline on a toy budget; its numbers mean nothing.")
    start = time.time()

    from asft.models import resolve_model_path

    objectives = available_objectives(s["objectives"])
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(MODEL)
    print(f"Model: {MODEL} -> {base}\nSettings: {json.dumps(s)}\nObjectives: {list(objectives)}", flush=True)
    sc = Scorer(base)
    from replicate import OFF_TASK

    off_file = out / "offtask.jsonl"
    if not (a.reuse and off_file.exists()):
        write_jsonl(off_file, sc.off_task(OFF_TASK[: s["n_off_task"]], s["off_task_tokens"]))
    off = [json.loads(line) for line in off_file.read_text().splitlines()]

    tasks = {}
    for name in s["tasks"]:
        need = any(objective(f).needs_reference for f in objectives.values())
        tasks[name] = prepare_task(sc, name, out, s, base, need, off)
        d = tasks[name]["diagnostic"]
        print(
            f"{name}: prior mean p {d['mean_prob']:.3f}, median {d['median_prob']:.3f}, below 0.1 "
            f"{100 * d['frac_below_0.1']:.1f}%, at/above 0.9 {100 * d['frac_above_0.9']:.1f}%, response NLL "
            f"{d['mean_response_nll']:.1f} nats; base held-out "
            f"accuracy {tasks[name]['base_accuracy']:.3f}",
            flush=True,
        )
    weak = max(tasks, key=lambda t: tasks[t]["diagnostic"]["frac_below_0.1"])

    results: dict[str, dict[str, list]] = {t: {} for t in tasks}
    for name, task in tasks.items():
        for obj, flags in objectives.items():
            for seed in s["seeds"]:
                r = run_one(
                    sc,
                    task,
                    obj,
                    flags,
                    seed,
                    s["steps"][name],
                    s,
                    a.reuse,
                    cache=task["cache"] if objective(flags).needs_reference else None,
                    half_checkpoint=obj == "sft",
                )
                results[name].setdefault(obj, []).append(r)
        if name == weak and not a.grid_only:
            for obj in [o for o in P_WEIGHTED if o in objectives]:
                steps = s["steps"][name] * s["weak_multiplier"]
                label = f"{obj}@{s['weak_multiplier']}x"
                for seed in s["seeds"]:
                    r = run_one(
                        sc,
                        task,
                        label,
                        objectives[obj],
                        seed,
                        steps,
                        s,
                        a.reuse,
                        cache=task["cache"] if objective(objectives[obj]).needs_reference else None,
                    )
                    results[name].setdefault(label, []).append(r)

    table = {t: summarize(tasks[t], results[t]) for t in tasks}
    gaps = {
        t: table[t]["objectives"]["sft"]["mean"] - table[t]["objectives"]["asft"]["mean"]
        for t in table
        if "sft" in table[t]["objectives"] and "asft" in table[t]["objectives"]
    }
    if gaps and not a.grid_only:
        worst = max(gaps, key=gaps.get)
        task = tasks[worst]
        for seed in s["seeds"]:
            sft_model = out / "runs" / worst / "sft" / f"seed-{seed}"
            r = run_one(
                sc,
                task,
                "sft->asft",
                OBJECTIVES["asft"],
                seed,
                max(1, s["steps"][worst] // 2),
                s,
                a.reuse,
                start=str(sft_model),
            )
            results[worst].setdefault("sft->asft", []).append(r)
        table[worst] = summarize(task, results[worst])
        print(f"sft->asft ran on {worst} (sft - asft = {gaps[worst]:+.3f})")

    rule = find_rule(table)
    report(table, out, s)
    claims = {}
    from asft.reporting import separated

    for t, entry in table.items():
        o = entry["objectives"]
        if "sft" in o:
            claims[t] = {n: separated(o[n]["accuracies"], o["sft"]["accuracies"]) for n in o if n != "sft"}
    print("\nAgainst sft, per task (yes: higher, no: lower, beyond the seeds' spread):")
    for t, c in claims.items():
        print(f"  {t}: " + ", ".join(f"{n} {v}" for n, v in c.items()))
    print("SFT's plateau (held-out accuracy at half the budget against the full budget):")
    sft_half = {t: e["objectives"].get("sft", {}).get("accuracy_half_budget") for t, e in table.items()}
    for t, h in sft_half.items():
        if h and h["n"]:
            full = table[t]["objectives"]["sft"]
            verdict = {"yes": "still rising", "no": "past its peak (lower at the full budget)"}.get(
                separated(full["accuracies"], h["accuracies"]), "plateau"
            )
            print(f"  {t}: sft at half budget {h['mean']:.3f} +- {h['std']:.3f}, full {full['mean']:.3f}: {verdict}")
    every = [r for t in results.values() for rs in t.values() for r in rs]
    reused, train_seconds = sum(r.get("reused", False) for r in every), sum(r["train_seconds"] for r in every)
    (out / "regimes_results.json").write_text(
        json.dumps(
            {
                "settings": s,
                "objectives": list(objectives),
                "weak_task": weak,
                "rule": rule,
                "tasks": table,
                "against_sft": claims,
                "seconds": time.time() - start,  # this sitting's; with --reuse, runs of earlier sittings are not in it
                "train_seconds": train_seconds,
                "reused_runs": reused,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nReport: {out / 'regimes.md'}; figure: {out / 'regimes.png'}; data: {out / 'regimes_results.json'}")
    print(
        f"Total time: {time.time() - start:.0f} s"
        + (" (--quick: a smoke test)" if a.quick else "")
        + (f" this sitting; {reused} of {len(every)} runs reused from earlier sittings" if reused else "")
        + f"; training time of all runs {train_seconds:.0f} s"
    )
    n_obj = len({n for t in table.values() for n in t["objectives"]})
    print(f"regimes: tasks={len(table)} objectives={n_obj} seeds={len(s['seeds'])} rule={rule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
