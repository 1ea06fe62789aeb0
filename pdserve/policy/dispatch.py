"""Placement and its accounting: which workers serve a request, and in which order its prefill is
offered (on-demand forwarding).

Pure: no I/O, no clock reads. Placement for a request:
1. decode side: the live decode worker with the most free KV blocks that fit prompt + output
   (free blocks = last heartbeat's count minus placements that heartbeat did not show yet);
2. prefill side: the live prefill worker with the fewest requests in flight (ties by id);
3. with no prefill/decode pair available, a live aggregated worker, by the same KV rule.
Each is O(log n) in the number of workers (the registry's ranked index). The caller reports the
request's progress (`on_start`, `on_prefill_forwarded`, `on_prefill_done`, `on_decode_done`) so
load between heartbeats is counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.policy.registry import NoCapacity, NoWorkers, Role, WorkerRecord, WorkerRegistry


@dataclass(frozen=True)
class Placement:
    decode_id: str                   # the decode or aggregated worker that streams tokens
    prefill_id: str | None           # None: aggregated, prefill runs on the decode_id worker
    kv_backend: str | None
    num_blocks: int
    req_id: str = ""

    @property
    def disaggregated(self) -> bool:
        return self.prefill_id is not None


class Dispatcher:
    def __init__(self, registry: WorkerRegistry, kv_backend_preference: tuple[str, ...] = ("ucx", "tcp")):
        self.registry = registry
        self.kv_backend_preference = kv_backend_preference

    def place(self, model: str, num_prompt_tokens: int, max_tokens: int,
              exclude_ids: frozenset[str] = frozenset(), scenario: str | None = None, req_id: str = "") -> Placement:
        """Place on the scenario's workers; a scenario with no workers of its own uses every worker.
        O(log n) in the number of workers (plus skipped, excluded or unreachable ones)."""
        if scenario is not None and not self.registry.has_placeable(model, scenario):
            scenario = None
        total_tokens = num_prompt_tokens + max_tokens
        decode = self._best_kv(model, Role.DECODE, scenario, total_tokens, exclude_ids)
        if decode is not None:
            prefill = self.registry.ranked(model, Role.PREFILL, scenario, 1, exclude_ids,
                                           accept=lambda w: self._common_backend(w, decode) is not None)
            if prefill:
                backend = self._common_backend(prefill[0], decode)
                return Placement(decode.worker_id, prefill[0].worker_id, backend, decode.blocks_needed(total_tokens),
                                 req_id)
        agg = self._best_kv(model, Role.AGGREGATED, scenario, total_tokens, exclude_ids)
        if agg is not None:
            return Placement(agg.worker_id, None, None, agg.blocks_needed(total_tokens), req_id)
        if not self._can_serve(model):
            raise NoWorkers(f"no live worker can serve model {model!r} now (it needs an aggregated worker, "
                            f"or a prefill and a decode worker)")
        raise NoCapacity("no worker has free KV capacity for this request now")

    def _can_serve(self, model: str) -> bool:
        """Placeable workers exist for a whole request, full or not (then it is a capacity problem).
        This request's exclusions do not count: a worker that just refused for capacity is full,
        not gone (a gone one is suspect, hence not placeable)."""
        has = lambda role: bool(self.registry.ranked(model, role, None, 1))  # noqa: E731
        return has(Role.AGGREGATED) or (has(Role.PREFILL) and has(Role.DECODE))

    def prefill_candidates(self, model: str, decode_id: str, exclude_ids: frozenset[str] = frozenset(),
                           limit: int = 8) -> list[tuple[str, str]]:
        """(prefill worker, KV backend) pairs able to feed `decode_id`, least loaded first: the
        order in which on-demand forwarding offers a request (same scenario as the decode worker)."""
        decode = self.registry.get(decode_id)
        if decode is None:
            return []
        reachable = lambda w: self._common_backend(w, decode) is not None  # noqa: E731
        pool = (self.registry.ranked(model, Role.PREFILL, decode.scenario, limit, exclude_ids, reachable)
                or self.registry.ranked(model, Role.PREFILL, None, limit, exclude_ids, reachable))
        return [(w.worker_id, self._common_backend(w, decode)) for w in pool]

    def forwarding_order(self, model: str, placement: Placement, max_offers: int) -> list[str]:
        """On-demand forwarding: the prefill workers a request is offered to, in order. The placed
        worker first, then the next least-loaded ones that reach the same decode worker over the
        same KV backend (the reservation is armed for that backend). The live router and the
        simulator both offer in exactly this order."""
        if placement.prefill_id is None:
            return []
        others = [wid for wid, backend in self.prefill_candidates(model, placement.decode_id, limit=max_offers + 1)
                  if wid != placement.prefill_id and backend == placement.kv_backend]
        return [placement.prefill_id, *others][:max_offers]

    def _best_kv(self, model: str, role: Role, scenario: str | None, num_tokens: int,
                 exclude_ids: frozenset[str]) -> WorkerRecord | None:
        # Ranked by free KV: if the best-placed worker cannot fit the request, none can.
        fits = lambda w: True if w.est_free_blocks >= w.blocks_needed(num_tokens) else None  # noqa: E731
        found = self.registry.ranked(model, role, scenario, 1, exclude_ids, fits)
        return found[0] if found else None

    def _common_backend(self, a: WorkerRecord, b: WorkerRecord) -> str | None:
        return next((x for x in self.kv_backend_preference if x in a.kv_addresses and x in b.kv_addresses), None)

    def _adjust(self, worker_id: str | None, inflight: int = 0) -> None:
        rec = self.registry.get(worker_id) if worker_id else None
        if rec is not None:
            rec.num_inflight = max(0, rec.num_inflight + inflight)
            self.registry.touch(rec)

    def on_start(self, p: Placement) -> None:
        rec = self.registry.get(p.decode_id)
        if rec is not None:
            rec.placed_blocks[p.req_id] = p.num_blocks
            rec.num_unseen_blocks += p.num_blocks
        self._adjust(p.decode_id, inflight=1)
        self._adjust(p.prefill_id, inflight=1)

    def on_prefill_done(self, prefill_id: str | None) -> None:
        self._adjust(prefill_id, inflight=-1)

    def on_prefill_forwarded(self, from_id: str, to_id: str) -> None:
        """The request moved to another prefill worker after a rejection."""
        self._adjust(from_id, inflight=-1)
        self._adjust(to_id, inflight=1)

    def on_finish(self, p: Placement) -> None:
        self.on_decode_done(p.decode_id, p.req_id)

    def on_decode_done(self, decode_id: str, req_id: str) -> None:
        """The request left its decode worker. Its blocks stop counting at once if the worker's last
        heartbeat never showed them; otherwise that count already holds them until the next one."""
        rec = self.registry.get(decode_id)
        if rec is not None:
            blocks = rec.placed_blocks.pop(req_id, 0)
            if req_id not in rec.held_req_ids:
                rec.num_unseen_blocks -= blocks
        self._adjust(decode_id, inflight=-1)
