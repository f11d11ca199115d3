"""Every `asft ...` command that README.md shows parses (nothing is trained or loaded): a documented command can
never again fail with `expected one argument`."""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    """Shell commands of the README's code blocks (continuation lines joined) and its inline `asft ...` spans."""
    text = README.read_text()
    found, blocks, inside, in_block = [], [], None, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if in_block and inside is not None:
                blocks.append("".join(inside))
            in_block = not in_block
            inside = [] if in_block and line.strip() in ("```", "```bash", "```sh") else None
            continue
        if inside is not None:
            inside.append(line)
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", command).strip()
            if "asft" in command and not command.startswith("#"):
                found.append(command)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [m for m in re.findall(r"`(asft [^`]+)`", prose) if len(m.split()) > 3]  # not mere mentions
    return found


def _asft_argv(command: str) -> list[str] | None:
    """The arguments after `asft` / `-m asft.cli` / `--module asft.cli` in a command line (shell expansions replaced
    by plain values); None for commands that only mention asft or hold `...` placeholders."""
    command = re.sub(r"\$\(\(.*?\)\)", "16", command)
    command = re.sub(r"\$\(asft config-path (\w+)\)", r"\1", command)
    command = re.sub(r"\$\{?\w+\}?", "1", command)
    tokens = shlex.split(command)
    if tokens[:2] == ["srun", "bash"]:
        tokens = shlex.split(tokens[-1])
    for i, token in enumerate(tokens):
        if token == "asft" or (token == "asft.cli" and tokens[i - 1] in ("-m", "--module")):
            argv = tokens[i + 1 :]
            argv = argv[: argv.index("&&")] if "&&" in argv else argv
            return None if "..." in argv or any(a in ("[train", "COMMAND", "NAME") for a in argv) else argv
    return None


def _all():
    return [(c, argv) for c in _commands() if (argv := _asft_argv(c)) is not None]


COMMANDS = _all()


def parse(argv: list[str]) -> None:
    from asft.cli.data import _parser as data_parser
    from asft.cli.launch import launch_argv, resolve_preset
    from asft.cli.merge import parser as merge_lora_parser
    from asft.cli.train import parse_train_args
    from asft.evaluation.driver import build_parser as eval_parser

    command, rest = argv[0], argv[1:]
    if command == "train":
        if rest != ["--help"]:
            parse_train_args(rest)
    elif command == "launch":
        from accelerate.commands.launch import launch_command_parser

        launch_command_parser().parse_args(launch_argv(rest))
        parse_train_args(rest[rest.index("train") + 1 :])
    elif command == "eval":
        eval_parser().parse_args(rest)
    elif command == "data":
        data_parser().parse_args(rest)
    elif command == "merge-lora":
        merge_lora_parser().parse_args(rest)
    elif command == "config-path":
        resolve_preset(rest[0], None, "config-path")
    elif command == "quickstart":
        assert rest == []
    elif command == "cache-reference":
        from asft.cli.cache import _parser as cache_parser

        cache_parser().parse_args(rest)
    elif command == "rl":
        from asft.cli.rl import parse_rl_args

        parse_rl_args(rest)
    elif command in ("plot", "compare"):
        from asft.cli import report as reporting

        getattr(reporting, f"{command}_parser")().parse_args(rest)
    else:
        pytest.fail(f"README shows an asft command this test cannot parse: {command}")


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 10 and any(argv[0] == "train" for _, argv in COMMANDS)


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[c[:60] for c, _ in COMMANDS])
def test_readme_command_parses(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # examples/asft.yaml is read from the repository
    parse(argv)
