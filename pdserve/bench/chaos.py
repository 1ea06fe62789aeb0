"""`pdserve bench chaos`: what worker and router failures do to clients, measured.

A 2 prefill + 2 decode `tiny` cluster (the ratio controller held still, so roles stay put) gets an
open-loop replay of the Azure 2023 conv trace through the gateway (streaming; arrivals rescaled
to `rate_per_s`, lengths scaled down to what a CPU serves). Each request is sent at its time
whether or not earlier ones finished. One fault at a time, with quiet time between:
SIGKILL a random prefill worker, SIGKILL a random decode worker (each then started again, as
`pdserve up` supervision would), SIGSTOP a random decode worker for `stop_s`, and a router crash
and restart. Per fault: requests in flight when it hit and how they ended (completed, migrated,
failed with reason, hung), and seconds until the cluster had its full capacity back. After the
run: KV blocks, requests and transfers still held on each worker (all must be 0), and TTFT/TPOT
p99 inside fault windows vs outside them. `trace_file` replays another trace instead.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import random
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import httpx

from pdserve.aio import within
from pdserve.bench import FIXED_ROLES_ENV
from pdserve.launch import LocalCluster
from pdserve.traces import load_azure, load_file
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("pdserve.bench")
# The gateway suffixes a client's request id (".1a2b3c4d") to keep it unique; a retry adds ".mN".
_MIGRATED = re.compile(r"request (chaos-\d+)(?:\.[0-9a-f]{8})?(?:\.m\d+)?: migrating")
_REQUEST_DEADLINE_S = 120.0
_RECOVERY_LIMIT_S = 60.0        # a fault the cluster has not recovered from by then is reported as such


@dataclass
class Sent:
    req_id: str
    sent_s: float
    prompt_tokens: int
    max_tokens: int
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    ended_s: float | None = None
    outcome: str = "hung"           # completed | failed | hung
    reason: str = ""
    detail: str = ""                # the error message, for the report's examples


def _arrivals(rate_per_s: float, duration_s: float, trace_file: pathlib.Path | None = None
              ) -> tuple[str, list[tuple[float, int, int]]]:
    """(source, [(send time s, prompt tokens, output tokens)]), lengths scaled for a CPU."""
    trace = load_file(trace_file, limit=4000) if trace_file else load_azure("conv", limit=4000)
    span_s = trace[-1].arrival_s or 1.0
    scale = len(trace) / span_s / rate_per_s
    rows = [(r.arrival_s * scale, r.input_tokens, r.output_tokens) for r in trace]
    source = f"{trace_file or 'azure2023 conv'}, time x{scale:.2f}"
    return source, [(t, max(8, min(in_tok // 4, 512)), max(4, min(out_tok // 2, 128)))
                    for t, in_tok, out_tok in rows if t < duration_s]


async def _request(http: httpx.AsyncClient, s: Sent, clock0: float) -> None:
    body = {"model": "tiny", "prompt": "x" * s.prompt_tokens, "max_tokens": s.max_tokens, "ignore_eos": True,
            "stream": True}
    try:
        async with asyncio.timeout(_REQUEST_DEADLINE_S):
            async with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": s.req_id}) as r:
                if r.status_code != 200:
                    s.outcome, s.reason = "failed", f"http {r.status_code}"
                    s.detail = (await r.aread()).decode(errors="replace")[:300]
                    return
                async for line in r.aiter_lines():
                    now = time.monotonic() - clock0
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            s.outcome = "failed"
                            s.reason = f"stream error {event['error'].get('code') or event['error']['type']}"
                            s.detail = event["error"]["message"][:300]
                            return
                        s.first_token_s = s.first_token_s if s.first_token_s is not None else now
                        s.token_times_s.append(now)
                    elif line == "data: [DONE]":
                        s.outcome = "completed"
    except TimeoutError:
        s.outcome, s.reason = "hung", f"no answer in {_REQUEST_DEADLINE_S:.0f} s"
    except httpx.HTTPError as exc:
        s.outcome, s.reason = "failed", type(exc).__name__
    finally:
        s.ended_s = time.monotonic() - clock0


async def _router_workers(cluster: LocalCluster) -> list:
    try:
        async with cluster.channel(cluster.router_address) as ch:
            resp = await router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
            return list(resp.workers)
    except grpc.aio.AioRpcError:
        return []


async def _full_capacity(cluster: LocalCluster, num_workers: int, timeout_s: float = _RECOVERY_LIMIT_S) -> str:
    """Wait until every worker is registered, alive and placeable again; '' then, else what the
    router lists when `timeout_s` ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = await _router_workers(cluster)
        if sum(w.alive and not w.draining for w in ws) == num_workers:
            return ""
        await asyncio.sleep(0.05)
    return "; ".join(f"{w.worker_id} alive={w.alive} draining={w.draining}" for w in ws) or "router unreachable"


