"""RequestFlow's retry decisions with scripted worker stubs (the same paths run against real worker
processes in tests/faults/test_migration.py and test_overload.py): a migrated request that finds
the remaining worker full waits for room and continues after the tokens already streamed; a new
request at capacity is refused at once; the health check before a migration does not wait for a
busy worker's bookkeeping."""
import asyncio

import grpc
import pytest

from pdserve.clock import VirtualClock
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.registry import Role, WorkerRecord, WorkerRegistry
from pdserve.policy.request_state import RequestState, RequestTracker
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.router.request_flow import RequestFlow, RouteFailed
from pdserve.v1 import router_pb2, worker_pb2


def _error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class _Call:
    def __init__(self, chunks, error=None):
        self._chunks, self._error, self._done = list(chunks), error, False

    async def read(self):
        if self._chunks:
            return self._chunks.pop(0)
        self._done = True
        if self._error is not None:
            raise self._error
        return grpc.aio.EOF

    def done(self):
        return self._done

    def cancel(self):
        self._done = True


class _Stub:
    def __init__(self, calls, alive=True):
        self.calls, self.alive, self.requests = list(calls), alive, []

    def Generate(self, request):
        self.requests.append(request)
        return self.calls.pop(0)

    async def GetInfo(self, request, timeout=None):
        if not self.alive:
            raise _error(grpc.StatusCode.UNAVAILABLE)
        return worker_pb2.WorkerInfo()

    async def Abort(self, request, timeout=None):
        return worker_pb2.AbortResponse()


def _chunk(tokens, finish=worker_pb2.FINISH_REASON_UNSPECIFIED):
    return worker_pb2.TokenChunk(token_ids=tokens, finish_reason=finish)


def _flow(stubs: dict[str, _Stub], free_blocks: dict[str, int]) -> RequestFlow:
    reg = WorkerRegistry(lease_s=60.0)
    for wid, free in free_blocks.items():
        reg.register(WorkerRecord(worker_id=wid, role=Role.AGGREGATED, model="m", grpc_address=f"h:{wid}",
                                  kv_addresses={}, num_total_kv_blocks=100, block_size_tokens=16,
                                  max_model_len_tokens=4096, num_free_kv_blocks=free), 0.0)
    return RequestFlow(Dispatcher(reg), stubs.__getitem__, VirtualClock(), ScenarioClassifier())


async def _collect(flow: RequestFlow, tracker: RequestTracker) -> list[int]:
    request = router_pb2.RouteRequest(req_id="r", model="m", prompt_token_ids=[5, 6, 7],
                                      sampling=worker_pb2.SamplingParams(max_tokens=3))
    return [t async for chunk in flow.run(request, tracker) for t in chunk.token_ids]


def test_a_migrated_request_waits_for_room_and_continues():
    dying = _Stub([_Call([_chunk([1, 2])], _error(grpc.StatusCode.UNAVAILABLE))], alive=False)
    full_then_free = _Stub([_Call([], _error(grpc.StatusCode.RESOURCE_EXHAUSTED)),
                            _Call([_chunk([3], worker_pb2.FINISH_REASON_LENGTH)])])
    flow = _flow({"a1": dying, "a2": full_then_free}, {"a1": 90, "a2": 80})   # a1 is placed first
    tracker = RequestTracker("r", 0.0)
    assert asyncio.run(_collect(flow, tracker)) == [1, 2, 3]
    retry = full_then_free.requests[-1]
    assert retry.req_id == "r.m2" and list(retry.prompt_token_ids) == [5, 6, 7, 1, 2]
    assert list(retry.resume_output_token_ids) == [1, 2]
    states = [s for s, _ in tracker.history]
    assert states.count(RequestState.MIGRATING) == 2          # the move, then the wait for room


def test_a_new_request_at_capacity_is_refused_at_once():
    full = _Stub([_Call([], _error(grpc.StatusCode.RESOURCE_EXHAUSTED))])
    flow = _flow({"a1": full}, {"a1": 90})
    with pytest.raises(RouteFailed) as failed:
        asyncio.run(_collect(flow, RequestTracker("r", 0.0)))
    assert failed.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(full.requests) == 1



