"""The HTTP routes: OpenAI-compatible completions and chat, models, health, readiness, metrics.

A completion: tenant checked (dependency) -> body read with a size cap -> validated and tokenized
(generation.prepare) -> charged to the key's rate limits -> router stream opened, its first chunk
awaited so placement errors still become status codes -> JSON body or server-sent events ->
outcome recorded (recording.py).
"""
from __future__ import annotations

import logging
import time

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest

from pdserve import timeline
from pdserve.gateway import generation, iccache_routes
from pdserve.gateway.admission import ClientGone, unless_client_leaves
from pdserve.gateway.dependencies import GatewayDeps, charge, deps, metrics, read_json, tenant
from pdserve.gateway.errors import OpenAIError
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.openapi import COMPLETION_RESPONSES, KEYED_ERRORS, body_of
from pdserve.gateway.recording import CLIENT_CLOSED, Attempt, RequestRecorder
from pdserve.proto_maps import role_name

log = logging.getLogger("pdserve.gateway")
router = APIRouter()
_ROLES = ("prefill", "decode", "aggregated")


async def _serve(request: Request, chat: bool):
    # The wired components straight from the app: FastAPI dependencies for three attribute reads
    # were a few percent of the gateway's time per request in a py-spy profile.
    state = request.app.state
    d, m, rec = state.deps, state.metrics, state.recorder
    attempt = Attempt(request.state.req_id, "chat" if chat else "completions", time.perf_counter())
    timeline.mark("gateway.received", attempt.req_id)
    out, status, streaming, admitted = generation.Outcome(), 200, False, False
    m.inflight.inc()
    try:
        attempt.tenant = await tenant(request)
        d.inflight.acquire()
        admitted = True
        client_body = await read_json(request, d.max_body_bytes)
        body, attempt.plan = await iccache_routes.route(request, client_body, chat, d, attempt.tenant)
        p, stream = await _open(request, chat, d, attempt, client_body, body)
        timeline.mark("gateway.first_chunk", attempt.req_id)
        m.ttft.observe(stream.first_token_s - stream.started_s)
        if p.stream:
            streaming = True
            if attempt.plan is not None and d.iccache is not None:
                d.iccache.expect(p.response_id)    # a rating may arrive before the stream's end is recorded
            return _EventStream(_sse(p, stream, out, m), _closer(stream, out, attempt, d, m, rec),
                                iccache_routes.headers(p.model, attempt.plan))
        return generation.FastJSONResponse(await unless_client_leaves(request, generation.collect(p, stream, m, out)),
                                           headers=iccache_routes.headers(p.model, attempt.plan))
    except ClientGone:
        status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)
    except OpenAIError as exc:
        status, out.error = exc.status, exc
        raise
    except Exception:
        status = 500
        raise
    finally:
        timeline.mark("gateway.answered", attempt.req_id)
        if not streaming:       # a stream settles when its response ends (_closer)
            m.inflight.dec()
            if admitted:
                d.inflight.release()
            rec.record(attempt, out, status)


async def _open(request: Request, chat: bool, d: GatewayDeps, attempt: Attempt, client_body: dict, body: dict):
    """The request prepared and its router stream opened. An IC-Cache request that its pool
    refuses moves once to the other pool; if the moved body cannot be served (say, examples push
    it past the small model's context), the client gets the first refusal."""
    refusal: OpenAIError | None = None
    while True:
        try:
            p = attempt.prepared = generation.prepare(body, chat, attempt.req_id, d.tokenizers, d.limits)
        except OpenAIError:
            if refusal is not None:
                raise refusal from None
            raise
        if attempt.plan is not None:
            p.iccache = {"model": p.model, "num_examples": attempt.plan.num_examples}
        if refusal is None:     # one request, charged once against the key's limits
            charge(request, len(p.prompt_ids) + p.sampling.max_tokens)
        log.debug("request %s: %s, %d prompt tokens, max_tokens=%d, stream=%s", attempt.req_id, attempt.endpoint,
                  len(p.prompt_ids), p.sampling.max_tokens, p.stream)
        try:
            stream = await unless_client_leaves(request, generation.open_stream(
                p, d.router, request.headers.get("x-pdserve-scenario", "")[:128], attempt.tenant))
        except OpenAIError as exc:
            moved = iccache_routes.move(client_body, chat, attempt.plan, exc, d)
            if moved is None:
                raise
            refusal, (body, attempt.plan) = exc, moved
            continue
        if attempt.plan is not None:
            request.app.state.metrics.iccache.labels(attempt.plan.arm.value).inc()
        return p, stream


