"""Is ASFT a better starting point for RL than SFT? The same short DAPO budget from base, SFT and ASFT starts.

The paper's Table 2 (LLaMA-2-7B, medical) reports SFT + DAPO 40.24 and ASFT + DAPO 44.10. Here, on the embedded
SmolLM2-135M-Instruct and the generated reasoning task of benchmarks/reasoning_task.py (held-out problems), each
start gets `asft rl --algorithm dapo --reward math` with the same steps, prompts, generations and learning rate,
and is evaluated greedily on the held-out problems (`asft eval --task math`) before and after.

Starts: with `--from_replicate DIR` (default outputs/replicate) the task files in DIR/task/ and the final models
in DIR/runs/sft/ and DIR/runs/asft/ written by benchmarks/replicate.py are reused when they exist; otherwise the
task is generated and short sft and asft runs are trained here with one shared budget.

    python benchmarks/rl_init.py            # about 30 min on 2 CPU cores (not measured: see --quick)
    python benchmarks/rl_init.py --quick    # end-to-end smoke test, a few minutes

Prints, per start: accuracy before and after RL and a reward-curve summary from the RL run's metrics.jsonl; the
last line is `base_rl=<acc> sft_rl=<acc> asft_rl=<acc>`. Nothing here is asserted or tuned to a result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]
from asft.cli.args import flags_to_argv  # noqa: E402
from reasoning_task import INSTRUCTION, write_task  # noqa: E402

BASE = "embedded:smollm2-135m-instruct"
# the tail of every training command here: no checkpoints, CPU, no progress bars
CPU_RUN = "--save_strategy no --use_cpu true --disable_tqdm true".split()

FULL = dict(n_train=400, n_test=100, start_steps=20, start_batch=8, start_lr=5e-5, eval_n=50, eval_tokens=160)
FULL.update(rl_steps=8, rl_prompts=4, rl_generations=4, rl_tokens=160, rl_lr=1e-5)
QUICK = dict(FULL, n_train=40, n_test=8, start_steps=2, start_batch=4, eval_n=8, eval_tokens=64)
QUICK.update(rl_steps=2, rl_prompts=2, rl_tokens=48)


def asft(*args: str) -> None:
    """Run the asft CLI of this checkout in a child process (each stage frees its memory)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "asft.cli", *args]
    print("$ asft " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env)


def rl_problems(train_jsonl: Path, out: Path) -> Path:
    """The training problems as `asft eval` math rows ({"question", "answer"}): RL sees the SFT prompts, never
    the held-out ones."""
    from asft.evaluation.math import last_boxed

    rows = []
    for line in train_jsonl.read_text().splitlines():
        r = json.loads(line)
        question = r["instruction"].replace("\n" + INSTRUCTION, "").strip()
        rows.append({"question": question, "answer": last_boxed(r["response"])})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def task_files(args, cfg) -> tuple[Path, Path]:
    rep = Path(args.from_replicate) / "task"
    if (rep / "train.jsonl").exists() and (rep / "test.jsonl").exists():
        print(f"Task: reusing {rep}", flush=True)
        return rep / "train.jsonl", rep / "test.jsonl"
    paths = write_task(Path(args.output_dir) / "task", n_train=cfg["n_train"], n_test=cfg["n_test"], seed=args.seed)
    print(f"Task: generated in {paths['train'].parent}", flush=True)
    return paths["train"], paths["test"]


def start_model(mode: str, args, cfg, train: Path) -> str:
    for folder in (Path(args.from_replicate) / "runs" / mode,):
        if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
            print(f"Start {mode}: reusing {folder}", flush=True)
            return str(folder)
    out = Path(args.output_dir) / "starts" / mode
    if not (out / "config.json").exists():
        start = dict(max_steps=cfg["start_steps"], per_device_train_batch_size=cfg["start_batch"])
        what = dict(model_name_or_path=BASE, data_path=train, mode=mode, output_dir=out, overwrite_output_dir=True)
        asft(
            "train",
            *flags_to_argv({**what, **start, "learning_rate": cfg["start_lr"], "seed": args.seed}),
            *"--lr_scheduler_type cosine --warmup_steps 1 --logging_steps 1".split(),
            *CPU_RUN,
        )
    return str(out)


