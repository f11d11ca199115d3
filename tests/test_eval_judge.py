"""`asft eval --task judge` against a real OpenAI-compatible HTTP server on 127.0.0.1 run by the test: both
orders, retries on 429 / 5xx / malformed replies, failures reported, the API key never leaked."""

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asft.cli.eval import main
from asft.evaluation.judge import bootstrap_ci, judge_pairs, parse_verdict
from asft.evaluation.judge_http import JudgeClient, JudgeFatal
from asft.evaluation.store import JsonlLog
from conftest import build_tokenizer, cli_args
from test_eval_medical import save_forced

KEY = "sk-test-SECRET-7f3a9"
MAX_REQUESTS = 200  # the server refuses beyond this: a retry loop that never ends fails the test, not the CI


def _section(prompt, start, end):
    return re.search(re.escape(start) + r"\n(.*?)\n\n" + re.escape(end), prompt, re.S).group(1)


class JudgeHandler(BaseHTTPRequestHandler):
    """Prefers the output without "BAD"; when neither has it, always output 1 (a position-biased judge).

    Instructions steer failures: RATE answers 429 first, GARBLED sends broken JSON first, NULL a null message
    first, UNSURE gives a reply with no verdict first, FAIL always answers 500, ECHO answers 400 quoting the key,
    DENY answers 401.
    """

    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        instruction = _section(prompt, "## Instruction", "## Output 1")
        first = _section(prompt, "## Output 1", "## Output 2")
        with state["lock"]:
            state["requests"] += 1
            state["auth"].add(self.headers.get("Authorization"))
            state["seen"][prompt] += 1
            count, total = state["seen"][prompt], state["requests"]
        if total > MAX_REQUESTS or self.path != "/v1/chat/completions" or body.get("model") != "judge-1":
            return self._send(404 if total <= MAX_REQUESTS else 503, {"error": "no"})
        if "DENY" in instruction:
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        if "ECHO" in instruction:
            return self._send(400, {"error": {"message": f"bad request from key {KEY}"}})
        if "FAIL" in instruction:
            return self._send(500, {"error": "down"})
        if "RATE" in instruction and count == 1:
            return self._send(429, {"error": "slow down"})
        if "GARBLED" in instruction and count == 1:
            return self._send(200, b'{"choices": [{"mess')
        if "NULL" in instruction and count == 1:
            return self._send(200, {"choices": [{"message": {"role": "assistant", "content": None}}]})
        content = "I cannot decide." if "UNSURE" in instruction and count == 1 else ("2" if "BAD" in first else "1")
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    httpd.state = {"lock": threading.Lock(), "requests": 0, "auth": set(), "seen": Counter()}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def client(server, **kw):
    return JudgeClient(url(server), "judge-1", KEY, **{"max_retries": 2, "retry_delay": 0.001, **kw})


def test_both_orders_retries_and_failures(server, tmp_path):
    pairs = [
        ("RATE: win", "good answer", "BAD reference"),
        ("GARBLED", "BAD answer", "fine reference"),
        ("UNSURE tie", "one answer", "another answer"),
        ("FAIL always", "a", "b"),
    ]
    delays = []
    judged = judge_pairs(client(server, sleep=delays.append), pairs, cache=JsonlLog(tmp_path / "j.jsonl"))
    assert [j["score"] for j in judged] == [1.0, 0.0, 0.5, None]
    # The biased judge picks position 1 both times: the model wins one order and loses the other.
    assert judged[2]["verdicts"] == {"model_first": "model", "reference_first": "reference"}
    assert set(judged[3]["errors"]) == {"model_first", "reference_first"}
    assert "gave up after 3 attempts" in judged[3]["errors"]["model_first"]
    assert "HTTP 500" in judged[3]["errors"]["model_first"]
    # 4 pairs x 2 orders, plus one retry for each order's first 429, broken JSON and no-verdict reply, plus 2
    # retries for each order of FAIL: bounded.
    assert server.state["requests"] == 8 + 6 + 4
    assert sorted(delays) == sorted([0.001] * 6 + [0.001, 0.002] * 2)  # exponential backoff
    assert server.state["auth"] == {f"Bearer {KEY}"}

    # Verdicts are cached; only the failed item is asked again.
    before = server.state["requests"]
    again = judge_pairs(client(server), pairs, cache=JsonlLog(tmp_path / "j.jsonl"))
    assert [j["score"] for j in again] == [1.0, 0.0, 0.5, None]
    assert server.state["requests"] - before == 2 * 3


def test_null_message_is_retried(server):
    assert judge_pairs(client(server), [("NULL", "BAD answer", "reference")])[0]["score"] == 0.0
    assert server.state["requests"] == 4


def test_errors_never_show_the_key(server):
    judged = judge_pairs(client(server), [("ECHO", "a", "b")])
    message = judged[0]["errors"]["model_first"]
    assert "HTTP 400" in message and KEY not in message and "***" in message
    assert server.state["requests"] == 2  # a 400 is not retried
    with pytest.raises(JudgeFatal) as e:
        judge_pairs(client(server), [("DENY", "a", "b")])
    assert "401" in str(e.value) and KEY not in str(e.value)
    assert KEY not in repr(client(server))


