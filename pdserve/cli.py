"""`pdserve` command line: thin wiring from arguments to entrypoints and benchmarks."""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import threading
import time

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


def _bench_kv(args: argparse.Namespace) -> int:
    from pdserve.bench import kv

    report = kv.run(args.backends.split(","), [float(s) for s in args.sizes_mib.split(",")],
                    num_layers=args.layers, repeats=args.repeats)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["results"]:
            ratio = row.get("ratio_to_memcpy", 1.0)
            latency = (f"  p50 {row['latency_p50_ms']:.3f} ms  p99 {row['latency_p99_ms']:.3f} ms"
                       if "latency_p50_ms" in row else "")
            print(f"{row['backend']:>7} {row['size_mib']:>6g} MiB  {row['gbps']:7.2f} GB/s  x{ratio:.2f} of memcpy{latency}")
    return 0


def _bench_overlap(args: argparse.Namespace) -> int:
    from pdserve.bench import overlap

    report = overlap.run(args.model, args.backend, args.prompt_tokens, args.repeats, args.torch_threads)
    print(json.dumps(report) if args.json else overlap.format_report(report))
    return 0


def _bench_gateway(args: argparse.Namespace) -> int:
    from pdserve.bench import gateway

    report = gateway.run(args.requests, tuple(int(c) for c in args.concurrency.split(",")),
                         tuple(d for d in args.deployments.split(",") if d))
    print(json.dumps(report) if args.json else gateway.format_report(report))
    return 0


def _bench_prefix(args: argparse.Namespace) -> int:
    from pdserve.bench import prefix

    report = prefix.run(args.requests, args.tokens_per_trace_block, args.speedup, args.ttft_slo_ms,
                        args.kv_blocks, args.trace_file, tuple(args.modes.split(",")), args.sample_every)
    print(json.dumps(report) if args.json else prefix.format_report(report))
    return 0


def _bench_timeline(args: argparse.Namespace) -> int:
    from pdserve.bench import timeline

    report = timeline.run(args.requests, args.prompt_tokens, args.prefill, args.decode, args.kv_backend)
    print(json.dumps(report) if args.json else timeline.format_report(report))
    return 0


def _bench_iccache(args: argparse.Namespace) -> int:
    from pdserve.bench import iccache

    report = iccache.run(iccache.Settings(
        large_model=args.large_model, small_model=args.small_model, num_held_out=args.held_out,
        num_train=args.train, num_pool=args.pool, overload=args.overload, concurrency=args.concurrency,
        max_examples=args.max_examples, seed=args.seed, lists_dir=args.lists_dir,
        policies=tuple(p for p in args.policies.split(",") if p), pin_pools=not args.no_pinning,
        small_cost=args.small_cost))
    print(json.dumps(report) if args.json else iccache.format_report(report))
    return 0


def _bench_auth(args: argparse.Namespace) -> int:
    from pdserve.bench import auth

    report = auth.run(args.calls, args.rounds)
    print(json.dumps(report) if args.json else auth.format_report(report))
    return 0


def _bench_chaos(args: argparse.Namespace) -> int:
    from pdserve.bench import chaos

    try:
        report = chaos.run(args.rate, args.gap_s, args.stop_s, args.seed, args.trace_file,
                           tuple(f for f in args.faults.split(",") if f))
    except ValueError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else chaos.format_report(report))
    return 0


def _bench_prefill(args: argparse.Namespace) -> int:
    from pdserve.bench import prefill

    def progress(row: dict) -> None:
        print(f"rate {row['rate_rps']:>5} {row['mode']:<13} goodput {row['goodput_rps']:6.2f}/s  "
              f"attainment {row['attainment']:.2f}  short p99 {row['ttft_short_p99_ms']} ms  "
              f"long p99 {row['ttft_long_p99_ms']} ms", file=sys.stderr, flush=True)

    report = prefill.run([float(r) for r in args.rates.split(",")], args.num_requests,
                         [int(c) for c in args.chunk_sizes.split(",")], seed=args.seed, trace_file=args.trace_file,
                         progress=progress)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def _bench_ratio(args: argparse.Namespace) -> int:
    from pdserve.bench import ratio

    report = ratio.run(args.minutes, args.speedup, args.workers_per_scenario, args.hardware, args.trace_file)
    if args.json:
        print(json.dumps(report))
        return 0
    for row in report["static"]:
        print(f"static {row['ratio']:>5}  goodput {row['goodput_rps']:7.2f}/s  attainment {row['attainment']:.3f}")
    d = report["dynamic"]
    print(f"dynamic        goodput {d['goodput_rps']:7.2f}/s  attainment {d['attainment']:.3f}  "
          f"final {d['final_ratios']}  ({d['num_ratio_changes']} changes)")
    print(f"dynamic / best static ({report['best_static']['ratio']}): x{report['goodput_ratio_dynamic_vs_best_static']}")
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


