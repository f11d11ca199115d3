"""Step time and peak memory of every mode relative to `sft`, full fine-tuning and LoRA, measured in one run.

Model: SmolLM2-135M-Instruct (embedded, float32); batch: 4 sequences of ~240 tokens (as DESIGN.md's reference
figures); every mode sees the same batches in the same order.

Time. On a shared machine a step's time varies by up to 2x from one minute to the next, so modes timed in separate
processes, one after the other, cannot be compared (the same code measured 0.9x and 1.65x sft in two runs here).
Each mode is therefore timed *paired* with sft: one process holds an sft trainer and a trainer of the mode, and
runs their optimizer steps alternately (sft, mode, mode, sft, sft, mode, ...; each trainer in its own thread,
handing the CPU over at step boundaries), so both see the same background load. A mode's ratio is the median over
the timed pairs of (its step time / the sft step next to it); its step time is the median of its own steps.

Memory. Peak resident memory (ru_maxrss) of a separate process per (mode, full|LoRA) that runs a few steps alone.

`cached` is asft with `--reference_cache`: the reference's top-k log-probs built once over the same data
(`asft cache-reference`, k = --top_k, float16) before any timing; no reference model is loaded.

The weight rules beyond DFT (`eaft`, `prift`) are each timed in a group of three, sft, dft and the rule, their
steps rotating (sft dft rule, dft rule sft, rule sft dft, ...), and compared with both: `eaft` online (its top-k
entropy is its only extra work over dft), `prift` with the reference cache (its prior rho(y_t) read from the cache,
no reference model: its cost should be sft's).

    python benchmarks/overhead.py [--steps 5] [--warmup 2] [--modes sft,dft,sft_kl,asft,iw_sft,cached,eaft,prift]
           [--loss_implementation fused|naive] [--top_k 64] [--kinds full,lora]

Printed, never asserted. Last line: `full_ratio=<asft/sft step time, full> lora_ratio=<asft/sft step time, LoRA>
cached_full_ratio=<asft with the cache / sft, full> cached_lora_ratio=<same, LoRA>` for the modes given, then
`<rule>_<kind>_x_dft=... <rule>_<kind>_x_sft=...` for each rule.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WORDS = (
    "the patient presented with fever and cough after travel so the doctor ordered a chest x ray which "
    "showed a small infiltrate in the lower lobe and treatment with antibiotics was started"
).split()


def make_data(path: str, n: int = 64, seed: int = 0, prompt_words: int = 55, response_words: int = 150) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            response = " ".join(rng.choice(WORDS) for _ in range(response_words))
            f.write(json.dumps({"instruction": prompt, "response": response}) + "\n")


def build_cache(data: str, out: str, top_k: int) -> None:
    from asft.cli import main

    argv = [
        "cache-reference",
        "--model_name_or_path",
        "embedded:smollm2-135m-instruct",
        "--data_path",
        data,
        "--template",
        "alpaca",
        "--model_max_length",
        "256",
        "--top_k",
        str(top_k),
        "--output_dir",
        out,
        "--disable_tqdm",
    ]
    if main(argv) != 0:
        sys.exit("building the reference cache failed")


# The rules timed in a group with sft and dft, and the mode each is timed as ("+cache": with the reference cache).
RULE_GROUPS = {"eaft": "eaft", "prift": "prift+cache"}


def make_trainer(
    mode: str,
    lora: bool,
    data: str,
    steps: int,
    impl: str,
    out: str,
    cache: str | None = None,
    *,
    model=None,
    tokenizer=None,
    batch: int = 4,
    max_length: int = 256,
    **config,
):
    """A trainer of `mode` ("cached": asft with the reference cache `cache`; "<mode>+cache": that mode with it) on
    the embedded SmolLM2-135M on the CPU, or on `model` / `tokenizer`; `config`: more AnchoredSFTConfig fields. Also
    returns the tokens of a batch."""
    import torch

    from asft import AnchoredSFTConfig, AnchoredSFTTrainer
    from asft.data import build_dataset
    from asft.models import load_model, load_tokenizer, lora_config, resolve_model_path

    torch.manual_seed(0)
    if model is None:
        path = resolve_model_path("embedded:smollm2-135m-instruct")
        tokenizer, model = load_tokenizer(path), load_model(path)
    dataset = build_dataset(data, tokenizer, template="alpaca", max_length=max_length, log=lambda *_: None)
    cached = mode == "cached" or mode.endswith("+cache")  # against the reference cache
    quiet = dict(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0)
    objective = dict(mode="asft" if mode == "cached" else mode.removesuffix("+cache"), loss_implementation=impl)
    run = dict(per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5, max_length=max_length)
    args = AnchoredSFTConfig(
        output_dir=out,
        **objective,
        **run,
        reference_cache=cache if cached else None,
        **quiet,
        **{"use_cpu": True, **config},
    )
    trainer = AnchoredSFTTrainer(
        model.train(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(8, 16, 0.0) if lora else None,
    )
    return trainer, sum(len(x) for x in dataset[:batch]["input_ids"])


def timed_pair(mode: str, lora: bool, data: str, steps: int, warmup: int, impl: str, cache: str | None) -> dict:
    """Optimizer steps of an sft trainer and a `mode` trainer, strictly alternating; the times of each."""
    times = timed_group(["sft", mode], lora, data, steps, warmup, impl, cache)
    base, other = times
    # Each mode step over the sft step next to it in the same ABBA pair.
    return {"sft_s": base, "mode_s": other, "ratios": [b / a for a, b in zip(base, other)]}


def timed_group(
    modes: list[str], lora: bool, data: str, steps: int, warmup: int, impl: str, cache: str | None
) -> list[list[float]]:
    """Optimizer steps of one trainer per mode, in rounds of one step each, the order rotating from round to round;
    the timed step times of each (round k's step of every trainer is comparable: the same background load)."""
    from transformers import TrainerCallback

    # One more step than timed: the first trainer to finish tears down during the others' last (untimed) step.
    n = steps + warmup + 1
    # Round k runs the trainers in the order rotated by k (two trainers: AB BA AB ...): whichever position in a
    # round is favoured (what the other threads do between steps, caches), each trainer holds it equally often.
    m = len(modes)
    order = [(k + j) % m for k in range(n) for j in range(m)]
    turn = threading.Condition()
    position = [0]
    times: list[list[float]] = [[] for _ in modes]
    errors: list[BaseException] = []

    class Alternate(TrainerCallback):
        def __init__(self, i):
            self.i = i

        def on_step_begin(self, *a, **k):
            with turn:
                turn.wait_for(lambda: errors or position[0] >= len(order) or order[position[0]] == self.i)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times[self.i].append(time.perf_counter() - self.t)
            with turn:
                position[0] += 1
                turn.notify_all()

    with tempfile.TemporaryDirectory() as out:
        trainers = [
            make_trainer(m, lora, data, n, impl, os.path.join(out, str(i)), cache)[0] for i, m in enumerate(modes)
        ]
        for i, trainer in enumerate(trainers):
            trainer.add_callback(Alternate(i))

        def run(trainer):
            try:
                trainer.train()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread; never leave the other waiting
                with turn:
                    errors.append(e)
                    turn.notify_all()

        threads = [threading.Thread(target=run, args=(t,)) for t in trainers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return [t[warmup : warmup + steps] for t in times]


def peak_memory(mode: str, lora: bool, data: str, steps: int, impl: str, cache: str | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer, tokens = make_trainer(mode, lora, data, steps, impl, out, cache)
        trainer.train()
    return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "tokens": tokens}


def subprocess_result(argv: list[str], what: str) -> dict:
    out = subprocess.run([sys.executable, __file__] + argv, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps of each trainer in a pair")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed first steps (allocation; compilation, again at the second batch shape)",
    )
    p.add_argument("--modes", default="sft,dft,sft_kl,asft,iw_sft,cached,eaft,prift")
    p.add_argument("--kinds", default="full,lora", help="full fine-tuning, LoRA, or both")
    p.add_argument("--top_k", type=int, default=64, help="k of the reference cache (mode cached)")
    p.add_argument("--loss_implementation", default="fused", choices=["fused", "naive"])
    p.add_argument("--worker", nargs=3, metavar=("KIND", "MODE", "LORA"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, mode, lora = args.worker[0], args.worker[1], args.worker[2] == "1"
        if kind == "time" and mode in RULE_GROUPS.values():
            times = timed_group(
                ["sft", "dft", mode], lora, args.data, args.steps, args.warmup, args.loss_implementation, args.cache
            )
            result = {"sft_s": times[0], "dft_s": times[1], "mode_s": times[2]}
        elif kind == "time":
            result = timed_pair(mode, lora, args.data, args.steps, args.warmup, args.loss_implementation, args.cache)
        else:
            result = peak_memory(mode, lora, args.data, 2, args.loss_implementation, args.cache)
        print("RESULT " + json.dumps(result))
        return

    # sft first, always: every ratio is against it. The rules of RULE_GROUPS are timed in their own groups.
    given = [m for m in args.modes.split(",") if m != "sft"]
    rules = [RULE_GROUPS[m] for m in given if m in RULE_GROUPS]
    modes = ["sft"] + [m for m in given if m not in RULE_GROUPS]
    if len(modes) == 1 and not rules:
        p.error("--modes: name at least one mode besides sft")
    kinds = [k == "lora" for k in args.kinds.split(",")]
    common = [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--loss_implementation",
        args.loss_implementation,
    ]
    memory, timing = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        make_data(data)
        cache = os.path.join(tmp, "cache")
        if "cached" in modes or any(r.endswith("+cache") for r in rules):
            start = time.perf_counter()
            build_cache(data, cache, args.top_k)
            print(
                f"  reference cache (top-{args.top_k}, float16) built in {time.perf_counter() - start:.1f} s "
                "(once, before timing; not part of any step)",
                flush=True,
            )
        for lora in kinds:
            kind = "lora" if lora else "full"
            worker = ["--data", data, "--cache", cache] + common
            for mode in modes + rules:
                memory[mode, lora] = subprocess_result(
                    ["--worker", "memory", mode, str(int(lora))] + worker, f"memory {mode} {kind}"
                )
                print(f"  {mode:7s} {kind}: peak {memory[mode, lora]['peak_gb']:.2f} GB", flush=True)
                if mode == "sft":
                    continue
                r = timing[mode, lora] = subprocess_result(
                    ["--worker", "time", mode, str(int(lora))] + worker, f"timing {mode} {kind}"
                )
                print(
                    f"  {mode:7s} {kind}: steps {', '.join(f'{t:.2f}' for t in r['mode_s'])} s; "
                    + (f"dft steps {', '.join(f'{t:.2f}' for t in r['dft_s'])} s; " if "dft_s" in r else "")
                    + f"sft steps {', '.join(f'{t:.2f}' for t in r['sft_s'])} s",
                    flush=True,
                )

    import torch

    tokens = memory["sft", kinds[0]]["tokens"]
    print(
        f"\nSmolLM2-135M-Instruct, float32, batch 4 x ~{tokens // 4} tokens, {torch.get_num_threads()} threads, "
        f"loss {args.loss_implementation}; step time: median of {args.steps} steps, each mode timed with sft"
    )
    last = []
    if len(modes) > 1:
        last += legacy_table(modes, kinds, timing, memory)
    if rules:
        last += rule_table(rules, kinds, timing, memory)
    if last:
        print(" ".join(last))


def legacy_table(modes, kinds, timing, memory) -> list[str]:
    print("| mode | " + " | ".join(f"{k}: step s | x sft | peak GB | x sft" for k in _names(kinds)) + " |")
    print("|---|" + "---|---|---|---|" * len(kinds))
    ratio = {}
    for mode in modes:
        row = [mode]
        for lora in kinds:
            if mode == "sft":
                step = statistics.median(t for m in modes[1:] for t in timing[m, lora]["sft_s"])
                ratio[mode, lora] = 1.0
            else:
                step = statistics.median(timing[mode, lora]["mode_s"])
                ratio[mode, lora] = statistics.median(timing[mode, lora]["ratios"])
            peak, base = memory[mode, lora]["peak_gb"], memory["sft", lora]["peak_gb"]
            row += [f"{step:.2f}", f"{ratio[mode, lora]:.2f}", f"{peak:.2f}", f"{peak / base:.2f}"]
        print("| " + " | ".join(row) + " |")
    spread = {lora: sorted(timing["asft", lora]["ratios"]) for lora in kinds if ("asft", lora) in timing}
    for lora, r in spread.items():
        print(f"asft/sft pair ratios, {'LoRA' if lora else 'full'}: {', '.join(f'{x:.2f}' for x in r)}")
    last = []
    if "asft" in modes and len(kinds) == 2:
        last.append(f"full_ratio={ratio['asft', False]:.2f} lora_ratio={ratio['asft', True]:.2f}")
    if "cached" in modes and len(kinds) == 2:
        peaks = [memory["cached", lora]["peak_gb"] / memory["sft", lora]["peak_gb"] for lora in (False, True)]
        print(f"cached reference peak memory x sft: full {peaks[0]:.3f}, LoRA {peaks[1]:.3f}")
        last.append(f"cached_full_ratio={ratio['cached', False]:.2f} cached_lora_ratio={ratio['cached', True]:.2f}")
    return last


def rule_table(rules, kinds, timing, memory) -> list[str]:
    """Each rule's step time against dft's and sft's from the same rounds (median of the per-round ratios)."""
    print("\n| rule | kind | step s | dft step s | sft step s | x dft | x sft | peak GB x sft |")
    print("|---|---|---|---|---|---|---|---|")
    last = []
    for rule in rules:
        for lora in kinds:
            r, kind = timing[rule, lora], "lora" if lora else "full"
            x_dft = statistics.median(b / a for a, b in zip(r["dft_s"], r["mode_s"]))
            x_sft = statistics.median(b / a for a, b in zip(r["sft_s"], r["mode_s"]))
            peak = memory[rule, lora]["peak_gb"] / memory["sft", lora]["peak_gb"]
            steps = [statistics.median(r[k]) for k in ("mode_s", "dft_s", "sft_s")]
            print(
                f"| {rule} | {kind} | " + " | ".join(f"{t:.2f}" for t in steps) + f" | {x_dft:.3f} | {x_sft:.3f} | "
                f"{peak:.3f} |"
            )
            name = rule.replace("+cache", "_cached")
            last.append(f"{name}_{kind}_x_dft={x_dft:.3f} {name}_{kind}_x_sft={x_sft:.3f}")
    return last


def _names(kinds) -> list[str]:
    return ["LoRA" if lora else "full" for lora in kinds]


if __name__ == "__main__":
    main()
