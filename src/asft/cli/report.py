"""`asft plot` and `asft compare`: training curves, p(y_t) histograms, and one report over runs and evaluations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from ..reporting import (
    collect,
    load_run,
    markdown,
    plot_metrics,
    plot_prob_bins,
    plot_probs,
    prob_bins,
    token_probabilities,
    write_comparison,
)


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asft plot",
        description="Plot training curves of runs (metrics.jsonl), or "
        "with --kind probs the histogram of p(y_t) per model over a dataset's responses.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_MODEL",
        help="run folders (curves) or models (probs): a "
        "folder, LoRA adapter folder, hub id or embedded:smollm2-135m-instruct",
    )
    p.add_argument(
        "--kind",
        default="curves",
        choices=["curves", "probs"],
        help="curves: metrics against step; probs: token probability histogram (default: curves)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="curves: keys of metrics.jsonl to plot, one panel each (default: every numeric key)",
    )
    p.add_argument("--smooth", type=int, default=1, help="curves: moving average over N points (default: 1, none)")
    p.add_argument(
        "--output", default=None, help="image file: .png (default), .svg or .pdf (default: curves.png / probs.png)"
    )
    p.add_argument("--data", default=None, help="probs: data file(s), comma-separated, in the training formats")
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", "alpaca", "chat", "none"],
        help="probs: prompt rendering, as in training (default: auto)",
    )
    p.add_argument("--max_length", type=int, default=None, help="probs: truncate each example to N tokens")
    p.add_argument("--limit", type=int, default=None, help="probs: only the first N examples")
    return p


def plot_main(argv: list[str]) -> int:
    args = plot_parser().parse_args(argv)
    if args.smooth < 1:
        raise ConfigError(f"--smooth: must be >= 1, got {args.smooth}")
    output = args.output or ("probs.png" if args.kind == "probs" else "curves.png")
    if Path(output).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--output: {output} must end in .png, .svg or .pdf")
    if args.kind == "probs":
        if not args.data:
            raise ConfigError("--kind probs needs --data FILE (prompt/response pairs in a training format)")
        from ..data import load_examples

        load_examples([d.strip() for d in args.data.split(",") if d.strip()])  # bad rows: fail before any model
        models = {}
        for path in args.paths:
            print(f"p(y_t) under {path} ...", file=sys.stderr, flush=True)
            probs = token_probabilities(
                path, args.data, template=args.template, max_length=args.max_length, limit=args.limit
            )
            label = Path(path).name if Path(path).exists() else path
            models[label] = probs
            print(f"  {label}: {len(probs)} tokens, mean p {sum(probs) / max(len(probs), 1):.4f}")
        plot_probs(models, output)
        if len(models) > 1:  # the first model is the base: where did the others move its improbable tokens?
            from ..diagnostics import bin_table, format_bin_table

            first = next(iter(models))
            table = {"bins": bin_table(models[first], {k: v for k, v in models.items() if k != first})}
            bins_output = Path(output).with_name(Path(output).stem + "_bins" + Path(output).suffix)
            plot_prob_bins(table, bins_output)
            print(f"Tokens binned by {first}'s p(y_t), mean p per model:\n{format_bin_table(table['bins'])}")
            print(f"Wrote {bins_output}")
    else:
        if args.data:
            raise ConfigError("--data is for --kind probs")
        plot_metrics([load_run(p) for p in args.paths], args.metrics, output, args.smooth)
    print(f"Wrote {output}")
    return 0


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asft compare",
        description="Compare runs and evaluations: a markdown table "
        "(configuration, final training terms, every asft eval result), curves, CSV, JSON.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_OR_EVAL_DIR", help="output folders of asft train or asft eval")
    p.add_argument("--output_dir", required=True, help="where report.md, comparison.csv / .json and the plots go")
    p.add_argument("--metrics", nargs="+", default=None, help="keys of metrics.jsonl to plot (default: all)")
    p.add_argument(
        "--probs_data",
        default=None,
        metavar="FILE",
        help="an evaluation set the runs share (prompt/response pairs): its response tokens binned by the base "
        "model's p(y_t) ([0, 0.1), [0.1, 0.5), [0.5, 0.9), [0.9, 1]), per bin each run's mean p(y_t) after "
        "training (teacher forced): a table in report.md and prob_bins.png",
    )
    p.add_argument(
        "--base_model", default=None, help="--probs_data: the base model (default: the model the runs start from)"
    )
    p.add_argument("--probs_limit", type=int, default=None, help="--probs_data: only the first N examples")
    return p


def compare_main(argv: list[str]) -> int:
    args = compare_parser().parse_args(argv)
    rows = collect(args.paths)
    probs = None
    if args.probs_data:
        probs = prob_bins(rows, args.probs_data, args.base_model, limit=args.probs_limit)
    report = write_comparison(rows, args.output_dir, args.metrics, probs)
    print(markdown(report))
    print(f"\nReport: {Path(args.output_dir) / 'report.md'}")
    return 0
