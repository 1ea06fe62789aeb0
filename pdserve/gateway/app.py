"""FastAPI app: OpenAI-compatible endpoints, health, readiness and metrics.

A request: x-request-id assigned (or taken from the client) -> API key checked when required ->
body read with a size cap, decoded as strict UTF-8 JSON -> validated and tokenized (generation.py)
-> routed; the outcome is recorded in the store and in Prometheus metrics. Every error leaves in
OpenAI's error format with the status code OpenAI would use.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.gateway import generation
from pdserve.gateway.errors import OpenAIError, bad_request
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.router_client import RouterClient
from pdserve.store import Store
from pdserve.store.models import RequestRecord
from pdserve.proto_maps import role_name
from pdserve.workers.model.tokenizer import Tokenizer

log = logging.getLogger("pdserve.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,96}$")


@dataclass
class GatewayDeps:
    router: RouterClient
    tokenizer: Tokenizer
    store: Store
    limits: generation.Limits
    max_body_bytes: int
    require_api_key: bool


async def _read_json(request: Request, max_bytes: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(413, f"Request body exceeds {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise OpenAIError(413, f"Request body exceeds {max_bytes} bytes", code="request_too_large")
    try:
        parsed = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request(f"Request body is not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(parsed, dict):
        raise bad_request("Request body must be a JSON object")
    return parsed


def create_app(deps: GatewayDeps, metrics: GatewayMetrics | None = None) -> FastAPI:
    app = FastAPI(title="pdserve gateway", docs_url=None, redoc_url=None)
    metrics = metrics or GatewayMetrics()
    app.state.deps, app.state.metrics = deps, metrics
    pending_records: set[asyncio.Task] = set()
    app.state.pending_records = pending_records

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), type_).response()

    @app.middleware("http")
    async def _request_id(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request.state.req_id = given if _REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}"
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.req_id
        return response

    async def _tenant(request: Request) -> str:
        if not deps.require_api_key:
            return ""
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        ident = await asyncio.to_thread(deps.store.verify_api_key, key) if key else None
        if ident is None:
            raise OpenAIError(401, "Incorrect or missing API key", "invalid_request_error", code="invalid_api_key")
        return ident.tenant

    async def _serve(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        started, req_id = time.perf_counter(), request.state.req_id
        out, status, tenant, p = generation.Outcome(), 200, "", None
        metrics.inflight.inc()
        try:
            tenant = await _tenant(request)
            body = await _read_json(request, deps.max_body_bytes)
            p = generation.prepare(body, chat, req_id, deps.tokenizer, deps.limits)
            log.info("request %s: %s, %d prompt tokens, max_tokens=%d, stream=%s", req_id, endpoint,
                     len(p.prompt_ids), p.sampling.max_tokens, p.stream)
            stream = await generation.open_stream(p, deps.router, request.headers.get("x-pdserve-scenario", "")[:128],
                                                  tenant)
            metrics.ttft.observe(stream.first_token_s - stream.started_s)
            if p.stream:
                return StreamingResponse(_finish_stream(p, stream, out, started, tenant, endpoint),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(await generation.collect(p, stream, metrics, out))
        except OpenAIError as exc:
            status, out.error = exc.status, exc
            raise
        except Exception:
            status = 500
            raise
        finally:
            if p is None or not p.stream or status != 200:
                metrics.inflight.dec()
                await _record(req_id, endpoint, tenant, p, out, status, started)

    async def _finish_stream(p, stream, out, started, tenant, endpoint):
        status = 200
        try:
            async for event in generation.sse(p, stream, metrics, out):
                yield event
            status = out.error.status if out.error else 200
        except asyncio.CancelledError:
            status = 499  # client closed the connection mid-stream
            raise
        finally:
            metrics.inflight.dec()
            await _record(p.req_id, endpoint, tenant, p, out, status, started)

    async def _record(req_id, endpoint, tenant, p, out, status, started) -> None:
        latency_s = time.perf_counter() - started
        metrics.requests.labels(endpoint, str(status)).inc()
        if status == 200:
            metrics.e2e.observe(latency_s)
            metrics.tokens.labels("completion").inc(out.num_generated)
        outcome = ("ok" if status == 200 else "cancelled" if status == 499 else
                   "overloaded" if status in (429, 503) else "client_error" if status < 500 else "failed")
        log.info("request %s finished: status=%d outcome=%s tokens=%d latency_ms=%.1f", req_id, status, outcome,
                 out.num_generated, latency_s * 1e3)
        rec = RequestRecord(req_id=req_id, model=p.model if p else "", tenant=tenant, endpoint=endpoint,
                            num_prompt_tokens=len(p.prompt_ids) if p else 0, num_completion_tokens=out.num_generated,
                            ttft_ms=out.ttft_s * 1e3 if out.ttft_s is not None else None,
                            latency_ms=latency_s * 1e3, outcome=outcome, status_code=status)
        # Off the response path: a database write must not add to every request's latency.
        task = asyncio.create_task(asyncio.to_thread(deps.store.record_request, rec))
        pending_records.add(task)
        task.add_done_callback(_record_done)

    def _record_done(task: asyncio.Task) -> None:
        pending_records.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The answer already went out; a store outage must not fail requests.
            log.error("could not record a request: %s", task.exception())

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        await _tenant(request)
        return {"object": "list", "data": [{"id": deps.limits.served_model, "object": "model", "created": 0,
                                            "owned_by": "pdserve"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        try:
            workers = [w for w in await deps.router.list_workers() if w.alive]
        except grpc.aio.AioRpcError as exc:
            return JSONResponse({"status": "router unreachable", "detail": exc.code().name}, status_code=503)
        roles = {role_name(w.role) for w in workers}
        ok = "aggregated" in roles or {"prefill", "decode"} <= roles
        return JSONResponse({"status": "ready" if ok else "waiting for workers", "workers": len(workers)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        try:
            workers = await deps.router.list_workers()
            for role in ("prefill", "decode", "aggregated"):
                metrics.workers_alive.labels(role).set(
                    sum(1 for w in workers if w.alive and role_name(w.role) == role))
            for w in workers:
                metrics.worker_queue.labels(w.worker_id, role_name(w.role)).set(w.num_active_requests)
        except grpc.aio.AioRpcError:
            pass  # metrics of the gateway itself are still worth serving
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    return app
