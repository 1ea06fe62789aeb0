"""gRPC adapter of the router: converts protobuf to policy calls and drives worker RPCs.

Request lifecycle: RECEIVED -> place (policy) -> PLACED -> disaggregated: ReserveKV on the decode
worker, then Prefill and the decode Generate stream run concurrently (WAITING_FOR_KV) until the
first token arrives (DECODING); aggregated: one Generate stream. Tokens are relayed as they come.
The whole request runs under a deadline; if the caller goes away, the worker calls are cancelled
and the decode worker is told to Abort, which frees its KV.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from pdserve.clock import Clock
from pdserve.policy.ratio_controller import RatioController, WorkerPerf
from pdserve.policy.scenarios import DEFAULT_SCENARIO, ScenarioClassifier
from pdserve.router.policy import (Dispatcher, NoCapacity, NoWorkers, Placement, RequestState, RequestTracker,
                                   Role, WorkerRecord, WorkerRegistry)
from pdserve.router.rebalancer import Rebalancer
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdserve.workers import client

log = logging.getLogger("pdserve.router")

_ROLE_FROM_PROTO = {worker_pb2.WORKER_ROLE_PREFILL: Role.PREFILL, worker_pb2.WORKER_ROLE_DECODE: Role.DECODE,
                    worker_pb2.WORKER_ROLE_AGGREGATED: Role.AGGREGATED}
_ROLE_TO_PROTO = {v: k for k, v in _ROLE_FROM_PROTO.items()}
# One retry on another decode worker when the chosen one refuses for capacity (stale heartbeat).
_MAX_PLACEMENT_TRIES = 2


class _WorkerFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, registry: WorkerRegistry, dispatcher: Dispatcher, clock: Clock, request_timeout_s: float,
                 record_event: Callable[[str, str, str, str], None] | None = None, max_prefill_offers: int = 3,
                 scenarios: ScenarioClassifier | None = None, controller: RatioController | None = None,
                 control_interval_s: float = 5.0, record_change: Callable | None = None):
        self.registry = registry
        self.max_prefill_offers = max_prefill_offers
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
        self._expiry_task: asyncio.Task | None = None
        self.trackers: dict[str, RequestTracker] = {}

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
        await self._stub(worker_id).SetRole(worker_pb2.SetRoleRequest(role=_ROLE_TO_PROTO[role]), timeout=10.0)

    def _history_sync(self, worker_id: str, role: str, event: str, detail: str = "") -> None:
        self._history(worker_id, role, event, detail)

    def _history(self, worker_id: str, role: str, event: str, detail: str = "") -> None:
        if self._record_event is None:
            return
        task = asyncio.get_running_loop().run_in_executor(None, self._record_event, worker_id, role, event, detail)
        task.add_done_callback(lambda t: t.exception() and log.error("could not record worker event: %s",
                                                                     t.exception()))

    def _stub(self, worker_id: str) -> worker_pb2_grpc.WorkerStub:
        rec = self.registry.get(worker_id)
        ch = self._channels.get(rec.grpc_address)
        if ch is None:
            host, _, port = rec.grpc_address.rpartition(":")
            ch = self._channels[rec.grpc_address] = client.channel(int(port), host)
        return worker_pb2_grpc.WorkerStub(ch)

    # ---- registry ----
    async def Register(self, request, context):
        role = _ROLE_FROM_PROTO.get(request.role)
        if role is None or not request.worker_id or not request.grpc_address or request.num_total_kv_blocks == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "worker_id, role, grpc_address and num_total_kv_blocks are required")
        rec = WorkerRecord(
            worker_id=request.worker_id, role=role, model=request.model, grpc_address=request.grpc_address,
            kv_addresses={e.backend: e.address for e in request.kv_endpoints},
            num_total_kv_blocks=request.num_total_kv_blocks, block_size_tokens=request.kv_block_size_tokens or 16,
            max_model_len_tokens=request.max_model_len_tokens, scenario=request.scenario or DEFAULT_SCENARIO,
            perf=WorkerPerf(request.prefill_tokens_per_s, request.decode_step_base_s, request.decode_step_per_seq_s)
            if request.prefill_tokens_per_s > 0 else None)
        self.registry.register(rec, self.clock.now_s())
        log.info("worker %s registered: role=%s model=%s at %s", rec.worker_id, role.value, rec.model,
                 rec.grpc_address)
        self._history(rec.worker_id, role.value, "registered", f"model={rec.model} address={rec.grpc_address}")
        return router_pb2.RegisterResponse(lease_s=self.registry.lease_s)

    async def Heartbeat(self, request, context):
        known = self.registry.heartbeat(request.worker_id, request.load.num_free_kv_blocks,
                                        request.load.num_active_requests, self.clock.now_s())
        return router_pb2.HeartbeatResponse(known=known)

    async def ListWorkers(self, request, context):
        now = self.clock.now_s()
        return router_pb2.ListWorkersResponse(workers=[
            router_pb2.WorkerStatus(
                worker_id=w.worker_id, role=_ROLE_TO_PROTO[w.role], model=w.model, grpc_address=w.grpc_address,
                alive=w.alive, num_free_kv_blocks=w.num_free_kv_blocks, num_total_kv_blocks=w.num_total_kv_blocks,
                num_active_requests=w.num_active_requests, seconds_since_heartbeat=now - w.last_heartbeat_s,
                scenario=w.scenario, draining=w.draining)
            for w in self.registry.all()])

    # ---- requests ----
    async def Generate(self, request, context):
        req_id = request.req_id
        if not req_id or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "req_id and prompt_token_ids are required")
        if req_id in self.trackers:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req_id} is already running")
        tracker = self.trackers[req_id] = RequestTracker(req_id, self.clock.now_s())
        timeout_s = request.timeout_s or self.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in self._route(request, tracker):
                    yield chunk
            tracker.to(RequestState.FINISHED, self.clock.now_s())
        except TimeoutError:
            tracker.to(RequestState.FAILED, self.clock.now_s(), "deadline exceeded")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {req_id} exceeded {timeout_s:.0f} s")
        except _WorkerFailed as exc:
            tracker.to(RequestState.FAILED, self.clock.now_s(), exc.details)
            await context.abort(exc.code, exc.details)
        except asyncio.CancelledError:
            tracker.to(RequestState.CANCELLED, self.clock.now_s(), "client went away")
            log.info("request %s cancelled by the client", req_id)
            raise
        finally:
            self.trackers.pop(req_id, None)
            log.info("request %s ended: %s %s", req_id, tracker.state.value, tracker.reason)

    async def _route(self, request, tracker: RequestTracker):
        max_tokens = request.sampling.max_tokens or 16
        scenario = self.scenarios.classify(request.scenario_header, request.tenant, list(request.prompt_token_ids))
        self.controller.observe(scenario, self.clock.now_s(), len(request.prompt_token_ids), max_tokens)
        if not request.ttft_slo_ms and scenario in self.scenarios.specs:
            request.ttft_slo_ms = self.scenarios.spec(scenario).ttft_slo_ms
        excluded: set[str] = set()
        reservation = None
        for attempt in range(_MAX_PLACEMENT_TRIES):
            placement = self._place(request.model, len(request.prompt_token_ids), max_tokens, frozenset(excluded),
                                    scenario)
            if placement.disaggregated:
                try:
                    reservation = await self._stub(placement.decode_id).ReserveKV(worker_pb2.ReserveKVRequest(
                        req_id=request.req_id, num_prompt_tokens=len(request.prompt_token_ids),
                        backend=placement.kv_backend))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and attempt + 1 < _MAX_PLACEMENT_TRIES:
                        excluded.add(placement.decode_id)
                        continue
                    raise _WorkerFailed(exc.code(), f"decode worker refused: {exc.details()}") from exc
            tracker.to(RequestState.PLACED, self.clock.now_s())
            log.info("request %s placed: scenario=%s prefill=%s decode=%s backend=%s", request.req_id, scenario,
                     placement.prefill_id, placement.decode_id, placement.kv_backend)
            self.dispatcher.on_start(placement)
            try:
                stream = (self._disaggregated(request, placement, reservation, tracker) if placement.disaggregated
                          else self._aggregated(request, placement, tracker))
                async for chunk in stream:
                    yield chunk
            finally:
                self.dispatcher.on_finish(placement)
            return

    def _place(self, model: str, num_prompt: int, max_tokens: int, excluded: frozenset[str],
               scenario: str) -> Placement:
        try:
            return self.dispatcher.place(model, num_prompt, max_tokens, excluded, group=scenario)
        except NoWorkers as exc:
            raise _WorkerFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except NoCapacity as exc:
            raise _WorkerFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc

    async def _aggregated(self, request, placement: Placement, tracker: RequestTracker):
        tracker.to(RequestState.DECODING, self.clock.now_s())
        call = self._stub(placement.decode_id).Generate(worker_pb2.GenerateRequest(
            req_id=request.req_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling))
        async for chunk in self._relay(call, placement.decode_id, request.req_id, tracker):
            yield chunk

    async def _disaggregated(self, request, placement: Placement, reservation, tracker: RequestTracker):
        tracker.to(RequestState.WAITING_FOR_KV, self.clock.now_s())
        call = self._stub(placement.decode_id).Generate(worker_pb2.GenerateRequest(
            req_id=request.req_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
            remote_prefill=True))
        prefill = asyncio.ensure_future(self._forward_prefill(request, placement, reservation))
        try:
            first = asyncio.ensure_future(call.read())
            await asyncio.wait({prefill, first}, return_when=asyncio.FIRST_COMPLETED)
            if prefill.done() and prefill.exception() is not None and not first.done():
                first.cancel()
                raise prefill.exception()
            async for chunk in self._relay(call, placement.decode_id, request.req_id, tracker, first):
                if chunk.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED and prefill.done() \
                        and not prefill.exception():
                    chunk.kv_transfer_bytes = prefill.result().kv_bytes
                    chunk.prefill_ms = prefill.result().prefill_ms
                yield chunk
        except _WorkerFailed:
            if prefill.done() and isinstance(prefill.exception(), _WorkerFailed):
                raise prefill.exception() from None
            raise
        finally:
            if not prefill.done():
                prefill.cancel()
            if not call.done():
                await self._abort_decode(call, placement.decode_id, request.req_id)

    async def _forward_prefill(self, request, placement: Placement, reservation) -> worker_pb2.PrefillResponse:
        """On-demand forwarding: offer the prefill to one worker after another; each accepts or
        refuses at once (RESOURCE_EXHAUSTED), so nothing waits on a queue that cannot serve it."""
        candidates = [(placement.prefill_id, placement.kv_backend)] + [
            c for c in self.dispatcher.prefill_candidates(request.model, placement.decode_id)
            if c[0] != placement.prefill_id and c[1] == placement.kv_backend]
        current, reasons = placement.prefill_id, []
        try:
            for prefill_id, _ in candidates[: self.max_prefill_offers]:
                if prefill_id != current:
                    self.dispatcher.on_prefill_forwarded(current, prefill_id)
                    current = prefill_id
                try:
                    return await self._stub(prefill_id).Prefill(worker_pb2.PrefillRequest(
                        req_id=request.req_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                        target=reservation.endpoint, transfer_id=reservation.transfer_id,
                        ttft_slo_ms=request.ttft_slo_ms))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise _WorkerFailed(exc.code(), f"prefill failed on {prefill_id}: {exc.details()}") from exc
                    reasons.append(f"{prefill_id}: {exc.details()}")
                    log.info("request %s: %s refused the prefill; forwarding", request.req_id, prefill_id)
            raise _WorkerFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "every prefill worker offered refused: " + "; ".join(reasons))
        finally:
            self.dispatcher.on_prefill_done(current)

    async def _abort_decode(self, call, decode_id: str, req_id: str) -> None:
        # Cancelling the stream frees the KV on the worker; Abort also covers a worker that had
        # not yet started streaming.
        call.cancel()
        try:
            await self._stub(decode_id).Abort(worker_pb2.AbortRequest(req_id=req_id, reason="cancelled"), timeout=2.0)
        except grpc.aio.AioRpcError:
            pass

    async def _relay(self, call, decode_id: str, req_id: str, tracker: RequestTracker, first=None):
        try:
            while True:
                chunk = await (first if first is not None else call.read())
                first = None
                if chunk is grpc.aio.EOF:
                    return
                if tracker.state is RequestState.WAITING_FOR_KV:
                    tracker.to(RequestState.DECODING, self.clock.now_s())
                tracker.first_token(self.clock.now_s())
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _WorkerFailed(exc.code(), f"worker {decode_id}: {exc.details()}") from exc
        finally:
            if not call.done():
                await self._abort_decode(call, decode_id, req_id)
