"""Verifiable rewards for `asft rl`, in TRL's reward signature: `f(prompts, completions, **columns) -> list[float]`.

- `math`: 1.0 when `asft.evaluation.math.is_correct` accepts the completion (the evaluator's own extraction and
  math-verify comparison), else 0.0.
- `choice`: 1.0 when the option letter read from the completion is the gold one. The letter is read the way the
  medical evaluator scores a model: the first token of the answer ("A", " A", "(A)", "A."), since the evaluator
  compares the next-token probabilities of the letters right after the prompt's "Answer:". A completion that
  does not start with a letter is read by its last "answer is X" / "Answer: X" (ours, for models that reason
  first); nothing found scores 0.
- `format` (optional): 1.0 for a well-formed answer (math: a closed \\boxed{}; choice: a readable letter).
- user rewards: `module:function`, called with TRL's arguments.

Every reward runs guarded (`GuardedReward`): a completion whose grading raises or exceeds the per-item time limit
scores 0, is counted (`rewards/<name>/errors`, `rewards/<name>/timeouts` in the logs, totals on the object) and
never stops the run. The time limit is a SIGALRM timer, which only exists in the main thread (where TRL calls
rewards); elsewhere grading runs unbounded. math-verify's own SIGALRM timeout is switched off under this timer
(the two would share one alarm); ours bounds parsing and comparison together.
"""

from __future__ import annotations

import importlib
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager

from ..errors import ConfigError, RewardTimeout
from ..evaluation.math import is_correct, last_boxed
from ..evaluation.medical import LETTERS


@contextmanager
def time_limit(seconds: float | None):
    """Raise RewardTimeout in the block after `seconds` (main thread only; elsewhere no limit)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise RewardTimeout(f"grading took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ graders


def _quiet_math_verify() -> None:
    """math-verify warns once that its timeout is off; here our timer bounds every item, so the warning misleads."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True


def math_score(completion: str, gold: str, **_) -> float:
    # timeout=None: math-verify sets no alarm of its own; GuardedReward's timer bounds the whole item.
    return 1.0 if is_correct(completion, str(gold), timeout=None) else 0.0


_LEADING_LETTER = re.compile(r"^\s*[\(\[]?([A-Z])(?![A-Za-z0-9])")
_ANSWER_LETTER = re.compile(r"(?i:answer)(?:\s+is)?\s*[:\-]?\s*[\(\[]?([A-Z])(?![A-Za-z0-9])")


def extract_letter(completion: str, letters: str = LETTERS[:4]) -> str | None:
    """The option letter a completion gives, or None (see the module docstring for the rule)."""
    m = _LEADING_LETTER.match(completion)
    if m and m.group(1) in letters:
        return m.group(1)
    found = [x.group(1) for x in _ANSWER_LETTER.finditer(completion) if x.group(1) in letters]
    return found[-1] if found else None


def choice_score(completion: str, gold: str, letters: str = LETTERS[:4], **_) -> float:
    return 1.0 if extract_letter(completion, letters) == gold else 0.0


def math_format_score(completion: str, gold=None, **_) -> float:
    return 1.0 if last_boxed(completion) else 0.0


def choice_format_score(completion: str, gold=None, letters: str = LETTERS[:4], **_) -> float:
    return 1.0 if extract_letter(completion, letters) else 0.0


# ----------------------------------------------------------------------------------------- guarded rewards


