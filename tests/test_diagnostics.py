"""The prior diagnostic (asft data inspect --prior) and the per-bin table, against independent computations."""

import json

import numpy as np
import pytest
import torch

from asft import diagnostics as dg
from asft.cli import main
from conftest import cli_args, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("prior")
    rows = [
        {"instruction": f"what is {a} + {b}?", "response": f"{a + b} is the sum"} for a in range(4) for b in range(3)
    ]
    return write_jsonl(d / "train.jsonl", rows)


def independent_probs(model_dir, data, by_example=False):
    """p(y_t) of every response token, one example at a time, with plain transformers and the data code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft.data import load_examples, tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples, _ = load_examples([str(data)])
    out, per_example = [], []
    for ex in examples:
        item = tokenize(ex, "alpaca", tok)
        ids = torch.tensor([item["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0].double(), -1)
        mine = [float(probs[t - 1, y]) for t, y in enumerate(item["labels"]) if t and y != -100]
        out += mine
        per_example.append(mine)
    return (np.array(out), per_example) if by_example else np.array(out)


def prior_json(capsys, *argv):
    capsys.readouterr()
    assert main(["data", "inspect", *map(str, argv), "--prior", "--json", "--template", "alpaca"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prior_matches_an_independent_computation(tiny_model_dir, data, capsys):
    p, per_example = independent_probs(tiny_model_dir, data, by_example=True)
    r = prior_json(capsys, data, "--model", tiny_model_dir, "--batch_size", 5)
    assert r["tokens"] == len(p)
    nll = [-sum(np.log(q) for q in e) for e in per_example]
    # float32 log-softmax against float64: ~1e-6 relative per token, summed over a response's few tokens
    assert r["mean_response_nll"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert r["median_response_nll"] == pytest.approx(np.median(nll), rel=1e-5)
    assert r["mean_prob"] == pytest.approx(p.mean(), abs=1e-6)
    assert r["median_prob"] == pytest.approx(np.median(p), abs=1e-6)
    assert r["frac_below_0.1"] == pytest.approx((p < 0.1).mean())
    assert r["frac_above_0.9"] == pytest.approx((p >= 0.9).mean())
    counts = [((p >= lo) & ((p < hi) if hi < 1 else (p <= 1))).sum() for lo, hi in zip(dg.BIN_EDGES, dg.BIN_EDGES[1:])]
    assert [b["tokens"] for b in r["bins"]] == counts
    assert sum(h["tokens"] for h in r["histogram"]) == len(p)
    rule = [b["rules"]["p (dft, asft)"] for b in r["bins"]]
    assert sum(x["share"] for x in rule) == pytest.approx(1.0)
    low = p[p < 0.1]
    assert rule[0]["share"] == pytest.approx(low.sum() / p.sum(), abs=1e-6)
    if len(low):
        assert rule[0]["relative"] == pytest.approx(low.mean(), abs=1e-6)
    # --limit: only the first N examples
    assert prior_json(capsys, data, "--model", tiny_model_dir, "--limit", 2)["examples"] == 2


def test_prior_text_and_cache_equal_the_model(tiny_model_dir, data, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = cli_args(
        "cache-reference",
        "--disable_tqdm",
        model_name_or_path=tiny_model_dir,
        data_path=data,
        output_dir=cache,
        top_k=8,
        template="alpaca",
    )
    assert main(argv) == 0
    model = prior_json(capsys, data, "--model", tiny_model_dir)
    cached = prior_json(capsys, data, "--model", tiny_model_dir, "--reference_cache", cache)
    assert cached["tokens"] == model["tokens"]
    for key in ("mean_prob", "median_prob", "frac_below_0.1", "frac_above_0.9"):
        assert cached[key] == pytest.approx(model[key], abs=1e-6)
    assert [b["tokens"] for b in cached["bins"]] == [b["tokens"] for b in model["bins"]]
    assert cached["mean_entropy"] <= model["mean_entropy"] + 1e-6  # over k + 1 buckets: a lower bound
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--prior", "--template", "alpaca"]) == 0
    text = capsys.readouterr().out
    assert "mean p" in text and "histogram" in text and text.strip().splitlines()[-1].startswith("prior: mean p(y_t)")


def test_prior_refuses_a_cache_of_other_data(tiny_model_dir, data, tmp_path, capsys):
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": "hi", "response": "there"}] * 3)
    cache = tmp_path / "cache"
    argv = cli_args(
        "cache-reference", "--disable_tqdm", model_name_or_path=tiny_model_dir, data_path=other, output_dir=cache
    )
    assert main([*argv, "--template", "alpaca"]) == 0
    capsys.readouterr()
    argv = ["data", "inspect", str(data), "--model", str(tiny_model_dir), "--prior", "--template", "alpaca"]
    assert main([*argv, "--reference_cache", str(cache)]) == 2
    assert "reference_cache" in capsys.readouterr().err


def test_prior_keeps_and_refuses_the_examples_training_does(tiny_model_dir, tmp_path, capsys):
    """A row whose prompt alone fills --max_length is a bad row for the diagnostic as for training: an error naming
    file and line by default, left out with --on_bad_rows skip (it was silently left out either way)."""
    rows = [{"instruction": "hi", "response": "there you go"}, {"instruction": "word " * 200, "response": "ok"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    argv = ["data", "inspect", str(path), "--model", str(tiny_model_dir), "--prior", "--template", "alpaca"]
    capsys.readouterr()
    assert main([*argv, "--max_length", "96"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "max_length" in err
    r = prior_json(capsys, path, "--model", tiny_model_dir, "--max_length", 96, "--on_bad_rows", "skip")
    assert r["tokens"] == len(independent_probs(tiny_model_dir, write_jsonl(tmp_path / "first.jsonl", rows[:1])))


def test_weight_shares_and_bins_by_hand():
    p = np.array([0.05, 0.05, 0.2, 0.6, 0.95, 1.0])
    assert dg.bin_index(p).tolist() == [0, 0, 1, 2, 3, 3]
    shares = dg.weight_shares(p)
    assert [b["tokens"] for b in shares] == [2, 1, 1, 2]
    assert shares[0]["sft_share"] == pytest.approx(2 / 6)
    dft = [b["rules"]["p (dft, asft)"] for b in shares]
    assert dft[0]["share"] == pytest.approx(0.1 / p.sum())
    assert dft[3]["relative"] == pytest.approx(0.975)
    floor = shares[0]["rules"]["max(p, 0.1)"]
    assert floor["relative"] == pytest.approx(0.1)


def test_bin_table_on_a_constructed_case():
    base = np.array([0.01, 0.09, 0.3, 0.7, 0.8, 0.99])
    after = {"sft": np.array([0.5, 0.3, 0.6, 0.9, 0.9, 0.99]), "dft": np.array([0.01, 0.1, 0.4, 0.95, 0.95, 1.0])}
    rows = dg.bin_table(base, after)
    assert [r["bin"] for r in rows] == list(dg.BIN_LABELS)
    assert [r["tokens"] for r in rows] == [2, 1, 2, 1]
    assert rows[0]["base"] == pytest.approx(0.05)
    assert rows[0]["after"]["sft"] == pytest.approx(0.4)
    assert rows[0]["after"]["dft"] == pytest.approx(0.055)
    assert rows[2]["after"]["dft"] == pytest.approx(0.95)
    table = dg.format_bin_table(rows)
    assert "| [0, 0.1) | 2 | 0.0500 | 0.4000 | 0.0550 |" in table
    empty = dg.bin_table(np.array([0.95]), {"x": np.array([0.5])})
    assert empty[0]["tokens"] == 0 and empty[0]["after"]["x"] is None
    with pytest.raises(ValueError, match="not the same tokens"):
        dg.bin_table(base, {"x": base[:3]})


def test_train_prints_the_prior_from_the_cache_in_a_p_weighted_mode(tiny_model_dir, data, tmp_path, capsys):
    from conftest import train_cmd

    cache = tmp_path / "cache"
    argv = cli_args(
        "cache-reference", "--disable_tqdm", model_name_or_path=tiny_model_dir, data_path=data, output_dir=cache
    )
    assert main([*argv, "--template", "alpaca"]) == 0
    model = prior_json(capsys, data, "--model", tiny_model_dir)
    for mode, shown in (("asft", True), ("sft_kl", False)):
        capsys.readouterr()
        cmd = train_cmd(tiny_model_dir, data, tmp_path / mode, mode=mode, max_steps=1, save_strategy="no")
        assert main([*cmd, "--template", "alpaca", "--reference_cache", str(cache)]) == 0
        out = capsys.readouterr().out
        assert ("prior: mean p(y_t)" in out) == shown
        recorded = json.loads((tmp_path / mode / "asft_run.json").read_text())["data"]  # seed groups never mix data
        assert recorded == {"data_path": str(data), "eval_data_path": None, "template": "alpaca"}
        if shown:
            assert f"mean p(y_t) {model['mean_prob']:.3f}" in out and "--prior --reference_cache" in out
