"""`asft data download | convert | inspect`: fetch the paper's training sets, change their format, and look at
them through a tokenizer before any compute is spent."""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path, PurePosixPath

from ..data import (
    FORMATS,
    IGNORE_INDEX,
    TEMPLATES,
    DataError,
    atomic_path,
    example_to_row,
    load_examples,
    resolve_template,
    tokenize,
    write_jsonl,
)
from ..errors import ConfigError, DownloadError
from ..io import write_parquet
from .args import check_numbers

PAPER_DATASET = "chichi56/ASFT"
PAPER_FILES = (
    "numina_cot_10k",
    "numina_cot_30k",
    "numina_cot_100k",
    "train_medmcqa_alpaca_10k",
    "train_medmcqa_alpaca_30k",
    "train_medmcqa_alpaca_100k",
    "magpie10k",
)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PERCENTILES = (50, 90, 95, 99)
MARKS = ("⟦", "⟧")
COLOR = ("\x1b[1;32m", "\x1b[0m")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- download


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.upper() in ("1", "ON", "YES", "TRUE")


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def check_online() -> None:
    """Fail at once when offline. huggingface_hub retries a failed listing five times with backoff (~25 s), so
    one plain request with a short timeout decides first."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _offline():
        raise DownloadError(
            "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set), so nothing can be "
            "downloaded; unset it, or copy the data files into --output_dir by hand"
        )
    try:
        get_session().head(constants.ENDPOINT, timeout=_timeout())  # any answer, even an error status, will do
    except Exception as e:  # DNS, refused, timeout, proxy, TLS: all mean the same to the user
        raise DownloadError(
            f"cannot reach {constants.ENDPOINT} ({type(e).__name__}: {_first_line(e)}); check the "
            "network or proxy (HTTPS_PROXY), or point HF_ENDPOINT at a mirror"
        ) from None


def _hub_error(what: str, e: Exception) -> DownloadError:
    from huggingface_hub import errors

    hint = ""
    if isinstance(e, errors.GatedRepoError):
        hint = "; it is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(e, errors.RepositoryNotFoundError):
        hint = "; check the name, or log in (`hf auth login` or HF_TOKEN) if it is private"
    elif isinstance(e, errors.RevisionNotFoundError):
        hint = "; check --revision"
    # Messages from huggingface_hub name URLs and request ids, never the token.
    return DownloadError(f"{what}: {type(e).__name__}: {_first_line(e)}{hint}")


def _names(path: str) -> set[str]:
    """What a user may call a repo file: its path or file name, either with or without the extension."""
    bare = next((path[: -len(s)] for s in DATA_SUFFIXES if path.endswith(s)), path)
    return {path, bare, PurePosixPath(path).name, PurePosixPath(bare).name}


def select_files(listing: list[str], names: list[str] | None, dataset: str = PAPER_DATASET) -> list[str]:
    """Repo paths for `names`, each an exact path, a file name, or a file name without its extension.

    With no names, the paper's seven training sets; those the repo lacks are left out with a note.
    """
    data_files = [f for f in listing if f.endswith(DATA_SUFFIXES)]
    shown = ", ".join(data_files[:30]) + (", ..." if len(data_files) > 30 else "") or "none"
    picked, missing = [], []
    for name in names or PAPER_FILES:
        matches = [f for f in listing if f == name] or [f for f in data_files if name in _names(f)]
        if len(matches) > 1:
            raise DownloadError(
                f"files: {name!r} matches several files in {dataset} ({', '.join(matches)}); give one of these paths"
            )
        if not matches and names:
            raise DownloadError(f"files: {name!r} is not in {dataset}; its data files: {shown}")
        if not matches:
            missing.append(name)
        elif matches[0] not in picked:
            picked.append(matches[0])
    if not picked:
        raise DownloadError(
            f"none of the paper's files ({', '.join(PAPER_FILES)}) is in {dataset}; its data "
            f"files: {shown}; pick some with --files"
        )
    if missing:
        print(f"Not in {dataset}, left out: {', '.join(missing)}", flush=True)
    clashes = [n for n, c in Counter(PurePosixPath(f).name for f in picked).items() if c > 1]
    if clashes:
        raise DownloadError(f"files: several picked files are named {clashes[0]!r}; pick one of them")
    return picked


def place(source: str | Path, target: Path, overwrite: bool) -> str:
    """Copy a downloaded file to `target`; an existing different file is replaced only with `overwrite`."""
    if target.exists():
        if target.is_file() and filecmp.cmp(source, target, shallow=False):
            return "up to date"
        if not overwrite:
            raise FileExistsError(
                f"{target} exists and differs from the downloaded file; pass --overwrite to replace it, or move it away"
            )
    with atomic_path(target, overwrite=True) as tmp:
        shutil.copyfile(source, tmp)
    return "written"


def download(args) -> int:
    import huggingface_hub as hub

    names = [n.strip() for item in args.files or [] for n in item.split(",") if n.strip()] or None
    check_online()
    try:
        listing = hub.list_repo_files(args.dataset, repo_type="dataset", revision=args.revision)
    except Exception as e:
        raise _hub_error(f"cannot list the files of {args.dataset}", e) from None
    picked = select_files(listing, names, args.dataset)
    out = Path(args.output_dir)
    for i, path in enumerate(picked, start=1):
        target = out / PurePosixPath(path).name
        print(f"[{i}/{len(picked)}] {args.dataset}: {path} -> {target}", flush=True)
        try:  # into the Hub cache first: a finished file is never fetched twice, and the cache holds the locks
            cached = hub.hf_hub_download(
                args.dataset, path, repo_type="dataset", revision=args.revision, etag_timeout=_timeout()
            )
        except Exception as e:
            raise _hub_error(f"cannot download {path}", e) from None
        print(f"  {place(cached, target, args.overwrite)}", flush=True)
    print(
        f"Done: {len(picked)} file(s) in {out}. Next: asft data inspect {out / PurePosixPath(picked[0]).name} "
        "--model MODEL"
    )
    return 0


# ----------------------------------------------------------------------------------------------------- convert


def convert(args) -> int:
    out = Path(args.output)
    if out.exists() and not args.overwrite:  # before reading a large input for nothing
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    examples, skipped = load_examples(args.input, args.on_bad_rows)
    rows = []
    for ex in examples:
        try:
            rows.append(example_to_row(ex, args.to))
        except DataError as e:
            if args.on_bad_rows == "error":
                raise
            skipped.append(e)
    if not rows:
        raise DataError(args.input, None, None, f"no example can be written as {args.to}")
    _report_skipped(skipped)
    if out.suffix == ".parquet":  # the format its name says
        write_parquet(out, rows, overwrite=args.overwrite)
    elif out.suffix == ".json":
        with atomic_path(out, args.overwrite) as tmp:
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    else:
        write_jsonl(out, rows, overwrite=args.overwrite)
    print(f"Wrote {len(rows)} {args.to} rows to {out}")
    return 0


def _report_skipped(skipped: list[DataError], limit: int = 20) -> None:
    if skipped:
        lines = ", ".join(f"{e.source}:{e.line}" for e in skipped[:limit]) + (" ..." if len(skipped) > limit else "")
        print(f"Skipped {len(skipped)} bad row(s): {lines}\n  first: {skipped[0]}", flush=True)


# ----------------------------------------------------------------------------------------------------- inspect


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))]


def _visible(text: str) -> str:
    # Data is untrusted: its control characters (an ANSI escape, a carriage return) are shown, not obeyed.
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], text)


def marked(input_ids: list[int], labels: list[int], tokenizer, color: bool = False) -> str:
    """The tokens as text, each run of trained (loss) tokens wrapped in ANSI color or in ⟦ ⟧."""
    left, right = COLOR if color else MARKS
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = _visible(
                tokenizer.decode(input_ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            )
            parts.append(f"{left}{text}{right}" if labels[start] != IGNORE_INDEX else text)
            start = i
    return "".join(parts)


def _load_tokenizer(model: str, trust_remote_code: bool):
    from ..models import ModelLoadError, load_tokenizer, resolve_model_path

    try:
        return load_tokenizer(resolve_model_path(model, trust_remote_code), trust_remote_code)
    except (ModelLoadError, OSError, ValueError) as e:  # offline hub id, folder without a tokenizer, ...
        raise ConfigError(f"model: cannot load a tokenizer from {model}: {_first_line(e)}") from None


def inspect(args) -> int:
    if args.max_length < 2:
        raise ConfigError(f"max_length: must be >= 2, got {args.max_length}")
    if args.prior or args.json or args.reference_cache:
        return prior(args)
    examples, skipped = load_examples(args.file, args.on_bad_rows)  # validated before the tokenizer is loaded
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    try:
        template = resolve_template(args.template, tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    items, prompt, response, total, dropped, truncated, cut = [], [], [], [], [], 0, 0
    for ex in examples:
        try:
            item = tokenize(ex, template, tokenizer)
        except DataError as e:  # e.g. a multi-turn conversation under the alpaca template
            if args.on_bad_rows == "error":
                raise
            skipped.append(e)
            continue
        labels = item["labels"]
        trained = sum(label != IGNORE_INDEX for label in labels)
        items.append((ex, item))
        prompt.append(len(labels) - trained)
        response.append(trained)
        total.append(len(labels))
        if all(label == IGNORE_INDEX for label in labels[: args.max_length]):
            dropped.append(ex)
        elif len(labels) > args.max_length:
            truncated += 1
            cut += sum(label != IGNORE_INDEX for label in labels[args.max_length :])
    if not items:
        raise DataError(args.file, None, None, "no valid examples")

    n = len(items)
    for source, count in Counter(ex.source for ex, _ in items).items():
        formats = "/".join(sorted({ex.format or "?" for ex, _ in items if ex.source == source}))
        print(f"{source}: {count} examples ({formats})")
    _report_skipped(skipped)
    print(f"tokenizer: {args.model} | template: {template} | max_length: {args.max_length}\n")
    print(f"{'tokens per example':<20}{'mean':>8}" + "".join(f"{'p' + str(p):>8}" for p in PERCENTILES) + f"{'max':>8}")
    for name, values in (("prompt", prompt), ("response (trained)", response), ("total", total)):
        values = sorted(values)
        print(
            f"  {name:<18}{sum(values) / n:>8.1f}"
            + "".join(f"{percentile(values, p):>8}" for p in PERCENTILES)
            + f"{values[-1]:>8}"
        )
    print(
        f"\nmax_length={args.max_length}: {truncated} of {n} examples truncated ({100 * truncated / n:.1f}%), "
        f"losing {cut} response tokens; {len(dropped)} dropped ({100 * len(dropped) / n:.1f}%) because the prompt "
        "alone fills max_length"
    )
    if dropped:
        lines = ", ".join(f"{ex.source}:{ex.line}" for ex in dropped[:20]) + (" ..." if len(dropped) > 20 else "")
        print(f"  dropped: {lines}\n  `asft train` stops at the first of them unless --on_bad_rows skip")
    trained = sum(sum(label != IGNORE_INDEX for label in item["labels"][: args.max_length]) for _, item in items)
    print(f"trained tokens within max_length: {trained}")

    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    how = "in green" if color else "between ⟦ ⟧"
    for ex, item in items[: args.show]:
        ids, labels = item["input_ids"], item["labels"]
        print(
            f"\n--- {ex.source}:{ex.line}: {len(ids)} tokens, {sum(x != IGNORE_INDEX for x in labels)} trained "
            f"(shown {how}) ---"
        )
        print(marked(ids[: args.max_length], labels[: args.max_length], tokenizer, color))
        if len(ids) > args.max_length:
            print(f"[... {len(ids) - args.max_length} more tokens cut by max_length={args.max_length}]")
    return 0


def prior(args) -> int:
    """`asft data inspect --prior`: the base model's p(y_t) over the response tokens (asft.diagnostics)."""
    import json

    from .. import diagnostics as dg

    if not args.prior:
        raise ConfigError("--json and --reference_cache go with --prior")
    if args.limit < 1:
        raise ConfigError(f"limit: must be >= 1, got {args.limit}")
    load_examples(args.file, args.on_bad_rows)  # bad rows: fail before any model is loaded
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    try:
        template = resolve_template(args.template, tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    features, origins = dg.tokenized(args.file, tokenizer, template, args.max_length, args.limit, args.on_bad_rows)
    if not features:
        raise DataError(args.file, None, None, "no example with a response token")
    where = f"{args.model}, {len(features)} examples"
    if args.reference_cache:
        from ..cache import ReferenceCache

        scores = dg.scores_from_cache(
            ReferenceCache(args.reference_cache), features, tokenizer, template, args.max_length
        )
        where = f"the reference cache {args.reference_cache}, {len(features)} examples"
    else:
        from ..models import ModelLoadError, load_model

        if not args.json:
            print(f"scoring {len(features)} examples under {args.model} ...", file=sys.stderr, flush=True)
        try:
            model = load_model(args.model, trust_remote_code=args.trust_remote_code)
        except (ModelLoadError, OSError) as e:
            raise ConfigError(f"model: cannot load {args.model}: {_first_line(e)}") from None
        scores = dg.score_features(model, features, tokenizer.pad_token_id, args.batch_size)
    report = dg.prior_report(scores, tokenizer, origins)
    if args.json:
        print(json.dumps({"data": args.file, "model": args.model, "template": template, **report}))
    else:
        print(dg.format_prior(report, where))
    return 0


# -------------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asft data", description="Download, convert and inspect training data.")
    sub = p.add_subparsers(
        dest="command", metavar="SUBCOMMAND", help="`asft data SUBCOMMAND --help` describes its flags"
    )
    bad_rows = dict(
        default="error",
        choices=["error", "skip"],
        help="error (default): stop at the first bad row, naming file, line and field; skip: leave bad "
        "rows out and say how many and which lines",
    )

    d = sub.add_parser(
        "download",
        help="fetch the paper's training sets from the Hugging Face Hub",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fetch training files from a Hugging Face dataset repository into --output_dir.\n\n"
        "Files go through the Hugging Face cache (HF_HOME; a progress bar per file), then are copied "
        "into --output_dir.\nInterrupted? Run the same command again: finished files are not fetched "
        "again (transient network\nerrors are resumed within a run). A private or gated repo needs "
        "`hf auth login` or HF_TOKEN; the token\nis never printed. Offline (HF_HUB_OFFLINE=1, or the Hub "
        "unreachable within HF_HUB_ETAG_TIMEOUT seconds,\ndefault 10) it stops at once.",
    )
    d.add_argument("--dataset", default=PAPER_DATASET, help="dataset repository id (default: %(default)s)")
    d.add_argument(
        "--files",
        nargs="+",
        metavar="NAME",
        help="files to fetch (space- or comma-separated), matched against the repository's file listing "
        "(list_repo_files): an exact path (data/x.jsonl), a file name (x.jsonl) or a name without "
        "extension (x). Default: the paper's sets " + ", ".join(PAPER_FILES),
    )
    d.add_argument("--output_dir", default="data", help="folder to put the files in (default: %(default)s)")
    d.add_argument("--revision", default=None, help="branch, tag or commit of the repository (default: main)")
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a file in --output_dir that differs from the downloaded one (default: refuse)",
    )

    c = sub.add_parser(
        "convert",
        help="rewrite a data file in another format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read IN (validated as `asft train` would), write OUT as JSONL in the --to format.\n\n"
        "Formats: alpaca {instruction, input?, response}; messages {messages: [{role, content}]};\n"
        "prompt_completion {prompt, completion}; sharegpt {conversations: [{from, value}]}.\n"
        "messages and sharegpt keep every turn. alpaca and prompt_completion hold one exchange: a\n"
        "conversation with several user or assistant turns is an error naming its file:line; system\n"
        "turns are prepended to the prompt, separated by a blank line. Text is copied, not templated\n"
        "(alpaca -> prompt_completion gives prompt = instruction, plus a blank line and input if any);\n"
        "other keys of a row are not carried over. OUT is written atomically.",
    )
    c.add_argument("input", metavar="IN", help="JSONL / JSON / parquet file, or several comma-separated")
    c.add_argument(
        "output", metavar="OUT", help="file to write, in the format its name says: .jsonl, .json or .parquet"
    )
    c.add_argument("--to", required=True, choices=FORMATS, help="target format")
    c.add_argument("--on_bad_rows", **bad_rows)
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")

    i = sub.add_parser(
        "inspect",
        help="counts, token lengths, truncation, and the first example with its trained tokens marked",
        description="Validate FILE and tokenize it as `asft train` would: example counts, prompt / response / "
        "total lengths in tokens (mean and percentiles), how many examples max_length truncates or "
        "drops (prompt alone fills it), and the first example(s) rendered with the trained (loss) "
        "tokens in green on a terminal, between ⟦ ⟧ otherwise (NO_COLOR turns color off).",
    )
    i.add_argument("file", metavar="FILE", help="JSONL / JSON / parquet file, or several comma-separated")
    i.add_argument(
        "--model",
        required=True,
        help="whose tokenizer: a local folder, a hub id, a .gguf file, or embedded:smollm2-135m-instruct",
    )
    i.add_argument(
        "--template",
        default="auto",
        choices=TEMPLATES,
        help="alpaca (the paper's), chat (the tokenizer's chat template), none, or auto (chat when the "
        "tokenizer has a chat template, else alpaca; default)",
    )
    i.add_argument("--max_length", type=int, default=2048, help="tokens per example, as in train (default: 2048)")
    i.add_argument("--on_bad_rows", **bad_rows)
    i.add_argument("--show", type=int, default=1, metavar="N", help="how many examples to print (default: 1)")
    i.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow the model repository's own tokenizer code to run (default: off)",
    )
    i.add_argument(
        "--prior",
        action="store_true",
        help="score the response tokens under MODEL (a forward pass, teacher forced): mean / median / quantiles "
        "of p(y_t), the share below 0.1 and above 0.9, a histogram, the improbable token strings, the mean "
        "entropy, and the share of SFT's gradient weight each p-weighted rule gives each probability bin",
    )
    i.add_argument("--limit", type=int, default=512, metavar="N", help="--prior: first N examples (default: 512)")
    i.add_argument("--batch_size", type=int, default=8, help="--prior: examples per forward pass (default: 8)")
    i.add_argument("--json", action="store_true", help="--prior: print the numbers as one JSON object")
    i.add_argument(
        "--reference_cache",
        default=None,
        metavar="DIR",
        help="--prior: read p(y_t) from a cache of `asft cache-reference` built for this data (no forward pass)",
    )
    return p


COMMANDS = {"download": download, "convert": convert, "inspect": inspect}


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        check_numbers(vars(args))
        return COMMANDS[args.command](args)
    except (DataError, ConfigError, DownloadError, OSError) as e:
        # Our own errors and the file system's (exists, permission, disk full): one line, no traceback.
        print(f"asft data {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; run the same command again to continue" if args.command == "download" else ""
        print(f"asft data {args.command}: interrupted{again}", file=sys.stderr)
        return 130