def test_a_migrated_request_waits_for_a_worker_to_come_back():
    """The only other worker is not live when the request moves (stopped, its heartbeat due):
    the request waits for it instead of failing."""
    async def run():
        dying = _Stub([_Call([_chunk([1, 2])], _error(grpc.StatusCode.UNAVAILABLE))], alive=False)
        back = _Stub([_Call([_chunk([3], worker_pb2.FINISH_REASON_LENGTH)])])
        flow = _flow({"a1": dying, "a2": back}, {"a1": 90, "a2": 80})
        registry = flow.dispatcher.registry
        registry.mark_suspect("a2")
        # Its next heartbeat arrives while the moved request is already waiting.
        asyncio.get_running_loop().call_later(0.05, registry.heartbeat, "a2", 80, 0, 1.0)
        return await _collect(flow, RequestTracker("r", 0.0)), back
    tokens, back = asyncio.run(run())
    assert tokens == [1, 2, 3] and list(back.requests[-1].resume_output_token_ids) == [1, 2]

class _PrefillStub:
    """Replies only when the test lets it: the order a short request sees when the decode worker
    finishes before the prefill worker's transfer acknowledgement comes back."""

    def __init__(self):
        self.reply, self.cancelled, self.replied = asyncio.Event(), False, False

    async def Prefill(self, request, timeout=None):
        try:
            await self.reply.wait()
            self.replied = True
            return worker_pb2.PrefillResponse(req_id=request.req_id, kv_bytes=4096, prefill_ms=7.0)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class _DecodeStub(_Stub):
    async def ReserveKV(self, request, timeout=None):
        return worker_pb2.ReserveKVResponse(endpoint=worker_pb2.KVEndpoint(backend="tcp"), transfer_id=1)

    def Generate(self, request):
        # The first chunk carries the prefill's figures, which came with the KV (its trailer).
        first = worker_pb2.TokenChunk(token_ids=[1], kv_transfer_bytes=4096, prefill_ms=7.0, num_cached_tokens=16)
        return _Call([first, _chunk([2], worker_pb2.FINISH_REASON_LENGTH)])


def test_an_answer_ends_without_the_prefill_reply_which_is_left_to_finish():
    async def run():
        prefill, decode = _PrefillStub(), _DecodeStub([])
        reg = WorkerRegistry(lease_s=60.0)
        for wid, role in (("p", Role.PREFILL), ("d", Role.DECODE)):
            reg.register(WorkerRecord(worker_id=wid, role=role, model="m", grpc_address=f"h:{wid}",
                                      kv_addresses={"tcp": f"h:{wid}"}, num_total_kv_blocks=100,
                                      block_size_tokens=16, max_model_len_tokens=4096, num_free_kv_blocks=100), 0.0)
        flow = RequestFlow(Dispatcher(reg), {"p": prefill, "d": decode}.__getitem__, VirtualClock(),
                           ScenarioClassifier())
        request = router_pb2.RouteRequest(req_id="r", model="m", prompt_token_ids=[5, 6, 7],
                                          sampling=worker_pb2.SamplingParams(max_tokens=2))
        # The guard only turns a wait for the reply (the old behaviour) into a failure.
        chunks = await asyncio.wait_for(_chunks(flow, request), 30.0)
        left_running = not prefill.replied and not prefill.cancelled and len(flow._background) == 1
        busy = reg.get("p").num_inflight
        prefill.reply.set()
        await asyncio.gather(*flow._background)
        return chunks, prefill, left_running, busy, reg.get("p").num_inflight
    chunks, prefill, left_running, busy, idle = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == [1, 2]
    assert (chunks[0].kv_transfer_bytes, chunks[0].prefill_ms, chunks[0].num_cached_tokens) == (4096, 7.0, 16)
    assert left_running and (busy, idle) == (1, 0)     # counted on its prefill worker until it replies
    assert prefill.replied and not prefill.cancelled


async def _chunks(flow, request):
    return [c async for c in flow.run(request, RequestTracker(request.req_id, 0.0))]


