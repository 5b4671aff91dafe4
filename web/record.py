"""What is known of one request as it runs (its id, key name, route, status, model, usage, time to
first token, error): the request log writes it as one line and the metrics count it when the
response closes; an answer's events (streamed or not) pass through ``observe`` on their way out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from backends.base import Event, Finish, Message, TextDelta, Written


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
    finish_reason: str = ""  # the answers' reasons, each once ("stop,length": choices that ended differently)
    unfinished_tokens: int = 0  # text pieces of an answer whose Finish never came (a client left)
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
            elif isinstance(event, Written):  # pieces the backend wrote itself, after the first
                self.unfinished_tokens += event.deltas
                if keep_text:
                    self.answer.append(event.text)
            elif isinstance(event, Finish):
                self.prompt_tokens += event.usage.prompt_tokens  # summed: /v1/completions may run several
                self.completion_tokens += event.usage.completion_tokens
                self.cached_tokens += event.usage.cached_tokens
                # Several answers (n choices, prompts) that ended differently: each reason once, in order.
                reasons = self.finish_reason.split(",") if self.finish_reason else []
                if event.reason not in reasons:
                    self.finish_reason = ",".join([*reasons, event.reason])
                self.unfinished_tokens = 0
            yield event

    @property
    def tokens_used(self) -> int:
        """What the request cost, so far: an answer cut short counts the pieces it sent."""
        return self.prompt_tokens + self.completion_tokens + self.unfinished_tokens
