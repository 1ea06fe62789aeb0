"""Keeps a worker registered with the router: register, then heartbeat with its load well within
the lease; register again if the router forgot it (router restart) or was unreachable."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from pdserve import rpc
from pdserve.cluster_auth import Credential
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2
from pdserve.workers.service import WorkerService

log = logging.getLogger("pdserve.worker")
_RETRY_S = 0.5
# A restarted router learns of every worker within this (plus one registration call).
_MAX_HEARTBEAT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Advertised:
    grpc_address: str
    scenario: str
    prefill_tokens_per_s: float
    decode_step_base_s: float
    decode_step_per_seq_s: float
    max_batch_size: int = 0


async def keep_registered(service: WorkerService, router_address: str, ad: Advertised,
                          credential: Credential | None = None) -> None:
    async with rpc.channel(router_address, credential) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        forgotten = False
        while True:
            try:
                if forgotten:
                    # Reservations nobody has claimed were made by the router that forgot us; the
                    # new one cannot use them. Dropped before registering, so none of its own are.
                    for req_id in await service.requests.drop_all_unclaimed("the router restarted"):
                        log.info("request %s: reservation of a previous router dropped", req_id)
                    forgotten = False
                lease_s = await _register(stub, service, ad)
                snapshot = True     # the router forgot this worker's cached blocks when it registered
                while True:
                    await asyncio.sleep(min(lease_s / 3, _MAX_HEARTBEAT_INTERVAL_S))
                    # Ids first, then the free count: a request admitted in between is counted twice
                    # until the next heartbeat (too cautious), never missed.
                    held_req_ids = service.requests.admitted_ids()
                    info = await service.GetInfo(worker_pb2.GetInfoRequest(), None)
                    stored, evicted, reset = await service.drain_prefix_events(snapshot)
                    snapshot = True     # until this heartbeat is answered: its events may be lost
                    resp = await stub.Heartbeat(router_pb2.HeartbeatRequest(
                        worker_id=service.worker_id, instance_id=service.instance_id, load=router_pb2.WorkerLoad(
                            num_free_kv_blocks=info.num_free_kv_blocks, held_req_ids=held_req_ids,
                            num_active_requests=info.num_active_requests, stored_block_hashes=stored,
                            evicted_block_hashes=evicted, block_hashes_reset=reset,
                            prefix_cache=info.prefix_cache, num_preemptions=info.num_preemptions)), timeout=lease_s)
                    snapshot = False
                    if not resp.known:
                        log.warning("router forgot worker %s; registering again", service.worker_id)
                        forgotten = True
                        break
            except grpc.aio.AioRpcError as exc:
                log.warning("router %s unreachable (%s); retrying", router_address, exc.code().name)
                await asyncio.sleep(_RETRY_S)
            except Exception:   # whatever went wrong, a worker that stops registering is lost to the router
                log.exception("registration with router %s failed; retrying", router_address)
                await asyncio.sleep(_RETRY_S)


async def _register(stub: router_pb2_grpc.RouterStub, service: WorkerService, ad: Advertised) -> float:
    info = await service.GetInfo(worker_pb2.GetInfoRequest(), None)
    resp = await stub.Register(router_pb2.RegisterRequest(
        worker_id=info.worker_id, role=info.role, model=info.model, grpc_address=ad.grpc_address,
        kv_endpoints=info.kv_endpoints, num_total_kv_blocks=info.num_total_kv_blocks,
        kv_block_size_tokens=info.kv_block_size_tokens, max_model_len_tokens=info.max_model_len_tokens,
        scenario=ad.scenario, prefill_tokens_per_s=ad.prefill_tokens_per_s,
        decode_step_base_s=ad.decode_step_base_s, decode_step_per_seq_s=ad.decode_step_per_seq_s,
        instance_id=info.instance_id, max_batch_size=ad.max_batch_size), timeout=5.0)
    log.info("registered with router as %s (lease %.1f s)", info.worker_id, resp.lease_s)
    return resp.lease_s


async def deregister(service: WorkerService, router_address: str, credential: Credential | None = None,
                     timeout_s: float = 5.0) -> None:
    """Tell the router to stop sending work here (shutdown); a router that cannot be reached will
    find out from the missing heartbeats instead."""
    try:
        async with rpc.channel(router_address, credential) as channel:
            await router_pb2_grpc.RouterStub(channel).Deregister(
                router_pb2.DeregisterRequest(worker_id=service.worker_id, instance_id=service.instance_id),
                timeout=timeout_s)
        log.info("deregistered from router %s", router_address)
    except grpc.aio.AioRpcError as exc:
        log.warning("could not deregister from router %s: %s", router_address, exc.code().name)
