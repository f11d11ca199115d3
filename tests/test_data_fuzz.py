"""Property: whatever a data file holds, the loader returns valid examples or raises DataError, nothing else;
and every example it returns tokenizes and converts without any other exception."""

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asft.data import FORMATS, ROLES, DataError, Example, example_to_row, load_examples, tokenize

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Lone surrogates included: JSON can spell them ("\ud800") though no UTF-8 writer or tokenizer accepts them.
text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", " ", "\n", "\u2028", "\x85", "\ufeff", "<|im_end|>", "a\u0000b", "user", "assistant", "gpt", "human"]
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text | st.just(10**400)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)
KEYS = [
    "instruction",
    "input",
    "response",
    "output",
    "prompt",
    "completion",
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
]
roles = st.sampled_from(list(ROLES) + ["human", "gpt", "robot"]) | json_values
turn = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), roles | text, max_size=3)
field_value = text | json_values | st.lists(turn, max_size=4)
value = st.one_of(st.text(max_size=20), st.text(max_size=20), text, json_values)  # many rows are valid


def conversation(role_key, content_key):
    turns = st.fixed_dictionaries({role_key: roles, content_key: value}) | turn
    return st.lists(turns, min_size=1, max_size=4) | json_values


FORMAT_ROWS = {
    "alpaca": st.fixed_dictionaries({"instruction": value, "response": value}, optional={"input": value})
    | st.fixed_dictionaries({"instruction": value, "output": value}),
    "prompt_completion": st.fixed_dictionaries({"prompt": value, "completion": value}),
    "messages": st.fixed_dictionaries({"messages": conversation("role", "content")}),
    "sharegpt": st.fixed_dictionaries({"conversations": conversation("from", "value")}),
}
random_rows = st.dictionaries(st.sampled_from(KEYS) | text, field_value, max_size=4) | json_values


@st.composite
def files(draw):
    """A file's bytes and suffix: JSONL (with stray garbage), a JSON array or object, or raw bytes."""
    kind = draw(st.sampled_from(["jsonl", "json-array", "json-one", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(st.sampled_from([".jsonl", ".json", ".parquet"]))
    plausible = FORMAT_ROWS[draw(st.sampled_from(FORMATS))]
    row = st.integers(0, 3).flatmap(lambda i: random_rows if i == 3 else plausible)  # 3 in 4 plausible
    items = draw(st.lists(row, min_size=1, max_size=5))
    ascii_only = draw(st.booleans())

    def dump(value):  # as other tools write JSON: escaped or raw unicode, NaN and Infinity literals allowed
        return json.dumps(value, ensure_ascii=ascii_only)

    if kind == "jsonl":
        lines = [dump(r) for r in items] + draw(
            st.lists(st.sampled_from(["{", "", "  ", "[1, 2]", "NaN", "1" * 5000, "[" * 5000]), max_size=2)
        )
        body = draw(st.sampled_from(["\n", "\r\n"])).join(draw(st.permutations(lines)))
        suffix = draw(st.sampled_from([".jsonl", ".json"]))
    else:
        body, suffix = dump(items if kind == "json-array" else items[0]), ".json"
    bom = draw(st.sampled_from(["", "\ufeff"]))
    return (bom + body).encode("utf-8", "surrogatepass"), suffix


def check_example(ex, tokenizer):
    assert isinstance(ex, Example)
    assert ex.messages and any(t["role"] == "assistant" and t["content"].strip() for t in ex.messages)
    for t in ex.messages:
        assert t["role"] in ROLES and isinstance(t["content"], str)
        t["content"].encode("utf-8")
    item = tokenize(ex, "chat", tokenizer, max_length=64)  # must not raise
    assert len(item["input_ids"]) == len(item["labels"])
    for template in ("alpaca", "none"):
        try:
            tokenize(ex, template, tokenizer, max_length=64)
        except DataError:  # a multi-turn conversation needs the chat template
            pass
    for fmt in FORMATS:
        try:
            json.dumps(example_to_row(ex, fmt), ensure_ascii=False).encode("utf-8")
        except DataError:  # e.g. a multi-turn conversation as alpaca
            pass


def load_only_examples_or_data_error(path, tokenizer):
    for on_bad_rows in ("error", "skip"):
        try:
            examples, skipped = load_examples(str(path), on_bad_rows)
        except DataError as e:
            assert str(path) in str(e)
            continue
        assert examples and all(isinstance(e, DataError) for e in skipped)
        for ex in examples:
            check_example(ex, tokenizer)


@SETTINGS
@given(files())
def test_any_file_gives_examples_or_data_error(tmp_path_factory, tokenizer, file):
    body, suffix = file
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / f"data{suffix}"
    path.write_bytes(body)
    load_only_examples_or_data_error(path, tokenizer)


@SETTINGS
@given(st.data())
def test_damaged_parquet_is_a_data_error(tmp_path_factory, tokenizer, data):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"}])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    body = bytearray(buffer.getvalue())
    cut = data.draw(st.integers(0, len(body)))
    for _ in range(data.draw(st.integers(0, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("parquet", numbered=True) / "data.parquet"
    path.write_bytes(bytes(body[:cut] if data.draw(st.booleans()) else body))
    load_only_examples_or_data_error(path, tokenizer)
