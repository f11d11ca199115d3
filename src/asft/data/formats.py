"""Training data files: every accepted format -> one canonical form (`Example`), and back.

Formats, detected per file from the first row's keys:
  alpaca             {"instruction", "response"}      ("input" optional; "output" accepted for "response")
  messages           {"messages": [{"role", "content"}, ...]}   loss on every assistant turn
  prompt_completion  {"prompt", "completion"}
  sharegpt           {"conversations": [{"from", "value"}, ...]}

Canonical form: a list of (text, trainable) segments, or chat turns. Problems are reported with file, line and
field before any model compute is spent. `example_to_row` writes examples back in any format (`asft data convert`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, conversation_field

FORMATS = ("alpaca", "messages", "prompt_completion", "sharegpt")

ROLES = ("system", "user", "assistant")

# The keys each format needs ("a|b": either one).
REQUIRED_FIELDS = {
    "alpaca": ["instruction", "response|output"],
    "messages": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "sharegpt": ["conversations"],
}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Row:
    source: str
    line: int
    data: Any


@dataclass
class Example:
    """One training example in canonical form."""

    source: str
    line: int
    segments: list[tuple[str, bool]] | None = None  # (text, trainable), for alpaca / prompt_completion
    messages: list[dict[str, str]] | None = None  # chat turns, for messages / sharegpt
    fields: dict[str, str] | None = None  # alpaca's instruction / input / response, to convert without loss
    format: str | None = None  # the format of the file it came from


def read_rows(path: str | Path) -> Iterator[Row]:
    """Yield the rows of a JSONL / JSON / parquet file, or of a `datasets` name (its train split).

    Whatever the bytes, this yields rows or raises DataError: a malformed JSONL line is yielded as a DataError
    row (so `on_bad_rows` decides), a file that cannot be read at all is raised.
    """
    p = Path(path)
    if not p.exists():
        if str(path).endswith((".jsonl", ".json", ".parquet")) or str(path).startswith((".", "/", "~")):
            raise DataError(str(path), None, None, "file not found")
        yield from _read_hub(str(path))
        return
    if p.is_dir():
        raise DataError(str(p), None, None, "is a directory; give the data files (comma-separated)")
    if p.suffix == ".parquet":
        yield from _read_parquet(p)
        return
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(str(p), None, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(p), line, None, "not valid UTF-8") from None
    if p.suffix == ".json":
        # A .json file is one JSON value (an array of rows, or one row), or JSONL under another name.
        try:
            whole = _loads(text)
        except ValueError as e:
            if text.lstrip().startswith("["):
                raise DataError(str(p), getattr(e, "lineno", None), None, f"malformed JSON: {_why(e)}") from None
        else:
            for i, item in enumerate(whole if isinstance(whole, list) else [whole], start=1):
                yield Row(str(p), i, item)
            return
    # Only "\n" ends a line: str.splitlines() would also split inside a JSON string holding U+2028 or U+0085.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = _loads(line)
        except ValueError as e:  # a bad line is a bad row: `on_bad_rows` decides
            data = DataError(str(p), i, None, f"malformed JSON: {_why(e)}")
        yield Row(str(p), i, data)


def _loads(text: str) -> Any:
    """json.loads, with the non-JSONDecodeError failures (too deep, a number too long) as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _why(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} (line {e.lineno}, column {e.colno})" if e.lineno > 1 else f"{e.msg} (column {e.colno})"
    return str(e)


def _read_parquet(p: Path) -> Iterator[Row]:
    # pyarrow reads parquet without unpickling anything; any failure of a damaged file becomes one DataError.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches()
        line = 0
        for batch in batches:
            for item in batch.to_pylist():
                line += 1
                yield Row(str(p), line, item)
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(str(p), None, None, f"cannot read as parquet: {why}") from None


