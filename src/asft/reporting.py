"""From logged metrics and evaluation results to pictures and comparisons: `asft plot` and `asft compare`.

- `asft plot RUN... [--metrics loss kl ...] [--output FILE.png] [--smooth N]`: any numeric key of each run's
  metrics.jsonl against step, one panel per metric, the runs overlaid (named by folder and mode).
- `asft plot --kind probs RUN_OR_MODEL... --data FILE`: the histogram of p(y_t) over a dataset's response tokens
  for each model (the ASFT paper's Figure 4).
- `asft compare RUN_OR_EVAL_DIR... --output_dir REPORT`: report.md (configuration, final training terms, every
  `asft eval` result found, best per column marked), the plots, comparison.csv and comparison.json.

A run is a folder with metrics.jsonl (what `asft train` writes; `asft_run.json` holds its configuration); an
evaluation is a folder with results.json (what `asft eval` writes). Figures are drawn headless (Agg); the format
follows the output's extension (.png, .svg, .pdf).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError
from .io import METRICS_FILE, RESULTS_FILE, RUN_FILE

RUN_CONFIG, METRICS, RESULTS = RUN_FILE, METRICS_FILE, RESULTS_FILE
# The training terms, in the order panels and tables show them (others follow alphabetically).
TERMS = ("loss", "nll", "weighted_nll", "kl", "mean_prob", "entropy", "token_accuracy", "grad_norm", "learning_rate")
# The final terms `asft compare` tabulates: the objective's, with the weight's mean and its low tail.
FINAL_TERMS = (*TERMS[:5], "mean_weight", "frac_weight_below_0.1", *TERMS[5:7], "reward", "accuracy")
# Summary keys of the Trainer's last record: not curves.
SUMMARY_KEYS = {
    "step",
    "epoch",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "total_flos",
    "train_loss",
}
LOWER_IS_BETTER = {"kl", "nll"}  # evaluation metrics where smaller wins (drift); every other one: larger wins


# ------------------------------------------------------------------------------------------- what a run wrote


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl; a missing file, a bad line or a record without a step is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "metrics file not found (is this the output_dir of `asft train`?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), number, None, f"not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(str(path), number, None, f"expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise DataError(str(path), number, "step", "missing or not an integer")
        records.append(record)
    if not records:
        raise DataError(str(path), None, None, "no records")
    return records


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def numeric_keys(records: list[dict]) -> list[str]:
    """The plottable keys of a run's records: training terms first, then the rest alphabetically."""
    keys = {k for r in records for k, v in r.items() if _is_number(v) and k not in SUMMARY_KEYS}
    return [k for k in TERMS if k in keys] + sorted(keys - set(TERMS))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key; a step logged twice (a resumed run) keeps its last value."""
    by_step = {r["step"]: float(r[key]) for r in records if _is_number(r.get(key)) and "train_runtime" not in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], n: int) -> list[float]:
    """Trailing moving average over n points (the first points average what exists so far)."""
    if n <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


@dataclass
class RunInfo:
    path: Path
    label: str
    config: dict
    records: list[dict]
    results: dict = field(default_factory=dict)  # column -> value, from results.json files
    notes: list = field(default_factory=list)  # where a result column came from, when not from `asft eval`


def is_run(path: Path) -> bool:
    return (path / METRICS).exists() or (path / RUN_CONFIG).exists()


def is_evaluation(path: Path) -> bool:
    return (path / RESULTS).is_file()


def _refuse(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{path}: no such folder")
    raise ConfigError(
        f"{path}: neither a training run (no {METRICS}) nor an evaluation (no {RESULTS}); give the "
        "output_dir of `asft train` or of `asft eval`"
    )


def read_config(path: Path) -> dict:
    file = path / RUN_CONFIG
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(str(file), e.lineno, None, f"not valid JSON ({e.msg})") from None


def load_run(path: str | Path) -> RunInfo:
    path = Path(path)
    if not is_run(path):
        _refuse(path)
    config = read_config(path)
    mode = config.get("mode")
    label = path.name + (f" ({mode})" if mode and mode != path.name else "")
    return RunInfo(path, label, config, read_metrics(path / METRICS))


# ---------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


def run_color(index: int) -> str:
    """The colour of the index-th run in every panel (matplotlib's default cycle; beyond 10 runs, a tab20 colour)."""
    if index < 10:
        return f"C{index}"
    import matplotlib

    return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](index % 20))


