"""Worker gRPC services in-process over the fake KV backend: the request flows, their error paths
and that KV is always freed. The same flows over real ucx/tcp between processes are in
tests/integration and tests/faults."""
import asyncio
import contextlib
import threading

import grpc
import pytest

from pdserve.kvtransfer.faults import Faults
from pdserve.router.request_flow import RouteFailed
from pdserve.v1 import worker_pb2
from pdserve.clock import VirtualClock
from pdserve.workers.lifecycle import RequestLifecycle, Stage
from tests.conftest import assert_no_leaks_async, eventually
from tests.inprocess import worker_cluster
from tests.routing import collect, route

PROMPT = list(b"The quick brown fox jumps over the lazy dog. " * 4)


def cluster(model_cache_dir, **kw):
    return worker_cluster(model_cache_dir, **kw)


def sampling(**kw):
    return worker_pb2.SamplingParams(**{"max_tokens": 8, **kw})


async def _assert_clean(services):
    for svc in services:
        await assert_no_leaks_async(allocator=svc.engine.allocator, agents=svc.agents.values())
        assert await eventually(lambda: len(svc.requests) == 0)
        assert not svc.engine.has_work and svc.num_reservations == 0


def test_disaggregated_equals_aggregated(model_cache_dir):
    async def body():
        async with cluster(model_cache_dir) as (services, (p, d, a)):
            for params in (sampling(), sampling(temperature=0.8, top_p=0.9, seed=11)):
                ref = await route([a], "ref", PROMPT, params)
                got = await route([p, d], "dis", PROMPT, params, backend="fake")
                assert got.token_ids == ref.token_ids and len(ref.token_ids) == 8
                assert got.kv_transfer_bytes > 0 and ref.kv_transfer_bytes == 0
            await _assert_clean(services)
    asyncio.run(body())


def test_logprobs_disaggregated_equal_aggregated(model_cache_dir):
    async def body():
        async with cluster(model_cache_dir) as (services, (p, d, a)):
            params = sampling(logprobs=2, prompt_logprobs=True)
            ref = await route([a], "ref", PROMPT, params)
            got = await route([p, d], "dis", PROMPT, params, backend="fake")
            assert [t for t, _ in got.logprobs] == got.token_ids == ref.token_ids
            assert [v for _, v in got.logprobs] == pytest.approx([v for _, v in ref.logprobs], abs=1e-5)
            assert [t for t, _ in got.prompt_logprobs] == PROMPT[1:]
            assert got.prompt_logprobs == ref.prompt_logprobs
            plain = await route([p, d], "plain", PROMPT, sampling())
            assert plain.logprobs == [] and plain.prompt_logprobs == [] and plain.token_ids == ref.token_ids
            await _assert_clean(services)
    asyncio.run(body())


