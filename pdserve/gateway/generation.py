"""From an OpenAI request body to a router stream and back to OpenAI response objects.

`prepare()` validates and tokenizes (model, lengths, limits -> 4xx before any work is queued);
`open_stream()` starts the router call and waits for its first chunk, so placement errors
(overloaded, no workers) still become proper HTTP status codes; `collect()` and `sse()` turn the
token chunks into a JSON body or server-sent events.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import orjson
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from pdserve.gateway.errors import OpenAIError, bad_request
from pdserve.gateway.logprobs import LogprobFormatter
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.router_client import RouterClient
from pdserve.gateway.schemas import ChatCompletionRequest, CompletionRequest, UnsupportedField, check_fields
from pdserve.v1 import router_pb2, worker_pb2
from pdserve.workers.model.tokenizer import Tokenizer

_DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_DONE = "data: [DONE]\n\n"
_FINISH = {worker_pb2.FINISH_REASON_STOP: "stop", worker_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass
class Limits:
    served_model: str
    max_context_tokens: int
    max_tokens_limit: int
    vocab_size: int = 0         # token ids of a prompt are below it (0: not checked here)
    extra_models: tuple[str, ...] = ()   # also served (IC-Cache's small model)
    routed_model: str = ""               # IC-Cache chooses the model for requests naming this
    # An extra model's own (context tokens, vocabulary size); absent: the served model's.
    extra_model_limits: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def models(self) -> tuple[str, ...]:
        return (self.served_model, *self.extra_models)

    def context_of(self, model: str) -> int:
        return self.extra_model_limits.get(model, (self.max_context_tokens, self.vocab_size))[0]

    def vocab_of(self, model: str) -> int:
        return self.extra_model_limits.get(model, (self.max_context_tokens, self.vocab_size))[1]


@dataclass
class Prepared:
    req_id: str
    chat: bool
    model: str
    prompt_ids: list[int]
    sampling: worker_pb2.SamplingParams
    stream: bool
    include_usage: bool
    echo_text: str = ""
    logprobs: LogprobFormatter | None = None     # set when the client asked for logprobs
    iccache: dict | None = None                  # IC-Cache's choice, for the usage extension
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.req_id}"


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "function-before", "function-after"}


def _field_path(loc) -> str | None:
    """'prompt.0' from ('prompt', 'list[constrained-int]', 0): drops the union branch labels."""
    parts = [str(p) for p in loc if isinstance(p, int) or not ("[" in p or "-" in p or p in _TYPE_NAMES)]
    return ".".join(parts) or None


def validation_error(exc: ValidationError) -> OpenAIError:
    errors = exc.errors()
    # A value matching no alternative of a union fails each one; the error worth reporting is one
    # that got past the type check (a bound, a length), not "should be a valid string".
    err = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    param = _field_path(err.get("loc", ()))
    return bad_request(f"Invalid value for '{param}': {err.get('msg')}", param=param)


def prepare(body: dict, chat: bool, req_id: str, tokenizer: Tokenizer | Mapping[str, Tokenizer],
            limits: Limits) -> Prepared:
    """`tokenizer`: one for every model, or one per model name (models with different tokenizers)."""
    schema = ChatCompletionRequest if chat else CompletionRequest
    try:
        check_fields(body, schema)
        req = schema.model_validate(body)
    except UnsupportedField as exc:
        raise bad_request(str(exc), param=exc.field, code="unsupported_parameter") from exc
    except ValidationError as exc:
        raise validation_error(exc) from exc
    if req.model not in limits.models:
        raise OpenAIError(404, f"The model '{req.model}' does not exist; this server serves "
                               f"{', '.join(repr(m) for m in limits.models)}", param="model", code="model_not_found")
    if isinstance(tokenizer, Mapping):
        tokenizer = tokenizer[req.model]
    context, vocab = limits.context_of(req.model), limits.vocab_of(req.model)
    if chat:
        prompt_ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        requested = req.requested_max_tokens()
    else:
        prompt_ids = list(req.prompt) if isinstance(req.prompt, list) else tokenizer.encode(req.prompt)
        if isinstance(req.prompt, list) and vocab and max(prompt_ids) >= vocab:
            raise bad_request(f"prompt token ids must be < {vocab} (the model's vocabulary size)", param="prompt")
        requested = req.max_tokens or min(_DEFAULT_COMPLETION_MAX_TOKENS, limits.max_tokens_limit)
    room = context - len(prompt_ids)
    if room <= 0 or (requested is not None and requested > room):
        raise bad_request(
            f"This model's maximum context length is {context} tokens; the prompt has "
            f"{len(prompt_ids)} tokens and {requested or 0} were requested for the completion.",
            param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = min(requested or room, limits.max_tokens_limit)
    if requested is not None and requested > limits.max_tokens_limit:
        raise bad_request(f"max_tokens must be <= {limits.max_tokens_limit}", param="max_tokens")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) must be <= max_tokens ({max_tokens})", param="min_tokens")
    sampling = worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                         stop=req.stop_list(), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)
    if req.seed is not None:
        sampling.seed = req.seed
    formatter = _ask_logprobs(req, chat, sampling, tokenizer)
    return Prepared(req_id=req_id, chat=chat, model=req.model, prompt_ids=prompt_ids, sampling=sampling,
                    stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    echo_text=_echo_text(req, prompt_ids, tokenizer) if not chat else "", logprobs=formatter)


def _ask_logprobs(req, chat: bool, sampling: worker_pb2.SamplingParams, tokenizer: Tokenizer):
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        if not req.logprobs:
            return None
        sampling.logprobs = req.top_logprobs or 0
    else:
        if req.logprobs is None:
            return None
        sampling.logprobs = req.logprobs
        sampling.prompt_logprobs = req.echo
    if req.return_tokens_as_token_ids:
        return LogprobFormatter(lambda token_id: f"token_id:{token_id}", chat)
    return LogprobFormatter(lambda token_id: tokenizer.decode([token_id]), chat)


def _echo_text(req: CompletionRequest, prompt_ids: list[int], tokenizer: Tokenizer) -> str:
    if not req.echo:
        return ""
    if not isinstance(req.prompt, list):
        return req.prompt
    try:
        return tokenizer.decode(prompt_ids)
    except (IndexError, ValueError, OverflowError, TypeError) as exc:
        raise bad_request(f"prompt token ids cannot be decoded: {exc}", param="prompt") from exc


class Stream:
    """A started router call whose first chunk has arrived."""

    def __init__(self, call, first: worker_pb2.TokenChunk, router: RouterClient, started_s: float):
        self.call = call
        self.first = first
        self.router = router
        self.started_s = started_s
        self.first_token_s = time.perf_counter()

    async def chunks(self):
        yield self.first
        # read(), not iteration: grpc.aio forbids mixing the two on one call.
        while (chunk := await self.call.read()) is not grpc.aio.EOF:
            yield chunk

    def cancel(self) -> None:
        self.call.cancel()


async def open_stream(p: Prepared, router: RouterClient, scenario_header: str = "", tenant: str = "") -> Stream:
    started = time.perf_counter()
    call = router.generate(router_pb2.RouteRequest(req_id=p.req_id, model=p.model, prompt_token_ids=p.prompt_ids,
                                                   sampling=p.sampling, scenario_header=scenario_header,
                                                   tenant=tenant))
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise router.to_http(exc) from exc
    if first is grpc.aio.EOF:
        raise OpenAIError(502, "router ended the stream without output", "server_error")
    return Stream(call, first, router, started)


def usage(p: Prepared, out: "Outcome") -> dict:
    return {"prompt_tokens": len(p.prompt_ids), "completion_tokens": out.num_generated,
            "total_tokens": len(p.prompt_ids) + out.num_generated,
            # OpenAI's field: prompt tokens served from a prefix cache instead of computed.
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
            **({"iccache": p.iccache} if p.iccache is not None else {})}


@dataclass
class Outcome:
    text: str = ""
    num_generated: int = 0
    finish_reason: str | None = None
    ttft_s: float | None = None
    num_cached_tokens: int = 0
    error: OpenAIError | None = None
    logprobs: list = field(default_factory=list)          # every chunk's, for a non-streamed body
    prompt_logprobs: list = field(default_factory=list)
    status: int = 200
    done: bool = False          # the response body was produced to its end


def _observe(chunk, out: Outcome, metrics: GatewayMetrics, last_s: float) -> float:
    now = time.perf_counter()
    if chunk.token_ids and out.num_generated:
        metrics.itl.observe((now - last_s) / len(chunk.token_ids))
    out.text += chunk.text
    out.logprobs += chunk.logprobs
    out.prompt_logprobs += chunk.prompt_logprobs
    out.num_generated = chunk.num_generated_tokens
    out.num_cached_tokens = max(out.num_cached_tokens, chunk.num_cached_tokens)
    if chunk.prefill_ms:    # a disaggregated request's first chunk: the prefill's figures
        metrics.kv_bytes.inc(chunk.kv_transfer_bytes)
        metrics.prefill.observe(chunk.prefill_ms / 1e3)
    if chunk.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
        out.finish_reason = _FINISH.get(chunk.finish_reason)
        if out.finish_reason is None:
            out.error = OpenAIError(500, "the request was aborted by a worker", "server_error")
    return now


async def collect(p: Prepared, s: Stream, metrics: GatewayMetrics, out: Outcome) -> dict:
    out.ttft_s = s.first_token_s - s.started_s
    last = s.first_token_s
    try:
        async for chunk in s.chunks():
            last = _observe(chunk, out, metrics, last)
    except grpc.aio.AioRpcError as exc:
        raise s.router.to_http(exc) from exc
    if out.error:
        raise out.error
    text = p.echo_text + out.text
    logprobs = None
    if p.logprobs is not None:
        logprobs = p.logprobs.format(out.logprobs, *_echo_logprobs(p, out.prompt_logprobs))
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
               "finish_reason": out.finish_reason}
              if p.chat else {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason})
    return {"id": p.response_id, "object": "chat.completion" if p.chat else "text_completion",
            "created": p.created, "model": p.model, "choices": [choice], "usage": usage(p, out)}


def _echo_logprobs(p: Prepared, prompt: list) -> tuple[int | None, list]:
    """(first prompt token, logprobs of the rest) when echo asked for the prompt's logprobs."""
    return (p.prompt_ids[0], prompt) if p.sampling.prompt_logprobs else (None, [])


