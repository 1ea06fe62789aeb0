"""gateway.embedded_router against real processes: the router runs inside the gateway's process,
workers and admins reach it over gRPC as usual, and requests, router errors and cancellations
behave as with a router process (the same OpenAI responses and status codes, KV freed)."""
import asyncio

import httpx
import openai
import pytest

from pdserve.launch import LocalCluster
from pdserve.proto_maps import role_name
from pdserve.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import wait_until

TOKEN = "embedded-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "e.db"
    c = LocalCluster(model="tiny", num_prefill=1, num_decode=1, embedded_router=True,
                     env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}", "PDSERVE_ROUTER__ADMIN_TOKEN": TOKEN})
    yield c.start()
    c.stop()


def admin(cluster, method: str, request):
    async def call():
        async with cluster.channel(cluster.router_address) as ch:
            return await getattr(admin_pb2_grpc.AdminStub(ch), method)(request, metadata=AUTH)
    return asyncio.run(call())


def _workers_idle(cluster) -> bool:
    async def infos():
        out = []
        for name in ("prefill-0", "decode-0"):
            async with cluster.channel(cluster.process(name).port) as ch:
                out.append(await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest()))
        return out
    return all(i.num_free_kv_blocks == i.num_total_kv_blocks and i.num_active_requests == 0
               and i.num_pending_transfers == 0 for i in asyncio.run(infos()))


def test_one_process_serves_gateway_and_router_and_workers_register_with_it(cluster):
    assert sorted(p.name for p in cluster.processes) == ["decode-0", "gateway", "prefill-0"]
    gateway = cluster.process("gateway")
    assert gateway.ports == {"router": cluster.router_port, "gateway": cluster.gateway_port}
    workers = admin(cluster, "ListWorkers", admin_pb2.Empty()).workers
    assert sorted(role_name(w.role) for w in workers) == ["decode", "prefill"] and all(w.alive for w in workers)


def test_completions_streamed_and_not_give_the_same_greedy_tokens(cluster):
    oai = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    whole = oai.completions.create(model="tiny", prompt="The embedded router", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="tiny", prompt="The embedded router", max_tokens=10, temperature=0, stream=True))
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens == 10
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4


def test_a_router_error_is_the_same_http_status_and_the_cluster_recovers(cluster):
    decode = next(w for w in admin(cluster, "ListWorkers", admin_pb2.Empty()).workers if role_name(w.role) == "decode")
    admin(cluster, "DrainWorker", admin_pb2.WorkerRef(worker_id=decode.worker_id))
    try:
        r = httpx.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] and "Retry-After" in r.headers
    finally:
        admin(cluster, "UndrainWorker", admin_pb2.WorkerRef(worker_id=decode.worker_id))
    r = httpx.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_client_leaving_mid_stream_frees_the_workers_kv(cluster):
    body = {"model": "tiny", "prompt": "a long answer", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())              # the stream is running; then the client goes away
    assert wait_until(lambda: _workers_idle(cluster), 30)
