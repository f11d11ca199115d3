"""`asft quickstart`: ASFT on the embedded SmolLM2-135M-Instruct, offline, in a few minutes on 2 CPU cores.

It writes a small sentiment-classification dataset it generates itself (reviews built from word lists, answers
"good" or "bad"), measures the base model on held-out reviews, trains with `asft train`, measures again, and
prints the before/after comparison and where everything is.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from ..io import write_jsonl

POSITIVE = (
    "delicious friendly wonderful excellent cozy fresh lovely perfect amazing pleasant generous spotless charming "
    "superb helpful"
).split()
NEGATIVE = (
    "bland rude awful terrible cramped stale dirty slow overpriced noisy cold greasy disappointing careless dreadful"
).split()
SUBJECTS = (
    [f"The {s}" for s in "food service room staff coffee pasta".split()]
    + ["Our table"]
    + [f"The {s}" for s in "menu dessert waiter music bread soup view breakfast".split()]
)
INSTRUCTION = "Classify the sentiment of this review as good or bad. Answer with one word.\n\nReview: {review}"
LABELS = ("good", "bad")


def make_examples(n: int, seed: int) -> list[dict]:
    """Reviews of two clauses whose adjectives agree in sentiment; the response is the one-word label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(POSITIVE if label == "good" else NEGATIVE, 2)
        a, b = rng.sample(SUBJECTS, 2)
        review = f"{a} was {words[0]} and {b.lower()} was {words[1]}."
        rows.append({"instruction": INSTRUCTION.format(review=review), "response": label})
    return rows


@torch.no_grad()
def evaluate(model_path: str, rows: list[dict]) -> dict[str, float]:
    """Held-out accuracy (the label with the higher log-probability) and mean NLL per gold response token."""
    from ..data import Example, resolve_template, tokenize
    from ..models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    template = resolve_template("auto", tokenizer)
    correct, nll_sum, nll_tokens = 0, 0.0, 0
    for row in rows:
        scores = {}
        for label in LABELS:
            ex = Example(
                "quickstart",
                0,
                messages=[{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": label}],
            )
            item = tokenize(ex, template, tokenizer)
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            mask = labels[0, 1:] != -100
            token_logp = logp[mask].gather(-1, labels[0, 1:][mask][:, None]).squeeze(-1)
            scores[label] = float(token_logp.sum())
            if label == row["response"]:
                nll_sum -= float(token_logp.sum())
                nll_tokens += int(mask.sum())
        correct += max(scores, key=scores.get) == row["response"]
    return {"accuracy": correct / len(rows), "nll": nll_sum / nll_tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asft quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="asft-quickstart", help="parent folder; each run gets a new sub-folder")
    p.add_argument(
        "--mode",
        default="asft",
        help="objective: any --mode of asft train (sft, dft, sft_kl, asft, iw_sft, eaft, prift)",
    )
    p.add_argument("--max_steps", type=int, default=24, help="optimizer steps")
    p.add_argument("--train_examples", type=int, default=192)
    p.add_argument("--heldout_examples", type=int, default=48)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model to fine-tune")
    args = p.parse_args(argv)

    from ..models import resolve_model_path
    from ..objectives import normalize_mode, uses_kl
    from .train import main as train

    start = time.time()
    run_dir = Path(args.output_dir) / time.strftime("run-%Y%m%d-%H%M%S")
    while run_dir.exists():  # never reuse (and so never overwrite) an earlier run's folder
        run_dir = run_dir.with_name(run_dir.name + "-1")
    train_rows = make_examples(args.train_examples, seed=1)
    heldout_rows = make_examples(args.heldout_examples, seed=2)
    write_jsonl(run_dir / "data" / "train.jsonl", train_rows, overwrite=True)
    write_jsonl(run_dir / "data" / "heldout.jsonl", heldout_rows, overwrite=True)

    model_path = resolve_model_path(args.model)
    print(f"Model: {args.model} -> {model_path}")
    before = evaluate(model_path, heldout_rows)
    print(f"Before training: held-out accuracy {before['accuracy']:.1%}, NLL {before['nll']:.3f}", flush=True)

    model_dir = run_dir / "model"
    train(
        [
            "--model_name_or_path",
            model_path,
            "--data_path",
            str(run_dir / "data" / "train.jsonl"),
            "--output_dir",
            str(model_dir),
            "--mode",
            args.mode,
            *(["--kl_weight", "0.05"] if uses_kl(normalize_mode(args.mode)) else []),
            "--max_steps",
            str(args.max_steps),
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "5e-5",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_steps",
            "2",
            "--logging_steps",
            "4",
            "--save_strategy",
            "no",
            "--seed",
            "0",
            "--disable_tqdm",
            "true",
        ]
    )
    after = evaluate(str(model_dir), heldout_rows)

    print(f"\n| held-out ({len(heldout_rows)} reviews) | before | after |")
    print("|---|---|---|")
    print(f"| accuracy | {before['accuracy']:.1%} | {after['accuracy']:.1%} |")
    print(f"| NLL per response token | {before['nll']:.3f} | {after['nll']:.3f} |")
    print(
        f"\nRun folder: {run_dir}\n  data: {run_dir / 'data'}\n  trained model: {model_dir}\n"
        f"  per-step metrics: {model_dir / 'metrics.jsonl'}\nTotal time: {time.time() - start:.0f} s"
    )
    return 0