def _event(p: Prepared, delta_text: str | None, finish: str | None, *, role: bool = False,
           logprobs: dict | None = None) -> str:
    if p.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta_text or "", "logprobs": logprobs, "finish_reason": finish}
    body = {"id": p.response_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": p.created, "model": p.model, "choices": [choice]}
    if p.include_usage:
        body["usage"] = None
    return _data(body)


def _data(body: dict) -> str:
    return f"data: {orjson.dumps(body).decode()}\n\n"


class FastJSONResponse(JSONResponse):
    """orjson instead of the standard library: a third of the cost of a completion body."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


async def sse(p: Prepared, s: Stream, metrics: GatewayMetrics, out: Outcome):
    """Server-sent events; a failure after the first byte is reported in-band as an error event."""
    out.ttft_s = s.first_token_s - s.started_s
    last = s.first_token_s
    try:
        if p.chat:
            yield _event(p, None, None, role=True)
        elif p.echo_text:
            echo = (p.logprobs.format([], *_echo_logprobs(p, list(s.first.prompt_logprobs)))
                    if p.logprobs is not None else None)
            yield _event(p, p.echo_text, None, logprobs=echo)
        async for chunk in s.chunks():
            last = _observe(chunk, out, metrics, last)
            if out.error:
                raise out.error
            if chunk.text or out.finish_reason or chunk.logprobs:
                logprobs = p.logprobs.format(chunk.logprobs) if p.logprobs is not None else None
                yield _event(p, chunk.text, out.finish_reason, logprobs=logprobs)
        if p.include_usage:
            body = {"id": p.response_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
                    "created": p.created, "model": p.model, "choices": [], "usage": usage(p, out)}
            yield _data(body)
        yield _DONE
    except grpc.aio.AioRpcError as exc:
        out.error = s.router.to_http(exc)
        yield _data(out.error.body()) + _DONE
    except OpenAIError as exc:
        out.error = exc
        yield _data(exc.body()) + _DONE
    finally:
        s.cancel()   # no-op when finished; frees worker KV when the client went away mid-stream