class GuardedReward:
    """A TRL reward function built from a per-completion grader, or wrapping a user's batch reward.

    Per-completion graders (`grader(completion, gold, **row) -> float`) run one completion at a time under the
    time limit. A batch reward (`batch_fn(prompts=, completions=, **kwargs) -> list`) is called once for the whole
    batch under `timeout x batch size`; if that call raises or times out, it is called again one completion at a
    time, so only the completions that fail score 0.
    """

    def __init__(
        self,
        name: str,
        grader: Callable | None = None,
        batch_fn: Callable | None = None,
        timeout: float | None = 5.0,
        log_accuracy: bool = False,
    ):
        self.__name__ = name  # TRL names the logged metrics rewards/<__name__>/mean
        self.grader, self.batch_fn, self.timeout = grader, batch_fn, timeout
        self.log_accuracy = log_accuracy
        self.errors = self.timeouts = 0  # totals over the run
        self._warned = False

    def __call__(self, prompts, completions, log_metric=None, **kwargs) -> list[float]:
        errors_before, timeouts_before = self.errors, self.timeouts
        if self.batch_fn is not None:
            if log_metric is not None:
                kwargs["log_metric"] = log_metric  # TRL hands it to every reward function
            scores = self._batch(prompts, completions, **kwargs)
        else:
            scores = [self._one(self.grader, completion=c, **_row(kwargs, i)) for i, c in enumerate(completions)]
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/errors", float(self.errors - errors_before))
            log_metric(f"rewards/{self.__name__}/timeouts", float(self.timeouts - timeouts_before))
            if self.log_accuracy and scores:
                log_metric("accuracy", sum(s >= 1.0 for s in scores) / len(scores))
        return scores

    def _batch(self, prompts, completions, **kwargs) -> list[float]:
        n = len(completions)
        try:
            with time_limit(self.timeout * n if self.timeout else None):
                out = self.batch_fn(prompts=prompts, completions=completions, **kwargs)
            out = [float("nan") if r is None else float(r) for r in out]
            if len(out) != n:
                raise ValueError(f"returned {len(out)} rewards for {n} completions")
            return out
        except (Exception, RewardTimeout):
            pass  # find the failing completions one by one; they are counted there

        def one(completion, prompt, **row):
            return self.batch_fn(prompts=[prompt], completions=[completion], **row)[0]

        scores = []
        for i, c in enumerate(completions):
            row = {k: ([v[i]] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
            scores.append(self._one(one, completion=c, prompt=prompts[i], **row))
        return scores

    def _one(self, fn, **row) -> float:
        try:
            with time_limit(self.timeout):
                value = fn(**row)
            return float("nan") if value is None else float(value)
        except RewardTimeout:
            self.timeouts += 1
            self._warn(f"timed out after {self.timeout} s")
        except Exception as e:  # noqa: BLE001 - a bad grading must never stop the run
            self.errors += 1
            self._warn(f"raised {type(e).__name__}: {e}")
        return 0.0

    def _warn(self, what: str) -> None:
        if not self._warned:  # once per reward; the counts are logged every step
            self._warned = True
            warnings.warn(
                f"reward {self.__name__}: grading a completion {what}; it scores 0 (counted in "
                f"rewards/{self.__name__}/errors and /timeouts; this warning is shown once)",
                stacklevel=2,
            )


def _row(kwargs: dict, i: int) -> dict:
    """The i-th completion's columns (TRL passes every dataset column as a list, one value per completion)."""
    return {k: v[i] for k, v in kwargs.items() if isinstance(v, list) and k in ("gold", "letters")}


# ----------------------------------------------------------------------------------------------- building


def load_user_reward(spec: str) -> Callable:
    """`package.module:function` -> the function (the module is imported from sys.path and the working dir)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward_funcs: {spec!r} is not module:function")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module, reported in one line
        raise ConfigError(
            f"reward_funcs: cannot import {module_name!r} for {spec!r}: {type(e).__name__}: {e}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {module_name!r} has no function {attr!r}")
    return fn


def build_rewards(
    reward: str | None, format_reward: bool, user_specs: list[str], timeout: float | None
) -> list[GuardedReward]:
    """The guarded reward functions, correctness first (its mean is logged as `accuracy`)."""
    graders = {"math": (math_score, math_format_score), "choice": (choice_score, choice_format_score)}
    rewards = []
    if reward:
        score, fmt = graders[reward]
        if reward == "math":
            _quiet_math_verify()
        rewards.append(GuardedReward(f"{reward}_reward", score, timeout=timeout, log_accuracy=True))
        if format_reward:
            rewards.append(GuardedReward(f"{reward}_format_reward", fmt, timeout=timeout))
    for spec in user_specs:
        fn = load_user_reward(spec)
        rewards.append(GuardedReward(spec.partition(":")[2], batch_fn=fn, timeout=timeout))
    return rewards