class _HeldReserveStub(_Stub):
    """ReserveKV answers only when released (or refuses): the window in which other requests are placed."""

    def __init__(self, release: asyncio.Event, error=None):
        super().__init__([])
        self.release, self.error, self.reserving = release, error, 0

    async def ReserveKV(self, request, timeout=None):
        self.reserving += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return worker_pb2.ReserveKVResponse(endpoint=worker_pb2.KVEndpoint(backend="tcp"), transfer_id=1)


def _disaggregated_registry(prefill_ids, decode_ids) -> WorkerRegistry:
    reg = WorkerRegistry(lease_s=60.0)
    for wid, role in [(w, Role.PREFILL) for w in prefill_ids] + [(w, Role.DECODE) for w in decode_ids]:
        reg.register(WorkerRecord(worker_id=wid, role=role, model="m", grpc_address=f"h:{wid}",
                                  kv_addresses={"tcp": f"h:{wid}"}, num_total_kv_blocks=100,
                                  block_size_tokens=16, max_model_len_tokens=4096, num_free_kv_blocks=100), 0.0)
    return reg


def test_requests_placed_while_a_reservation_is_in_flight_see_its_load():
    """A burst: every request is placed before any reservation returns. Each placement is counted
    at once, so the burst spreads over the prefill workers instead of herding onto one."""
    async def run():
        release = asyncio.Event()
        reg = _disaggregated_registry(["p1", "p2", "p3"], ["d"])
        decode = _HeldReserveStub(release, _error(grpc.StatusCode.UNAVAILABLE))
        flow = RequestFlow(Dispatcher(reg), {"d": decode}.__getitem__, VirtualClock(), ScenarioClassifier())

        async def one(i):
            request = router_pb2.RouteRequest(req_id=f"r{i}", model="m", prompt_token_ids=[5, 6, 7],
                                              sampling=worker_pb2.SamplingParams(max_tokens=2))
            with pytest.raises(RouteFailed):
                async for _ in flow.run(request, RequestTracker(f"r{i}", 0.0)):
                    pass
        tasks = [asyncio.ensure_future(one(i)) for i in range(3)]
        while decode.reserving < 3:
            await asyncio.sleep(0)
        during = {wid: reg.get(wid).num_inflight for wid in ("p1", "p2", "p3", "d")}
        release.set()
        await asyncio.gather(*tasks)
        after = {wid: (reg.get(wid).num_inflight, reg.get(wid).inflight_prefill_tokens) for wid in during}
        return during, after
    during, after = asyncio.run(run())
    assert during == {"p1": 1, "p2": 1, "p3": 1, "d": 3}
    assert set(after.values()) == {(0, 0)}          # a failed reservation gives its placement back


def test_a_refusal_with_no_other_worker_to_try_says_why():
    """The only decode worker refuses (its batch is full): the client's error says so, not only
    that no worker looked free, which is all a burst above the batch size used to be told."""
    async def run():
        release = asyncio.Event()
        release.set()
        full = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    details="its batch is full (32/32 sequences)")
        flow = RequestFlow(Dispatcher(_disaggregated_registry(["p"], ["d"])),
                           {"d": _HeldReserveStub(release, full)}.__getitem__, VirtualClock(), ScenarioClassifier())
        request = router_pb2.RouteRequest(req_id="r", model="m", prompt_token_ids=[5, 6, 7],
                                          sampling=worker_pb2.SamplingParams(max_tokens=2))
        with pytest.raises(RouteFailed) as failed:
            await _chunks(flow, request)
        return failed.value
    exc = asyncio.run(run())
    assert exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.details == "a decode worker refused: its batch is full (32/32 sequences), and no other could take it"


class _AbortCountingStub(_HeldReserveStub):
    def __init__(self, release, error):
        super().__init__(release, error)
        self.aborted: list[str] = []
        self.reserved: list[str] = []

    async def ReserveKV(self, request, timeout=None):
        self.reserved.append(request.req_id)
        return await super().ReserveKV(request, timeout)

    async def Abort(self, request, timeout=None):
        self.aborted.append(request.req_id)
        return worker_pb2.AbortResponse()