class _Faults:
    def __init__(self, cluster: LocalCluster, rng: random.Random, stop_s: float, on_hit):
        self.cluster, self.rng, self.stop_s, self._on_hit = cluster, rng, stop_s, on_hit
        self.router_logs: list[list[str]] = [cluster.process("router").log_lines]

    async def _pick(self, role: str, wait_s: float = 10.0):
        """A random worker of `role` among those holding requests (waiting up to `wait_s` for one),
        so the fault lands on work in flight; any worker of the role if none gets busy."""
        procs = [p for p in self.cluster.processes if p.name.startswith(role)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            busy = [p for p in procs if await _num_active(self.cluster, p.port) > 0]
            if busy:
                return self.rng.choice(busy)
            await asyncio.sleep(0.05)
        return self.rng.choice(procs)

    async def kill_worker(self, role: str) -> str:
        p = await self._pick(role)
        self._on_hit()
        os.kill(p.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(p.proc.wait)
        await asyncio.to_thread(self.cluster.restart, p.name)
        return p.name

    async def stop_worker(self, role: str) -> str:
        p = await self._pick(role)
        self._on_hit()
        os.kill(p.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(self.stop_s)
        os.kill(p.proc.pid, signal.SIGCONT)
        return p.name

    async def restart_router(self) -> str:
        p = self.cluster.process("router")
        self._on_hit()
        os.kill(p.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(p.proc.wait)
        self.router_logs.append((await asyncio.to_thread(self.cluster.restart, "router")).log_lines)
        return "router"


async def _num_active(cluster: LocalCluster, port: int) -> int:
    """Requests a worker holds, or (a prefill worker) KV it is sending."""
    try:
        async with cluster.channel(port) as ch:
            info = await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest(), timeout=2)
        return info.num_active_requests + info.num_pending_transfers
    except grpc.aio.AioRpcError:
        return 0


async def _held(cluster: LocalCluster) -> dict:
    out = {}
    for p in cluster.processes:
        if p.name.split("-")[0] not in ("prefill", "decode"):
            continue
        async with cluster.channel(p.port) as ch:
            info = await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
        out[p.name] = {"kv_blocks": info.num_total_kv_blocks - info.num_free_kv_blocks,
                       "requests": info.num_active_requests, "transfers": info.num_pending_transfers}
    return out


async def _settled(cluster: LocalCluster, timeout_s: float = 60.0) -> dict:
    """What the workers still hold once in-flight cleanup had its chance (leases included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = await _held(cluster)
        if all(v == 0 for w in held.values() for v in w.values()) or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.5)


FAULTS = ("kill-prefill", "kill-decode", "stop-decode", "restart-router")


async def _drive(cluster: LocalCluster, rate_per_s: float, gap_s: float, stop_s: float, seed: int,
                 trace_file: pathlib.Path | None, chosen: tuple[str, ...] = FAULTS) -> dict:
    rng = random.Random(seed)
    sent: list[Sent] = []
    hits: list[tuple[float, list[str]]] = []    # when each fault hit, and the requests then in flight
    clock0 = time.monotonic()

    def on_hit() -> None:
        hits.append((time.monotonic() - clock0, [s.req_id for s in sent if s.ended_s is None]))

    faults = _Faults(cluster, rng, stop_s, on_hit)
    plan = {"kill-prefill": ("sigkill prefill", lambda: faults.kill_worker("prefill")),
            "kill-decode": ("sigkill decode", lambda: faults.kill_worker("decode")),
            "stop-decode": (f"sigstop decode {stop_s:.0f} s", lambda: faults.stop_worker("decode")),
            "restart-router": ("router restart", faults.restart_router)}
    plan = [plan[key] for key in FAULTS if key in chosen]
    # Arrivals for longer than the faults can take; sending stops `gap_s` after the last one.
    source, arrivals = _arrivals(rate_per_s, 3600.0, trace_file)
    done_sending = asyncio.Event()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=_REQUEST_DEADLINE_S, limits=limits) as http:
        async def replay() -> None:
            tasks = []
            for i, (t, n_in, n_out) in enumerate(arrivals):
                try:
                    await within(done_sending.wait(), max(0.0, t - (time.monotonic() - clock0)))
                    break
                except TimeoutError:
                    pass
                s = Sent(f"chaos-{i}", time.monotonic() - clock0, n_in, n_out)
                sent.append(s)
                tasks.append(asyncio.ensure_future(_request(http, s, clock0)))
            await asyncio.gather(*tasks)

        load = asyncio.ensure_future(replay())
        windows = []
        for name, inject in plan:
            await asyncio.sleep(gap_s)
            target = await inject()
            at_s, in_flight = hits[-1]
            missing = await _full_capacity(cluster, 4)
            if missing:
                log.warning("no full capacity %.0f s after %s: %s", _RECOVERY_LIMIT_S, name, missing)
                for p in cluster.processes:
                    log.warning("%s (exit %s) log ends:\n%s", p.name, p.proc.poll(), "\n".join(p.log_lines[-15:]))
            windows.append({"fault": name, "target": target, "at_s": round(at_s, 2), "in_flight_ids": in_flight,
                            "recovered_s": None if missing else round(time.monotonic() - clock0 - at_s, 2),
                            **({"not_recovered": missing} if missing else {})})
        await asyncio.sleep(gap_s)
        done_sending.set()
        await load
    held = await _settled(cluster)
    migrated = {m.group(1) for lines in faults.router_logs for line in lines if (m := _MIGRATED.search(line))}
    return {"arrivals": source, "sent": sent, "windows": windows, "held": held, "migrated": migrated}


def _p99_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, 1)


def _latency(sent: list[Sent]) -> dict:
    done = [s for s in sent if s.outcome == "completed" and s.first_token_s is not None]
    tpot = [(s.token_times_s[-1] - s.first_token_s) / (len(s.token_times_s) - 1)
            for s in done if len(s.token_times_s) > 1]
    return {"requests": len(done), "ttft_p99_ms": _p99_ms([s.first_token_s - s.sent_s for s in done]),
            "tpot_p99_ms": _p99_ms(tpot)}


def _outcomes(requests: list[Sent], migrated: set[str]) -> dict:
    reasons: dict[str, int] = {}
    examples: dict[str, str] = {}
    for s in requests:
        if s.outcome != "completed":
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
            examples.setdefault(s.reason, s.detail)
    return {"failure_examples": examples, "completed": sum(s.outcome == "completed" for s in requests),
            "migrated": sum(s.req_id in migrated for s in requests),
            "failed": sum(s.outcome == "failed" for s in requests),
            "hung": sum(s.outcome == "hung" for s in requests), "failure_reasons": reasons}


def _summarise(raw: dict) -> dict:
    by_id = {s.req_id: s for s in raw["sent"]}
    faults, in_fault = [], set()
    for w in raw["windows"]:
        affected = [by_id[i] for i in w.pop("in_flight_ids")]
        start, end = w["at_s"], w["at_s"] + (w["recovered_s"] or _RECOVERY_LIMIT_S)
        in_fault |= {s.req_id for s in raw["sent"] if start <= s.sent_s <= end or s.req_id in {a.req_id for a in affected}}
        arrived = [s for s in raw["sent"] if start <= s.sent_s <= end and s not in affected]
        faults.append({**w, "in_flight": len(affected), **_outcomes(affected, raw["migrated"]),
                       "sent_before_recovery": len(arrived),
                       "sent_before_recovery_outcomes": _outcomes(arrived, raw["migrated"])})
    sent = raw["sent"]
    outcomes = {o: sum(s.outcome == o for s in sent) for o in ("completed", "failed", "hung")}
    return {"arrivals": raw["arrivals"], "requests": len(sent), **outcomes,
            **{k: v for k, v in _outcomes(sent, raw["migrated"]).items() if k.startswith("failure_")},
            "migrated": len(raw["migrated"]), "faults": faults, "held_after_run": raw["held"],
            "leaked_total": sum(v for w in raw["held"].values() for v in w.values()),
            "latency": {"during_faults": _latency([s for s in sent if s.req_id in in_fault]),
                        "outside_faults": _latency([s for s in sent if s.req_id not in in_fault])}}


def run(rate_per_s: float = 3.0, gap_s: float = 10.0, stop_s: float = 20.0, seed: int = 0,
        trace_file: pathlib.Path | None = None, faults: tuple[str, ...] = FAULTS) -> dict:
    if unknown := set(faults) - set(FAULTS):
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(model="tiny", num_prefill=2, num_decode=2, env={
            "PDSERVE_DATABASE__URL": f"sqlite:///{tmp}/chaos.db", **FIXED_ROLES_ENV})
        cluster.start()
        try:
            if missing := asyncio.run(_full_capacity(cluster, 4)):
                raise RuntimeError(f"the cluster did not come up: {missing}")
            raw = asyncio.run(_drive(cluster, rate_per_s, gap_s, stop_s, seed, trace_file, tuple(faults)))
        finally:
            cluster.stop()
    return {"cluster": "2 prefill + 2 decode, tiny", "rate_per_s": rate_per_s, "seed": seed, **_summarise(raw)}


def format_report(r: dict) -> str:
    lines = [f"{r['requests']} requests ({r['arrivals']}, {r['rate_per_s']}/s): {r['completed']} completed, "
             f"{r['failed']} failed, {r['hung']} hung, {r['migrated']} migrated",
             f"{'fault':<22}{'target':<12}{'in flight':>10}{'done':>6}{'migr':>6}{'fail':>6}{'hung':>6}{'recover s':>11}"]
    for f in r["faults"]:
        lines.append(f"{f['fault']:<22}{f['target']:<12}{f['in_flight']:>10}{f['completed']:>6}{f['migrated']:>6}"
                     f"{f['failed']:>6}{f['hung']:>6}{f['recovered_s']:>11}"
                     + (f"  {f['failure_reasons']}" if f["failure_reasons"] else ""))
        after = f["sent_before_recovery_outcomes"]
        lines.append(f"{'  sent until recovered':<34}{f['sent_before_recovery']:>10}{after['completed']:>6}"
                     f"{after['migrated']:>6}{after['failed']:>6}{after['hung']:>6}"
                     + (f"  {after['failure_reasons']}" if after["failure_reasons"] else ""))
    lines.append(f"held after the run: {r['leaked_total']} (blocks+requests+transfers over all workers)")
    for k, v in r["latency"].items():
        lines.append(f"{k}: {v['requests']} requests, TTFT p99 {v['ttft_p99_ms']} ms, TPOT p99 {v['tpot_p99_ms']} ms")
    return "\n".join(lines)
