"""Turns generated token ids into streamed text and decides when a sequence stops.

Stop sequences are matched on text; text that could still be the start of a stop sequence, or an
incomplete UTF-8 character, is held back until it is resolved, so a client never sees text that is
later retracted.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.workers.model.sampling import SamplingConfig, TokenLogprob
from pdserve.workers.model.tokenizer import Tokenizer


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    finish: Finish | None
    logprobs: list[TokenLogprob] = field(default_factory=list)          # one per token id, when asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # the first delta only
    num_cached_tokens: int = 0     # the first delta only: prompt tokens taken from a prefix cache


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, params: SamplingConfig, num_prompt_tokens: int,
                 max_context_tokens: int):
        self._tok = tokenizer
        self._params = params
        self._max_new = min(params.max_tokens, max_context_tokens - num_prompt_tokens)
        self.token_ids: list[int] = []
        self._emitted_chars = 0
        self._stops_from_char = 0      # stop strings count only after the first min_tokens tokens
        self.finish: Finish | None = None

    def add(self, token_id: int) -> Delta:
        if self.finish is not None:
            raise RuntimeError("sequence already finished")
        if token_id in self._tok.eos_token_ids and not self._params.ignore_eos:
            self.finish = Finish.STOP
            return Delta([], self._flush(self._text()), self.finish)
        self.token_ids.append(token_id)
        text = self._text()
        if len(self.token_ids) <= self._params.min_tokens:
            self._stops_from_char = len(text)
        for stop in self._params.stop:
            idx = text.find(stop, max(self._stops_from_char, self._emitted_chars - len(stop)))
            if idx != -1:
                self.finish = Finish.STOP
                return Delta([token_id], self._flush(text[:idx]), self.finish)
        if len(self.token_ids) >= self._max_new:
            self.finish = Finish.LENGTH
            return Delta([token_id], self._flush(text), self.finish)
        return Delta([token_id], self._flush(text[: self._safe_end(text)]), None)

    @property
    def text(self) -> str:
        return self._text()

    def _text(self) -> str:
        return self._tok.decode(self.token_ids)

    def _safe_end(self, text: str) -> int:
        end = len(text)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            end = len(text.rstrip("\ufffd"))
        for stop in self._params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return max(end, self._emitted_chars)

    def _flush(self, text: str) -> str:
        delta = text[self._emitted_chars:]
        self._emitted_chars = max(self._emitted_chars, len(text))
        return delta