def plot_metrics(
    runs: list[RunInfo], metrics: list[str] | None = None, output: str | Path | None = None, smooth_n: int = 1
):
    """One panel per metric, one line per run that logged it; returns the matplotlib Figure (saved if output)."""
    available = [k for k in dict.fromkeys(k for run in runs for k in numeric_keys(run.records))]
    if metrics:
        missing = [m for m in metrics if m not in available]
        if missing:
            raise ConfigError(
                f"--metrics: {', '.join(missing)} not logged by any run; available: {', '.join(available)}"
            )
    else:
        metrics = available
    if not metrics:
        raise ConfigError("nothing to plot: the runs logged no numeric metric")
    plt = _pyplot()
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        for i, run in enumerate(runs):
            steps, values = series(run.records, key)
            if steps:
                ax.plot(
                    steps,
                    smooth(values, smooth_n),
                    label=run.label,
                    color=run_color(i),  # by run, not by line: a panel some runs did not log keeps the colours
                    marker="o" if len(steps) < 12 else None,
                    markersize=3,
                )
        ax.set_title(key + (f" (smoothed over {smooth_n})" if smooth_n > 1 else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.remove()
    legend = {}  # every run once, whichever panels it appears in
    for ax in fig.get_axes():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 4)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    if output is not None:
        _save(fig, output)
    return fig


def _finish(fig, ax, output: str | Path | None):
    """A one-panel figure's legend, grid and layout; saved to `output` when given."""
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if output is not None:
        _save(fig, output)
    return fig


def _save(fig, output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--output: {output} must end in .png, .svg or .pdf")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    return output


def token_probabilities(
    model_path: str,
    data: str,
    *,
    template: str = "auto",
    max_length: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> list[float]:
    """p(y_t) of every response token of the data files under the model, tokenized as training does (scored by
    `diagnostics.score_features`, as the prior diagnostic is)."""
    from .data import load_examples, resolve_template, tokenize
    from .diagnostics import score_features
    from .models import load_model_and_tokenizer

    examples, _ = load_examples([p.strip() for p in data.split(",") if p.strip()])
    examples = examples[:limit] if limit else examples
    model, tokenizer = load_model_and_tokenizer(model_path)
    template = resolve_template(template, tokenizer)
    features = [tokenize(ex, template, tokenizer, max_length) for ex in examples]
    return score_features(model, features, tokenizer.pad_token_id, batch_size).probs.tolist()


def plot_probs(models: dict[str, list[float]], output: str | Path | None = None, bins: int = 20):
    """Histogram of p(y_t) per model (the share of response tokens in each probability bin); returns the Figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    edges = [i / bins for i in range(bins + 1)]
    for label, probs in models.items():
        weights = [1 / len(probs)] * len(probs) if probs else []
        ax.hist(probs, bins=edges, weights=weights, histtype="step", linewidth=1.6, label=f"{label} (n={len(probs)})")
    ax.set_xlabel("p(y_t): probability of the reference token")
    ax.set_ylabel("share of response tokens")
    ax.set_title("Token probabilities over the data's responses")
    return _finish(fig, ax, output)


# -------------------------------------------------------------------------------------------------- compare


def spread(values: list[float]) -> dict:
    """n, mean, sample standard deviation (0 for one value) and a 95% interval (Student's t) of seeds' values."""
    vals = [float(v) for v in values if _is_number(v)]
    n = len(vals)
    if not n:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    half = _T95.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "ci95": None if half is None else [mean - half, mean + half]}


# Student's t, two-sided 95%, by degrees of freedom 1..30 (beyond 30: the normal's 1.96).
_T95_TABLE = (
    "12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 "
    "2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042"
)
_T95 = {df: float(t) for df, t in enumerate(_T95_TABLE.split(), start=1)}


def separated(a: list[float], b: list[float]) -> str:
    """Whether seeds' values of a exceed b's beyond their spread: "yes" (a higher), "no" (a lower) or "not
    separated" (the difference of the means is no larger than the two standard deviations together, or a side has
    fewer than two seeds). A tie is a tie in float64 too: accuracies like 9/24 against (7/24, 8/24, 9/24) give a
    difference equal to the spread up to rounding, which must not decide it (1e-12 is far above the float64 rounding
    of a few seeds' means and deviations, ~1e-15, and far below any difference a held-out set can measure)."""
    sa, sb = spread(a), spread(b)
    if sa["n"] < 2 or sb["n"] < 2:
        return "not separated"
    diff = sa["mean"] - sb["mean"]
    if abs(diff) <= sa["std"] + sb["std"] + 1e-12:
        return "not separated"
    return "yes" if diff > 0 else "no"


def _eval_dir_task(results: dict, path: Path) -> str:
    return results.get("task") or path.name


def read_results(file: Path) -> dict:
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(str(file), e.lineno, None, f"not valid JSON ({e.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("datasets"), dict):
        raise DataError(str(file), None, "datasets", "missing: not a results.json of `asft eval`")
    return report


def result_columns(report: dict, file: Path) -> dict[str, float | None]:
    """`<task>:<dataset> <metric>` and `<task>: macro average` columns of one results.json."""
    task = _eval_dir_task(report, file.parent)
    columns = {}
    for name, r in report["datasets"].items():
        if not isinstance(r, dict) or "value" not in r:
            raise DataError(str(file), None, f"datasets.{name}.value", "missing")
        columns[f"{task}:{name} {r.get('metric', 'value')}"] = r["value"]
    if len(report["datasets"]) > 1 and isinstance(report.get("macro_average"), dict):
        columns[f"{task}: macro average"] = report["macro_average"].get("value")
    return columns


def _run_results(run: RunInfo) -> tuple[dict, list[str]]:
    """Every results.json under a run folder: `asft eval` output put there, and the last in-training evaluation of
    each task (eval_task/<task>/step-N, under the same column; noted); an explicit `asft eval` result wins."""
    found, in_training = {}, {}
    for file in sorted(run.path.rglob(RESULTS)):
        rel = file.relative_to(run.path).parts
        if rel[0].startswith("checkpoint-"):
            continue
        if rel[0] == "eval_task" and len(rel) == 4 and rel[2].startswith("step-"):
            step = int(rel[2].split("-")[1])
            if step >= in_training.get(rel[1], (-1, None))[0]:
                in_training[rel[1]] = (step, file)
            continue
        found.update(result_columns(read_results(file), file))
    notes = []
    for _task, (step, file) in in_training.items():
        cols = {k: v for k, v in result_columns(read_results(file), file).items() if k not in found}
        found.update(cols)
        if cols:
            notes.append(f"{run.label}: {', '.join(cols)} from the in-training evaluation at step {step}")
    return found, notes


def _owner(report: dict, runs: list[RunInfo]) -> RunInfo | None:
    """The run an evaluation was made of: its model is the run folder or one of its checkpoints."""
    model = report.get("model")
    if not model or not Path(model).exists():
        return None
    model = Path(model).resolve()
    for run in runs:
        root = run.path.resolve()
        if model == root or root in model.parents:
            return run
    return None


def collect(paths: list[str | Path]) -> list[RunInfo]:
    """The rows of a comparison: runs (with their results), then evaluations of models that are no given run."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not (is_run(p) or is_evaluation(p)):
            _refuse(p)
    runs = [load_run(p) for p in paths if is_run(p)]
    for run in runs:
        run.results, run.notes = _run_results(run)
    extra = []
    for p in paths:
        if is_run(p):
            continue
        report = read_results(p / RESULTS)
        columns = result_columns(report, p / RESULTS)
        owner = _owner(report, runs)
        if owner is None:
            model = report.get("model")
            config = read_config(Path(model)) if model and Path(model).is_dir() else {}
            owner = RunInfo(p, f"{p.name} ({Path(str(model)).name})" if model else p.name, config, [])
            extra.append(owner)
        owner.results.update(columns)
    return runs + extra


# The final terms `asft compare` tabulates: training's, then an RL run's rewards.


def _final_terms(run: RunInfo) -> dict[str, float]:
    return {k: series(run.records, k)[1][-1] for k in FINAL_TERMS if series(run.records, k)[0]}


def _weight_rule(c: dict) -> str | None:
    """The weight rule's parameters that differ from their defaults (e.g. `weight_power=0.5`), '-' for none."""
    from .objectives import RULE_PARAMETERS, WEIGHT_RULES

    rule = WEIGHT_RULES.get(c.get("mode"))
    if rule is None:
        return None
    given = [f"{k}={c[k]}" for k in rule.params if k in RULE_PARAMETERS and k in c and c[k] != RULE_PARAMETERS[k]]
    return ", ".join(given) or "-"


def _anchored(c: dict) -> bool:
    from .objectives import WEIGHT_RULES

    rule = WEIGHT_RULES.get(c.get("mode"))
    return bool(c.get("anchor")) or (rule is not None and rule.anchored)


def comparison(rows: list[RunInfo]) -> dict:
    """The comparison as data: one entry per row (config, final terms, results) and the best row per result."""
    result_keys = list(dict.fromkeys(k for r in rows for k in r.results))
    term_keys = [k for k in FINAL_TERMS if any(k in _final_terms(r) for r in rows)]
    entries = []
    for r in rows:
        c, lora = r.config, r.config.get("lora")
        entries.append(
            {
                "run": r.label,
                "path": str(r.path),
                "mode": c.get("mode") + (" + anchor" if c.get("anchor") else "") if c.get("mode") else None,
                "weight_rule": _weight_rule(c),
                # kl_weight only matters where the KL is in the loss
                "kl_weight": c.get("kl_weight") if _anchored(c) else None,
                "learning_rate": c.get("learning_rate"),
                "lora": None if not c else (f"r={lora['r']}" if lora else "no"),
                "final": _final_terms(r),
                "results": dict(r.results),
                "notes": list(r.notes),
            }
        )
    best = {}
    for key in result_keys:
        values = [(e["results"].get(key), i) for i, e in enumerate(entries) if _is_number(e["results"].get(key))]
        if len(values) > 1:
            lower = key.rsplit(" ", 1)[-1] in LOWER_IS_BETTER
            top = (min if lower else max)(v for v, _ in values)
            best[key] = [i for v, i in values if v == top]
    return {
        "columns": {
            "config": ["mode", "weight_rule", "kl_weight", "learning_rate", "lora"],
            "final": term_keys,
            "results": result_keys,
        },
        "rows": entries,
        "best": best,
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def markdown(report: dict) -> str:
    cols = report["columns"]
    head = ["run"] + cols["config"] + [f"final {k}" for k in cols["final"]] + cols["results"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, e in enumerate(report["rows"]):
        cells = [e["run"]] + [_fmt(e[k]) for k in cols["config"]] + [_fmt(e["final"].get(k)) for k in cols["final"]]
        for key in cols["results"]:
            text = _fmt(e["results"].get(key))
            cells.append(f"**{text}**" if i in report["best"].get(key, []) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(
    rows: list[RunInfo], output_dir: str | Path, metrics: list[str] | None = None, probs: dict | None = None
) -> dict:
    """report.md, comparison.csv, comparison.json and training_curves.png in output_dir (with the seed groups and,
    given `probs` from `prob_bins`, the per-bin table); returns the data."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = comparison(rows)
    extras = write_extras(rows, out, report, probs)
    (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    cols = report["columns"]
    with (out / "comparison.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "path"] + cols["config"] + [f"final {k}" for k in cols["final"]] + cols["results"])
        for e in report["rows"]:
            w.writerow(
                [e["run"], e["path"]]
                + [e[k] for k in cols["config"]]
                + [e["final"].get(k) for k in cols["final"]]
                + [e["results"].get(k) for k in cols["results"]]
            )
    notes = [n for e in report["rows"] for n in e["notes"]]
    text = (
        [
            "# asft compare",
            "",
            markdown(report),
            "",
            "Bold: the best value of a result column (highest; lowest for kl / nll); kl_weight is shown for the "
            "modes whose loss holds the KL.",
            "",
        ]
        + [f"- {n}" for n in notes]
        + ([""] if notes else [])
        + extras
    )
    runs = [r for r in rows if r.records]
    if runs:
        plot_metrics(
            runs,
            [m for m in (metrics or numeric_keys([x for r in runs for x in r.records]))],
            out / "training_curves.png",
        )
        text += ["![training curves](training_curves.png)", ""]
    (out / "report.md").write_text("\n".join(text))
    return report


# ---------------------------------------------------------------------------------------------- seed groups

# Where a run is, not how it was made: these training arguments differ between any two runs.
IDENTITY_ARGS = ("output_dir", "logging_dir", "run_name")


def settings_key(config: dict) -> str:
    """A run's settings without its seed (and its folders): runs with equal keys differ only by the seed."""
    config = json.loads(json.dumps(config, default=str))
    config.pop("seed", None)
    args = config.get("args")
    if isinstance(args, dict):
        for key in ("seed", *IDENTITY_ARGS):
            args.pop(key, None)
    return json.dumps(config, sort_keys=True)


def _seed(config: dict):
    args = config.get("args")
    return config.get("seed", args.get("seed") if isinstance(args, dict) else None)


def seed_groups(rows: list[RunInfo]) -> list[dict]:
    """Training runs grouped by everything but the seed; per group n, the seeds, and per metric (final training
    terms, result columns) n, mean, std and a 95% interval (`spread`). Rows without a configuration (evaluations
    of other models) are never grouped."""
    groups: dict[str, list[RunInfo]] = {}
    for r in rows:
        if r.config:
            groups.setdefault(settings_key(r.config), []).append(r)
    out = []
    for members in groups.values():
        metrics = {}
        finals = [_final_terms(r) for r in members]
        for key in [k for k in TERMS[:7] if any(k in f for f in finals)]:
            metrics[f"final {key}"] = spread([f[key] for f in finals if key in f])
        for key in dict.fromkeys(k for r in members for k in r.results):
            metrics[key] = spread([r.results[key] for r in members if key in r.results])
        c = members[0].config
        out.append(
            {
                "name": f"{c.get('mode') or '?'} x{len(members)}: " + ", ".join(r.label for r in members),
                "mode": c.get("mode"),
                "runs": [str(r.path) for r in members],
                "seeds": [_seed(r.config) for r in members],
                "n": len(members),
                "metrics": metrics,
            }
        )
    return out


def _interval(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    text = f"{_fmt(m['mean'])} +- {_fmt(m['std'])}"
    return text + (f" [{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}]" if m["ci95"] else "") + f" (n={m['n']})"


def groups_markdown(groups: list[dict]) -> str:
    """One line per seed group: n, seeds, and per metric mean +- std [95% interval] (n)."""
    keys = list(dict.fromkeys(k for g in groups for k in g["metrics"]))
    lines = ["| group | n | seeds | " + " | ".join(keys) + " |", "|---|---:|---|" + "---|" * len(keys)]
    for g in groups:
        cells = [_interval(g["metrics"][k]) if k in g["metrics"] else "-" for k in keys]
        seeds = ",".join(str(s) for s in g["seeds"])
        lines.append(f"| {g['name']} | {g['n']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_groups_csv(groups: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n", "seeds", "metric", "metric_n", "mean", "std", "ci95_low", "ci95_high"])
        for g in groups:
            for key, m in g["metrics"].items():
                ci = m["ci95"] or [None, None]
                w.writerow([g["name"], g["n"], " ".join(map(str, g["seeds"])), key, m["n"], m["mean"], m["std"], *ci])


# --------------------------------------------------------------------------------------- probabilities by bin


def prob_bins(rows: list[RunInfo], data: str, base_model: str | None = None, **kwargs) -> dict:
    """The mechanism table for runs sharing an evaluation set: the data's response tokens binned by the base
    model's p(y_t), per bin each run's mean p(y_t) (teacher forced). The base is `base_model`, else the model the
    runs were trained from (all the same, or an error)."""
    from .diagnostics import bin_table

    runs = [r for r in rows if r.config]
    if not runs:
        raise ConfigError("--probs_data: no training run among the paths")
    if base_model is None:
        bases = {r.config.get("model") for r in runs}
        if len(bases) != 1 or None in bases:
            raise ConfigError(
                f"--probs_data: the runs start from different or unknown models ({bases}); pass --base_model"
            )
        base_model = bases.pop()
    base = token_probabilities(base_model, data, **kwargs)
    after = {r.label: token_probabilities(str(r.path), data, **kwargs) for r in runs}
    return {"data": data, "base_model": base_model, "bins": bin_table(base, after)}


def plot_prob_bins(table: dict, output: str | Path | None = None):
    """Per base-model probability bin, the mean p(y_t) of each model (the base's own mean as the reference line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bins = table["bins"]
    xs = list(range(len(bins)))
    ax.plot(xs, [b["base"] for b in bins], linestyle="--", color="gray", marker="o", label="base")
    for name in bins[0]["after"]:
        ax.plot(xs, [b["after"][name] for b in bins], marker="o", label=name)
    ax.set_xticks(xs, [f"{b['bin']}\nn={b['tokens']}" for b in bins])
    ax.set_xlabel("base model's p(y_t) bin")
    ax.set_ylabel("mean p(y_t) (teacher forced)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Where training moved the tokens, by the base model's prior")
    return _finish(fig, ax, output)


def write_extras(rows: list[RunInfo], out: Path, report: dict, probs: dict | None = None) -> list[str]:
    """Seed groups and the per-bin table into comparison.json, seed_groups.csv and the figures; report.md lines."""
    from .diagnostics import format_bin_table

    groups = seed_groups(rows)
    report["groups"] = groups
    text = []
    if any(g["n"] > 1 for g in groups):
        write_groups_csv(groups, out / "seed_groups.csv")
        text += [
            "## Seeds",
            "",
            "Runs whose settings differ only by the seed: mean +- standard deviation [95% interval] (n) per metric. "
            "A difference between groups smaller than their seeds' spread is not a separation.",
            "",
            groups_markdown(groups),
            "",
        ]
    if probs is not None:
        report["prob_bins"] = probs
        plot_prob_bins(probs, out / "prob_bins.png")
        text += [
            "## Token probabilities by the base model's prior",
            "",
            f"Response tokens of {probs['data']} binned by p(y_t) under {probs['base_model']}; per bin, each run's "
            "mean p(y_t) (teacher forced).",
            "",
            format_bin_table(probs["bins"]),
            "",
            "![probabilities by bin](prob_bins.png)",
            "",
        ]
    return text


# ------------------------------------------------------------------------------------------------------ CLI
