"""`pdserve profile`: time the real model runner's operators and fit the cost model.

Runs whole prompts of several lengths through the prefill executor, times each operator, and
fits pdserve.policy.cost_model.OperatorCostModel to the medians; then times the attention of
pieces that follow earlier KV (a cached prefix, earlier chunks) and fits its past term.
"""
from __future__ import annotations

import pathlib
import statistics
import time

import torch

from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import Piece, PrefillJob, WorkUnit
from pdserve.workers.model.llama import LlamaModel
from pdserve.workers.model.unit_execution import JobState, UnitExecution

DEFAULT_TOKEN_COUNTS = (8, 32, 128, 512, 1024, 2048)
# (piece tokens, earlier tokens): both attention paths (attention.py: the dense mask below 512
# new tokens, merged softmaxes from there), short and long pasts.
DEFAULT_PAST_SHAPES = ((32, 1024), (256, 2048), (768, 1024))


def profile_path(cache_dir: pathlib.Path, model_name: str) -> pathlib.Path:
    """Where a worker keeps its profile, per model and thread count. The version changes when
    profiles learn a new term (v2: attention over earlier KV), so a worker re-profiles instead
    of planning without it."""
    return cache_dir / f"profile-v2-{model_name.replace('/', '_')}-{torch.get_num_threads()}t.json"


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


def profile_past(model: LlamaModel, shapes=DEFAULT_PAST_SHAPES, repeats: int = 3) -> list[tuple[int, int, float]]:
    """(piece tokens, earlier tokens, median attention seconds) of pieces run after a prefix of
    random KV (its values do not change the time), by the prefill worker's executor."""
    cfg = model.config
    samples = []
    for n, past in shapes:
        if n + past > cfg.max_position_tokens:
            continue
        times = []
        for rep in range(repeats + 1):
            ids = [(i * 13 + rep) % cfg.vocab_size for i in range(past + n)]
            job = PrefillJob(f"profile-past-{n}-{past}-{rep}", past + n, 0.0, 0.0, cached_tokens=past)
            unit = WorkUnit([Piece(job, past, n)], cfg.num_layers)
            state = JobState(job.req_id, ids)
            state.seed([torch.randn(2, past, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)])
            execution = UnitExecution(model, unit, {job.req_id: state})
            while not unit.finished:
                start = time.perf_counter()
                execution.run_operator()
                if rep and unit.next_op % 2 == 0:
                    times.append(time.perf_counter() - start)
                unit.next_op += 1
        samples.append((n, past, statistics.median(times)))
    return samples


def fit_cost_model(model: LlamaModel, token_counts=DEFAULT_TOKEN_COUNTS, repeats: int = 3,
                   past_shapes=DEFAULT_PAST_SHAPES):
    """(cost model, whole-prompt samples, largest relative error of the fit over them)."""
    samples = profile_operators(model, token_counts, repeats)
    cost = OperatorCostModel.fit(model.config.num_layers, samples)
    errors = [abs((cost.attention_s(n) if k == "attention" else cost.mlp_s(n)) - s) / s for k, n, s in samples]
    if past_samples := profile_past(model, past_shapes, repeats):
        cost = cost.with_past(past_samples)
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
