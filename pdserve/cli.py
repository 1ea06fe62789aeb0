"""`pdserve` command line: thin wiring from arguments to entrypoints and benchmarks."""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import threading
import time

from pdserve.cli_bench import add_bench_parser, trace_file_option

_SUPERVISE_POLL_S = 0.5   # how often `pdserve up` looks for exited components


def _config(args: argparse.Namespace, overrides: dict | None = None):
    from pdserve.config import load_config

    return load_config(args.config, overrides={k: v for k, v in (overrides or {}).items() if v is not None})


def _serve(args: argparse.Namespace) -> int:
    from pdserve import timeline
    from pdserve.aio import run_loop

    cfg = _config(args, {"worker.role": args.component} if args.component not in ("router", "gateway") else None)
    timeline.enable(cfg.diagnostics.timeline_file)
    if args.component == "router":
        from pdserve.router.main import serve
    elif args.component == "gateway":
        from pdserve.gateway.main import serve
    else:
        from pdserve.workers.main import serve
    run_loop(serve(cfg))
    return 0


def _up(args: argparse.Namespace) -> int:
    import signal

    from pdserve.launch import LocalCluster

    env = {"PDSERVE_GATEWAY__REQUIRE_API_KEY": "false"}
    if args.config:
        env["PDSERVE_CONFIG"] = str(args.config)
    cluster = LocalCluster(model=args.model, num_prefill=args.prefill, num_decode=args.decode,
                           gateway_port=args.port, router_port=args.router_port, env=env, echo=args.verbose,
                           tls=args.tls, embedded_router=args.embedded_router)
    print(f"starting {args.prefill} prefill + {args.decode} decode workers of {args.model} ...", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    try:
        print(f"pdserve is up: {cluster.url}/v1  (OpenAI-compatible; model '{args.model}'). Ctrl-C stops it.",
              flush=True)
        if args.tls:
            print(f"mutual TLS between components; HTTPS certificate signed by the development CA {cluster.ca_file}",
                  flush=True)
        _supervise(cluster, stop)
        return 0
    finally:
        print("stopping ...", flush=True)
        cluster.stop()


def _certs(args: argparse.Namespace) -> int:
    from pdserve.certs import make_dev_pki

    files = make_dev_pki(args.out, hosts=tuple(args.host), days=args.days)
    listing = {name: {"ca_file": str(f.ca_file), "cert_file": str(f.cert_file), "key_file": str(f.key_file)}
               for name, f in files.items()}
    if args.json:
        print(json.dumps(listing))
    else:
        for name, f in listing.items():
            print(f"{name:8} cert {f['cert_file']}  key {f['key_file']}")
        print(f"CA: {next(iter(listing.values()))['ca_file']} (give each component cluster.tls_ca_file, "
              f"tls_cert_file, tls_key_file)")
    return 0


def _supervise(cluster, stop: threading.Event) -> None:
    """Restart a component that exits, with backoff, while the rest keeps serving."""
    from pdserve.launch import RestartBackoff

    backoff, due_s, num_restarts = RestartBackoff(), {}, 0
    while not stop.wait(_SUPERVISE_POLL_S):
        now_s = time.monotonic()
        for p in list(cluster.processes):
            if p.proc.poll() is None:
                continue
            if p.name not in due_s:
                due_s[p.name] = now_s + backoff.delay_s(p.name, now_s)
                print(f"{p.name} exited with code {p.proc.returncode}; restarting in "
                      f"{due_s[p.name] - now_s:.1f} s", file=sys.stderr, flush=True)
            elif now_s >= due_s[p.name] and not stop.is_set():
                del due_s[p.name]
                try:
                    cluster.restart(p.name)
                    num_restarts += 1
                    print(f"{p.name} restarted ({num_restarts} restart(s) so far)", file=sys.stderr, flush=True)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"{p.name} did not come back: {exc}", file=sys.stderr, flush=True)


def _keys(args: argparse.Namespace) -> int:
    from pdserve.store import Store

    store = Store(_config(args).database_url)
    store.migrate()
    if args.action == "create":
        print(store.create_api_key(args.name, args.tenant, args.rpm, args.tpm))
        return 0
    if args.action == "limit":
        if store.set_api_key_limits(args.name, args.rpm, args.tpm):
            return 0
        print(f"no key named {args.name!r}", file=sys.stderr)
        return 1
    if not store.revoke_api_key(args.name):
        print(f"no key named {args.name!r}", file=sys.stderr)
        return 1
    return 0


