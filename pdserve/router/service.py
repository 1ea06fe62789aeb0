"""gRPC adapter of the router: worker registration and heartbeats into the registry, and
Generate, which runs `RequestFlow` (request_flow.py: place -> reserve -> forward prefill -> relay)
under a deadline and a `RequestTracker`. If the caller goes away, the flow cancels the worker
calls and aborts the decode side, which frees its KV. Background loops expire leases and run
the ratio controller (rebalancer.py).
"""
from __future__ import annotations

import asyncio
import math
import logging
from typing import Callable

import grpc

from pdserve import timeline
from pdserve.clock import Clock
from pdserve.cluster_auth import Credential
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.ratio_controller import RatioController
from pdserve.policy.registry import DEFAULT_MAX_BATCH, Role, WorkerPerf, WorkerRecord, WorkerRegistry
from pdserve.policy.request_state import RequestState, RequestTracker
from pdserve.policy.scenarios import DEFAULT_SCENARIO, ScenarioClassifier
from pdserve.proto_maps import ROLE_FROM_PROTO, ROLE_TO_PROTO
from pdserve.router.rebalancer import Rebalancer
from pdserve.router.request_flow import RequestFlow, RouteFailed
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdserve.workers import client

log = logging.getLogger("pdserve.router")
_SET_ROLE_TIMEOUT_S = 10.0
_LIVENESS_TIMEOUT_S = 1.0     # how long a registered instance has to prove it is still there


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, registry: WorkerRegistry, dispatcher: Dispatcher, clock: Clock, request_timeout_s: float,
                 record_event: Callable[[str, str, str, str], None] | None = None, max_prefill_offers: int = 3,
                 scenarios: ScenarioClassifier | None = None, controller: RatioController | None = None,
                 control_interval_s: float = 5.0, record_change: Callable | None = None, max_migrations: int = 3,
                 decode_stall_timeout_s: float = 10.0, max_inflight_requests: int = 512,
                 drained_workers: set[str] | None = None, credential: Credential | None = None):
        self.registry = registry
        self._credential = credential      # carried by every call to a worker
        self.max_inflight_requests = max_inflight_requests
        # Operator drains outlive a worker's re-registration (and, through the store, a restart).
        self.drained_workers = set(drained_workers or ())
        self.scenarios = scenarios or ScenarioClassifier()
        self.controller = controller or RatioController()
        self.control_interval_s = control_interval_s
        self.rebalancer = Rebalancer(registry, self.controller, self.scenarios, clock, self._set_worker_role,
                                     record_change, self._history_sync, drain_timeout_s=request_timeout_s)
        self._control_task: asyncio.Task | None = None
        # (worker_id, role, event, detail) -> persisted worker/role history; blocking, run in a thread.
        self._record_event = record_event
        self.dispatcher = dispatcher
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._expiry_task: asyncio.Task | None = None
        self.trackers: dict[str, RequestTracker] = {}
        self.flow = RequestFlow(dispatcher, self._stub, clock, self.scenarios, self.controller, max_prefill_offers,
                                max_migrations, decode_stall_timeout_s)

    async def start(self) -> None:
        self._expiry_task = asyncio.create_task(self._expire_loop())
        self._control_task = asyncio.create_task(self._control_loop())

    async def stop(self) -> None:
        for task in (self._expiry_task, self._control_task):
            if task:
                task.cancel()
        for ch in self._channels.values():
            await ch.close()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.registry.lease_s / 3)
            for worker_id in self.registry.expire(self.clock.now_s()):
                if self.dispatcher.prefix_index is not None:
                    self.dispatcher.prefix_index.forget(worker_id)
                log.warning("worker %s missed its lease; no new work goes to it", worker_id)
                rec = self.registry.get(worker_id)
                self._history(worker_id, rec.role.value if rec else "", "dead", "missed its lease")

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(self.control_interval_s)
            try:
                await self.rebalancer.control_once()
            except Exception:   # a failed rebalance must not stop future ones
                log.exception("ratio control step failed")

    async def _set_worker_role(self, worker_id: str, role: Role) -> None:
        await self._stub(worker_id).SetRole(worker_pb2.SetRoleRequest(role=ROLE_TO_PROTO[role]),
                                            timeout=_SET_ROLE_TIMEOUT_S)

    def _history_sync(self, worker_id: str, role: str, event: str, detail: str = "") -> None:
        self._history(worker_id, role, event, detail)

    def _history(self, worker_id: str, role: str, event: str, detail: str = "") -> None:
        if self._record_event is None:
            return
        task = asyncio.get_running_loop().run_in_executor(None, self._record_event, worker_id, role, event, detail)
        task.add_done_callback(lambda t: t.exception() and log.error("could not record worker event: %s",
                                                                     t.exception()))

    def _stub(self, worker_id: str) -> worker_pb2_grpc.WorkerStub:
        # One stub per address: building one makes a multicallable for every method, per call.
        address = self.registry.get(worker_id).grpc_address
        stub = self._stubs.get(address)
        if stub is None:
            ch = self._channels.get(address)
            if ch is None:
                host, _, port = address.rpartition(":")
                ch = self._channels[address] = client.channel(int(port), host, self._credential)
            stub = self._stubs[address] = worker_pb2_grpc.WorkerStub(ch)
        return stub

    # ---- registry ----
    async def Register(self, request, context):
        role = ROLE_FROM_PROTO.get(request.role)
        if role is None or not request.worker_id or not request.grpc_address or request.num_total_kv_blocks == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "worker_id, role, grpc_address and num_total_kv_blocks are required")
        if problem := _registration_problem(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        rec = WorkerRecord(
            worker_id=request.worker_id, role=role, model=request.model, grpc_address=request.grpc_address,
            kv_addresses={e.backend: e.address for e in request.kv_endpoints},
            num_total_kv_blocks=request.num_total_kv_blocks, block_size_tokens=request.kv_block_size_tokens or 16,
            max_model_len_tokens=request.max_model_len_tokens, scenario=request.scenario or DEFAULT_SCENARIO,
            max_batch_size=request.max_batch_size,
            perf=WorkerPerf(request.prefill_tokens_per_s, request.decode_step_base_s, request.decode_step_per_seq_s,
                            request.max_batch_size or DEFAULT_MAX_BATCH)
            if request.prefill_tokens_per_s > 0 else None, instance_id=request.instance_id)
        if await self._held_by_another_live_instance(rec):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"worker id {rec.worker_id!r} belongs to a live "
                                "worker; a new instance may take it over only once that one is gone")
        self.registry.register(rec, self.clock.now_s())
        if self.dispatcher.prefix_index is not None:
            self.dispatcher.prefix_index.forget(rec.worker_id)    # its first heartbeat sends a snapshot
        if rec.worker_id in self.drained_workers:
            self.registry.set_draining(rec, True)
        log.info("worker %s registered: role=%s model=%s at %s", rec.worker_id, role.value, rec.model,
                 rec.grpc_address)
        self._history(rec.worker_id, role.value, "registered", f"model={rec.model} address={rec.grpc_address}")
        return router_pb2.RegisterResponse(lease_s=self.registry.lease_s)

    async def _held_by_another_live_instance(self, new: WorkerRecord) -> bool:
        """Whether the id is registered by another instance that still answers as itself (a
        restarted worker replaces its dead predecessor at once; an impostor is refused)."""
        old = self.registry.get(new.worker_id)
        if old is None or old.instance_id == new.instance_id:
            return False
        try:
            info = await self._stub(old.worker_id).GetInfo(worker_pb2.GetInfoRequest(liveness_only=True),
                                                           timeout=_LIVENESS_TIMEOUT_S)
            if info.instance_id == old.instance_id:
                return True
        except grpc.aio.AioRpcError:
            pass
        log.info("worker %s: a new instance replaces one that is gone", new.worker_id)
        return False

    def _same_instance(self, worker_id: str, instance_id: str) -> bool:
        rec = self.registry.get(worker_id)
        return rec is not None and rec.instance_id == instance_id

    async def Heartbeat(self, request, context):
        if not self._same_instance(request.worker_id, request.instance_id):
            return router_pb2.HeartbeatResponse(known=False)     # not the instance registered under this id
        load = request.load
        known = self.registry.heartbeat(request.worker_id, load.num_free_kv_blocks, load.num_active_requests,
                                        self.clock.now_s(), frozenset(load.held_req_ids))
        rec = self.registry.get(request.worker_id)
        if known and rec is not None:
            rec.prefix_cache = load.prefix_cache
            rec.num_preemptions = load.num_preemptions
            index = self.dispatcher.prefix_index
            if index is not None:
                index.apply(request.worker_id, load.stored_block_hashes, load.evicted_block_hashes,
                            load.block_hashes_reset)
        return router_pb2.HeartbeatResponse(known=known)

    async def Deregister(self, request, context):
        rec = self.registry.get(request.worker_id)
        if rec is None or rec.instance_id != request.instance_id:
            return router_pb2.DeregisterResponse(known=False)
        self.registry.set_draining(rec, True)
        log.info("worker %s is shutting down; no new work goes to it", rec.worker_id)
        self._history(rec.worker_id, rec.role.value, "deregistered", "shutting down")
        return router_pb2.DeregisterResponse(known=True)

    async def ListWorkers(self, request, context):
        now = self.clock.now_s()
        index = self.dispatcher.prefix_index
        return router_pb2.ListWorkersResponse(
            prefix_index_blocks=index.num_blocks() if index else 0,
            prefix_index_entries=index.num_entries() if index else 0, counters=self.flow.counters, workers=[
            router_pb2.WorkerStatus(
                worker_id=w.worker_id, role=ROLE_TO_PROTO[w.role], model=w.model, grpc_address=w.grpc_address,
                alive=w.alive, num_free_kv_blocks=w.num_free_kv_blocks, num_total_kv_blocks=w.num_total_kv_blocks,
                num_active_requests=w.num_active_requests, seconds_since_heartbeat=now - w.last_heartbeat_s,
                scenario=w.scenario, draining=w.draining, prefix_cache=w.prefix_cache,
                num_preemptions=w.num_preemptions)
            for w in self.registry.all()])

    # ---- requests ----
    async def Generate(self, request, context):
        req_id = request.req_id
        if not req_id or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "req_id and prompt_token_ids are required")
        if req_id in self.trackers:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req_id} is already running")
        counters = self.flow.counters
        if len(self.trackers) >= self.max_inflight_requests:
            counters.rejected += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the router is routing {len(self.trackers)} requests, its limit")
        counters.routed += 1
        timeline.mark("router.received", req_id)
        tracker = self.trackers[req_id] = RequestTracker(req_id, self.clock.now_s())
        timeout_s = request.timeout_s or self.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in self.flow.run(request, tracker):
                    yield chunk
            tracker.to(RequestState.FINISHED, self.clock.now_s())
        except TimeoutError:
            tracker.to(RequestState.FAILED, self.clock.now_s(), "deadline exceeded")
            counters.failed += 1
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {req_id} exceeded {timeout_s:.0f} s")
        except RouteFailed as exc:
            tracker.to(RequestState.FAILED, self.clock.now_s(), exc.details)
            if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                counters.rejected += 1
            else:
                counters.failed += 1
            await context.abort(exc.code, exc.details)
        except asyncio.CancelledError:
            tracker.to(RequestState.CANCELLED, self.clock.now_s(), "client went away")
            log.info("request %s cancelled by the client", req_id)
            raise
        finally:
            self.trackers.pop(req_id, None)
            log.debug("request %s ended: %s %s", req_id, tracker.state.value, tracker.reason)


def _registration_problem(request: router_pb2.RegisterRequest) -> str | None:
    """What makes a registration unusable: an address the router cannot dial, or speeds the
    dispatch policy cannot compute with."""
    host, _, port = request.grpc_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"grpc_address must be host:port, got {request.grpc_address[:80]!r}"
    speeds = (request.prefill_tokens_per_s, request.decode_step_base_s, request.decode_step_per_seq_s)
    if not all(math.isfinite(v) and v >= 0 for v in speeds):
        return "prefill_tokens_per_s and decode_step_*_s must be finite and >= 0"
    return None
