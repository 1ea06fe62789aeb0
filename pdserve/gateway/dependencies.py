"""What every route needs, as FastAPI dependencies: the wired components (`GatewayDeps`), the
caller's tenant (API key check), its rate limits and the request body (size-capped, strict UTF-8 JSON)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
from dataclasses import dataclass, field

import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect

from pdserve.clock import Clock, WallClock
from pdserve.gateway import generation
from pdserve.gateway.admission import ClientGone, InflightLimit
from pdserve.gateway.errors import OpenAIError, bad_request
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.router_client import RouterClient
from pdserve.policy.rate_limit import KeyLimits, RateLimiter, retry_after_header
from pdserve.store import Store
from pdserve.workers.model.tokenizer import Tokenizer

_BEARER = "bearer "


if TYPE_CHECKING:   # the service pulls in torch (embeddings); only its type is needed here
    from pdserve.iccache.service import ICCacheService


@dataclass
class GatewayDeps:
    router: RouterClient
    tokenizer: Tokenizer
    store: Store
    limits: generation.Limits
    max_body_bytes: int
    require_api_key: bool
    inflight: InflightLimit = field(default_factory=lambda: InflightLimit(512, 1))
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    clock: Clock = field(default_factory=WallClock)
    iccache: "ICCacheService | None" = None     # serves limits.routed_model when IC-Cache is on
    # Extra models' tokenizers (IC-Cache's small model), where they differ from the served model's.
    extra_tokenizers: dict[str, Tokenizer] = field(default_factory=dict)

    @property
    def tokenizers(self) -> dict[str, Tokenizer]:
        """Each served model's tokenizer: the extra models' own, else the served model's."""
        return {m: self.extra_tokenizers.get(m, self.tokenizer) for m in self.limits.models}


# The dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in its
# thread pool, three thread hand-offs per completion for what are attribute reads.
def wired(request: Request) -> GatewayDeps:
    return request.app.state.deps


async def deps(request: Request) -> GatewayDeps:
    return request.app.state.deps


async def metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


async def tenant(request: Request) -> str:
    """The API key's tenant ('' when keys are not required); 401 in OpenAI's format otherwise."""
    d = wired(request)
    if not d.require_api_key:
        return ""
    auth = request.headers.get("authorization", "")
    key = auth[len(_BEARER):].strip() if auth.lower().startswith(_BEARER) else ""
    ident = await asyncio.to_thread(d.store.verify_api_key, key) if key else None
    if ident is None:
        raise OpenAIError(401, "Incorrect or missing API key", "invalid_request_error", code="invalid_api_key")
    request.state.api_key = ident
    return ident.tenant


def charge(request: Request, num_tokens: int) -> None:
    """Charge a request of `num_tokens` (prompt + max_tokens) to its API key's rate limits; 429
    with Retry-After when the key is over them (without Retry-After when it never fits)."""
    ident = getattr(request.state, "api_key", None)
    if ident is None:
        return
    d = wired(request)
    limits = KeyLimits(ident.requests_per_minute, ident.tokens_per_minute)
    decision = d.rate_limiter.admit(ident.name, limits, num_tokens, d.clock.now_s())
    if not decision.admitted:
        headers = {} if decision.never else {"Retry-After": retry_after_header(decision.retry_after_s)}
        raise OpenAIError(429, decision.reason, "rate_limit_error", code="rate_limit_exceeded", headers=headers)


async def read_json(request: Request, max_bytes: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(413, f"Request body exceeds {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > max_bytes:
                raise OpenAIError(413, f"Request body exceeds {max_bytes} bytes", code="request_too_large")
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        parsed = orjson.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request(f"Request body is not valid UTF-8 (byte {exc.start})") from exc
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(parsed, dict):
        raise bad_request("Request body must be a JSON object")
    return parsed
