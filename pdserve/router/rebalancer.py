"""Applies P/D ratio decisions to real workers: drain, wait for in-flight work, switch role.

A role change never fails a request: the worker first stops receiving new work (draining), the
router waits until every request it placed there has finished (prefills sent their KV, decode
streams ended), then tells the worker its new role and lets work flow to it again. The control
loop asks the pure RatioController for a plan per scenario on a fixed interval (target split and
which workers switch), records it in the store and carries it out; nothing is decided here.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from pdserve.clock import Clock
from pdserve.policy.ratio_controller import RatioController, RatioPlan, RoleChange, plan_role_changes
from pdserve.policy.registry import Role, WorkerPerf, WorkerRecord, WorkerRegistry
from pdserve.policy.scenarios import ScenarioClassifier

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

    async def control_once(self) -> list[RatioPlan]:
        """One control step: ask the controller for each scenario's plan and carry it out."""
        plans = []
        for scenario in sorted(self.registry.scenarios()):
            members = self.registry.members(scenario)
            perf = WorkerPerf.mean([w.perf for w in members if w.perf is not None])
            if perf is None:
                continue
            plan = self.controller.decide(scenario, self.scenarios.spec(scenario), members, perf,
                                          self.clock.now_s())
            if plan is not None:
                plans.append(plan)
                await self.apply(plan)
        return plans

    async def apply(self, plan: RatioPlan) -> None:
        log.info("ratio %s: %s -> %s (%s)", plan.scenario, plan.old, plan.new, plan.reason_text)
        if self._record_change is not None:
            await asyncio.to_thread(self._record_change, plan)
        await self.carry_out(plan.role_changes)

    async def rebalance(self, scenario: str, target: tuple[int, int]) -> None:
        """An operator's split: the same choice of workers as the controller's plans."""
        await self.carry_out(plan_role_changes(self.registry.members(scenario), target))

    async def carry_out(self, changes: tuple[RoleChange, ...]) -> None:
        async with self._lock:
            for change in changes:
                rec = self.registry.get(change.worker_id)
                if rec is None or not rec.alive or rec.role is not change.from_role:
                    log.warning("skipping role change of %s: it left or changed since the plan", change.worker_id)
                    continue
                await self.switch_role(rec, change.to_role)

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
