"""`pdserve profile`: time the real model runner's operators and fit the cost model.

Runs whole prompts of several lengths through the prefill executor, times each operator, and
fits pdserve.policy.cost_model.OperatorCostModel to the medians.
"""
from __future__ import annotations

import statistics
import time

from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import Piece, PrefillJob, WorkUnit
from pdserve.workers.model.llama import LlamaModel
from pdserve.workers.model.unit_execution import JobState, UnitExecution

DEFAULT_TOKEN_COUNTS = (8, 32, 128, 512, 1024, 2048)


def _median_s(fn, repeats: int) -> float:
    fn()   # warm-up: allocator and kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile_operators(model: LlamaModel, token_counts=DEFAULT_TOKEN_COUNTS, repeats: int = 3):
    """Times every operator of whole-prompt units run by the same executor the prefill worker
    uses (so its per-operator overheads, e.g. copying out finished layers, are in the model);
    the median over layers and repeats is one sample per (operator kind, prompt length)."""
    cfg = model.config
    samples: list[tuple[str, int, float]] = []
    for n in token_counts:
        if n > cfg.max_position_tokens:
            continue
        times: dict[str, list[float]] = {"attention": [], "mlp": []}
        for rep in range(repeats + 1):       # the first pass warms allocator and kernels up
            ids = [(i * 13 + rep) % cfg.vocab_size for i in range(n)]
            job = PrefillJob(f"profile-{n}-{rep}", n, 0.0, 0.0)
            unit = WorkUnit([Piece(job, 0, n)], cfg.num_layers)
            execution = UnitExecution(model, unit, {job.req_id: JobState(job.req_id, ids)})
            while not unit.finished:
                start = time.perf_counter()
                execution.run_operator()
                if rep:
                    times["attention" if unit.next_op % 2 == 0 else "mlp"].append(time.perf_counter() - start)
                unit.next_op += 1
        samples += [(kind, n, statistics.median(values)) for kind, values in times.items()]
    return samples


def fit_cost_model(model: LlamaModel, token_counts=DEFAULT_TOKEN_COUNTS, repeats: int = 3):
    samples = profile_operators(model, token_counts, repeats)
    cost = OperatorCostModel.fit(model.config.num_layers, samples)
    errors = [abs((cost.attention_s(n) if k == "attention" else cost.mlp_s(n)) - s) / s for k, n, s in samples]
    return cost, samples, max(errors)


def profile_decode(model: LlamaModel, batch_sizes=(1, 8), context_tokens: int = 128, repeats: int = 3):
    """Decode step time vs batch size at a fixed context: (base_s, per_seq_s) of a linear fit."""
    from pdserve.workers.kv_cache import BlockAllocator, PagedKVCache
    from pdserve.workers.model.execution import decode_step

    block = 16
    alloc = BlockAllocator(max(batch_sizes) * (context_tokens // block + 2 + repeats), block)
    cache = PagedKVCache(model.config, alloc)
    times = []
    for b in batch_sizes:
        req_ids = [f"p{b}-{i}" for i in range(b)]
        for r in req_ids:
            alloc.allocate(r, context_tokens)
        samples = []
        for _ in range(repeats + 1):
            for r in req_ids:
                alloc.append_token(r)
            start = time.perf_counter()
            decode_step(model, cache, req_ids, [1] * b)
            samples.append(time.perf_counter() - start)
        times.append(statistics.median(samples[1:]))
        for r in req_ids:
            alloc.free(r)
    (b0, t0), (b1, t1) = (batch_sizes[0], times[0]), (batch_sizes[-1], times[-1])
    per_seq = max((t1 - t0) / (b1 - b0), 1e-7)
    return max(t0 - per_seq * b0, 1e-6), per_seq
