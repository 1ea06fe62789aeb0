"""`pdserve admin ...`: the gRPC Admin API from a terminal, with readable tables."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import pathlib
import sys

import grpc

from pdserve import rpc
from pdserve.cluster_auth import ClusterCredential, TlsMaterial
from pdserve.proto_maps import role_name
from pdserve.v1 import admin_pb2, admin_pb2_grpc

TOKEN_ENV = "PDSERVE_ADMIN_TOKEN"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _workers(resp) -> str:
    return table(["worker", "role", "scenario", "model", "alive", "draining", "free KV", "active", "heartbeat",
                  "cached blocks", "prefix hits"],
                 [[w.worker_id, role_name(w.role), w.scenario, w.model, w.alive, w.draining,
                   f"{w.num_free_kv_blocks}/{w.num_total_kv_blocks}", w.num_active_requests,
                   f"{w.seconds_since_heartbeat:.1f}s ago", *_prefix_cells(w.prefix_cache)] for w in resp.workers])


def _prefix_cells(pc) -> list[str]:
    if not pc.enabled:
        return ["off", ""]
    rate = f"{100 * pc.hit_tokens / pc.query_tokens:.1f}% of {pc.query_tokens} tok" if pc.query_tokens else "-"
    return [f"{pc.num_cached_blocks} ({pc.evictions} evicted)", rate]


def _scenarios(resp) -> str:
    return table(["scenario", "TTFT ms", "TPOT ms", "headers", "tenants", "prefix", "prefill", "decode"],
                 [[s.name, s.ttft_slo_ms, s.tpot_slo_ms, ",".join(s.header_values), ",".join(s.tenants),
                   f"{s.prefix_tokens} tok x{len(s.prefix_hashes)}" if s.prefix_tokens else "",
                   f"{s.min_prefill}-{s.max_prefill or 'inf'}", f"{s.min_decode}-{s.max_decode or 'inf'}"]
                  for s in resp.scenarios])


def _ratio(r) -> str:
    return f"{r.scenario}: {r.num_prefill} prefill : {r.num_decode} decode{' (pinned)' if r.pinned else ''}"


def _history(resp) -> str:
    return table(["when (UTC)", "old", "new", "reason"],
                 [[dt.datetime.fromtimestamp(c.at_unix_s, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                   f"{c.old_prefill}:{c.old_decode}", f"{c.new_prefill}:{c.new_decode}", c.reason]
                  for c in resp.changes])


def _iccache(args: argparse.Namespace) -> str:
    """IC-Cache lives in the gateway: its operator view is an HTTP endpoint there."""
    import httpx
    action = "pause" if args.pause else "resume" if args.resume else None
    url = f"{args.gateway.rstrip('/')}/admin/iccache" + (f"/{action}" if action else "")
    headers = {"Authorization": f"Bearer {admin_token(args)}"}
    resp = httpx.post(url, headers=headers, timeout=10) if action else httpx.get(url, headers=headers, timeout=10)
    if resp.status_code != 200:
        raise SystemExit(f"pdserve admin iccache: HTTP {resp.status_code}: {resp.text[:300]}")
    s = resp.json()
    lines = [f"IC-Cache: {s['large_model']} (large) / {s['small_model']} (small + examples)"
             f"{'  PAUSED: every request goes to the large model' if s['paused'] else ''}",
             f"examples: {s['num_examples']} ({s['num_bytes']} of {s['capacity_bytes']} bytes), "
             f"{s['num_evictions']} evicted, {s['examples_added']} added, {s['replays']} replays",
             f"routed: {s['routed']}, offloaded: {s['offloaded']} "
             f"({100 * s['offloaded'] / s['routed']:.1f}%)" if s["routed"] else "routed: 0",
             f"feedback: {s['feedback']}, selection threshold {s['threshold']:.2f}",
             table(["arm", "rewards", "expected quality"],
                   [[arm, v["num_rewards"], f"{v['expected_quality']:.2f}"] for arm, v in s["arms"].items()])]
    return "\n".join(lines)


async def _call(args: argparse.Namespace) -> str:
    if args.admin_command == "iccache":
        return _iccache(args)
    md = (("authorization", f"Bearer {admin_token(args)}"),)
    async with rpc.channel(args.router, _tls_credential(args)) as ch:
        a = admin_pb2_grpc.AdminStub(ch)
        cmd = args.admin_command
        if cmd == "workers":
            return _workers(await a.ListWorkers(admin_pb2.Empty(), metadata=md))
        if cmd == "scenarios":
            return _scenarios(await a.ListScenarios(admin_pb2.Empty(), metadata=md))
        if cmd == "scenario-set":
            s = admin_pb2.Scenario(name=args.name, ttft_slo_ms=args.ttft_ms, tpot_slo_ms=args.tpot_ms,
                                   header_values=args.header or [], tenants=args.tenant or [],
                                   min_prefill=args.min_prefill, min_decode=args.min_decode)
            return _scenarios(admin_pb2.ScenarioList(scenarios=[await a.UpsertScenario(s, metadata=md)]))
        if cmd == "scenario-delete":
            await a.DeleteScenario(admin_pb2.ScenarioName(name=args.name), metadata=md)
            return f"deleted scenario {args.name}"
        if cmd == "ratio":
            return _ratio(await a.GetRatio(admin_pb2.ScenarioName(name=args.scenario), metadata=md))
        if cmd == "ratio-set":
            return _ratio(await a.SetRatio(admin_pb2.SetRatioRequest(
                scenario=args.scenario, num_prefill=args.prefill, num_decode=args.decode, pin=args.pin), metadata=md))
        if cmd == "ratio-unpin":
            return _ratio(await a.UnpinRatio(admin_pb2.ScenarioName(name=args.scenario), metadata=md))
        if cmd == "history":
            return _history(await a.GetRatioHistory(admin_pb2.ScenarioName(name=args.scenario), metadata=md))
        ref = admin_pb2.WorkerRef(worker_id=args.worker)
        if cmd == "drain":
            w = await a.DrainWorker(ref, metadata=md)
        elif cmd == "undrain":
            w = await a.UndrainWorker(ref, metadata=md)
        else:
            w = await a.SetWorkerRole(admin_pb2.SetWorkerRoleRequest(worker_id=args.worker, role=args.role), metadata=md)
        return _workers(type("R", (), {"workers": [w]}))


def run(args: argparse.Namespace) -> int:
    try:
        print(asyncio.run(_call(args)))
        return 0
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def admin_token(args: argparse.Namespace) -> str:
    if args.token:
        return args.token
    if args.token_file:
        return pathlib.Path(args.token_file).read_text().strip()
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"pdserve admin: no token: set ${TOKEN_ENV}, or pass --token-file")
    return token


def _tls_credential(args: argparse.Namespace) -> ClusterCredential | None:
    """A router serving mutual TLS wants a certificate from the cluster CA (`pdserve certs` makes
    an admin one)."""
    files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    if not any(files):
        return None
    if not all(files):
        raise SystemExit("pdserve admin: --tls-ca-file, --tls-cert-file and --tls-key-file go together")
    ca, cert, key = (pathlib.Path(f).read_bytes() for f in files)
    return ClusterCredential(tls=TlsMaterial(ca, cert, key, args.tls_server_name))


def add_parser(sub) -> None:
    p = sub.add_parser("admin", help="inspect and steer a running cluster (gRPC Admin API)")
    p.add_argument("--router", default="127.0.0.1:50050", help="router host:port")
    p.add_argument("--token", help="the router's admin token; prefer $PDSERVE_ADMIN_TOKEN or --token-file "
                                   "(a command line is visible to every user of the host)")
    p.add_argument("--token-file", help="file holding the admin token")
    p.add_argument("--tls-ca-file", help="mutual TLS: the cluster CA (PEM)")
    p.add_argument("--tls-cert-file", help="mutual TLS: a certificate the cluster CA signed (PEM)")
    p.add_argument("--tls-key-file", help="mutual TLS: its private key (PEM)")
    p.add_argument("--tls-server-name", default="", help="mutual TLS: name to check the router's certificate "
                                                          "against instead of its host (e.g. pdserve-cluster)")
    cmds = p.add_subparsers(dest="admin_command", required=True)
    cmds.add_parser("workers", help="workers with role, load and health")
    cmds.add_parser("scenarios", help="scenarios with SLOs and matching rules")
    s = cmds.add_parser("scenario-set", help="create or update a scenario")
    s.add_argument("name")
    s.add_argument("--ttft-ms", type=float, required=True)
    s.add_argument("--tpot-ms", type=float, required=True)
    s.add_argument("--header", action="append", help="x-pdserve-scenario value (repeatable)")
    s.add_argument("--tenant", action="append", help="API key tenant (repeatable)")
    s.add_argument("--min-prefill", type=int, default=1)
    s.add_argument("--min-decode", type=int, default=1)
    cmds.add_parser("scenario-delete").add_argument("name")
    for name in ("ratio", "ratio-unpin", "history"):
        cmds.add_parser(name).add_argument("scenario")
    r = cmds.add_parser("ratio-set", help="set a scenario's prefill:decode split")
    r.add_argument("scenario")
    r.add_argument("prefill", type=int)
    r.add_argument("decode", type=int)
    r.add_argument("--pin", action="store_true", help="keep it until ratio-unpin")
    for name in ("drain", "undrain"):
        cmds.add_parser(name).add_argument("worker")
    sr = cmds.add_parser("set-role", help="drain a worker, then switch its role")
    sr.add_argument("worker")
    sr.add_argument("role", choices=["prefill", "decode"])
    ic = cmds.add_parser("iccache", help="IC-Cache: example store, offload rate, the router's arms (from the gateway)")
    ic.add_argument("--gateway", default="http://127.0.0.1:8000", help="the gateway's URL")
    onoff = ic.add_mutually_exclusive_group()
    onoff.add_argument("--pause", action="store_true", help="send every routed request to the large model")
    onoff.add_argument("--resume", action="store_true", help="let IC-Cache offload again")
    p.set_defaults(fn=run)
