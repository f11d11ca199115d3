"""Every GPU figure of asft in one call: tests, loss memory, trainer overhead, host syncs, a 7B-shaped model.

    python benchmarks/gpu_suite.py --out DIR [--budget_s 480]     # on a CUDA machine (benchmarks/GPU.md)
    python benchmarks/gpu_suite.py --dry_run [--size tiny]        # every step on the CPU at toy sizes

Steps, in this order, each in its own process (a step that crashes, hangs or fails is recorded and the suite goes
on), each writing DIR/<n>_<step>.json (status ok | failed | timeout | skipped, with a reason; rewritten as results
come in) and DIR/<n>_<step>.log:

  1 tests        pytest -m cuda_too --device cuda: objectives, fused, cache kernels, trainer steps (float32, bf16)
  2 loss_memory  naive vs fused loss, every objective and the cached KL, bf16 mixed precision: extra peak memory
                 and time (CUDA events, warm-up, median of repeats); Liger's fused losses beside sft and sft_kl
  3 overhead     trainer step time, tokens/s and peak memory of every mode vs sft, Llama-3.2-1B-shaped (random
                 weights), bf16 mixed precision, full fine-tuning and LoRA, online and cached reference
  4 syncs        host-device syncs in three trainer steps (torch.cuda.set_sync_debug_mode), and torch.compile
                 graphs / graph breaks / recompilations of the fused loss across lengths
  5 large        Llama-2-7B-shaped, one 2,048-token sequence, gradient checkpointing: peak memory and step time of
                 sft, asft online / cached (bf16 weights), LoRA asft, sft with float32 master weights

A step starts only when its estimated time fits in what is left of --budget_s, and a running one stops at the
budget's end; the summary (the issue's bars beside the figures) is printed last and written to DIR/summary.md and
DIR/summary.json. Printed, never asserted. Models are built from configs (no download); data is generated.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import loss_memory
import overhead
from asft import io

# Each step's record, rewritten atomically (a kill never leaves half a file).
write_json = functools.partial(io.write_json, indent=1)

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("tests", "loss_memory", "overhead", "syncs", "large")
MODES = ("sft", "dft", "sft_kl", "asft", "iw_sft")
TEST_FILES = [
    "tests/test_objectives.py",
    "tests/test_fused.py",
    "tests/test_cache.py",
    "tests/test_trainer.py",
    "tests/test_devices.py",
]
GB = 1e9
BARS = {
    "peak_x_less": 10.0,
    "time_vs_naive": 0.8,
    "time_vs_liger": 1.0,
    "asft_full": 1.33,
    "asft_lora": 1.50,
    "cached": 1.05,
    "syncs_per_micro_step": 0,
}


# Model shapes (transformers LlamaConfig fields); random weights.
def llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra) -> dict:
    sizes = (vocab, hidden, intermediate, layers, heads, kv_heads)
    names = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads"
    return dict(zip(names.split(), sizes), max_position_embeddings=4096, **extra)


LLAMA_3_2_1B = llama(128256, 2048, 8192, 16, 32, 8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0)
LLAMA_2_7B = llama(32000, 4096, 11008, 32, 32, 32, tie_word_embeddings=False)


def shape_name(shape: dict) -> str:
    if shape is LLAMA_3_2_1B:
        return "Llama-3.2-1B-shaped"
    if shape is LLAMA_2_7B:
        return "Llama-2-7B-shaped"
    layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    return f"toy Llama: hidden {shape['hidden_size']}, {layers} layers, vocabulary {vocab}"


def toy(vocab, hidden, layers):
    return llama(vocab, hidden, 2 * hidden, layers, 4, 2, tie_word_embeddings=False)


def shape(batch: int, prompt_words: int, response_words: int, max_length: int, **rest) -> dict:
    """A run's data shape (examples per step, words per prompt and response, token cap) and its other settings."""
    return dict(batch=batch, prompt_words=prompt_words, response_words=response_words, max_length=max_length, **rest)


ALL_MODES = MODES + ("cached",)
GPU_LENGTHS = [500, 1024, 1500, 2048, 3000, 4100]  # response tokens the compile sweep varies over

