"""`pdserve` command line: thin wiring from arguments to entrypoints and benchmarks."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys


def _worker(args: argparse.Namespace) -> int:
    from pdserve.config import load_config
    from pdserve.workers.main import serve

    overrides = {k: v for k, v in {
        "model.name": args.model, "worker.role": args.role, "worker.port": args.port,
        "kvtransfer.backends": args.kv_backends.split(",") if args.kv_backends else None,
    }.items() if v is not None}
    cfg = load_config(args.config, overrides=overrides)
    asyncio.run(serve(cfg))
    return 0


def _bench_kv(args: argparse.Namespace) -> int:
    from pdserve.bench import kv

    report = kv.run(args.backends.split(","), [int(s) for s in args.sizes_mib.split(",")],
                    num_layers=args.layers, repeats=args.repeats)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["results"]:
            ratio = row.get("ratio_to_memcpy", 1.0)
            print(f"{row['backend']:>7} {row['size_mib']:>5} MiB  {row['gbps']:7.2f} GB/s  x{ratio:.2f} of memcpy")
    return 0


def _bench_overlap(args: argparse.Namespace) -> int:
    from pdserve.bench import overlap

    report = overlap.run(args.model, args.backend, args.prompt_tokens, args.repeats, args.torch_threads)
    print(json.dumps(report) if args.json else overlap.format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run one model worker (prefill, decode or aggregated)")
    w.add_argument("--config", type=pathlib.Path, help="YAML config file")
    w.add_argument("--role", choices=["prefill", "decode", "aggregated"])
    w.add_argument("--model", help="tiny, smollm2-135m or a local Hugging Face directory")
    w.add_argument("--port", type=int)
    w.add_argument("--kv-backends", help="comma list of ucx,tcp,fake")
    w.set_defaults(fn=_worker)

    bench = sub.add_parser("bench", help="benchmarks that report ratios against a baseline").add_subparsers(
        dest="bench", required=True)
    k = bench.add_parser("kv", help="KV transfer bandwidth between two processes vs memcpy")
    k.add_argument("--backends", default="ucx,tcp")
    k.add_argument("--sizes-mib", default="1,16,64,256")
    k.add_argument("--layers", type=int, default=1, help="split each transfer into this many layers")
    k.add_argument("--repeats", type=int, default=5)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
