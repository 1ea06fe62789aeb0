"""On-demand forwarding: a prefill worker that cannot meet a request's TTFT refuses at once and
the router's RequestFlow offers the request to the next worker, so nothing waits out a busy queue.

The busy worker is held busy by a gate (its running prefill blocks in its layer callback until the
test opens it), not by hoping a load is big enough: the result does not depend on machine speed.
Its predictions come from a fixed cost model, so its refusals are deterministic too."""
import asyncio
import threading

import grpc
import pytest

from pdserve.launch import LocalCluster
from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import FlowPrefillScheduler
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2
from tests.inprocess import worker_cluster
from tests.routing import route

LONG = [i % 250 for i in range(3500)]
SHORT = [i % 250 for i in range(40)]
# 0.1 ms per token per operator: 3500 tokens predict 2.8 s, 40 tokens 32 ms.
FIXED_COST = OperatorCostModel(4, (0.0, 1e-4, 0.0), (0.0, 1e-4))


def flowprefill_fixed_cost(model):
    return FlowPrefillScheduler(model.config.num_layers, FIXED_COST)


def test_saturated_prefill_worker_refuses_and_the_next_one_serves(model_cache_dir):
    async def body():
        async with worker_cluster(model_cache_dir, roles=("prefill", "prefill", "decode"),
                                  scheduler=flowprefill_fixed_cost) as (services, stubs):
            busy, idle = services[0], services[1]     # the router offers to the first one first (ties by id)
            gate = threading.Event()
            now = busy.clock.now_s()
            # Six long prompts due in 2 s, ahead of every urgent request below (due in 2.5 s from
            # their own arrival); the first one blocks in its first layer until the gate opens.
            loads = [busy.prefill.runner.submit(f"load-{i}", LONG, now + 2.0, lambda layer, kv: gate.wait())
                     for i in range(6)]
            try:
                outs = [await route(stubs, f"urgent-{i}", SHORT,
                                    worker_pb2.SamplingParams(max_tokens=4, ignore_eos=True), ttft_slo_ms=2500)
                        for i in range(5)]
                still_queued = busy.prefill.runner.num_pending
            finally:
                gate.set()
            await asyncio.gather(*(asyncio.wrap_future(f) for f in loads))
            return outs, still_queued, busy.prefill.runner.stats, idle.prefill.runner.stats
    outs, still_queued, busy_stats, idle_stats = asyncio.run(body())
    assert all(len(o.token_ids) == 4 for o in outs)
    assert still_queued == 6, "every urgent request was served while the busy queue was still full"
    assert busy_stats.num_rejected == 5 and idle_stats.num_rejected == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "d.db"
    c = LocalCluster(model="tiny", num_prefill=2, num_decode=1, env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}"})
    yield c.start()
    c.stop()


def test_all_refusing_gives_resource_exhausted(cluster):
    """Real processes and the real router: when every worker refuses, the client is told so."""
    async def run():
        async with cluster.channel(cluster.router_address) as ch:
            router = router_pb2_grpc.RouterStub(ch)
            before = (await router.ListWorkers(router_pb2.ListWorkersRequest())).counters
            with pytest.raises(grpc.aio.AioRpcError) as err:
                # 1 ms budget: no worker can prefill 3500 tokens in time, so every one refuses.
                async for _ in router.Generate(router_pb2.RouteRequest(
                        req_id="impossible", model="tiny", prompt_token_ids=LONG, ttft_slo_ms=1,
                        sampling=worker_pb2.SamplingParams(max_tokens=4))):
                    pass
            after = (await router.ListWorkers(router_pb2.ListWorkersRequest())).counters
            return err.value.code(), err.value.details(), before, after
    code, details, before, after = asyncio.run(run())
    # Operators see it too: one move to the second worker, then one refusal to the caller.
    assert (after.routed - before.routed, after.forwarded - before.forwarded) == (1, 1)
    assert (after.rejected - before.rejected, after.failed - before.failed) == (1, 0)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "every prefill worker offered refused" in details
    assert details.count("prefill rejected") == 2          # both prefill workers were offered it
    router_log = "\n".join(cluster.process("router").log_lines)
    assert "refused the prefill; forwarding" in router_log
