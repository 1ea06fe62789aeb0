"""Pure routing policy: worker registry with leases, placement, per-request state machine.

No I/O, no clock reads: every method takes `now_s`. The live router (service.py) and the
simulator drive the same objects. Placement for a request:
1. decode side: the live decode worker with the most free KV blocks that fit prompt + output
   (free blocks = last heartbeat's count minus what the router placed there since);
2. prefill side: the live prefill worker with the fewest requests in flight (ties by id);
3. with no prefill/decode pair available, a live aggregated worker, by the same KV rule.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.policy.ratio_controller import WorkerPerf


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"


@dataclass
class WorkerRecord:
    worker_id: str
    role: Role
    model: str
    grpc_address: str
    kv_addresses: dict[str, bytes]
    num_total_kv_blocks: int
    block_size_tokens: int
    max_model_len_tokens: int
    num_free_kv_blocks: int = 0
    num_active_requests: int = 0
    last_heartbeat_s: float = 0.0
    alive: bool = True
    # Router-side accounting between heartbeats, so a burst does not pile onto one worker.
    num_inflight: int = 0
    num_blocks_placed: int = 0
    scenario: str = "default"          # the worker group it serves
    draining: bool = False             # no new work (before a role change or maintenance)
    perf: WorkerPerf | None = None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    @property
    def est_free_blocks(self) -> int:
        return self.num_free_kv_blocks - self.num_blocks_placed


class NoWorkers(Exception):
    """No live worker serves this model: the cluster is down or still starting."""


class NoCapacity(Exception):
    """Workers are alive but none can take the request now; retry later."""


class WorkerRegistry:
    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self._workers: dict[str, WorkerRecord] = {}

    def register(self, rec: WorkerRecord, now_s: float) -> None:
        rec.last_heartbeat_s = now_s
        rec.alive = True
        rec.num_free_kv_blocks = rec.num_free_kv_blocks or rec.num_total_kv_blocks
        self._workers[rec.worker_id] = rec

    def heartbeat(self, worker_id: str, num_free_kv_blocks: int, num_active_requests: int, now_s: float) -> bool:
        rec = self._workers.get(worker_id)
        if rec is None:
            return False
        rec.last_heartbeat_s = now_s
        rec.alive = True
        rec.num_free_kv_blocks = num_free_kv_blocks
        rec.num_active_requests = num_active_requests
        rec.num_blocks_placed = 0  # the heartbeat's count already includes what we placed
        return True

    def expire(self, now_s: float) -> list[str]:
        """Mark workers whose lease ran out as dead; returns the ids that just died."""
        died = []
        for rec in self._workers.values():
            if rec.alive and now_s - rec.last_heartbeat_s > self.lease_s:
                rec.alive = False
                died.append(rec.worker_id)
        return died

    def remove(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def alive(self, model: str, role: Role, group: str | None = None) -> list[WorkerRecord]:
        """Live workers that may take new work (draining ones may not)."""
        return [w for w in self._workers.values() if w.alive and not w.draining and w.model == model
                and w.role is role and (group is None or w.scenario == group)]

    def groups(self) -> set[str]:
        return {w.scenario for w in self._workers.values()}

    def group_ratio(self, group: str) -> tuple[int, int]:
        """(prefill, decode) among live workers of a group, draining ones included: they still count
        towards the ratio until their role change completes."""
        ws = [w for w in self._workers.values() if w.alive and w.scenario == group]
        return (sum(w.role is Role.PREFILL for w in ws), sum(w.role is Role.DECODE for w in ws))

    def models(self) -> set[str]:
        return {w.model for w in self._workers.values() if w.alive}


@dataclass(frozen=True)
class Placement:
    decode_id: str                   # the decode or aggregated worker that streams tokens
    prefill_id: str | None           # None: aggregated, prefill runs on the decode_id worker
    kv_backend: str | None
    num_blocks: int

    @property
    def disaggregated(self) -> bool:
        return self.prefill_id is not None


class Dispatcher:
    def __init__(self, registry: WorkerRegistry, kv_backend_preference: tuple[str, ...] = ("ucx", "tcp")):
        self.registry = registry
        self.kv_backend_preference = kv_backend_preference

    def place(self, model: str, num_prompt_tokens: int, max_tokens: int,
              exclude_ids: frozenset[str] = frozenset(), group: str | None = None) -> Placement:
        """Place within the scenario's worker group; a group with no workers uses every worker."""
        if group is not None and not any(w.alive and w.scenario == group for w in self.registry.all()):
            group = None
        total_tokens = num_prompt_tokens + max_tokens
        decode = self._best_kv(self.registry.alive(model, Role.DECODE, group), total_tokens, exclude_ids)
        prefills = [w for w in self.registry.alive(model, Role.PREFILL, group) if w.worker_id not in exclude_ids]
        if decode is not None and prefills:
            for prefill in sorted(prefills, key=lambda w: (w.num_inflight, w.worker_id)):
                backend = self._common_backend(prefill, decode)
                if backend is not None:
                    return Placement(decode.worker_id, prefill.worker_id, backend, decode.blocks_needed(total_tokens))
        agg = self._best_kv(self.registry.alive(model, Role.AGGREGATED, group), total_tokens, exclude_ids)
        if agg is not None:
            return Placement(agg.worker_id, None, None, agg.blocks_needed(total_tokens))
        if not any(w.alive and w.model == model for w in self.registry.all()):
            raise NoWorkers(f"no live worker serves model {model!r}")
        raise NoCapacity("no worker has free KV capacity for this request now")

    def prefill_candidates(self, model: str, decode_id: str, exclude_ids: frozenset[str] = frozenset()
                           ) -> list[tuple[str, str]]:
        """(prefill worker, KV backend) pairs able to feed `decode_id`, least loaded first: the
        order in which on-demand forwarding offers a request (same group as the decode worker)."""
        decode = self.registry.get(decode_id)
        if decode is None:
            return []
        out = []
        pool = self.registry.alive(model, Role.PREFILL, decode.scenario) or self.registry.alive(model, Role.PREFILL)
        for w in sorted(pool, key=lambda w: (w.num_inflight, w.worker_id)):
            backend = self._common_backend(w, decode)
            if w.worker_id not in exclude_ids and backend is not None:
                out.append((w.worker_id, backend))
        return out

    def _best_kv(self, workers: list[WorkerRecord], num_tokens: int, exclude_ids: frozenset[str]):
        fits = [w for w in workers if w.worker_id not in exclude_ids
                and w.est_free_blocks >= w.blocks_needed(num_tokens)]
        return max(fits, key=lambda w: (w.est_free_blocks, -w.num_inflight, w.worker_id), default=None)

    def _common_backend(self, a: WorkerRecord, b: WorkerRecord) -> str | None:
        return next((x for x in self.kv_backend_preference if x in a.kv_addresses and x in b.kv_addresses), None)

    def on_start(self, p: Placement) -> None:
        for wid in filter(None, (p.decode_id, p.prefill_id)):
            rec = self.registry.get(wid)
            if rec is not None:
                rec.num_inflight += 1
        decode = self.registry.get(p.decode_id)
        if decode is not None:
            decode.num_blocks_placed += p.num_blocks

    def on_prefill_done(self, prefill_id: str | None) -> None:
        rec = self.registry.get(prefill_id) if prefill_id else None
        if rec is not None:
            rec.num_inflight = max(0, rec.num_inflight - 1)

    def on_prefill_forwarded(self, from_id: str, to_id: str) -> None:
        """The request moved to another prefill worker after a rejection."""
        self.on_prefill_done(from_id)
        rec = self.registry.get(to_id)
        if rec is not None:
            rec.num_inflight += 1

    def on_finish(self, p: Placement) -> None:
        self.on_decode_done(p.decode_id)

    def on_decode_done(self, decode_id: str) -> None:
        rec = self.registry.get(decode_id)
        if rec is not None:
            rec.num_inflight = max(0, rec.num_inflight - 1)


