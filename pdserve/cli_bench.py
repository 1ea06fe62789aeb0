"""`pdserve bench ...`: argument parsing and thin wiring to pdserve/bench/ (each benchmark runs
side by side with its baseline and reports ratios)."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _bench_kv(args: argparse.Namespace) -> int:
    from pdserve.bench import kv

    report = kv.run(args.backends.split(","), [float(s) for s in args.sizes_mib.split(",")],
                    num_layers=args.layers, repeats=args.repeats, ucx_spin_us=args.ucx_spin_us)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["results"]:
            ratio = row.get("ratio_to_memcpy", 1.0)
            latency = (f"  p50 {row['latency_p50_ms']:.3f} ms  p99 {row['latency_p99_ms']:.3f} ms"
                       f"  (sender told: p50 {row['reply_p50_ms']:.3f} ms)" if "latency_p50_ms" in row else "")
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
                        args.kv_blocks, args.trace_file, tuple(args.modes.split(",")), args.sample_every,
                        args.model)
    print(json.dumps(report) if args.json else prefix.format_report(report))
    return 0


def _bench_timeline(args: argparse.Namespace) -> int:
    from pdserve.bench import timeline

    report = timeline.run(args.requests, args.prompt_tokens, args.prefill, args.decode, args.kv_backend,
                          args.stream_tokens, args.model, args.decode_load, args.load_context_tokens)
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


def _bench_fidelity(args: argparse.Namespace) -> int:
    from pdserve.bench import fidelity

    print(json.dumps(fidelity.run(args.minutes, args.trace_file), indent=None if args.json else 2))
    return 0


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that report ratios against a baseline").add_subparsers(
        dest="bench", required=True)
    k = bench.add_parser("kv", help="KV transfer bandwidth between two processes vs memcpy")
    k.add_argument("--backends", default="ucx,tcp")
    k.add_argument("--sizes-mib", default="0.25,1,4,64", help="transfer sizes in MiB (fractions allowed)")
    k.add_argument("--layers", type=int, default=1, help="split each transfer into this many layers")
    k.add_argument("--repeats", type=int, default=20, help="timed transfers per backend and size")
    k.add_argument("--ucx-spin-us", type=float, default=None,
                   help="UCX agents' spin before sleeping (default: kvtransfer.ucx_spin_us's default)")
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
    trace_file_option(pf)
    pf.set_defaults(fn=_bench_prefill)
    ra = bench.add_parser("ratio", help="dynamic per-scenario P/D ratio vs best static, simulated on Azure traces")
    ra.add_argument("--minutes", type=float, default=20, help="trace minutes replayed")
    ra.add_argument("--speedup", type=float, default=4, help="replay this many times faster than recorded")
    ra.add_argument("--workers-per-scenario", type=int, default=8)
    ra.add_argument("--hardware", default="llama3-8b-h100", help="llama3-8b-h100 or llama3-70b-h200x8")
    ra.add_argument("--json", action="store_true")
    trace_file_option(ra)
    ra.set_defaults(fn=_bench_ratio)
    fi = bench.add_parser("fidelity", help="simulator vs a real 1P+1D tiny cluster on the same trace slice")
    fi.add_argument("--minutes", type=float, default=2.0)
    fi.add_argument("--json", action="store_true")
    trace_file_option(fi)
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
    trace_file_option(ch)
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
    px.add_argument("--model", choices=("tiny", "smollm2-135m"), default="tiny",
                    help="smollm2-135m: a model whose compute dominates the request's fixed path (lower the load)")
    px.add_argument("--json", action="store_true")
    trace_file_option(px)
    px.set_defaults(fn=_bench_prefix)
    tl = bench.add_parser("timeline", help="where one request's time goes, stage by stage (cached and cold prompts)")
    tl.add_argument("--requests", type=int, default=20, help="requests of each kind, one at a time")
    tl.add_argument("--prompt-tokens", type=int, default=293, help="prompt length (the median of bench prefix's)")
    tl.add_argument("--prefill", type=int, default=2, help="prefill workers")
    tl.add_argument("--decode", type=int, default=2, help="decode workers")
    tl.add_argument("--kv-backend", choices=("ucx", "tcp"), default="ucx")
    tl.add_argument("--stream-tokens", type=int, default=0,
                    help="stream completions of this many tokens (time to first token) instead of max_tokens=1")
    tl.add_argument("--model", choices=("tiny", "smollm2-135m"), default="tiny")
    tl.add_argument("--decode-load", type=int, default=0, metavar="N",
                    help="keep N long streamed completions decoding throughout (busy decode workers)")
    tl.add_argument("--load-context-tokens", type=int, default=1024, help="prompt length of the decode-load streams "
                    "(each streams 1,024 tokens, then starts again)")
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


def trace_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace-file", type=pathlib.Path, metavar="PATH",
                        help="replay this trace instead: Azure CSV, Mooncake JSONL or CSV of "
                             "timestamp_s,input_tokens,output_tokens[,session_id] (.gz/.xz too)")
