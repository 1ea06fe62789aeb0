"""Run requests through the router's own orchestration (RequestFlow) against given workers, with
the placement forced by which workers are offered: [aggregated] for the reference, [prefill,
decode] for the disaggregated path. No router process is needed, and no second orchestration
exists: this is the code the router runs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.clock import WallClock
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.prefix_cache import PrefixIndex, block_hashes
from pdserve.policy.registry import WorkerRecord, WorkerRegistry
from pdserve.policy.request_state import RequestTracker
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.proto_maps import ROLE_FROM_PROTO
from pdserve.router.request_flow import RequestFlow
from pdserve.v1 import router_pb2, worker_pb2


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = worker_pb2.FINISH_REASON_UNSPECIFIED
    num_prompt_tokens: int = 0
    kv_transfer_bytes: int = 0
    num_cached_tokens: int = 0
    logprobs: list[tuple[int, float]] = field(default_factory=list)          # (token id, logprob)
    prompt_logprobs: list[tuple[int, float]] = field(default_factory=list)
    local_prefill: bool = False        # the router prefilled it on its decode worker


async def collect(stream) -> Completion:
    out = Completion()
    async for chunk in stream:
        out.token_ids.extend(chunk.token_ids)
        out.text += chunk.text
        out.finish_reason = chunk.finish_reason
        out.num_prompt_tokens = chunk.num_prompt_tokens
        out.kv_transfer_bytes = chunk.kv_transfer_bytes or out.kv_transfer_bytes
        out.num_cached_tokens = chunk.num_cached_tokens or out.num_cached_tokens
        out.logprobs += [(e.token_id, e.logprob) for e in chunk.logprobs]
        out.prompt_logprobs += [(e.token_id, e.logprob) for e in chunk.prompt_logprobs]
    return out


async def route(stubs: list, req_id: str, prompt_ids: list[int], sampling: worker_pb2.SamplingParams,
                backend: str | None = None, ttft_slo_ms: float = 0.0, local_prefill_max_tokens: int = 0,
                indexed_on: int | None = None) -> Completion:
    """One request through RequestFlow over exactly these workers (and this KV backend).
    `indexed_on`: the router's prefix index says the worker at that position holds the whole
    prompt (true or stale), so conditional disaggregation can place it there."""
    registry = WorkerRegistry(lease_s=math.inf)
    by_id = {}
    for i, stub in enumerate(stubs):
        info = await stub.GetInfo(worker_pb2.GetInfoRequest())
        wid = f"w{i}-{info.worker_id}"
        by_id[wid] = stub
        registry.register(WorkerRecord(
            wid, ROLE_FROM_PROTO[info.role], info.model, "", {e.backend: e.address for e in info.kv_endpoints},
            info.num_total_kv_blocks, info.kv_block_size_tokens, info.max_model_len_tokens,
            num_free_kv_blocks=info.num_free_kv_blocks), 0.0)
    model = info.model
    backends = (backend,) if backend else ("ucx", "tcp", "fake")
    index = PrefixIndex() if indexed_on is not None else None
    if index is not None:
        index.apply(list(by_id)[indexed_on], block_hashes(prompt_ids, info.kv_block_size_tokens), [])
    dispatcher = Dispatcher(registry, backends, index, local_prefill_max_tokens=local_prefill_max_tokens)
    flow = RequestFlow(dispatcher, by_id.__getitem__, WallClock(), ScenarioClassifier())
    request = router_pb2.RouteRequest(req_id=req_id, model=model, prompt_token_ids=prompt_ids, sampling=sampling,
                                      ttft_slo_ms=ttft_slo_ms)
    out = await collect(flow.run(request, RequestTracker(req_id, 0.0)))
    out.local_prefill = flow.counters.local_prefills > 0
    return out
