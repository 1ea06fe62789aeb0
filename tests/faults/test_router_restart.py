"""Real processes: the router is killed and started again. A request in flight fails cleanly
(503 with Retry-After) and leaves nothing held on the workers; the workers are back within 2 s of
the new router serving; an operator's pinned ratio and drained worker survive, from the store."""
import asyncio
import concurrent.futures
import os
import signal
import time

import grpc
import httpx
import pytest

from pdserve.launch import LocalCluster
from pdserve.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import wait_until

TOKEN = "restart-test-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


async def _call(cluster, stub_cls, method: str, request, metadata=()):
    async with cluster.channel(cluster.router_address) as ch:
        return await getattr(stub_cls(ch), method)(request, metadata=metadata, timeout=10)


def admin(cluster, method: str, request):
    return asyncio.run(_call(cluster, admin_pb2_grpc.AdminStub, method, request, AUTH))


def workers(cluster) -> list:
    try:
        return list(asyncio.run(_call(cluster, router_pb2_grpc.RouterStub, "ListWorkers",
                                      router_pb2.ListWorkersRequest())).workers)
    except grpc.aio.AioRpcError:
        return []


def worker_info(cluster, port: int) -> worker_pb2.WorkerInfo:
    async def get():
        async with cluster.channel(port) as ch:
            return await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
    return asyncio.run(get())


@pytest.fixture()
def cluster(tmp_path):
    c = LocalCluster(model="tiny", num_prefill=1, num_decode=2, env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db", "PDSERVE_ROUTER__ADMIN_TOKEN": TOKEN,
        "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600"})
    c.start()
    assert wait_until(lambda: sum(w.alive for w in workers(c)) == 3, timeout_s=60)
    yield c
    c.stop()


def test_router_restart_keeps_operator_state_and_leaves_nothing_held(cluster):
    by_id = {w.worker_id: w for w in workers(cluster)}
    decode_ids = sorted(i for i, w in by_id.items() if w.role == worker_pb2.WORKER_ROLE_DECODE)
    admin(cluster, "SetRatio", admin_pb2.SetRatioRequest(scenario="default", num_prefill=1, num_decode=2, pin=True))
    admin(cluster, "DrainWorker", admin_pb2.WorkerRef(worker_id=decode_ids[1]))
    busy_port = int(decode_ids[0].rsplit(":", 1)[1])

    body = {"model": "tiny", "prompt": "a request the router restart cuts short", "max_tokens": 2000,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{cluster.url}/v1/completions", json=body, timeout=120)
        assert wait_until(lambda: worker_info(cluster, busy_port).num_active_requests == 1, timeout_s=60)
        router = cluster.process("router")
        os.kill(router.proc.pid, signal.SIGKILL)
        router.proc.wait(30)
        resp = pending.result(120)
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "overloaded"

    cluster.restart("router")       # returns once the new router prints that it serves
    ready_s = time.monotonic()
    assert wait_until(lambda: sum(w.alive for w in workers(cluster)) == 3, timeout_s=30)
    assert time.monotonic() - ready_s < 2.0, "workers took longer than 2 s to re-register"

    ratio = admin(cluster, "GetRatio", admin_pb2.ScenarioName(name="default"))
    assert (ratio.num_prefill, ratio.num_decode, ratio.pinned) == (1, 2, True)
    drained = {w.worker_id: w.draining for w in workers(cluster)}
    assert drained == {i: i == decode_ids[1] for i in by_id}

    for p in cluster.processes:
        if p.name.startswith(("prefill", "decode")):
            assert wait_until(lambda p=p: _idle(worker_info(cluster, p.port)), timeout_s=30), f"{p.name} still holds KV"
    resp = httpx.post(f"{cluster.url}/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert resp.status_code == 200, resp.text


def _idle(info: worker_pb2.WorkerInfo) -> bool:
    return (info.num_active_requests == 0 and info.num_free_kv_blocks == info.num_total_kv_blocks
            and info.num_pending_transfers == 0)