def accuracy(model: str, test: Path, out: Path, cfg) -> float:
    if not (out / "results.json").exists():
        asft(
            "eval",
            *flags_to_argv(dict(model=model, task="math", data=test, output_dir=out)),
            *flags_to_argv(dict(limit=cfg["eval_n"], max_new_tokens=cfg["eval_tokens"])),
            *"--batch_size 16 --device cpu --quiet --overwrite".split(),
        )
    report = json.loads((out / "results.json").read_text())
    return report["macro_average"]["value"]


def run_rl(model: str, problems: Path, out: Path, args, cfg) -> Path:
    if not (out / "config.json").exists() and not (out / "adapter_config.json").exists():
        batch = cfg["rl_prompts"] * cfg["rl_generations"]
        what = dict(model_name_or_path=model, data_path=problems, reward="math", algorithm=args.algorithm)
        budget = dict(max_steps=cfg["rl_steps"], per_device_train_batch_size=batch)
        budget.update(num_generations=cfg["rl_generations"], max_completion_length=cfg["rl_tokens"])
        asft(
            "rl",
            *flags_to_argv({**what, "output_dir": out, "overwrite_output_dir": True, "seed": args.seed}),
            *flags_to_argv(dict(budget, learning_rate=cfg["rl_lr"], gradient_checkpointing=False)),
            *CPU_RUN,
        )
    return out / "metrics.jsonl"


def curve(metrics: Path) -> dict:
    recs = [r for r in map(json.loads, metrics.read_text().splitlines()) if "reward" in r]
    rewards = [r["reward"] for r in recs]
    half = max(1, len(rewards) // 2)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "steps": len(recs),
        "reward_first_half": mean(rewards[:half]),
        "reward_second_half": mean(rewards[half:]),
        "train_accuracy": mean([r.get("accuracy") for r in recs]),
        "no_signal_groups": mean([r.get("frac_reward_zero_std") for r in recs]),
        "dropped_groups": mean([r.get("dynamic_sampling/dropped_groups_frac") for r in recs]),
        "completion_length": mean([r.get("completions/mean_length") for r in recs]),
        "kl_last": recs[-1].get("kl") if recs and recs[-1].get("kl") is not None else float("nan"),
        "rewards": [round(x, 3) for x in rewards],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from_replicate", default="outputs/replicate", help="benchmarks/replicate.py's output folder")
    p.add_argument("--output_dir", default="outputs/rl_init")
    p.add_argument("--algorithm", default="dapo", choices=["dapo", "grpo", "dr_grpo"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (e.g. 0,1,2): the whole study once per seed in OUTPUT_DIR/seed-<s>, then the "
        "seeds' mean +- std per start and asft_rl vs sft_rl decided against their spread",
    )
    p.add_argument("--quick", action="store_true", help="tiny budget: an end-to-end smoke test")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"override budget entries, e.g. --set rl_steps=12 eval_n=100 (keys: {', '.join(FULL)})",
    )
    args = p.parse_args()
    if args.quick and args.output_dir == "outputs/rl_init":
        args.output_dir = "outputs/rl_init_quick"
    if args.seeds:
        return over_seeds(args, [int(x) for x in args.seeds.split(",") if x.strip()])
    cfg = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            p.error(f"--set: unknown key {key!r}")
        cfg[key] = type(cfg[key])(value)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Finished stages in output_dir are reused (a rerun resumes); only when they were made with this budget.
    settings = {**cfg, "algorithm": args.algorithm, "seed": args.seed, "from_replicate": args.from_replicate}
    stamp = out / "budget.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        p.error(f"{out} holds stages run with another budget ({stamp}); pass another --output_dir")
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    started = time.monotonic()
    print(f"Budget: {json.dumps(cfg)}; algorithm {args.algorithm}", flush=True)

    train, test = task_files(args, cfg)
    problems = rl_problems(train, out / "rl_problems.jsonl")
    starts = {"base": BASE}
    for mode in ("sft", "asft"):
        starts[mode] = start_model(mode, args, cfg, train)

    results = {}
    for name, model in starts.items():
        t0 = time.monotonic()
        before = accuracy(model, test, out / "eval" / f"{name}_before", cfg)
        metrics = run_rl(model, problems, out / "rl" / name, args, cfg)
        after = accuracy(str(out / "rl" / name), test, out / "eval" / f"{name}_rl", cfg)
        results[name] = {"before": before, "after": after, **curve(metrics), "minutes": (time.monotonic() - t0) / 60}
        print(f"[{name}] held-out accuracy {before:.3f} -> {after:.3f} after {args.algorithm}", flush=True)

    print(
        f"\nHeld-out problems: {cfg['eval_n']} (greedy, {cfg['eval_tokens']} new tokens); RL: {cfg['rl_steps']} "
        f"{args.algorithm} steps x {cfg['rl_prompts']} prompts x {cfg['rl_generations']} generations, lr "
        f"{cfg['rl_lr']}, {cfg['rl_tokens']} completion tokens"
    )
    print(
        "no-signal: groups whose total rewards are all equal (TRL's frac_reward_zero_std); dropped: groups "
        "masked by dynamic sampling (correctness all equal); kl last: KL to the start at the last step"
    )
    print(
        f"{'start':6} {'acc before':>10} {'acc after':>10} {'reward 1st half':>15} {'reward 2nd half':>15} "
        f"{'train acc':>9} {'no-signal':>9} {'dropped':>7} {'kl last':>8} {'len':>6} {'min':>5}"
    )
    for name, r in results.items():
        print(
            f"{name:6} {r['before']:10.3f} {r['after']:10.3f} {r['reward_first_half']:15.3f} "
            f"{r['reward_second_half']:15.3f} {r['train_accuracy']:9.3f} {r['no_signal_groups']:9.3f} "
            f"{r['dropped_groups']:7.3f} {r['kl_last']:8.4f} "
            f"{r['completion_length']:6.1f} {r['minutes']:5.1f}"
        )
        print(f"       rewards per step: {r['rewards']}")
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"Total {(time.monotonic() - started) / 60:.1f} min; summary in {out / 'summary.json'}")
    print(" ".join(f"{name}_rl={results[name]['after']:.3f}" for name in ("base", "sft", "asft")))


