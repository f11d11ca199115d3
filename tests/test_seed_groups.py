"""asft compare's seed groups (n, mean, std by hand; never across other settings) and its per-bin table."""

import csv
import json
import statistics

import pytest

from asft.cli import main
from asft.reporting import collect, seed_groups, separated, spread
from conftest import build_model


def fake_run(path, *, seed, loss, acc, mode="sft", lr=1e-4, model="m", data="train.jsonl"):
    path.mkdir(parents=True)
    config = {"mode": mode, "learning_rate": lr, "kl_weight": 0.05, "lora": None, "model": model}
    config["data"] = {"data_path": data, "eval_data_path": None, "template": "auto"}
    config["args"] = {"seed": seed, "output_dir": str(path), "logging_dir": str(path / "logs"), "learning_rate": lr}
    (path / "asft_run.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": loss + 1}) + "\n" + json.dumps({"step": 2, "loss": loss}) + "\n"
    )
    ev = path / "eval-medical"
    ev.mkdir()
    report = {"task": "medical", "model": str(path), "datasets": {"test": {"metric": "accuracy", "value": acc}}}
    (ev / "results.json").write_text(json.dumps(report))
    return path


def test_spread_and_separation_by_hand():
    s = spread([0.4, 0.5, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(statistics.stdev([0.4, 0.5, 0.9]))
    half = 4.303 * s["std"] / 3**0.5
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert spread([0.3])["std"] == 0.0 and spread([0.3])["ci95"] is None
    assert separated([0.44, 0.45], [0.41, 0.40]) == "yes"
    assert separated([0.44, 0.30], [0.41, 0.40]) == "not separated"  # within the spread: never "yes"
    assert separated([0.1, 0.11], [0.41, 0.40]) == "no"
    assert separated([0.9], [0.1]) == "not separated"  # one seed: no spread to decide against
    # a difference equal to the spread is not separated, whatever float64 rounding makes of the two
    assert separated([9 / 24] * 3, [7 / 24, 8 / 24, 9 / 24]) == "not separated"
    assert separated([7 / 24, 8 / 24, 9 / 24], [9 / 24] * 3) == "not separated"


def test_compare_groups_runs_that_differ_only_by_seed(tmp_path, capsys):
    runs = [
        fake_run(tmp_path / "sft-s0", seed=0, loss=1.0, acc=0.40),
        fake_run(tmp_path / "sft-s1", seed=1, loss=2.0, acc=0.50),
        fake_run(tmp_path / "sft-s2", seed=2, loss=4.0, acc=0.90),
        fake_run(tmp_path / "sft-lr", seed=0, loss=1.0, acc=0.40, lr=2e-4),
        fake_run(tmp_path / "asft-s0", seed=0, loss=1.0, acc=0.40, mode="asft"),
        fake_run(tmp_path / "asft-s1", seed=1, loss=1.5, acc=0.60, mode="asft"),
        fake_run(tmp_path / "sft-other-base", seed=1, loss=1.0, acc=0.40, model="other"),
        fake_run(tmp_path / "sft-other-data", seed=1, loss=1.0, acc=0.40, data="other.jsonl"),
    ]
    groups = seed_groups(collect(runs))
    assert sorted(g["n"] for g in groups) == [1, 1, 1, 2, 3]
    [three] = [g for g in groups if g["n"] == 3]
    assert sorted(three["seeds"]) == [0, 1, 2]
    assert {p.split("/")[-1] for p in three["runs"]} == {"sft-s0", "sft-s1", "sft-s2"}
    acc = three["metrics"]["medical:test accuracy"]
    assert acc["mean"] == pytest.approx(0.6) and acc["std"] == pytest.approx(statistics.stdev([0.4, 0.5, 0.9]))
    loss = three["metrics"]["final loss"]
    assert loss["mean"] == pytest.approx(7 / 3) and loss["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))

    out = tmp_path / "report"
    assert main(["compare", *map(str, runs), "--output_dir", str(out)]) == 0
    data = json.loads((out / "comparison.json").read_text())
    assert sorted(g["n"] for g in data["groups"]) == [1, 1, 1, 2, 3]
    [g3] = [g for g in data["groups"] if g["n"] == 3]
    assert g3["metrics"]["medical:test accuracy"]["mean"] == pytest.approx(0.6)
    assert "## Seeds" in (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "seed_groups.csv").open()))
    assert any(r["metric"] == "medical:test accuracy" and float(r["mean"]) == pytest.approx(0.6) for r in rows)


def test_compare_probs_by_bin(tiny_model_dir, tokenizer, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"add {i}", "response": f"{i} and more"}) + "\n" for i in range(4))
    )
    runs = []
    for seed in (0, 1):
        run = fake_run(tmp_path / f"r{seed}", seed=seed, loss=1.0, acc=0.5, model=str(tiny_model_dir))
        build_model(tokenizer, seed=seed + 5).save_pretrained(run)
        tokenizer.save_pretrained(run)
        runs.append(run)
    out = tmp_path / "report"
    argv = ["compare", *map(str, runs), "--output_dir", str(out), "--probs_data", str(data)]
    assert main(argv) == 0
    bins = json.loads((out / "comparison.json").read_text())["prob_bins"]["bins"]
    assert [b["bin"] for b in bins] == ["[0, 0.1)", "[0.1, 0.5)", "[0.5, 0.9)", "[0.9, 1]"]
    assert sum(b["tokens"] for b in bins) > 0
    assert all(set(b["after"]) == {"r0 (sft)", "r1 (sft)"} for b in bins)
    assert (out / "prob_bins.png").is_file()
    assert "Token probabilities by the base model's prior" in (out / "report.md").read_text()


def test_replicate_claims_are_decided_against_the_seeds_spread():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import replicate

    def runs(accs, task_kl, off_kl):
        return [{"accuracy": a, "task_kl": task_kl, "offtask_kl": off_kl, "train_kl": None} for a in accs]

    per_seed = {
        "sft": runs([0.41, 0.47], 0.5, 0.3),
        "dft": runs([0.01, 0.02], 0.6, 0.4),
        "asft": runs([0.44, 0.45], 0.1, 0.1),
    }
    for r in per_seed["asft"][1:]:
        r["task_kl"] = 0.12
    rows = replicate.mean_rows(per_seed)
    assert rows["sft"]["accuracy"] == pytest.approx(0.44)
    assert rows["sft"]["accuracy_std"] == pytest.approx(statistics.stdev([0.41, 0.47]))
    c = replicate.claims(rows, per_seed)
    # asft 0.445 vs sft 0.44: within the seeds' spread -> never "yes"
    assert c["claim_b"] == "not separated"
    assert c["claim_a"] == "yes" and c["claim_c"] == "yes"
    one = {k: v[:1] for k, v in per_seed.items()}
    assert replicate.claims(replicate.mean_rows(one), one)["claim_b"] == "yes"  # one seed: the old yes / no


def test_plot_probs_with_several_models_draws_the_bins(tiny_model_dir, tokenizer, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"add {i}", "response": f"{i} more"}) + "\n" for i in range(3)))
    other = tmp_path / "other"
    build_model(tokenizer, seed=9).save_pretrained(other)
    tokenizer.save_pretrained(other)
    out = tmp_path / "probs.png"
    argv = ["plot", "--kind", "probs", str(tiny_model_dir), str(other), "--data", str(data), "--output", str(out)]
    assert main(argv) == 0
    assert out.is_file() and (tmp_path / "probs_bins.png").is_file()
    assert "| [0, 0.1) |" in capsys.readouterr().out
