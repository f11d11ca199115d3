"""Every exception asft raises on purpose. Most are reported as one clear line (no traceback) naming the field,
file or line at fault; the command line catches `ConfigError`, `DataError` and `ModelLoadError`."""

from __future__ import annotations


class ConfigError(ValueError):
    """A wrong configuration value, named by its field, raised before any model is loaded."""


class UsageError(ConfigError):
    """A wrong command-line or config value, reported before any model is loaded."""


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, reported before any training compute."""


class DataError(ValueError):
    """Bad training data, located by file, line (1-based; the item index for JSON arrays and parquet) and field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        self.source, self.line, self.field, self.message = source, line, field, message
        where = source + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {'field ' + repr(field) + ': ' if field else ''}{message}")


# One exception for bad evaluation data, shared with training data: file, line (1-based) and field.
EvalDataError = DataError


class EvalError(ConfigError):
    """A wrong evaluation flag, combination or environment, reported as one line before any model is loaded."""


class TemplateError(EvalError):
    """A prompt template the tokenizer cannot render (training and evaluation share the check)."""


class CacheMismatchError(ConfigError):
    """A reference cache that does not match the data, tokenizer or settings it is used with."""


class DownloadError(Exception):
    """The Hub is unreachable or refused a request: reported as one line, without a traceback."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the term that went bad."""


class StoppedWithoutCheckpoint(KeyboardInterrupt):
    """A second stop signal while a run was stopping: it stops at once; the message names the last checkpoint."""


class JudgeFailure(Exception):
    """One judgment could not be obtained (retries exhausted, or a non-retryable reply)."""


class JudgeFatal(EvalError):
    """The endpoint refuses every call (bad key, unknown model or URL): stop instead of failing every item."""


class RewardTimeout(BaseException):
    """Raised by the timer inside a grading call. A BaseException, so a grader's `except Exception` cannot
    swallow it (math-verify's own TimeoutException is one for the same reason)."""