def over_seeds(args, seeds: list[int]) -> None:
    """The study once per seed (a child process each, into OUTPUT_DIR/seed-<s>), then the seeds' spread."""
    from asft.reporting import separated, spread

    root, per_seed = Path(args.output_dir), {}
    for seed in seeds:
        argv = [sys.executable, __file__, "--output_dir", str(root / f"seed-{seed}"), "--seed", str(seed)]
        argv += ["--from_replicate", args.from_replicate, "--algorithm", args.algorithm, *(["--quick"] * args.quick)]
        argv += ["--set", *args.set] if args.set else []
        print(f"\n##### seed {seed} #####", flush=True)
        subprocess.run(argv, check=True)
        summary = json.loads((root / f"seed-{seed}" / "summary.json").read_text())
        for name, r in summary.items():
            per_seed.setdefault(name, []).append(r["after"])
    stats = {name: spread(values) for name, values in per_seed.items()}
    for name, st in stats.items():
        print(f"{name:6} accuracy after RL {st['mean']:.3f} +- {st['std']:.3f} (n={st['n']}): {per_seed[name]}")
    verdict = separated(per_seed.get("asft", []), per_seed.get("sft", []))
    (root / "seeds_summary.json").write_text(
        json.dumps({"seeds": seeds, "after": per_seed, "stats": stats, "asft_rl_gt_sft_rl": verdict}, indent=2) + "\n"
    )
    print(f"asft_rl > sft_rl beyond the seeds' spread: {verdict}")
    print(" ".join(f"{name}_rl={stats[name]['mean']:.3f}+-{stats[name]['std']:.3f}" for name in stats))


if __name__ == "__main__":
    main()
