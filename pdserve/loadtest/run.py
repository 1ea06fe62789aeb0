"""`pdserve loadtest`: Locust headless in a child process (gevent's monkey-patching stays out of
this one, which may be running a local cluster), then the summary it wrote."""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from pdserve.loadtest import workload

LOCUSTFILE = pathlib.Path(__file__).with_name("locustfile.py")
_DRAIN_S = 600          # after the last send, how long requests may take before Locust stops


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="replay a production trace open-loop with Locust")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="base URL of any OpenAI-compatible endpoint")
    where.add_argument("--local", action="store_true", help="start a local cluster for the run and stop it after")
    p.add_argument("--local-model", default="tiny", help="model of the --local cluster")
    p.add_argument("--local-prefill", type=int, default=1)
    p.add_argument("--local-decode", type=int, default=1)
    p.add_argument("--trace", default="azure-conv", choices=sorted(workload.TRACE_SETS))
    p.add_argument("--trace-file", type=pathlib.Path, metavar="PATH", help="replay this trace instead")
    p.add_argument("--minutes", type=float, default=2.0, help="minutes of trace time replayed")
    p.add_argument("--speedup", type=_positive, default=1.0, help="replay this many times faster than recorded")
    p.add_argument("--model", default="", help="model name sent (default: the endpoint's first)")
    p.add_argument("--tokenizer", default="", help="pdserve model name or Hugging Face dir (default: --model)")
    p.add_argument("--max-input-tokens", type=int, default=0, help="clip prompts (0: as in the trace)")
    p.add_argument("--max-output-tokens", type=int, default=0, help="clip outputs (0: as in the trace)")
    p.add_argument("--slos", default="", help="per scenario TTFT:TPOT ms, e.g. conv=1000:50,code=2000:50")
    p.add_argument("--scenario-routing", choices=["header", "key", "none"], default="header")
    p.add_argument("--out", type=pathlib.Path, help="results folder (default: a new one under ./loadtest-results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    p.set_defaults(fn=main)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(args: argparse.Namespace) -> int:
    # Check the trace here: a bad file is a one-line error, not a failure inside Locust.
    planned = workload.plan(args.trace, args.trace_file, args.minutes, args.speedup)
    out = args.out or pathlib.Path("loadtest-results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if not args.local:
        return _run_locust(args, args.host.rstrip("/"), out, planned)
    from pdserve.launch import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(model=args.local_model, num_prefill=args.local_prefill, num_decode=args.local_decode,
                               env={"PDSERVE_DATABASE__URL": f"sqlite:///{tmp}/loadtest.db"})
        print(f"starting a local {args.local_prefill}P+{args.local_decode}D {args.local_model} cluster",
              file=sys.stderr)
        cluster.start()
        try:
            return _run_locust(args, cluster.url, out, planned)
        finally:
            cluster.stop()


def _run_locust(args: argparse.Namespace, host: str, out: pathlib.Path, planned: list) -> int:
    run_time_s = int((planned[-1].send_s if planned else 0) + _DRAIN_S)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", "1", "-r", "1", "--host", host, "--run-time", f"{run_time_s}s", "--exit-code-on-error", "0",
           # Locust's CSV is a snapshot taken every second, never rewritten at exit, so it can miss
           # the last requests; its JSON file is written once the run has ended.
           "--csv", str(out / "locust"), "--json-file", str(out / "locust_stats"), "--html", str(out / "locust.html"),
           "--trace", args.trace, "--minutes", str(args.minutes), "--speedup", str(args.speedup),
           "--max-input-tokens", str(args.max_input_tokens), "--max-output-tokens", str(args.max_output_tokens),
           "--scenario-routing", args.scenario_routing, "--summary-dir", str(out), "--seed", str(args.seed)]
    for flag, value in (("--trace-file", args.trace_file), ("--model", args.model),
                        ("--tokenizer", args.tokenizer or (args.local_model if args.local and not args.model else "")),
                        ("--slos", args.slos)):
        if value:
            cmd += [flag, str(value)]
    # Locust's tables go to stderr: stdout carries only the summary.
    rc = subprocess.run(cmd, stdout=sys.stderr).returncode
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.exists():
        print(f"pdserve: error: locust exited with {rc} and wrote no summary (see above)", file=sys.stderr)
        return 1
    summary = {**json.loads(summary_path.read_text()), "results_dir": str(out)}
    print(json.dumps(summary, sort_keys=True) if args.json else format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    lines = [f"{s['trace']} x{s['speedup']} against {s['host']} ({s['model']}), {s['duration_s']:.1f} s",
             f"{'scenario':<10}{'sent':>6}{'done':>6}{'fail':>6}{'attain':>8}{'goodput':>9}"
             f"{'TTFT p50/p99 ms':>18}{'TPOT p50/p99 ms':>18}{'rate want/got':>15}{'late p99':>10}"]
    for name, g in [*s["scenarios"].items(), ("all", s["all"])]:
        lines.append(f"{name:<10}{g['sent']:>6}{g['completed']:>6}{g['failed']:>6}{g['slo_attainment'] or 0:>8.3f}"
                     f"{g['goodput_rps'] or 0:>9.2f}{_pair(g['ttft_ms']):>18}{_pair(g['tpot_ms']):>18}"
                     f"{_pair({'p50': g['intended_rate_rps'], 'p99': g['achieved_rate_rps']}):>15}"
                     f"{g['send_lateness_ms']['p99'] or 0:>10.1f}")
    lines.append(f"results: {s['results_dir']} (summary.json, requests.jsonl, *.png, locust.html, locust_stats.json, locust_*.csv)")
    return "\n".join(lines)


def _pair(p: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"   # noqa: E731
    return f"{fmt(p['p50'])}/{fmt(p['p99'])}"

