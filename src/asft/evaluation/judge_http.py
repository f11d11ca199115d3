"""A minimal client for OpenAI-compatible chat endpoints (stdlib urllib: no extra dependency).

Retries, with exponential backoff from `retry_delay` (doubling, capped at 60 s; a numeric Retry-After wins when
longer), on 429, 5xx, connection errors, timeouts and malformed replies (bad JSON, no message, or a reply the
caller's `parse` rejects). 401 / 403 / 404 stop the whole run: every later call would fail the same way. Any
other status fails that call only. The API key goes in the Authorization header and nowhere else: it is kept
out of repr() and scrubbed from every error text, which may quote the server's reply.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import JudgeFailure, JudgeFatal

T = TypeVar("T")
FATAL_STATUS = (401, 403, 404)


@dataclass
class JudgeClient:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    max_retries: int = 5
    retry_delay: float = 1.0
    timeout: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _post(self, body: dict) -> tuple[int, str, str | None]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read().decode("utf-8", "replace"), None
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace"), e.headers.get("Retry-After")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.retry_delay * 2**attempt, 60.0)
        try:
            return max(delay, min(float(retry_after), 60.0)) if retry_after else delay
        except ValueError:
            return delay

    def ask(self, messages: list[dict], parse: Callable[[str], T]) -> T:
        """Send one chat request and return `parse(reply text)`, retrying as the module's docstring says."""
        body = {"model": self.model, "messages": messages, "temperature": 0}
        error, retry_after = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay(attempt - 1, retry_after))
            try:
                status, text, retry_after = self._post(body)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                # refused, reset, timed out: worth another try, the server may be restarting
                retry_after = None
                error = f"connection error: {type(e).__name__}: {self.redact(str(e))}"
                continue
            if status == 200:
                try:
                    return parse(json.loads(text)["choices"][0]["message"]["content"])
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    error = f"malformed reply ({type(e).__name__}): {self.redact(text[:200])!r}"
                    continue
            error = f"HTTP {status}: {self.redact(text[:200])!r}"
            if status in FATAL_STATUS:
                raise JudgeFatal(
                    f"judge endpoint {self.url} answered {error}; check --judge_base_url, --judge_model and the API key"
                )
            if status != 429 and status < 500:
                raise JudgeFailure(error)
        raise JudgeFailure(f"gave up after {self.max_retries + 1} attempts; last: {error}")
