"""Deterministic discrete-event simulation of a disaggregated fleet.

The decisions come from the live router's policy objects: `WorkerRegistry` + `Dispatcher`
(placement and on-demand forwarding order), `ScenarioClassifier`, `RatioController` (P/D ratio and
which workers drain) and a prefill scheduler per worker; only
time and the workers' speed are simulated (`HardwareProfile`). With prefix caching, every worker
keeps a cache of 512-token trace blocks in the live workers' block bookkeeping
(`policy/kv_blocks.py`) and publishes stored/evicted blocks on its heartbeat to the router's
`PrefixIndex`, which cache-aware placement reads for both roles. A prefill worker computes only
after the prefix it holds. A decode worker reserves blocks for the whole request when it is
placed (ReserveKV), linking the prompt's leading blocks it holds, so only the rest crosses the
wire; a finished request's prompt blocks stay cached there until evicted. With conditional
disaggregation (`local_prefill_max_tokens`), a request the placement sends to its decode worker is
prefilled there: that worker's decode steps stop while it computes. Request lifecycle: arrival ->
classify -> place -> prefill queue -> KV transfer -> decode batch (continuous batching, one token
per step) -> done. A role change drains the worker first, as in the router.
"""
from __future__ import annotations

import heapq
import itertools
import time

from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.kv_blocks import BlockAllocator, OutOfKVBlocks
from pdserve.policy.prefix_cache import PrefixIndex, chain_hashes, reusable_blocks
from pdserve.policy.prefill_scheduler import PrefillJob, WorkUnit, make_scheduler
from pdserve.policy.ratio_controller import RatioController
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.registry import NoCapacity, NoWorkers, Role, WorkerRecord, WorkerRegistry
from pdserve.sim.entities import SimRequest, SimWorker
from pdserve.sim.hardware import KV_POOL_BYTES, HardwareProfile
from pdserve.traces import MOONCAKE_BLOCK_TOKENS

_MODEL = "sim"
_BLOCK_TOKENS = 16
_HEARTBEAT_S = 1.0


