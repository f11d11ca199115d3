"""`asft eval --task drift`: KL(reference || model) and NLL per response token, checked against a plain
one-example-at-a-time computation, for a full model against --base_model and for a LoRA adapter against its base."""

import json

import pytest
import torch

from asft.cli.eval import main
from asft.data import load_examples, tokenize
from asft.evaluation import drift as generation
from conftest import build_model, build_tokenizer, eval_argv
from test_eval_medical import write_jsonl


def save(model, path):
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("drift-models")
    tok = build_tokenizer()
    return save(build_model(tok, seed=0), d / "base"), save(build_model(tok, seed=1), d / "tuned")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [
        {"prompt": "what is the sum of two numbers", "completion": " 4"},
        {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."},
        {"instruction": "patient heart", "response": "treatment"},
    ]
    d = tmp_path_factory.mktemp("drift-data")
    return f"{write_jsonl(d / 'pc.jsonl', rows[:2])},{write_jsonl(d / 'alpaca.jsonl', rows[2:])}"


def expected_drift(model, reference, data, template="chat"):
    """Per file: (KL, NLL, reference NLL) per response token, one example at a time, no padding."""
    tok = build_tokenizer()
    out = []
    for path in data.split(","):
        totals = torch.zeros(3, dtype=torch.float64)
        tokens = 0
        for ex in load_examples([path])[0]:
            f = tokenize(ex, template, tok)
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                logrho = torch.log_softmax(reference(ids).logits[0, :-1].double(), -1)
            for t in range(len(labels) - 1):
                y = int(labels[t + 1])
                if y == -100:
                    continue
                kl = (logrho[t].exp() * (logrho[t] - logp[t])).sum()
                totals += torch.tensor([kl, -logp[t, y], -logrho[t, y]])
                tokens += 1
        out.append((totals / tokens).tolist())
    return out


def drift(model, data, out, *extra):
    return main(eval_argv("drift", model, data, out, *extra, batch_size=2))


def results(out):
    return list(json.loads((out / "results.json").read_text())["datasets"].values())


def test_full_model_against_base(models, data, tmp_path):
    base, tuned = models
    assert drift(tuned, data, tmp_path / "o", "--base_model", str(base)) == 0
    from transformers import AutoModelForCausalLM

    want = expected_drift(AutoModelForCausalLM.from_pretrained(tuned), AutoModelForCausalLM.from_pretrained(base), data)
    got = results(tmp_path / "o")
    for r, (kl, nll, ref_nll) in zip(got, want):
        assert r["metric"] == "kl" and r["value"] > 0
        assert (r["value"], r["nll"], r["ref_nll"]) == pytest.approx((kl, nll, ref_nll), rel=1e-4)
    assert [r["n"] for r in got] == [2, 1]


def test_model_against_itself_is_zero(models, data, tmp_path, capsys):
    base, _ = models
    assert drift(base, data, tmp_path / "o", "--base_model", str(base), "--template", "alpaca") == 0
    for r in results(tmp_path / "o"):
        assert r["value"] == pytest.approx(0.0, abs=1e-6) and r["nll"] == pytest.approx(r["ref_nll"])
    assert "| nll | ref_nll |" in capsys.readouterr().out.splitlines()[0]  # the table shows every metric
    assert drift(base, data, tmp_path / "o", "--base_model", str(base), "--template", "alpaca") == 0
    assert "reused 2 finished items" in capsys.readouterr().err


def test_adapter_against_its_own_base(models, data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _ = models
    # init_lora_weights=False: random B, so the adapter really changes the model.
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert drift(tmp_path / "adapter", data, tmp_path / "o") == 0  # no --base_model: the adapter's base
    merged = peft.merge_and_unload()
    want = expected_drift(merged, AutoModelForCausalLM.from_pretrained(base), data)
    for r, (kl, nll, _) in zip(results(tmp_path / "o"), want):
        assert r["value"] > 0 and (r["value"], r["nll"]) == pytest.approx((kl, nll), rel=1e-4)


def test_needs_a_reference(models, data, tmp_path, capsys):
    assert drift(models[1], data, tmp_path / "o") == 2
    assert "--base_model" in capsys.readouterr().err


def test_unrenderable_row_fails_before_loading(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generation, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    assert drift(models[1], str(path), tmp_path / "o", "--base_model", str(models[0]), "--template", "alpaca") == 2
    assert f"{path}:1: field 'messages'" in capsys.readouterr().err
