"""One answer's text on its way out of the token loop: token ids become text (the detokenizer holds back an
unfinished character), the reply splitter takes a tool call out, the stop matcher holds back what may
begin a stop string. A token's logprob entry waits until its text has gone out, and travels on the
TextDelta that carries it; the entries of text that never goes out (a stop string, a tool call) are
dropped, as OpenAI has no logprobs for them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

from backends.base import Event, TextDelta, TokenLogprob
from backends.chatglm.chatglm3_tools import ReplySplitter
from backends.stops import StopMatcher


class Detokenizes(Protocol):
    def add(self, token: int) -> str: ...

    def flush(self) -> str: ...


class AnswerText:
    def __init__(self, detokenizer: Detokenizes, reply: ReplySplitter, stop: StopMatcher, choice: int = 0) -> None:
        self.detokenizer = detokenizer
        self.reply = reply
        self.stop = stop
        self.choice = choice
        self.tool_call = False  # the answer ended in a tool call
        self._seen = 0  # characters out of the detokenizer
        self._fed = 0  # characters the reply splitter passed on to the stop matcher
        self._sent = 0  # characters the stop matcher passed on (a prefix of those it was fed)
        self._pending: deque[tuple[int, TokenLogprob]] = deque()  # (where the token's text ends, its entry)

    def add(self, token: int, logprob: TokenLogprob | None = None) -> TextDelta | None:
        """The text ``token`` lets out, if any."""
        text = self.detokenizer.add(token)
        self._seen += len(text)
        if logprob is not None:  # a token held back (part of a character) ends with the character it begins
            self._pending.append((self._seen + (0 if text else 1), logprob))
        piece = self.reply.feed(text)
        self._fed += len(piece)
        return self._delta(self.stop.feed(piece))

    def end(self) -> Iterator[Event]:
        """The text held back to the end, and the tool call if the answer was one."""
        call = None
        if not self.stop.stopped:
            flushed = self.detokenizer.flush()
            self._seen += len(flushed)
            content = self.reply.feed(flushed)
            rest, call = self.reply.finish()
            self._fed += len(content) + len(rest)
            delta = self._delta(self.stop.feed(content + rest) + self.stop.flush())
            if delta is not None:
                yield delta
        if call is not None:
            self.tool_call = True
            yield replace(call, choice=self.choice) if self.choice else call

    def _delta(self, text: str) -> TextDelta | None:
        if not text:
            return None
        self._sent += len(text)
        if not self._pending:
            return TextDelta(text, choice=self.choice)
        # What the splitter took out for good (the metadata line, a dummy prefix): its tokens have no entry.
        dropped = self._seen - self._fed - len(self.reply.buffer)
        out = []
        while self._pending and self._pending[0][0] <= dropped + self._sent:
            end, entry = self._pending.popleft()
            if end > dropped:
                out.append(entry)
        return TextDelta(text, tuple(out), self.choice)
