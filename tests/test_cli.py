"""`asft train` / `asft merge-lora` end to end on a tiny model, and argument handling."""

import json

import pytest
import torch

from asft.cli import main, parse_train_args
from asft.errors import ConfigError
from asft.objectives import MODES


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"what is {a} + {b}", "response": f"The answer is {a + b}"}
            for a in range(3) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(model_dir, data_file, out, *extra):
    return ["train", "--model_name_or_path", str(model_dir), "--data_path", str(data_file), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", *extra]


def logged(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lora", [False, True])
def test_train_every_mode(tiny_model_dir, data_file, tmp_path, mode, lora):
    out = tmp_path / "out"
    extra = ["--mode", mode] + (["--use_lora", "--lora_r", "4"] if lora else [])
    assert main(train_args(tiny_model_dir, data_file, out, *extra)) == 0
    assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()
    steps = [r for r in logged(out) if "nll" in r]
    assert len(steps) == 2
    for record in steps:
        for key in ("loss", "nll", "weighted_nll", "mean_prob", "mean_weight", "entropy", "token_accuracy",
                    "grad_norm", "learning_rate"):
            assert key in record, key
        assert ("kl" in record) == (mode in ("sft_kl", "asft", "iw_sft"))


def test_merge_lora_equals_peft_merge(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    assert main(train_args(tiny_model_dir, data_file, adapter, "--use_lora", "--lora_target_modules",
                           "all-linear")) == 0
    merged_dir = tmp_path / "merged"
    assert main(["merge-lora", "--base_model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                 "--output_dir", str(merged_dir)]) == 0
    ours = AutoModelForCausalLM.from_pretrained(merged_dir)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    theirs = theirs.merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.arange(4, 20)[None]
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert not torch.allclose(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    # merging again into the same folder is refused: nothing written is overwritten silently
    assert main(["merge-lora", "--base_model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                 "--output_dir", str(merged_dir)]) == 2


def test_paper_flags_and_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ndata_path: d.jsonl\nmode: sft+kl\nkl_weight: 0.05\n"
                      "output_dir: o\nper_device_train_batch_size: 2\nglobal_batch_size: 16\nuse_lora: true\n")
    script, cfg = parse_train_args([str(config), "--kl_weight", "0.1", "--model_max_length", "64"])
    assert cfg.mode == "sft_kl" and cfg.kl_weight == 0.1 and cfg.max_length == 64
    assert cfg.gradient_accumulation_steps == 4  # 16 / (2 per device x 2 processes)
    assert script.use_lora and script.model_name_or_path == "m"


@pytest.mark.parametrize("argv,field", [
    (["--kl_weight", "-1"], "kl_weight"),
    (["--mode", "ppo"], "mode"),
    (["--global_batch_size", "3", "--per_device_train_batch_size", "2"], "global_batch_size"),
    (["--mode", "dft", "--reference_model_path", "x"], "reference_model_path"),
    (["--kl_wieght", "1"], "kl_weight"),  # a typo gets a suggestion
])
def test_bad_arguments_are_rejected_before_loading(argv, field):
    with pytest.raises((ConfigError, SystemExit)) as err:
        parse_train_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", *argv])
    if err.type is not SystemExit:
        assert field in str(err.value)


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": 7}\n')
    assert main(train_args(tiny_model_dir, bad, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "response" in err and "Traceback" not in err


def test_output_dir_with_another_run_is_refused(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(tiny_model_dir, data_file, out, "--mode", "sft")) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(train_args(tiny_model_dir, data_file, out, "--mode", "sft")) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["sft", "dft", "sft_kl", "asft", "iw_sft", "quickstart"])
def test_shipped_examples_parse(name):
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / f"{name}.yaml"
    script, cfg = parse_train_args([str(example), "--model_name_or_path", "m", "--data_path", "d",
                                    "--output_dir", "o"])
    assert cfg.mode == (name if name != "quickstart" else "asft")
