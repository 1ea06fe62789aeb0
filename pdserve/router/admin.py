"""gRPC Admin API (served by the router): workers, scenarios, P/D ratios, drain and re-role.

Every call must carry `authorization: Bearer <router.admin_token>`; without a configured token
the API refuses everything. Invalid arguments get INVALID_ARGUMENT with a message saying what
is wrong; unknown names get NOT_FOUND.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging

import grpc

from pdserve.policy.scenarios import ScenarioSpec
from pdserve.policy.registry import Role
from pdserve.router.service import RouterService
from pdserve.store import Store
from pdserve.v1 import admin_pb2, admin_pb2_grpc, router_pb2

log = logging.getLogger("pdserve.admin")
_UNBOUNDED = 1_000_000


def spec_from_proto(m: admin_pb2.Scenario) -> ScenarioSpec:
    return ScenarioSpec(name=m.name, ttft_slo_ms=m.ttft_slo_ms, tpot_slo_ms=m.tpot_slo_ms,
                        header_values=tuple(m.header_values), tenants=tuple(m.tenants),
                        prefix_tokens=m.prefix_tokens, prefix_hashes=tuple(m.prefix_hashes),
                        min_prefill=m.min_prefill, max_prefill=m.max_prefill or _UNBOUNDED,
                        min_decode=m.min_decode, max_decode=m.max_decode or _UNBOUNDED)


def spec_to_proto(s: ScenarioSpec) -> admin_pb2.Scenario:
    return admin_pb2.Scenario(
        name=s.name, ttft_slo_ms=s.ttft_slo_ms, tpot_slo_ms=s.tpot_slo_ms, header_values=s.header_values,
        tenants=s.tenants, prefix_tokens=s.prefix_tokens, prefix_hashes=s.prefix_hashes, min_prefill=s.min_prefill,
        max_prefill=0 if s.max_prefill >= _UNBOUNDED else s.max_prefill, min_decode=s.min_decode,
        max_decode=0 if s.max_decode >= _UNBOUNDED else s.max_decode)


def load_scenarios(store: Store) -> dict[str, ScenarioSpec]:
    return {row.name: ScenarioSpec.from_rules(row.name, row.ttft_slo_ms, row.tpot_slo_ms, row.match_rules)
            for row in store.list_scenarios()}


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, router: RouterService, store: Store, admin_token: str):
        self.router = router
        self.store = store
        self._token = admin_token

    async def _auth(self, context) -> None:
        if not self._token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin API disabled: set router.admin_token")
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    async def ListWorkers(self, request, context):
        await self._auth(context)
        return await self.router.ListWorkers(router_pb2.ListWorkersRequest(), context)

    async def ListScenarios(self, request, context):
        await self._auth(context)
        return admin_pb2.ScenarioList(scenarios=[spec_to_proto(s) for s in self.router.scenarios.specs.values()])

    async def GetScenario(self, request, context):
        await self._auth(context)
        spec = self.router.scenarios.specs.get(request.name)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no scenario named {request.name!r}")
        return spec_to_proto(spec)

    async def UpsertScenario(self, request, context):
        await self._auth(context)
        spec = spec_from_proto(request)
        try:
            spec.validate()
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await asyncio.to_thread(self.store.upsert_scenario, spec.name, spec.to_rules(), spec.ttft_slo_ms,
                                spec.tpot_slo_ms)
        self.router.scenarios.specs[spec.name] = spec
        log.info("scenario %s upserted", spec.name)
        return spec_to_proto(spec)

    async def DeleteScenario(self, request, context):
        await self._auth(context)
        if not await asyncio.to_thread(self.store.delete_scenario, request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no scenario named {request.name!r}")
        self.router.scenarios.specs.pop(request.name, None)
        return admin_pb2.Empty()

    def _ratio(self, scenario: str) -> admin_pb2.Ratio:
        p, d = self.router.registry.scenario_ratio(scenario)
        return admin_pb2.Ratio(scenario=scenario, num_prefill=p, num_decode=d,
                               pinned=self.router.controller.pinned(scenario) is not None)

    async def _known_scenario(self, scenario: str, context) -> None:
        if scenario not in self.router.registry.scenarios() and scenario not in self.router.scenarios.specs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no scenario named {scenario!r}")

    async def GetRatio(self, request, context):
        await self._auth(context)
        await self._known_scenario(request.name, context)
        return self._ratio(request.name)

    async def GetRatioHistory(self, request, context):
        await self._auth(context)
        rows = await asyncio.to_thread(self.store.ratio_history, request.name)
        return admin_pb2.RatioHistory(changes=[admin_pb2.RatioChange(
            scenario=r.scenario, at_unix_s=r.at.timestamp(), old_prefill=r.old_prefill, old_decode=r.old_decode,
            new_prefill=r.new_prefill, new_decode=r.new_decode, reason=r.reason,
            inputs_json=json.dumps(r.inputs)) for r in rows])

    async def SetRatio(self, request, context):
        await self._auth(context)
        await self._known_scenario(request.scenario, context)
        current = self.router.registry.scenario_ratio(request.scenario)
        target = (request.num_prefill, request.num_decode)
        if sum(target) != sum(current):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"scenario {request.scenario!r} has {sum(current)} prefill/decode workers; "
                                f"{target[0]}+{target[1]} must add up to that")
        if request.pin:
            self.router.controller.pin(request.scenario, *target)
        else:   # an unpinned ratio is a starting point the controller may move from
            self.router.controller.unpin(request.scenario)
        await asyncio.to_thread(self.store.set_pin, request.scenario, target if request.pin else None)
        decision_reason = "set by an operator" + (" (pinned)" if request.pin else "")
        await asyncio.to_thread(self.store.add_ratio_change, request.scenario, current, target, decision_reason, {})
        try:
            await self.router.rebalancer.rebalance(request.scenario, target)
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return self._ratio(request.scenario)

    async def UnpinRatio(self, request, context):
        await self._auth(context)
        await self._known_scenario(request.name, context)
        self.router.controller.unpin(request.name)
        await asyncio.to_thread(self.store.set_pin, request.name, None)
        return self._ratio(request.name)

    async def _worker(self, worker_id: str, context):
        rec = self.router.registry.get(worker_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {worker_id!r}")
        return rec

    async def _status(self, worker_id: str, context):
        workers = (await self.router.ListWorkers(router_pb2.ListWorkersRequest(), context)).workers
        return next(w for w in workers if w.worker_id == worker_id)

    async def DrainWorker(self, request, context):
        await self._auth(context)
        return await self._set_drained(request.worker_id, True, context)

    async def UndrainWorker(self, request, context):
        await self._auth(context)
        return await self._set_drained(request.worker_id, False, context)

    async def _set_drained(self, worker_id: str, drained: bool, context):
        rec = await self._worker(worker_id, context)
        await asyncio.to_thread(self.store.set_drained, worker_id, drained)
        (self.router.drained_workers.add if drained else self.router.drained_workers.discard)(worker_id)
        self.router.registry.set_draining(rec, drained)
        return await self._status(worker_id, context)

    async def SetWorkerRole(self, request, context):
        await self._auth(context)
        if request.role not in ("prefill", "decode"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role must be 'prefill' or 'decode', got {request.role!r}")
        rec = await self._worker(request.worker_id, context)
        if rec.role is Role.AGGREGATED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "aggregated workers keep their role")
        try:
            await self.router.rebalancer.switch_role(rec, Role(request.role))
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return await self._status(request.worker_id, context)
