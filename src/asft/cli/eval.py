"""`asft eval`: evaluate a model on the paper's benchmarks with one command (see `asft.evaluation.driver`)."""

from __future__ import annotations

import sys

from ..errors import ConfigError, DataError, ModelLoadError
from ..evaluation.driver import build_parser, evaluate
from .args import check_numbers


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        check_numbers(vars(args))
        return evaluate(args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 0
    except (ConfigError, DataError, ModelLoadError, FileExistsError) as e:
        print(f"asft eval: error: {e}", file=sys.stderr)
        return 2
