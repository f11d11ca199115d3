"""`asft train` / `asft merge-lora` end to end on a tiny model, and argument handling."""

import json

import pytest
import torch

from asft.cli import main
from asft.cli.train import parse_train_args
from asft.errors import ConfigError
from asft.objectives import MODES, needs_reference
from conftest import cli_args, train_cmd, write_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [
        {"instruction": f"what is {a} + {b}", "response": f"The answer is {a + b}"} for a in range(3) for b in range(3)
    ]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def train_args(model_dir, data_file, out, *extra):
    flags = "--max_steps 2 --per_device_train_batch_size 4 --learning_rate 1e-3 --save_strategy no"
    return train_cmd(model_dir, data_file, out, *flags.split(), *extra)


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
        for key in (
            "loss",
            "nll",
            "weighted_nll",
            "mean_prob",
            "mean_weight",
            "frac_weight_below_0.1",
            "entropy",
            "token_accuracy",
            "grad_norm",
            "learning_rate",
        ):
            assert key in record, key
        assert ("kl" in record) == needs_reference(mode)  # an anchor, or a rule reading the reference (prift)


def test_merge_lora_equals_peft_merge(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    assert (
        main(train_args(tiny_model_dir, data_file, adapter, "--use_lora", "--lora_target_modules", "all-linear")) == 0
    )
    merged_dir = tmp_path / "merged"
    assert (
        main(cli_args("merge-lora", base_model_path=tiny_model_dir, lora_model_path=adapter, output_dir=merged_dir))
        == 0
    )
    ours = AutoModelForCausalLM.from_pretrained(merged_dir)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    theirs = theirs.merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.arange(4, 20)[None]
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert not torch.allclose(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    # merging again into the same folder is refused: nothing written is overwritten silently
    assert (
        main(cli_args("merge-lora", base_model_path=tiny_model_dir, lora_model_path=adapter, output_dir=merged_dir))
        == 2
    )


def test_paper_flags_and_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "c.yaml"
    config.write_text(
        "model_name_or_path: m\ndata_path: d.jsonl\nmode: sft+kl\nkl_weight: 0.05\n"
        "output_dir: o\nper_device_train_batch_size: 2\nglobal_batch_size: 16\nuse_lora: true\n"
    )
    script, cfg = parse_train_args([str(config), "--kl_weight", "0.1", "--model_max_length", "64"])
    assert cfg.mode == "sft_kl" and cfg.kl_weight == 0.1 and cfg.max_length == 64
    assert cfg.gradient_accumulation_steps == 4  # 16 / (2 per device x 2 processes)
    assert script.use_lora and script.model_name_or_path == "m"


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--kl_weight", "-1"], "kl_weight"),
        (["--mode", "ppo"], "mode"),
        (["--global_batch_size", "3", "--per_device_train_batch_size", "2"], "global_batch_size"),
        (["--mode", "dft", "--reference_model_path", "x"], "reference_model_path"),
        (["--kl_wieght", "1"], "kl_weight"),  # a typo gets a suggestion
        # A rule parameter the mode would ignore names both (never silently dropped).
        (["--mode", "sft", "--weight_power", "0.5"], "weight_power: mode 'sft'"),
        (["--mode", "sft_kl", "--weight_floor", "0.1"], "weight_floor: mode 'sft_kl'"),
        (["--mode", "dft", "--eaft_topk", "5"], "eaft_topk: mode 'dft'"),
        (["--mode", "prift", "--eaft_power", "2"], "eaft_power: mode 'prift'"),
        (["--mode", "eaft", "--weight_power", "0.5"], "weight_power: mode 'eaft'"),
        (["--mode", "asft", "--anchor", "false"], "anchor: mode 'asft'"),
        (["--mode", "eaft", "--eaft_topk", "0"], "eaft_topk"),
    ],
)
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


