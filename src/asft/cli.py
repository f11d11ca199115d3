"""`asft` command line: train, eval, merge-lora, data, plot."""

from __future__ import annotations

import sys

USAGE = """usage: asft COMMAND [ARGS]

commands:
  train       fine-tune a causal LM with sft | dft | sft_kl | asft | iw_sft
  eval        evaluate a model (medical, math, judge, drift)
  merge-lora  merge a LoRA adapter into its base model
  quickstart  offline ASFT demo on the embedded SmolLM2-135M-Instruct

`asft COMMAND --help` describes each command."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "eval":
        from .evaluation.cli import main as eval_main

        return eval_main(rest)
    print(f"asft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
