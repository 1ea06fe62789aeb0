"""Token logprobs from the workers in OpenAI's two response shapes:
completions `{tokens, token_logprobs, top_logprobs, text_offset}` (with `echo`, the prompt's
tokens first; the first has no logprob, as nothing precedes it) and chat
`{content: [{token, logprob, bytes, top_logprobs}]}`. One formatter per response keeps the text
offset running across streamed chunks."""
from __future__ import annotations

from typing import Callable, Iterable

from pdserve.v1 import logprobs_pb2


class LogprobFormatter:
    def __init__(self, token_text: Callable[[int], str], chat: bool):
        self._text = token_text
        self.chat = chat
        self._offset = 0

    def format(self, entries: Iterable[logprobs_pb2.TokenLogprob], echo_first_token: int | None = None,
               prompt: Iterable[logprobs_pb2.TokenLogprob] = ()) -> dict:
        """The logprobs object for these tokens (a streamed chunk's, or a whole response's)."""
        entries = list(entries)
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if echo_first_token is not None:
            self._add(part, echo_first_token, None, None)
        for e in [*prompt, *entries]:
            top = {self._text(t.token_id): t.logprob for t in e.top}
            self._add(part, e.token_id, e.logprob, {**top, self._text(e.token_id): e.logprob})
        return part

    def _add(self, part: dict, token_id: int, logprob: float | None, top: dict | None) -> None:
        text = self._text(token_id)
        part["tokens"].append(text)
        part["token_logprobs"].append(logprob)
        part["top_logprobs"].append(top)
        part["text_offset"].append(self._offset)
        self._offset += len(text)

    def _chat_entry(self, e: logprobs_pb2.TokenLogprob) -> dict:
        text = self._text(e.token_id)
        return {"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": self._text(t.token_id), "logprob": t.logprob,
                                  "bytes": list(self._text(t.token_id).encode("utf-8"))} for t in e.top]}
