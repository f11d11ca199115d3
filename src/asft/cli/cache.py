"""`asft cache-reference`: run the reference once over the training set and store its top-k log-probs.

    asft cache-reference --model_name_or_path M --data_path train.jsonl --template chat --model_max_length 2048 \\
        --top_k 64 --output_dir cache/ [--reference_model_path R] [--backend hf|vllm]
    asft cache-reference --inspect cache/

The data flags are those of `asft train` and the examples are tokenized by the same code (asft.data.build_dataset),
so `asft train ... --reference_cache cache/` finds every example's rows. Interrupted, the same command continues
(finished shards are kept); under `accelerate launch ... -m asft.cli cache-reference ...` each process builds a
share of the shards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cache.store import STORE_DTYPES
from ..errors import ConfigError
from ..models import BACKENDS, DTYPE_NAMES, check_backend
from .args import check_numbers


def _parser() -> argparse.ArgumentParser:
    from ..training.config import AnchoredSFTConfig

    default_max = AnchoredSFTConfig.__dataclass_fields__["max_length"].default
    p = argparse.ArgumentParser(prog="asft cache-reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--inspect", metavar="CACHE", help="print size, bytes/token, mean tail mass and the manifest")
    p.add_argument(
        "--model_name_or_path",
        help="the model to be trained (its tokenizer tokenizes the data; it is "
        "the reference unless --reference_model_path)",
    )
    p.add_argument("--reference_model_path", help="another model as the reference (default: model_name_or_path)")
    p.add_argument("--data_path", help="training data, as for asft train (comma-separated files)")
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", "alpaca", "chat", "none"],
        help="prompt rendering, as for asft train",
    )
    p.add_argument(
        "--model_max_length",
        type=int,
        default=default_max,
        help=f"maximum tokens per example, as for asft train (default {default_max}, asft train's)",
    )
    p.add_argument("--on_bad_rows", default="error", choices=["error", "skip"], help="as for asft train")
    p.add_argument("--top_k", type=int, default=64, help="reference log-probs stored per response token")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=STORE_DTYPES,
        help="storage dtype of the top-k log-probs (the tail and label log-probs are float32)",
    )
    p.add_argument("--output_dir", help="the cache folder")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built from other data or settings")
    p.add_argument(
        "--backend", default="hf", choices=BACKENDS, help="hf: transformers (batched); vllm: prompt log-probs"
    )
    p.add_argument("--reference_dtype", default="float32", choices=DTYPE_NAMES, help="dtype the reference is loaded in")
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward")
    p.add_argument("--shard_size", type=int, default=1024, help="examples per shard (the unit of resuming)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.8, help="vllm only")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    return p


def inspect(path: str) -> int:
    from ..cache import ReferenceCache

    cache = ReferenceCache(path)
    s = cache.stats()
    m = {k: v for k, v in cache.manifest.items() if k not in ("examples", "shards")}
    print(
        f"{path}: {s['bytes'] / 2**20:.1f} MiB, {len(cache)} examples, {s['tokens']} response tokens, "
        f"{len(cache.manifest['shards'])} shards"
    )
    print(
        f"bytes/token {s['bytes_per_token']:.1f}; mean tail mass {s['mean_tail_mass']:.4g} (the reference's "
        f"probability outside the top-{cache.top_k})"
    )
    print(json.dumps(m, indent=1, sort_keys=True))
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check_numbers(vars(args))
    if args.top_k < 1:
        raise ConfigError(f"--top_k: must be >= 1, got {args.top_k}")
    if args.inspect:
        return inspect(args.inspect)
    for name in ("model_name_or_path", "data_path", "output_dir"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required (or --inspect CACHE)")
    check_backend(args.backend)

    import torch
    from accelerate import PartialState

    from ..cache import HFScorer, VLLMScorer, build_cache, build_plan, finish_cache, model_fingerprint, prepare_output
    from ..data import build_dataset, resolve_template
    from ..models import load_model, load_tokenizer, resolve_model_path

    state = PartialState(cpu=not torch.cuda.is_available())
    main_process = state.is_main_process
    log = print if main_process else (lambda *_: None)
    model_path = resolve_model_path(args.model_name_or_path, args.trust_remote_code)
    ref_path = resolve_model_path(args.reference_model_path or args.model_name_or_path, args.trust_remote_code)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    template = resolve_template(args.template, tokenizer)
    dataset = build_dataset(
        args.data_path,
        tokenizer,
        template=template,
        max_length=args.model_max_length,
        on_bad_rows=args.on_bad_rows,
        log=log,
        origin=True,
    )
    model = load_model(ref_path, dtype=args.reference_dtype, trust_remote_code=args.trust_remote_code)
    model.eval().requires_grad_(False)
    if model.config.get_text_config().vocab_size < len(tokenizer):
        raise ConfigError(
            f"reference_model_path: {ref_path} has a vocabulary of {model.config.vocab_size}, "
            f"smaller than the tokenizer's {len(tokenizer)}"
        )
    reference = {
        "path": args.reference_model_path or args.model_name_or_path,
        "fingerprint": model_fingerprint(model),
        "dtype": args.reference_dtype,
    }
    plan = build_plan(
        dataset,
        tokenizer=tokenizer,
        reference=reference,
        template=template,
        max_length=args.model_max_length,
        data=[p.strip() for p in args.data_path.split(",")],
        top_k=args.top_k,
        dtype=args.dtype,
        vocab_size=model.config.get_text_config().vocab_size,
        shard_size=args.shard_size,
        backend=args.backend,
    )
    out = Path(args.output_dir)
    if main_process:
        prepare_output(out, plan, overwrite=args.overwrite)
    state.wait_for_everyone()
    prepare_output(out, plan)  # every process: the plan on disk is this one
    if args.backend == "vllm":
        del model
        scorer = VLLMScorer(
            ref_path,
            k=plan["top_k"],
            dtype=args.reference_dtype,
            max_length=args.model_max_length,
            gpu_memory_utilization=args.gpu_memory_utilization,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        scorer = HFScorer(model.to(state.device), tokenizer.pad_token_id)
    log(
        f"Reference cache: {plan['num_examples']} examples, {plan['num_tokens']} response tokens, top-{plan['top_k']} "
        f"{plan['dtype']}, {state.num_processes} process(es), into {out}"
    )
    stats = build_cache(
        scorer,
        dataset,
        plan,
        out,
        batch_size=args.batch_size,
        progress=main_process and not args.disable_tqdm,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    if stats["shards"] == 0:
        log(f"The cache in {out} is already complete ({stats['reused']} shard(s) here): nothing computed")
    else:
        reused = f", reused {stats['reused']} already built" if stats["reused"] else ""
        log(
            f"Built {stats['shards']} shard(s) here{reused}: {stats['tokens']} tokens in {stats['seconds']:.1f} s "
            f"({stats['tokens_per_s']:.0f} tokens/s on this process)"
        )
    state.wait_for_everyone()
    if main_process:
        finish_cache(out, plan)
        inspect(str(out))
    return 0