def test_unknown_request_id_and_bad_input_are_rejected(model_cache_dir):
    async def body():
        async with cluster(model_cache_dir) as (services, (p, d, a)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(d.Generate(worker_pb2.GenerateRequest(
                    req_id="nobody", prompt_token_ids=PROMPT, sampling=sampling(), remote_prefill=True)))
            assert err.value.code() is grpc.StatusCode.NOT_FOUND and "unknown request id" in err.value.details()
            for bad_prompt, bad_sampling in (([], sampling()), ([10**6], sampling()),
                                             (PROMPT, sampling(temperature=-1)), (PROMPT, sampling(top_p=2)),
                                             (PROMPT, sampling(logprobs=21)), (PROMPT, sampling(prompt_logprobs=True)),
                                             (PROMPT, sampling(max_tokens=2, min_tokens=3))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(a.Generate(worker_pb2.GenerateRequest(req_id="bad", prompt_token_ids=bad_prompt,
                                                                        sampling=bad_sampling)))
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await d.ReserveKV(worker_pb2.ReserveKVRequest(req_id="x", num_prompt_tokens=5, backend="ucx"))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert len((await route([a], "ok", PROMPT, sampling())).token_ids) == 8
            await _assert_clean(services)
    asyncio.run(body())


def test_an_abort_that_overtakes_its_reservation_refuses_it(model_cache_dir):
    """A router that gives up on a ReserveKV cancels it and sends Abort; the Abort may arrive first
    (reservations no longer wait on the compute thread, where cancelling the call used to stop
    them). The reservation is then refused, not held until its lease ends; the ids of requests
    that were here are not remembered as aborted, and others are served as usual."""
    async def body():
        async with cluster(model_cache_dir) as (services, (p, d, a)):
            assert not (await d.Abort(worker_pb2.AbortRequest(req_id="early"))).found
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await d.ReserveKV(worker_pb2.ReserveKVRequest(req_id="early", num_prompt_tokens=5, backend="fake"))
            assert err.value.code() is grpc.StatusCode.ABORTED and "before it arrived" in err.value.details()
            assert len((await route([p, d], "served", PROMPT, sampling(), backend="fake")).token_ids) == 8
            await _assert_clean(services)
            assert "served" not in services[1].requests._aborted
    asyncio.run(body())


class _LateContext:
    """A ServicerContext whose caller's deadline has passed by the time the handler runs."""

    def time_remaining(self):
        return -0.1

    async def abort(self, code, details):
        raise grpc.RpcError(code, details)


def test_a_reservation_handled_after_its_deadline_is_dropped(model_cache_dir):
    async def body():
        async with cluster(model_cache_dir, roles=("decode",)) as (services, _):
            decode = services[0]
            with pytest.raises(grpc.RpcError) as err:
                await decode.ReserveKV(worker_pb2.ReserveKVRequest(req_id="late", num_prompt_tokens=5, backend="fake"),
                                       _LateContext())
            assert err.value.args[0] is grpc.StatusCode.DEADLINE_EXCEEDED
            await _assert_clean(services)
    asyncio.run(body())


def test_aborted_ids_are_remembered_for_a_lease():
    clock = VirtualClock()
    lifecycle = RequestLifecycle(engine=None, run_compute=None, clock=clock, lease_s=30.0)
    lifecycle.remember_abort("old")
    clock.advance(31.0)
    lifecycle.remember_abort("new")
    assert list(lifecycle._aborted) == ["new"]


@pytest.mark.parametrize("faults", [Faults(truncate_layers=frozenset({1})), Faults(corrupt_layers=frozenset({0})),
                                    Faults(vanish_after_layers=2)])
def test_broken_transfer_fails_cleanly_and_worker_keeps_serving(model_cache_dir, faults):
    async def body():
        async with cluster(model_cache_dir, prefill_faults=faults, lease_s=2.0) as (services, (p, d, a)):
            with pytest.raises(RouteFailed) as err:
                await route([p, d], "broken", PROMPT, sampling(), backend="fake")
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            assert "KV transfer failed" in err.value.details
            await _assert_clean(services)
            services[0].agents["fake"].faults = Faults()   # the prefill worker heals
            ok = await route([p, d], "after", PROMPT, sampling(), backend="fake")
            assert len(ok.token_ids) == 8
    asyncio.run(body())


def test_unclaimed_reservation_expires_while_the_decode_loop_is_busy(model_cache_dir):
    lease_s = 0.5

    async def body():
        async with cluster(model_cache_dir, lease_s=lease_s, num_kv_blocks=300) as (services, (p, d, a)):
            decode = services[1]
            # Keep the decode loop stepping the whole time: a generation of thousands of tokens,
            # cancelled once the check is done.
            busy = asyncio.ensure_future(route([p, d], "busy", PROMPT, sampling(max_tokens=3800, ignore_eos=True),
                                               backend="fake"))
            assert await eventually(lambda: decode.engine.running)
            held_before = decode.engine.allocator.num_free_blocks
            await d.ReserveKV(worker_pb2.ReserveKVRequest(req_id="orphan", num_prompt_tokens=100, backend="fake"))
            reserved_at = asyncio.get_running_loop().time()
            assert decode.engine.allocator.num_free_blocks < held_before
            assert await eventually(lambda: not decode.engine.allocator.holds("orphan"), timeout_s=lease_s + 1.0), \
                "the unclaimed reservation's blocks outlived its lease + 1 s"
            freed_after_s = asyncio.get_running_loop().time() - reserved_at
            assert decode.engine.running, "the decode loop went idle: the test did not test a busy loop"
            assert "orphan" not in decode.requests
            busy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await busy
            await _assert_clean(services)
            return freed_after_s
    assert asyncio.run(body()) <= lease_s + 1.0


def test_client_cancel_mid_stream_frees_kv(model_cache_dir):
    async def body():
        async with cluster(model_cache_dir) as (services, (p, d, a)):
            await d.ReserveKV(worker_pb2.ReserveKVRequest(req_id="c", num_prompt_tokens=len(PROMPT), backend="fake"))
            info = await d.GetInfo(worker_pb2.GetInfoRequest())
            call = d.Generate(worker_pb2.GenerateRequest(req_id="c", prompt_token_ids=PROMPT, remote_prefill=True,
                                                         sampling=sampling(max_tokens=500, ignore_eos=True)))
            reservation_endpoint = info.kv_endpoints[0]
            assert reservation_endpoint.backend == "fake"
            decode = services[1]
            waiting = lambda: decode.requests.get("c") is not None and decode.requests.get("c").stage is Stage.RECEIVING  # noqa: E731
            read = asyncio.ensure_future(call.read())
            assert await eventually(waiting)    # the stream claimed its reservation and waits for KV
            call.cancel()                       # client gone before its KV even arrived
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await read
            stream = a.Generate(worker_pb2.GenerateRequest(req_id="s", prompt_token_ids=PROMPT,
                                                           sampling=sampling(max_tokens=500, ignore_eos=True)))
            async for chunk in stream:
                if chunk.num_generated_tokens >= 3:
                    stream.cancel()             # client gone mid-stream
                    break
            await _assert_clean(services)
    asyncio.run(body())


@contextlib.asynccontextmanager
async def _compute_held(decode, p, d, prompt: list[int], params):
    """Request "h" prefilled on `p` for decode worker `d` while the decode worker's compute thread
    is held (as by a long decode step): yields the decode stream; the thread is let go on exit."""
    reservation = await d.ReserveKV(worker_pb2.ReserveKVRequest(
        req_id="h", num_prompt_tokens=len(prompt), prompt_token_ids=prompt, backend="fake"))
    call = d.Generate(worker_pb2.GenerateRequest(req_id="h", prompt_token_ids=prompt, remote_prefill=True,
                                                 sampling=params))
    gate = threading.Event()
    hold = asyncio.ensure_future(decode._run(gate.wait))
    try:
        await p.Prefill(worker_pb2.PrefillRequest(
            req_id="h", prompt_token_ids=prompt, sampling=params, target=reservation.endpoint,
            transfer_id=reservation.transfer_id, transfer_token=reservation.transfer_token,
            skip_kv_tokens=reservation.num_cached_tokens))
        yield call
    finally:
        gate.set()
        await hold


@pytest.mark.parametrize("client_stays", [True, False])
def test_the_first_token_streams_before_the_kv_is_imported(model_cache_dir, client_stays):
    """The prefill's token came with the KV and needs none of it: the decode worker streams it
    while its compute thread is busy (held here, as by a long decode step), then imports the KV
    and generates the rest, the same tokens as without the hold, and frees everything; also when
    the client goes away between the first token and the import."""
    async def body():
        async with cluster(model_cache_dir) as (services, (p, d, a)):
            params = sampling(max_tokens=6, ignore_eos=True)
            ref = await route([p, d], "ref", PROMPT, params, backend="fake")
            decode = services[1]
            async with _compute_held(decode, p, d, PROMPT, params) as call:
                first = await asyncio.wait_for(call.read(), 60)
                assert list(first.token_ids) == ref.token_ids[:1]
                assert decode.requests.get("h").stage is Stage.RECEIVING     # not imported yet
                if not client_stays:
                    call.cancel()
            if not client_stays:
                await _assert_clean(services)
                assert decode.engine.allocator.num_free_blocks == decode.engine.allocator.num_blocks
                return
            chunks = [first]
            while (chunk := await call.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
            assert [t for c in chunks for t in c.token_ids] == ref.token_ids
            assert chunks[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
            await _assert_clean(services)
    asyncio.run(body())


def test_an_answered_stream_ends_while_the_compute_thread_is_busy(model_cache_dir):
    """A one-token answer (the prefill's token, with the prefill's figures) and the end of its
    stream reach the caller while the decode worker's compute thread is held (as by a long decode
    step); the KV import, which keeps the prompt's blocks for reuse, and the release follow once it
    is free, and GetInfo reports the worker only after them."""
    async def body():
        async with cluster(model_cache_dir, roles=("prefill", "decode"), prefix_caching=True) as (services, (p, d)):
            params = sampling(max_tokens=1)
            ref = await route([p, d], "ref", PROMPT, params, backend="fake")
            await _assert_clean(services)
            decode = services[1]
            cached_before = decode.engine.allocator.num_cached_blocks
            prompt = PROMPT[::-1]        # shares no block with the reference's prompt
            async with _compute_held(decode, p, d, prompt, params) as call:
                only = await asyncio.wait_for(call.read(), 60)
                end = await asyncio.wait_for(call.read(), 60)
                assert len(decode.requests) == 1          # its import and release wait for the thread
            assert only.finish_reason == worker_pb2.FINISH_REASON_LENGTH and end is grpc.aio.EOF
            assert only.kv_transfer_bytes == ref.kv_transfer_bytes > 0 and only.prefill_ms > 0
            info = await d.GetInfo(worker_pb2.GetInfoRequest())
            assert info.num_active_requests == 0 and info.num_free_kv_blocks == info.num_total_kv_blocks
            assert decode.engine.allocator.num_cached_blocks == cached_before + len(prompt) // 16
            await _assert_clean(services)
    asyncio.run(body())


def test_a_reservation_is_answered_while_the_compute_thread_is_busy(model_cache_dir):
    """ReserveKV is bookkeeping (blocks, the cached prefix linked, an armed receiver): it is answered
    while the decode worker's compute thread is held, as by a long decode step (it used to wait for
    the step, on every disaggregated request's time to first token), and an aborted reservation's
    blocks come back as promptly; the request then completes with the reference's tokens."""
    async def body():
        async with cluster(model_cache_dir, roles=("prefill", "decode"), prefix_caching=True) as (services, (p, d)):
            params = sampling(max_tokens=4, ignore_eos=True)
            ref = await route([p, d], "ref", PROMPT, params, backend="fake")
            await _assert_clean(services)
            decode, gate = services[1], threading.Event()
            hold = asyncio.ensure_future(decode._run(gate.wait))
            try:
                reservation = await asyncio.wait_for(d.ReserveKV(worker_pb2.ReserveKVRequest(
                    req_id="h", num_prompt_tokens=len(PROMPT), prompt_token_ids=PROMPT, backend="fake")), 30)
                assert reservation.num_cached_tokens > 0 and decode.requests.get("h").stage is Stage.RESERVED
                # A reservation's release is bookkeeping too: freed while the thread is still held.
                free_blocks = decode.engine.allocator.num_free_blocks
                await asyncio.wait_for(d.ReserveKV(worker_pb2.ReserveKVRequest(
                    req_id="gone", num_prompt_tokens=len(PROMPT), backend="fake")), 30)
                assert decode.engine.allocator.num_free_blocks < free_blocks
                await asyncio.wait_for(d.Abort(worker_pb2.AbortRequest(req_id="gone")), 30)
                assert decode.engine.allocator.num_free_blocks == free_blocks and "gone" not in decode.requests
            finally:
                gate.set()
                await hold
            call = d.Generate(worker_pb2.GenerateRequest(req_id="h", prompt_token_ids=PROMPT, remote_prefill=True,
                                                         sampling=params))
            await p.Prefill(worker_pb2.PrefillRequest(
                req_id="h", prompt_token_ids=PROMPT, sampling=params, target=reservation.endpoint,
                transfer_id=reservation.transfer_id, transfer_token=reservation.transfer_token,
                skip_kv_tokens=reservation.num_cached_tokens))
            assert (await collect(call)).token_ids == ref.token_ids
            await _assert_clean(services)
    asyncio.run(body())


def test_settling_waits_only_for_requests_answered_before_it(model_cache_dir):
    """Under steady load answered requests keep closing; GetInfo (through settled()) must not wait
    for those that close after it was called, or it, and the heartbeat, could wait without end."""
    async def body():
        async with cluster(model_cache_dir, roles=("decode",)) as (services, _):
            decode, loop = services[0], asyncio.get_running_loop()
            earlier, later = loop.create_future(), loop.create_future()
            decode._closing.add(earlier)
            try:
                waiting = asyncio.ensure_future(decode.settled())
                await asyncio.sleep(0)          # settled() has taken its snapshot and waits on it
                decode._closing.add(later)      # answered after the call
                assert not waiting.done()
                earlier.set_result(None)
                decode._closing.discard(earlier)
                await asyncio.wait_for(waiting, 30)
                assert not later.done()
            finally:
                decode._closing.clear()         # the worker's stop() settles what is left
    asyncio.run(body())


def test_a_full_pool_preempts_instead_of_failing_clients(model_cache_dir):
    """Two requests on a 5-block pool need 8 blocks between them: one is preempted and resumed;
    both clients get every token, the same tokens as when each ran alone."""
    prompts = {"x": list(range(40, 70)), "y": list(range(100, 130))}       # 30 tokens: 2 blocks each
    params = sampling(max_tokens=20, ignore_eos=True)

    def generate(a, req_id, prompt):   # straight to the worker: its admission alone decides
        return collect(a.Generate(worker_pb2.GenerateRequest(req_id=req_id, prompt_token_ids=prompt, sampling=params)))

    async def body():
        async with cluster(model_cache_dir, roles=("aggregated",), num_kv_blocks=5) as ([svc], [a]):
            alone = {rid: (await generate(a, f"alone-{rid}", p)).token_ids for rid, p in prompts.items()}
            assert svc.engine.stats.num_preemptions == 0
            together = await asyncio.gather(*(generate(a, f"together-{rid}", p) for rid, p in prompts.items()))
            await _assert_clean([svc])
            return alone, {rid: out.token_ids for rid, out in zip(prompts, together)}, svc.engine.stats
    alone, together, stats = asyncio.run(body())
    assert stats.num_preemptions >= 1 and stats.num_resumes == stats.num_preemptions
    assert together == alone and all(len(t) == 20 for t in together.values())