class RequestState(enum.Enum):
    RECEIVED = "received"
    PLACED = "placed"
    WAITING_FOR_KV = "waiting_for_kv"   # prefill running, KV streaming to the decode worker
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


_TRANSITIONS = {
    RequestState.RECEIVED: {RequestState.PLACED, RequestState.FAILED, RequestState.CANCELLED},
    RequestState.PLACED: {RequestState.WAITING_FOR_KV, RequestState.DECODING, RequestState.FAILED,
                          RequestState.CANCELLED},
    RequestState.WAITING_FOR_KV: {RequestState.DECODING, RequestState.FAILED, RequestState.CANCELLED},
    RequestState.DECODING: {RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED},
}
TERMINAL = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED})


@dataclass
class RequestTracker:
    """Explicit lifecycle of one request; timestamps come from the caller's clock."""

    req_id: str
    arrival_s: float
    state: RequestState = RequestState.RECEIVED
    history: list[tuple[RequestState, float]] = field(default_factory=list)
    first_token_s: float | None = None
    reason: str = ""

    def to(self, new: RequestState, now_s: float, reason: str = "") -> None:
        if new not in _TRANSITIONS.get(self.state, set()):
            raise ValueError(f"request {self.req_id}: illegal transition {self.state.value} -> {new.value}")
        self.state = new
        self.reason = reason or self.reason
        self.history.append((new, now_s))

    def first_token(self, now_s: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = now_s
