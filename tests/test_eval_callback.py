"""Evaluation during training (`asft train --eval_task`): the numbers `asft eval` gives on that step's checkpoint."""

import json

import pytest

from asft.cli import main
from asft.errors import ConfigError
from conftest import train_cmd, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("task-eval")
    train = write_jsonl(
        d / "train.jsonl",
        [
            {"instruction": f"what is {a} + {b}?", "response": f"{a} + {b} = {a + b}"}
            for a in range(3)
            for b in range(3)
        ],
    )
    medical = write_jsonl(
        d / "med.jsonl",
        [
            {
                "question": f"patient {i} has a disease of the {w}",
                "options": {"A": "heart", "B": "blood", "C": "dog"},
                "answer_idx": "ABC"[i % 3],
            }
            for i, w in enumerate(["heart", "blood", "fox", "dog", "heart", "lazy"])
        ],
    )
    math = write_jsonl(
        d / "math.jsonl",
        [
            {"question": f"what is the sum of {a} and {a + 1}?", "answer": f"{a} + {a + 1}\n#### {2 * a + 1}"}
            for a in range(4)
        ],
    )
    return {"train": train, "medical": medical, "math": math}


def train_args(model_dir, files, out, *extra):
    flags = dict(mode="dft", per_device_train_batch_size=3, learning_rate="3e-2", max_steps=4, save_steps=2, seed=0)
    return train_cmd(model_dir, files["train"], out, *extra, **flags)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task,lora", [("medical", False), ("medical", True), ("math", False)])
def test_in_training_eval_equals_asft_eval_on_the_checkpoint(tiny_model_dir, files, tmp_path, task, lora):
    out = tmp_path / "run"
    extra = [
        "--eval_task",
        task,
        "--eval_task_data",
        str(files[task]),
        "--eval_task_steps",
        "2",
        "--eval_task_max_new_tokens",
        "6",
    ] + (["--use_lora", "--lora_r", "4"] if lora else [])
    assert main(train_args(tiny_model_dir, files, out, *extra)) == 0
    key = f"{task}/{files[task].stem}/accuracy"
    logged = {r["step"]: r for r in records(out) if key in r}
    assert sorted(logged) == [2, 4]  # every 2 steps; the end (step 4) is not evaluated twice
    assert logged[2][f"{task}/macro_average"] == logged[2][key]
    for step in (2, 4):
        in_training = out / "eval_task" / task / f"step-{step:06d}"
        assert (in_training / "predictions.jsonl").exists()
        evaluated = tmp_path / f"eval-{step}"
        assert (
            main(
                [
                    "eval",
                    "--task",
                    task,
                    "--model",
                    str(out / f"checkpoint-{step}"),
                    "--data",
                    str(files[task]),
                    "--output_dir",
                    str(evaluated),
                    "--max_new_tokens",
                    "6",
                    "--quiet",
                ]
            )
            == 0
        )
        result = json.loads((evaluated / "results.json").read_text())
        assert logged[step][key] == result["datasets"][files[task].stem]["value"]
        # Item by item, not only the mean: the same answers (letters, or generated completions).
        field = "prediction" if task == "medical" else "completion"
        ours = [json.loads(line)[field] for line in (in_training / "predictions.jsonl").read_text().splitlines()]
        theirs = [json.loads(line)[field] for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
        assert ours == theirs
    if task == "medical":  # training moved the weights: the letters' scores changed between the two steps
        scores = [
            [
                json.loads(line)["scores"]
                for line in (out / "eval_task" / task / f"step-{s:06d}" / "predictions.jsonl").read_text().splitlines()
            ]
            for s in (2, 4)
        ]
        assert scores[0] != scores[1]


def test_bad_eval_task_data_fails_before_training(tiny_model_dir, files, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}])
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, files, out, "--eval_task", "medical", "--eval_task_data", str(bad))) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "answer_idx" in err
    assert not (out / "metrics.jsonl").exists()


def test_eval_task_flags_are_checked():
    from asft.evaluation.callback import TaskEvalArguments, check_task_eval_args

    with pytest.raises(ConfigError, match="eval_task_data"):
        check_task_eval_args(TaskEvalArguments(eval_task="math"))
    with pytest.raises(ConfigError, match="need --eval_task"):
        check_task_eval_args(TaskEvalArguments(eval_task_data="x.jsonl"))
    with pytest.raises(ConfigError, match="eval_task_steps"):
        check_task_eval_args(TaskEvalArguments(eval_task="math", eval_task_data="x", eval_task_steps=0))