def test_unreachable_endpoint_fails_the_item():
    c = JudgeClient("http://127.0.0.1:9/v1", "judge-1", None, max_retries=1, retry_delay=0.001, timeout=2)
    judged = judge_pairs(c, [("q", "a", "b")], concurrency=1)
    assert judged[0]["score"] is None and "connection error" in judged[0]["errors"]["model_first"]


@pytest.mark.parametrize("reply, verdict", [("1", 1), (" 2\n", 2), ("Output 2 is better.", 2), ("(1)", 1)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", ["", "both", "1.5", "12"])
def test_parse_verdict_rejects(reply):
    with pytest.raises(ValueError):
        parse_verdict(reply)


def test_bootstrap_ci():
    low, high = bootstrap_ci([0.0, 1.0] * 50, samples=2000)
    assert 0.38 < low < 0.5 < high < 0.62
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0) and bootstrap_ci([]) == (None, None)


@pytest.fixture(scope="module")
def answers_7(tmp_path_factory):
    tok = build_tokenizer()
    seven = tok.encode("7")[0]
    return save_forced(tmp_path_factory.mktemp("answers-7") / "my-model", seven, {seven: tok.eos_token_id})


def judge_args(model, data, out, **flags) -> list[str]:
    """`asft eval --task judge` argv: 4 answer tokens, then `flags`."""
    return cli_args("eval", model=model, task="judge", data=data, output_dir=out, max_new_tokens=4, **flags)[1:]


def test_cli_end_to_end(server, answers_7, tmp_path, monkeypatch, capsys):
    rows = [
        {"instruction": "say hi", "output": "BAD reference", "generator": "gpt4", "dataset": "helpful_base"},
        {"instruction": "RATE tell me", "output": "fine reference", "generator": "gpt4", "dataset": "koala"},
        {"instruction": "explain", "output": "ok", "generator": "gpt4", "dataset": "koala"},
        {"instruction": "FAIL this", "output": "x", "generator": "gpt4", "dataset": "koala"},
    ]
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps(rows))
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    out = tmp_path / "out"
    args = judge_args(answers_7, data, out, judge_base_url=url(server), judge_model="judge-1")
    args += cli_args("eval", judge_api_key_env="MY_JUDGE_KEY", judge_max_retries=2, judge_retry_delay=0.001)[1:]
    args += ["--bootstrap_samples", "200"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())["datasets"]["alpaca_eval"]
    assert (r["metric"], r["n"], r["n_failed"]) == ("win_rate", 3, 1)
    assert r["value"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert [f["index"] for f in r["failed"]] == [3]
    assert r["mean_length_model"] == 1.0 and r["mean_length_reference"] == pytest.approx(
        sum(len(x["output"]) for x in rows) / 4
    )
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert outputs[0] == {"instruction": "say hi", "output": "7", "generator": "my-model", "dataset": "helpful_base"}
    assert server.state["auth"] == {f"Bearer {KEY}"}

    # A rerun reuses generations and verdicts: only the failed item goes to the judge again.
    before = server.state["requests"]
    assert main(args) == 0
    assert server.state["requests"] - before == 2 * 3
    captured = capsys.readouterr()
    for path in out.iterdir():
        assert KEY not in path.read_text(), path
    assert KEY not in captured.out + captured.err


def test_missing_reference_and_key(tmp_path, answers_7, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "r"}) + "\n" + json.dumps({"instruction": "b"}) + "\n")
    base = ["--model", str(answers_7), "--task", "judge", "--data", str(data), "--output_dir", str(tmp_path / "o")]
    assert main(base) == 2
    assert f"{data}:2: field 'output': missing" in capsys.readouterr().err
    data.write_text(json.dumps({"instruction": "a", "output": "r"}) + "\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(base + ["--judge_model", "gpt-4o"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_without_judge_then_refused_judge(server, answers_7, tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "DENY me", "output": "r"}) + "\n")
    out = tmp_path / "o"
    base = judge_args(answers_7, data, out, quiet=True)
    assert main(base) == 0  # answers only
    r = json.loads((out / "results.json").read_text())["datasets"]["d"]
    assert r["value"] is None and r["judged"] is False and "| d | win_rate | - | 0 |" in capsys.readouterr().out
    # The endpoint refuses the key: one clear error, the answers kept, the key nowhere.
    (out / "model_outputs.json").unlink()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(base + ["--judge_base_url", url(server), "--judge_model", "judge-1"]) == 2
    err = capsys.readouterr().err
    assert "answered HTTP 401" in err and KEY not in err
    assert json.loads((out / "model_outputs.json").read_text())[0]["output"] == "7"


def test_a_judge_run_where_every_judgment_failed_exits_non_zero(server, answers_7, tmp_path, monkeypatch, capsys):
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps([{"instruction": "FAIL this", "output": "x", "generator": "g", "dataset": "koala"}]))
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    argv = f"--model {answers_7} --task judge --data {data} --output_dir {tmp_path / 'out'} --max_new_tokens 4"
    argv += f" --judge_base_url {url(server)} --judge_model judge-1 --judge_api_key_env MY_JUDGE_KEY"
    assert main([*argv.split(), "--judge_max_retries", "0", "--judge_retry_delay", "0.001"]) == 1
    assert "every item failed (judge); nothing was scored" in capsys.readouterr().err