def _sim(args: argparse.Namespace) -> int:
    from pdserve.sim import compare

    if args.workers:
        from pdserve.sim import scale
        report = scale.run(args.workers, args.min_requests, hardware=args.hardware, speedup=args.scale_speedup,
                           progress=None if args.json else compare.stderr_progress)
        print(json.dumps(report, sort_keys=True) if args.json else json.dumps(report, indent=2, sort_keys=True))
        return 0
    report = compare.run(args.minutes, args.speedup, args.workers_per_scenario, args.hardware, args.seed,
                         progress=None if args.json else compare.stderr_progress, trace=args.trace,
                         trace_file=args.trace_file)
    if args.plot:
        rows = compare.sweep([args.speedup / 2, args.speedup, args.speedup * 1.5, args.speedup * 2],
                             minutes=args.minutes, workers_per_scenario=args.workers_per_scenario,
                             hardware=args.hardware, seed=args.seed, trace=args.trace,
                             trace_file=args.trace_file)["sweep"]
        report["sweep"] = rows
        for path in compare.plot(report, rows, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(report, sort_keys=True) if args.json else compare.format_table(report))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from pdserve.workers.model.loader import load_model
    from pdserve.workers.profiler import fit_cost_model

    model = load_model(args.model, _config(args).model.cache_dir).model
    cost, samples, max_error = fit_cost_model(model)
    print(json.dumps({"model": args.model, "cost_model": cost.to_dict(), "fit_max_error": round(max_error, 3),
                      "kv_bytes_per_token": model.config.kv_bytes_per_token,
                      "samples": [{"op": k, "tokens": n, "seconds": s} for k, n, s in samples]}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="run one component (what each Kubernetes pod runs)")
    srv.add_argument("component", choices=["router", "gateway", "prefill", "decode", "aggregated"])
    srv.add_argument("--config", type=pathlib.Path, help="YAML config file (PDSERVE_* variables override it)")
    srv.set_defaults(fn=_serve)

    up = sub.add_parser("up", help="start a local cluster: router, workers, gateway")
    up.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m or a local Hugging Face dir")
    up.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    up.add_argument("--decode", type=int, default=1, help="number of decode workers")
    up.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    up.add_argument("--router-port", type=int, default=0, help="router gRPC port (0: any free port)")
    up.add_argument("--config", type=pathlib.Path, help="YAML config file applied to every component")
    up.add_argument("--tls", action="store_true", help="mutual TLS between components and HTTPS at the "
                                                       "gateway, with a fresh development CA")
    up.add_argument("--embedded-router", action="store_true",
                    help="run the router inside the gateway's process (one gRPC hop fewer per request)")
    up.set_defaults(fn=_up)

    ce = sub.add_parser("certs", help="make a development CA and per-component certificates for mutual TLS")
    ce.add_argument("--out", type=pathlib.Path, required=True, help="directory for ca.pem, <component>.pem "
                                                                     "and <component>-key.pem")
    ce.add_argument("--host", action="append", default=[], help="extra DNS name or IP every certificate names "
                                                                 "(repeatable)")
    ce.add_argument("--days", type=int, default=30, help="validity in days")
    ce.add_argument("--json", action="store_true")
    ce.set_defaults(fn=_certs)

    from pdserve.admin_cli import add_parser as add_admin_parser
    add_admin_parser(sub)

    sim = sub.add_parser("sim", help="simulate a fleet: pdserve's policies vs routing baselines on a trace")
    sim.add_argument("--minutes", type=float, default=20, help="trace minutes replayed")
    sim.add_argument("--speedup", type=float, default=4, help="replay this many times faster than recorded")
    sim.add_argument("--workers-per-scenario", type=int, default=8, help="workers per scenario")
    sim.add_argument("--hardware", default="llama3-8b-h100", help="llama3-8b-h100 or llama3-70b-h200x8")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--trace", choices=["azure", "mooncake"], default="azure",
                     help="azure: conv+code merged as two scenarios; mooncake: conversation trace with prefix sharing")
    sim.add_argument("--workers", type=int, default=0,
                     help="fleet-scale run: this many workers, one hour of trace replicated to --min-requests")
    sim.add_argument("--min-requests", type=int, default=1_000_000)
    sim.add_argument("--plot", type=pathlib.Path, help="directory for goodput_vs_rate.png and ratio_over_time.png")
    sim.add_argument("--scale-speedup", type=float, default=100.0,
                     help="with --workers: replay the hour this many times faster, to load the fleet")
    sim.add_argument("--json", action="store_true")
    trace_file_option(sim)
    sim.set_defaults(fn=_sim)

    prof = sub.add_parser("profile", help="time the model runner's operators and fit the cost model")
    prof.add_argument("--model", default="tiny")
    prof.add_argument("--config", type=pathlib.Path)
    prof.set_defaults(fn=_profile)

    keys = sub.add_parser("keys", help="manage API keys (stored hashed)")
    keys.add_argument("action", choices=["create", "limit", "revoke"],
                      help="limit: set a key's --rpm and --tpm (applied from its next request)")
    keys.add_argument("name")
    keys.add_argument("--tenant", default="default")
    keys.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    keys.add_argument("--tpm", type=int, default=0, help="tokens per minute, counted as prompt + max_tokens "
                                                          "at admission (0: no limit)")
    keys.add_argument("--config", type=pathlib.Path)
    keys.set_defaults(fn=_keys)

    add_bench_parser(sub)
    from pdserve.loadtest.run import add_parser as add_loadtest_parser
    add_loadtest_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pdserve.traces import TraceError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except TraceError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
