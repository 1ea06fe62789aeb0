"""Real processes, ten times more requests than the cluster admits, no scenarios configured: the
excess gets 429 with Retry-After at once (while the admitted ones are still held, so "at once" is
an order of events, not a timing), nothing waits out a timeout, and the admitted requests finish.

The admitted requests are held by the decode worker's pause hook (`diagnostics.decode_pause_file`,
with the router's stall timeout out of the way): each streams its first token, which comes with
the prefill's KV, and none can stream a second until the file is removed. (The test used to stop
the decode worker with SIGSTOP once every stream had its first token; a stream that finished
before the last first token left the gateway room for a request that then waited on the stopped
worker.)"""
import asyncio
import json
import time

import grpc
import httpx
import pytest

from pdserve.launch import LocalCluster
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import wait_until

LIMIT = 16
MAX_TOKENS = 64


@pytest.fixture()
def pause_file(tmp_path):
    return tmp_path / "decode-paused"


@pytest.fixture()
def cluster(tmp_path, pause_file):
    c = LocalCluster(model="tiny", num_prefill=1, num_decode=1, env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db", "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600",
        "PDSERVE_GATEWAY__MAX_INFLIGHT_REQUESTS": str(LIMIT), "PDSERVE_ROUTER__MAX_INFLIGHT_REQUESTS": str(LIMIT),
        "PDSERVE_ROUTER__DECODE_STALL_TIMEOUT_S": "3600", "PDSERVE_DIAGNOSTICS__DECODE_PAUSE_FILE": str(pause_file)})
    c.start()
    yield c
    c.stop()


async def _held_stream(http: httpx.AsyncClient, url: str, first_token: asyncio.Event) -> tuple[int, int]:
    """A chat stream: its first event (the assistant role) goes out once the first token reached the
    gateway, whether or not that token has text of its own (tiny's byte tokens often do not)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "held"}], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True}
    num_events, done = 0, False
    async with http.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                assert "error" not in json.loads(line[6:]), line
                num_events += 1
                first_token.set()
    return resp.status_code, num_events if done else -1


async def _timed_post(http: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = await http.post(url, json={"model": "tiny", "prompt": "one too many", "max_tokens": MAX_TOKENS})
    return resp, time.monotonic() - started


async def _router_refusals(cluster, n: int) -> list[grpc.StatusCode]:
    codes = []
    async with cluster.channel(cluster.router_address) as ch:
        for i in range(n):
            req = router_pb2.RouteRequest(req_id=f"direct-{i}", model="tiny", prompt_token_ids=[1, 2, 3],
                                          sampling=worker_pb2.SamplingParams(max_tokens=4))
            try:
                async for _ in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=30):
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    return codes


async def _overload(cluster, pause_file):
    url = f"{cluster.url}/v1/completions"
    limits = httpx.Limits(max_connections=LIMIT * 11, max_keepalive_connections=LIMIT * 11)
    pause_file.touch()          # every admitted request stays in flight after its first token
    try:
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            firsts = [asyncio.Event() for _ in range(LIMIT)]
            held = [asyncio.ensure_future(_held_stream(http, f"{cluster.url}/v1/chat/completions", ev))
                    for ev in firsts]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in firsts)), 120)
            assert not any(t.done() for t in held), "a held stream ended while the decode worker was paused"
            refused = await asyncio.gather(*(_timed_post(http, url) for _ in range(LIMIT * 9)))
            direct = await _router_refusals(cluster, 5)
            assert not any(t.done() for t in held)   # refused while the admitted ones were held
            pause_file.unlink()
            return await asyncio.gather(*held), refused, direct
    finally:
        pause_file.unlink(missing_ok=True)


def test_ten_times_overload_is_refused_at_once_and_the_admitted_finish(cluster, pause_file):
    decode = next(p for p in cluster.processes if p.name == "decode-0")
    held, refused, direct = asyncio.run(_overload(cluster, pause_file))
    for resp, _ in refused:
        assert resp.status_code == 429, resp.text
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "rate_limit_error"
    assert direct == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5       # the router's own limit
    assert all(status == 200 and num_events > 1 for status, num_events in held), held   # all ended in [DONE]
    latencies = sorted(s for _, s in refused)
    print(f"429 latency: p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms")

    async def info():
        async with cluster.channel(decode.port) as ch:
            return await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest())
    assert wait_until(lambda: asyncio.run(info()).num_active_requests == 0, timeout_s=60)
    got = asyncio.run(info())
    assert got.num_free_kv_blocks == got.num_total_kv_blocks
