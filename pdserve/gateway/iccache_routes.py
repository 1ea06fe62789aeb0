"""IC-Cache at the gateway's edge: routing a request for the routed model name, feedback on
answers by response id, and the operator's view (`pdserve admin iccache`).

Routing: the request's text and both pools' live load go to the service's plan; the body is
rewritten for the chosen model (the small one gets the examples first) and then served like any
other request. A request the chosen pool refuses moves once to the other pool (`move`). Pool
load is the mean load of a model's live workers (KV use or queue, whichever is higher:
`pool_loads`), read from the router at most once a second (a heartbeat-old figure either way)."""
from __future__ import annotations

import asyncio
import hmac
import time

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pdserve.gateway.dependencies import GatewayDeps, deps, read_json, tenant, wired
from pdserve.gateway.errors import OpenAIError, bad_request
from pdserve.iccache.prompting import NotRoutable, request_text, with_examples
from pdserve.iccache.service import Plan
from pdserve.policy.iccache.bandit import Arm

router = APIRouter(include_in_schema=False)
_LOAD_TTL_S = 1.0


class PoolLoads:
    def __init__(self):
        self._at_s = -1e9
        self._by_model: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def get(self, d: GatewayDeps) -> dict[str, float]:
        async with self._lock:
            if time.monotonic() - self._at_s > _LOAD_TTL_S:
                try:
                    workers = await d.router.list_workers()
                except grpc.aio.AioRpcError:
                    workers = []      # the request itself will report the router's state
                full = d.iccache.full_load_requests if d.iccache is not None else 32
                self._by_model = pool_loads(workers, full)
                self._at_s = time.monotonic()
            return self._by_model


def pool_loads(workers, full_load_requests: int) -> dict[str, float]:
    """Per model, the mean load of its live workers, 0..1. A worker's load is the higher of its KV
    use and its requests in flight over `full_load_requests`: a queue of short prompts fills
    little KV, yet it is the overload the costly arm must back off from."""
    loads: dict[str, list[float]] = {}
    for w in workers:
        if w.alive and w.num_total_kv_blocks:
            kv_use = 1 - w.num_free_kv_blocks / w.num_total_kv_blocks
            loads.setdefault(w.model, []).append(max(kv_use, min(1.0, w.num_active_requests / full_load_requests)))
    return {m: sum(v) / len(v) for m, v in loads.items()}


async def route(request: Request, body: dict, chat: bool, d: GatewayDeps, tenant: str) -> tuple[dict, Plan | None]:
    """The body to serve and, for the routed model name, IC-Cache's plan (with examples the
    caller's `tenant` may see)."""
    svc = d.iccache
    routed = d.limits.routed_model
    if svc is None or not routed or body.get("model") != routed:
        return body, None
    try:
        text = request_text(body, chat)
    except NotRoutable as exc:
        raise bad_request(f"model '{routed}': {exc}", param="messages" if chat else "prompt") from exc
    loads = await request.app.state.pool_loads.get(d)
    load = {Arm.LARGE: loads.get(svc.large_model, 0.0), Arm.SMALL_WITH_EXAMPLES: loads.get(svc.small_model, 0.0)}
    # The prompt's length in tokens is known only after templating; the text's length stands in.
    plan = await svc.plan(text, len(text) // 4, load, tenant)
    return with_examples(body, chat, plan.model, plan.chosen, svc.text_preamble), plan


def move(body: dict, chat: bool, plan: Plan | None, refusal: OpenAIError, d: GatewayDeps) -> tuple[dict, Plan] | None:
    """The client's body rewritten for the other pool, when the chosen pool refused the request
    for capacity (429) or had nowhere to place it (503) and the other arm may take it."""
    if plan is None or d.iccache is None or refusal.status not in (429, 503):
        return None
    moved = d.iccache.move(plan)
    if moved is None:
        return None
    return with_examples(body, chat, moved.model, moved.chosen, d.iccache.text_preamble), moved


def headers(model: str, plan: Plan | None) -> dict[str, str]:
    out = {"x-pdserve-model": model}
    if plan is not None:
        out["x-pdserve-iccache-examples"] = str(plan.num_examples)
    return out


@router.post("/v1/feedback")
async def feedback(request: Request, d: GatewayDeps = Depends(deps), tenant_: str = Depends(tenant)):
    """Rate an answer: {"response_id": "cmpl-...", "rating": 0..1}, or score it against a gold
    answer: {"response_id": ..., "gold": "..."} (token F1). The first rating counts."""
    if d.iccache is None:
        raise OpenAIError(404, "feedback needs IC-Cache (iccache.enabled)", "not_found_error")
    body = await read_json(request, d.max_body_bytes)
    response_id, rating, gold = body.get("response_id"), body.get("rating"), body.get("gold")
    if not isinstance(response_id, str) or not response_id:
        raise bad_request("response_id (a string) is required", param="response_id")
    if (rating is None) == (gold is None):
        raise bad_request("give one of rating (0..1) or gold (the right answer, to score against)", param="rating")
    if gold is not None and not isinstance(gold, str):
        raise bad_request("gold must be a string", param="gold")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, (int, float)) or not 0 <= rating <= 1):
        raise bad_request("rating must be a number from 0 (bad) to 1 (good)", param="rating")
    learned = await d.iccache.feedback(response_id, None if rating is None else float(rating), gold, tenant_)
    if learned is None:
        raise OpenAIError(404, f"no routed answer with id {response_id!r}", "not_found_error", param="response_id")
    return {"response_id": response_id, "recorded": learned}


async def _admin(request: Request) -> GatewayDeps:
    token = request.app.state.dashboard_access.admin_token
    given = request.headers.get("authorization", "")
    if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise OpenAIError(401, "the IC-Cache admin endpoints need the admin token (router.admin_token)",
                          "authentication_error")
    d = wired(request)
    if d.iccache is None:
        raise OpenAIError(404, "IC-Cache is off (iccache.enabled)", "not_found_error")
    return d


@router.get("/admin/iccache")
async def admin_stats(d: GatewayDeps = Depends(_admin)):
    return d.iccache.stats()


@router.post("/admin/iccache/{action}")
async def admin_pause(action: str, d: GatewayDeps = Depends(_admin)):
    if action not in ("pause", "resume"):
        raise OpenAIError(404, f"no such action: {action} (pause or resume)", "not_found_error")
    d.iccache.chooser.paused = action == "pause"
    await d.iccache.save_policy()       # a paused router stays paused across a restart
    return JSONResponse(d.iccache.stats())
