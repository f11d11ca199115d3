"""`asft data download | convert | inspect`: file selection, no overwriting, fast offline failure, round trips,
token statistics and marked trained tokens."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from asft.cli import data as data_cli
from asft.cli.data import main, marked, percentile, select_files
from asft.data import DataError, load_examples, tokenize, write_jsonl


def write(path, rows):
    write_jsonl(path, rows, overwrite=True)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("command", [[], ["download"], ["convert"], ["inspect"]])
def test_help_describes_every_flag(command, capsys):
    assert main(command + ["--help"]) == 0
    text = capsys.readouterr().out
    parser = data_cli._parser()
    if command:
        parser = parser._subparsers._group_actions[0].choices[command[0]]
    for action in parser._actions:
        assert action.help, action.dest
        assert all(option in text for option in action.option_strings)


# ---------------------------------------------------------------------------------------------------- download


@pytest.mark.parametrize(
    "env,entry",
    [
        ({"HF_HUB_OFFLINE": "1"}, "from asft.cli import main"),  # the real entry point: no traceback on the way
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "from asft.cli.data import main"),  # nothing listens there
    ],
    ids=["offline-flag", "unreachable"],
)
def test_download_offline_fails_at_once_with_one_line(env, entry, tmp_path):
    # A fresh process: huggingface_hub reads these variables when imported.
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(env, HF_HOME=str(tmp_path / "hf"))
    argv = (["data"] if entry == "from asft.cli import main" else []) + [
        "download",
        "--output_dir",
        str(tmp_path / "data"),
    ]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; {entry}; sys.exit(main({argv!r}))"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert ("offline mode is on" if "HF_HUB_OFFLINE" in env else "cannot reach http://127.0.0.1:9") in result.stderr
    assert seconds < 30 and not (tmp_path / "data").exists()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The Hub as a local folder: listing it and copying a file into a cache, as hf_hub_download would."""
    import huggingface_hub

    remote = tmp_path / "remote"
    files = {
        "README.md": "# ASFT\n",
        "numina_cot_10k.jsonl": '{"instruction": "a", "response": "b"}\n',
        "data/magpie10k.jsonl": '{"instruction": "c", "response": "d"}\n',
        "mix.jsonl": "{}\n",
        "mix.parquet": "PAR1",
    }
    for name, text in files.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_text(text)
    calls = []

    def download(repo_id, filename, *, repo_type=None, revision=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        cached = tmp_path / "cache" / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote / filename, cached)
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: sorted(files))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(data_cli, "check_online", lambda: None)
    return remote, calls


def test_download_picks_files_and_never_overwrites_a_different_one(fake_hub, tmp_path, capsys):
    remote, calls = fake_hub
    out = tmp_path / "data"
    args = ["download", "--files", "numina_cot_10k,magpie10k.jsonl", "--output_dir", str(out)]
    assert main(args) == 0
    assert calls == [
        ("chichi56/ASFT", "numina_cot_10k.jsonl", "dataset"),
        ("chichi56/ASFT", "data/magpie10k.jsonl", "dataset"),
    ]
    assert (out / "magpie10k.jsonl").read_text() == (remote / "data/magpie10k.jsonl").read_text()
    assert main(args) == 0 and "up to date" in capsys.readouterr().out

    (out / "numina_cot_10k.jsonl").write_text("my own edits\n")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "numina_cot_10k.jsonl").read_text() == "my own edits\n"
    assert main(args + ["--overwrite"]) == 0
    assert (out / "numina_cot_10k.jsonl").read_text() == (remote / "numina_cot_10k.jsonl").read_text()
    assert no_temp_files(out)


def test_download_default_unknown_and_ambiguous_names(fake_hub, tmp_path, capsys):
    _, calls = fake_hub
    assert main(["download", "--output_dir", str(tmp_path / "d")]) == 0  # the paper's sets the repo holds
    assert [c[1] for c in calls] == ["numina_cot_10k.jsonl", "data/magpie10k.jsonl"]
    assert "left out: numina_cot_30k" in capsys.readouterr().out
    assert main(["download", "--files", "nope", "--output_dir", str(tmp_path / "d")]) == 2
    assert "'nope' is not in chichi56/ASFT; its data files: data/magpie10k.jsonl" in capsys.readouterr().err
    assert main(["download", "--files", "mix", "--output_dir", str(tmp_path / "d")]) == 2
    assert "several files" in capsys.readouterr().err
    assert select_files(["mix.jsonl", "mix.parquet"], ["mix.parquet"]) == ["mix.parquet"]
    assert select_files(["data/x.jsonl", "y.json"], ["data/x", "y"]) == ["data/x.jsonl", "y.json"]
    with pytest.raises(data_cli.DownloadError, match="several picked files are named"):
        select_files(["a/x.jsonl", "b/x.jsonl"], ["a/x.jsonl", "b/x.jsonl"])