def _bench_fidelity(args: argparse.Namespace) -> int:
    from pdserve.bench import fidelity

    print(json.dumps(fidelity.run(args.minutes, args.trace_file), indent=None if args.json else 2))
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
    _trace_file_option(sim)
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

    bench = sub.add_parser("bench", help="benchmarks that report ratios against a baseline").add_subparsers(
        dest="bench", required=True)
    k = bench.add_parser("kv", help="KV transfer bandwidth between two processes vs memcpy")
    k.add_argument("--backends", default="ucx,tcp")
    k.add_argument("--sizes-mib", default="0.25,1,4,64", help="transfer sizes in MiB (fractions allowed)")
    k.add_argument("--layers", type=int, default=1, help="split each transfer into this many layers")
    k.add_argument("--repeats", type=int, default=20, help="timed transfers per backend and size")
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=_bench_kv)
    o = bench.add_parser("overlap", help="prefill+transfer time vs prefill alone (layer-wise overlap)")
    o.add_argument("--model", default="tiny")
    o.add_argument("--backend", default="ucx")
    o.add_argument("--prompt-tokens", type=int, default=2048)
    o.add_argument("--repeats", type=int, default=5)
    o.add_argument("--torch-threads", type=int, default=0,
                   help="compute threads; 1 leaves the other core to the transfer, as a GPU would")
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=_bench_overlap)
    pf = bench.add_parser("prefill", help="fcfs vs chunked vs flowprefill goodput on the real runner")
    pf.add_argument("--rates", default="4,8,12,16", help="arrival rates (req/s) to sweep")
    pf.add_argument("--num-requests", type=int, default=60)
    pf.add_argument("--chunk-sizes", default="256,512,1024")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--json", action="store_true")
    _trace_file_option(pf)
    pf.set_defaults(fn=_bench_prefill)
    ra = bench.add_parser("ratio", help="dynamic per-scenario P/D ratio vs best static, simulated on Azure traces")
    ra.add_argument("--minutes", type=float, default=20, help="trace minutes replayed")
    ra.add_argument("--speedup", type=float, default=4, help="replay this many times faster than recorded")
    ra.add_argument("--workers-per-scenario", type=int, default=8)
    ra.add_argument("--hardware", default="llama3-8b-h100", help="llama3-8b-h100 or llama3-70b-h200x8")
    ra.add_argument("--json", action="store_true")
    _trace_file_option(ra)
    ra.set_defaults(fn=_bench_ratio)
    fi = bench.add_parser("fidelity", help="simulator vs a real 1P+1D tiny cluster on the same trace slice")
    fi.add_argument("--minutes", type=float, default=2.0)
    fi.add_argument("--json", action="store_true")
    _trace_file_option(fi)
    fi.set_defaults(fn=_bench_fidelity)
    g = bench.add_parser("gateway", help="gateway+router overhead vs calling a worker directly")
    g.add_argument("--requests", type=int, default=300)
    g.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts, one run each")
    g.add_argument("--deployments", default="separate,embedded",
                   help="separate (gateway and router processes), embedded (router in the gateway process)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=_bench_gateway)
    ch = bench.add_parser("chaos", help="worker kills, a stopped worker and a router restart under trace load")
    ch.add_argument("--rate", type=float, default=3.0, help="requests per second of the replayed trace")
    ch.add_argument("--gap-s", type=float, default=10.0, help="quiet time before each fault")
    ch.add_argument("--stop-s", type=float, default=20.0, help="how long the SIGSTOPped worker stays stopped")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--faults", default="kill-prefill,kill-decode,stop-decode,restart-router",
                    help="comma-separated, in this order: kill-prefill, kill-decode, stop-decode, restart-router")
    ch.add_argument("--json", action="store_true")
    _trace_file_option(ch)
    ch.set_defaults(fn=_bench_chaos)
    px = bench.add_parser("prefix", help="prefix caching and cache-aware routing vs none, Mooncake trace")
    px.add_argument("--requests", type=int, default=None, help="first N requests of the sampled trace (all)")
    px.add_argument("--sample-every", type=int, default=20,
                    help="keep every Nth conversation, whole, over the trace's hour (1: the whole trace)")
    px.add_argument("--tokens-per-trace-block", type=int, default=16,
                    help="prompt tokens per 512-token trace block (scales lengths to the model's context)")
    px.add_argument("--speedup", type=float, default=None,
                    help="replay this many times faster (default: --sample-every, the trace's arrival rate)")
    px.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="TTFT that counts towards goodput")
    px.add_argument("--kv-blocks", type=int, default=4096, help="KV pool blocks per worker")
    px.add_argument("--modes", default="no_cache,cache_load_routing,cache_aware_routing,cache_aware_local_prefill")
    px.add_argument("--json", action="store_true")
    _trace_file_option(px)
    px.set_defaults(fn=_bench_prefix)
    tl = bench.add_parser("timeline", help="where one request's time goes, stage by stage (cached and cold prompts)")
    tl.add_argument("--requests", type=int, default=20, help="requests of each kind, one at a time")
    tl.add_argument("--prompt-tokens", type=int, default=293, help="prompt length (the median of bench prefix's)")
    tl.add_argument("--prefill", type=int, default=2, help="prefill workers")
    tl.add_argument("--decode", type=int, default=2, help="decode workers")
    tl.add_argument("--kv-backend", choices=("ucx", "tcp"), default="ucx")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(fn=_bench_timeline)
    ic = bench.add_parser("iccache", help="IC-Cache vs always-large/small, random examples and semantic caches, "
                                          "on red-trivia questions (needs the iccache-bench extra)")
    ic.add_argument("--large-model", default="gemma3-270m")
    ic.add_argument("--small-model", default="smollm2-135m")
    ic.add_argument("--held-out", type=int, default=500, help="questions every policy answers (measured)")
    ic.add_argument("--train", type=int, default=300, help="questions IC-Cache learns from before the measured run")
    ic.add_argument("--pool", type=int, default=1200, help="questions the large model answers for the example pool")
    ic.add_argument("--overload", type=float, default=2.0,
                    help="held-out arrival rate as a multiple of the large model's measured capacity (a policy "
                         "that keeps up shows at most this throughput ratio, so keep it above the ratio to show)")
    ic.add_argument("--concurrency", type=int, default=32,
                    help="clients while building the pool (where the large pool's capacity is measured: enough "
                         "to fill its batches) and training")
    ic.add_argument("--max-examples", type=int, default=3)
    ic.add_argument("--seed", type=int, default=0)
    ic.add_argument("--small-cost", type=float, default=None,
                    help="IC-Cache's cost of a small request relative to a large one (default: iccache.small_cost)")
    ic.add_argument("--no-pinning", action="store_true",
                    help="let both pools share every CPU (default: each pool on its own half, as in a fleet)")
    ic.add_argument("--lists-dir", default=None, help="YAML trivia lists instead of red-trivia's")
    ic.add_argument("--policies", default=",".join(
        ("always_large", "always_small", "small_random_examples", "semantic_cache_0.8", "semantic_cache_0.9", "iccache")))
    ic.add_argument("--json", action="store_true")
    ic.set_defaults(fn=_bench_iccache)
    au = bench.add_parser("auth", help="gRPC call latency with the cluster secret vs without")
    au.add_argument("--calls", type=int, default=500, help="calls per round")
    au.add_argument("--rounds", type=int, default=6, help="alternating rounds per mode")
    au.add_argument("--json", action="store_true")
    au.set_defaults(fn=_bench_auth)
    from pdserve.loadtest.run import add_parser as add_loadtest_parser
    add_loadtest_parser(sub)
    return parser


def _trace_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace-file", type=pathlib.Path, metavar="PATH",
                        help="replay this trace instead: Azure CSV, Mooncake JSONL or CSV of "
                             "timestamp_s,input_tokens,output_tokens[,session_id] (.gz/.xz too)")


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
