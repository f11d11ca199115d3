"""`asft eval --task math`: answer extraction, math-verify grading (also off the main thread), the file formats,
and a forced model end to end (greedy, sampled, resume refusal)."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from asft.cli.eval import main
from asft.evaluation import EvalDataError
from asft.evaluation.math import extract_answer, is_correct, load
from conftest import build_tokenizer, eval_argv
from test_eval_medical import save_forced, write_jsonl

EQUIVALENT = [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("so we get \\boxed{\\dfrac12}", "\\frac{1}{2}"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("Therefore the answer is 10.0", "10"),
    ("She has 1,000 apples in total.", "1000"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),
    ("The final answer is $90^\\circ$.", "90"),
    ("\\boxed{(A)}", "A"),
]
NOT_EQUIVALENT = [
    ("\\boxed{3}", "4"),
    ("\\boxed{(1,2)}", "(2,1)"),
    ("\\boxed{[1,2)}", "[1,2]"),
    ("\\boxed{3.14159}", "\\pi"),
    ("The answer is 12, not 21", "21"),
    ("no number here", "5"),
    ("\\boxed{5", "5x"),
]


@pytest.mark.parametrize("completion, gold", EQUIVALENT)
def test_equivalent_answers(completion, gold):
    assert is_correct(completion, gold)


@pytest.mark.parametrize("completion, gold", NOT_EQUIVALENT)
def test_non_equivalent_answers(completion, gold):
    assert not is_correct(completion, gold)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} done", "\\frac{a}{b^{2}}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 12$", "12"),
        ("So the answer is: $-3$.\nCheck: ok", "-3"),
        ("2 apples and 3 pears make 5", "5"),
        ("ratio 3/4", "3/4"),
        ("cut off \\boxed{\\frac{1}{2", "2"),  # an unclosed box falls back to the last number
        ("nothing", ""),
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


def test_grading_works_off_the_main_thread():
    # math-verify's SIGALRM timeout raises in threads; is_correct must fall back to no timeout there.
    cases = EQUIVALENT[:4] + NOT_EQUIVALENT[:3]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: (threading.current_thread() is threading.main_thread(), is_correct(*c)), cases))
    assert [ok for _, ok in got] == [True] * 4 + [False] * 3
    assert not any(main_thread for main_thread, _ in got)


def test_formats(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "How many?", "answer": "2 + 2 = 4\n#### 1,000"}])
    fmt, items = load(str(gsm))
    assert fmt == "gsm8k" and items[0].gold == "1000"
    assert items[0].prompt.startswith("How many?\nPlease reason step by step")
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}."}])
    assert load(str(math))[0] == "math" and load(str(math))[1][0].gold == "\\frac{1}{2}"
    olympiad = write_jsonl(tmp_path / "ob.jsonl", [{"question": "q", "final_answer": ["$3$"]}])
    assert load(str(olympiad))[1][0].gold == "3"
    aime = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "p", "answer": 204, "solution": "..."}])
    fmt, items = load(str(aime))
    assert fmt == "answer" and items[0].gold == "204"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"question": "q", "answer": "no final line"}, "answer"),
        ({"problem": "p", "solution": "no box"}, "solution"),
        ({"problem": "p", "answer": None}, "answer"),
        ({"problem": "", "answer": "1"}, "problem"),
    ],
)
def test_bad_rows_are_located(tmp_path, row, field):
    first = {"question": "q", "answer": "#### 1"} if "question" in row else {"problem": "p", "answer": "1"}
    if "solution" in row:
        first = {"problem": "p", "solution": "\\boxed{1}"}
    path = write_jsonl(tmp_path / "bad.jsonl", [first, row])
    with pytest.raises(EvalDataError) as e:
        load(str(path))
    assert (e.value.line, e.value.field) == (2, field)


@pytest.fixture(scope="module")
def answers_7(tmp_path_factory):
    """A model that answers "7" and stops: "7" follows any token, end-of-sequence follows "7"."""
    tok = build_tokenizer()
    seven = tok.encode("7")[0]
    return save_forced(tmp_path_factory.mktemp("answers-7"), seven, {seven: tok.eos_token_id})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("math-data")
    gsm = write_jsonl(
        d / "gsm8k.jsonl", [{"question": f"q{i}", "answer": f"... #### {g}"} for i, g in enumerate([7, 8, 7, 9])]
    )
    aime = write_jsonl(d / "aime.jsonl", [{"problem": "p", "answer": "7"}, {"problem": "p2", "answer": "007"}])
    return f"{gsm},{aime}"


def run_math(model, data, out, *extra):
    return main(eval_argv("math", model, data, out, *extra, max_new_tokens=4))


def test_forced_model_greedy_and_sampled(answers_7, data, tmp_path):
    out = tmp_path / "greedy"
    assert run_math(answers_7, data, out) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["datasets"]["gsm8k"] | {} == {
        **report["datasets"]["gsm8k"],
        "metric": "accuracy",
        "value": 0.5,
        "n": 4,
    }
    assert report["datasets"]["aime"]["value"] == 1.0  # "007" and "7" are the same number
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["completion"] for r in rows} == {"7"} and [r["correct"] for r in rows[:4]] == [True, False, True, False]

    sampled = tmp_path / "sampled"
    assert run_math(answers_7, data, sampled, "--num_samples", "2", "--temperature", "1.0") == 0
    gsm = json.loads((sampled / "results.json").read_text())["datasets"]["gsm8k"]
    assert (gsm["metric"], gsm["value"], gsm["pass@1"], gsm["pass@2"]) == ("avg@2", 0.5, 0.5, 0.5)
    lines = (sampled / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 12  # 6 problems x 2 samples


def test_rerun_with_other_settings_is_refused(answers_7, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_math(answers_7, data, out, "--limit", "1") == 0
    stored = (out / "generations.jsonl").read_text()
    assert run_math(answers_7, data, out, "--limit", "1", "--num_samples", "2", "--temperature", "0.7") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "temperature" in err and "--overwrite" in err
    assert (out / "generations.jsonl").read_text() == stored  # nothing lost
    # A larger --limit is the same run, continued: only the new items are generated.
    assert run_math(answers_7, data, out, "--limit", "2") == 0
    assert len((out / "generations.jsonl").read_text().splitlines()) == 4
    assert (
        run_math(answers_7, data, out, "--limit", "1", "--num_samples", "2", "--temperature", "0.7", "--overwrite") == 0
    )
    assert "removed" in capsys.readouterr().err


def test_sampling_needs_temperature(answers_7, data, tmp_path, capsys):
    assert run_math(answers_7, data, tmp_path / "o", "--num_samples", "3") == 2
    assert "--temperature" in capsys.readouterr().err
