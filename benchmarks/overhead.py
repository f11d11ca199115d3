"""Step time and peak memory of every mode relative to `sft`, full fine-tuning and LoRA, measured in one run.

Model: SmolLM2-135M-Instruct (embedded, float32); batch: 4 sequences of ~230 tokens (as DESIGN.md's reference
figures). Each (mode, full|LoRA) runs in its own subprocess so that its peak resident memory (ru_maxrss) is its
own; step time is the median of the timed optimizer steps after warm-up steps. Printed, never asserted.

    python benchmarks/overhead.py [--steps 6] [--warmup 2] [--modes sft,dft,sft_kl,asft,iw_sft]
           [--loss_implementation fused|naive]

Last line: `full_ratio=<asft/sft step time, full> lora_ratio=<asft/sft step time, LoRA>`.
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
import time

WORDS = ("the patient presented with fever and cough after travel so the doctor ordered a chest x ray which "
         "showed a small infiltrate in the lower lobe and treatment with antibiotics was started").split()


def make_data(path: str, n: int = 64, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(55))
            response = " ".join(rng.choice(WORDS) for _ in range(150))
            f.write(json.dumps({"instruction": prompt, "response": response}) + "\n")


def worker(mode: str, lora: bool, data: str, steps: int, warmup: int, impl: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from asft import AnchoredSFTConfig, AnchoredSFTTrainer
    from asft.data import build_dataset
    from asft.models import load_model, load_tokenizer, lora_config, resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path("embedded:smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    dataset = build_dataset(data, tokenizer, template="alpaca", max_length=256, log=lambda *_: None)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = AnchoredSFTConfig(
            output_dir=out, mode=mode, per_device_train_batch_size=4, max_steps=steps + warmup,
            learning_rate=1e-5, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1000,
            use_cpu=True, loss_implementation=impl, seed=0)
        trainer = AnchoredSFTTrainer(load_model(path).train(), args=args, train_dataset=dataset,
                                     processing_class=tokenizer,
                                     peft_config=lora_config(8, 16, 0.0) if lora else None)
        trainer.add_callback(Timer())
        tokens = sum(len(x) for x in dataset[:4]["input_ids"])
        trainer.train()
    return {"step_s": statistics.median(times[warmup:]), "peak_gb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="sft,dft,sft_kl,asft,iw_sft")
    p.add_argument("--loss_implementation", default="fused", choices=["fused", "naive"])
    p.add_argument("--worker", nargs=2, metavar=("MODE", "LORA"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker(args.worker[0], args.worker[1] == "1", args.data, args.steps, args.warmup,
                        args.loss_implementation)
        print("RESULT " + json.dumps(result))
        return

    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        make_data(data)
        results = {}
        for lora in (False, True):
            for mode in modes:
                cmd = [sys.executable, __file__, "--worker", mode, str(int(lora)), "--data", data, "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--loss_implementation",
                       args.loss_implementation]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{mode} lora={lora} failed:\n{out.stderr[-3000:]}")
                results[(mode, lora)] = json.loads(line[0][7:])
                print(f"  measured {mode:7s} {'lora' if lora else 'full'}: {results[(mode, lora)]}", flush=True)

    import torch

    print(f"\nSmolLM2-135M-Instruct, float32, batch 4 x ~{results[(modes[0], False)]['tokens'] // 4} tokens, "
          f"{torch.get_num_threads()} threads, loss {args.loss_implementation}, median of {args.steps} steps")
    print("| mode | full: step s | x sft | peak GB | x sft | LoRA: step s | x sft | peak GB | x sft |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        row = [mode]
        for lora in (False, True):
            r, base = results[(mode, lora)], results[("sft", lora)]
            row += [f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}", f"{r['peak_gb']:.2f}",
                    f"{r['peak_gb'] / base['peak_gb']:.2f}"]
        print("| " + " | ".join(row) + " |")
    full = results[("asft", False)]["step_s"] / results[("sft", False)]["step_s"]
    lora = results[("asft", True)]["step_s"] / results[("sft", True)]["step_s"]
    print(f"full_ratio={full:.2f} lora_ratio={lora:.2f}")


if __name__ == "__main__":
    main()
