"""Extra peak memory and wall time of the loss, naive (`asft.objectives` on full logits) vs fused (`asft.fused`).

    python benchmarks/loss_memory.py                     # the issue's sizes: 2,048 tokens, hidden 2,048, float32
    python benchmarks/loss_memory.py --tokens 256 --vocabs 32000 --modes sft,asft    # a quick look

For each vocabulary and mode, each path runs in a fresh subprocess: policy hidden states [rows, tokens/rows + 1, H]
(every shifted position a response token: `rows` sequences of tokens/rows), a reference's hidden states, an
lm_head weight [V, H] that requires grad (the reference uses the same weight, detached, as under LoRA), then
forward + backward. The layout matters to iw_sft only: a sequence longer than --chunk-size costs its fused path
one more policy matmul (its sequence weight is needed before any of its gradients); try --rows 2.

Memory: "extra peak" = the process's peak resident set during forward + backward (VmHWM, reset through
/proc/self/clear_refs after the warm-up) - its resident set once the inputs exist - the size of the lm_head weight
gradient, which every path must hold. Large tensors are mmap'd by the allocator, so freed memory leaves the
resident set at once and RSS tracks live tensors. The fused path holds its weight gradient from the start; the
naive one only at the end of backward, so if its peak comes earlier the subtraction understates its extra memory
(the ratio errs in the naive path's favour).
Time: forward + backward, the minimum over --repeats runs, after a one-chunk warm-up (torch.compile, if the
fused path uses it, compiles there). Another process on the machine makes times noisy; the minimum is the fairest.
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


def worker(path: str, mode: str, vocab: int, hidden: int, tokens: int, rows: int, chunk: int, repeats: int) -> dict:
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

    def step(h, ref_h, labels):
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

    # Warm-up: the fused path compiles its chunk functions here, so give it the run's chunk shapes and code path
    # (sequences packed into one chunk, or one sequence over two chunks); the naive one only loads its libraries.
    per_row = tokens // rows
    if path == "fused":
        step(*batch(min(rows, max(1, chunk // per_row)), min(per_row, chunk + 1)))
    else:
        step(*batch(1, min(per_row, 16)))
    inputs = batch(rows, per_row)
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        _reset_peak()
        baseline = _status_kb("VmRSS")
        start = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - start)
        peaks.append((_status_kb("VmHWM") - baseline) * 1024 - weight.numel() * weight.element_size())
    return {"time": min(times), "peak": max(peaks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rows", type=int, default=8, help="sequences the tokens are split into")
    p.add_argument("--vocabs", default="128256,151936")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", nargs=3, metavar=("PATH", "MODE", "VOCAB"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        path, mode, vocab = a.worker
        print(json.dumps(worker(path, mode, int(vocab), a.hidden, a.tokens, a.rows, a.chunk_size, a.repeats)))
        return

    from asft.fused import KERNELS  # noqa: F401 - fail early if the package is missing

    compile_on = os.environ.get("ASFT_COMPILE", "1") != "0"
    print(f"tokens={a.tokens} rows={a.rows} hidden={a.hidden} float32 chunk_size={a.chunk_size} repeats={a.repeats} "
          f"torch.compile={'on' if compile_on else 'off'} threads={os.cpu_count()}", flush=True)
    peak_ratios, time_ratios = [], []
    for vocab in map(int, a.vocabs.split(",")):
        print(f"\nvocab {vocab}")
        print(f"{'mode':8} {'naive GB':>9} {'fused GB':>9} {'ratio':>7} {'naive s':>8} {'fused s':>8} {'ratio':>6}")
        for mode in a.modes.split(","):
            r = {}
            for path in ("naive", "fused"):
                cmd = [sys.executable, __file__, "--worker", path, mode, str(vocab), "--tokens", str(a.tokens),
                       "--hidden", str(a.hidden), "--rows", str(a.rows), "--chunk-size", str(a.chunk_size),
                       "--repeats", str(a.repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{path} {mode} {vocab} failed:\n{out.stderr}")
                r[path] = json.loads(out.stdout.strip().splitlines()[-1])
            pr = r["naive"]["peak"] / max(r["fused"]["peak"], 1)
            tr = r["fused"]["time"] / r["naive"]["time"]
            peak_ratios.append(pr)
            time_ratios.append(tr)
            print(f"{mode:8} {r['naive']['peak'] / 1e9:9.2f} {r['fused']['peak'] / 1e9:9.2f} {pr:7.1f} "
                  f"{r['naive']['time']:8.1f} {r['fused']['time']:8.1f} {tr:6.2f}", flush=True)
    print(f"\npeak_ratio={min(peak_ratios):.1f} time_ratio={max(time_ratios):.2f}")


if __name__ == "__main__":
    main()
