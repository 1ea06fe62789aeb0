"""Applies P/D ratio decisions to real workers: drain, wait for in-flight work, switch role.

A role change never fails a request: the worker first stops receiving new work (draining), the
router waits until every request it placed there has finished (prefills sent their KV, decode
streams ended), then tells the worker its new role and lets work flow to it again. The control
loop asks the pure RatioController for a decision per scenario group on a fixed interval and
records every decision in the store.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from pdserve.clock import Clock
from pdserve.policy.ratio_controller import RatioController, RatioDecision, WorkerPerf
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.router.policy import Role, WorkerRecord, WorkerRegistry

log = logging.getLogger("pdserve.router")
_DRAIN_POLL_S = 0.05


class Rebalancer:
    def __init__(self, registry: WorkerRegistry, controller: RatioController, scenarios: ScenarioClassifier,
                 clock: Clock, set_worker_role: Callable, record_change: Callable | None,
                 record_event: Callable, drain_timeout_s: float):
        self.registry = registry
        self.controller = controller
        self.scenarios = scenarios
        self.clock = clock
        self._set_worker_role = set_worker_role      # async (worker_id, Role) -> None: the worker RPC
        self._record_change = record_change          # blocking (decision) -> None: the store
        self._record_event = record_event            # (worker_id, role, event, detail) -> None
        self._drain_timeout_s = drain_timeout_s
        self._lock = asyncio.Lock()                  # one rebalance at a time

    @staticmethod
    def group_perf(workers: list[WorkerRecord]) -> WorkerPerf | None:
        perfs = [w.perf for w in workers if w.perf is not None]
        if not perfs:
            return None
        n = len(perfs)
        return WorkerPerf(sum(p.prefill_tokens_per_s for p in perfs) / n,
                          sum(p.decode_step_base_s for p in perfs) / n,
                          sum(p.decode_step_per_seq_s for p in perfs) / n)

    async def control_once(self) -> list[RatioDecision]:
        decisions = []
        for group in sorted(self.registry.groups()):
            members = [w for w in self.registry.all() if w.alive and w.scenario == group
                       and w.role in (Role.PREFILL, Role.DECODE)]
            perf = self.group_perf(members)
            if perf is None:
                continue
            current = self.registry.group_ratio(group)
            decision = self.controller.decide(group, self.scenarios.spec(group), current, perf, self.clock.now_s())
            if decision is not None:
                decisions.append(decision)
                await self.apply(decision)
        return decisions

    async def apply(self, decision: RatioDecision) -> None:
        log.info("ratio %s: %s -> %s (%s)", decision.scenario, decision.old, decision.new, decision.reason)
        if self._record_change is not None:
            await asyncio.to_thread(self._record_change, decision)
        await self.rebalance(decision.scenario, decision.new)

    async def rebalance(self, group: str, target: tuple[int, int]) -> None:
        async with self._lock:
            while True:
                num_prefill, num_decode = self.registry.group_ratio(group)
                if num_prefill > target[0] and num_decode < target[1]:
                    await self.switch_role(self._least_busy(group, Role.PREFILL), Role.DECODE)
                elif num_decode > target[1] and num_prefill < target[0]:
                    await self.switch_role(self._least_busy(group, Role.DECODE), Role.PREFILL)
                else:
                    return

    def _least_busy(self, group: str, role: Role) -> WorkerRecord:
        ws = [w for w in self.registry.all() if w.alive and w.scenario == group and w.role is role]
        return min(ws, key=lambda w: (w.num_inflight, w.worker_id))

    async def switch_role(self, rec: WorkerRecord, role: Role) -> None:
        old = rec.role
        self.registry.set_draining(rec, True)
        try:
            await self.wait_drained(rec)
            await self._set_worker_role(rec.worker_id, role)
            self.registry.set_role(rec, role)
            log.info("worker %s: role %s -> %s", rec.worker_id, old.value, role.value)
            self._record_event(rec.worker_id, role.value, "role_changed", f"from {old.value}")
        finally:
            self.registry.set_draining(rec, False)

    async def wait_drained(self, rec: WorkerRecord) -> None:
        deadline = self.clock.now_s() + self._drain_timeout_s
        while rec.num_inflight > 0:
            if self.clock.now_s() > deadline:
                raise TimeoutError(f"worker {rec.worker_id} still has {rec.num_inflight} requests")
            await asyncio.sleep(_DRAIN_POLL_S)