@pytest.mark.parametrize("code,aborted", [(grpc.StatusCode.DEADLINE_EXCEEDED, True),
                                          (grpc.StatusCode.UNAVAILABLE, True),
                                          (grpc.StatusCode.INVALID_ARGUMENT, False),
                                          (grpc.StatusCode.ABORTED, False)])
def test_a_reservation_whose_outcome_is_unknown_is_aborted(code, aborted):
    """A decode worker's ReserveKV handler does not wait, so it may reserve after the caller's
    deadline or while the connection fails: after such an error the router aborts the request
    there (each attempt's: a worker that answers its health check is tried again); after a
    refusal that reserved nothing it does not."""
    async def run():
        release = asyncio.Event()
        release.set()
        decode = _AbortCountingStub(release, _error(code))
        flow = RequestFlow(Dispatcher(_disaggregated_registry(["p"], ["d"])), {"d": decode}.__getitem__,
                           VirtualClock(), ScenarioClassifier())
        request = router_pb2.RouteRequest(req_id="r", model="m", prompt_token_ids=[5, 6, 7],
                                          sampling=worker_pb2.SamplingParams(max_tokens=2))
        with pytest.raises(RouteFailed):
            await _chunks(flow, request)
        await asyncio.gather(*flow._background)
        return decode.reserved, decode.aborted
    reserved, got = asyncio.run(run())
    assert reserved[0] == "r" and got == (reserved if aborted else [])


class _GatedCall(_Call):
    """A stream whose chunks arrive when the test resolves them."""
    def __init__(self):
        super().__init__([])
        self.pending: list[asyncio.Future] = []
        self.cancelled = False

    def read(self):
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]

    def cancel(self):
        self.cancelled = self._done = True


def test_a_cancellation_that_arrives_with_a_token_ends_the_request():
    """The client leaves (the router's handler is cancelled) just as the next token arrives: the
    request ends there, its stream cancelled, instead of decoding on to max_tokens (Python 3.11's
    asyncio.wait_for returned the token and dropped the cancellation)."""
    async def body():
        call = _GatedCall()
        flow = _flow({"a": _Stub([call])}, {"a": 100})
        tracker = RequestTracker("r", 0.0)
        task = asyncio.ensure_future(_collect(flow, tracker))
        while not call.pending:
            await asyncio.sleep(0)
        call.pending[0].set_result(_chunk([1]))
        while len(call.pending) < 2:      # the first token relayed: the relay now waits with a stall limit
            await asyncio.sleep(0)
        call.pending[1].set_result(_chunk([2]))
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        assert task.cancelled(), "the request went on after its cancellation"
        assert call.cancelled
    asyncio.run(body())


def test_the_health_check_after_a_failure_does_not_wait_behind_decode_steps(model_cache_dir, monkeypatch):
    """Before migrating, the router health-checks the failed attempt's workers. A real decode worker
    whose answered requests' releases are still queued (behind a long decode step, held here for
    good) answers that check at once and is not marked suspect; GetInfo for the pool's figures still
    waits for them."""
    from pdserve.router import request_flow
    from tests.inprocess import worker_cluster

    monkeypatch.setattr(request_flow, "_HEALTH_CHECK_TIMEOUT_S", 60.0)   # a wait, not a slow host, fails it

    async def body():
        async with worker_cluster(model_cache_dir, roles=("decode",)) as (services, (d,)):
            decode = services[0]
            held = asyncio.get_running_loop().create_future()
            decode._closing.add(held)
            try:
                figures = asyncio.ensure_future(d.GetInfo(worker_pb2.GetInfoRequest()))
                flow = _flow({"d": d}, {"d": 90})
                assert await flow._suspects(("d",)) == set()
                assert not flow.dispatcher.registry.get("d").suspect
                assert not figures.done()
            finally:
                held.set_result(None)
                decode._closing.discard(held)
            assert (await asyncio.wait_for(figures, 60)).num_total_kv_blocks > 0
    asyncio.run(body())