class _EventStream(StreamingResponse):
    """Server-sent events whose clean-up runs when the response ends, however it ends: also when
    the client left before the body started, where the generator's own `finally` never runs."""

    def __init__(self, content, on_close, headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _closer(stream, out, attempt: Attempt, d: GatewayDeps, m: GatewayMetrics, rec: RequestRecorder):
    def close() -> None:
        stream.cancel()     # no-op when finished; frees the worker's KV when the client went away
        m.inflight.dec()
        d.inflight.release()
        # Ended without the generator finishing: the client went away mid-stream.
        rec.record(attempt, out, out.status if out.done else CLIENT_CLOSED)
    return close


async def _sse(p, stream, out, m: GatewayMetrics):
    async for event in generation.sse(p, stream, m, out):
        yield event
    out.status, out.done = (out.error.status if out.error else 200), True


@router.post("/v1/completions", openapi_extra=body_of("/v1/completions"), responses=COMPLETION_RESPONSES)
async def completions(request: Request):
    return await _serve(request, False)


@router.post("/v1/chat/completions", openapi_extra=body_of("/v1/chat/completions"), responses=COMPLETION_RESPONSES)
async def chat_completions(request: Request):
    return await _serve(request, True)


@router.get("/v1/models", responses=KEYED_ERRORS)
async def models(d=Depends(deps), _tenant=Depends(tenant)):
    names = [*d.limits.models, *([d.limits.routed_model] if d.limits.routed_model else [])]
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pdserve"}
                                       for name in names]}


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Router unreachable or no workers to serve yet",
                                       "content": {"application/json": {}}}})
async def ready(d=Depends(deps)):
    try:
        workers = [w for w in await d.router.list_workers() if w.alive]
    except grpc.aio.AioRpcError as exc:
        return JSONResponse({"status": "router unreachable", "detail": exc.code().name}, status_code=503)
    def servable(model: str) -> bool:
        roles = {role_name(w.role) for w in workers if w.model == model}
        return "aggregated" in roles or {"prefill", "decode"} <= roles
    # Every model this gateway serves (IC-Cache's small one too) must have somewhere to run.
    waiting = [m for m in d.limits.models if not servable(m)]
    body = {"status": "waiting for workers" if waiting else "ready", "workers": len(workers)}
    if waiting:
        body["models_without_workers"] = waiting
    return JSONResponse(body, status_code=503 if waiting else 200)


def _prefix_metrics(m, resp) -> None:
    hits = queries = hit_blocks = query_blocks = 0
    for w in resp.workers:
        pc = w.prefix_cache
        if not pc.enabled:
            continue
        values = {"query_tokens": pc.query_tokens, "hit_tokens": pc.hit_tokens, "query_blocks": pc.query_blocks,
                  "hit_blocks": pc.hit_blocks, "evictions": pc.evictions, "cached_blocks": pc.num_cached_blocks}
        for name, value in values.items():
            m.prefix[name].labels(w.worker_id, role_name(w.role)).set(value)
        hits, queries = hits + pc.hit_tokens, queries + pc.query_tokens
        hit_blocks, query_blocks = hit_blocks + pc.hit_blocks, query_blocks + pc.query_blocks
    m.prefix_hit_rate.labels("tokens").set(hits / queries if queries else 0.0)
    m.prefix_hit_rate.labels("blocks").set(hit_blocks / query_blocks if query_blocks else 0.0)
    m.prefix_index.labels("blocks").set(resp.prefix_index_blocks)
    m.prefix_index.labels("entries").set(resp.prefix_index_entries)
    for field in resp.counters.DESCRIPTOR.fields:
        m.router_requests.labels(field.name).set(getattr(resp.counters, field.name))


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(d=Depends(deps), m=Depends(metrics)):
    try:
        resp = await d.router.list_workers_response()
        workers = resp.workers
        for role in _ROLES:
            m.workers_alive.labels(role).set(sum(1 for w in workers if w.alive and role_name(w.role) == role))
        for w in workers:
            m.worker_queue.labels(w.worker_id, role_name(w.role)).set(w.num_active_requests)
        _prefix_metrics(m, resp)
    except grpc.aio.AioRpcError:
        pass  # metrics of the gateway itself are still worth serving
    return Response(generate_latest(m.registry), media_type="text/plain; version=0.0.4")