# est: seconds a step is expected to take (it starts only if that much is left); per: seconds per configuration
# inside a step (the next one starts only if that much is left).
SIZES = {
    "gpu": dict(
        est=dict(tests=90, loss_memory=150, overhead=120, syncs=60, large=60),
        per=20,
        tests_k=None,
        loss_memory=dict(
            tokens=8192, hidden=4096, vocabs=[128256, 151936], rows=4, chunk=1024, repeats=5, modes=ALL_MODES
        ),
        overhead=shape(8, 100, 400, 1024, model=LLAMA_3_2_1B, warmup=3, steps=10, modes=ALL_MODES, lora=(False, True)),
        syncs=shape(
            4, 50, 200, 512, model=toy(128256, 512, 4), accum=2, hidden=2048, vocab=128256, lengths=GPU_LENGTHS
        ),
        large=shape(1, 400, 1700, 2048, model=LLAMA_2_7B, warmup=1, steps=3),
    ),
    "dry": dict(
        est=dict(tests=60, loss_memory=60, overhead=60, syncs=60, large=30),
        per=1,
        tests_k=None,
        loss_memory=dict(tokens=512, hidden=64, vocabs=[8192, 12000], rows=4, chunk=512, repeats=2, modes=ALL_MODES),
        overhead=shape(4, 20, 40, 128, model=toy(1000, 64, 2), warmup=1, steps=2, modes=ALL_MODES, lora=(False, True)),
        syncs=shape(
            2, 20, 40, 128, model=toy(1000, 64, 2), accum=2, hidden=64, vocab=8192, lengths=[600, 1024, 1100, 1600]
        ),
        large=shape(1, 100, 300, 256, model=toy(2000, 128, 2), warmup=1, steps=1),
    ),
    "tiny": dict(
        est=dict(tests=5, loss_memory=5, overhead=5, syncs=5, large=5),
        per=0,
        tests_k="test_kl_is_zero_when_policy_equals_reference",
        loss_memory=dict(tokens=64, hidden=32, vocabs=[500], rows=2, chunk=32, repeats=1, modes=("sft", "cached")),
        overhead=shape(
            2, 5, 10, 64, model=toy(500, 32, 1), warmup=1, steps=1, modes=("sft", "cached"), lora=(False, True)
        ),
        syncs=shape(2, 5, 10, 64, model=toy(500, 32, 1), accum=2, hidden=32, vocab=500, lengths=[40, 70]),
        large=shape(1, 5, 40, 48, model=toy(500, 32, 1), warmup=1, steps=1),
    ),
}


# ---------------------------------------------------------------------------------------------------- helpers


class Step:
    """One step's record: DIR/<n>_<name>.json, rewritten after every result so a killed step keeps what it had."""

    def __init__(self, out: Path, name: str, deadline: float, per: float):
        self.path = out / f"{STEPS.index(name) + 1}_{name}.json"
        self.deadline, self.per = deadline, per
        self.record = {"step": name, "status": "running", "results": {}}
        self.save()

    def save(self, **fields):
        self.record.update(fields)
        write_json(self.path, self.record)

    def run(self, key: str, fn, *args, **kwargs):
        """fn's result (a dict) under results[key]; an error is recorded there and the step goes on."""
        left = self.deadline - time.time()
        if left < self.per:
            result = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
        else:
            print(f"--- {key}", flush=True)
            try:
                result = {"status": "ok", **fn(*args, **kwargs)}
            except Exception as e:  # noqa: BLE001 - recorded; the other configurations still run
                traceback.print_exc()
                oom = "out of memory" in str(e).lower()
                result = {"status": "oom" if oom else "failed", "error": f"{type(e).__name__}: {str(e)[:500]}"}
            free_memory()
        print(f"    {key}: {json.dumps(result, default=str)[:400]}", flush=True)
        self.record["results"][key] = result
        self.save()
        return result


