"""A small reasoning task the project generates itself: multi-step arithmetic word problems with worked solutions.

Shared by the benchmarks that need held-out reasoning problems (replicate.py, rl_init.py). Each problem chains
three operations on quantities of one object; the worked solution states every intermediate result and ends
with the final answer in \\boxed{}, so `asft eval --task math` (math-verify) grades it.

    from reasoning_task import write_task
    paths = write_task("outputs/task", n_train=400, n_test=100, seed=0)
    # paths["train"]: {"instruction", "response"} rows for `asft train`
    # paths["test"], paths["train_eval"]: GSM8K rows {"question", "answer": "... #### n"} for `asft eval --task math`

Test problems never appear in training: the split is by question text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The instruction `asft eval --task math` appends to every question (asft.evaluation.math.INSTRUCTION); training
# prompts carry it too, so the model is trained and evaluated on the same prompt.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Mia",
    "Noah",
    "Olive",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Victor",
]
THINGS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "cookies",
    "pencils",
    "stamps",
    "shells",
    "cards",
    "coins",
    "flowers",
    "balloons",
]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "packs", "crates"]


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """One problem: (question, worked solution ending in \\boxed{answer}, answer)."""
    name, thing, container = rng.choice(NAMES), rng.choice(THINGS), rng.choice(CONTAINERS)
    groups, per = rng.randint(2, 9), rng.randint(3, 15)
    start = groups * per
    steps = [f"{name} starts with {groups} x {per} = {start} {thing}."]
    question = [f"{name} has {groups} {container} with {per} {thing} in each."]
    total = start
    for _ in range(2):
        kind = rng.choice(["give", "buy", "double"] if total < 60 else ["give", "buy"])
        if kind == "give":
            n = rng.randint(1, max(1, total - 1))
            question.append(f"{name} gives away {n} {thing}.")
            steps.append(f"After giving away {n}, {name} has {total} - {n} = {total - n} {thing}.")
            total -= n
        elif kind == "buy":
            n = rng.randint(2, 30)
            question.append(f"Then {name} buys {n} more {thing}.")
            steps.append(f"After buying {n} more, {name} has {total} + {n} = {total + n} {thing}.")
            total += n
        else:
            question.append(f"Then a friend doubles {name}'s {thing}.")
            steps.append(f"Doubling gives 2 x {total} = {2 * total} {thing}.")
            total *= 2
    question.append(f"How many {thing} does {name} have now?")
    solution = " ".join(steps) + f" The answer is \\boxed{{{total}}}."
    return " ".join(question), solution, total


def make_split(n_train: int, n_test: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Distinct problems; the test problems' questions never occur in the training set."""
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_test:
        problem = make_problem(rng)
        if problem[0] not in seen:
            seen.add(problem[0])
            problems.append(problem)
    return problems[:n_train], problems[n_train:]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_task(
    out_dir: str | Path, n_train: int = 400, n_test: int = 100, seed: int = 0, n_train_eval: int = 100
) -> dict[str, Path]:
    """Write train.jsonl (instruction/response), test.jsonl and train_eval.jsonl (GSM8K format)."""
    out = Path(out_dir)
    train, test = make_split(n_train, n_test, seed)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "train_eval": out / "train_eval.jsonl"}
    _write(paths["train"], [{"instruction": f"{q}\n{INSTRUCTION}", "response": s} for q, s, _ in train])
    _write(paths["test"], [{"question": q, "answer": f"{s}\n#### {a}"} for q, s, a in test])
    _write(paths["train_eval"], [{"question": q, "answer": f"{s}\n#### {a}"} for q, s, a in train[:n_train_eval]])
    return paths


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="outputs/reasoning_task")
    p.add_argument("--n_train", type=int, default=400)
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for split, path in write_task(a.output_dir, a.n_train, a.n_test, a.seed).items():
        print(f"{split}: {path}")
