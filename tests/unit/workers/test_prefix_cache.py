"""Prefix caching on real workers (in-process, fake KV backend): a cache hit never changes the
output, only the missing blocks cross the wire, and shared blocks survive their co-owners."""
import asyncio
import threading

import pytest

from pdserve.v1 import worker_pb2
from tests.conftest import assert_no_leaks_async
from tests.inprocess import worker_cluster
from tests.routing import route

BLOCK = 16      # tests/inprocess.py's block size
SHARED = [(7 * i + 3) % 250 + 1 for i in range(5 * BLOCK + 3)]     # 5 full blocks and a bit
PROMPTS = [SHARED + [11, 12, 13, 14, 15, 16, 17], SHARED + [21, 22, 23], SHARED[:4 * BLOCK] + [31] * 40]
PARAMS = {"greedy": dict(max_tokens=8), "seeded": dict(max_tokens=8, temperature=0.9, top_p=0.9, seed=5)}


async def _assert_clean(services):
    for svc in services:
        await assert_no_leaks_async(allocator=svc.engine.allocator, agents=svc.agents.values())
        alloc = svc.engine.allocator
        assert all(alloc.ref_count(b) == 0 for b in range(alloc.num_blocks))


async def _cold(model_cache_dir, params):
    async with worker_cluster(model_cache_dir, roles=("aggregated",)) as (_, [a]):
        return [(await route([a], f"cold{i}", p, params)).token_ids for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_cached_runs_equal_cold_runs_and_only_missing_blocks_are_sent(model_cache_dir, kind):
    params = worker_pb2.SamplingParams(**PARAMS[kind])

    async def body():
        cold = await _cold(model_cache_dir, params)
        async with worker_cluster(model_cache_dir, prefix_caching=True) as (services, (p, d, a)):
            per_token = services[1].engine.layer_nbytes(1)
            for i, prompt in enumerate(PROMPTS):     # aggregated: the worker's own cache
                got = await route([a], f"agg{i}", prompt, params)
                assert got.token_ids == cold[i]
                assert got.num_cached_tokens == (0 if i == 0 else 4 * BLOCK if i == 2 else 5 * BLOCK)
            for i, prompt in enumerate(PROMPTS):     # disaggregated: both ends cache
                got = await route([p, d], f"dis{i}", prompt, params, backend="fake")
                assert got.token_ids == cold[i]
                held = 0 if i == 0 else 4 * BLOCK if i == 2 else 5 * BLOCK
                assert got.num_cached_tokens == held                      # the prefill worker computed less
                assert got.kv_transfer_bytes == sum(per_token) * (len(prompt) - held)  # and sent less
            stats = services[1].prefix_cache_stats()
            assert stats.hit_tokens == 9 * BLOCK and stats.query_tokens == sum(map(len, PROMPTS))
            await _assert_clean(services)
    asyncio.run(body())


def test_a_prefill_cancelled_mid_way_leaves_the_shared_blocks_to_the_other(model_cache_dir):
    params = worker_pb2.SamplingParams(max_tokens=8)

    async def body():
        cold = await _cold(model_cache_dir, params)
        async with worker_cluster(model_cache_dir, roles=("aggregated",), prefix_caching=True) as ([svc], [a]):
            assert (await route([a], "warm", PROMPTS[0], params)).token_ids == cold[0]
            alloc = svc.engine.allocator
            shared_blocks = alloc.num_cached_blocks
            started, go_on = threading.Event(), threading.Event()
            submit = svc.prefill.runner.submit

            def gated_submit(req_id, ids, deadline_s, on_layer, **kw):
                def hold(layer, kv):       # the victim stops at its first layer until cancelled
                    started.set()
                    go_on.wait(30)
                    on_layer(layer, kv)
                return submit(req_id, ids, deadline_s, hold if req_id == "victim" else on_layer, **kw)
            svc.prefill.runner.submit = gated_submit
            victim = asyncio.ensure_future(route([a], "victim", PROMPTS[1], params))
            assert await asyncio.to_thread(started.wait, 30)
            survivor = asyncio.ensure_future(route([a], "survivor", PROMPTS[1], params))
            while "survivor" not in svc.requests:     # admitted: linked the shared blocks
                await asyncio.sleep(0.01)
            victim.cancel()
            while "victim" in svc.requests:           # released: its references are gone
                await asyncio.sleep(0.01)
            go_on.set()
            got = await survivor
            assert got.token_ids == cold[1] and got.num_cached_tokens == 5 * BLOCK
            assert alloc.num_cached_blocks >= shared_blocks
            again = await route([a], "again", PROMPTS[1], params)
            assert again.token_ids == cold[1] and again.num_cached_tokens == 5 * BLOCK
            await _assert_clean([svc])
    asyncio.run(body())


def test_a_long_prompt_after_a_cached_prefix_equals_its_cold_run(model_cache_dir):
    """600 uncached tokens after 5 cached blocks: the prefill takes attention.py's merged path."""
    long_prompt = SHARED[:5 * BLOCK] + [(13 * i + 5) % 250 + 1 for i in range(600)]
    params = worker_pb2.SamplingParams(**PARAMS["greedy"])

    async def body():
        async with worker_cluster(model_cache_dir, roles=("aggregated",)) as (_, [a]):
            cold = (await route([a], "cold", long_prompt, params)).token_ids
        async with worker_cluster(model_cache_dir, prefix_caching=True) as (services, (p, d, _)):
            await route([p, d], "warm", SHARED, params, backend="fake")
            got = await route([p, d], "long", long_prompt, params, backend="fake")
            assert got.num_cached_tokens == 5 * BLOCK
            assert got.token_ids == cold
            await _assert_clean(services)
    asyncio.run(body())
