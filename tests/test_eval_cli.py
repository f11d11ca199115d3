"""`asft eval` plumbing: help text, the vLLM clear error, model loading (folders and adapters), left-padded
batching, the resume store, and the report format."""

import argparse
import json

import pytest
import torch

from asft.cli import main as asft_main
from asft.cli.eval import main
from asft.data.templates import render_prompt
from asft.evaluation import EvalError
from asft.evaluation.driver import build_parser
from asft.evaluation.generation import GenSettings, HFBackend
from asft.evaluation.report import DatasetResult, markdown_table, write_results
from asft.evaluation.store import Store
from asft.models import load_model_and_tokenizer as load_model
from conftest import build_model, build_tokenizer


def test_help_describes_every_flag(capsys):
    assert asft_main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, action.dest
        for flag in action.option_strings:
            assert flag in text, flag


def test_vllm_missing_is_one_clear_line(tmp_path, capsys):
    code = asft_main(
        [
            "eval",
            "--model",
            "m",
            "--task",
            "math",
            "--data",
            str(tmp_path / "none.jsonl"),
            "--output_dir",
            str(tmp_path / "o"),
            "--backend",
            "vllm",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "vllm" in err and "--backend hf" in err and "none.jsonl" not in err


def test_vllm_without_gpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        main(
            ["--model", "m", "--task", "math", "--data", "x.jsonl", "--output_dir", str(tmp_path), "--backend", "vllm"]
        )
        == 2
    )
    assert "CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "math", "--num_samples", "0"], "--num_samples"),
        (["--task", "judge", "--num_samples", "2", "--temperature", "1"], "one output per instruction"),
        (["--task", "medical", "--top_p", "0"], "--top_p"),
    ],
)
def test_bad_flags(tmp_path, capsys, argv, message):
    assert main(["--model", "m", "--data", "x.jsonl", "--output_dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_or_unknown_data_file(tmp_path, capsys):
    base = ["--model", "m", "--task", "math", "--output_dir", str(tmp_path / "o")]
    assert main(base + ["--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "hello"}\n')
    assert main(base + ["--data", str(odd)]) == 2
    assert f"{odd}:1: unknown format (keys: text)" in capsys.readouterr().err


def test_alpaca_template_is_the_papers_evaluation_text(tokenizer):
    # The paper's evaluation code ends its prompt with "### Response:" and a newline; its training script (and
    # asft train) with no newline.
    assert render_prompt("Do it", "alpaca", tokenizer, "ctx").endswith("### Input:\nctx\n\n### Response:\n")
    assert render_prompt("Do it", "alpaca", tokenizer).endswith("### Instruction:\nDo it\n\n### Response:\n")
    assert render_prompt("Do it", "chat", tokenizer) == "<|im_start|>user\nDo it<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt("Do it", "none", tokenizer) == "Do it"


def test_load_model_folder_and_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    tok.pad_token = None
    plain = tmp_path / "no-pad"
    build_model(tok).save_pretrained(plain)
    tok.save_pretrained(plain)
    model, tokenizer = load_model(str(plain))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    assert next(model.parameters()).dtype == torch.float32 and not model.training

    adapter = tmp_path / "adapter"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    ).save_pretrained(adapter)
    model, tokenizer = load_model(str(adapter))  # no tokenizer in the adapter folder: the base's
    assert isinstance(model, PeftModel) and tokenizer.chat_template
    merged, _ = load_model(str(adapter), merge_adapter=True, base_model=str(tiny_model_dir))
    assert not isinstance(merged, PeftModel)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-5)


def test_left_padded_batches_match_single_prompts(tokenizer):
    torch.manual_seed(0)
    backend = HFBackend(build_model(tokenizer, seed=3), tokenizer)
    prompts = [tokenizer.encode(t) for t in ("the quick brown fox", "A.", "what is the sum of two numbers")]
    batched = backend.next_token_logprobs(prompts, [5, 36, 37])
    for p, row in zip(prompts, batched):
        assert backend.next_token_logprobs([p], [5, 36, 37])[0] == pytest.approx(row, abs=1e-5)
    s = GenSettings(max_new_tokens=6)
    assert backend.generate(prompts, s) == [backend.generate([p], s)[0] for p in prompts]


def test_store_resumes_and_refuses(tmp_path):
    settings, data = {"task": "math", "temperature": 0.0}, {"gsm8k": "abc"}
    store = Store(tmp_path, settings, data)
    store.put_many([("gsm8k", 0, [{"completion": "1"}]), ("gsm8k", 1, [{"completion": "2"}])])
    with (tmp_path / "generations.jsonl").open("a") as f:
        f.write('{"dataset": "gsm8k", "index": 2, "sam')  # killed mid-write
    again = Store(tmp_path, settings, {**data, "math": "def"})  # a new file joins the same run
    assert again.get("gsm8k", 1) == [{"completion": "2"}] and again.get("gsm8k", 2) is None
    again.put("gsm8k", 2, [{"completion": "3"}])
    assert Store(tmp_path, settings, data).get("gsm8k", 2) == [{"completion": "3"}]
    with pytest.raises(EvalError, match="temperature: 0.0 -> 0.7"):
        Store(tmp_path, {**settings, "temperature": 0.7}, data)
    with pytest.raises(EvalError, match="different version of data file"):
        Store(tmp_path, settings, {"gsm8k": "changed"})
    (tmp_path / "notes.txt").write_text("mine")
    Store(tmp_path, {**settings, "temperature": 0.7}, data, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only our own files are discarded
    assert not (tmp_path / "generations.jsonl").exists()


def test_report_format(tmp_path):
    results = [
        DatasetResult(
            "a",
            "a.jsonl",
            "medqa",
            "accuracy",
            0.5,
            4,
            predictions=[{"index": 0, "prediction": "B", "gold": "B", "correct": True}],
        ),
        DatasetResult("b", "b.jsonl", "mmlu", "accuracy", 1.0, 2),
        DatasetResult("c", "c.jsonl", "x", "accuracy", None, 0),
    ]
    report = write_results(tmp_path, {"model": "m", "task": "medical"}, results)
    assert report["macro_average"] == {"metric": "accuracy", "value": 0.75, "n_datasets": 2}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["datasets"]["a"] == {"file": "a.jsonl", "format": "medqa", "metric": "accuracy", "value": 0.5, "n": 4}
    assert json.loads((tmp_path / "predictions.jsonl").read_text()) == {
        "dataset": "a",
        "index": 0,
        "prediction": "B",
        "gold": "B",
        "correct": True,
    }
    table = markdown_table(report)
    assert "| c | accuracy | - | 0 |" in table and "| **macro average** | accuracy | 0.7500 |" in table
    # Every number results.json holds is a column of the printed table (drift's nll, pass@k beside avg@n, ...).
    more = write_results(
        tmp_path,
        {"model": "m", "task": "math"},
        [DatasetResult("m", "m.jsonl", "gsm8k", "avg@4", 0.25, 8, extra={"pass@1": 0.125, "pass@4": 0.5})],
    )
    table = markdown_table(more).splitlines()
    assert table[0] == "| dataset | metric | value | n | pass@1 | pass@4 |"
    assert table[2] == "| m | avg@4 | 0.2500 | 8 | 0.1250 | 0.5000 |"


def test_small_values_keep_their_significant_digits():
    from asft.evaluation.report import markdown_table

    report = {
        "datasets": {"d": {"metric": "kl", "value": 7.9e-06, "n": 3}},
        "macro_average": {"metric": "kl", "value": 7.9e-06, "n_datasets": 1},
    }
    table = markdown_table(report)
    assert "7.9e-06" in table and "0.0000" not in table
