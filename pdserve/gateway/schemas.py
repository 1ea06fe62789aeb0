"""Request bodies of the OpenAI-compatible endpoints, validated strictly: a field that would change
the output but is not supported here is refused with a 400 naming it (unless it has its
no-op value), fields that cannot change the output are accepted and listed below, and unknown
fields are refused (a typo such as `max_token` must not silently fall back to a default)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

_MAX_STOP_SEQUENCES = 4  # OpenAI's limit

# Accepted and ignored: they cannot change what is generated.
ACCEPTED_WITHOUT_EFFECT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction",
                           "web_search_options")
# Output-changing fields not supported here, with the values that mean "off" (those are accepted).
_UNSUPPORTED_UNLESS = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "top_k": (None, 0, -1),
    "best_of": (None, 1), "suffix": (None, ""), "top_logprobs": (None, 0),
    "modalities": (None, ["text"]), "audio": (None,), "reasoning_effort": (None,),
}


class UnsupportedField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_fields(body: dict, model: type[BaseModel]) -> None:
    """Raises UnsupportedField for the first field that `model` cannot honour."""
    for name, value in (body.items() if isinstance(body, dict) else ()):
        if name in model.model_fields or name in ACCEPTED_WITHOUT_EFFECT:
            continue
        if name not in _UNSUPPORTED_UNLESS:
            raise UnsupportedField(name, f"Unrecognized request argument supplied: {name}")
        if not any(value is None if off is None else (type(value) is type(off) and value == off)
                   for off in _UNSUPPORTED_UNLESS[name]):
            raise UnsupportedField(name, f"'{name}' is not supported by this server (only {_UNSUPPORTED_UNLESS[name][-1]!r})")


# Strict: JSON types as documented (a "16" for max_tokens is refused, not coerced), as OpenAI does.
_STRICT = ConfigDict(strict=True)


def _integral(value):
    # JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees), 16.5 is not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds):   # noqa: N802 - a type
    """An integer field type with bounds (kept in the JSON schema also inside unions)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TokenId = Int(ge=0)
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)   # check_fields() has refused what must not pass

    model: str
    max_tokens: Int(ge=1) | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int(ge=1, le=1) = Field(1, description="only n=1 is supported")
    seed: Int(ge=0, lt=2**63) | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=_MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension, what load generators use to fix output lengths: generate past end-of-sequence.
    ignore_eos: bool = False
    # vLLM's extension: end-of-sequence and stop strings are suppressed until this many tokens.
    min_tokens: Int(ge=0) = 0
    # vLLM's extension: logprobs name tokens "token_id:<id>" (exact even where a token is part of a character).
    return_tokens_as_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _as_list(cls, v):
        # The field's type has checked count and emptiness; one string is a list of one.
        return [v] if isinstance(v, str) else (v or [])

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Common):
    # Text, or token ids (a list of ints); a list of one of either is also one prompt.
    prompt: (str | Annotated[list[TokenId], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)])
    echo: bool = False
    # The sampled token's logprob and this many alternatives per position (with echo: the prompt's too).
    logprobs: Int(ge=0, le=20) | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        # Before the union is tried, whose own errors would name the wrong alternative.
        if isinstance(v, list) and len(v) != 1 and v and isinstance(v[0], (str, list)):
            raise ValueError("exactly one prompt is supported per request")
        if isinstance(v, list) and (not v or (isinstance(v[0], list) and not v[0])):
            raise ValueError("a prompt of token ids must be non-empty")
        return v

    @field_validator("prompt")
    @classmethod
    def _unwrap(cls, v):
        return v[0] if isinstance(v, list) and isinstance(v[0], (str, list)) else v


class ContentPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
