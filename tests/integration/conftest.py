"""Real worker processes on loopback, started once per module."""
import asyncio
import os
import sys

import pytest

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers import client
from pdserve.launch import host_cpus, start_worker, threads_env
from tests.conftest import wait_until


class Cluster:
    def __init__(self, model: str, extra_env: dict[str, str] | None = None):
        # The first alone (it may profile the model and cache it), the others together; each on
        # its share of the cores, as LocalCluster starts them.
        extra_env = {**threads_env(3, {**os.environ, **(extra_env or {})}, host_cpus()), **(extra_env or {})}
        self.procs = {role: start_worker(role, model=model, extra_env=extra_env, wait=role == "prefill")
                      for role in ("prefill", "decode", "aggregated")}
        try:
            for p in self.procs.values():
                p.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stubs(self) -> dict[str, worker_pb2_grpc.WorkerStub]:
        # Channels belong to an event loop: build them inside each asyncio.run().
        return {role: worker_pb2_grpc.WorkerStub(client.channel(p.port)) for role, p in self.procs.items()}

    def info(self, role: str) -> worker_pb2.WorkerInfo:
        async def get():
            return await self.stubs()[role].GetInfo(worker_pb2.GetInfoRequest())
        return asyncio.run(get())

    def assert_idle(self, timeout_s: float = 10.0) -> None:
        """Every worker alive, its KV blocks free and nothing in flight, once its asynchronous
        cleanup has run: a transfer that failed by its deadline is reported at once to whoever
        polls it, while its agent stops tracking it only when its own loop next looks, or after
        the receives still in flight complete (bounded by the stall timeout)."""
        def idle(info: worker_pb2.WorkerInfo) -> bool:
            return (info.num_free_kv_blocks == info.num_total_kv_blocks and info.num_pending_transfers == 0
                    and info.num_active_requests == 0)
        for role in self.procs:
            wait_until(lambda: self.procs[role].proc.poll() is not None or idle(self.info(role)), timeout_s, 0.05)
            info = self.info(role)
            assert info.num_free_kv_blocks == info.num_total_kv_blocks, f"{role} leaked KV blocks"
            assert info.num_pending_transfers == 0, f"{role} still tracks transfers"
            assert info.num_active_requests == 0, f"{role} still has requests"
            assert self.procs[role].proc.poll() is None, f"{role} worker died"

    def stop(self) -> None:
        for role, p in self.procs.items():
            if p.proc.poll() is not None:   # died before the tests were done with it: say how
                print(f"{role} worker exited with {p.proc.returncode}; its last lines:\n"
                      + "\n".join(p.log_lines[-40:]), file=sys.stderr)
            p.stop()


@pytest.fixture(scope="module")
def tiny_cluster():
    c = Cluster("tiny", extra_env={"PDSERVE_WORKER__RESERVATION_LEASE_S": "3"})
    yield c
    c.stop()