def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_tokenizer():
    """A word-level tokenizer over the generated data's words (offline): one token per word, the rest <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *sorted(set(overhead.WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def build_model(shape: dict, tokenizer, device, dtype=None, seed: int = 0):
    """A LlamaForCausalLM of `shape` with random weights, built on `device` (no host copy of a large model)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def build_reference_cache(model, tokenizer, data: str, out: str, max_length: int, bf16: bool, top_k: int = 64):
    """`asft cache-reference` on a model in memory (asft.cache's API): the cache the cached mode trains against."""
    import torch

    from asft.cache import HFScorer, build_cache, build_plan, finish_cache, model_fingerprint, prepare_output
    from asft.data import build_dataset

    dataset = build_dataset(data, tokenizer, template="alpaca", max_length=max_length, log=lambda *_: None, origin=True)
    reference = {"path": "random init (gpu_suite)", "fingerprint": model_fingerprint(model), "dtype": None}
    plan = build_plan(
        dataset,
        tokenizer=tokenizer,
        reference=reference,
        template="alpaca",
        max_length=max_length,
        data=[data],
        top_k=top_k,
        dtype="float16",
        vocab_size=model.config.vocab_size,
        shard_size=1024,
        backend="hf",
    )
    prepare_output(out, plan)
    start = time.perf_counter()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        build_cache(HFScorer(model.eval(), tokenizer.pad_token_id), dataset, plan, out, progress=False)
    finish_cache(out, plan)
    return time.perf_counter() - start


def train_measured(
    model,
    tokenizer,
    mode: str,
    lora: bool,
    data: str,
    c: dict,
    out: str,
    cache: str | None,
    device,
    callbacks=(),
    sync_steps: bool = True,
    **config,
) -> dict:
    """c["warmup"] + c["steps"] optimizer steps of one trainer (overhead.make_trainer) on batches of c["batch"]
    examples cut to c["max_length"] tokens: median step time of the timed
    steps (synchronised at each step's ends unless not `sync_steps`), tokens/s, and the peak memory since the model
    was built (CUDA)."""
    import torch
    from transformers import TrainerCallback

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda and sync_steps else (lambda: None)
    steps, warmup, batch, max_length = c["steps"], c["warmup"], c["batch"], c["max_length"]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    trainer, tokens = overhead.make_trainer(
        mode,
        lora,
        data,
        warmup + steps,
        "fused",
        out,
        cache,
        model=model,
        tokenizer=tokenizer,
        batch=batch,
        max_length=max_length,
        use_cpu=not cuda,
        bf16=True,
        **config,
    )
    for cb in (timer, *callbacks):
        trainer.add_callback(cb)
    trainer.train()
    step_s = statistics.median(timer.times[warmup:])
    tokens *= config.get("gradient_accumulation_steps", 1)
    result = {
        "step_s": step_s,
        "times": timer.times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "peak_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
        "reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else None,
        "loss": trainer.state.log_history[-1].get("train_loss"),
        "reference": type(trainer.reference).__name__ if trainer.reference is not None else None,
        "gradient_checkpointing": getattr(trainer.model, "is_gradient_checkpointing", None),
    }
    del trainer
    return result


def fresh_peak(device):
    import torch

    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------------ steps


def step_tests(S, device, out: Path, step: Step) -> dict:
    xml = out / "1_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda_too",
        "--device",
        device.type,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        *TEST_FILES,
    ] + (["-k", S["tests_k"]] if S["tests_k"] else [])
    print(" ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, timeout=max(1, step.deadline - time.time())).returncode
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [
        f"{c.get('classname')}::{c.get('name')}: {(c[0].get('message') or '')[:300]}"
        for c in suite.iter("testcase")
        if len(c) and c[0].tag in ("failure", "error")
    ]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"status": "ok" if rc == 0 else "failed", "returncode": rc, **counts, "failed": failed}


def step_loss_memory(S, device, out: Path, step: Step) -> dict:
    import importlib.util

    c = S["loss_memory"]
    liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    step.save(
        liger=liger or ("no CUDA" if device.type != "cuda" else "liger-kernel not importable"),
        precision="bf16",
        **{k: v for k, v in c.items() if k != "modes"},
    )
    for vocab in c["vocabs"]:
        for mode in c["modes"]:
            step.run(
                f"{vocab} {mode}",
                loss_memory.worker,
                mode,
                vocab,
                c["hidden"],
                c["tokens"],
                c["rows"],
                c["chunk"],
                c["repeats"],
                device.type,
                "bf16",
                liger,
            )
    return {"status": "ok"}