def test_rule_flags_and_the_anchor():
    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o"]
    _, cfg = parse_train_args(base + ["--mode", "eaft", "--eaft_topk", "10", "--eaft_power", "0.5"])
    assert (cfg.objective.topk, cfg.objective.eaft_power, cfg.objective.anchored) == (10, 0.5, False)
    assert not cfg.needs_reference  # EAFT reads only the policy
    _, cfg = parse_train_args(base + ["--mode", "eaft", "--anchor"])
    assert cfg.objective.anchored and cfg.needs_reference
    _, cfg = parse_train_args(base + ["--mode", "prift", "--weight_floor", "0.05"])
    assert cfg.needs_reference and not cfg.objective.anchored  # the prior, without the KL term
    _, cfg = parse_train_args(base + ["--mode", "dft", "--anchor", "--weight_power", "0.5"])
    assert cfg.objective.anchored and cfg.objective.weight_power == 0.5


def test_resume_refuses_a_changed_weight_rule(tmp_path):
    from asft.errors import UsageError
    from asft.io import RUN_FILE
    from asft.training.callbacks import run_settings
    from asft.training.checkpoints import check_resume

    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path)]
    _, before = parse_train_args(base + ["--mode", "dft", "--weight_power", "0.5"])
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    (checkpoint / RUN_FILE).write_text(json.dumps(run_settings(before)))
    check_resume(str(checkpoint), before, False)  # the same settings: fine
    for flags, field in [
        (["--mode", "dft", "--weight_power", "0.25"], "weight_power: 0.5 -> 0.25"),
        (["--mode", "dft", "--weight_power", "0.5", "--weight_floor", "0.1"], "weight_floor"),
        (["--mode", "dft", "--weight_power", "0.5", "--anchor"], "anchor: None -> True"),
    ]:
        _, now = parse_train_args(base + flags)
        with pytest.raises(UsageError, match=field):
            check_resume(str(checkpoint), now, False)
        check_resume(str(checkpoint), now, True)  # --accept_changed_settings


@pytest.mark.parametrize("name", ["sft", "dft", "sft_kl", "asft", "iw_sft", "eaft", "prift", "dft_power", "quickstart"])
def test_shipped_examples_parse(name):
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / f"{name}.yaml"
    script, cfg = parse_train_args([str(example), "--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o"])
    assert cfg.mode == {"quickstart": "asft", "dft_power": "dft"}.get(name, name)


