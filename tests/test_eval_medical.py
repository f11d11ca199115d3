"""`asft eval --task medical`: the three file formats, located errors, and accuracy of a model whose answer is
forced, end to end through the CLI (with resume)."""

import json

import pytest
import torch

from asft.cli.eval import main
from asft.data import templates as generation
from asft.evaluation import EvalDataError, EvalError, backends
from asft.evaluation import driver as cli
from asft.evaluation.medical import letter_variants, load
from conftest import build_model, build_tokenizer, eval_argv, write_jsonl


def forced_model(tokenizer, default_next: int, after: dict[int, int] | None = None):
    """A tiny Llama whose next token depends on the current token only: `after[t]` follows t, `default_next`
    follows every other token, each with probability ~1 (logit 80 against 0).

    The blocks add nothing (o_proj and down_proj are zero), so the last hidden state is the normalised
    embedding of the current token, and the head reads it off one coordinate per rule.
    """
    model = build_model(tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        head.zero_()
        head[default_next, 0] = 10.0
        for k, (token, nxt) in enumerate((after or {}).items(), start=1):
            emb[token].zero_()
            emb[token, k] = 1.0
            head[nxt, k] = 10.0
        model.model.norm.weight.fill_(1.0)
    return model


def save_forced(path, default_next, after=None):
    tokenizer = build_tokenizer()
    forced_model(tokenizer, default_next, after).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def medqa_row(q, gold):
    return {
        "question": q,
        "options": {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "none"},
        "answer_idx": gold,
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("medical")
    medqa = write_jsonl(d / "medqa.jsonl", [medqa_row(f"q{i}", g) for i, g in enumerate("ABBC")])
    medmcqa = write_jsonl(
        d / "medmcqa.jsonl",
        [
            {"question": f"m{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop}
            for i, cop in enumerate([1, 1, 3])
        ],
    )
    mmlu = d / "mmlu.json"
    mmlu.write_text(json.dumps([{"question": "x", "choices": ["p", "q", "r", "s"], "answer": a} for a in (1, 2)]))
    return {"medqa": medqa, "medmcqa": medmcqa, "mmlu": mmlu}


@pytest.fixture(scope="module")
def always_b(tmp_path_factory):
    return save_forced(tmp_path_factory.mktemp("always-b"), build_tokenizer().encode("B")[0])


def test_formats_and_prompt(files):
    fmt, items = load(str(files["medqa"]))
    assert fmt == "medqa" and [it.gold for it in items] == list("ABBC")
    assert items[0].prompt == ("Question: q0\n\nOptions:\nA. aspirin\nB. heparin\nC. warfarin\nD. none\n\nAnswer:")
    fmt, items = load(str(files["medmcqa"]))
    assert fmt == "medmcqa" and [it.gold for it in items] == ["B", "B", "D"]
    fmt, items = load(str(files["mmlu"]))
    assert fmt == "mmlu" and [it.gold for it in items] == ["B", "C"]


@pytest.mark.parametrize(
    "content, line, field",
    [
        ('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}\n{bad json\n', 2, None),
        ('{"question": "q", "options": {"A": "x", "B": "y"}}\n', 1, "answer_idx"),
        ('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n', 1, "answer_idx"),
        ('{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}\n', 1, "cop"),
        (
            '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"choices": ["a", "b"], "answer": 0}\n',
            2,
            "question",
        ),
        ('{"prompt": "q", "label": 1}\n', 1, None),
    ],
)
def test_bad_rows_are_located(tmp_path, content, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(EvalDataError) as e:
        load(str(path))
    assert e.value.source == str(path) and e.value.line == line and e.value.field == field


def test_bad_data_fails_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}, {"question": "q", "options": {"A": "x"}}],
    )
    code = main(
        [
            "--model",
            str(tmp_path / "nowhere"),
            "--task",
            "medical",
            "--data",
            str(bad),
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: field 'answer_idx': missing" in err
    assert not (tmp_path / "out").exists()


def test_letter_variants(tokenizer):
    # "A" and " A" are single tokens in the test tokenizer; " B" is two, so only "B" counts for B.
    assert letter_variants(tokenizer, "AB") == {
        "A": sorted([tokenizer.encode("A")[0], tokenizer.encode(" A")[0]]),
        "B": [tokenizer.encode("B")[0]],
    }


def run_eval(model, files, out, *extra):
    data = ",".join(str(files[k]) for k in ("medqa", "medmcqa", "mmlu"))
    return main(eval_argv("medical", model, data, out, *extra, batch_size=2))


def test_forced_answer_gives_known_accuracy_and_resumes(always_b, files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_eval(always_b, files, out) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    expected = {"medqa": (0.5, 4), "medmcqa": (2 / 3, 3), "mmlu": (0.5, 2)}
    for name, (value, n) in expected.items():
        r = report["datasets"][name]
        assert r["metric"] == "accuracy" and r["n"] == n and r["value"] == pytest.approx(value), name
    assert report["macro_average"]["value"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert report["task"] == "medical" and report["model"] == str(always_b) and report["settings"]["template"] == "chat"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["prediction"] == "B" for r in rows)
    assert {k for k in rows[0]} >= {"dataset", "index", "prediction", "gold", "correct"}
    assert "| medqa | accuracy | 0.5000 | 4 |" in table

    # A rerun reuses every stored score: no model is loaded at all.
    monkeypatch.setattr(backends, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("recomputed"))
    assert run_eval(always_b, files, out) == 0
    assert json.loads((out / "results.json").read_text())["datasets"] == report["datasets"]


@pytest.mark.parametrize("template", ["none", "alpaca"])
def test_best_letter_variant_counts(tmp_path, files, template):
    # The model puts all its mass on " A" (with a space): that must still read as answer A.
    model = save_forced(tmp_path / "m", build_tokenizer().encode(" A")[0])
    out = tmp_path / "out"
    assert run_eval(model, files, out, "--template", template, "--limit", "2") == 0
    report = json.loads((out / "results.json").read_text())
    assert report["datasets"]["medqa"] == {**report["datasets"]["medqa"], "value": 0.5, "n": 2}
    assert report["datasets"]["mmlu"]["value"] == 0.0
    assert report["settings"]["limit"] == 2


def test_chat_template_without_one_is_an_error(tmp_path, files, capsys):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    model = tmp_path / "m"
    build_model(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    assert run_eval(model, files, tmp_path / "out", "--template", "chat") == 2
    assert "chat template" in capsys.readouterr().err
    with pytest.raises(EvalError):
        generation.resolve_template("chat", tokenizer)
