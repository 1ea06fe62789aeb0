"""Entrypoint of one worker process: config -> model -> KV agents -> gRPC server -> serve.

Prints one line `PDSERVE_READY component=worker role=... port=<grpc port>` on stdout when it accepts requests, so
launchers and tests need not guess ports. SIGTERM/SIGINT: stop accepting, give in-flight calls a
grace period, close transfer agents, exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pathlib
import signal

import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve import rpc
from pdserve.cluster_auth import Credential, require_for_bind
from pdserve.clock import WallClock
from pdserve.config import PDServeConfig
from pdserve.cpus import available_cpus, default_worker_threads
from pdserve.kvtransfer import BaseKVAgent, create_agent
from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import make_scheduler
from pdserve.workers.engine import Engine
from pdserve.workers.model.loader import load_model
from pdserve.workers.prefill_runner import PrefillRunner
from pdserve.workers.profiler import fit_cost_model, profile_decode, profile_path
from pdserve.workers.registration import Advertised, deregister, keep_registered
from pdserve.workers.service import WorkerService
from pdserve.v1 import worker_pb2, worker_pb2_grpc

READY_MARKER = "PDSERVE_READY"
_LAST_CALLS_GRACE_S = 1.0   # after draining: replies still on their way out
_DRAIN_POLL_S = 0.05
log = logging.getLogger("pdserve.worker")


def build_agents(cfg: PDServeConfig, clock: WallClock) -> dict[str, BaseKVAgent]:
    kv = cfg.kvtransfer
    options = {
        "tcp": {"host": kv.host, "port": kv.tcp_port, "stall_timeout_s": kv.stall_timeout_s},
        "ucx": {"tls": kv.ucx_tls, "stall_timeout_s": kv.stall_timeout_s, "spin_s": kv.ucx_spin_us / 1e6},
        "fake": {},
    }
    return {b: create_agent(b, clock, **options[b]) for b in kv.backends}


def load_or_profile_cost_model(cfg: PDServeConfig, model) -> OperatorCostModel:
    """Profiles of the runner on this host are cached per model and thread count."""
    path = profile_path(cfg.model.cache_dir, cfg.model.name)
    if path.is_file():
        return OperatorCostModel.from_dict(json.loads(path.read_text()))
    cost, _, max_error = fit_cost_model(model)
    log.info("profiled %s: cost model fit within %.0f%% of measurements", cfg.model.name, max_error * 100)
    _publish(path, cost.to_dict())
    return cost


def load_or_profile_decode(cfg: PDServeConfig, model) -> tuple[float, float]:
    """(base s, s per sequence) of a decode step, cached beside the prefill profile: a worker
    started while others start would time a shared CPU."""
    path = profile_path(cfg.model.cache_dir, cfg.model.name).with_suffix(".decode.json")
    if path.is_file():
        d = json.loads(path.read_text())
        return d["base_s"], d["per_seq_s"]
    base_s, per_seq_s = profile_decode(model)
    _publish(path, {"base_s": base_s, "per_seq_s": per_seq_s})
    return base_s, per_seq_s


def _publish(path: pathlib.Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)       # atomic: a reader never sees half a profile


@contextlib.contextmanager
def start_up_turn(cache_dir: pathlib.Path):
    """One worker process on this host at a time loads (maybe converts) its model and times the
    hardware, so two never convert the same weights or time each other. (Other processes still
    share the CPU: LocalCluster starts one worker of a model alone, the rest once it has
    profiled.)"""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".start-up.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_scheduler(cfg: PDServeConfig, model):
    w = cfg.worker
    cost = load_or_profile_cost_model(cfg, model) if w.prefill_scheduler == "flowprefill" else None
    return make_scheduler(w.prefill_scheduler, model.config.num_layers, cost, chunk_tokens=w.chunk_size_tokens,
                          batch_budget_tokens=w.batch_budget_tokens)


def _advertised(cfg: PDServeConfig, model, port: int) -> Advertised:
    """What the router needs to know: address, scenario group and profiled speed."""
    cost = load_or_profile_cost_model(cfg, model)
    base_s, per_seq_s = load_or_profile_decode(cfg, model)
    reference_tokens = 1024   # prefill throughput at a typical prompt length
    return Advertised(grpc_address=f"{cfg.worker.advertise_host or cfg.worker.host}:{port}",
                      scenario=cfg.worker.scenario, prefill_tokens_per_s=reference_tokens / cost.prefill_s(reference_tokens),
                      decode_step_base_s=base_s, decode_step_per_seq_s=per_seq_s,
                      max_batch_size=cfg.worker.max_batch_size)


def configure_torch_threads(cfg: PDServeConfig, num_cpus: int | None = None) -> int:
    """The configured intra-op thread count, else `default_worker_threads` of the CPUs available."""
    cpus = available_cpus() if num_cpus is None else num_cpus
    threads = cfg.model.torch_num_threads or default_worker_threads(cpus)
    torch.set_num_threads(threads)
    log.info("torch runs %d intra-op thread(s) per compute thread (%d CPUs available, %s)", threads, cpus,
             "configured" if cfg.model.torch_num_threads else "default")
    return threads


async def serve(cfg: PDServeConfig) -> None:
    configure_torch_threads(cfg)
    w = cfg.worker
    credential = cfg.cluster_credential
    require_for_bind("worker", w.host, credential)
    server = rpc.server(w.max_concurrent_rpcs, credential)
    port = rpc.listen(server, f"{w.host}:{w.port}", credential)
    with start_up_turn(cfg.model.cache_dir):
        loaded = load_model(cfg.model.name, cfg.model.cache_dir)
        scheduler = build_scheduler(cfg, loaded.model)
        advertised = _advertised(cfg, loaded.model, port) if w.router_address else None
    engine = Engine(loaded, w.num_kv_blocks, w.block_size_tokens, w.max_batch_size, w.prefix_caching)
    clock = WallClock()
    runner = PrefillRunner(loaded.model, scheduler, clock, max_pending=w.max_queued_prefills)
    service = WorkerService(engine, build_agents(cfg, clock), clock, worker_id=w.worker_id or f"{w.host}:{port}",
                            role=w.role, transfer_timeout_s=cfg.kvtransfer.timeout_s,
                            lease_s=w.reservation_lease_s, checksum=cfg.kvtransfer.checksum,
                            prefill_runner=runner, default_ttft_slo_ms=w.default_ttft_slo_ms,
                            max_prefill_wait_s=w.max_prefill_wait_s,
                            send_group_bytes=cfg.kvtransfer.send_group_bytes,
                            decode_pause_file=cfg.diagnostics.decode_pause_file)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    await server.start()
    await service.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    registration = None
    if advertised is not None:
        registration = asyncio.create_task(keep_registered(service, w.router_address, advertised, credential))
    print(f"{READY_MARKER} component=worker role={w.role} port={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await _drain(service, w, registration, credential)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(_LAST_CALLS_GRACE_S)
    await service.stop()


async def _drain(service: WorkerService, w, registration: asyncio.Task | None, credential: Credential | None) -> None:
    """SIGTERM (what a Kubernetes pod gets): stop heartbeats, deregister so no new work arrives,
    then let what is already here finish, up to the grace period."""
    log.info("shutting down: draining for up to %.0f s", w.shutdown_grace_s)
    if registration is not None:
        registration.cancel()
        await deregister(service, w.router_address, credential)
    deadline_s = service.clock.now_s() + w.shutdown_grace_s
    while service.has_work and service.clock.now_s() < deadline_s:
        await asyncio.sleep(_DRAIN_POLL_S)
    if service.has_work:
        log.warning("grace period over with requests still running; they will fail over")
