"""`asft rl`: the rewards on written completions, GRPO and DAPO steps on a tiny model, the reference, resume,
a LoRA start, and one-line errors."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asft.cli import main
from asft.cli.rl import prepare
from asft.rl.rewards import GuardedReward, build_rewards, extract_letter
from conftest import cli_args, write_jsonl

TERMS = [
    "reward",
    "reward_std",
    "accuracy",
    "frac_reward_zero_std",
    "completions/mean_length",
    "clip_ratio/region_mean",
    "rewards/math_reward/errors",
    "rewards/math_reward/timeouts",
]


# ---------------------------------------------------------------------------------- user rewards (module:function)


def length_reward(prompts, completions, **kwargs):
    """A reward with signal on a random model: completions differ in length."""
    return [float(len(c) % 7) / 7 for c in completions]


def flaky_reward(prompts, completions, **kwargs):
    if any("#" in c for c in completions):
        raise RuntimeError("cannot grade '#'")
    return [1.0] * len(completions)


# ------------------------------------------------------------------------------------------------------ rewards


def test_math_reward_right_wrong_unparseable():
    math_reward, fmt = build_rewards("math", True, [], timeout=5)
    completions = [
        "2 + 3 = 5, so the answer is \\boxed{5}.",
        "I get \\boxed{6}.",
        "no idea",
        "\\boxed{\\frac{10}{2}}",
        "The answer is 5",
    ]
    logged = {}
    scores = math_reward(
        prompts=[""] * 5, completions=completions, gold=["5"] * 5, log_metric=lambda k, v: logged.__setitem__(k, v)
    )
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert logged["accuracy"] == pytest.approx(3 / 5)
    assert logged["rewards/math_reward/errors"] == 0 and logged["rewards/math_reward/timeouts"] == 0
    assert fmt(prompts=[""] * 5, completions=completions, gold=["5"] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_choice_reward_reads_the_letter_as_the_evaluator_scores_it():
    assert extract_letter(" B", "ABCD") == "B"
    assert extract_letter("(C) because the heart", "ABCD") == "C"
    assert extract_letter("A. Aspirin", "ABCD") == "A"
    assert extract_letter("Let me think. The answer is D.", "ABCD") == "D"
    assert extract_letter("Answer: (B)", "ABCD") == "B"
    assert extract_letter("E", "ABCD") is None  # not an option of this question
    assert extract_letter("Beta blockers", "ABCD") is None  # a word, not a letter
    assert extract_letter("I am not sure", "ABCD") is None
    choice, fmt = build_rewards("choice", True, [], timeout=5)
    completions = ["B", "A. something", "no letter"]
    row = dict(gold=["B"] * 3, letters=["ABCD"] * 3)
    assert choice(prompts=[""] * 3, completions=completions, **row) == [1.0, 0.0, 0.0]
    assert fmt(prompts=[""] * 3, completions=completions, **row) == [1.0, 1.0, 0.0]


def test_a_grading_that_times_out_or_raises_scores_zero_and_is_counted():
    def slow(completion, gold, **_):
        if completion == "slow":
            time.sleep(5)
        return 1.0

    def broken(completion, gold, **_):
        if completion == "bad":
            raise ValueError("unparseable")
        return 1.0

    logged = {}
    timed = GuardedReward("slow", slow, timeout=0.2)
    start = time.monotonic()
    scores = timed(
        prompts=[""] * 3,
        completions=["ok", "slow", "ok"],
        gold=["1"] * 3,
        log_metric=lambda k, v: logged.__setitem__(k, v),
    )
    assert time.monotonic() - start < 3
    assert scores == [1.0, 0.0, 1.0] and timed.timeouts == 1 and logged["rewards/slow/timeouts"] == 1
    raising = GuardedReward("broken", broken, timeout=1)
    with pytest.warns(UserWarning, match="raised ValueError"):
        assert raising(prompts=[""] * 2, completions=["bad", "ok"], gold=["1"] * 2) == [0.0, 1.0]
    assert raising.errors == 1 and raising.timeouts == 0


def test_a_user_batch_reward_that_raises_costs_only_the_bad_completions():
    reward = GuardedReward("flaky", batch_fn=flaky_reward, timeout=1)
    with pytest.warns(UserWarning):
        assert reward(prompts=["p"] * 3, completions=["a", "#", "b"], gold=["1"] * 3) == [1.0, 0.0, 1.0]
    assert reward.errors == 1


# ------------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "math.jsonl"
    rows = [
        {"question": f"what is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a in range(4)
        for b in range(2)
    ]
    write_jsonl(path, rows)
    return path


def rl_args(model, data, out, *extra, reward=("--reward", "math"), reward_funcs_off=False):
    return [
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        *reward,
        *([] if reward_funcs_off else ["--reward_funcs", "test_rl:length_reward"]),
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "12",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "true",
        "--gradient_checkpointing",
        "false",
        "--disable_tqdm",
        "true",
        "--seed",
        "1",
        *extra,
    ]


def records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, after):
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.fixture(scope="module")
def asft_run(tiny_model_dir, tmp_path_factory):
    """A finished `asft train --mode asft` run on the tiny model: the RL start (and not its base)."""
    tmp = tmp_path_factory.mktemp("asft-run")
    data = tmp / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"add {a} and 1", "response": f"{a + 1}"}) + "\n" for a in range(4))
    )
    out = tmp / "run"
    assert (
        main(
            cli_args(
                "train",
                *(
                    "--mode asft --max_steps 2 --per_device_train_batch_size 2 --learning_rate 1e-2 --use_cpu"
                    " true --disable_tqdm true"
                ).split(),
                model_name_or_path=tiny_model_dir,
                data_path=data,
                output_dir=out,
            )
        )
        == 0
    )
    return out


def test_grpo_step_from_an_asft_run_uses_the_run_as_reference(asft_run, tiny_model_dir, problems, tmp_path):
    trainer, _, config, _ = prepare(
        rl_args(asft_run, problems, tmp_path / "rl", "--algorithm", "grpo", "--beta", "0.1", "--max_steps", "1")
    )
    assert config.loss_type == "grpo" and config.beta == 0.1
    start, base = load_file(asft_run / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    ref = trainer.ref_model.state_dict()
    assert all(torch.equal(ref[k], start[k]) for k in start)  # the reference is the asft run ...
    assert any(not torch.equal(ref[k], base[k]) for k in base)  # ... not the model it started from
    before = weights(trainer.model)
    trainer.train()
    assert changed(before, weights(trainer.model))
    assert all(torch.equal(trainer.ref_model.state_dict()[k], start[k]) for k in start)  # frozen
    (rec,) = records(tmp_path / "rl")
    for term in TERMS + ["kl"]:
        assert term in rec, term
    assert rec["kl"] >= 0


@pytest.mark.parametrize("math_reward", [True, False])
def test_dapo_step_changes_the_weights_and_logs_its_terms(tiny_model_dir, problems, tmp_path, math_reward):
    # The random model never solves a problem, so with the math reward every group is flat for dynamic sampling;
    # without it (the length reward alone judges the groups) dynamic sampling is on, as DAPO runs by default.
    # With beta = 0 the loss has no KL term; `kl` to the start is still logged unless --monitor_kl false.
    extra = ["--dynamic_sampling", "false", "--monitor_kl", "false"] if math_reward else []
    trainer, _, config, _ = prepare(
        rl_args(
            tiny_model_dir,
            problems,
            tmp_path / "rl",
            "--algorithm",
            "dapo",
            "--max_steps",
            "1" if math_reward else "2",
            *extra,
            reward=("--reward", "math")[: 2 * math_reward],
        )
    )
    assert (config.loss_type, config.epsilon_high, config.beta) == ("dapo", 0.28, 0.0)
    assert "soft_overlong_punishment_reward" in trainer.reward_func_names
    assert trainer.dynamic_sampling is not math_reward
    before = weights(trainer.model)
    trainer.train()
    assert changed(before, weights(trainer.model))
    rec, *later = records(tmp_path / "rl")
    terms = TERMS if math_reward else [t for t in TERMS if "math" not in t and t != "accuracy"]
    for term in terms + ["clip_ratio/high_mean"] + ([] if math_reward else ["dynamic_sampling/dropped_groups_frac"]):
        assert term in rec, term
    if math_reward:
        assert "kl" not in rec and trainer._monitor_ref is None
    else:
        start = load_file(tiny_model_dir / "model.safetensors")
        ref = trainer._monitor_ref.state_dict()
        assert all(torch.equal(ref[k], start[k]) for k in start)  # the start, frozen
        assert rec["kl"] == pytest.approx(0.0, abs=1e-6)  # measured before the first update: policy == start
        assert later[0]["kl"] > 1e-6  # after it, the policy has moved away from the start


def test_dynamic_sampling_masks_flat_groups_out_of_the_loss(tiny_model_dir, problems, tmp_path):
    trainer, *_ = prepare(rl_args(tiny_model_dir, problems, tmp_path / "rl", "--algorithm", "dapo", "--max_steps", "1"))
    assert trainer.dynamic_sampling
    # Two groups of 4 (this process holds all 8): the first all wrong (no signal), the second mixed.
    trainer._gathered_rewards = torch.tensor([[0.0, 0.3]] * 4 + [[1.0, 0.0], [0.0, 0.0], [1.0, 0.1], [0.0, 0.0]])
    trainer.num_generations = 4
    out = {
        "completion_ids": torch.ones(8, 3, dtype=torch.long),
        "completion_mask": torch.ones(8, 3, dtype=torch.long),
        "num_items_in_batch": torch.tensor(24),
    }
    trainer._drop_flat_groups(out)
    assert out["completion_mask"].sum(1).tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert out["num_items_in_batch"].item() == 12
    assert trainer._metrics["train"]["dynamic_sampling/dropped_groups_frac"][-1] == 0.5


def test_resume_continues_the_same_run(tiny_model_dir, problems, tmp_path):
    extra = ["--algorithm", "dapo", "--max_steps", "4", "--save_steps", "2"]
    straight = tmp_path / "straight"
    assert main(["rl", *rl_args(tiny_model_dir, problems, straight, *extra)]) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert main(["rl", *rl_args(tiny_model_dir, problems, resumed, *extra, "--resume_from_checkpoint", "last")]) == 0
    first = {r["step"]: r for r in records(straight)}
    second = {r["step"]: r for r in records(resumed)}
    assert sorted(second) == [3, 4]
    for step in second:
        assert second[step]["reward"] == pytest.approx(first[step]["reward"])
        assert second[step]["loss"] == pytest.approx(first[step]["loss"], abs=1e-6)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_a_lora_start_trains_only_the_adapter_against_the_starting_adapter(
    tiny_model_dir, problems, tmp_path, algorithm
):
    # grpo: the KL term (beta 0.1) uses TRL's frozen "ref" copy; dapo (beta 0): --monitor_kl makes that copy.
    from peft import get_peft_model

    from asft.models import load_model, lora_config

    adapter = tmp_path / "adapter"
    config = lora_config(4, 8, 0.0, "q_proj,v_proj")
    config.init_lora_weights = False  # a trained-looking adapter: not the identity
    get_peft_model(load_model(str(tiny_model_dir)), config).save_pretrained(adapter)
    extra = ["--beta", "0.1"] if algorithm == "grpo" else ["--dynamic_sampling", "false"]
    trainer, *_ = prepare(
        rl_args(
            adapter,
            problems,
            tmp_path / "rl",
            "--algorithm",
            algorithm,
            *extra,
            "--max_steps",
            "1",
            "--base_model",
            str(tiny_model_dir),
        )
    )
    before = weights(trainer.model)
    trainer.train()
    moved = changed(before, weights(trainer.model))
    assert moved and all(".default." in k for k in moved), moved  # neither the base nor the "ref" copy
    start = load_file(adapter / "adapter_model.safetensors")
    ref = {k: v for k, v in trainer.model.state_dict().items() if ".ref." in k}
    assert len(ref) == len(start)
    for key, value in start.items():  # the reference adapter is the starting adapter
        torch.testing.assert_close(ref[key.replace(".weight", ".ref.weight")], value)
    assert "kl" in records(tmp_path / "rl")[0]


def test_a_merged_adapter_start_trains_all_weights_against_the_merged_model(tiny_model_dir, problems, tmp_path):
    from peft import get_peft_model

    from asft.models import load_model, lora_config

    adapter = tmp_path / "adapter"
    config = lora_config(4, 8, 0.0, "q_proj,v_proj")
    config.init_lora_weights = False
    get_peft_model(load_model(str(tiny_model_dir)), config).save_pretrained(adapter)
    out = tmp_path / "rl"
    trainer, *_ = prepare(
        rl_args(
            adapter,
            problems,
            out,
            "--algorithm",
            "grpo",
            "--beta",
            "0.1",
            "--max_steps",
            "1",
            "--base_model",
            str(tiny_model_dir),
            "--merge_adapter",
            "true",
        )
    )
    assert not hasattr(trainer.model, "peft_config")
    merged = load_file(out / "start-merged" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    ref = trainer.ref_model.state_dict()
    assert all(torch.equal(ref[k], merged[k]) for k in merged)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter was merged in


# ------------------------------------------------------------------------------------------------------- errors


def test_bad_rows_and_flags_give_one_line_errors(tiny_model_dir, problems, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "1+1?", "answer": "#### 2"})
        + "\n"
        + json.dumps({"question": "2+2?", "answer": "four"})
        + "\n"
    )
    cases = [
        (rl_args(tiny_model_dir, bad, tmp_path / "o1"), f"{bad}:2: field 'answer'"),
        (rl_args(tiny_model_dir, bad, tmp_path / "o2", "--num_generation", "4"), "did you mean --num_generations"),
        (rl_args(tiny_model_dir, bad, tmp_path / "o3", "--algorithm", "ppo"), "algorithm: 'ppo'"),
        (rl_args(tiny_model_dir, bad, tmp_path / "o4", "--beta", "lots"), "--beta"),
        (rl_args(tiny_model_dir, problems, tmp_path / "o5", "--reward_funcs", "nosuchmodule:f"), "reward_funcs"),
        (rl_args(tiny_model_dir, problems, tmp_path / "o6", "--num_generations", "3"), "divisible by num_generations"),
    ]
    for argv, expected in cases:
        assert main(["rl", *argv]) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


# ----------------------------------------------------------------------------------------------- run safety


def test_a_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tiny_model_dir, problems, tmp_path):
    from transformers import TrainerCallback

    from asft.errors import TrainingDivergedError
    from asft.training.checkpoints import last_checkpoint

    class PoisonReference(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                trainer.ref_model.lm_head.weight[:] = float("nan")  # the KL term goes NaN at the next step

    trainer, *_ = prepare(
        rl_args(
            tiny_model_dir,
            problems,
            tmp_path / "rl",
            "--algorithm",
            "grpo",
            "--beta",
            "0.1",
            "--max_steps",
            "3",
            "--save_steps",
            "1",
        )
    )
    trainer.add_callback(PoisonReference())
    with pytest.raises(TrainingDivergedError, match="step 2") as err:
        trainer.train()
    assert "checkpoint-1" in str(err.value) and last_checkpoint(tmp_path / "rl").name == "checkpoint-1"


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_model_dir, problems, tmp_path):
    import os
    import signal

    from asft.training.checkpoints import last_checkpoint
    from conftest import sigterm_once_logging

    (tmp_path / "rew.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) % 7 / 7 for c in completions]\n"
    )
    out = tmp_path / "rl"
    argv = rl_args(
        tiny_model_dir, problems, out, "--max_steps", "100000", "--save_strategy", "no", "--reward_funcs", "rew:length"
    )
    returncode, output = sigterm_once_logging(["rl", *argv], out / "metrics.jsonl", cwd=tmp_path)
    assert returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "--resume_from_checkpoint last" in output
    checkpoint = last_checkpoint(out)
    assert checkpoint is not None and (checkpoint / "model.safetensors").exists()
    step = int(checkpoint.name.split("-")[1])
    os.chdir(tmp_path)  # rew.py is imported from the working directory
    try:
        assert (
            main(
                [
                    "rl",
                    *rl_args(
                        tiny_model_dir,
                        problems,
                        out,
                        "--max_steps",
                        str(step + 1),
                        "--save_strategy",
                        "no",
                        "--reward_funcs",
                        "rew:length",
                        "--resume_from_checkpoint",
                        "last",
                    ),
                ]
            )
            == 0
        )
    finally:
        os.chdir(Path(__file__).parent)
    assert max(r["step"] for r in records(out)) == step + 1


def test_use_vllm_without_vllm_is_one_line(tiny_model_dir, problems, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM can run here")
    assert main(["rl", *rl_args(tiny_model_dir, problems, tmp_path / "o", "--use_vllm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use_vllm: needs" in err[0], err


def test_rl_finishes_as_train_does(tiny_model_dir, problems, tmp_path, capsys):
    """Usage line, bare booleans, no FutureWarning, a summary, 'Resuming from', no number for an undefined metric,
    and a run `asft compare` reads (mode, learning rate, reward)."""
    assert main(["rl", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: asft rl")
    out = tmp_path / "rl"
    # The math reward never fires on the random model: every group is flat, dynamic sampling drops them all.
    extra = ["--algorithm", "dapo", "--max_steps", "2", "--save_steps", "1", "--bf16", "--monitor_kl", "false"]
    argv = ["rl", *rl_args(tiny_model_dir, problems, out, *extra, reward_funcs_off=True)]
    run = subprocess.run([sys.executable, "-m", "asft.cli", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Done: 2 steps in" in run.stdout and "final step: reward" in run.stdout
    assert "FutureWarning" not in run.stderr, run.stderr
    for rec in records(out):
        assert rec["dynamic_sampling/dropped_groups_frac"] == 1.0
        assert "entropy" not in rec and not any(k.startswith("clip_ratio/") for k in rec), rec
    shutil.rmtree(out / "checkpoint-2")
    argv = rl_args(tiny_model_dir, problems, out, *extra, "--resume_from_checkpoint", "last", reward_funcs_off=True)
    before = json.loads((out / "checkpoint-1" / "asft_totals.json").read_text())["runtime"]
    assert main(["rl", *argv]) == 0
    printed = capsys.readouterr().out
    assert "Resuming from checkpoint-1 (step 1 of 2)" in printed
    # The summary covers the whole run: the first part's time (recorded in the checkpoint) plus the resumed part's.
    resumed_part = [
        r["train_runtime"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "train_runtime" in r
    ][-1]
    whole = float(re.search(r"Done: 2 steps in ([\d.]+) s", printed).group(1))
    assert whole == pytest.approx(before + resumed_part, abs=0.06)  # both printed / logged to 0.1 s or better
    assert main(["compare", str(out), "--output_dir", str(tmp_path / "cmp")]) == 0
    (row,) = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert row["mode"] == "rl:dapo" and row["learning_rate"] == 1e-3 and row["final"]["reward"] == -1.0
