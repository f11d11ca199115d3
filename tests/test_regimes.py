"""benchmarks/regimes.py's task generators: deterministic per seed, held-out items never in training."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from regimes_tasks import TASKS, grade_boxed, grade_exact  # noqa: E402


@pytest.mark.parametrize("name", list(TASKS))
def test_tasks_are_deterministic_and_hold_out(name):
    make = TASKS[name][0]
    train, test = make(24, 8, 0)
    assert (train, test) == make(24, 8, 0)
    assert len(train) == 24 and len(test) == 8
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert len({r["instruction"] for r in train}) == len(train)
    assert all(set(r) == {"instruction", "response", "answer"} for r in train + test)
    other = make(24, 8, 1)
    assert other != (train, test)


def test_graders():
    assert grade_exact(" Zib.\nmore", "zib") and not grade_exact("It is zib", "zib")
    assert grade_exact("New Delhi", "New Delhi") and not grade_exact("", "Paris")
    assert grade_boxed("so \\boxed{3} then \\boxed{1,200}", "1200") and not grade_boxed("1200", "1200")


def test_objectives_are_extensible():
    import regimes

    found = regimes.available_objectives(None)
    assert list(found)[:4] == ["sft", "dft", "sft_kl", "asft"]
    assert regimes.available_objectives(["sft", "asft"]) == {"sft": ["--mode", "sft"], "asft": ["--mode", "asft"]}
    with pytest.raises(SystemExit):
        regimes.available_objectives(["nope"])


def test_rule_is_a_threshold_or_none():
    import regimes

    def task(frac, sft, asft):
        d = {"frac_below_0.1": frac, "median_prob": 1 - frac, "mean_prob": 1 - frac}
        return {"diagnostic": d, "objectives": {"sft": {"accuracies": sft}, "asft": {"accuracies": asft}}}

    table = {"a": task(0.7, [0.9, 0.91], [0.1, 0.12]), "b": task(0.2, [0.5, 0.6], [0.55, 0.6])}
    assert regimes.find_rule(table) == "asft loses to sft where frac_below_0.1 >= 0.450"
    table["c"] = task(0.1, [0.9, 0.92], [0.2, 0.21])
    assert regimes.find_rule(table) == "none"