def _read_hub(name: str) -> Iterator[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, ... : one clear line, no traceback
        raise DataError(name, None, None, f"not a file, and loading it as a datasets name failed: {e}") from None
    for i, item in enumerate(ds, start=1):
        yield Row(name, i, item)


def detect_format(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "instruction" in data and ("response" in data or "output" in data):
        return "alpaca"
    return None


def _text(row: Row, data: dict, field: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if field not in data or data[field] is None:
        if required:
            raise DataError(row.source, row.line, field, "missing" if field not in data else "null; expected a string")
        return ""
    value = data[field]
    if not isinstance(value, str):
        raise DataError(row.source, row.line, field, f"expected a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise DataError(row.source, row.line, field, "empty")
    return _encodable(row, field, value)


def _encodable(row: Row, field: str, value: str) -> str:
    # JSON may spell a lone UTF-16 surrogate ("\\ud800"); no tokenizer or UTF-8 writer accepts one.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            row.source, row.line, field, f"holds an unpaired surrogate {value[e.start]!r} at character {e.start}"
        ) from None
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _turns(row: Row, turns: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]):
    if not isinstance(turns, list) or not turns:
        raise DataError(row.source, row.line, field, "expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(row.source, row.line, where, "expected an object")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DataError(
                row.source,
                row.line,
                f"{where}.{role_key}",
                f"unknown role {_short(role)}; expected one of {', '.join(roles)}",
            )
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(
                row.source,
                row.line,
                f"{where}.{content_key}",
                "missing"
                if content_key not in turn
                else "null; expected a string"
                if content is None
                else f"expected a string, got {type(content).__name__}",
            )
        out.append({"role": roles[role], "content": _encodable(row, f"{where}.{content_key}", content)})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in out):
        raise DataError(row.source, row.line, field, "no non-empty assistant turn to train on")
    if out[0]["role"] == "assistant":  # no template renders an empty prompt (transformers refuses one)
        raise DataError(
            row.source,
            row.line,
            f"{field}[0].{role_key}",
            "the conversation starts with an assistant turn; give a user or system turn before it",
        )
    return out


def to_example(row: Row, fmt: str) -> Example:
    """Validate one row of a file of format `fmt` and turn it into canonical form."""
    data = row.data
    if isinstance(data, DataError):
        raise data
    if not isinstance(data, dict):
        raise DataError(row.source, row.line, None, f"expected a JSON object, got {type(data).__name__}")
    if detect_format(data) != fmt:
        missing = next((f for f in REQUIRED_FIELDS[fmt] if not any(k in data for k in f.split("|"))), None)
        if missing:  # name the field, as every other row error does
            name = " or ".join(missing.split("|"))  # alpaca: 'response or output', either is accepted
            raise DataError(
                row.source, row.line, name, f"missing (the file's format is {fmt!r}; this row has keys: {_keys(data)})"
            )
        raise DataError(
            row.source, row.line, None, f"row does not match the file's format {fmt!r} (keys: {_keys(data)})"
        )
    if fmt == "alpaca":
        instruction = _text(row, data, "instruction")
        extra = _text(row, data, "input", required=False)
        response_field = "response" if "response" in data else "output"
        response = _text(row, data, response_field)
        prompt = (ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT).format(
            instruction=instruction, input=extra
        )
        ex = Example(row.source, row.line, segments=[(prompt, False), (response, True)])
        ex.messages = [
            {"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")},
            {"role": "assistant", "content": response},
        ]
        ex.fields = {"instruction": instruction, "input": extra, "response": response}
        ex.format = fmt
        return ex
    if fmt == "prompt_completion":
        prompt = _text(row, data, "prompt", allow_empty=True)
        completion = _text(row, data, "completion")
        ex = Example(row.source, row.line, segments=[(prompt, False), (completion, True)])
        ex.messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        ex.format = fmt
        return ex
    if fmt == "messages":
        roles = {r: r for r in ROLES}
        return Example(
            row.source,
            row.line,
            messages=_turns(row, data["messages"], "messages", "role", "content", roles),
            format=fmt,
        )
    return Example(
        row.source,
        row.line,
        messages=_turns(row, data["conversations"], "conversations", "from", "value", SHAREGPT_ROLES),
        format=fmt,
    )


