"""Real processes: a worker killed under a request does not fail it. The router notices the
failure, health-checks the workers involved, marks the dead one suspect and places the request
again; a stream that already delivered tokens continues after them, token for token equal to an
undisturbed greedy run."""
import asyncio
import os
import signal

import pytest

from pdserve.launch import LocalCluster
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import wait_until

PROMPT = list(b"Migration keeps a stream going when its worker dies. ")
# Long enough that the fault lands mid-stream with a wide margin (it follows the 20th token within
# milliseconds; the stream lasts seconds), short enough for CI.
MAX_TOKENS = 1000


async def _live_workers(cluster) -> list:
    async with cluster.channel(cluster.router_address) as ch:
        workers = (await router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest())).workers
    return [w for w in workers if w.alive]


def _workers(cluster) -> list:
    return asyncio.run(_live_workers(cluster))


def _request(req_id: str) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(req_id=req_id, model="tiny", prompt_token_ids=PROMPT,
                                   sampling=worker_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))


async def _stream(cluster, req_id: str, on_token_20=None) -> list[int]:
    tokens = []
    async with cluster.channel(cluster.router_address) as ch:
        async for chunk in router_pb2_grpc.RouterStub(ch).Generate(_request(req_id)):
            before = len(tokens)
            tokens.extend(chunk.token_ids)
            if on_token_20 is not None and before < 20 <= len(tokens):
                await on_token_20()
    return tokens


async def _active(cluster, port: int) -> int:
    async with cluster.channel(port) as ch:
        return (await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest())).num_active_requests


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "d.db"
    # The ratio controller stays out of it (an hour between decisions): roles must not change here.
    c = LocalCluster(model="tiny", num_prefill=2, num_decode=2,
                     env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}", "PDSERVE_ROUTER__DECODE_STALL_TIMEOUT_S": "3",
                          "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600"})
    c.start()
    assert wait_until(lambda: len(_workers(c)) == 4, timeout_s=60), "workers did not register"
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(cluster) -> list[int]:
    """The undisturbed greedy stream every disturbed one must equal."""
    tokens = asyncio.run(_stream(cluster, "undisturbed"))
    assert len(tokens) == MAX_TOKENS
    return tokens


async def _decode_processes(cluster) -> list:
    """Worker processes that may hold a decode stream (by role, whatever their process name)."""
    decode_ids = {w.worker_id for w in await _live_workers(cluster) if w.role == worker_pb2.WORKER_ROLE_DECODE}
    return [p for p in cluster.processes if p.proc.poll() is None and any(i.endswith(f":{p.port}") for i in decode_ids)]


def test_decode_worker_stopped_mid_stream_tokens_resume_from_a_replica(cluster, reference):
    stopped = []

    async def stop_the_decode_worker_streaming_it():
        for p in await _decode_processes(cluster):
            if await _active(cluster, p.port) > 0:
                os.kill(p.proc.pid, signal.SIGSTOP)      # hung, not dead: its sockets stay open
                stopped.append(p)
                return
    try:
        got = asyncio.run(_stream(cluster, "stalled", stop_the_decode_worker_streaming_it))
    finally:
        for p in stopped:
            os.kill(p.proc.pid, signal.SIGCONT)
    assert len(stopped) == 1 and got == reference
    router_log = "\n".join(cluster.process("router").log_lines)
    assert "sent no token for 3 s" in router_log and "migrating after" in router_log
    # Woken up, the stopped worker finds its stream gone and frees what it held.
    assert wait_until(lambda: asyncio.run(_active(cluster, stopped[0].port)) == 0, timeout_s=30)


async def _hit_tokens(cluster, ports) -> dict[int, int]:
    out = {}
    for port in ports:
        async with cluster.channel(port) as ch:
            info = await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest())
        out[port] = info.prefix_cache.hit_tokens
    return out


def test_decode_worker_killed_mid_stream_the_stream_completes_unchanged(cluster, reference):
    killed, hits_at_kill = [], {}

    async def kill_the_decode_worker_streaming_it():
        for p in await _decode_processes(cluster):
            if await _active(cluster, p.port) > 0:
                others = [q.port for q in cluster.processes if q is not p and q.proc.poll() is None
                          and q.name.startswith(("prefill", "decode"))]
                hits_at_kill.update(await _hit_tokens(cluster, others))
                os.kill(p.proc.pid, signal.SIGKILL)
                killed.append(p)
                return

    got = asyncio.run(_stream(cluster, "killed", kill_the_decode_worker_streaming_it))
    assert len(killed) == 1, "no decode worker was streaming the request"
    assert got == reference
    # The moved request's prompt (the prompt, then the tokens already streamed) starts with the
    # prompt's blocks, which the surviving workers hold from the earlier runs: its new prefill and
    # decode link them instead of computing and sending them again.
    hits_after = asyncio.run(_hit_tokens(cluster, list(hits_at_kill)))
    assert sum(hits_after.values()) - sum(hits_at_kill.values()) >= len(PROMPT) // 16 * 16
    survivor = next(p for p in asyncio.run(_decode_processes(cluster)) if p is not killed[0])
    assert wait_until(lambda: asyncio.run(_active(cluster, survivor.port)) == 0, timeout_s=30)
    cluster.restart(killed[0].name)


def test_prefill_worker_dead_before_its_lease_ends_the_request_completes(cluster):
    # The router offers prefill to the least loaded worker, ties broken by id: kill that one. The
    # router still holds it as alive (its lease has seconds to run), so it is offered the request.
    first_id = min(w.worker_id for w in _workers(cluster) if w.role == worker_pb2.WORKER_ROLE_PREFILL)
    doomed = next(p for p in cluster.processes if first_id.endswith(f":{p.port}"))
    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait()
    tokens = asyncio.run(_stream(cluster, "after-prefill-death"))
    assert len(tokens) == MAX_TOKENS
    assert "migrating after 0 streamed tokens" in "\n".join(cluster.process("router").log_lines)
