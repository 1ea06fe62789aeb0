"""Worker registry: every worker the router knows, its lease and load, and an O(log n) index of
the ones that may take new work.

Pure: no I/O and no clock reads (every method that needs time takes `now_s`), so the live router
and the fleet simulator hold the same object. A worker serves one scenario's traffic (its
`scenario`); the registry answers "which workers of this model, role and scenario may take work,
best first".
"""
from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field

DEFAULT_MAX_BATCH = 256     # a worker's decode batch limit when it does not say (older workers)


@dataclass(frozen=True)
class WorkerPerf:
    """A worker's profiled speed, which the ratio controller's demand model needs."""

    prefill_tokens_per_s: float
    decode_step_base_s: float        # step time = base + per_seq * batch
    decode_step_per_seq_s: float
    max_batch: int = DEFAULT_MAX_BATCH

    def decode_batch(self, tpot_slo_s: float) -> int:
        """The largest batch whose step meets the TPOT SLO (1 when none does: best effort)."""
        room = tpot_slo_s - self.decode_step_base_s
        if room <= 0:
            return 1
        return max(1, min(self.max_batch, int(room / max(self.decode_step_per_seq_s, 1e-12))))

    def decode_step_s(self, tpot_slo_s: float) -> float:
        """One step's time at that batch: the time per output token of each sequence in it."""
        return self.decode_step_base_s + self.decode_step_per_seq_s * self.decode_batch(tpot_slo_s)

    def decode_tokens_per_s(self, tpot_slo_s: float) -> float:
        if tpot_slo_s <= self.decode_step_base_s:
            return 1.0 / max(self.decode_step_base_s, 1e-9)
        return self.decode_batch(tpot_slo_s) / self.decode_step_s(tpot_slo_s)

    @staticmethod
    def mean(perfs: "list[WorkerPerf]") -> "WorkerPerf | None":
        if not perfs:
            return None
        n = len(perfs)
        return WorkerPerf(sum(p.prefill_tokens_per_s for p in perfs) / n,
                          sum(p.decode_step_base_s for p in perfs) / n,
                          sum(p.decode_step_per_seq_s for p in perfs) / n,
                          round(sum(p.max_batch for p in perfs) / n))

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
    max_batch_size: int = 0            # most sequences it admits at once (0: not said)
    last_heartbeat_s: float = 0.0
    alive: bool = True
    # Router-side accounting between heartbeats, so a burst does not pile onto one worker.
    num_inflight: int = 0
    inflight_prefill_tokens: int = 0   # prompt tokens placed here whose prefill has not finished
    # KV the router placed here that the worker's last heartbeat did not show yet: placements by
    # request id, and the sum of those not among the worker's held requests at that heartbeat.
    placed_blocks: dict[str, int] = field(default_factory=dict)
    num_unseen_blocks: int = 0
    held_req_ids: frozenset[str] = frozenset()
    suspect: bool = False              # a call to it just failed: no new work until it heartbeats
    scenario: str = "default"          # the scenario whose traffic it serves
    draining: bool = False             # no new work (before a role change or maintenance)
    perf: WorkerPerf | None = None
    instance_id: str = ""              # the process that registered this id (identity binding)
    prefix_cache: object = None        # its last heartbeat's prefix cache counters (for operators)
    num_preemptions: int = 0           # its last heartbeat's count of prefill preemptions (for operators)
    # Bumped by WorkerRegistry.touch() on every change that affects placement: index entries
    # carrying an older version are stale and skipped.
    version: int = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    @property
    def has_batch_slot(self) -> bool:
        """Whether it can admit one more sequence, by the router's count of what it placed here."""
        return not self.max_batch_size or self.num_inflight < self.max_batch_size

    @property
    def est_free_blocks(self) -> int:
        return self.num_free_kv_blocks - self.num_unseen_blocks


class NoWorkers(Exception):
    """No live worker serves this model: the cluster is down or still starting."""


class NoCapacity(Exception):
    """Workers are alive but none can take the request now; retry later."""


def _rank_key(rec: WorkerRecord) -> tuple:
    # Prefill: fewest in flight first. Decode/aggregated: those with a free batch slot first, then
    # most free KV, then fewest in flight.
    if rec.role is Role.PREFILL:
        return (rec.num_inflight, rec.worker_id)
    return (not rec.has_batch_slot, -rec.est_free_blocks, rec.num_inflight, rec.worker_id)


