"""Extra peak memory and wall time of the loss, naive (`asft.objectives` on full logits) vs fused (`asft.fused`).

    python benchmarks/loss_memory.py            # the issue's sizes: 2,048 tokens, hidden 2,048, vocabularies of
                                                # Llama-3 and Qwen2.5, float32, 3 repeats (~45 min on 2 idle cores)
    python benchmarks/loss_memory.py --tokens 256 --vocabs 32000 --modes sft,asft --repeats 1   # a quick look

Setup: policy hidden states [rows, tokens/rows + 1, H] with every shifted position a response token (`rows`
sequences of tokens/rows), the reference's hidden states, and an lm_head weight [V, H] that requires grad (the
reference uses the same weight detached, as under LoRA); one forward + backward of the loss. The layout matters to
iw_sft alone: a sequence longer than --chunk-size costs the fused path one more policy matmul (its sequence weight
must be known before any of its gradients); --rows 2 shows that case.

Each (vocabulary, mode) runs in a fresh subprocess holding the inputs, which times naive and fused alternately
(--repeats pairs, so that both paths see the same background load) after a warm-up of each (the fused path
compiles its chunk functions there, on the run's chunk shapes).

Memory: "extra peak" = the process's peak resident set during forward + backward (VmHWM, reset through
/proc/self/clear_refs just before) - its resident set just before - the size of the lm_head weight gradient, which
every path must hold. The worker runs with MALLOC_MMAP_THRESHOLD_=1 MB, so tensors are mmap'd, freed memory
leaves the resident set at once and RSS tracks live tensors. The fused path holds its weight gradient from the
start, the naive one only at the end of backward: if the naive peak comes earlier, the subtraction understates its
extra memory (the ratio errs in its favour). Time: the minimum over the repeats; other processes on the machine make
single runs noisy, so the
table also shows the 1-minute load average at the end of each worker (2 = this run alone on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

MODES = ("sft", "dft", "sft_kl", "asft", "iw_sft")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(mode: str, vocab: int, hidden: int, tokens: int, rows: int, chunk: int, repeats: int) -> dict:
    import torch

    from asft.fused import LMHead, fused_token_loss
    from asft.objectives import needs_reference, token_loss

    torch.manual_seed(0)
    # Filled in place: a `randn(...) * 0.02` temporary would double the weight for a moment.
    weight = torch.empty(vocab, hidden).normal_(0, 0.02).requires_grad_()
    head, ref_head = LMHead(weight), LMHead(weight.detach())

    def batch(rows, t):
        h = torch.randn(rows, t + 1, hidden, requires_grad=True)
        ref_h = (h.detach() + 0.3 * torch.randn(rows, t + 1, hidden)) if needs_reference(mode) else None
        labels = torch.randint(0, vocab, (rows, t + 1))
        labels[:, 0] = -100
        return h, ref_h, labels

    def step(path, h, ref_h, labels):
        if path == "naive":
            ref_logits = None
            if ref_h is not None:
                with torch.no_grad():
                    ref_logits = ref_head.logits(ref_h)
            loss, _ = token_loss(mode, head.logits(h), labels, ref_logits)
        else:
            loss, _ = fused_token_loss(mode, h, labels, head, ref_h, ref_head, chunk_size=chunk)
        loss.backward()
        weight.grad = h.grad = None

    per_row = tokens // rows
    step("naive", *batch(1, min(per_row, 16)))  # loads the libraries
    # Same chunk shapes and code path as the run: sequences packed into one chunk, or one over two chunks.
    step("fused", *batch(min(rows, max(1, chunk // per_row)), min(per_row, chunk + 1)))
    inputs = batch(rows, per_row)
    result = {"naive": {"time": [], "peak": []}, "fused": {"time": [], "peak": []}}
    for _ in range(repeats):
        for path in ("naive", "fused"):
            gc.collect()
            _reset_peak()
            baseline = _status_kb("VmRSS")
            start = time.perf_counter()
            step(path, *inputs)
            result[path]["time"].append(time.perf_counter() - start)
            result[path]["peak"].append((_status_kb("VmHWM") - baseline) * 1024 - weight.numel() * 4)
    out = {path: {"time": min(r["time"]), "peak": max(r["peak"])} for path, r in result.items()}
    return {**out, "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="response tokens")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocabs", default="128256,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rows", type=int, default=8, help="sequences the tokens are split into")
    p.add_argument("--chunk-size", type=int, default=512, help="fused path's tokens per chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed naive/fused pairs; the minimum is kept")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "VOCAB"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        mode, vocab = a.worker
        print(json.dumps(worker(mode, int(vocab), a.hidden, a.tokens, a.rows, a.chunk_size, a.repeats)))
        return

    compile_on = os.environ.get("ASFT_COMPILE", "1") != "0"
    print(
        f"tokens={a.tokens} rows={a.rows} hidden={a.hidden} float32 chunk_size={a.chunk_size} "
        f"repeats={a.repeats} torch.compile={'on' if compile_on else 'off'} cpus={os.cpu_count()}",
        flush=True,
    )
    start = time.time()
    peak_ratios, time_ratios = [], []
    for vocab in map(int, a.vocabs.split(",")):
        print(f"\nvocab {vocab}")
        print(
            f"{'mode':8} {'naive GB':>9} {'fused GB':>9} {'ratio':>7} {'naive s':>8} {'fused s':>8} {'ratio':>6}"
            f" {'load':>5}"
        )
        for mode in a.modes.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                str(vocab),
                "--tokens",
                str(a.tokens),
                "--hidden",
                str(a.hidden),
                "--rows",
                str(a.rows),
                "--chunk-size",
                str(a.chunk_size),
                "--repeats",
                str(a.repeats),
            ]
            # Tensors of 1 MB and more straight from mmap (glibc's default threshold floats up to 32 MB), so that
            # freed memory leaves the resident set and RSS tracks live tensors at small sizes too.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{mode} {vocab} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            pr = r["naive"]["peak"] / max(r["fused"]["peak"], 1 << 20)  # floor: 1 MB
            tr = r["fused"]["time"] / r["naive"]["time"]
            peak_ratios.append(pr)
            time_ratios.append(tr)
            print(
                f"{mode:8} {r['naive']['peak'] / 1e9:9.2f} {r['fused']['peak'] / 1e9:9.2f} {pr:7.1f} "
                f"{r['naive']['time']:8.1f} {r['fused']['time']:8.1f} {tr:6.2f} {r['load']:5.1f}",
                flush=True,
            )
    print(f"\n(total {time.time() - start:.0f} s; ratios: peak naive/fused, time fused/naive)")
    print(f"peak_ratio={min(peak_ratios):.1f} time_ratio={max(time_ratios):.2f}")


if __name__ == "__main__":
    main()
