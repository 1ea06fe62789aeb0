"""The one orchestration of a request across workers; the router's Generate runs it, and so do the
tests that compare disaggregated with aggregated output.

Lifecycle (each step names the policy object that decides it):
1. classify into a scenario (`ScenarioClassifier`) and record the arrival (`RatioController`);
2. place (`Dispatcher.place`): a decode + prefill pair, or an aggregated worker -> PLACED;
3. disaggregated: `ReserveKV` on the decode worker (blocks + armed receiver; a capacity refusal
   retries once on another decode worker), then `Prefill` offered to the workers of
   `Dispatcher.forwarding_order` one after another (on-demand forwarding), concurrently with the
   decode worker's `Generate(remote_prefill)` stream -> WAITING_FOR_KV -> DECODING;
   aggregated: one `Generate` stream -> DECODING;
4. relay tokens as they come (the decode worker's first chunk carries the prefill's figures, from
   the KV's trailer); on any exit the decode stream is cancelled and `Abort`ed, which frees its
   KV, and the dispatcher's load accounting is settled; a prefill still running is cancelled,
   unless the answer is complete (its reply, after the transfer's acknowledgement, is not waited for).
Failures surface as `RouteFailed(grpc status, message)`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc

from pdserve import timeline
from pdserve.aio import within
from pdserve.clock import Clock
from pdserve.policy.dispatch import Dispatcher, Placement
from pdserve.policy.ratio_controller import RatioController
from pdserve.policy.registry import NoCapacity, NoWorkers
from pdserve.policy.request_state import RequestState, RequestTracker
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.v1 import router_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("pdserve.router")
# One retry on another decode worker when the chosen one refuses for capacity (stale heartbeat).
_MAX_PLACEMENT_TRIES = 2
_ABORT_TIMEOUT_S = 2.0
_CONTROL_CALL_TIMEOUT_S = 3.0      # ReserveKV (normally milliseconds): a hung decode worker must not hold the request
_HEALTH_CHECK_TIMEOUT_S = 1.0
# Backstop only: a worker refuses a prompt it predicts to finish later than its wait budget (30 s
# by default) and a transfer stalls out after 10 s; keepalive finds a vanished worker in ~15 s.
_PREFILL_CALL_TIMEOUT_S = 120.0
_ROOM_WAIT_FIRST_S = 0.1           # a migrated request waiting for a full cluster retries this soon,
_ROOM_WAIT_MAX_S = 1.0             # backing off to this, for up to decode_stall_timeout_s in all
# Codes that say a worker (or the transfer between two) failed, not the request itself.
_WORKER_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                              grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED})

# ReserveKV answers that say nothing was reserved; after any other error the router aborts.
_REFUSED_BEFORE_RESERVING = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                                       grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED})

StubFor = Callable[[str], worker_pb2_grpc.WorkerStub]


class RouteFailed(Exception):
    """`worker_ids`: the workers of the failed attempt (None when no worker failed, e.g. every
    prefill worker refused or nothing could be placed): migration checks their health."""

    def __init__(self, code: grpc.StatusCode, details: str, worker_ids: tuple[str, ...] | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.worker_ids = worker_ids


def _attempt_request(request: router_pb2.RouteRequest, attempt: int, streamed: list[int]) -> router_pb2.RouteRequest:
    """The request as the workers of one attempt see it. A retry gets its own id on the workers
    (the failed attempt's KV may still be being released there) and, after tokens were streamed,
    continues from them: they join the prompt and are replayed, not sent again."""
    if attempt == 0:
        return request
    wreq = router_pb2.RouteRequest()
    wreq.CopyFrom(request)
    wreq.req_id = f"{request.req_id}.m{attempt}"
    wreq.prompt_token_ids.extend(streamed)
    wreq.resume_output_token_ids.extend(streamed)
    if streamed:     # the client has the prompt's logprobs (first chunk) already
        wreq.sampling.prompt_logprobs = False
    return wreq


class RequestFlow:
    def __init__(self, dispatcher: Dispatcher, stub_for: StubFor, clock: Clock, scenarios: ScenarioClassifier,
                 controller: RatioController | None = None, max_prefill_offers: int = 3, max_migrations: int = 3,
                 decode_stall_timeout_s: float = 10.0):
        self.dispatcher = dispatcher
        self._stub = stub_for
        self.clock = clock
        self.scenarios = scenarios
        self.controller = controller
        self.max_prefill_offers = max_prefill_offers
        self.max_migrations = max_migrations
        self.decode_stall_timeout_s = decode_stall_timeout_s
        self._background: set[asyncio.Task] = set()
        self.counters = router_pb2.RouterCounters()   # for operators (ListWorkers, the dashboard)

    async def run(self, request: router_pb2.RouteRequest, tracker: RequestTracker) -> AsyncIterator[worker_pb2.TokenChunk]:
        max_tokens = request.sampling.max_tokens or 16
        classified = self.scenarios.classify(request.scenario_header, request.tenant, list(request.prompt_token_ids))
        # The SLO is the classified scenario's; the pool (placement, ratio control) may be the model's own.
        scenario = self.dispatcher.scenario_for(request.model, classified)
        if self.controller is not None:
            self.controller.observe(scenario, self.clock.now_s(), len(request.prompt_token_ids), max_tokens)
        if not request.ttft_slo_ms and classified in self.scenarios.specs:
            request.ttft_slo_ms = self.scenarios.spec(classified).ttft_slo_ms
        streamed: list[int] = []        # tokens the client already has: a migration continues after them
        excluded: set[str] = set()
        migrations, tries, room_waits, room_wait_s = 0, 0, 0, 0.0
        while True:
            wreq = _attempt_request(request, tries, streamed)
            tries += 1
            try:
                async for chunk in self._attempt(wreq, max_tokens - len(streamed), scenario, tracker, excluded):
                    streamed.extend(chunk.token_ids)
                    yield chunk
                return
            except RouteFailed as exc:
                no_room = exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED or (
                    exc.code is grpc.StatusCode.UNAVAILABLE and exc.worker_ids is None)
                if migrations > 0 and no_room and room_wait_s < self.decode_stall_timeout_s:
                    # A moved request found every remaining worker full, or none live (one that
                    # was stopped has not heartbeated yet): it waits for room (a client may be
                    # reading its stream already) where a new one gets a 429 or 503 at once.
                    delay_s = min(_ROOM_WAIT_MAX_S, _ROOM_WAIT_FIRST_S * 2 ** room_waits)
                    room_waits, room_wait_s = room_waits + 1, room_wait_s + delay_s
                    tracker.to(RequestState.MIGRATING, self.clock.now_s(), f"waiting for room: {exc.details}")
                    await asyncio.sleep(delay_s)
                    continue
                if exc.worker_ids is None or exc.code not in _WORKER_FAILURES or migrations == self.max_migrations:
                    raise
                migrations += 1
                self.counters.migrated += 1
                excluded |= await self._suspects(exc.worker_ids)
                tracker.to(RequestState.MIGRATING, self.clock.now_s(), exc.details)
                log.warning("request %s: migrating after %d streamed tokens (%s); suspect workers: %s",
                            request.req_id, len(streamed), exc.details, sorted(excluded) or "none")

    async def _suspects(self, worker_ids: tuple[str, ...]) -> set[str]:
        """Which of the workers involved in a failure are gone: marked suspect (no new work until
        they heartbeat again) and kept out of this request's next placement."""
        gone = set()
        for worker_id in worker_ids:
            try:
                await self._stub(worker_id).GetInfo(worker_pb2.GetInfoRequest(liveness_only=True),
                                                    timeout=_HEALTH_CHECK_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                self.dispatcher.registry.mark_suspect(worker_id)
                gone.add(worker_id)
        return gone

    async def _attempt(self, request, max_tokens: int, scenario: str, tracker: RequestTracker,
                       excluded: set[str]) -> AsyncIterator[worker_pb2.TokenChunk]:
        placement, reservation = await self._place_and_reserve(request, max_tokens, scenario, excluded)
        timeline.mark("router.reserved", request.req_id)
        tracker.to(RequestState.PLACED, self.clock.now_s())
        self.counters.local_prefills += placement.local_prefill
        log.info("request %s placed: scenario=%s prefill=%s decode=%s backend=%s", request.req_id, scenario,
                 placement.prefill_id, placement.decode_id, placement.kv_backend)
        try:
            stream = (self._disaggregated(request, placement, reservation, tracker) if placement.disaggregated
                      else self._aggregated(request, placement, tracker))
            async for chunk in stream:
                yield chunk
        except RouteFailed as exc:
            if exc.worker_ids is not None or exc.code in _WORKER_FAILURES:
                # Every worker of the placement is a suspect until it answers a health check.
                exc.worker_ids = tuple(w for w in (placement.prefill_id, placement.decode_id) if w)
            raise
        finally:
            self.dispatcher.on_finish(placement)

    async def _place_and_reserve(self, request, max_tokens: int, scenario: str, excluded: set[str]):
        excluded, refusals = set(excluded), []
        for attempt in range(_MAX_PLACEMENT_TRIES):
            try:
                placement = self._place(request, max_tokens, frozenset(excluded), scenario)
            except RouteFailed as exc:
                # No other worker to try: the client learns why the one tried refused (its batch
                # full, say), not only that no worker looked free.
                if refusals and exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise RouteFailed(exc.code, f"{'; '.join(refusals)}, and no other could take it") from exc
                raise
            # Counted before the first await: requests placed while this one's reservation is in
            # flight see its load (else a burst herds onto the same worker).
            self.dispatcher.on_start(placement)
            if not placement.disaggregated:
                return placement, None
            try:
                reservation = await self._reserve(request, placement, attempt + 1 == _MAX_PLACEMENT_TRIES, refusals)
            except BaseException:
                self._unplace(placement)
                raise
            if reservation is not None:
                return placement, reservation
            self._unplace(placement)
            excluded.add(placement.decode_id)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _unplace(self, placement: Placement) -> None:
        self.dispatcher.on_prefill_done(placement.prefill_id, placement.prefill_tokens)
        self.dispatcher.on_finish(placement)

    async def _reserve(self, request, placement: Placement, last_try: bool, refusals: list[str]):
        """ReserveKV on the placement's decode worker; None: it is full (why: added to `refusals`),
        try another one."""
        try:
            return await self._stub(placement.decode_id).ReserveKV(worker_pb2.ReserveKVRequest(
                req_id=request.req_id, num_prompt_tokens=len(request.prompt_token_ids),
                prompt_token_ids=request.prompt_token_ids, backend=placement.kv_backend),
                timeout=_CONTROL_CALL_TIMEOUT_S)
        except asyncio.CancelledError:
            # The worker may have reserved already and no decode stream will claim it.
            self._abort_in_background(placement.decode_id, request.req_id)
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _REFUSED_BEFORE_RESERVING:
                # A deadline, a lost connection or a worker error: the worker may have reserved
                # anyway (its handler does not wait, so it finishes even after the caller gave up).
                self._abort_in_background(placement.decode_id, request.req_id)
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and not last_try:
                refusals.append(f"a decode worker refused: {exc.details()}")
                return None
            raise RouteFailed(exc.code(), f"decode worker refused: {exc.details()}",
                              (placement.decode_id,)) from exc

    def _place(self, request, max_tokens: int, excluded: frozenset[str], scenario: str) -> Placement:
        try:
            return self.dispatcher.place(request.model, len(request.prompt_token_ids), max_tokens, excluded,
                                         scenario=scenario, req_id=request.req_id,
                                         prompt_ids=request.prompt_token_ids)
        except NoWorkers as exc:
            raise RouteFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except NoCapacity as exc:
            raise RouteFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc

    async def _aggregated(self, request, placement: Placement, tracker: RequestTracker):
        tracker.to(RequestState.DECODING, self.clock.now_s())
        call = self._stub(placement.decode_id).Generate(worker_pb2.GenerateRequest(
            req_id=request.req_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
            ttft_slo_ms=request.ttft_slo_ms, resume_output_token_ids=request.resume_output_token_ids))
        async for chunk in self._relay(call, placement.decode_id, request.req_id, tracker):
            yield chunk

    async def _disaggregated(self, request, placement: Placement, reservation, tracker: RequestTracker):
        tracker.to(RequestState.WAITING_FOR_KV, self.clock.now_s())
        prefill = asyncio.ensure_future(self._forward_prefill(request, placement, reservation))
        call, finished = None, False
        try:
            # The prefill is the critical path (compute, then KV); the decode stream need only be
            # open when the KV is in. One loop turn lets the prefill's call go out first.
            await asyncio.sleep(0)
            call = self._stub(placement.decode_id).Generate(worker_pb2.GenerateRequest(
                req_id=request.req_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                remote_prefill=True, resume_output_token_ids=request.resume_output_token_ids))
            first = asyncio.ensure_future(call.read())
            await asyncio.wait({prefill, first}, return_when=asyncio.FIRST_COMPLETED)
            if prefill.done() and prefill.exception() is not None and not first.done():
                first.cancel()
                raise prefill.exception()
            async for chunk in self._relay(call, placement.decode_id, request.req_id, tracker, first):
                if chunk.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
                    finished = True
                    timeline.mark("router.last_chunk", request.req_id)
                yield chunk
        except RouteFailed:
            # The decode side usually fails *because* the prefill did: report the cause.
            if prefill.done() and isinstance(prefill.exception(), RouteFailed):
                raise prefill.exception() from None
            raise
        finally:
            if finished and not prefill.done():
                self._let_finish(prefill, request.req_id)
            elif not prefill.done():
                prefill.cancel()
            if call is None:        # cancelled before the stream opened: the reservation is unclaimed
                await self._abort(placement.decode_id, request.req_id)
            elif not call.done():
                await self._abort_decode(call, placement.decode_id, request.req_id)

    async def _forward_prefill(self, request, placement: Placement, reservation) -> worker_pb2.PrefillResponse:
        """On-demand forwarding: offer the prefill to one worker after another; each accepts or
        refuses at once (RESOURCE_EXHAUSTED), so nothing waits on a queue that cannot serve it."""
        current, reasons = placement.prefill_id, []
        try:
            for prefill_id in self.dispatcher.forwarding_order(request.model, placement, self.max_prefill_offers):
                if prefill_id != current:
                    self.dispatcher.on_prefill_forwarded(current, prefill_id, placement.prefill_tokens)
                    self.counters.forwarded += 1
                    current = prefill_id
                try:
                    return await self._stub(prefill_id).Prefill(worker_pb2.PrefillRequest(
                        req_id=request.req_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                        target=reservation.endpoint, transfer_id=reservation.transfer_id,
                        transfer_token=reservation.transfer_token, skip_kv_tokens=reservation.num_cached_tokens,
                        ttft_slo_ms=request.ttft_slo_ms, resume_output_token_ids=request.resume_output_token_ids),
                        timeout=_PREFILL_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise RouteFailed(exc.code(), f"prefill failed on {prefill_id}: {exc.details()}") from exc
                    reasons.append(f"{prefill_id}: {exc.details()}")
                    log.info("request %s: %s refused the prefill; forwarding", request.req_id, prefill_id)
            raise RouteFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "every prefill worker offered refused: " + "; ".join(reasons))
        finally:
            self.dispatcher.on_prefill_done(current, placement.prefill_tokens)

    def _let_finish(self, prefill: asyncio.Future, req_id: str) -> None:
        """The answer is complete, so the KV arrived, but the prefill worker's reply (sent once its
        transfer is acknowledged) may not have: the figures it carries came with the KV (the decode
        worker's first chunk), so nothing waits for it, and it is not cancelled either (that would
        end the prefill worker's handler as it finishes the transfer)."""
        def ended(task: asyncio.Future) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.info("request %s: the prefill's reply after its answer failed: %s", req_id, task.exception())
        self._background.add(prefill)
        prefill.add_done_callback(ended)

    def _abort_in_background(self, decode_id: str, req_id: str) -> None:
        task = asyncio.ensure_future(self._abort(decode_id, req_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, decode_id: str, req_id: str) -> None:
        try:
            await self._stub(decode_id).Abort(worker_pb2.AbortRequest(req_id=req_id, reason="cancelled"),
                                              timeout=_ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            pass

    async def _abort_decode(self, call, decode_id: str, req_id: str) -> None:
        # Cancelling the stream frees the KV on the worker; Abort also covers a worker that had
        # not yet started streaming.
        call.cancel()
        await self._abort(decode_id, req_id)

    async def _relay(self, call, decode_id: str, req_id: str, tracker: RequestTracker, first=None):
        started = False     # before the first token a prompt may be queued or computing: no stall limit
        try:
            while True:
                if first is not None:
                    chunk, first = await first, None
                elif started:   # after the first token, silence means a hung worker (a stopped process)
                    chunk = await self._next_or_stall(call, decode_id)
                else:
                    chunk = await call.read()
                started = True
                if chunk is grpc.aio.EOF:
                    return
                if tracker.state is RequestState.WAITING_FOR_KV:
                    tracker.to(RequestState.DECODING, self.clock.now_s())
                tracker.first_token(self.clock.now_s())
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise RouteFailed(exc.code(), f"worker {decode_id}: {exc.details()}") from exc
        finally:
            if not call.done():
                await self._abort_decode(call, decode_id, req_id)

    async def _next_or_stall(self, call, decode_id: str):
        try:
            return await within(call.read(), self.decode_stall_timeout_s)
        except TimeoutError:
            raise RouteFailed(grpc.StatusCode.UNAVAILABLE, f"worker {decode_id} sent no token for "
                              f"{self.decode_stall_timeout_s:.0f} s") from None
