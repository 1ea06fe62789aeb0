"""Registration on the router's service: what a worker says about itself reaches its record."""
import asyncio

from pdserve.clock import VirtualClock
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.registry import WorkerRegistry
from pdserve.router.service import RouterService
from pdserve.v1 import router_pb2, worker_pb2


def test_a_workers_batch_limit_reaches_its_record():
    registry = WorkerRegistry(lease_s=10.0)
    service = RouterService(registry, Dispatcher(registry), VirtualClock(), request_timeout_s=5.0)

    async def register(worker_id: str, max_batch_size: int) -> None:
        await service.Register(router_pb2.RegisterRequest(
            worker_id=worker_id, role=worker_pb2.WORKER_ROLE_DECODE, model="m", grpc_address="127.0.0.1:1",
            num_total_kv_blocks=64, prefill_tokens_per_s=20_000, decode_step_base_s=0.010,
            decode_step_per_seq_s=0.0005, max_batch_size=max_batch_size), None)
    asyncio.run(register("new", 32))
    asyncio.run(register("old", 0))                 # a worker from before the field: the old default
    assert registry.get("new").perf.max_batch == 32 and registry.get("old").perf.max_batch == 256
