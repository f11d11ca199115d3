"""How far the cached (top-k + tail bucket) reference is from the exact one, on SmolLM2-135M-Instruct.

1. Data: the project's arithmetic word problems (reasoning_task.py), chat template, max length 256.
2. A policy trained away from the reference: --dft_steps steps of dft (AdamW) from the reference itself.
3. On --eval_examples held examples, for k = 8, 16, 32, 64, 128 (stored in --dtype, as the cache stores them):
   the relative error of the mean bucketed KL against the exact full-vocabulary KL (forward, the default), the
   cosine between the gradients of the two KLs with respect to every policy weight, the mean tail mass and the bytes
   per token of the cache; then, at the default k, the same for each storage dtype.
4. asft online (frozen copy) and asft cached (the real `asft cache-reference` build, default k and dtype), from the
   same start and seed for --train_steps steps; the final models' exact KL to the reference and NLL on the held
   examples.
5. The build's tokens/s beside a plain reference forward's (model(...).logits) over the same batches.

    python benchmarks/cache_fidelity.py [--k 8,16,32,64,128] [--default_k 64] [--dtype float16]
           [--dft_steps 3] [--train_steps 6] [--eval_examples 6] [--train_examples 24] [--lr 1e-5]

Printed, never asserted. Last line: `k=<default k> kl_rel_err=<> grad_cos=<> run_gap=<largest relative gap of the
final kl / nll between cached and online>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# The fused kernels' compilation (a minute per trainer on 2 cores) buys nothing here: no step is timed.
os.environ.setdefault("ASFT_COMPILE", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
MODEL = "embedded:smollm2-135m-instruct"
MAX_LEN = 256


def trainer_for(mode, data_ds, tokenizer, model, out, steps, lr, cache=None):
    from asft import AnchoredSFTConfig, AnchoredSFTTrainer

    quiet = dict(report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, logging_steps=1)
    run = dict(per_device_train_batch_size=4, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant")
    objective = dict(mode=mode, kl_weight=0.03, reference_cache=cache)
    args = AnchoredSFTConfig(output_dir=out, max_length=MAX_LEN, **objective, **run, **quiet)
    return AnchoredSFTTrainer(model, args=args, train_dataset=data_ds, processing_class=tokenizer)


def padded(rows, pad_id):
    from asft.data import right_pad

    batch = right_pad([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id, "cpu")
    return batch["input_ids"], batch["labels"], batch["attention_mask"]


def selected_logits(model, ids, labels, mask, grad=False):
    from asft.objectives import select_response

    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    z, y, _ = select_response(logits, labels)
    return z.float(), y


def stored(rows, dtype):
    """Rows as the cache stores them: the top-k log-probs rounded to the storage dtype, the rest float32."""
    from asft.cache.store import _from_store, _to_store
    from asft.objectives import CachedRows

    return CachedRows(rows.ids, _from_store(_to_store(rows.logp, dtype), dtype), rows.tail, rows.label)


def fidelity_table(policy, reference, eval_rows, pad_id, ks, dtypes, default_k, vocab):
    from asft.cache import ids_dtype, reference_rows
    from asft.objectives import bucketed_kl, kl_from_logprobs

    ids, labels, mask = padded(eval_rows, pad_id)
    ref_z, y = selected_logits(reference, ids, labels, mask)
    params = [p for p in policy.parameters() if p.requires_grad]
    z, _ = selected_logits(policy, ids, labels, mask, grad=True)
    logp = z.log_softmax(-1)
    exact = kl_from_logprobs(logp, ref_z.log_softmax(-1)).mean()
    # float64: a float32 cosine over 135M entries drifts past 1.
    g_exact = torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(exact, params, retain_graph=True)])
    id_bytes = 2 if ids_dtype(vocab) == "uint16" else 4
    table = []
    for k, dtype in [(k, dtypes[0]) for k in ks] + [(default_k, d) for d in dtypes[1:]]:
        rows = stored(reference_rows(ref_z, y, k), dtype)
        kl = bucketed_kl(logp, rows).mean()
        g = torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(kl, params, retain_graph=True)])
        table.append(
            {
                "k": k,
                "dtype": dtype,
                "kl_rel_err": abs(float(kl) - float(exact)) / float(exact),
                "grad_cos": float(torch.nn.functional.cosine_similarity(g, g_exact, dim=0)),
                "tail": float(rows.tail.exp().mean()),
                "bytes": k * (id_bytes + torch.finfo(getattr(torch, dtype)).bits // 8) + 8,
            }
        )
        print(
            f"  k={k:4d} {dtype:8s}: kl_rel_err {table[-1]['kl_rel_err']:.4f} grad_cos "
            f"{table[-1]['grad_cos']:.5f} tail {table[-1]['tail']:.4f}",
            flush=True,
        )
    return float(exact), table


@torch.no_grad()
def evaluate(model, reference, eval_rows, pad_id):
    from asft.objectives import kl_from_logprobs

    ids, labels, mask = padded(eval_rows, pad_id)
    ref_z, y = selected_logits(reference, ids, labels, mask)
    z, _ = selected_logits(model, ids, labels, mask)
    logp = z.log_softmax(-1)
    return {
        "kl": float(kl_from_logprobs(logp, ref_z.log_softmax(-1)).mean()),
        "nll": float(-logp.gather(-1, y[:, None]).mean()),
    }


def throughput(model_path, data, tokenizer, k, dtype, tmp, batch_size=8):
    """Input tokens/s of the cache build's scoring loop (asft.cache.build_cache: forward, top-k, write) and of a
    plain forward (model(...).logits) over the same batches, alternated (forward, build, forward, build) so that
    both see the same background load. Model loading and tokenization are outside both timings."""
    from asft.cache import HFScorer, build_cache, build_plan, finish_cache, model_fingerprint, prepare_output
    from asft.data import build_dataset
    from asft.models import load_model

    model = load_model(model_path).eval().requires_grad_(False)
    dataset = build_dataset(data, tokenizer, template="chat", max_length=MAX_LEN, origin=True, log=lambda *_: None)
    tokens = sum(len(x) for x in dataset["input_ids"])
    plan = build_plan(
        dataset,
        tokenizer=tokenizer,
        reference={"path": MODEL, "fingerprint": model_fingerprint(model), "dtype": "float32"},
        template="chat",
        max_length=MAX_LEN,
        data=[data],
        top_k=k,
        dtype=dtype,
        vocab_size=model.config.vocab_size,
        shard_size=1024,
        backend="hf",
    )
    scorer = HFScorer(model, tokenizer.pad_token_id)
    rates = {"forward": [], "build": []}
    for rep in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(dataset), batch_size):
                ids, _, mask = padded(
                    [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))], tokenizer.pad_token_id
                )
                _ = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        rates["forward"].append(tokens / (time.perf_counter() - start))
        out = prepare_output(os.path.join(tmp, f"cache-{rep}"), plan)
        start = time.perf_counter()
        build_cache(scorer, dataset, plan, out, batch_size=batch_size, progress=False)
        rates["build"].append(tokens / (time.perf_counter() - start))
        finish_cache(out, plan)
    return rates, os.path.join(tmp, "cache-0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", default="8,16,32,64,128")
    p.add_argument("--default_k", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--dft_steps", type=int, default=3)
    p.add_argument("--train_steps", type=int, default=6)
    p.add_argument("--eval_examples", type=int, default=6)
    p.add_argument("--train_examples", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of the dft and asft runs")
    args = p.parse_args()

    from asft.data import build_dataset
    from asft.models import load_model, load_tokenizer, resolve_model_path
    from reasoning_task import write_task

    torch.manual_seed(0)
    path = resolve_model_path(MODEL)
    tokenizer = load_tokenizer(path)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_task(tmp, n_train=args.train_examples + args.eval_examples, n_test=1, seed=0)
        lines = paths["train"].read_text().splitlines(keepends=True)
        train, held = Path(tmp) / "train.jsonl", Path(tmp) / "held.jsonl"
        train.write_text("".join(lines[: args.train_examples]))
        held.write_text("".join(lines[args.train_examples :]))
        quiet = lambda *_: None  # noqa: E731
        train_ds = build_dataset(str(train), tokenizer, template="chat", max_length=MAX_LEN, log=quiet)
        held_rows = list(build_dataset(str(held), tokenizer, template="chat", max_length=MAX_LEN, log=quiet))
        reference = load_model(path).eval().requires_grad_(False)
        vocab = reference.config.vocab_size
        n_tokens = sum(len(x) for x in train_ds["input_ids"])
        print(
            f"SmolLM2-135M-Instruct, float32, {len(train_ds)} training examples ({n_tokens} tokens), "
            f"{len(held_rows)} held; {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )

        # 2. A policy moved away from the reference by dft.
        policy = load_model(path).train()
        trainer_for("dft", train_ds, tokenizer, policy, os.path.join(tmp, "dft"), args.dft_steps, args.lr).train()
        policy.eval()

        # 3. The table.
        print(f"fidelity on the held examples, policy after {args.dft_steps} dft steps (lr {args.lr}):", flush=True)
        ks = [int(k) for k in args.k.split(",")]
        dtypes = [args.dtype] + [d for d in ("float16", "bfloat16", "float32") if d != args.dtype]
        exact, table = fidelity_table(
            policy, reference, held_rows, tokenizer.pad_token_id, ks, dtypes, args.default_k, vocab
        )
        del policy

        # 5 (first: it builds the cache the cached run reads). Throughput.
        rates, cache = throughput(path, str(train), tokenizer, args.default_k, args.dtype, tmp)

        # 4. asft online vs cached, same start and seed.
        final = {}
        for name in ("online", "cached"):
            torch.manual_seed(0)
            model = load_model(path).train()
            trainer = trainer_for(
                "asft",
                train_ds,
                tokenizer,
                model,
                os.path.join(tmp, name),
                args.train_steps,
                args.lr,
                cache if name == "cached" else None,
            )
            trainer.train()
            final[name] = evaluate(model.eval(), reference, held_rows, tokenizer.pad_token_id)
            print(f"  asft {name}: final kl {final[name]['kl']:.5f}, nll {final[name]['nll']:.4f}", flush=True)
            del trainer, model

    print(f"\nexact KL(reference || policy) on the held tokens: {exact:.5f}")
    print("| k | dtype | kl_rel_err | grad_cos | mean tail mass | bytes/token |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['k']} | {r['dtype']} | {r['kl_rel_err']:.4f} | {r['grad_cos']:.5f} | {r['tail']:.4f} | "
            f"{r['bytes']} |"
        )
    print(f"\nasft {args.train_steps} steps (lr {args.lr}, kl_weight 0.03), final models on the held examples:")
    print("| run | kl | nll |\n|---|---|---|")
    for name, r in final.items():
        print(f"| {name} | {r['kl']:.5f} | {r['nll']:.4f} |")
    build, fwd = rates["build"], rates["forward"]
    print(
        f"\ncache build (forward + top-k + write) {', '.join(f'{x:.0f}' for x in build)} tokens/s vs plain reference "
        f"forward {', '.join(f'{x:.0f}' for x in fwd)} tokens/s (alternated): build/forward "
        f"{max(build) / max(fwd):.2f} (best of each); load {os.getloadavg()[0]:.2f}"
    )
    gap = max(abs(final["cached"][m] - final["online"][m]) / abs(final["online"][m]) for m in ("kl", "nll"))
    row = next(r for r in table if r["k"] == args.default_k and r["dtype"] == args.dtype)
    print(f"k={args.default_k} kl_rel_err={row['kl_rel_err']:.4f} grad_cos={row['grad_cos']:.5f} run_gap={gap:.4f}")


if __name__ == "__main__":
    main()
