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
import heapq
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
    # Bumped by WorkerRegistry.touch() on every change that affects placement: index entries
    # carrying an older version are stale and skipped.
    version: int = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    @property
    def est_free_blocks(self) -> int:
        return self.num_free_kv_blocks - self.num_blocks_placed


class NoWorkers(Exception):
    """No live worker serves this model: the cluster is down or still starting."""


class NoCapacity(Exception):
    """Workers are alive but none can take the request now; retry later."""


def _rank_key(rec: WorkerRecord) -> tuple:
    # Prefill: fewest in flight first. Decode/aggregated: most free KV first, then fewest in flight.
    if rec.role is Role.PREFILL:
        return (rec.num_inflight, rec.worker_id)
    return (-rec.est_free_blocks, rec.num_inflight, rec.worker_id)


class WorkerRegistry:
    """Workers by id, plus an index that ranks the placeable ones per (model, role, group) in
    O(log n): lazily invalidated heaps, so placement does not scan thousands of workers.

    Whoever changes a record's load, role, group, liveness or draining flag calls `touch(rec)`.
    """

    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self._workers: dict[str, WorkerRecord] = {}
        self._heaps: dict[tuple, list] = {}

    def touch(self, rec: WorkerRecord) -> None:
        rec.version += 1
        if not rec.alive or rec.draining or self._workers.get(rec.worker_id) is not rec:
            return
        entry = (*_rank_key(rec), rec.version)
        for key in ((rec.model, rec.role, rec.scenario), (rec.model, rec.role, None)):
            heap = self._heaps.setdefault(key, [])
            heapq.heappush(heap, entry)
            if len(heap) > 8 * len(self._workers) + 64:
                self._rebuild(key)

    def _rebuild(self, key: tuple) -> None:
        model, role, group = key
        self._heaps[key] = [(*_rank_key(w), w.version) for w in self.alive(model, role, group)]
        heapq.heapify(self._heaps[key])

    def _valid(self, entry: tuple) -> WorkerRecord | None:
        rec = self._workers.get(entry[-2])
        return rec if rec is not None and rec.version == entry[-1] else None

    def ranked(self, model: str, role: Role, group: str | None, limit: int,
               exclude_ids: frozenset[str] = frozenset(), accept=None) -> list[WorkerRecord]:
        """Up to `limit` placeable workers in rank order that are not excluded and pass `accept`.
        `accept` returning None stops the search (nothing further down can pass)."""
        heap = self._heaps.get((model, role, group), [])
        out, held = [], []
        while heap and len(out) < limit:
            entry = heapq.heappop(heap)
            rec = self._valid(entry)
            if rec is None:
                continue                      # stale: dropped for good
            held.append(entry)
            if rec.worker_id in exclude_ids:
                continue
            verdict = True if accept is None else accept(rec)
            if verdict is None:
                break
            if verdict:
                out.append(rec)
        for entry in held:
            heapq.heappush(heap, entry)
        return out

    def register(self, rec: WorkerRecord, now_s: float) -> None:
        rec.last_heartbeat_s = now_s
        rec.alive = True
        rec.num_free_kv_blocks = rec.num_free_kv_blocks or rec.num_total_kv_blocks
        old = self._workers.get(rec.worker_id)
        if old is not None:
            rec.version = old.version + 1
        self._workers[rec.worker_id] = rec
        self.touch(rec)

    def heartbeat(self, worker_id: str, num_free_kv_blocks: int, num_active_requests: int, now_s: float) -> bool:
        rec = self._workers.get(worker_id)
        if rec is None:
            return False
        rec.last_heartbeat_s = now_s
        rec.alive = True
        rec.num_free_kv_blocks = num_free_kv_blocks
        rec.num_active_requests = num_active_requests
        rec.num_blocks_placed = 0  # the heartbeat's count already includes what we placed
        self.touch(rec)
        return True

    def expire(self, now_s: float) -> list[str]:
        """Mark workers whose lease ran out as dead; returns the ids that just died."""
        died = []
        for rec in self._workers.values():
            if rec.alive and now_s - rec.last_heartbeat_s > self.lease_s:
                rec.alive = False
                self.touch(rec)
                died.append(rec.worker_id)
        return died

    def set_draining(self, rec: WorkerRecord, draining: bool) -> None:
        rec.draining = draining
        self.touch(rec)

    def set_role(self, rec: WorkerRecord, role: Role) -> None:
        rec.role = role
        self.touch(rec)

    def remove(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def alive(self, model: str, role: Role, group: str | None = None) -> list[WorkerRecord]:
        """Live workers that may take new work (draining ones may not). O(n): not for hot paths."""
        return [w for w in self._workers.values() if w.alive and not w.draining and w.model == model
                and w.role is role and (group is None or w.scenario == group)]

    def has_placeable(self, model: str, group: str | None) -> bool:
        return any(self.ranked(model, role, group, 1) for role in Role)

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
        """Place within the scenario's worker group; a group with no workers uses every worker.
        O(log n) in the number of workers (plus skipped, excluded or unreachable ones)."""
        if group is not None and not self.registry.has_placeable(model, group):
            group = None
        total_tokens = num_prompt_tokens + max_tokens
        decode = self._best_kv(model, Role.DECODE, group, total_tokens, exclude_ids)
        if decode is not None:
            prefill = self.registry.ranked(model, Role.PREFILL, group, 1, exclude_ids,
                                           accept=lambda w: self._common_backend(w, decode) is not None)
            if prefill:
                backend = self._common_backend(prefill[0], decode)
                return Placement(decode.worker_id, prefill[0].worker_id, backend, decode.blocks_needed(total_tokens))
        agg = self._best_kv(model, Role.AGGREGATED, group, total_tokens, exclude_ids)
        if agg is not None:
            return Placement(agg.worker_id, None, None, agg.blocks_needed(total_tokens))
        if not any(w.alive and w.model == model for w in self.registry.all()):
            raise NoWorkers(f"no live worker serves model {model!r}")
        raise NoCapacity("no worker has free KV capacity for this request now")

    def prefill_candidates(self, model: str, decode_id: str, exclude_ids: frozenset[str] = frozenset(),
                           limit: int = 8) -> list[tuple[str, str]]:
        """(prefill worker, KV backend) pairs able to feed `decode_id`, least loaded first: the
        order in which on-demand forwarding offers a request (same group as the decode worker)."""
        decode = self.registry.get(decode_id)
        if decode is None:
            return []
        reachable = lambda w: self._common_backend(w, decode) is not None  # noqa: E731
        pool = (self.registry.ranked(model, Role.PREFILL, decode.scenario, limit, exclude_ids, reachable)
                or self.registry.ranked(model, Role.PREFILL, None, limit, exclude_ids, reachable))
        return [(w.worker_id, self._common_backend(w, decode)) for w in pool]

    def _best_kv(self, model: str, role: Role, group: str | None, num_tokens: int,
                 exclude_ids: frozenset[str]) -> WorkerRecord | None:
        # Ranked by free KV: if the best-placed worker cannot fit the request, none can.
        fits = lambda w: True if w.est_free_blocks >= w.blocks_needed(num_tokens) else None  # noqa: E731
        found = self.registry.ranked(model, role, group, 1, exclude_ids, fits)
        return found[0] if found else None

    def _common_backend(self, a: WorkerRecord, b: WorkerRecord) -> str | None:
        return next((x for x in self.kv_backend_preference if x in a.kv_addresses and x in b.kv_addresses), None)

    def _adjust(self, worker_id: str | None, inflight: int = 0, blocks: int = 0) -> None:
        rec = self.registry.get(worker_id) if worker_id else None
        if rec is not None:
            rec.num_inflight = max(0, rec.num_inflight + inflight)
            rec.num_blocks_placed += blocks
            self.registry.touch(rec)

    def on_start(self, p: Placement) -> None:
        self._adjust(p.decode_id, inflight=1, blocks=p.num_blocks)
        self._adjust(p.prefill_id, inflight=1)

    def on_prefill_done(self, prefill_id: str | None) -> None:
        self._adjust(prefill_id, inflight=-1)

    def on_prefill_forwarded(self, from_id: str, to_id: str) -> None:
        """The request moved to another prefill worker after a rejection."""
        self._adjust(from_id, inflight=-1)
        self._adjust(to_id, inflight=1)

    def on_finish(self, p: Placement) -> None:
        self.on_decode_done(p.decode_id)

    def on_decode_done(self, decode_id: str) -> None:
        self._adjust(decode_id, inflight=-1)


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
