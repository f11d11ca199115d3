"""`asft merge-lora`: merge a LoRA adapter into its base model."""

from __future__ import annotations

from ..models import DTYPE_NAMES


def main(argv: list[str]) -> int:
    from ..models import merge_lora as merge

    args = parser().parse_args(argv)
    out = merge(
        args.base_model_path,
        args.lora_model_path,
        args.output_dir,
        dtype=args.dtype,
        overwrite=args.overwrite_output_dir,
    )
    print(f"Merged model written to {out}")
    return 0


def parser():
    import argparse

    p = argparse.ArgumentParser(prog="asft merge-lora", description="Merge a LoRA adapter into its base model.")
    p.add_argument("--base_model_path", required=True, help="base model (folder, hub id, .gguf, embedded:...)")
    p.add_argument("--lora_model_path", required=True, help="adapter folder (with adapter_config.json)")
    p.add_argument("--output_dir", required=True, help="where to write the merged model")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="dtype to save in")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty output_dir")
    return p
