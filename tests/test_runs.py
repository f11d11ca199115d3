"""Runs that never lose work: exact resume, graceful SIGTERM, NaN detection, checkpoints cut short by a kill."""

import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from asft import AnchoredSFTConfig, AnchoredSFTTrainer
from asft.cli import main
from asft.errors import TrainingDivergedError
from asft.training.checkpoints import last_checkpoint
from conftest import build_model, sigterm_once_logging, train_cmd, write_jsonl
from test_trainer import uneven_dataset


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"add {a} and {b}", "response": f"{a} + {b} = {a + b}"} for a in range(3) for b in range(3)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def args_for(model_dir, data_file, out, *extra):
    flags = "--per_device_train_batch_size 2 --learning_rate 5e-3 --lr_scheduler_type linear --seed 3"
    return train_cmd(model_dir, data_file, out, *flags.split(), *extra)


def losses(out):
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "nll" in r
    }


@pytest.mark.parametrize("lora", [False, True])
def test_resume_continues_the_same_run(tiny_model_dir, data_file, tmp_path, lora):
    extra = ["--max_steps", "6", "--save_steps", "3", "--mode", "asft"] + (["--use_lora"] if lora else [])
    straight = tmp_path / "straight"
    assert main(args_for(tiny_model_dir, data_file, straight, *extra)) == 0
    # A second run that only got as far as the step-3 checkpoint, then resumed (9 examples / 2 per step:
    # the resume crosses an epoch boundary, so data order and the LR schedule must both be restored).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert main(args_for(tiny_model_dir, data_file, resumed, *extra, "--resume_from_checkpoint", "last")) == 0
    first, second = losses(straight), losses(resumed)
    assert sorted(second) == [4, 5, 6]
    for step in second:
        assert second[step] == pytest.approx(first[step], rel=1e-5)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(straight / name), load_file(resumed / name)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_sigterm_saves_and_exits_cleanly(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    returncode, output = sigterm_once_logging(
        args_for(tiny_model_dir, data_file, out, "--max_steps", "100000", "--save_strategy", "no", "--mode", "sft"),
        out / "metrics.jsonl",
    )
    assert returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "--resume_from_checkpoint last" in output
    checkpoint = last_checkpoint(out)
    assert checkpoint is not None and (checkpoint / "model.safetensors").exists()
    step = int(checkpoint.name.split("-")[1])
    assert (
        main(
            args_for(
                tiny_model_dir,
                data_file,
                out,
                "--max_steps",
                str(step + 2),
                "--save_strategy",
                "no",
                "--mode",
                "sft",
                "--resume_from_checkpoint",
                "last",
                "--accept_changed_settings",  # a shorter run than the stopped one's 100000 steps
            )
        )
        == 0
    )
    assert max(losses(out)) == step + 2


def small_trainer(tokenizer, tmp_path, callbacks=(), **kwargs):
    quiet = dict(report_to="none", disable_tqdm=True, use_cpu=True)
    args = AnchoredSFTConfig(
        output_dir=str(tmp_path / "out"), mode="asft", per_device_train_batch_size=2, **quiet, **kwargs
    )
    data = uneven_dataset(tokenizer)
    return AnchoredSFTTrainer(
        build_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer, callbacks=list(callbacks)
    )


def test_nan_names_the_step_and_the_term(tokenizer, tmp_path):
    from transformers import TrainerCallback

    class PoisonReference(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    trainer.ref_model.lm_head.weight[3] = float("nan")

    trainer = small_trainer(tokenizer, tmp_path, [PoisonReference()], max_steps=4, save_steps=1)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.train()
    message = str(err.value)
    assert "step 3" in message and "kl" in message and "nll" not in message
    assert "checkpoint-2" in message and last_checkpoint(tmp_path / "out").name == "checkpoint-2"


def test_a_checkpoint_cut_short_is_passed_over(tokenizer, tmp_path, monkeypatch):
    trainer = small_trainer(tokenizer, tmp_path, max_steps=4, save_steps=2)
    original = type(trainer)._save_rng_state

    def killed_on_second_save(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_rng_state", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-4").exists()  # the partial folder is there ...
    assert last_checkpoint(out).name == "checkpoint-2"  # ... and `last` passes it over
    monkeypatch.undo()
    resumed = small_trainer(tokenizer, tmp_path, max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(last_checkpoint(out)))
    assert resumed.state.global_step == 4


def test_resume_after_a_kill_keeps_each_step_once_and_refuses_other_settings(
    tiny_model_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    extra = ["--max_steps", "6", "--save_steps", "3", "--mode", "asft", "--kl_weight", "0.05"]
    assert main(args_for(tiny_model_dir, data_file, out, *extra)) == 0
    # As after a kill -9 at step 6 before its checkpoint: metrics.jsonl already holds steps 4-6.
    shutil.rmtree(out / "checkpoint-6")
    capsys.readouterr()

    changed = [a if a != "0.05" else "0.1" for a in extra]
    assert main(args_for(tiny_model_dir, data_file, out, *changed, "--resume_from_checkpoint", "last")) == 2
    assert "kl_weight: 0.05 -> 0.1" in capsys.readouterr().err
    assert main(args_for(tiny_model_dir, data_file, out, *extra, "--resume_from_checkpoint", "last")) == 0
    assert "Resuming from checkpoint-3 (step 3 of 6)" in capsys.readouterr().out
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "nll" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_truncating_metrics_keeps_lines_it_cannot_read(tmp_path):
    from asft.training.callbacks import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\nnot json\n{"step": 3}\n')
    assert truncate_metrics(path, 1) == 2
    assert path.read_text() == '{"step": 1, "loss": 1}\nnot json\n'


# ------------------------------------------------------------------ issue 24: a run folder holds one run


@pytest.fixture(scope="module")
def other_data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "b.jsonl"
    rows = [{"instruction": f"double {a}", "response": f"{2 * a}"} for a in range(8)]
    write_jsonl(path, rows)
    return path


def test_overwrite_clears_the_old_run_and_resume_refuses_other_data(
    tiny_model_dir, data_file, other_data_file, tmp_path, capsys
):
    out = tmp_path / "ow"
    common = ["--mode", "sft", "--save_steps", "1"]
    assert main(args_for(tiny_model_dir, data_file, out, *common, "--max_steps", "3")) == 0
    (out / "notes.txt").write_text("mine")  # not asft's: kept
    assert (
        main(args_for(tiny_model_dir, other_data_file, out, *common, "--max_steps", "2", "--overwrite_output_dir")) == 0
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "nll" in r] == [
        1,
        2,
    ]
    capsys.readouterr()
    # The old run's checkpoint-3 is gone, and a checkpoint of other data or length is refused.
    shutil.rmtree(out / "checkpoint-2")
    cmd = args_for(tiny_model_dir, data_file, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "last")
    assert main(cmd) == 2
    assert "data_fingerprint" in capsys.readouterr().err
    longer = ["--max_steps", "3", "--resume_from_checkpoint", "last"]
    assert main(args_for(tiny_model_dir, other_data_file, out, *common, *longer)) == 2
    assert "max_steps: 2 -> 3" in capsys.readouterr().err


def test_resuming_a_finished_run_changes_nothing(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "done"
    extra = ["--mode", "sft", "--save_steps", "1", "--max_steps", "1"]
    assert main(args_for(tiny_model_dir, data_file, out, *extra)) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args_for(tiny_model_dir, data_file, out, *extra, "--resume_from_checkpoint", "last")) == 0
    printed = capsys.readouterr().out
    assert "finished the run (step 1 of 1): nothing to do" in printed and "Done" not in printed
    assert (out / "model.safetensors").read_bytes() == before
    assert not (out / "checkpoint-2").exists()


def test_a_stop_signal_after_the_last_step_saves_the_final_model(tiny_model_dir, data_file, tmp_path, monkeypatch):
    import os

    from asft.training.callbacks import GracefulStopCallback

    original = GracefulStopCallback.on_step_end

    def signal_at_the_last_step(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)  # handled (by the callback) before the next line runs
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(GracefulStopCallback, "on_step_end", signal_at_the_last_step)
    out = tmp_path / "late"
    assert main(args_for(tiny_model_dir, data_file, out, "--mode", "sft", "--max_steps", "2", "--save_steps", "5")) == 0
    assert (out / "model.safetensors").exists() and (out / "all_results.json").exists()


def test_adapters_record_an_absolute_base_and_a_missing_base_names_the_flag(
    tiny_model_dir, data_file, tmp_path, monkeypatch
):
    from asft.errors import ModelLoadError
    from asft.models import load_model

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "tiny")
    monkeypatch.chdir(work)
    extra = ["--mode", "sft", "--max_steps", "1", "--use_lora", "--save_strategy", "no"]
    assert main(train_cmd("tiny", data_file, "lora", *extra)) == 0
    base = str((work / "tiny").resolve())
    assert json.loads((work / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert json.loads((work / "lora" / "asft_run.json").read_text())["base_model"] == base
    assert f"`{base}`" in (work / "lora" / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    load_model(str(work / "lora"))  # from another directory
    shutil.rmtree(work / "tiny")
    with pytest.raises(ModelLoadError, match="--base_model"):
        load_model(str(work / "lora"))


def test_an_interrupt_while_loading_is_one_line(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    import asft.models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(asft.models, "load_model", interrupted)
    assert main(args_for(tiny_model_dir, data_file, tmp_path / "o", "--mode", "sft", "--max_steps", "1")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted; stopped before training began" in err[0], err


def test_a_second_stop_signal_stops_at_once_naming_the_last_checkpoint(tmp_path):
    import os
    from types import SimpleNamespace

    from asft.errors import StoppedWithoutCheckpoint
    from asft.training.callbacks import GracefulStopCallback

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    stopper = GracefulStopCallback(last_checkpoint)
    stopper.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), None, None)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.signum == signal.SIGINT
        with pytest.raises(
            StoppedWithoutCheckpoint, match="stopping without a checkpoint; the last checkpoint is .*checkpoint-4"
        ):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stopper.on_train_end(None, None, None)


def test_the_summary_after_a_resume_covers_the_whole_run(tiny_model_dir, data_file, tmp_path, capsys):
    extra = ["--max_steps", "6", "--save_steps", "3", "--mode", "sft"]
    straight = tmp_path / "straight"
    assert main(args_for(tiny_model_dir, data_file, straight, *extra)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    with (resumed / "metrics.jsonl").open("a") as f:  # the summary a run stopped at step 3 by SIGTERM writes
        f.write(json.dumps({"step": 3, "train_runtime": 1.0, "train_loss": 9.0}) + "\n")
    capsys.readouterr()
    assert main(args_for(tiny_model_dir, data_file, resumed, *extra, "--resume_from_checkpoint", "last")) == 0
    assert "Done: 6 steps" in capsys.readouterr().out
    a, b = (json.loads((run / "all_results.json").read_text()) for run in (straight, resumed))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["train_response_tokens"] == a["train_response_tokens"]
    assert b["train_runtime"] > json.loads((straight / "checkpoint-3" / "asft_totals.json").read_text())["runtime"]
    summaries = [
        r for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines()) if "train_runtime" in r
    ]
    assert len(summaries) == 1 and summaries[0]["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
