"""`pdserve bench iccache`: IC-Cache against the policies users would otherwise run, on trivia.

One real cluster serves both models, each its own 1 prefill + 1 decode pool behind one gateway
with IC-Cache on (large: Gemma 3 270M, small: SmolLM2-135M by default). Questions come from
red-trivia (`bench/trivia.py`), split once by a seeded shuffle into three disjoint sets:
1. the example pool: asked through the routed name with IC-Cache paused, so the large model
   answers and each answer becomes an IC-Cache example (rated by exact match, as feedback would);
   the same answers are the examples and the cache of the baselines. This closed-loop phase also
   measures the large model's capacity (requests per second at `concurrency` clients, 32 by
   default: with fewer its decode batches stay part empty, and Gemma on one core measured 2.0
   req/s at 8 clients against 3.0 at 24, which set the arrival rate a third too low);
2. training: asked through the routed name with IC-Cache on, each answer rated, so its bandit and
   selector start the measured phase having learnt (the paper trains its router offline too);
3. held-out (at least 500 for the published figures): every policy answers all of them, open
   loop, at the Azure 2023 conversation trace's arrival times scaled so the mean rate is
   `overload` x the large model's capacity: always-large saturates, and a policy that takes load
   off it shows it in throughput and latency. A policy that keeps up with arrivals can show at
   most `overload` x always-large's throughput, so `overload` (2 by default) must stay above the
   ratio to be shown. IC-Cache keeps learning from ratings here.

A 429 or 503 (queues past their bounds) is retried after Retry-After, as the openai client does: every question is answered, and overload shows as latency and retries.
Per policy: throughput (answered / time from first arrival to last answer; one run, no interval),
CPU milliseconds per request of every process (gateway, router, workers, this client),
latency p50/p99 with bootstrap intervals, offload ratio (answers not from the large model) and
exact match with Wilson intervals; failed requests count as wrong answers and in `errors`. Against
always-large: the throughput ratio and the paired exact-match difference (same questions) with
its interval. Per pool, the prompt and completion tokens each policy sent it, and the split the
P/D ratio controller (the router's own policy object) would choose for a fleet of
`fleet_workers` workers per pool, given those tokens: offloading moves work from the large pool's
decode to the small pool's prefill, and the controller's split follows.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import httpx

from pdserve.bench import trivia
from pdserve.bench.gateway import cpu_s
from pdserve.bench.iccache_policies import (CACHE_MODEL, Answered, Gateway, Outcome, RandomExamples,
                                            SemanticCache, ask_model, ask_routed, closed_loop, replay)
from pdserve.bench.prefix import _wait_for_workers
from pdserve.launch import LocalCluster
from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.registry import Role, WorkerRecord
from pdserve.policy.scenarios import ScenarioSpec
from pdserve.sim.hardware import KV_POOL_BYTES, LLAMA3_8B_H100
from pdserve.traces import load_azure

log = logging.getLogger("pdserve.bench")
ROUTED = "auto"
POLICIES = ("always_large", "always_small", "small_random_examples", "semantic_cache_0.8",
            "semantic_cache_0.9", "iccache")
# Fixed demonstrations of the answer format, before every prompt of every policy: the models are
# base models, which need a few shots to answer briefly. Not trivia-list questions.
PREAMBLE = ("Question: What is the chemical symbol for gold?\nAnswer: Au\n\n"
            "Question: Which planet is known as the Red Planet?\nAnswer: Mars\n\n")


@dataclass
class Settings:
    large_model: str = "gemma3-270m"
    small_model: str = "smollm2-135m"
    num_held_out: int = 500
    num_train: int = 300
    num_pool: int = 1200
    overload: float = 2.0
    concurrency: int = 32             # deep enough that the large pool's batches fill: its capacity
    max_examples: int = 3
    seed: int = 0
    lists_dir: str | None = None
    policies: tuple[str, ...] = POLICIES
    fleet_workers: int = 16
    pin_pools: bool = True
    small_cost: float | None = None     # iccache.small_cost for the run; None: the configured default
    env: dict[str, str] = field(default_factory=dict)


def arrivals(n: int, rate_rps: float) -> list[float]:
    """The first n arrivals of the Azure conversation trace, rescaled to a mean of rate_rps."""
    times = [r.arrival_s for r in load_azure("conv", limit=n)]
    span = times[-1] - times[0]
    scale = (n - 1) / rate_rps / span if n > 1 and span > 0 else 0.0
    return [(t - times[0]) * scale for t in times]


def run(s: Settings) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    unknown = set(s.policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    names = None if s.lists_dir else trivia.DEFAULT_LISTS
    held_out, train, pool = trivia.split(trivia.load_questions(s.lists_dir, names), s.num_held_out,
                                         s.num_train, s.num_pool, s.seed)
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as db_dir:
        env = {"PDSERVE_DATABASE__URL": f"sqlite:///{db_dir}/bench.db", "PDSERVE_ICCACHE__ENABLED": "true",
               "PDSERVE_ICCACHE__SMALL_MODEL": s.small_model, "PDSERVE_ICCACHE__TEXT_PREAMBLE": PREAMBLE,
               "PDSERVE_ICCACHE__MAX_EXAMPLES": str(s.max_examples), "PDSERVE_ICCACHE__SEED": str(s.seed),
               "PDSERVE_ROUTER__ADMIN_TOKEN": token, "PDSERVE_MODEL__TORCH_NUM_THREADS": "1",
               **({"PDSERVE_ICCACHE__SMALL_COST": str(s.small_cost)} if s.small_cost is not None else {}), **s.env}
        cluster = LocalCluster(model=s.large_model, num_prefill=1, num_decode=1,
                               extra_pools=((s.small_model, 1, 1),), env=env).start()
        try:
            _wait_for_workers(cluster, 2)
            cpus = pin_pools(cluster, s.small_model) if s.pin_pools else {}
            pids = {p.name: p.proc.pid for p in cluster.processes} | {"client": os.getpid()}
            return {**asyncio.run(_run(cluster.url, token, s, held_out, train, pool, pids)), "pool_cpus": cpus}
        finally:
            cluster.stop()


def pin_pools(cluster: LocalCluster, small_model: str) -> dict[str, list[int]]:
    """Each pool's workers on their own half of this host's CPUs, as each pool has its own GPUs in
    a fleet. Without it both pools share every core, so a policy that leaves the small pool idle
    hands its cores to the large one and no policy can show the capacity a second pool adds.
    The gateway, router and this client keep every CPU. Every thread is pinned (a thread's
    affinity is its own; later threads inherit their creator's)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    half = len(cpus) // 2
    pools = {"large": set(cpus[:half]), "small": set(cpus[half:])}
    for proc in cluster.processes:
        if proc.name.startswith(f"{small_model}-"):
            target = pools["small"]
        elif proc.name.split("-")[0] in ("prefill", "decode"):
            target = pools["large"]
        else:
            continue
        for tid in os.listdir(f"/proc/{proc.proc.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), target)
            except ProcessLookupError:
                pass            # a thread that ended meanwhile
    return {name: sorted(c) for name, c in pools.items()}


async def _run(url: str, token: str, s: Settings, held_out, train, pool_questions, pids: dict[str, int]) -> dict:
    limits = httpx.Limits(max_connections=1024, keepalive_expiry=2.0)
    admin = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        gw = Gateway(http, PREAMBLE)
        (await http.post("/admin/iccache/pause", headers=admin)).raise_for_status()
        log.info("bench iccache: the large model answers %d pool questions", len(pool_questions))
        outs, wall_s = await closed_loop(lambda q: ask_routed(gw, ROUTED, q), pool_questions, s.concurrency)
        await gw.settle()
        pool = [Answered(q, o.answer) for q, o in zip(pool_questions, outs) if not o.error]
        capacity_rps = len(pool) / wall_s
        (await http.post("/admin/iccache/resume", headers=admin)).raise_for_status()
        log.info("bench iccache: %d training questions through %r", len(train), ROUTED)
        train_outs, _ = await closed_loop(lambda q: ask_routed(gw, ROUTED, q), train, s.concurrency)
        await gw.settle()
        times = arrivals(len(held_out), s.overload * capacity_rps)
        asks = await _policies(gw, s, pool)
        results, cpu_ms = {}, {}
        for name in s.policies:
            log.info("bench iccache: %s answers %d held-out questions", name, len(held_out))
            before = {proc: cpu_s(pid) for proc, pid in pids.items()}
            results[name] = await replay(asks[name], held_out, times)
            await gw.settle()
            cpu_ms[name] = {proc: round((cpu_s(pid) - before[proc]) * 1e3 / len(held_out), 1)
                            for proc, pid in pids.items()}
        iccache_stats = (await http.get("/admin/iccache", headers=admin)).json()
    out = report(s, capacity_rps, pool, train_outs, times, results, iccache_stats)
    for name, row in out["results"].items():
        row["cpu_ms_per_request"] = cpu_ms[name]
    return out


async def _policies(gw: Gateway, s: Settings, pool: list[Answered]) -> dict:
    asks = {"always_large": lambda q: ask_model(gw, s.large_model, q),
            "always_small": lambda q: ask_model(gw, s.small_model, q),
            "iccache": lambda q: ask_routed(gw, ROUTED, q)}
    randoms = RandomExamples(pool, s.max_examples, s.seed)
    asks["small_random_examples"] = lambda q: randoms.ask(gw, s.small_model, q)
    semantic = [p for p in s.policies if p.startswith("semantic_cache_")]
    if semantic:
        from pdserve.iccache.embedder import MiniLMEmbedder
        embedder = await asyncio.to_thread(MiniLMEmbedder)
        vectors = await asyncio.to_thread(embedder.embed, [a.question.text for a in pool])
        for name in semantic:
            cache = SemanticCache(embedder, float(name.rsplit("_", 1)[1]), pool, vectors)
            asks[name] = lambda q, c=cache: c.ask(gw, s.large_model, q)
    return asks


def report(s: Settings, capacity_rps: float, pool: list[Answered], train_outs: list[Outcome], times: list[float],
           results: dict[str, list[Outcome]], iccache_stats: dict) -> dict:
    rows = {name: summarise(outs, s) for name, outs in results.items()}
    large = results.get("always_large")
    for name, outs in results.items():
        if large is not None and name != "always_large":
            rows[name]["vs_always_large"] = {
                "throughput_ratio": _ratio(rows[name]["throughput_rps"], rows["always_large"]["throughput_rps"]),
                "exact_match_difference": trivia.paired_difference([o.correct for o in outs],
                                                                   [o.correct for o in large])}
    out = {"large_model": s.large_model, "small_model": s.small_model, "held_out": len(next(iter(results.values()), [])),
           "train": len(train_outs), "pool": len(pool), "seed": s.seed, "max_examples": s.max_examples,
           "fleet_workers": s.fleet_workers, "small_cost": s.small_cost,
           "large_capacity_rps": round(capacity_rps, 3), "overload": s.overload,
           "arrival_rate_rps": round((len(times) - 1) / times[-1], 3) if len(times) > 1 and times[-1] else None,
           "pool_exact_match": round(sum(trivia.exact_match(a.answer, a.question.aliases) for a in pool)
                                     / max(1, len(pool)), 4),
           "train_offload_ratio": round(sum(o.model == s.small_model for o in train_outs) / max(1, len(train_outs)), 4),
           "results": rows, "iccache_state": iccache_stats}
    if "always_small" in results and large is not None:
        diff = trivia.paired_difference([o.correct for o in large], [o.correct for o in results["always_small"]])
        out["large_beats_small"] = {**diff, "significant": diff["significant"] and diff["mean"] > 0}
    ic = rows.get("iccache", {}).get("vs_always_large")
    if ic:
        out["iccache_targets"] = {"exact_match_not_below_large": ic["exact_match_difference"]["ci95"][1] >= 0,
                                  "throughput_at_least_1_5x": (ic["throughput_ratio"] or 0) >= 1.5}
    return out


def summarise(outs: list[Outcome], s: Settings) -> dict:
    ok = [o for o in outs if not o.error]
    n, correct = len(outs), sum(o.correct for o in outs)
    span_s = max(o.done_s for o in ok) - min(o.arrival_s for o in outs) if ok else 0.0
    latencies = [o.latency_s * 1e3 for o in ok]
    offloaded = sum(o.model != s.large_model for o in ok)
    row = {"requests": n, "answered": len(ok), "errors": dict(Counter(o.error for o in outs if o.error)),
           "retries": sum(o.retries for o in outs),
           "throughput_rps": round(len(ok) / span_s, 3) if span_s else None,
           "exact_match": round(correct / n, 4), "exact_match_ci95": _rounded(trivia.wilson(correct, n)),
           "offload_ratio": round(offloaded / max(1, len(ok)), 4),
           "offload_ratio_ci95": _rounded(trivia.wilson(offloaded, len(ok))),
           "answered_by": dict(Counter(o.model for o in ok)),
           "mean_examples": round(sum(o.num_examples for o in ok) / max(1, len(ok)), 3)}
    if latencies:
        for q, key in ((0.5, "p50"), (0.99, "p99")):
            row[f"latency_{key}_ms"] = round(trivia.percentile(latencies, q), 1)
            row[f"latency_{key}_ms_ci95"] = _rounded(trivia.bootstrap_percentile(latencies, q, s.seed), 1)
    row["pools"] = {m: pool_view([o for o in ok if o.model == m], s.fleet_workers)
                    for m in (s.large_model, s.small_model)}
    if any(o.model == CACHE_MODEL for o in ok):
        row["pools"][CACHE_MODEL] = {"requests": sum(o.model == CACHE_MODEL for o in ok)}
    return row


def pool_view(outs: list[Outcome], fleet_workers: int) -> dict:
    """The tokens one pool served, and the P/D split the ratio controller would pick for them on a
    fleet of `fleet_workers` (8B-on-H100 speeds: the split's direction, not this CPU's)."""
    view = {"requests": len(outs), "prompt_tokens": sum(o.prompt_tokens for o in outs),
            "completion_tokens": sum(o.completion_tokens for o in outs)}
    if not outs:
        return view
    window_s = max(o.done_s for o in outs) + 1.0
    controller = RatioController(ControllerConfig(window_s=window_s, cooldown_s=0.0, hysteresis=0.0,
                                                  max_step=fleet_workers))
    for o in outs:
        controller.observe("pool", o.arrival_s, o.prompt_tokens, o.completion_tokens)
    half = fleet_workers // 2
    kv_blocks = KV_POOL_BYTES // (LLAMA3_8B_H100.kv_bytes_per_token * 16)
    members = [WorkerRecord(f"w{i}", Role.PREFILL if i < half else Role.DECODE, "m", "", {}, kv_blocks, 16, 1)
               for i in range(fleet_workers)]
    spec, perf = ScenarioSpec("pool"), LLAMA3_8B_H100.perf()
    demand = controller.demand("pool", spec, perf, window_s)
    plan = controller.decide("pool", spec, members, perf, window_s)
    view["prefill_share_of_demand"] = round(demand.prefill_load / max(1e-12, demand.prefill_load + demand.decode_load), 4)
    view["controller_split"] = list(plan.new) if plan else [half, fleet_workers - half]
    return view


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _rounded(pair, digits: int = 4) -> list[float]:
    return [round(x, digits) for x in pair]


def format_report(r: dict) -> str:
    lines = [f"IC-Cache on trivia: large {r['large_model']}, small {r['small_model']}; {r['held_out']} held-out, "
             f"{r['train']} training, {r['pool']} pooled questions (large model right on {r['pool_exact_match']:.1%} "
             f"of the pool); large capacity {r['large_capacity_rps']} req/s, arrivals at {r['arrival_rate_rps']} req/s; "
             f"pool CPUs {r.get('pool_cpus') or 'shared'}",
             f"{'policy':<24}{'req/s':>7}{'vs large':>9}{'p50 ms':>9}{'p99 ms':>9}{'offload':>9}"
             f"{'exact match (95% CI)':>24}  errors"]
    for name, row in r["results"].items():
        vs = row.get("vs_always_large", {})
        lo, hi = row["exact_match_ci95"]
        lines.append(f"{name:<24}{row['throughput_rps']!s:>7}{vs.get('throughput_ratio') or '':>9}"
                     f"{row.get('latency_p50_ms')!s:>9}{row.get('latency_p99_ms')!s:>9}{row['offload_ratio']:>9.3f}"
                     f"{row['exact_match']:>10.3f} [{lo:.3f}, {hi:.3f}]  {row['errors'] or 'none'}, "
                     f"{row['retries']} retried")
    if "large_beats_small" in r:
        d = r["large_beats_small"]
        lines.append(f"always_large - always_small exact match: {d['mean']:+.3f} {d['ci95']} "
                     f"({'significant' if d['significant'] else 'NOT significant'})")
    for key, ok in r.get("iccache_targets", {}).items():
        lines.append(f"iccache {key}: {'yes' if ok else 'no'}")
    for name, row in r["results"].items():
        splits = {m: v.get("controller_split") for m, v in row["pools"].items() if "controller_split" in v}
        lines.append(f"{name}: controller P:D split per pool of {r['fleet_workers']}: {splits}")
    return "\n".join(lines)
