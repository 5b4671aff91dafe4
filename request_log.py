"""One log line and one set of metrics per request, written when the response is closed (for a
stream, when its last byte is sent or the client went away). Never the prompt, the answer or a
key, unless LOG_PROMPTS is set."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import metrics
from backends.base import Event, Finish, Message, TextDelta

log = logging.getLogger("aigate.requests")


class HideHeaderLines(logging.Filter):
    """For gunicorn's log: a header line it could not parse is logged whole, and may hold a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Invalid HTTP Header: " in message:
            record.msg, record.args = message.split("Invalid HTTP Header: ")[0] + "Invalid HTTP Header (hidden)", ()
        return True


class QuietWriteTimeouts(logging.Filter):
    """For gunicorn's log: a client that left its answer unread for CLIENT_WRITE_TIMEOUT ends the
    write with a timeout, which gunicorn logs with a traceback; one line says it (the request's own
    line says error=client_too_slow)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a client left its answer unread for CLIENT_WRITE_TIMEOUT: connection closed", (), None, None)
        return True


@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    client: str
    key: str = "-"  # the API key's name, never the key
    started: float = field(default_factory=time.monotonic)
    route: str = "other"
    status: int = 0
    model: str = ""  # set only once resolved: client-chosen strings never become metric labels
    backend: str = ""
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those reused from the engine's cache
    first_token_at: float | None = None
    finish_reason: str = ""
    unfinished_tokens: int = 0  # text pieces of an answer whose Finish never came (a client left)
    reserved_tokens: int = 0  # what the request might cost, reserved from its key's token budget
    error: str = ""
    messages: tuple[Message, ...] = ()  # only kept with LOG_PROMPTS
    answer: list[str] = field(default_factory=list)  # likewise

    def observe(self, events: Iterator[Event], keep_text: bool) -> Iterator[Event]:
        """Pass the events through, noting time to first token, usage and finish reason."""
        for event in events:
            if isinstance(event, TextDelta) and event.text:
                self.unfinished_tokens += 1  # about a token each, until Finish gives the exact count
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if keep_text:
                    self.answer.append(event.text)
            elif isinstance(event, Finish):
                self.prompt_tokens += event.usage.prompt_tokens  # summed: /v1/completions may run several
                self.completion_tokens += event.usage.completion_tokens
                self.cached_tokens += event.usage.cached_tokens
                self.finish_reason = event.reason
                self.unfinished_tokens = 0
            yield event

    @property
    def tokens_used(self) -> int:
        """What the request cost, so far: an answer cut short counts the pieces it sent."""
        return self.prompt_tokens + self.completion_tokens + self.unfinished_tokens

    def close(self, log_prompts: bool) -> None:
        ended = time.monotonic()
        self.completion_tokens += self.unfinished_tokens
        self.unfinished_tokens = 0
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        if log.isEnabledFor(logging.INFO):  # the line is built only to be written
            self._log(ended, ttft, log_prompts)
        metrics.safely(lambda: self._count(ended, ttft))  # a metrics fault never fails the response's close

    def _log(self, ended: float, ttft: float | None, log_prompts: bool) -> None:
        fields = {
            "id": self.id, "method": self.method, "path": self.path, "status": self.status, "client": self.client,
            "key": self.key,
            "model": self.model or "-", "backend": self.backend or "-", "stream": str(self.stream).lower(),
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": "-" if ttft is None else f"{ttft * 1000:.1f}",
            "duration_ms": f"{(ended - self.started) * 1000:.1f}",
            "finish": self.finish_reason or "-", "error": self.error or "-",
        }
        log.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()))
        if log_prompts and self.messages:
            log.info("request %s prompt=%r answer=%r", self.id,
                     [(m.role, m.content) for m in self.messages], "".join(self.answer))

    def _count(self, ended: float, ttft: float | None) -> None:
        child = metrics.child
        child(metrics.REQUESTS, self.route, self.model, str(self.status), self.key).inc()
        if not self.model:
            return
        child(metrics.TOKENS, self.model, "prompt", self.key).inc(self.prompt_tokens)
        child(metrics.TOKENS, self.model, "completion", self.key).inc(self.completion_tokens)
        child(metrics.PROMPT_TOKENS, self.model, "reused").inc(self.cached_tokens)
        child(metrics.PROMPT_TOKENS, self.model, "evaluated").inc(self.prompt_tokens - self.cached_tokens)
        if ttft is not None and self.first_token_at is not None:
            child(metrics.TIME_TO_FIRST_TOKEN, self.model).observe(ttft)
            decode_time = ended - self.first_token_at
            if self.completion_tokens > 1 and decode_time > 0:
                child(metrics.TOKENS_PER_SECOND, self.model).observe((self.completion_tokens - 1) / decode_time)
