"""Disaggregated output (prefill process -> KV over ucx or tcp -> decode process) equals the
aggregated reference token for token, for the tiny model and for SmolLM2-135M. Both go through
the router's own RequestFlow; which workers it may use forces the path."""
import asyncio

import pytest

from pdserve.v1 import worker_pb2
from pdserve.workers.model.loader import SMOLLM2_NAME, load_model
from tests.integration.conftest import Cluster
from tests.routing import route

LONG_PROMPT = list(b"Disaggregated serving moves the KV cache from prefill to decode. " * 12)


def _both(cluster: Cluster, backend: str, prompt: list[int], params: worker_pb2.SamplingParams, tag: str):
    async def run():
        s = cluster.stubs()
        ref = await route([s["aggregated"]], f"ref-{tag}", prompt, params)
        got = await route([s["prefill"], s["decode"]], f"dis-{tag}", prompt, params, backend=backend)
        return ref, got
    return asyncio.run(run())


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
@pytest.mark.parametrize("params", [
    worker_pb2.SamplingParams(max_tokens=24),
    worker_pb2.SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234),
    worker_pb2.SamplingParams(max_tokens=64, stop=["E2"]),
], ids=["greedy", "seeded", "stop"])
def test_tiny_disaggregated_equals_aggregated(tiny_cluster, backend, params):
    ref, got = _both(tiny_cluster, backend, LONG_PROMPT, params, f"{backend}-{params.seed}-{len(params.stop)}")
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.finish_reason == ref.finish_reason
    per_token = 4 * 2 * 4 * 32 * 4                       # layers * (K, V) * heads * dim * fp32
    # The whole prompt, or (the decode worker holds its prefix from an earlier test) only the
    # tokens after its reusable full blocks.
    cached = (len(LONG_PROMPT) - 1) // 16 * 16
    assert got.kv_transfer_bytes in (len(LONG_PROMPT) * per_token, (len(LONG_PROMPT) - cached) * per_token)
    tiny_cluster.assert_idle()


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
@pytest.mark.parametrize("params", [
    worker_pb2.SamplingParams(max_tokens=16),
    worker_pb2.SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=77),
], ids=["greedy", "seeded"])
def test_a_cached_prefix_gives_the_cold_runs_tokens_and_sends_only_the_rest(tiny_cluster, backend, params):
    """A prompt of its own, run cold, then again: the second run takes its prefix from both
    workers' caches (real processes, real transport) and must produce the same tokens."""
    prompt = list(f"{backend}/{params.seed}: ".encode()) + LONG_PROMPT[:300]

    async def run():
        s = tiny_cluster.stubs()
        ref = await route([s["aggregated"]], f"pref-{backend}-{params.seed}", prompt, params)
        runs = [await route([s["prefill"], s["decode"]], f"p{i}-{backend}-{params.seed}", prompt, params,
                            backend=backend) for i in range(2)]
        return ref, runs
    ref, (cold, cached) = asyncio.run(run())
    assert cold.token_ids == cached.token_ids == ref.token_ids and cold.text == cached.text
    held = (len(prompt) - 1) // 16 * 16
    assert cold.num_cached_tokens == 0 and cached.num_cached_tokens == held      # prefill computed less
    assert cached.kv_transfer_bytes * len(prompt) == cold.kv_transfer_bytes * (len(prompt) - held)   # and sent less
    tiny_cluster.assert_idle()


def test_a_nearly_cached_prompt_is_prefilled_on_its_decode_worker(tiny_cluster):
    """Conditional disaggregation: the router's index says the decode worker holds the prompt, so
    the prefill worker and the KV transfer are skipped; the decode worker computes the tail after
    its cached blocks, and the tokens are the cold run's. A stale index entry (a prompt the
    worker never saw) costs a full local prefill, never a wrong token."""
    prompt = list(b"local prefill: ") + LONG_PROMPT[:250]
    fresh = list(b"never seen here: ") + LONG_PROMPT[:90]
    params = worker_pb2.SamplingParams(max_tokens=16, temperature=0.9, seed=5)

    async def run():
        s = tiny_cluster.stubs()
        pair = [s["prefill"], s["decode"]]
        refs = [await route([s["aggregated"]], f"lp-ref{i}", p, params) for i, p in enumerate((prompt, fresh))]
        cold = await route(pair, "lp-cold", prompt, params, backend="tcp")    # its blocks stay on the decode worker
        local = await route(pair, "lp-local", prompt, params, backend="tcp", local_prefill_max_tokens=32,
                            indexed_on=1)
        stale = await route(pair, "lp-stale", fresh, params, backend="tcp", local_prefill_max_tokens=32,
                            indexed_on=1)
        far = await route(pair, "lp-far", prompt, params, backend="tcp", local_prefill_max_tokens=8, indexed_on=1)
        return refs, cold, local, stale, far
    (ref, ref_fresh), cold, local, stale, far = asyncio.run(run())
    assert cold.token_ids == local.token_ids == far.token_ids == ref.token_ids and local.text == ref.text
    held = (len(prompt) - 1) // 16 * 16
    assert not cold.local_prefill and cold.kv_transfer_bytes > 0
    assert local.local_prefill and local.kv_transfer_bytes == 0 and local.num_cached_tokens == held
    assert stale.local_prefill and stale.token_ids == ref_fresh.token_ids and stale.num_cached_tokens == 0
    # More uncached tokens than allowed (the index's tail block is not whole): a prefill worker again.
    assert not far.local_prefill and far.kv_transfer_bytes > 0
    tiny_cluster.assert_idle()


def test_concurrent_disaggregated_requests(tiny_cluster):
    async def run():
        s = tiny_cluster.stubs()
        prompts = [LONG_PROMPT[: 60 + 37 * i] for i in range(6)]
        params = worker_pb2.SamplingParams(max_tokens=16)
        refs = [await route([s["aggregated"]], f"cref{i}", p, params) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*[
            route([s["prefill"], s["decode"]], f"c{i}", p, params, backend=("ucx", "tcp")[i % 2])
            for i, p in enumerate(prompts)])
        return refs, outs
    refs, outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    tiny_cluster.assert_idle()


@pytest.mark.slow
def test_smollm2_disaggregated_equals_aggregated(model_cache_dir):
    tok = load_model(SMOLLM2_NAME, model_cache_dir).tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    other = tok.apply_chat_template([{"role": "user", "content": "Name a large city in France."}])
    cluster = Cluster(SMOLLM2_NAME)
    try:
        # Per prompt, the first backend's run is cold everywhere, the second's takes the prompt's
        # prefix from the prefill and decode workers' caches: both equal the (cold) reference.
        for prompt_ids, params in ((prompt, worker_pb2.SamplingParams(max_tokens=20)),
                                   (other, worker_pb2.SamplingParams(max_tokens=12, temperature=0.8, seed=3))):
            ref = None
            for backend in ("ucx", "tcp"):
                first, got = _both(cluster, backend, prompt_ids, params, f"{backend}-{params.seed}")
                ref = ref or first
                assert got.token_ids == ref.token_ids
                # Cold: only what the chat template shares with the prompt before it is cached.
                shared = 0 if prompt_ids is prompt else next(
                    i for i, (a, b) in enumerate(zip(prompt, prompt_ids)) if a != b) // 16 * 16
                assert got.num_cached_tokens == (shared if backend == "ucx" else (len(prompt_ids) - 1) // 16 * 16)
            if params.temperature == 0:
                assert "Paris" in ref.text
        cluster.assert_idle()
    finally:
        cluster.stop()
