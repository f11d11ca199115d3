"""asft.data: formats, templates, response-only labels, and errors that name file, line and field."""

import json

import pytest

from asft.data import ALPACA_PROMPT, DataError, build_dataset, load_examples, render, resolve_template, tokenize
from conftest import write_jsonl


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tokenizer, item):
    return tokenizer.decode([t for t, label in zip(item["input_ids"], item["labels"]) if label != -100])


def test_alpaca_rows_train_only_the_response_with_eos(tokenizer, tmp_path):
    f = write(tmp_path / "a.jsonl", [{"instruction": "what is 2 + 2", "response": "4"}])
    (ex,), _ = load_examples(str(f))
    item = tokenize(ex, "alpaca", tokenizer)
    assert trained_text(tokenizer, item) == "4" + tokenizer.eos_token
    assert tokenizer.decode(item["input_ids"]).startswith(ALPACA_PROMPT.format(instruction="what is 2 + 2"))


def test_alpaca_input_and_output_fields(tokenizer, tmp_path):
    f = write(tmp_path / "a.jsonl", [{"instruction": "sum", "input": "2 3", "output": "5"}])
    (ex,), _ = load_examples(str(f))
    segments = render(ex, "alpaca", tokenizer)
    assert "### Input:\n2 3" in segments[0][0] and segments[-1] == ("5" + tokenizer.eos_token, True)


def test_chat_messages_train_every_assistant_turn(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "sum 2 3"},
        {"role": "assistant", "content": "5"},
    ]
    f = write(tmp_path / "c.jsonl", [{"messages": messages}])
    (ex,), _ = load_examples(str(f))
    item = tokenize(ex, "chat", tokenizer)
    assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(tokenizer, item) == "hello<|im_end|>\n5<|im_end|>\n"


def test_sharegpt_and_prompt_completion(tokenizer, tmp_path):
    f1 = write(
        tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    )
    f2 = write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    examples, _ = load_examples(f"{f1},{f2}")
    assert trained_text(tokenizer, tokenize(examples[0], "chat", tokenizer)) == "yo<|im_end|>\n"
    item = tokenize(examples[1], "none", tokenizer)
    assert tokenizer.decode(item["input_ids"]) == "2+2=4" + tokenizer.eos_token


def test_auto_template_follows_the_tokenizer(tokenizer):
    assert resolve_template("auto", tokenizer) == "chat"


@pytest.mark.parametrize(
    "rows,line,field",
    [
        ([{"instruction": "a", "response": "b"}, '{"instruction": "a", "response": '], 2, None),
        ([{"instruction": "a", "response": "b"}, {"instruction": "a"}], 2, "response or output"),  # either is accepted
        ([{"instruction": "a", "output": "b"}, {"output": "b"}], 2, "instruction"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], 2, "completion"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"msgs": []}],
            2,
            "messages",
        ),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, {"conv": []}],
            2,
            "conversations",
        ),
        ([{"instruction": "a", "response": "b"}, {"instruction": "", "response": "b"}], 2, "instruction"),
        ([{"instruction": "a", "response": "b"}, {"instruction": "a", "response": 3}], 2, "response"),
        (
            [
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                {"messages": [{"role": "robot", "content": "a"}]},
            ],
            2,
            "messages[0].role",
        ),
        ([{"messages": [{"role": "user", "content": "a"}]}], 1, "messages"),  # no assistant turn
        (
            [{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}],
            1,
            "messages[0].content",
        ),
        ([{"question": "a"}], 1, None),  # unknown format
        (["[1, 2]"], 1, None),
    ],
)
def test_bad_rows_are_located(tmp_path, rows, line, field):
    f = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(str(f))
    assert err.value.source == str(f) and err.value.line == line and err.value.field == field
    assert f"{f}:{line}" in str(err.value)


def test_skip_bad_rows_reports_them(tokenizer, tmp_path):
    f = write(
        tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}, "not json", {"instruction": "c", "response": "d"}]
    )
    messages = []
    ds = build_dataset(str(f), tokenizer, template="alpaca", on_bad_rows="skip", log=messages.append)
    assert len(ds) == 2 and f"{f}:2" in messages[0]


def test_prompt_longer_than_max_length_is_a_bad_row(tokenizer, tmp_path):
    f = write(tmp_path / "d.jsonl", [{"instruction": "a long instruction " * 20, "response": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:1.*max_length"):
        build_dataset(str(f), tokenizer, template="alpaca", max_length=16)


def test_missing_file_and_json_array(tokenizer, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([{"prompt": "p", "completion": "c"}, {"prompt": "p"}]))
    with pytest.raises(DataError) as err:
        load_examples(str(f))
    assert err.value.line == 2


def test_row_errors_name_the_accepted_field_and_a_null(tmp_path):

    from asft.data import DataError, load_examples

    def error(rows):
        path = tmp_path / "d.jsonl"
        write_jsonl(path, rows)
        with pytest.raises(DataError) as err:
            examples, _ = load_examples(str(path), "error")
        return str(err.value)

    assert "field 'response or output': missing" in error([{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    null = error([{"instruction": "a", "response": "b"}, {"instruction": "a", "response": None}])
    assert "field 'response': null; expected a string" in null
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]
    assert "field 'messages[1].content': null; expected a string" in error([{"messages": turns}])
