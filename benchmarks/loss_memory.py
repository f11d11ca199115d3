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
import statistics
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


def cached_rows(ref_head, ref_h, labels, k: int, chunk: int):
    """The cache's rows (asft.objectives.CachedRows: top-k ids and log-probs, log tail mass, label log-prob) of the
    reference's response tokens, as `asft cache-reference` stores them; formed chunk by chunk (setup, not timed)."""
    import torch

    from asft.objectives import CachedRows, select_response

    h, y, _ = select_response(ref_h, labels)
    parts = []
    with torch.no_grad():
        for s in range(0, y.numel(), chunk):
            logp = ref_head.logits(h[s : s + chunk]).float().log_softmax(-1)
            top = logp.topk(k, -1)
            parts.append(
                (
                    top.indices,
                    top.values,
                    logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1),
                    logp.gather(-1, y[s : s + chunk, None]).squeeze(-1),
                )
            )
    return CachedRows(*(torch.cat(p) for p in zip(*parts)))


def liger_step(mode: str, h, ref_h, labels, weight, kl_weight: float = 0.03):
    """Liger Kernel's fused loss where it computes ours: sft = LigerFusedLinearCrossEntropyLoss; sft_kl = CE +
    kl_weight * KL(reference || policy) = LigerFusedLinearJSDLoss with beta 0 (its forward KL) and hard-loss weight
    1."""
    x, y = h[:, :-1].reshape(-1, h.shape[-1]), labels[:, 1:].reshape(-1)
    if mode == "sft":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss()(weight, x, y)
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    rx = ref_h[:, :-1].reshape(-1, h.shape[-1])
    return LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=kl_weight, beta=0.0)(
        x, weight, rx, weight.detach(), y
    )


LIGER_MODES = ("sft", "sft_kl")


def worker(
    mode: str,
    vocab: int,
    hidden: int,
    tokens: int,
    rows: int,
    chunk: int,
    repeats: int,
    device: str = "cpu",
    precision: str = "float32",
    liger: bool = False,
    top_k: int = 64,
) -> dict:
    """Naive vs fused (and Liger's, `liger`) loss of `mode` ("cached": asft against a top-k cached reference).

    precision "bf16" is --bf16's mixed precision: float32 lm_head weight (and its gradient), bf16 hidden states,
    matmuls under bf16 autocast. On CUDA: extra peak from the allocator's statistics, time from CUDA events, after a
    full-size warm-up of each path; on CPU as the module docstring says.
    """
    import torch

    from asft.fused import LMHead, fused_token_loss
    from asft.objectives import needs_reference, token_loss

    dev = torch.device(device)
    cuda, bf16 = dev.type == "cuda", precision == "bf16"
    loss_mode = "asft" if mode == "cached" else mode
    torch.manual_seed(0)
    # Filled in place: a `randn(...) * 0.02` temporary would double the weight for a moment.
    weight = torch.empty(vocab, hidden, device=dev).normal_(0, 0.02).requires_grad_()
    head, ref_head = LMHead(weight), LMHead(weight.detach())
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def batch(rows, t):
        h = torch.randn(rows, t + 1, hidden, device=dev, dtype=torch.bfloat16 if bf16 else torch.float32)
        ref_h = (h + 0.3 * torch.randn_like(h)) if needs_reference(loss_mode) else None
        labels = torch.randint(0, vocab, (rows, t + 1), device=dev)
        labels[:, 0] = -100
        with autocast:
            cache = cached_rows(ref_head, ref_h, labels, top_k, chunk) if mode == "cached" else None
        return h.requires_grad_(), None if mode == "cached" else ref_h, labels, cache

    def step(path, h, ref_h, labels, cache):
        with autocast:
            if path == "naive":
                ref_logits = None
                if ref_h is not None:
                    with torch.no_grad():
                        ref_logits = ref_head.logits(ref_h)
                loss, _ = token_loss(loss_mode, head.logits(h), labels, ref_logits, ref_cache=cache)
            elif path == "fused":
                loss, _ = fused_token_loss(
                    loss_mode, h, labels, head, ref_h, ref_head, chunk_size=chunk, ref_cache=cache
                )
            else:
                loss = liger_step(mode, h, ref_h, labels, weight)
        loss.backward()
        weight.grad = h.grad = None

    def measure(path, inputs):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(path, *inputs)
            end.record()
            torch.cuda.synchronize()
            seconds, peak = start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated() - base
        else:
            _reset_peak()
            base = _status_kb("VmRSS") * 1024
            start = time.perf_counter()
            step(path, *inputs)
            seconds, peak = time.perf_counter() - start, _status_kb("VmHWM") * 1024 - base
        return seconds, peak - weight.numel() * weight.element_size()

    paths = ["naive", "fused"] + (["liger"] if liger and mode in LIGER_MODES else [])
    per_row = tokens // rows
    inputs = batch(rows, per_row)
    errors = {}
    if cuda:  # warm-up at full size: the fused path (and Liger's) compile there, on the run's chunk shapes
        for path in list(paths):
            try:
                step(path, *inputs)
            except Exception as e:  # noqa: BLE001 - Liger's failure is a result; ours are raised
                if path != "liger":
                    raise
                errors[path] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                paths.remove(path)
                weight.grad = inputs[0].grad = None
    else:  # smaller warm-ups: a naive step at full size costs minutes on 2 cores
        step("naive", *batch(1, min(per_row, 16)))  # loads the libraries
        # Same chunk shapes and code path as the run: sequences packed into one chunk, or one over two chunks.
        step("fused", *batch(min(rows, max(1, chunk // per_row)), min(per_row, chunk + 1)))
    result = {path: {"times": [], "peaks": []} for path in paths}
    for _ in range(repeats):
        for path in paths:
            seconds, peak = measure(path, inputs)
            result[path]["times"].append(seconds)
            result[path]["peaks"].append(peak)
    out = {
        path: {
            "time": min(r["times"]),
            "median": statistics.median(r["times"]),
            "peak": max(r["peaks"]),
            "times": r["times"],
        }
        for path, r in result.items()
    }
    return {**out, **errors, "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="response tokens")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocabs", default="128256,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--modes", default=",".join(MODES), help="of MODES, or cached (asft, a top-64 cached reference)")
    p.add_argument("--rows", type=int, default=8, help="sequences the tokens are split into")
    p.add_argument("--chunk-size", type=int, default=512, help="fused path's tokens per chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed naive/fused pairs; the minimum is kept")
    p.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_suite.py runs this on a GPU)")
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bf16"],
        help="bf16: --bf16's mixed precision (float32 weight, bf16 hidden states, autocast)",
    )
    p.add_argument("--worker", nargs=2, metavar=("MODE", "VOCAB"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        mode, vocab = a.worker
        print(
            json.dumps(
                worker(mode, int(vocab), a.hidden, a.tokens, a.rows, a.chunk_size, a.repeats, a.device, a.precision)
            )
        )
        return

    compile_on = os.environ.get("ASFT_COMPILE", "1") != "0"
    print(
        f"tokens={a.tokens} rows={a.rows} hidden={a.hidden} {a.precision} {a.device} chunk_size={a.chunk_size} "
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
                "--device",
                a.device,
                "--precision",
                a.precision,
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
