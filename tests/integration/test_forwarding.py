"""On-demand forwarding with real processes: a saturated prefill worker refuses at once, the
router offers the request to the next worker, and nothing waits out the busy queue."""
import asyncio
import time

import grpc
import pytest

from pdserve.launch import LocalCluster
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdserve.workers import client as wclient

LONG = [i % 250 for i in range(3500)]
SHORT = [i % 250 for i in range(40)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "d.db"
    c = LocalCluster(model="tiny", num_prefill=2, num_decode=1, env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}"})
    yield c.start()
    c.stop()


def test_saturated_prefill_worker_forwards_at_once(cluster):
    async def run():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            router = router_pb2_grpc.RouterStub(ch)
            workers = (await router.ListWorkers(router_pb2.ListWorkersRequest())).workers
            prefill_ids = sorted(w.worker_id for w in workers if w.role == worker_pb2.WORKER_ROLE_PREFILL)
            busy_id = prefill_ids[0]           # the router offers to it first (ties break by id)
            busy = worker_pb2_grpc.WorkerStub(wclient.channel(int(busy_id.rsplit(":", 1)[1])))
            # Saturate it directly with long prompts, ~4 s of work, due within the worker's default 2 s
            # TTFT: they are more urgent than the 2.5 s requests below, so FlowPrefill would not
            # preempt them, and the busy worker must refuse instead.
            nowhere = worker_pb2.KVEndpoint(backend="tcp", address=b"127.0.0.1:1")
            load = [asyncio.ensure_future(busy.Prefill(worker_pb2.PrefillRequest(
                req_id=f"load-{i}", prompt_token_ids=LONG, sampling=worker_pb2.SamplingParams(max_tokens=1),
                target=nowhere, transfer_id=1))) for i in range(6)]
            await asyncio.sleep(0.3)
            latencies = []
            for i in range(5):
                start = time.perf_counter()
                chunks = [c async for c in router.Generate(router_pb2.RouteRequest(
                    req_id=f"urgent-{i}", model="tiny", prompt_token_ids=SHORT, ttft_slo_ms=2500,
                    sampling=worker_pb2.SamplingParams(max_tokens=4, ignore_eos=True)))]
                latencies.append(time.perf_counter() - start)
                assert sum(len(c.token_ids) for c in chunks) == 4
            busy_still_working = not all(t.done() for t in load)
            await asyncio.gather(*load, return_exceptions=True)
            return busy_id, latencies, busy_still_working
    busy_id, latencies, busy_still_working = asyncio.run(run())
    assert busy_still_working, "the busy worker's queue drained before the test ended; load too small"
    assert max(latencies) < 1.0, latencies          # none waited behind the ~4 s queue
    busy_log = "\n".join(next(p for p in cluster.processes if p.port == int(busy_id.rsplit(":", 1)[1])).log_lines)
    assert sum(f"urgent-{i}: rejected for on-demand forwarding" in busy_log for i in range(5)) >= 4
    router_log = "\n".join(cluster.process("router").log_lines)
    assert "refused the prefill; forwarding" in router_log


def test_all_refusing_gives_resource_exhausted_quickly(cluster):
    async def run():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            router = router_pb2_grpc.RouterStub(ch)
            start = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                # 1 ms budget: no worker can prefill 3500 tokens in time, so every one refuses.
                async for _ in router.Generate(router_pb2.RouteRequest(
                        req_id="impossible", model="tiny", prompt_token_ids=LONG, ttft_slo_ms=1,
                        sampling=worker_pb2.SamplingParams(max_tokens=4))):
                    pass
            return err.value, time.perf_counter() - start
    err, elapsed = asyncio.run(run())
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "refused" in err.details()
    assert elapsed < 1.0