def step_overhead(S, device, out: Path, step: Step) -> dict:
    c = S["overhead"]
    step.save(model=shape_name(c["model"]), **{k: v for k, v in c.items() if k != "model"})
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = f"{tmp}/data.jsonl", f"{tmp}/cache"
        overhead.make_data(data, c["batch"] * (c["warmup"] + c["steps"] + 1), 0, c["prompt_words"], c["response_words"])
        if "cached" in c["modes"]:  # built from the same random start every trainer below begins at
            step.run(
                "cache build",
                lambda: {
                    "seconds": build_reference_cache(
                        build_model(c["model"], tokenizer, device), tokenizer, data, cache, c["max_length"], True
                    )
                },
            )
        for lora in c["lora"]:
            for mode in c["modes"]:

                def run(mode=mode, lora=lora):
                    fresh_peak(device)
                    model = build_model(c["model"], tokenizer, device)
                    return train_measured(model, tokenizer, mode, lora, data, c, f"{tmp}/run", cache, device)

                step.run(f"{'lora' if lora else 'full'} {mode}", run)
    return {"status": "ok"}


def step_syncs(S, device, out: Path, step: Step) -> dict:
    import warnings

    import torch
    from transformers import TrainerCallback

    c = S["syncs"]
    cuda = device.type == "cuda"
    tokenizer = make_tokenizer()

    class Marks(TrainerCallback):  # where each optimizer step starts and ends in the list of sync warnings
        def __init__(self, record):
            self.record, self.marks = record, []

        def on_step_begin(self, *a, **k):
            self.marks.append(len(self.record))

        def on_step_end(self, *a, **k):
            self.marks.append(len(self.record))

    def count(mode, lora, data, cache):
        fresh_peak(device)
        model = build_model(c["model"], tokenizer, device)
        with warnings.catch_warnings(record=True) as record, tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("always")
            marks = Marks(record)
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                train_measured(
                    model,
                    tokenizer,
                    mode,
                    lora,
                    data,
                    dict(c, steps=3, warmup=0),
                    tmp,
                    cache,
                    device,
                    callbacks=[marks],
                    sync_steps=False,
                    gradient_accumulation_steps=c["accum"],
                )
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        if not cuda:
            return {"syncs": None, "reason": "CUDA only (torch.cuda.set_sync_debug_mode)"}
        syncs = [isinstance(w.message, Warning) and "synchroniz" in str(w.message) for w in record]
        per_step = [sum(syncs[a:b]) for a, b in zip(marks.marks[::2], marks.marks[1::2])]
        where: dict[str, int] = {}
        for i in range(marks.marks[-2], marks.marks[-1]):  # the last step: where its syncs come from
            if syncs[i]:
                key = f"{record[i].filename}:{record[i].lineno}"
                where[key] = where.get(key, 0) + 1
        return {
            "per_step": per_step,
            "per_micro_step_last": per_step[-1] / c["accum"],
            "total": sum(syncs),
            "last_step_where": dict(sorted(where.items(), key=lambda kv: -kv[1])),
        }

    step.run("compile", compile_sweep, c, device)  # first, in a process that has compiled nothing yet
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = f"{tmp}/data.jsonl", f"{tmp}/cache"
        overhead.make_data(data, c["batch"] * c["accum"] * 4, 0, c["prompt_words"], c["response_words"])
        build_reference_cache(build_model(c["model"], tokenizer, device), tokenizer, data, cache, c["max_length"], True)
        for mode, lora in (("sft", False), ("asft", False), ("cached", False), ("asft", True)):
            step.run(f"syncs {'lora' if lora else 'full'} {mode}", count, mode, lora, data, cache)
    return {"status": "ok"}


def compile_sweep(c: dict, device) -> dict:
    """The fused loss (asft, bf16 autocast) at each length: dynamo graphs compiled and graph breaks per length."""
    import torch
    from torch._dynamo.utils import counters

    from asft.fused import LMHead, fused_token_loss

    torch.manual_seed(0)
    weight = torch.empty(c["vocab"], c["hidden"], device=device).normal_(0, 0.02).requires_grad_()
    counters.clear()
    rows = []
    for n in c["lengths"]:
        h = torch.randn(1, n + 1, c["hidden"], device=device, dtype=torch.bfloat16)
        ref = (h + 0.3 * torch.randn_like(h)).detach()
        labels = torch.randint(0, c["vocab"], (1, n + 1), device=device)
        before = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = fused_token_loss("asft", h.requires_grad_(), labels, LMHead(weight), ref, LMHead(weight.detach()))
        loss.backward()
        rows.append(
            {
                "length": n,
                "new_graphs": counters["stats"]["unique_graphs"] - before[0],
                "new_graph_breaks": sum(counters["graph_break"].values()) - before[1],
                "seconds": time.perf_counter() - start,
            }
        )
    graphs = counters["stats"]["unique_graphs"]
    return {
        "lengths": rows,
        "graphs": graphs,
        "frames": dict(counters["frames"]),
        "graph_breaks": dict(counters["graph_break"]),
        "recompiles_after_first_length": graphs - rows[0]["new_graphs"],
        "compile": os.environ.get("ASFT_COMPILE", "1") != "0",
    }