# ------------------------------------------------------------------------------ one line, before the model loads


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asft train: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--mode", "ppo"], "sft, dft, sft_kl, asft, iw_sft"),  # an invalid choice lists the choices
        (["--kl_direction", "sideways"], "forward"),
        (["--learning_rate", "abc"], "invalid float value: 'abc'"),
        (["--mode", "asft", "--loss_type", "dft"], "conflicting values"),  # two spellings, two objectives
        (["--mode", "asft", "--loss-type", "dft"], "conflicting values"),
        (["--max_length", "64", "--model_max_length", "128"], "conflicting values"),
        (["--report_to", "surely_not_a_tracker"], "tensorboard"),  # lists the integrations
        (["--eval_strategy", "steps"], "--eval_data_path"),
        (["--use_lora", "--lora_target_modules", "nonexistent_module"], "q_proj"),  # lists the modules that exist
        (["--mode", "iw_sft", "--packing", "true"], "--iw_level token"),
    ],
)
def test_mistakes_get_one_line_before_loading(
    tiny_model_dir, data_file, tmp_path, capsys, monkeypatch, extra, expected
):
    import asft.models

    monkeypatch.setattr(asft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert expected in _one_line_error(capsys, train_args(tiny_model_dir, data_file, tmp_path / "out", *extra))


def test_missing_tracking_package_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        parse_train_args(["--model_name_or_path", "m", "--data_path", "d", "--report_to", "tensorboard"])


def test_missing_yaml_file_is_one_line(capsys, tmp_path):
    assert "cannot read the config file" in _one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")])


def test_help_names_the_command(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: asft train") and "nll,dft,chunked_nll" not in out


def test_loss_type_is_an_alias_of_mode():
    for flag in ("--loss_type", "--loss-type"):
        _, config = parse_train_args(["--model_name_or_path", "m", "--data_path", "d", flag, "dft"])
        assert config.mode == "dft" and config.loss_type == "nll"  # TRL must not apply its own DFT loss
    from asft import AnchoredSFTConfig

    with pytest.raises(ConfigError, match="conflicts"):
        AnchoredSFTConfig(output_dir="o", mode="asft", loss_type="dft")


def test_boolean_flags_take_the_bare_and_the_valued_form():
    base = ["--model_name_or_path", "m", "--data_path", "d"]
    for argv in (["--bf16"], ["--bf16", "true"], ["--bf16=true"]):
        _, config = parse_train_args(base + argv)
        assert config.bf16 is True
    _, config = parse_train_args(base + ["--gradient_checkpointing", "--bf16", "false"])
    assert config.gradient_checkpointing is True and config.bf16 is False
    _, config = parse_train_args(base + ["--use_lora"])


def test_one_max_length_default_and_a_truncation_report(tiny_model_dir, tmp_path, capsys):
    from asft.cli.data import _parser
    from asft.cli.train import ScriptArguments

    _, config = parse_train_args(["--model_name_or_path", "m", "--data_path", "d"])
    inspect_default = _parser().parse_args(["inspect", "f", "--model", "m"]).max_length
    assert config.max_length == inspect_default and ScriptArguments.model_max_length is None
    data = tmp_path / "long.jsonl"
    rows = [{"instruction": "q", "response": "the quick brown fox " * 40}] + [
        {"instruction": "q", "response": "ok"}
    ] * 3
    write_jsonl(data, rows)
    with pytest.warns(UserWarning, match=r"1 of 4 examples truncated \(25.0%\)"):
        assert (
            main(train_args(tiny_model_dir, data, tmp_path / "out", "--model_max_length", "48", "--mode", "sft")) == 0
        )


def test_bf16_trains_on_cpu(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    assert main(train_args(tiny_model_dir, data_file, out, "--mode", "sft", "--bf16", "--learning_rate", "1e-2")) == 0
    from safetensors.torch import load_file

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    moved = sum((before[k] != after[k]).float().mean().item() for k in before) / len(before)
    assert moved > 0.5  # mixed precision with float32 master weights: most weights change


def test_a_run_says_what_it_did(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        a
        for a in train_args(tiny_model_dir, data_file, out, "--mode", "asft", "--kl_weight", "0.07", "--use_lora")
        if a != "--logging_steps" and a != "1"
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "LoRA:" in printed and "trainable parameters" in printed
    assert "Done: 2 steps" in printed and str(out / "metrics.jsonl") in printed
    assert len([r for r in logged(out) if "nll" in r]) == 2  # every step is logged by default
    card = (out / "README.md").read_text()
    assert str(tiny_model_dir) in card and "None" not in card.split("---")[2].split("|")[0]
    assert "`asft`" in card and "kl_weight 0.07" in card and "KL(reference || policy)" in card
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_response_tokens"] > 0 and "train_runtime" in results
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_no_output_dir_says_where_the_run_goes(tiny_model_dir, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in train_args(tiny_model_dir, data_file, "x", "--mode", "sft") if a not in ("--output_dir", "x")]
    assert main(argv) == 0
    assert f"the run goes to {tmp_path / 'trainer_output'}" in capsys.readouterr().out


def test_padding_free_without_packing_trains(tiny_model_dir, data_file, tmp_path):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "out", "--mode", "sft", "--padding_free", "true")) == 0


def test_unknown_model_offline_is_one_line(data_file, capsys):
    err = _one_line_error(
        capsys, ["train", "--model_name_or_path", "nobody/no-such-model", "--data_path", str(data_file)]
    )
    assert "nobody/no-such-model" in err


# ------------------------------------------------- issue 24: numbers refused before any model loads, in one place


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--max_steps", "0"], "max_steps"),
        (["--max_steps", "-5", "--num_train_epochs", "0"], "max_steps"),
        (["--num_train_epochs", "-1"], "num_train_epochs"),
        (["--kl_weight", "nan"], "kl_weight"),
        (["--kl_weight", "inf"], "kl_weight"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        (["--warmup_steps", "-1"], "warmup_steps"),
        (["--bf16", "--fp16"], "bf16"),
        (["--use_lora", "--lora_r", "0"], "lora_r"),
        (["--lora_dropout", "1.5"], "lora_dropout"),
    ],
)
def test_train_numbers_out_of_range_are_one_line_before_loading(tmp_path, capsys, flags, field):
    # The model does not exist: a check that ran after the model load would say so instead.
    argv = train_cmd(tmp_path / "no-model", tmp_path / "no.jsonl", tmp_path / "out", *flags)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: --{field}" in err, err


@pytest.mark.parametrize(
    "argv, field",
    [
        (["rl", "--model_name_or_path", "m", "--data_path", "d", "--num_generations", "0"], "num_generations"),
        (
            ["rl", "--model_name_or_path", "m", "--data_path", "d", "--max_completion_length", "0"],
            "max_completion_length",
        ),
        (
            ["cache-reference", "--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", "--top_k", "0"],
            "top_k",
        ),
        (["cache-reference", "--model_name_or_path", "m", "--batch_size", "0"], "batch_size"),
        (
            ["eval", "--task", "math", "--model", "m", "--data", "d", "--output_dir", "o", "--num_samples", "0"],
            "num_samples",
        ),
        (
            ["eval", "--task", "math", "--model", "m", "--data", "d", "--output_dir", "o", "--temperature", "nan"],
            "temperature",
        ),
    ],
)
def test_every_command_checks_its_numbers(capsys, argv, field):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --{field}:" in err, err


def test_merge_lora_with_a_missing_base_is_one_line(tiny_model_dir, data_file, tmp_path, capsys):
    lora = tmp_path / "lora"
    assert main(train_args(tiny_model_dir, data_file, lora, "--mode", "sft", "--use_lora")) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "merge-lora",
                "--base_model_path",
                "nope",
                "--lora_model_path",
                str(lora),
                "--output_dir",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "base_model_path: nope" in capsys.readouterr().err


def test_output_dir_that_is_a_file_names_the_flag(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(train_args(tiny_model_dir, data_file, out, "--mode", "sft")) == 2
    assert "output_dir:" in capsys.readouterr().err


# ------------------------------------------------- issue 24: conflicting or ignored flags are errors naming both


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--global_batch_size", "16", "--gradient_accumulation_steps", "2"], "gradient_accumulation_steps"),
        (["--mode", "sft", "--reference_cache", "c/"], "reference_cache: mode 'sft'"),
        (["--mode", "sft", "--kl_weight", "0.5"], "kl_weight: mode 'sft'"),
        (["--mode", "asft", "--iw_level", "token"], "iw_level: mode 'asft'"),
        (["--mode", "iw_sft", "--iw_level", "token", "--iw_max", "5"], "iw_max: --iw_level token"),
        (["--use_lora", "false", "--lora_r", "64"], "lora_r: only used with --use_lora"),
    ],
)
def test_conflicting_or_ignored_flags_are_refused(flags, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_train_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", *flags])


def test_token_level_iw_sft_does_not_print_iw_max(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "o", "--mode", "iw_sft", "--iw_level", "token")) == 0
    printed = capsys.readouterr().out
    assert "token-level weights (ratio clamped to [0.2, 1.8])" in printed and "iw_max" not in printed


