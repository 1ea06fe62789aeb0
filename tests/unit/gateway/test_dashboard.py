"""Who may see /dashboard, and the gateway's rolling window behind its latency cards."""
import asyncio
import re

import httpx
import pytest

from pdserve.clock import VirtualClock
from pdserve.gateway.app import GatewayDeps, create_app
from pdserve.gateway.dashboard import COOKIE, DashboardAccess
from pdserve.gateway.generation import Limits
from pdserve.gateway.live_window import LiveWindow, percentile

TOKEN = "adm1n-t0ken-for-tests"


def _requests(access: DashboardAccess, calls):
    """Run `calls(client)` against a gateway app (no router: these paths never reach it)."""
    deps = GatewayDeps(router=None, tokenizer=None, store=None, limits=Limits("tiny", 512, 64, 320),
                       max_body_bytes=1 << 20, require_api_key=False)

    async def run():
        transport = httpx.ASGITransport(app=create_app(deps, dashboard=access))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await calls(client)
    return asyncio.run(run())


def test_a_loopback_gateway_without_a_token_serves_the_page_and_its_assets_locally():
    async def calls(c):
        return [await c.get(p) for p in ("/dashboard", "/dashboard/static/dashboard.js",
                                         "/dashboard/static/dashboard.css", "/dashboard/static/../app.py")]
    page, js, css, escape = _requests(DashboardAccess("", loopback=True), calls)
    assert page.status_code == 200 and "/dashboard/static/dashboard.js" in page.text
    assert js.status_code == 200 and "/dashboard/state" in js.text
    assert css.status_code == 200 and escape.status_code == 404
    for body in (page.text, js.text, css.text):   # nothing fetched from elsewhere: the only URL is SVG's namespace
        assert set(re.findall(r"https?://[^\s\"'`]+", body)) <= {"http://www.w3.org/2000/svg"}


def test_a_gateway_reachable_from_other_hosts_needs_a_token_for_its_dashboard():
    async def calls(c):
        return await c.get("/dashboard"), await c.get("/dashboard/state")
    page, state = _requests(DashboardAccess("", loopback=False), calls)
    assert page.status_code == 403 and "router.admin_token" in page.text
    assert state.status_code == 403 and "router.admin_token" in state.json()["error"]["message"]


def test_with_a_token_the_dashboard_is_refused_until_signed_in():
    async def calls(c):
        anon_page, anon_state = await c.get("/dashboard"), await c.get("/dashboard/state")
        wrong = await c.post("/dashboard/login", data={"token": "guess"})
        bearer = await c.get("/dashboard", headers={"Authorization": f"Bearer {TOKEN}"})
        signed_in = await c.post("/dashboard/login", data={"token": TOKEN})
        cookie = signed_in.cookies.get(COOKIE)
        c.cookies.clear()
        after = await c.get("/dashboard", headers={"Cookie": f"{COOKIE}={cookie}"})
        forged = await c.get("/dashboard", headers={"Cookie": f"{COOKIE}={TOKEN}"})
        return anon_page, anon_state, wrong, bearer, signed_in, cookie, after, forged
    anon_page, anon_state, wrong, bearer, signed_in, cookie, after, forged = _requests(DashboardAccess(TOKEN), calls)
    assert anon_page.status_code == 401 and 'name="token"' in anon_page.text
    assert anon_state.status_code == 401 and anon_state.json()["error"]["type"] == "authentication_error"
    assert wrong.status_code == 401
    assert bearer.status_code == 200 and "dashboard.js" in bearer.text
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    set_cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert cookie and TOKEN not in cookie            # the browser holds a derived value, not the token
    assert after.status_code == 200 and forged.status_code == 401


def test_live_window_reports_the_last_minute_on_its_clock():
    clock = VirtualClock(1000.0)
    w = LiveWindow(clock, window_s=60.0)
    w.record(200, 0.100, 0.100 + 9 * 0.020, 10)   # TTFT 100 ms, then 9 tokens 20 ms apart
    w.record(200, 0.300, 0.300, 1)                # one token: no TPOT
    w.record(429, None, 0.001, 0)
    w.record(500, None, 0.050, 0)
    s = w.summary()
    assert (s["requests"], s["ok"], s["rejected"], s["failed"]) == (4, 2, 1, 1)
    assert s["ttft_ms"] == {"p50": pytest.approx(100.0), "p99": pytest.approx(300.0)}
    assert s["tpot_ms"]["p50"] == pytest.approx(20.0)
    clock.advance(61.0)
    assert w.summary()["requests"] == 0 and w.summary()["ttft_ms"]["p50"] is None


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