def step_large(S, device, out: Path, step: Step) -> dict:
    """Which 7B-shaped full fine-tuning / LoRA setups fit one 80 GB GPU (the paper's Table 4: SFT 39 GB, ASFT 88 GB
    on an A100 with pure bf16 weights). asft's --bf16 keeps float32 master weights (16 bytes a parameter with AdamW)."""
    import torch

    c = S["large"]
    step.save(model=shape_name(c["model"]), **{k: v for k, v in c.items() if k != "model"})
    tokenizer = make_tokenizer()
    bf16w = torch.bfloat16
    configs = [  # name, mode, lora, weight dtype, extra AnchoredSFTConfig fields
        ("full sft, bf16 weights", "sft", False, bf16w),
        ("full asft online, bf16 weights", "asft", False, bf16w),
        ("full asft cached, bf16 weights", "cached", False, bf16w),
        ("LoRA asft, bf16 base", "asft", True, bf16w),
        ("full sft, float32 master weights", "sft", False, torch.float32),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = f"{tmp}/data.jsonl", f"{tmp}/cache"
        overhead.make_data(data, c["warmup"] + c["steps"] + 1, 0, c["prompt_words"], c["response_words"])
        step.run(
            "cache build",
            lambda: {
                "seconds": build_reference_cache(
                    build_model(c["model"], tokenizer, device, bf16w), tokenizer, data, cache, c["max_length"], True
                )
            },
        )
        for name, mode, lora, dtype in configs:

            def run(mode=mode, lora=lora, dtype=dtype):
                fresh_peak(device)
                model = build_model(c["model"], tokenizer, device, dtype)
                r = train_measured(
                    model,
                    tokenizer,
                    mode,
                    lora,
                    data,
                    dict(c, batch=1),
                    f"{tmp}/run",
                    cache,
                    device,
                    gradient_checkpointing=True,
                )
                r["fits_80gb"] = None if r["reserved_gb"] is None else r["reserved_gb"] <= 80
                return r

            step.run(name, run)
    return {"status": "ok"}


# ---------------------------------------------------------------------------------------------------- summary


def fmt(x, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def mark(ok) -> str:
    return "" if ok is None else (" ok" if ok else " MISSED")


def table_head(title: str, columns: str) -> list[str]:
    """A summary section's heading and its markdown table's header ("a | b | c" columns)."""
    n = columns.count("|") + 1
    return ["", f"## {title}", "", f"| {columns} |", "|" + "---|" * n]


def summarize(records: dict, env: dict) -> str:
    lines = [
        f"# gpu_suite: {env.get('device')}, torch {env.get('torch')}, transformers {env.get('transformers')}",
        "",
        "| step | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, r in records.items():
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', 0):.0f} | {r.get('reason', '')} |")
    t = records.get("tests", {})
    if "tests" in t:
        lines += [
            "",
            f"## tests (cuda_too, float32 and bf16): {t['tests']} run, {t['failures']} failed, "
            f"{t['errors']} errors, {t['skipped']} skipped",
        ] + [f"- {f}" for f in t.get("failed", [])]
    res = records.get("loss_memory", {}).get("results", {})
    if res:
        lines += [
            "",
            f"## loss_memory: bf16 mixed precision, {records['loss_memory'].get('tokens')} tokens, hidden "
            f"{records['loss_memory'].get('hidden')}; time = median (bars: >= {BARS['peak_x_less']}x less "
            f"memory, <= {BARS['time_vs_naive']}x naive's time, <= {BARS['time_vs_liger']}x Liger's)",
            "",
            "| vocab mode | naive GB | fused GB | x less | naive ms | fused ms | fused/naive | Liger ms | "
            "Liger GB | fused/Liger |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in res.items():
            if r.get("status") != "ok":
                lines.append(f"| {key} | {r.get('status')}: {r.get('error') or r.get('reason')} |")
                continue
            n, f, lg = r["naive"], r["fused"], r.get("liger")
            if lg and "error" in lg:
                lines.append(f"| {key} | Liger failed: {lg['error']} |")
                lg = None
            less, tr = n["peak"] / max(f["peak"], 1 << 20), f["median"] / n["median"]
            row = [
                key,
                f"{n['peak'] / GB:.2f}",
                f"{f['peak'] / GB:.2f}",
                f"{less:.1f}{mark(less >= BARS['peak_x_less'])}",
                f"{n['median'] * 1e3:.1f}",
                f"{f['median'] * 1e3:.1f}",
                f"{tr:.2f}{mark(tr <= BARS['time_vs_naive'])}",
            ]
            if lg:
                lr = f["median"] / lg["median"]
                row += [
                    f"{lg['median'] * 1e3:.1f}",
                    f"{lg['peak'] / GB:.2f}",
                    f"{lr:.2f}{mark(lr <= BARS['time_vs_liger'])}",
                ]
            else:
                row += ["", "", ""]
            lines.append("| " + " | ".join(row) + " |")
    res = records.get("overhead", {}).get("results", {})
    if res:
        title = (
            f"overhead: {records['overhead'].get('model')}, bf16 mixed precision, fused loss (bars: asft "
            f"<= {BARS['asft_full']}x sft full, <= {BARS['asft_lora']}x LoRA; cached <= {BARS['cached']}x)"
        )
        lines += table_head(title, "run | step ms | x sft | tokens/s | peak GB | x sft")
        for key, r in res.items():
            if key == "cache build":
                continue
            if r.get("status") != "ok":
                lines.append(f"| {key} | {r.get('status')}: {r.get('error') or r.get('reason') or r} |")
                continue
            base = res.get(key.split()[0] + " sft", {})
            x = r["step_s"] / base["step_s"] if "step_s" in base else None
            bar = {"asft": BARS["asft_lora" if key.startswith("lora") else "asft_full"], "cached": BARS["cached"]}.get(
                key.split()[1]
            )
            xm = r["peak_gb"] / base["peak_gb"] if r["peak_gb"] and base.get("peak_gb") else None
            lines.append(
                f"| {key} | {r['step_s'] * 1e3:.1f} | {fmt(x)}{mark(None if None in (bar, x) else x <= bar)} | "
                f"{r['tokens_per_s']:.0f} | {fmt(r['peak_gb'])} | {fmt(xm)} |"
            )
    res = records.get("syncs", {}).get("results", {})
    if res:
        lines += [
            "",
            f"## syncs: host-device synchronisations per optimizer step (3 steps, bar: "
            f"{BARS['syncs_per_micro_step']} per micro-step)",
            "",
        ]
        for key, r in res.items():
            if key == "compile" or r.get("status") != "ok":
                continue
            if r.get("syncs", 0) is None:
                lines.append(f"- {key}: {r['reason']}")
                continue
            top = ", ".join(f"{k.split('site-packages/')[-1]} x{v}" for k, v in list(r["last_step_where"].items())[:6])
            ok = r["per_micro_step_last"] <= BARS["syncs_per_micro_step"]
            lines.append(
                f"- {key}: per step {r['per_step']}, last step {r['per_micro_step_last']:.1f} per "
                f"micro-step{mark(ok)}; where: {top}"
            )
        r = res.get("compile", {})
        if r.get("status") == "ok":
            lines.append(
                f"- torch.compile of the fused loss: new graphs per length "
                f"{[(x['length'], x['new_graphs']) for x in r['lengths']]}, graph breaks "
                f"{sum(r['graph_breaks'].values())}, graphs after the first length "
                f"{r['recompiles_after_first_length']}"
            )
        elif r:
            lines.append(f"- compile: {r.get('status')}: {r.get('error') or r.get('reason')}")
    res = records.get("large", {}).get("results", {})
    if res:
        title = (
            f"large: {records['large'].get('model')}, one sequence, gradient checkpointing, bf16 autocast "
            "(paper, Table 4, A100: SFT 39 GB, ASFT 88 GB, ASFT-LoRA 41 GB)"
        )
        lines += table_head(title, "run | status | peak GB | reserved GB | step s | fits 80 GB")
        for key, r in res.items():
            if key == "cache build":
                continue
            if "step_s" in r:
                lines.append(
                    f"| {key} | {r['status']} | {fmt(r['peak_gb'], '.1f')} | {fmt(r['reserved_gb'], '.1f')} | "
                    f"{r['step_s']:.2f} | {fmt(r['fits_80gb'], '')} |"
                )
            else:
                lines.append(
                    f"| {key} | {r.get('status')} | | | | {'no' if r.get('status') == 'oom' else ''} "
                    f"{r.get('error', r.get('reason', ''))[:120]} |"
                )
        fit = [k for k, r in res.items() if r.get("fits_80gb") and "asft" in k]
        if fit:
            lines.append(
                f"\nasft setups that fit 80 GB: {', '.join(fit)}. With float32 master weights (asft's "
                "--bf16) a 7B full fine-tuning needs ~16 bytes a parameter before any reference: pass "
                "--use_lora, or --model_dtype bfloat16 (the paper's pure bf16, warned: barely trains) with "
                "--reference_cache (no reference copy) or --reference_dtype bfloat16."
            )
    return "\n".join(lines)


def environment(device) -> dict:
    import importlib.metadata as md

    import torch

    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "triton", "pyarrow"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


# ------------------------------------------------------------------------------------------------------- main


def run_step(name: str, size: str, device: str, out: Path, deadline: float) -> None:
    """The child process of one step."""
    import torch

    S = SIZES[size]
    step = Step(out, name, deadline, S["per"])
    start = time.time()
    fields = globals()[f"step_{name}"](S, torch.device(device), out, step)
    step.save(**fields, seconds=time.time() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/gpu_suite", help="folder of the JSON and log files")
    p.add_argument("--budget_s", type=float, default=480, help="no step starts after this many seconds")
    p.add_argument("--dry_run", action="store_true", help="on the CPU, at toy sizes (--size dry)")
    p.add_argument("--size", choices=list(SIZES), help="gpu (default), dry (default with --dry_run), tiny (tests)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.out)
    size = a.size or ("dry" if a.dry_run else "gpu")
    if a.step:
        run_step(a.step, size, a.device, out, a.deadline)
        return 0

    import torch

    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: use --dry_run (the CPU, toy sizes)")
    device = torch.device("cpu" if a.dry_run else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print(json.dumps(env), flush=True)
    start = time.time()
    deadline = start + a.budget_s
    records = {}
    for name in STEPS:
        path = out / f"{STEPS.index(name) + 1}_{name}.json"
        left, est = deadline - time.time(), SIZES[size]["est"][name]
        if name not in a.steps.split(","):
            records[name] = {"step": name, "status": "skipped", "reason": "not in --steps"}
        elif left < est:
            records[name] = {"step": name, "status": "skipped", "reason": f"budget: ~{est} s needed, {left:.0f} s left"}
        else:
            print(f"=== {name} ({left:.0f} s left)", flush=True)
            t = time.time()
            env_vars = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if name == "loss_memory" and device.type == "cpu":  # RSS tracks live tensors (loss_memory's docstring)
                env_vars["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
            cmd = [
                sys.executable,
                __file__,
                "--step",
                name,
                "--size",
                size,
                "--device",
                device.type,
                "--out",
                str(out),
                "--deadline",
                str(deadline),
            ]
            with open(out / f"{STEPS.index(name) + 1}_{name}.log", "w") as log:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env_vars, cwd=ROOT, start_new_session=True
                )
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.time()) + 5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    rc = proc.wait()
            rec = json.loads(path.read_text()) if path.exists() else {"step": name}
            if rc != 0 or rec.get("status") == "running":
                tail = (out / f"{STEPS.index(name) + 1}_{name}.log").read_text()[-1500:]
                last = (tail.strip().splitlines() or [""])[-1]
                rec.update(
                    status="timeout" if rc in (-9, 137) else "failed",
                    returncode=rc,
                    reason=rec.get("reason") or last[:300],
                )
            rec["seconds"] = time.time() - t
            records[name] = rec
        write_json(path, records[name])
        print(f"=== {name}: {records[name].get('status')} {records[name].get('reason', '')}", flush=True)
    summary = summarize(records, env)
    (out / "summary.md").write_text(summary + "\n")
    write_json(
        out / "summary.json",
        {"env": env, "budget_s": a.budget_s, "seconds": time.time() - start, "bars": BARS, "steps": records},
    )
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
