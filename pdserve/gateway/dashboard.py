"""The live cluster dashboard: a static page (shipped in the package, no CDN) that polls
/dashboard/state, a JSON view assembled from the router (workers, counters), the store
(scenarios, SLOs, ratio decisions with their reasons) and this gateway's last minute of requests.

Access: with router.admin_token set, the admin token as a bearer header or the session cookie a
sign-in with it sets; without one, only a loopback gateway serves it (a dashboard reachable from
other hosts must not be open)."""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import time
import urllib.parse
from dataclasses import dataclass
from importlib import resources

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pdserve.gateway.dependencies import GatewayDeps, deps
from pdserve.gateway.errors import OpenAIError
from pdserve.policy.scenarios import ScenarioSpec
from pdserve.proto_maps import role_name

router = APIRouter(include_in_schema=False)
COOKIE = "pdserve_dashboard"
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_HISTORY_PER_SCENARIO = 50


@dataclass(frozen=True)
class DashboardAccess:
    admin_token: str = ""
    loopback: bool = True

    def session_value(self) -> str:
        """What the cookie holds: derived from the token, so the token itself never sits in a browser."""
        return hmac.new(self.admin_token.encode(), b"pdserve dashboard session", hashlib.sha256).hexdigest()

    def problem(self, request: Request) -> str | None:
        """Why this request may not see the dashboard, or None."""
        if not self.admin_token:
            return None if self.loopback else (
                "the dashboard is off: this gateway is reachable from other hosts and router.admin_token is not set")
        bearer = request.headers.get("authorization", "")
        if hmac.compare_digest(bearer.encode(), f"Bearer {self.admin_token}".encode()):
            return None
        if hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), self.session_value().encode()):
            return None
        return "sign in with the admin token"


async def _access(request: Request) -> DashboardAccess:
    return request.app.state.dashboard_access


def _page(name: str) -> str:
    return resources.files("pdserve.gateway").joinpath("dashboard", name).read_text()


@router.get("/dashboard")
async def page(request: Request, access: DashboardAccess = Depends(_access)):
    problem = access.problem(request)
    if problem is None:
        return HTMLResponse(_page("index.html"))
    if not access.admin_token:
        return HTMLResponse(f"<!doctype html><title>pdserve</title><p>{problem}</p>", status_code=403)
    return HTMLResponse(_page("login.html").replace("{{problem}}", problem), status_code=401)


@router.post("/dashboard/login")
async def login(request: Request, access: DashboardAccess = Depends(_access)):
    # A plain urlencoded form: parsed here rather than pulling in python-multipart for one field.
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    token = form.get("token", [""])[0]
    if not access.admin_token or not hmac.compare_digest(token.encode(), access.admin_token.encode()):
        return HTMLResponse(_page("login.html").replace("{{problem}}", "wrong admin token"), status_code=401)
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(COOKIE, access.session_value(), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/dashboard")
    return response


@router.get("/dashboard/static/{name}")
async def static(name: str):
    if name not in _STATIC:
        raise OpenAIError(404, f"no such file: {name}", "not_found_error")
    return Response(_page(name), media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/state")
async def state(request: Request, d: GatewayDeps = Depends(deps), access: DashboardAccess = Depends(_access)):
    problem = access.problem(request)
    if problem is not None:
        status = 403 if not access.admin_token else 401
        raise OpenAIError(status, problem, "invalid_request_error" if status == 403 else "authentication_error")
    try:
        resp = await d.router.list_workers_response()
        router_error = None
    except grpc.aio.AioRpcError as exc:
        resp, router_error = None, f"router unreachable: {exc.code().name}"
    scenarios = await asyncio.to_thread(_scenarios, d.store, resp)
    return JSONResponse({
        "now_unix_s": time.time(),
        "model": d.limits.served_model,
        "router_error": router_error,
        "workers": [_worker(w) for w in resp.workers] if resp else [],
        "router": _router(resp) if resp else None,
        "scenarios": scenarios,
        "gateway": request.app.state.live_window.summary(),
        "iccache": d.iccache.stats() if d.iccache is not None else None,
    })


def _worker(w) -> dict:
    pc = w.prefix_cache
    return {"id": w.worker_id, "role": role_name(w.role), "scenario": w.scenario, "alive": w.alive,
            "draining": w.draining, "active_requests": w.num_active_requests,
            "kv_used_blocks": w.num_total_kv_blocks - w.num_free_kv_blocks, "kv_total_blocks": w.num_total_kv_blocks,
            "seconds_since_heartbeat": round(w.seconds_since_heartbeat, 2), "preemptions": w.num_preemptions,
            "prefix_hit_rate": pc.hit_tokens / pc.query_tokens if pc.enabled and pc.query_tokens else None}


def _router(resp) -> dict:
    c = resp.counters
    hits = sum(w.prefix_cache.hit_tokens for w in resp.workers if w.prefix_cache.enabled)
    queries = sum(w.prefix_cache.query_tokens for w in resp.workers if w.prefix_cache.enabled)
    return {"routed": c.routed, "forwarded": c.forwarded, "rejected": c.rejected, "migrated": c.migrated,
            "failed": c.failed, "local_prefills": c.local_prefills,
            "preemptions": sum(w.num_preemptions for w in resp.workers),
            "prefix_hit_rate": hits / queries if queries else None, "prefix_index_blocks": resp.prefix_index_blocks}


def _unix_s(at: dt.datetime) -> float:
    # SQLite hands timezone-aware columns back naive; they were written in UTC.
    return (at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)).timestamp()


def _scenarios(store, resp) -> list[dict]:
    """Every scenario the store or a worker names: SLOs, the live split and the controller's
    decisions (oldest first) with their reasons."""
    rows = {s.name: s for s in store.list_scenarios()}
    pins = store.pins()
    live: dict[str, dict[str, int]] = {}
    for w in resp.workers if resp else []:
        if w.alive and not w.draining:
            split = live.setdefault(w.scenario, {"prefill": 0, "decode": 0, "aggregated": 0})
            split[role_name(w.role)] = split.get(role_name(w.role), 0) + 1
    out = []
    for name in sorted(set(rows) | set(live)):
        row = rows.get(name) or ScenarioSpec(name)   # not in the store: the router serves it with the defaults
        history = store.ratio_history(name, _HISTORY_PER_SCENARIO)
        out.append({
            "name": name,
            "ttft_slo_ms": row.ttft_slo_ms, "tpot_slo_ms": row.tpot_slo_ms,
            "live": live.get(name, {"prefill": 0, "decode": 0, "aggregated": 0}),
            "pinned": list(pins[name]) if name in pins else None,
            "decisions": [{"at_unix_s": _unix_s(c.at), "old": [c.old_prefill, c.old_decode],
                           "new": [c.new_prefill, c.new_decode], "reason": c.reason} for c in reversed(history)],
        })
    return out