def test_download_hub_errors_are_one_line(fake_hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def refuse(repo_id, **kwargs):
        raise ConnectionError("connection reset\nwith details")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", refuse)
    assert main(["download", "--output_dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip() == "asft data download: error: cannot list the files of chichi56/ASFT: ConnectionError: "
        "connection reset"
    )


# ----------------------------------------------------------------------------------------------------- convert

SINGLE = [{"instruction": "what is 2 + 2", "response": "4"}, {"instruction": "sum", "input": "2 3", "response": "5"}]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "sum 2 3"},
            {"role": "assistant", "content": "5"},
        ]
    },
]


def chat_tokens(path, tokenizer):
    examples, _ = load_examples(str(path))
    return [tokenize(ex, "chat", tokenizer) for ex in examples]


@pytest.mark.parametrize(
    "chain",
    [["messages", "sharegpt", "prompt_completion", "alpaca"], ["prompt_completion", "sharegpt", "messages", "alpaca"]],
)
def test_convert_round_trip_keeps_what_is_trained(chain, tokenizer, tmp_path):
    source = write(tmp_path / "in.jsonl", SINGLE)
    expected, path = chat_tokens(source, tokenizer), source
    for i, fmt in enumerate(chain):
        out = tmp_path / f"{i}-{fmt}.jsonl"
        assert main(["convert", str(path), str(out), "--to", fmt]) == 0
        assert chat_tokens(out, tokenizer) == expected, fmt
        path = out
    # Back to alpaca through a conversation, `input` is part of the instruction; alpaca to alpaca keeps it apart.
    assert read(path)[1] == {"instruction": "sum\n\n2 3", "response": "5"}
    assert main(["convert", str(source), str(tmp_path / "same.jsonl"), "--to", "alpaca"]) == 0
    assert read(tmp_path / "same.jsonl") == SINGLE


def test_convert_conversations(tokenizer, tmp_path, capsys):
    source = write(tmp_path / "chat.jsonl", CHAT)
    assert main(["convert", str(source), str(tmp_path / "s.jsonl"), "--to", "sharegpt"]) == 0
    assert read(tmp_path / "s.jsonl")[1]["conversations"][2] == {"from": "human", "value": "sum 2 3"}
    assert main(["convert", str(tmp_path / "s.jsonl"), str(tmp_path / "m.jsonl"), "--to", "messages"]) == 0
    assert read(tmp_path / "m.jsonl") == CHAT

    assert main(["convert", str(source), str(tmp_path / "a.jsonl"), "--to", "alpaca"]) == 2
    err = capsys.readouterr().err
    assert f"{source}:2: field 'messages': a conversation with turns (user, assistant, user, assistant)" in err
    assert not (tmp_path / "a.jsonl").exists()
    assert main(["convert", str(source), str(tmp_path / "a.jsonl"), "--to", "alpaca", "--on_bad_rows", "skip"]) == 0
    assert f"Skipped 1 bad row(s): {source}:2" in capsys.readouterr().out
    assert read(tmp_path / "a.jsonl") == [{"instruction": "be brief\n\nhi", "response": "hello"}]  # system folded in


