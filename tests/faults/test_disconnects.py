"""Real processes: 1,000 clients that go away at random points (before the first token, mid-stream,
during a non-streamed request). Afterwards no worker holds a KV block, a reservation or a
transfer, and the gateway has nothing in flight; the cluster still answers. The points are drawn
from a seeded generator; the assertions hold wherever they fall."""
import asyncio
import random
import re

import httpx
import pytest

from pdserve.launch import LocalCluster
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import wait_until

NUM_CLIENTS = 1000
CONCURRENCY = 16


@pytest.fixture()
def cluster(tmp_path):
    # One disaggregated pair and one aggregated worker: both paths see every kind of disconnect.
    c = LocalCluster(model="tiny", num_prefill=1, num_decode=1, num_aggregated=1, env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db", "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600"})
    c.start()
    yield c
    c.stop()


async def _one(http: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    kind = rng.choice(["before_first_token", "mid_stream", "non_streamed"])
    body = {"model": "tiny", "prompt": "x" * rng.randint(1, 200), "max_tokens": rng.randint(8, 64),
            "ignore_eos": True, "stream": kind != "non_streamed"}
    delay_s = rng.uniform(0, 0.05)
    try:
        if kind == "mid_stream":
            stop_after = rng.randint(1, 8)
            async with http.stream("POST", url, json=body) as resp:
                n = 0
                async for line in resp.aiter_lines():
                    n += line.startswith("data: ")
                    if n >= stop_after:
                        break               # leaving the block closes the connection mid-body
        else:
            await asyncio.wait_for(http.post(url, json=body), delay_s)
    except (TimeoutError, httpx.HTTPError):
        pass
    return kind


async def _clients(url: str) -> dict[str, int]:
    rng = random.Random(20261130)
    sem = asyncio.Semaphore(CONCURRENCY)
    counts: dict[str, int] = {}

    async def run(http):
        async with sem:
            kind = await _one(http, url, rng)
            counts[kind] = counts.get(kind, 0) + 1

    # No keep-alive: every client's disconnect closes its own connection.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(run(http) for _ in range(NUM_CLIENTS)))
    return counts


def _idle(cluster, port: int) -> bool:
    async def get():
        async with cluster.channel(port) as ch:
            return await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
    info = asyncio.run(get())
    return (info.num_active_requests == 0 and info.num_free_kv_blocks == info.num_total_kv_blocks
            and info.num_pending_transfers == 0)


def _gateway_inflight(cluster) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    return float(re.search(r"^pdserve_inflight_requests (\S+)$", text, re.M).group(1))


def test_a_thousand_disconnects_leave_nothing_held(cluster):
    counts = asyncio.run(_clients(f"{cluster.url}/v1/completions"))
    assert sum(counts.values()) == NUM_CLIENTS and len(counts) == 3, counts
    # Well inside the 30 s reservation lease: releases come from the cancellations, not expiry.
    for p in cluster.processes:
        if p.name.split("-")[0] in ("prefill", "decode", "aggregated"):
            assert wait_until(lambda p=p: _idle(cluster, p.port), timeout_s=20), f"{p.name} still holds KV or transfers"
    assert wait_until(lambda: _gateway_inflight(cluster) == 0, timeout_s=20)
    resp = httpx.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": "ok?", "max_tokens": 4},
                      timeout=60)
    assert resp.status_code == 200, resp.text
