"""Worker gRPC services in this process on loopback: real servers, real model compute, the fake
KV backend (or a fault-injecting wrapper). Tests reach into a service's objects (its prefill
runner, lifecycle, allocator) to hold it at a chosen point instead of hoping for timing."""
from __future__ import annotations

import contextlib
from typing import Callable

import grpc

from pdserve.clock import WallClock
from pdserve.kvtransfer.backends.fake import FakeAgent, FakeFabric
from pdserve.kvtransfer.faults import Faults, FaultyAgent
from pdserve.policy.prefill_scheduler import make_scheduler
from pdserve.v1 import worker_pb2_grpc
from pdserve.workers import client
from pdserve.workers.engine import Engine
from pdserve.workers.model.loader import load_model
from pdserve.workers.prefill_runner import PrefillRunner
from pdserve.workers.service import WorkerService


def fcfs(model):
    return make_scheduler("fcfs", model.config.num_layers)


@contextlib.asynccontextmanager
async def worker_cluster(model_cache_dir, roles=("prefill", "decode", "aggregated"),
                         prefill_faults: Faults | None = None, lease_s: float = 30.0, num_kv_blocks: int = 64,
                         scheduler: Callable = fcfs, prefix_caching: bool = False,
                         decode_pause_file: str = ""):
    """Yields (services, stubs) in the order of `roles`; worker ids are '<role>-<index>'."""
    fabric, clock = FakeFabric(), WallClock()
    loaded = load_model("tiny", model_cache_dir)
    servers, services, stubs = [], [], []
    try:
        for i, role in enumerate(roles):
            agent = FakeAgent(clock, fabric)
            if role == "prefill" and prefill_faults:
                agent = FaultyAgent(agent, prefill_faults)
            runner = PrefillRunner(loaded.model, scheduler(loaded.model), clock)
            svc = WorkerService(Engine(loaded, num_kv_blocks, 16, 8, prefix_caching), {"fake": agent}, clock,
                                worker_id=f"{role}-{i}", role=role, transfer_timeout_s=2.0, lease_s=lease_s,
                                checksum=True, prefill_runner=runner, decode_pause_file=decode_pause_file)
            server = grpc.aio.server()
            port = server.add_insecure_port("127.0.0.1:0")
            worker_pb2_grpc.add_WorkerServicer_to_server(svc, server)
            await server.start()
            await svc.start()
            servers.append(server)
            services.append(svc)
            stubs.append(worker_pb2_grpc.WorkerStub(client.channel(port)))
        yield services, stubs
    finally:
        for server, svc in zip(servers, services):
            await server.stop(0)
            await svc.stop()