# ---------------------------------------------------------------------------------------- issue 24, item 10


def test_a_yaml_typo_names_the_file_and_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mode: asft\n# a comment\nkl_wieght: 0.05\n")
    with pytest.raises(ConfigError, match=rf"{config}:3: unknown key 'kl_wieght' \(did you mean kl_weight\?\)"):
        parse_train_args([str(config), "--model_name_or_path", "m", "--data_path", "d"])


def test_a_run_whose_only_step_is_at_lr_0_is_refused(tiny_model_dir, data_file, tmp_path, capsys):
    # The shipped examples (global batch 256, warmup 0.1) on a small file: one step, the warmup's first.
    flags = ["--global_batch_size", "256", "--warmup_steps", "0.1", "--num_train_epochs", "1"]
    argv = train_cmd(tiny_model_dir, data_file, tmp_path / "o", "--per_device_train_batch_size", "4", *flags)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "fewer than one optimizer step takes (256" in captured.out
    assert "warmup_steps: the run has 1 optimizer step" in captured.err


def test_warnings_are_one_line_without_source(tiny_model_dir, data_file, tmp_path):
    import subprocess
    import sys

    argv = train_args(tiny_model_dir, data_file, tmp_path / "o", "--mode", "asft", "--kl_weight", "0")
    run = subprocess.run([sys.executable, "-m", "asft.cli", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if "kl_weight=0" in x]
    assert line.startswith("UserWarning: kl_weight=0 takes the KL anchor out of mode 'asft'")
    assert "warnings.warn(" not in run.stderr