class Simulation:
    def __init__(self, hw: HardwareProfile, splits: dict[str, tuple[int, int]], scenarios: ScenarioClassifier,
                 controller: RatioController | None, control_interval_s: float = 5.0,
                 heartbeat_s: float = _HEARTBEAT_S, prefill_policy: str = "fcfs", forwarding: bool = False,
                 max_prefill_offers: int = 3, block_hashes: dict[str, tuple[int, ...]] | None = None,
                 prefix_caching: bool = False, cache_aware: bool = False, local_prefill_max_tokens: int = 0):
        self.hw = hw
        self.scenarios = scenarios
        self.controller = controller
        self.control_interval_s = control_interval_s
        self.registry = WorkerRegistry(lease_s=float("inf"))
        self.dispatcher = Dispatcher(self.registry, ("sim",), PrefixIndex() if cache_aware else None,
                                     local_prefill_max_tokens=local_prefill_max_tokens)
        self.num_local_prefills = 0
        self._chains = ({rid: chain_hashes(h) for rid, h in (block_hashes or {}).items()} if prefix_caching
                        else {})
        self.prefix_query_tokens = self.prefix_hit_tokens = 0
        self.kv_tokens_sent = self.kv_tokens_linked = 0    # prompt tokens sent to / linked at decode
        self._prefill_tokens: dict[str, int] = {}     # placement's expected prefill tokens, by request
        self.workers: dict[str, SimWorker] = {}
        self._events: list = []
        self._seq = itertools.count()
        self.now_s = 0.0
        self.ratio_log: list[tuple[float, str, int, int]] = []
        self._jobs: dict[str, SimRequest] = {}       # requests in prefill, by id
        self.heartbeat_s = heartbeat_s
        self.forwarding = forwarding
        self.max_prefill_offers = max_prefill_offers
        # Cost of the policy's own decisions (wall clock of this process, not simulated time).
        self.num_dispatches = 0
        self.dispatch_wall_s = 0.0
        self.prefill_busy_s = 0.0
        self.decode_batch_seconds = 0.0
        self._role_seconds = {Role.PREFILL: 0.0, Role.DECODE: 0.0}
        total_blocks = KV_POOL_BYTES // (hw.kv_bytes_per_token * _BLOCK_TOKENS)
        for scenario, (num_p, num_d) in splits.items():
            for i in range(num_p + num_d):
                rec = WorkerRecord(f"{scenario}-{i}", Role.PREFILL if i < num_p else Role.DECODE, _MODEL, "",
                                   {"sim": b""}, total_blocks, _BLOCK_TOKENS, 1 << 20, scenario=scenario,
                                   perf=hw.perf())
                self.registry.register(rec, 0.0)
                cache = (BlockAllocator(KV_POOL_BYTES // (hw.kv_bytes_per_token * MOONCAKE_BLOCK_TOKENS),
                                        MOONCAKE_BLOCK_TOKENS, prefix_caching=True) if prefix_caching else None)
                self.workers[rec.worker_id] = SimWorker(rec, self._scheduler(prefill_policy), cache=cache)
            self.ratio_log.append((0.0, scenario, num_p, num_d))

    def _scheduler(self, policy: str):
        # The live prefill policies, planning with this hardware's cost (one "layer": attention
        # carries the fixed and quadratic terms, MLP the per-token term). Units run whole here:
        # the simulator models FlowPrefill's ordering, demotion and batching, not its preemption.
        hw = self.hw
        cost = OperatorCostModel(1, (hw.prefill_base_s, 0.0, hw.prefill_quad_s), (0.0, 1.0 / hw.prefill_tokens_per_s))
        return make_scheduler(policy, 1, cost)

    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, requests: list[SimRequest]) -> list[SimRequest]:
        for r in requests:
            self._at(r.arrival_s, self._arrive, r)
        end_s = max(r.arrival_s for r in requests)
        if self.controller is not None:
            for k in range(1, int(end_s / self.control_interval_s) + 1):
                self._at(k * self.control_interval_s, self._control)
        for k in range(1, int(end_s / self.heartbeat_s) + 1):
            self._at(k * self.heartbeat_s, self._heartbeat)
        while self._events:
            self.now_s, _, fn, args = heapq.heappop(self._events)
            fn(*args)
        for w in self.workers.values():
            if w.rec.role in self._role_seconds:
                self._role_seconds[w.rec.role] += self.now_s - w.role_since_s
                w.role_since_s = self.now_s
        return requests

    def prefix_hit_rate(self) -> float | None:
        """Prompt tokens prefill workers took from their caches, of all they were offered."""
        return round(self.prefix_hit_tokens / self.prefix_query_tokens, 4) if self.prefix_query_tokens else None

    def kv_transfer(self) -> dict:
        """Prompt tokens that crossed the wire, and those decode workers linked from their caches."""
        total = self.kv_tokens_sent + self.kv_tokens_linked
        return {"tokens_sent": self.kv_tokens_sent, "tokens_linked_at_decode": self.kv_tokens_linked,
                "linked_share": round(self.kv_tokens_linked / total, 4) if total else None}

    def utilisation(self) -> dict:
        """Prefill: busy share of prefill-worker time. Decode: mean batch size while running."""
        prefill_s = self._role_seconds[Role.PREFILL]
        decode_s = self._role_seconds[Role.DECODE]
        return {"prefill_busy_share": round(self.prefill_busy_s / prefill_s, 3) if prefill_s else None,
                "decode_mean_batch": round(self.decode_batch_seconds / decode_s, 2) if decode_s else None}

    # ---- arrivals and prefill ----
    def _arrive(self, r: SimRequest) -> None:
        r.scenario = self.scenarios.classify(r.scenario_header, "", [])
        spec = self.scenarios.spec(r.scenario)
        r.ttft_slo_s, r.tpot_slo_s = spec.ttft_slo_ms / 1e3, spec.tpot_slo_ms / 1e3
        if self.controller is not None:
            self.controller.observe(r.scenario, self.now_s, r.input_tokens, r.output_tokens)
        started = time.perf_counter()
        try:
            chain = self._chains.get(r.req_id)
            p = self.dispatcher.place(_MODEL, r.input_tokens, r.output_tokens, scenario=r.scenario, req_id=r.req_id,
                                      prompt_hashes=(MOONCAKE_BLOCK_TOKENS, chain) if chain else None)
        except (NoCapacity, NoWorkers):
            r.rejected = True
            return
        finally:
            self.dispatch_wall_s += time.perf_counter() - started
            self.num_dispatches += 1
        self.dispatcher.on_start(p)
        self._prefill_tokens[r.req_id] = p.prefill_tokens
        r.decode_id = p.decode_id
        self._reserve_decode(r)
        self._jobs[r.req_id] = r
        start = self._prefill_locally if p.local_prefill else self._offer_prefill
        if self.hw.request_overhead_s:
            self._at(self.now_s + self.hw.request_overhead_s, start, r, p)
        else:
            start(r, p)

    def _prefill_locally(self, r: SimRequest, p) -> None:
        """Conditional disaggregation: the decode worker computes what its cache lacks, after any
        local prefill before it, and its batch makes no progress meanwhile."""
        w = self.workers[r.decode_id]
        self._jobs.pop(r.req_id, None)
        self._prefill_tokens.pop(r.req_id, None)
        self.num_local_prefills += 1
        self.prefix_query_tokens += r.input_tokens
        self.prefix_hit_tokens += r.decode_cached_tokens
        self.kv_tokens_linked += r.decode_cached_tokens
        self._advance(w)
        if self.now_s >= w.stall_until_s:
            w.stall_from_s = w.stall_until_s = self.now_s
        w.stall_until_s += self.hw.prefill_s(r.input_tokens - r.decode_cached_tokens)
        self._schedule_decode(w)
        self._at(w.stall_until_s, self._kv_arrived, r)

    def _offer_prefill(self, r: SimRequest, p) -> None:
        """On-demand forwarding, as the router does: offer the prefill to the workers of
        `Dispatcher.forwarding_order`, one after another; each accepts only if it can finish by the
        TTFT deadline (its scheduler's own admission check)."""
        current = p.prefill_id
        for wid in self.dispatcher.forwarding_order(_MODEL, p, self.max_prefill_offers):
            w = self.workers[wid]
            if wid != current:
                self.dispatcher.on_prefill_forwarded(current, wid, p.prefill_tokens)
                current = wid
            reusable = self._reusable(r)
            cached = w.cache.peek(reusable) * MOONCAKE_BLOCK_TOKENS if w.cache is not None else 0
            job = PrefillJob(r.req_id, r.input_tokens, self.now_s, r.arrival_s + r.ttft_slo_s, cached_tokens=cached)
            if not self.forwarding or w.prefill.admission(job, self.now_s)[0]:
                if w.cache is not None:     # the live worker's lookup: counted, and touched as recently used
                    w.cache.lookup(reusable, r.input_tokens)
                    self.prefix_query_tokens += r.input_tokens
                    self.prefix_hit_tokens += cached
                w.prefill.add(job, self.now_s)
                self._maybe_prefill(w)
                return
        # Every offer refused: the client gets 429 at once instead of a queue it cannot leave.
        self._release_decode(r, cache=False)
        self.dispatcher.on_prefill_done(current, self._prefill_tokens.pop(r.req_id, 0))
        self.dispatcher.on_finish(p)
        self._jobs.pop(r.req_id, None)
        r.rejected = True

    def _reserve_decode(self, r: SimRequest) -> None:
        """ReserveKV: blocks for the whole request on its decode worker, the cached leading blocks
        of the prompt linked. The router's estimate admitted it in 16-token blocks; when rounding
        to 512-token blocks does not fit, the request links nothing and holds no cache blocks."""
        w = self.workers[r.decode_id]
        w.reserved[r.req_id] = r.input_tokens
        if w.cache is not None:
            try:
                r.decode_cached_tokens = w.cache.allocate(r.req_id, r.input_tokens + r.output_tokens,
                                                          self._reusable(r))
            except OutOfKVBlocks:
                r.decode_cached_tokens = 0

    def _release_decode(self, r: SimRequest, cache: bool) -> None:
        """The request's decode blocks back to the pool; after a finished request its prompt's
        full blocks stay cached (the live worker names them once written)."""
        w = self.workers[r.decode_id]
        w.reserved.pop(r.req_id, None)
        if w.cache is not None and w.cache.holds(r.req_id):
            if cache:
                w.cache.register(r.req_id, self._chains.get(r.req_id, [])[:r.input_tokens // MOONCAKE_BLOCK_TOKENS])
            w.cache.free(r.req_id)

    def _reusable(self, r: SimRequest) -> list[int]:
        return self._chains.get(r.req_id, [])[:reusable_blocks(r.input_tokens, MOONCAKE_BLOCK_TOKENS)]

    def _maybe_prefill(self, w: SimWorker) -> None:
        if w.busy:
            return
        unit = w.prefill.next_unit(self.now_s)
        if unit is None:
            self._maybe_switch(w)
            return
        w.busy = True
        duration = self._unit_s(w, unit)
        self.prefill_busy_s += duration
        self._at(self.now_s + duration, self._prefill_done, w, unit)

    def _unit_s(self, w: SimWorker, unit: WorkUnit) -> float:
        if len(unit.pieces) == 1:
            return self.hw.prefill_s(unit.pieces[0].num_tokens)
        # A batch (FlowPrefill): attention per piece, one MLP over all tokens. Nothing calibrates
        # the simulated cost model, so it predicts exactly the hardware's time.
        return w.prefill.cost_model.remaining_s(unit.piece_tokens(), 0)

    def _prefill_done(self, w: SimWorker, unit: WorkUnit) -> None:
        unit.next_op = unit.num_ops
        for job in w.prefill.on_unit_done(unit, self.now_s):
            r = self._jobs.pop(job.req_id)
            if w.cache is not None:
                w.cache.store(self._chains.get(r.req_id, [])[:r.input_tokens // MOONCAKE_BLOCK_TOKENS])
            self.dispatcher.on_prefill_done(w.rec.worker_id, self._prefill_tokens.pop(r.req_id, 0))
            sent = r.input_tokens - r.decode_cached_tokens
            self.kv_tokens_sent += sent
            self.kv_tokens_linked += r.decode_cached_tokens
            self._at(self.now_s + self.hw.kv_transfer_s(sent), self._kv_arrived, r)
        w.busy = False
        self._maybe_prefill(w)

    # ---- decode: a fluid model of continuous batching ----
    # Every running sequence gains one token per step, so a worker keeps one token clock T (steps
    # taken so far) that advances at 1/step(B) per second while the batch size B is constant; a
    # sequence joining at T0 with n tokens to go finishes when T reaches T0 + n. Events happen only
    # when sequences join or finish, not at every step: that is what lets a fleet-scale run fit.
    def _advance(self, w: SimWorker) -> None:
        if w.batch:
            running_s = self.now_s - w.clock_s - w.stalled_s(w.clock_s, self.now_s)
            w.token_clock += running_s / self.hw.decode_step_s(len(w.batch))
            self.decode_batch_seconds += len(w.batch) * (self.now_s - w.clock_s)
        w.clock_s = self.now_s

    def _kv_arrived(self, r: SimRequest) -> None:
        r.first_token_s, r.num_generated_tokens = self.now_s, 1
        w = self.workers[r.decode_id]
        w.reserved.pop(r.req_id, None)          # its prompt's KV now counts in the batch
        if r.output_tokens <= 1:
            self._finish(w, r)
            return
        self._advance(w)
        r.decode_start_token_clock = w.token_clock
        heapq.heappush(w.batch, (w.token_clock + r.output_tokens - 1, next(self._seq), r))
        w.sum_input_tokens += r.input_tokens
        w.sum_start_token_clock += w.token_clock
        self._schedule_decode(w)

    def _schedule_decode(self, w: SimWorker) -> None:
        w.decode_version += 1
        if w.batch:
            steps = max(0.0, w.batch[0][0] - w.token_clock)
            stall_left_s = max(0.0, w.stall_until_s - self.now_s)
            self._at(self.now_s + stall_left_s + steps * self.hw.decode_step_s(len(w.batch)), self._decode_event, w,
                     w.decode_version)

    def _decode_event(self, w: SimWorker, version: int) -> None:
        if version != w.decode_version:
            return                       # the batch changed since this was scheduled
        self._advance(w)
        while w.batch and w.batch[0][0] <= w.token_clock + 1e-9:
            _, _, r = heapq.heappop(w.batch)
            r.num_generated_tokens = r.output_tokens
            w.sum_input_tokens -= r.input_tokens
            w.sum_start_token_clock -= r.decode_start_token_clock
            self._finish(w, r)
        self._schedule_decode(w)
        if not w.batch:
            self._maybe_switch(w)

    def _kv_tokens(self, w: SimWorker) -> float:
        """Tokens held in the worker's KV: prompts plus everything generated so far, and the prompts
        of requests reserved here whose KV is still on its way (a live ReserveKV takes them)."""
        return (w.sum_input_tokens + len(w.batch) * (w.token_clock + 1) - w.sum_start_token_clock
                + sum(w.reserved.values()))

    def _finish(self, w: SimWorker, r: SimRequest) -> None:
        r.finish_s = self.now_s
        self._release_decode(r, cache=True)
        self.dispatcher.on_decode_done(w.rec.worker_id, r.req_id)

    # ---- control ----
    def _heartbeat(self) -> None:
        for w in self.workers.values():
            self._advance(w)
            used = int(self._kv_tokens(w) // _BLOCK_TOKENS)
            # Simplification kept from the first simulator: each heartbeat counts every placement as seen.
            self.registry.heartbeat(w.rec.worker_id, w.rec.num_total_kv_blocks - used, len(w.batch), self.now_s)
            if w.cache is not None and self.dispatcher.prefix_index is not None:
                self.dispatcher.prefix_index.apply(w.rec.worker_id, *w.cache.drain_events())

    def _control(self) -> None:
        """The controller's plan, carried out as the live rebalancer does: drain, then switch."""
        for scenario in sorted(self.registry.scenarios()):
            plan = self.controller.decide(scenario, self.scenarios.spec(scenario), self.registry.members(scenario),
                                          self.hw.perf(), self.now_s)
            if plan is None:
                continue
            self.ratio_log.append((self.now_s, scenario, *plan.new))
            for change in plan.role_changes:
                w = self.workers[change.worker_id]
                self.registry.set_draining(w.rec, True)
                w.pending_role = change.to_role
                self._maybe_switch(w)

    def _maybe_switch(self, w: SimWorker) -> None:
        idle = not w.busy and w.prefill.num_waiting == 0 and not w.batch and not w.reserved
        if w.pending_role is not None and idle:
            role, w.pending_role = w.pending_role, None
            self._role_seconds[w.rec.role] += self.now_s - w.role_since_s
            w.role_since_s = self.now_s
            w.rec.role = role
            self.registry.set_draining(w.rec, False)   # touches the record: indexed under its new role
