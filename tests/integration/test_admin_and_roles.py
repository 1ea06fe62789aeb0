"""gRPC Admin API against a real cluster: authentication, every call, invalid arguments, and role
changes under continuous load that lose no request."""
import asyncio
import os
import subprocess
import sys
import threading

import grpc
import httpx
import pytest

from pdserve.launch import LocalCluster
from pdserve.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import wait_until

TOKEN = "s3cret-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "d.db"
    c = LocalCluster(model="tiny", num_prefill=2, num_decode=2, env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{db}", "PDSERVE_ROUTER__ADMIN_TOKEN": TOKEN,
        # The automatic controller stays out of the way; these tests steer the ratio by hand.
        "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600"})
    yield c.start()
    c.stop()


def admin(cluster, method: str, request, metadata=AUTH):
    async def call():
        async with cluster.channel(cluster.router_address) as ch:
            return await getattr(admin_pb2_grpc.AdminStub(ch), method)(request, metadata=metadata)
    return asyncio.run(call())


CALLS = [("ListWorkers", admin_pb2.Empty()), ("ListScenarios", admin_pb2.Empty()),
         ("GetScenario", admin_pb2.ScenarioName(name="x")), ("UpsertScenario", admin_pb2.Scenario(name="x")),
         ("DeleteScenario", admin_pb2.ScenarioName(name="x")), ("GetRatio", admin_pb2.ScenarioName(name="default")),
         ("GetRatioHistory", admin_pb2.ScenarioName(name="default")),
         ("SetRatio", admin_pb2.SetRatioRequest(scenario="default")), ("UnpinRatio", admin_pb2.ScenarioName(name="x")),
         ("DrainWorker", admin_pb2.WorkerRef(worker_id="x")), ("UndrainWorker", admin_pb2.WorkerRef(worker_id="x")),
         ("SetWorkerRole", admin_pb2.SetWorkerRoleRequest(worker_id="x", role="decode"))]


@pytest.mark.parametrize("method,request_msg", CALLS, ids=[c[0] for c in CALLS])
@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)], ids=["none", "wrong"])
def test_every_call_needs_the_token(cluster, method, request_msg, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        admin(cluster, method, request_msg, metadata)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_scenarios_crud_and_invalid_arguments(cluster):
    s = admin(cluster, "UpsertScenario", admin_pb2.Scenario(name="code", ttft_slo_ms=800, tpot_slo_ms=60,
                                                             header_values=["coding"], tenants=["acme"]))
    assert s.name == "code"
    assert [x.name for x in admin(cluster, "ListScenarios", admin_pb2.Empty()).scenarios] == ["code"]
    assert admin(cluster, "GetScenario", admin_pb2.ScenarioName(name="code")).tpot_slo_ms == 60
    for bad in (admin_pb2.Scenario(name="z", ttft_slo_ms=0, tpot_slo_ms=10),
                admin_pb2.Scenario(name="", ttft_slo_ms=10, tpot_slo_ms=10),
                admin_pb2.Scenario(name="z", ttft_slo_ms=10, tpot_slo_ms=10, prefix_hashes=["ab"])):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            admin(cluster, "UpsertScenario", bad)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
    r = httpx.post(f"{cluster.url}/v1/completions", headers={"x-pdserve-scenario": "coding", "x-request-id": "cls-1"},
                   json={"model": "tiny", "prompt": "def f():", "max_tokens": 2})
    assert r.status_code == 200
    assert wait_until(lambda: any("request cls-1." in l and "placed: scenario=code" in l
                                  for l in cluster.process("router").log_lines), 5)
    admin(cluster, "DeleteScenario", admin_pb2.ScenarioName(name="code"))
    for method in ("GetScenario", "DeleteScenario"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            admin(cluster, method, admin_pb2.ScenarioName(name="code"))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_workers_drain_and_invalid_worker_calls(cluster):
    workers = admin(cluster, "ListWorkers", admin_pb2.Empty()).workers
    assert len(workers) == 4 and all(w.alive for w in workers)
    wid = workers[0].worker_id
    assert admin(cluster, "DrainWorker", admin_pb2.WorkerRef(worker_id=wid)).draining
    assert not admin(cluster, "UndrainWorker", admin_pb2.WorkerRef(worker_id=wid)).draining
    with pytest.raises(grpc.aio.AioRpcError) as err:
        admin(cluster, "SetWorkerRole", admin_pb2.SetWorkerRoleRequest(worker_id=wid, role="chef"))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        admin(cluster, "DrainWorker", admin_pb2.WorkerRef(worker_id="nope:1"))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        admin(cluster, "SetRatio", admin_pb2.SetRatioRequest(scenario="default", num_prefill=5, num_decode=5))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "add up" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        admin(cluster, "GetRatio", admin_pb2.ScenarioName(name="no-such-group"))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_role_changes_under_load_lose_nothing(cluster):
    sent, completed, failures = [0], [0], []
    stop = threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            n = 0
            while not stop.is_set():
                sent[0] += 1
                r = http.post("/v1/completions", json={"model": "tiny", "prompt": f"client {i} request {n}",
                                                       "max_tokens": 12, "temperature": 0})
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1:
                    completed[0] += 1
                else:
                    failures.append(r.text)
                n += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    def traffic_flows() -> None:
        # Each role change happens while requests are completing, however fast this machine is.
        before = completed[0]
        assert wait_until(lambda: completed[0] >= before + 4 or failures, timeout_s=60), "no traffic completed"

    try:
        for target, pin in (((3, 1), True), ((1, 3), True), ((2, 2), False)):
            traffic_flows()
            ratio = admin(cluster, "SetRatio", admin_pb2.SetRatioRequest(
                scenario="default", num_prefill=target[0], num_decode=target[1], pin=pin))
            assert (ratio.num_prefill, ratio.num_decode, ratio.pinned) == (*target, pin)
        traffic_flows()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [] and sent[0] == completed[0] and completed[0] > 10
    assert admin(cluster, "UnpinRatio", admin_pb2.ScenarioName(name="default")).pinned is False
    history = admin(cluster, "GetRatioHistory", admin_pb2.ScenarioName(name="default")).changes
    assert [(c.new_prefill, c.new_decode) for c in history[:3]] == [(2, 2), (1, 3), (3, 1)]
    # The token from the environment, not the command line (which every user of the host can read).
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "admin", "--router", cluster.router_address,
                          "workers"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PDSERVE_ADMIN_TOKEN": TOKEN})
    assert out.returncode == 0 and "draining" in out.stdout and out.stdout.count("127.0.0.1:") == 4