def load_examples(paths: str | Iterable[str], on_bad_rows: str = "error") -> tuple[list[Example], list[DataError]]:
    """Read and validate every row of every file (comma-separated string or list).

    With on_bad_rows="skip", bad rows are returned as errors instead of raised; a file whose format cannot be
    detected, or that holds no valid row, is always an error.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ConfigError(f"on_bad_rows: unknown value {on_bad_rows!r}; expected 'error' or 'skip'")
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    examples, skipped = [], []
    for path in paths:
        fmt, count, undetected = None, 0, None
        for row in read_rows(path):
            try:
                if isinstance(row.data, DataError):
                    raise row.data
                if fmt is None:
                    fmt = detect_format(row.data)
                    if fmt is None:  # when skipping, a later row may still reveal the file's format
                        error = _undetectable(row)
                        undetected = undetected or error
                        raise error
                examples.append(to_example(row, fmt))
                count += 1
            except DataError as e:
                if on_bad_rows == "error":
                    raise
                skipped.append(e)
        if count == 0:
            raise undetected or DataError(str(path), None, None, "no valid examples")
    return examples, skipped


def _keys(data: dict) -> str:
    keys = [k if len(k) <= 30 else k[:27] + "..." for k in sorted(data)[:10]]
    return ", ".join(keys) + (", ..." if len(data) > 10 else "") or "none"


def _undetectable(row: Row) -> DataError:
    keys = _keys(row.data) if isinstance(row.data, dict) else type(row.data).__name__
    return DataError(
        row.source,
        row.line,
        None,
        f"cannot detect the data format from this row (keys: {keys}); "
        "expected instruction+response, messages, prompt+completion, or conversations",
    )


def example_to_row(example: Example, fmt: str) -> dict[str, Any]:
    """One example as a row of format `fmt`, checked by reading it back as `asft train` would.

    messages / sharegpt keep every turn. alpaca / prompt_completion hold one exchange: a conversation with more
    turns is a DataError naming its file and line; leading system turns are prepended to the prompt, separated by
    a blank line, so nothing is dropped. Templates are not written into the text: the Alpaca wrapper is applied at
    training time (`asft train --template alpaca`), so alpaca -> prompt_completion gives prompt = instruction
    (+ blank line + input).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format: unknown value {fmt!r}; expected one of {', '.join(FORMATS)}")
    turns = example.messages
    if fmt == "messages":
        row = {"messages": [{"role": t["role"], "content": t["content"]} for t in turns]}
    elif fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        row = {"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in turns]}
    elif fmt == "alpaca" and example.fields:  # alpaca to alpaca keeps `input` apart
        f = example.fields
        row = {
            "instruction": f["instruction"],
            **({"input": f["input"]} if f["input"] else {}),
            "response": f["response"],
        }
    else:
        roles = [t["role"] for t in turns]
        k = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
        if roles[k:] != ["user", "assistant"]:
            raise DataError(
                example.source,
                example.line,
                conversation_field(example),
                f"a conversation with turns ({', '.join(roles)}) cannot be written as {fmt}, which holds "
                "one user turn and one assistant turn; convert it to messages or sharegpt",
            )
        prompt = "\n\n".join(t["content"] for t in turns[: k + 1])
        response = turns[k + 1]["content"]
        row = (
            {"instruction": prompt, "response": response}
            if fmt == "alpaca"
            else {"prompt": prompt, "completion": response}
        )
    try:
        to_example(Row(example.source, example.line, row), fmt)
    except DataError as e:  # e.g. an empty prompt becomes an empty (refused) alpaca instruction
        raise DataError(example.source, example.line, e.field, f"cannot be written as {fmt}: {e.message}") from None
    return row