def test_convert_refuses_to_overwrite_and_writes_atomically(tmp_path, capsys):
    source = write(tmp_path / "in.jsonl", SINGLE)
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    assert main(["convert", str(source), str(out), "--to", "messages"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert main(["convert", str(source), str(out), "--to", "messages", "--overwrite"]) == 0
    assert len(read(out)) == 2

    def rows():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(out, rows(), overwrite=True)
    assert len(read(out)) == 2 and no_temp_files(tmp_path)  # the old file, whole; no temporary left behind


def test_convert_empty_prompt_cannot_become_alpaca(tmp_path, capsys):
    source = write(tmp_path / "pc.jsonl", [{"prompt": "", "completion": "x"}])
    assert main(["convert", str(source), str(tmp_path / "a.jsonl"), "--to", "alpaca"]) == 2
    assert f"{source}:1: field 'instruction': cannot be written as alpaca: empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """A model folder holding only a tokenizer and a config: inspect never loads weights."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_inspect_counts_lengths_truncation_and_marks(tokenizer_dir, tokenizer, tmp_path, capsys):
    rows = [{"instruction": f"what is {i} + {i}", "response": f"The answer is {2 * i}"} for i in range(8)]
    rows[3] = {"instruction": "a long instruction " * 30, "response": "b"}  # its prompt alone fills max_length
    rows[5] = {"instruction": "q", "response": "the quick brown fox " * 30}  # its response is cut
    source = write(tmp_path / "d.jsonl", rows)
    assert (
        main(["inspect", str(source), "--model", str(tokenizer_dir), "--template", "alpaca", "--max_length", "100"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"{source}: 8 examples (alpaca)" in out
    assert "p50" in out and "p99" in out and "response (trained)" in out
    assert "1 of 8 examples truncated" in out and "1 dropped" in out and f"dropped: {source}:4" in out
    shown = out.split(f"--- {source}:1:")[1]
    assert f"### Response:⟦The answer is 0{tokenizer.eos_token}⟧" in shown  # the paper's prompt: no newline


def test_inspect_bad_rows_and_bad_model(tokenizer_dir, tmp_path, capsys):
    source = write(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "a", "response": 3}])
    assert main(["inspect", str(source), "--model", str(tokenizer_dir)]) == 2
    assert f"{source}:2: field 'response': expected a string, got int" in capsys.readouterr().err
    assert main(["inspect", str(source), "--model", str(tokenizer_dir), "--on_bad_rows", "skip"]) == 0
    assert f"Skipped 1 bad row(s): {source}:2" in capsys.readouterr().out
    assert main(["inspect", str(source), "--model", str(tmp_path / "nope")]) == 2  # data is checked first
    assert f"{source}:2" in capsys.readouterr().err
    assert main(["inspect", str(source), "--model", str(tmp_path / "nope"), "--on_bad_rows", "skip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asft data inspect: error: model: ") and len(err.strip().splitlines()) == 1


def test_marks_and_percentiles(tokenizer):
    prompt, response = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("ab", "cd"))
    ids, labels = prompt + response, [-100] * len(prompt) + response
    assert marked(ids, labels, tokenizer) == "ab⟦cd⟧"
    assert marked(ids, labels, tokenizer, color=True) == "ab\x1b[1;32mcd\x1b[0m"
    escape = tokenizer("\x1b[2J\r", add_special_tokens=False)["input_ids"]  # from the data: shown, not obeyed
    assert marked(escape, escape, tokenizer) == "⟦\\x1b[2J\\r⟧"
    assert [percentile(list(range(1, 101)), p) for p in (50, 90, 99)] == [50, 90, 99]
    assert percentile([7], 99) == 7


def test_data_errors_keep_their_type(tmp_path):
    with pytest.raises(DataError):
        load_examples(str(tmp_path))  # a folder is not a data file


# ---------------------------------------------------------------------------------------- issue 24, item 10


@pytest.mark.parametrize("name", ["out.parquet", "out.json", "out.jsonl"])
def test_convert_writes_the_format_its_name_says(tmp_path, name):
    source = write(tmp_path / "in.jsonl", SINGLE)
    out = tmp_path / name
    assert main(["convert", str(source), str(out), "--to", "messages"]) == 0
    assert len(load_examples(str(out))[0]) == 2  # read back by the loader, as its suffix says
    if name.endswith(".parquet"):
        assert out.read_bytes()[:4] == b"PAR1"


def test_inspect_refuses_a_negative_show(tokenizer_dir, tmp_path, capsys):
    source = write(tmp_path / "d.jsonl", SINGLE)
    assert main(["inspect", str(source), "--model", str(tokenizer_dir), "--show", "-1"]) == 2
    assert "--show: must be >= 0" in capsys.readouterr().err