class WorkerRegistry:
    """Workers by id, plus an index that ranks the placeable ones per (model, role, scenario) in
    O(log n): lazily invalidated heaps, so placement does not scan thousands of workers.

    Whoever changes a record's load, role, scenario, liveness or draining flag calls `touch(rec)`.
    """

    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self._workers: dict[str, WorkerRecord] = {}
        self._heaps: dict[tuple, list] = {}

    def touch(self, rec: WorkerRecord) -> None:
        rec.version += 1
        if not self.placeable(rec) or self._workers.get(rec.worker_id) is not rec:
            return
        entry = (*_rank_key(rec), rec.version)
        for key in ((rec.model, rec.role, rec.scenario), (rec.model, rec.role, None)):
            heap = self._heaps.setdefault(key, [])
            heapq.heappush(heap, entry)
            if len(heap) > 8 * len(self._workers) + 64:
                self._rebuild(key)

    def _rebuild(self, key: tuple) -> None:
        model, role, scenario = key
        self._heaps[key] = [(*_rank_key(w), w.version) for w in self.alive(model, role, scenario)]
        heapq.heapify(self._heaps[key])

    def _valid(self, entry: tuple) -> WorkerRecord | None:
        rec = self._workers.get(entry[-2])
        return rec if rec is not None and rec.version == entry[-1] else None

    def ranked(self, model: str, role: Role, scenario: str | None, limit: int,
               exclude_ids: frozenset[str] = frozenset(), accept=None) -> list[WorkerRecord]:
        """Up to `limit` placeable workers in rank order that are not excluded and pass `accept`.
        `accept` returning None stops the search (nothing further down can pass)."""
        heap = self._heaps.get((model, role, scenario), [])
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

    @staticmethod
    def placeable(rec: WorkerRecord) -> bool:
        return rec.alive and not rec.draining and not rec.suspect

    def heartbeat(self, worker_id: str, num_free_kv_blocks: int, num_active_requests: int, now_s: float,
                  held_req_ids: frozenset[str] | None = None) -> bool:
        """`held_req_ids`: the requests holding KV on the worker when it counted its free blocks;
        placements not among them are still to be subtracted. None: all placements were seen."""
        rec = self._workers.get(worker_id)
        if rec is None:
            return False
        rec.last_heartbeat_s = now_s
        rec.alive = True
        rec.num_free_kv_blocks = num_free_kv_blocks
        rec.num_active_requests = num_active_requests
        rec.suspect = False
        rec.held_req_ids = frozenset(rec.placed_blocks) if held_req_ids is None else frozenset(held_req_ids)
        rec.num_unseen_blocks = sum(b for r, b in rec.placed_blocks.items() if r not in rec.held_req_ids)
        self.touch(rec)
        return True

    def mark_suspect(self, worker_id: str) -> None:
        """A call to the worker failed as if it were gone: stop placing on it at once, well before
        its lease runs out; its next heartbeat clears this."""
        rec = self._workers.get(worker_id)
        if rec is not None and not rec.suspect:
            rec.suspect = True
            self.touch(rec)

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

    def alive(self, model: str, role: Role, scenario: str | None = None) -> list[WorkerRecord]:
        """Live workers that may take new work (draining ones may not). O(n): not for hot paths."""
        return [w for w in self._workers.values() if self.placeable(w) and w.model == model
                and w.role is role and (scenario is None or w.scenario == scenario)]

    def has_placeable(self, model: str, scenario: str | None) -> bool:
        return any(self.ranked(model, role, scenario, 1) for role in Role)

    def has_any_placeable(self, scenario: str) -> bool:
        """Whether any model's worker of `scenario` may take work. O(models x roles x scenarios)."""
        return any(key[2] == scenario and self.ranked(key[0], key[1], scenario, 1) for key in list(self._heaps))

    def scenarios_serving(self, model: str) -> set[str]:
        """Scenarios with a placeable worker of `model`. O(models x roles x scenarios), not O(workers)."""
        return {key[2] for key in list(self._heaps) if key[0] == model and key[2] is not None
                and self.ranked(model, key[1], key[2], 1)}

    def scenarios(self) -> set[str]:
        return {w.scenario for w in self._workers.values()}

    def members(self, scenario: str) -> list[WorkerRecord]:
        """Live prefill and decode workers of a scenario, draining ones included. O(n)."""
        return [w for w in self._workers.values() if w.alive and w.scenario == scenario
                and w.role in (Role.PREFILL, Role.DECODE)]

    def scenario_ratio(self, scenario: str) -> tuple[int, int]:
        """(prefill, decode) among live workers of a scenario, draining ones included: they still
        count towards the ratio until their role change completes."""
        ws = self.members(scenario)
        return (sum(w.role is Role.PREFILL for w in ws), sum(w.role is Role.DECODE for w in ws))

    def models(self) -> set[str]:
        return {w.model for w in self._workers.values() if w.alive}
