"""Entrypoint of the router process: registry + dispatcher + gRPC server (with health and
reflection). Prints `PDSERVE_READY component=router port=N` once serving; SIGTERM stops
accepting and lets running streams finish within router.shutdown_grace_s."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve import rpc
from pdserve.cluster_auth import require_for_bind
from pdserve.clock import WallClock
from pdserve.config import PDServeConfig
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.prefix_cache import PrefixIndex
from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.registry import WorkerRegistry
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.router.admin import AdminService, load_scenarios
from pdserve.router.service import RouterService
from pdserve.router.state import apply_operator_state, load_operator_state
from pdserve.store import Store
from pdserve.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

log = logging.getLogger("pdserve.router")
# Beyond the routed requests: heartbeats, registrations and admin calls (all short).
_CONTROL_RPC_HEADROOM = 256


@dataclass
class RouterRuntime:
    """A started router: its gRPC server (workers, admins, remote gateways) and the service behind
    it, which an embedding gateway calls directly."""

    service: RouterService
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    store: Store
    port: int
    shutdown_grace_s: float

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.shutdown_grace_s)
        await self.service.stop()
        self.store.engine.dispose()


async def start(cfg: PDServeConfig) -> RouterRuntime:
    rc = cfg.router
    credential = cfg.cluster_credential
    require_for_bind("router", rc.host, credential)
    registry = WorkerRegistry(rc.lease_s)
    store = Store(cfg.database_url)
    await asyncio.to_thread(store.migrate)
    controller = RatioController(ControllerConfig(window_s=rc.ratio_window_s, cooldown_s=rc.ratio_cooldown_s,
                                                  hysteresis=rc.ratio_hysteresis,
                                                  min_utilisation=rc.ratio_min_utilisation))
    scenarios = ScenarioClassifier(await asyncio.to_thread(load_scenarios, store))
    clock = WallClock()
    operator_state = await asyncio.to_thread(load_operator_state, store)
    apply_operator_state(operator_state, controller, clock.now_s())
    dispatcher = Dispatcher(registry, tuple(rc.kv_backend_preference),
                            PrefixIndex() if rc.cache_aware_routing else None, rc.cache_load_tokens_per_request,
                            local_prefill_max_tokens=rc.local_prefill_max_tokens)
    service = RouterService(registry, dispatcher, clock,
                            rc.request_timeout_s, record_event=store.record_worker_event,
                            scenarios=scenarios, controller=controller, control_interval_s=rc.control_interval_s,
                            record_change=lambda p: store.add_ratio_change(p.scenario, p.old, p.new, p.reason_text,
                                                                           p.inputs),
                            max_migrations=rc.max_migrations, decode_stall_timeout_s=rc.decode_stall_timeout_s,
                            max_inflight_requests=rc.max_inflight_requests, drained_workers=operator_state.drained,
                            credential=credential)
    server = rpc.server(rc.max_inflight_requests + _CONTROL_RPC_HEADROOM, credential)
    port = rpc.listen(server, f"{rc.host}:{rc.port}", credential)
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(service, store, rc.admin_token), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
         admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server)
    await server.start()
    await service.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"PDSERVE_READY component=router port={port}", flush=True)
    return RouterRuntime(service, server, health_servicer, store, port, rc.shutdown_grace_s)


async def serve(cfg: PDServeConfig) -> None:
    router = await start(cfg)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("router shutting down")
    await router.stop()
