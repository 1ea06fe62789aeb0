"""`pdserve profile`: time the real model runner's operators and fit the cost model.

Runs whole prompts of several lengths through the prefill executor, times each operator, and
fits pdserve.policy.cost_model.OperatorCostModel to the medians; then times the attention of
pieces that follow earlier KV (a cached prefix, earlier chunks) and fits its past term.
"""
from __future__ import annotations

import math
import pathlib
import statistics
import time

import torch

from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import Piece, PrefillJob, WorkUnit
from pdserve.workers.model.llama import LlamaModel
from pdserve.workers.model.unit_execution import CachedPrefix, JobState, UnitExecution

DEFAULT_TOKEN_COUNTS = (8, 32, 128, 512, 1024, 2048)
# (piece tokens, earlier tokens): both attention paths (attention.py: the dense mask below 512
# new tokens, merged softmaxes from there), short and long pasts.
DEFAULT_PAST_SHAPES = ((32, 1024), (256, 2048), (768, 1024))
# Per shape, runs stop once this many per-layer samples are in (a median over them is stable): a
# deep model needs one run, where three runs of SmolLM2 (30 layers) took 90 s of its start-up.
MIN_LAYER_SAMPLES = 12
# A shape's first call pays allocator and kernel set-up: short prompts get a discarded warm-up
# run. Longer ones measured within 3% of their later runs (SmolLM2, 1,024-3,072 tokens).
WARMUP_BELOW_TOKENS = 1024


def profile_path(cache_dir: pathlib.Path, model_name: str) -> pathlib.Path:
    """Where a worker keeps its profile, per model and thread count. The version changes when
    profiles learn a new term (v2: attention over earlier KV), so a worker re-profiles instead
    of planning without it."""
    return cache_dir / f"profile-v2-{model_name.replace('/', '_')}-{torch.get_num_threads()}t.json"


def _runs(model: LlamaModel, repeats: int) -> int:
    return max(1, min(repeats, math.ceil(MIN_LAYER_SAMPLES / model.config.num_layers)))


def _warm_up(model: LlamaModel, new_tokens: int, past_tokens: int = 0) -> None:
    if new_tokens + past_tokens < WARMUP_BELOW_TOKENS:
        operator_times_s(model, new_tokens, past_tokens, seed=0)


def operator_times_s(model: LlamaModel, new_tokens: int, past_tokens: int = 0, seed: int = 0) -> list[float]:
    """Seconds of each operator (attention, MLP, per layer) of one prefill of `new_tokens` after
    `past_tokens` of random KV (its values do not change the time), run by the executor the
    prefill worker uses (so its per-operator overheads, e.g. copying out finished layers, count)."""
    cfg = model.config
    ids = [(i * 13 + seed) % cfg.vocab_size for i in range(past_tokens + new_tokens)]
    job = PrefillJob(f"profile-{new_tokens}-{past_tokens}-{seed}", len(ids), 0.0, 0.0, cached_tokens=past_tokens)
    unit = WorkUnit([Piece(job, past_tokens, new_tokens)], cfg.num_layers)
    state = JobState(job.req_id, ids)
    if past_tokens:
        state.seed(CachedPrefix.of([torch.randn(2, past_tokens, cfg.num_kv_heads, cfg.head_dim)
                                    for _ in range(cfg.num_layers)], len(ids)))
    execution = UnitExecution(model, unit, {job.req_id: state})
    times = []
    while not unit.finished:
        start = time.perf_counter()
        execution.run_operator()
        times.append(time.perf_counter() - start)
        unit.next_op += 1
    return times


def profile_operators(model: LlamaModel, token_counts=DEFAULT_TOKEN_COUNTS, repeats: int = 3):
    """Per (operator kind, prompt length), the median over layers and runs (at most `repeats`)
    of whole prompts."""
    samples: list[tuple[str, int, float]] = []
    for n in token_counts:
        if n > model.config.max_position_tokens:
            continue
        _warm_up(model, n)
        times: dict[str, list[float]] = {"attention": [], "mlp": []}
        for rep in range(1, _runs(model, repeats) + 1):
            ops = operator_times_s(model, n, seed=rep)
            times["attention"] += ops[0::2]
            times["mlp"] += ops[1::2]
        samples += [(kind, n, statistics.median(values)) for kind, values in times.items()]
    return samples


def profile_past(model: LlamaModel, shapes=DEFAULT_PAST_SHAPES, repeats: int = 3) -> list[tuple[int, int, float]]:
    """(piece tokens, earlier tokens, median attention seconds) of pieces after earlier KV."""
    samples = []
    for n, past in shapes:
        if n + past > model.config.max_position_tokens:
            continue
        _warm_up(model, n, past)
        times = [t for rep in range(1, _runs(model, repeats) + 1)
                 for t in operator_times_s(model, n, past, seed=rep)[0::2]]
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
