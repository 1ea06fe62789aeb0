"""Only the cluster talks to the cluster: real processes, a cluster secret made per LocalCluster.
A caller without it is refused on every Router and Worker RPC and the cluster keeps serving; a
live worker's id cannot be taken over; a restarted worker takes its id back at once; components
refuse to listen beyond loopback without credentials."""
import asyncio
import os
import subprocess
import sys

import grpc
import httpx
import pytest

from pdserve import rpc
from pdserve.launch import LocalCluster, start_worker
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import wait_until

PROMPT_IDS = list(b"who may call?")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "auth.db"
    c = LocalCluster(model="tiny", env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}"}).start()
    yield c
    c.stop()


def _serves(cluster) -> bool:
    r = httpx.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": "still here?", "max_tokens": 3, "ignore_eos": True},
                   timeout=60)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


async def _codes(address: str, secret: str, calls) -> list[grpc.StatusCode]:
    codes = []
    async with rpc.channel(address, secret) as ch:
        for make_call in calls:
            try:
                result = make_call(ch)
                if hasattr(result, "__aiter__"):
                    _ = [c async for c in result]
                else:
                    await result
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    return codes


ROUTER_CALLS = [
    lambda ch: router_pb2_grpc.RouterStub(ch).Register(router_pb2.RegisterRequest(
        worker_id="intruder", role=worker_pb2.WORKER_ROLE_DECODE, model="tiny", grpc_address="10.9.9.9:1",
        num_total_kv_blocks=10)),
    lambda ch: router_pb2_grpc.RouterStub(ch).Heartbeat(router_pb2.HeartbeatRequest(worker_id="intruder")),
    lambda ch: router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest()),
    lambda ch: router_pb2_grpc.RouterStub(ch).Deregister(router_pb2.DeregisterRequest(worker_id="x")),
    lambda ch: router_pb2_grpc.RouterStub(ch).Generate(router_pb2.RouteRequest(
        req_id="skip-the-gateway", model="tiny", prompt_token_ids=PROMPT_IDS,
        sampling=worker_pb2.SamplingParams(max_tokens=100000))),
]
WORKER_CALLS = [
    lambda ch: worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest()),
    lambda ch: worker_pb2_grpc.WorkerStub(ch).Generate(worker_pb2.GenerateRequest(
        req_id="direct", prompt_token_ids=PROMPT_IDS, sampling=worker_pb2.SamplingParams(max_tokens=4))),
    lambda ch: worker_pb2_grpc.WorkerStub(ch).ReserveKV(worker_pb2.ReserveKVRequest(
        req_id="r", num_prompt_tokens=10, backend="tcp")),
    lambda ch: worker_pb2_grpc.WorkerStub(ch).Prefill(worker_pb2.PrefillRequest(req_id="p", prompt_token_ids=PROMPT_IDS)),
    lambda ch: worker_pb2_grpc.WorkerStub(ch).Abort(worker_pb2.AbortRequest(req_id="r")),
    lambda ch: worker_pb2_grpc.WorkerStub(ch).SetRole(worker_pb2.SetRoleRequest(role=worker_pb2.WORKER_ROLE_DECODE)),
]


@pytest.mark.parametrize("secret", ["", "a-wrong-secret"], ids=["none", "wrong"])
def test_every_router_and_worker_call_needs_the_cluster_secret(cluster, secret):
    router_codes = asyncio.run(_codes(cluster.router_address, secret, ROUTER_CALLS))
    assert router_codes == [grpc.StatusCode.UNAUTHENTICATED] * len(ROUTER_CALLS)
    for name in ("prefill-0", "decode-0"):
        codes = asyncio.run(_codes(f"127.0.0.1:{cluster.process(name).port}", secret, WORKER_CALLS))
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * len(WORKER_CALLS), name
    # The cluster's own calls carry it: nothing changed, the intruder is not registered.
    assert asyncio.run(_codes(cluster.router_address, cluster.cluster_secret, ROUTER_CALLS[2:3])) == [grpc.StatusCode.OK]
    assert _serves(cluster)
    assert "intruder" not in _worker_ids(cluster)


def _workers(cluster) -> list:
    async def get():
        async with cluster.channel(cluster.router_address) as ch:
            return list((await router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest())).workers)
    return asyncio.run(get())


def _worker_ids(cluster) -> set[str]:
    return {w.worker_id for w in _workers(cluster)}


def test_a_live_workers_id_cannot_be_taken_over(cluster):
    victim = next(w for w in _workers(cluster) if w.role == worker_pb2.WORKER_ROLE_PREFILL)

    async def impersonate():
        async with cluster.channel(cluster.router_address) as ch:
            await router_pb2_grpc.RouterStub(ch).Register(router_pb2.RegisterRequest(
                worker_id=victim.worker_id, role=worker_pb2.WORKER_ROLE_PREFILL, model="tiny",
                grpc_address="127.0.0.1:9", num_total_kv_blocks=512, instance_id="impostor"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(impersonate())
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS
    now = {w.worker_id: w for w in _workers(cluster)}[victim.worker_id]
    assert now.grpc_address == victim.grpc_address and now.alive
    assert _serves(cluster)            # prompts still go to the real worker


def test_a_restarted_worker_takes_its_id_back_at_once(cluster):
    env = {"PDSERVE_WORKER__WORKER_ID": "stable-decode", "PDSERVE_CLUSTER__SECRET": cluster.cluster_secret}
    first = start_worker("decode", router_address=cluster.router_address, extra_env=env, name="stable-1")
    try:
        assert wait_until(lambda: "stable-decode" in _worker_ids(cluster), 30)
        first.proc.kill()
        first.proc.wait()
        second = start_worker("decode", router_address=cluster.router_address, extra_env=env, name="stable-2")
        try:
            assert wait_until(lambda: any(w.worker_id == "stable-decode" and w.grpc_address.endswith(f":{second.port}")
                                          for w in _workers(cluster)), 60)
            # Let in at its first try (the router found the old instance gone), not after its lease.
            assert not any("ALREADY_EXISTS" in line for line in second.log_lines)
            router_log = cluster.process("router").log_lines
            assert any("stable-decode: a new instance replaces one that is gone" in line for line in router_log)
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.parametrize("component, env, message", [
    ("router", {"PDSERVE_ROUTER__HOST": "0.0.0.0"}, "without a cluster credential"),
    ("decode", {"PDSERVE_WORKER__HOST": "0.0.0.0", "PDSERVE_MODEL__NAME": "tiny"}, "without a cluster credential"),
    ("gateway", {"PDSERVE_GATEWAY__HOST": "0.0.0.0"}, "without API keys"),
])
def test_nothing_listens_beyond_loopback_without_credentials(component, env, message):
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", component], env={
        **{k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}, **env},
        capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr
