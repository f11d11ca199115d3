"""asft plot / asft compare: figures whose data are the logged numbers, tables whose numbers are the inputs."""

import csv
import json

import pytest

from asft.cli import main
from asft.reporting import collect, load_run, plot_metrics, plot_probs, read_metrics, series, smooth
from conftest import cli_args, write_jsonl


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two tiny runs (sft with --monitor_kl, asft), each evaluated with asft eval --task medical into its folder."""
    d = tmp_path_factory.mktemp("reporting")
    train = write_jsonl(
        d / "train.jsonl",
        [{"instruction": f"what is {a} + {b}?", "response": f"{a + b}"} for a in range(3) for b in range(3)],
    )
    med = write_jsonl(
        d / "med.jsonl",
        [
            {
                "question": f"patient {i} has a heart disease",
                "answer_idx": "ABC"[i % 3],
                "options": {"A": "heart", "B": "blood", "C": "dog"},
            }
            for i in range(6)
        ],
    )
    out = {}
    for mode, extra in (("sft", ["--monitor_kl", "true"]), ("asft", ["--use_lora", "--lora_r", "4"])):
        run = d / mode
        assert (
            main(
                [
                    *cli_args(
                        "train",
                        *(
                            "--per_device_train_batch_size 3 --learning_rate 3e-2 --max_steps 4 --logging_steps 1"
                            " --save_strategy no --use_cpu true --disable_tqdm true --seed 0"
                        ).split(),
                        model_name_or_path=tiny_model_dir,
                        data_path=train,
                        output_dir=run,
                        mode=mode,
                    ),
                    *extra,
                ]
            )
            == 0
        )
        assert (
            main(cli_args("eval", task="medical", model=run, data=med, output_dir=run / "eval-medical", quiet=True))
            == 0
        )
        out[mode] = run
    out["data"], out["med"] = train, med
    return out


def test_plot_has_one_panel_per_metric_and_one_line_per_run(runs, tmp_path):
    a, b = load_run(runs["sft"]), load_run(runs["asft"])
    assert a.label == "sft" and b.label == "asft"
    fig = plot_metrics([a, b], ["loss", "nll", "mean_prob"], tmp_path / "curves.png")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "nll", "mean_prob"]
    for ax, key in zip(axes, ["loss", "nll", "mean_prob"]):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [a.label, b.label]
        for line, run in zip(lines, (a, b)):
            logged = [json.loads(s) for s in (run.path / "metrics.jsonl").read_text().splitlines()]
            expected = {r["step"]: r[key] for r in logged if key in r and "train_runtime" not in r}
            assert list(line.get_xdata()) == sorted(expected) == [1, 2, 3, 4]
            assert list(line.get_ydata()) == [expected[s] for s in sorted(expected)]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_cli_smooths_and_writes_svg(runs, tmp_path):
    out = tmp_path / "kl.svg"
    assert main(["plot", str(runs["sft"]), "--metrics", "kl", "--smooth", "2", "--output", str(out)]) == 0
    assert b"<svg" in out.read_bytes()[:400]
    steps, kl = series(read_metrics(runs["sft"] / "metrics.jsonl"), "kl")
    assert kl[0] == 0.0 and kl[-1] > 0  # --monitor_kl logged the drift of an sft run
    assert smooth(kl, 2) == [kl[0]] + [(x + y) / 2 for x, y in zip(kl, kl[1:])]
    fig = plot_metrics([load_run(runs["sft"])], ["kl"], smooth_n=2)
    assert list(fig.get_axes()[0].get_lines()[0].get_ydata()) == smooth(kl, 2)


def test_plot_refuses_a_metric_no_run_logged(runs, capsys):
    assert main(["plot", str(runs["sft"]), "--metrics", "reward"]) == 2
    err = capsys.readouterr().err
    assert "reward" in err and "available: loss" in err


def test_compare_table_numbers_are_the_inputs(runs, tmp_path):
    outside = tmp_path / "eval-outside"  # an evaluation kept outside the run folder, found by its model path
    assert (
        main(cli_args("eval", task="medical", model=runs["sft"], data=runs["med"], output_dir=outside, quiet=True)) == 0
    )
    report_dir = tmp_path / "report"
    assert main(["compare", str(runs["sft"]), str(runs["asft"]), str(outside), "--output_dir", str(report_dir)]) == 0
    report = json.loads((report_dir / "comparison.json").read_text())
    rows = {r["run"]: r for r in report["rows"]}
    assert list(rows) == ["sft", "asft"]  # the outside evaluation joined its run's row
    column = "medical:med accuracy"
    for mode in ("sft", "asft"):
        row = rows[mode]
        results = json.loads((runs[mode] / "eval-medical" / "results.json").read_text())
        assert row["results"][column] == results["datasets"]["med"]["value"]
        logged = read_metrics(runs[mode] / "metrics.jsonl")
        assert row["final"]["loss"] == series(logged, "loss")[1][-1]
        assert row["final"]["nll"] == series(logged, "nll")[1][-1]
        assert row["mode"] == mode
    assert rows["sft"]["lora"] == "no" and rows["asft"]["lora"] == "r=4"
    assert rows["asft"]["learning_rate"] == 0.03 and rows["asft"]["kl_weight"] == 0.03
    assert rows["sft"]["kl_weight"] is None  # not in an sft loss
    values = [rows[r]["results"][column] for r in rows]
    assert report["best"][column] == [i for i, v in enumerate(values) if v == max(values)]
    with (report_dir / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r[column]) for r in table] == values
    assert [float(r["final loss"]) for r in table] == [rows[r]["final"]["loss"] for r in rows]
    md = (report_dir / "report.md").read_text()
    best = max(values)
    assert f"**{best:.4f}**" in md
    assert (report_dir / "training_curves.png").exists()


def test_compare_uses_the_last_in_training_evaluation(runs, tmp_path):
    step_dir = tmp_path / "run"
    for step, value in ((2, 0.25), (10, 0.5)):
        d = step_dir / "eval_task" / "math" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(
            json.dumps(
                {
                    "task": "math",
                    "datasets": {"test": {"metric": "accuracy", "value": value, "n": 4}},
                    "macro_average": {"value": value},
                }
            )
        )
    write_jsonl(step_dir / "metrics.jsonl", [{"step": 10, "loss": 1.5}])
    [row] = collect([step_dir])
    assert row.results == {"math:test accuracy": 0.5}
    assert row.notes == ["run: math:test accuracy from the in-training evaluation at step 10"]
    explicit = step_dir / "eval-math"  # an `asft eval` of the final model wins over the in-training number
    explicit.mkdir()
    (explicit / "results.json").write_text(
        json.dumps({"task": "math", "datasets": {"test": {"metric": "accuracy", "value": 0.75, "n": 4}}})
    )
    [row] = collect([step_dir])
    assert row.results == {"math:test accuracy": 0.75} and row.notes == []


@pytest.mark.parametrize(
    "content,where",
    [
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n', "metrics.jsonl:2: not valid JSON"),
        ('{"step": 1, "loss": 2.0}\n[1, 2]\n', "metrics.jsonl:2: expected a JSON object"),
        ('{"loss": 2.0}\n', "metrics.jsonl:1: field 'step'"),
        ("", "metrics.jsonl: no records"),
    ],
)
def test_malformed_metrics_file_names_file_and_line(tmp_path, capsys, content, where):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    for command in (["plot", str(run)], ["compare", str(run), "--output_dir", str(tmp_path / "r")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{run / 'metrics.jsonl'}" in err and where.split(":", 1)[1] in err.replace(str(run) + "/", "")


def test_missing_metrics_and_foreign_folders_are_refused(tmp_path, capsys):
    started = tmp_path / "started"  # a run killed before its first log: configuration but no metrics
    started.mkdir()
    (started / "asft_run.json").write_text('{"mode": "sft"}')
    assert main(["compare", str(started), "--output_dir", str(tmp_path / "r")]) == 2
    assert f"{started / 'metrics.jsonl'}: metrics file not found" in capsys.readouterr().err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    assert main(["compare", str(foreign), "--output_dir", str(tmp_path / "r")]) == 2
    assert "neither a training run" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_probs_histogram_counts_every_response_token(runs, tiny_model_dir, tmp_path):
    from asft.data import load_examples, resolve_template, tokenize
    from asft.models import load_tokenizer
    from asft.reporting import token_probabilities

    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = resolve_template("auto", tokenizer)
    examples, _ = load_examples([str(runs["data"])])
    n_tokens = sum(sum(t != -100 for t in tokenize(ex, template, tokenizer)["labels"]) for ex in examples)
    base = token_probabilities(str(tiny_model_dir), str(runs["data"]))
    trained = token_probabilities(str(runs["sft"]), str(runs["data"]))
    assert len(base) == len(trained) == n_tokens
    assert sum(trained) > sum(base)  # sft raised the likelihood of its own training responses
    fig = plot_probs({"base": base, "sft": trained})
    patches = fig.get_axes()[0].patches
    assert len(patches) == 2
    out = tmp_path / "probs.png"
    assert (
        main(
            [
                "plot",
                "--kind",
                "probs",
                str(tiny_model_dir),
                str(runs["asft"]),
                "--data",
                str(runs["data"]),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_each_run_keeps_its_colour_in_panels_other_runs_did_not_log(tmp_path):
    from asft.reporting import RunInfo

    a = RunInfo(tmp_path / "a", "a", {}, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    b = RunInfo(tmp_path / "b", "b", {}, [{"step": 1, "loss": 2.0, "kl": 0.1}, {"step": 2, "loss": 1.0, "kl": 0.2}])
    fig = plot_metrics([a, b], ["loss", "kl"])
    loss_panel, kl_panel = fig.get_axes()
    colour = {line.get_label(): line.get_color() for line in loss_panel.get_lines()}
    assert colour["a"] != colour["b"]
    assert [(line.get_label(), line.get_color()) for line in kl_panel.get_lines()] == [("b", colour["b"])]


def test_compare_shows_the_weight_rule_the_anchor_and_the_weight_terms(tmp_path):
    from asft.reporting import RunInfo, comparison

    def run(name, config):
        record = {"step": 1, "loss": 1.0, "mean_weight": 0.3, "frac_weight_below_0.1": 0.4}
        return RunInfo(tmp_path / name, name, config, [record])

    rows = comparison(
        [
            run("power", {"mode": "dft", "weight_power": 0.5, "weight_floor": 0.0, "kl_weight": 0.03}),
            run("prift", {"mode": "prift", "anchor": True, "weight_floor": 0.1, "kl_weight": 0.05}),
            run("eaft", {"mode": "eaft", "eaft_topk": 20, "eaft_power": 1.0, "kl_weight": 0.03}),
        ]
    )
    assert "weight_rule" in rows["columns"]["config"]
    assert {"mean_weight", "frac_weight_below_0.1"} <= set(rows["columns"]["final"])
    power, prift, eaft = rows["rows"]
    assert (power["mode"], power["weight_rule"], power["kl_weight"]) == ("dft", "weight_power=0.5", None)
    assert (prift["mode"], prift["weight_rule"], prift["kl_weight"]) == ("prift + anchor", "weight_floor=0.1", 0.05)
    assert (eaft["weight_rule"], eaft["final"]["frac_weight_below_0.1"]) == ("-", 0.4)
