"""`pdserve bench prefix`: prefix caching and cache-aware routing on a real `tiny` (or `--model`) cluster.

Workload: the Mooncake conversation trace (FAST'25), downscaled by conversation: every
`sample_every`-th conversation (keyed by its first block after the one every request shares) is
kept whole over the trace's hour and replayed `speedup` times faster (default: `sample_every`
times, so the arrival rate stays the trace's). A short slice of consecutive requests would keep
almost no reuse: turns of one conversation lie minutes apart, so a 600-request slice can reuse at
most 17% of its prompt tokens, against 43% for the same number of whole conversations. Each
512-token trace block
(`hash_ids`) becomes `tokens_per_trace_block` token ids drawn from a generator seeded by its hash,
so equal hashes give equal tokens and shared trace prefixes are shared prompt prefixes; prompt
lengths are the trace's, scaled by the same factor; prompts that would not fit the model's context
are left out (and counted). Requests arrive at the trace's times (divided by `speedup`).

Four clusters of 2 prefill + 2 decode workers, one per mode, replay the same requests:
- `no_cache`: prefix caching off, load-only routing (pdserve before prefix caching);
- `cache_load_routing`: caches on, routing ignores them;
- `cache_aware_routing`: caches on, the router places by cached prefix against load;
- `cache_aware_local_prefill`: the same, plus conditional disaggregation: a request whose decode
  worker caches all but `LOCAL_PREFILL_MAX_TOKENS` of its prompt is prefilled there. The bench's
  requests decode one token, so their decode workers are otherwise idle: the decode steps such a
  prefill delays on a busy worker do not show here.
Per mode: prefix hit rate (prompt tokens the prefill worker took from its cache, from each
response's usage.prompt_tokens_details.cached_tokens), prefill tokens computed, KV bytes sent
prefill -> decode (gateway metric), TTFT p50/p99 (latency of max_tokens=1 requests, which end at
the first token) and goodput (requests within the TTFT SLO per second). The upper bound is the hit
rate of one infinite cache that saw every earlier prompt of the slice.

`ttft_by_tokens_computed` (per mode): TTFT p50 by how many prompt tokens the prefill computed, and
the share of requests sent while no other was in flight (where that share is high, TTFT is the
request's fixed path plus its compute, and queueing explains little).

`idle_floor` (on the cache-aware cluster, after its replay): TTFT of one request at a time, so
nothing queues, for fresh prompts of the workload's median length, for prompts sharing their
first `upper bound` share with a cached one, and for fully cached ones. Its ratios are the most
caching can cut TTFT on this host at that reuse, whatever the load: what remains is the fixed cost
of a request (gateway, router, RPCs, the KV transfer's tail) and attention over cached tokens.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import random
import re
import tempfile
import time

import httpx

from pdserve.bench import FIXED_ROLES_ENV
from pdserve.launch import LocalCluster
from pdserve.policy.prefix_cache import block_hashes, infinite_cache_hit_rate, infinite_cache_hits
from pdserve.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, load_named_or_file

log = logging.getLogger("pdserve.bench")
BLOCK_TOKENS = 16                  # the workers' KV block size (the default)
# Half the workload's requests leave at most this many tokens uncached (infinite cache, default
# scaling), and on tiny that many tokens compute in a few milliseconds.
LOCAL_PREFILL_MAX_TOKENS = 128
_AWARE = {"PDSERVE_WORKER__PREFIX_CACHING": "true", "PDSERVE_ROUTER__CACHE_AWARE_ROUTING": "true"}
MODES = {
    "no_cache": {"PDSERVE_WORKER__PREFIX_CACHING": "false", "PDSERVE_ROUTER__CACHE_AWARE_ROUTING": "false"},
    "cache_load_routing": {"PDSERVE_WORKER__PREFIX_CACHING": "true", "PDSERVE_ROUTER__CACHE_AWARE_ROUTING": "false"},
    "cache_aware_routing": _AWARE,
    "cache_aware_local_prefill": {**_AWARE, "PDSERVE_ROUTER__LOCAL_PREFILL_MAX_TOKENS": str(LOCAL_PREFILL_MAX_TOKENS)},
}
_FLOOR_MODES = ("cache_aware_routing", "cache_aware_local_prefill")


def conversation_key(req: TraceRequest) -> int:
    """The trace's first block (hash 0) opens every prompt; the second one tells conversations apart."""
    hashes = req.block_hashes
    return hashes[1] if len(hashes) > 1 else (hashes[0] if hashes else 0)


def sample_conversations(trace: list[TraceRequest], every: int) -> list[TraceRequest]:
    """Whole conversations: those whose key is a multiple of `every` (all of them when every <= 1)."""
    return trace if every <= 1 else [r for r in trace if conversation_key(r) % every == 0]


def prompt_ids(req: TraceRequest, tokens_per_trace_block: int) -> list[int]:
    """Token ids for a trace request: equal block hashes give equal tokens (bytes 0..255)."""
    num_tokens = max(1, round(req.input_tokens * tokens_per_trace_block / MOONCAKE_BLOCK_TOKENS))
    ids: list[int] = []
    for h in req.block_hashes:
        rng = random.Random(h)
        ids += [rng.randrange(256) for _ in range(tokens_per_trace_block)]
    if len(ids) < num_tokens:    # a trace row with fewer blocks than tokens: its own filler
        rng = random.Random(f"{req.arrival_s}/{req.input_tokens}")
        ids += [rng.randrange(256) for _ in range(num_tokens - len(ids))]
    return ids[:num_tokens]


def workload(trace: list[TraceRequest], tokens_per_trace_block: int, max_prompt_tokens: int
             ) -> tuple[list[tuple[float, list[int]]], int]:
    """(arrival s, prompt ids) of the requests that fit, and how many were left out."""
    out, skipped = [], 0
    for req in trace:
        ids = prompt_ids(req, tokens_per_trace_block)
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        out.append((req.arrival_s, ids))
    return out, skipped


def upper_bound_hit_rate(prompts: list[list[int]], block_tokens: int = BLOCK_TOKENS) -> float:
    return infinite_cache_hit_rate(((block_hashes(ids, block_tokens), len(ids)) for ids in prompts), block_tokens)


def compute_only_ttft_p50_ratio(prompts: list[list[int]], block_tokens: int = BLOCK_TOKENS) -> float:
    """TTFT p50 with an infinite cache over TTFT p50 without one, were a request's TTFT only its
    prefill compute and that compute linear in the tokens computed: the median of the tokens left
    to compute over the median prompt length. What the workload allows before the host's fixed
    cost per request (which no cache removes) and attention over cached tokens are counted."""
    if not prompts:
        return 0.0
    hits = infinite_cache_hits(((block_hashes(ids, block_tokens), len(ids)) for ids in prompts), block_tokens)
    uncached = [len(ids) - hit for ids, hit in zip(prompts, hits)]
    return _percentile(uncached, 0.5) / _percentile([len(ids) for ids in prompts], 0.5)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _first_token(http: httpx.AsyncClient, model: str, ids: list[int], errors: dict[str, int]
                       ) -> httpx.Response | None:
    """A max_tokens=1 completion; None, counted in `errors` by kind, unless it answered 200."""
    try:
        r = await http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1})
    except httpx.HTTPError as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        return None
    if r.status_code != 200:
        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
        return None
    return r


_COMPUTED_BUCKETS = (0, 32, 128, 256, 512, 1024)


def ttft_by_tokens_computed(records: list[tuple[float, int, float]]) -> dict:
    """records: (sent s, prompt tokens the prefill computed, TTFT s) per answered request. TTFT p50
    per range of tokens computed, and the share of requests sent while no other was in flight:
    where most requests meet an idle cluster, TTFT is the fixed path plus compute, which a
    nearly cached prompt cuts only to the fixed path (the 0-31 row)."""
    starts = sorted(sent for sent, _, _ in records)
    ends = sorted(sent + ttft for sent, _, ttft in records)
    alone = sum(bisect.bisect_left(starts, sent) - bisect.bisect_right(ends, sent) == 0 for sent, _, _ in records)
    rows = []
    for low, high in zip(_COMPUTED_BUCKETS, (*_COMPUTED_BUCKETS[1:], None)):
        ttfts = [t for _, n, t in records if n >= low and (high is None or n < high)]
        if ttfts:
            rows.append({"tokens_computed": f"{low}-{high - 1}" if high else f"{low}+", "requests": len(ttfts),
                         "ttft_p50_ms": round(1e3 * _percentile(ttfts, 0.5), 1)})
    return {"sent_while_none_in_flight": round(alone / len(records), 3) if records else None, "by_range": rows}


async def _replay(url: str, model: str, requests: list[tuple[float, list[int]]], speedup: float, slo_s: float) -> dict:
    ttfts, cached, errors, records = [], 0, {}, []
    prompt_tokens = 0
    # Idle connections are dropped before the server would close them (uvicorn: 5 s), so a request
    # never races a server-side close on a reused connection.
    limits = httpx.Limits(max_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def one(at_s: float, ids: list[int]) -> None:
            nonlocal cached, prompt_tokens
            await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - t0)))
            started = time.perf_counter()
            if (r := await _first_token(http, model, ids, errors)) is None:
                return
            ttfts.append(time.perf_counter() - started)
            usage = r.json()["usage"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            prompt_tokens += usage["prompt_tokens"]
            records.append((started, usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"],
                            ttfts[-1]))

        first = requests[0][0]
        t0 = time.perf_counter()
        await asyncio.gather(*(one((at - first) / speedup, ids) for at, ids in requests))
        wall_s = time.perf_counter() - t0
    return {"ttfts": ttfts, "cached_tokens": cached, "prompt_tokens": prompt_tokens, "errors": errors,
            "wall_s": wall_s, "goodput_rps": sum(t <= slo_s for t in ttfts) / wall_s,
            "ttft_by_tokens_computed": ttft_by_tokens_computed(records)}


def floor_prompts(num_tokens: int, reuse: float, num_samples: int, seed: int = 1) -> dict[str, list[list[int]]]:
    """Fresh prompts, prompts sharing their first `reuse` share, and prompts equal to one cached
    prompt; `warm` holds the two prompts that put the shared prefix and the whole prompt in cache."""
    rng = random.Random(seed)
    fresh = lambda n: [rng.randrange(256) for _ in range(n)]  # noqa: E731
    shared, whole = fresh(round(num_tokens * reuse)), fresh(num_tokens)
    return {"warm": [shared + fresh(num_tokens - len(shared)), whole],
            "cold": [fresh(num_tokens) for _ in range(num_samples)],
            "partial": [shared + fresh(num_tokens - len(shared)) for _ in range(num_samples)],
            "cached": [whole] * num_samples}


async def idle_floor(url: str, model: str, num_tokens: int, reuse: float, num_samples: int = 20) -> dict:
    prompts = floor_prompts(num_tokens, reuse, num_samples)
    ttfts: dict[str, list[float]] = {k: [] for k in ("cold", "partial", "cached")}
    cached: dict[str, int] = {k: 0 for k in ttfts}
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def ask(ids: list[int]) -> tuple[float, int] | None:
            started = time.perf_counter()
            if (r := await _first_token(http, model, ids, errors)) is None:
                return None
            return time.perf_counter() - started, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        for _ in range(2):     # both prefill workers may be chosen: each gets the prefixes
            for ids in prompts["warm"]:
                await ask(ids)
        for i in range(num_samples):          # interleaved, so drift hits all three alike
            for kind in ttfts:
                if (got := await ask(prompts[kind][i])) is not None:
                    ttfts[kind].append(got[0])
                    cached[kind] += got[1]
    p50 = {k: 1e3 * _percentile(v, 0.5) if v else None for k, v in ttfts.items()}
    ratio = lambda k: round(p50[k] / p50["cold"], 3) if p50[k] and p50["cold"] else None  # noqa: E731
    return {"prompt_tokens": num_tokens, "shared_share": round(reuse, 4), "samples": num_samples, "errors": errors,
            **{f"{k}_ttft_p50_ms": round(v, 1) if v else None for k, v in p50.items()},
            **{f"{k}_hit_rate": round(cached[k] / (len(ttfts[k]) * num_tokens), 4) if ttfts[k] else None
               for k in cached},
            "partial_vs_cold": ratio("partial"), "cached_vs_cold": ratio("cached")}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


_PREFIX_TOKENS = re.compile(r'^pdserve_worker_prefix_(hit|query)_tokens\{[^}]*role="(\w+)"[^}]*\} (\S+)$')


def _hit_rate_by_role(metrics: str) -> dict[str, float]:
    """Each role's prefix hit rate (tokens) from the workers' gauges: where a cluster misses."""
    sums: dict[tuple[str, str], float] = {}
    for line in metrics.splitlines():
        if m := _PREFIX_TOKENS.match(line):
            sums[(m[2], m[1])] = sums.get((m[2], m[1]), 0.0) + float(m[3])
    return {role: round(sums.get((role, "hit"), 0.0) / query, 4)
            for (role, kind), query in sorted(sums.items()) if kind == "query" and query}


def _wait_for_workers(cluster: LocalCluster, num_each: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
        if all(_metric(text, f'pdserve_workers_alive{{role="{r}"}}') >= num_each for r in ("prefill", "decode")):
            return
        time.sleep(0.2)
    raise TimeoutError("workers did not all register")


def run_mode(mode: str, model: str, requests, speedup: float, slo_s: float, num_kv_blocks: int,
             floor: tuple[int, float] | None = None) -> dict:
    db_dir = tempfile.TemporaryDirectory()
    env = {**MODES[mode], "PDSERVE_DATABASE__URL": f"sqlite:///{db_dir.name}/bench.db",
           "PDSERVE_WORKER__NUM_KV_BLOCKS": str(num_kv_blocks), "PDSERVE_MODEL__TORCH_NUM_THREADS": "1",
           **FIXED_ROLES_ENV}
    cluster = LocalCluster(model=model, num_prefill=2, num_decode=2, env=env).start()
    try:
        _wait_for_workers(cluster, 2)
        log.info("bench prefix: replaying %d requests in mode %s", len(requests), mode)
        res = asyncio.run(_replay(cluster.url, model, requests, speedup, slo_s))
        metrics = httpx.get(f"{cluster.url}/metrics", timeout=5).text
        idle = asyncio.run(idle_floor(cluster.url, model, *floor)) if floor is not None else None
    finally:
        cluster.stop()
        db_dir.cleanup()
    ttfts = res["ttfts"]
    return {"requests_ok": len(ttfts), "errors": res["errors"],
            "hit_rate": round(res["cached_tokens"] / res["prompt_tokens"], 4) if res["prompt_tokens"] else 0.0,
            "prefill_tokens_computed": res["prompt_tokens"] - res["cached_tokens"],
            "kv_bytes_transferred": int(_metric(metrics, "pdserve_kv_transfer_bytes_total")),
            "prefilled_on_decode": int(_metric(metrics, 'pdserve_router_requests{kind="local_prefills"}')),
            "prefill_forwarded": int(_metric(metrics, 'pdserve_router_requests{kind="forwarded"}')),
            "hit_rate_by_role": _hit_rate_by_role(metrics),
            "ttft_p50_ms": round(1e3 * _percentile(ttfts, 0.5), 1) if ttfts else None,
            "ttft_p99_ms": round(1e3 * _percentile(ttfts, 0.99), 1) if ttfts else None,
            "goodput_rps": round(res["goodput_rps"], 3), "wall_s": round(res["wall_s"], 1),
            "ttft_by_tokens_computed": res["ttft_by_tokens_computed"],
            **({"idle_floor": idle} if idle is not None else {})}


def run(num_requests: int | None = None, tokens_per_trace_block: int = 16, speedup: float | None = None,
        ttft_slo_ms: float = 1000.0, num_kv_blocks: int = 4096, trace_file=None,
        modes: tuple[str, ...] = tuple(MODES), sample_every: int = 20, model: str = "tiny") -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    speedup = float(sample_every) if speedup is None else speedup
    trace = sample_conversations(load_named_or_file("mooncake-conversation", trace_file), sample_every)
    requests, skipped = workload(trace[:num_requests], tokens_per_trace_block, max_prompt_tokens=4000)
    bound = upper_bound_hit_rate([ids for _, ids in requests])
    compute_only = compute_only_ttft_p50_ratio([ids for _, ids in requests])
    median_tokens = _percentile([len(ids) for _, ids in requests], 0.5)
    results = {mode: run_mode(mode, model, requests, speedup, ttft_slo_ms / 1e3, num_kv_blocks,
                              (median_tokens, bound) if mode in _FLOOR_MODES else None)
               for mode in modes}
    report = {"model": model, "cluster": "2 prefill + 2 decode", "requests": len(requests),
              "skipped_too_long": skipped, "conversations_sampled_every": sample_every,
              "tokens_per_trace_block": tokens_per_trace_block, "speedup": speedup,
              "ttft_slo_ms": ttft_slo_ms, "prompt_tokens": sum(len(ids) for _, ids in requests),
              "upper_bound_hit_rate": round(bound, 4), "compute_only_ttft_p50_ratio": round(compute_only, 3),
              "modes": results}
    aware, none = results.get("cache_aware_routing"), results.get("no_cache")
    if aware and none and bound > 0 and aware["ttft_p50_ms"] and none["ttft_p50_ms"]:
        report["summary"] = {
            "cache_aware_hit_rate_vs_upper_bound": round(aware["hit_rate"] / bound, 3),
            "ttft_p50_cache_aware_vs_no_cache": round(aware["ttft_p50_ms"] / none["ttft_p50_ms"], 3),
            "prefill_tokens_cache_aware_vs_no_cache": round(
                aware["prefill_tokens_computed"] / max(1, none["prefill_tokens_computed"]), 3),
            "kv_bytes_cache_aware_vs_no_cache": round(
                aware["kv_bytes_transferred"] / max(1, none["kv_bytes_transferred"]), 3)}
    local = results.get("cache_aware_local_prefill")
    if local and none and local["ttft_p50_ms"] and none["ttft_p50_ms"]:
        report.setdefault("summary", {})["ttft_p50_local_prefill_vs_no_cache"] = round(
            local["ttft_p50_ms"] / none["ttft_p50_ms"], 3)
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['requests']} Mooncake conversation requests (every {r['conversations_sampled_every']}th "
             f"conversation, {r['speedup']:g}x faster; {r['skipped_too_long']} too long left out), "
             f"{r['prompt_tokens']} prompt tokens; infinite-cache hit rate {r['upper_bound_hit_rate']:.3f}; "
             f"TTFT p50 ratio if TTFT were compute alone: x{r['compute_only_ttft_p50_ratio']}",
             f"{'mode':<27}{'hit rate':>9}{'computed':>10}{'KV MB':>8}{'p50 ms':>8}{'p99 ms':>8}{'goodput':>9}  errors"]
    for mode, m in r["modes"].items():
        lines.append(f"{mode:<27}{m['hit_rate']:>9.3f}{m['prefill_tokens_computed']:>10}"
                     f"{m['kv_bytes_transferred'] / 1e6:>8.1f}{m['ttft_p50_ms']!s:>8}{m['ttft_p99_ms']!s:>8}"
                     f"{m['goodput_rps']:>9.2f}  {m['errors'] or 'none'}")
    for mode, m in r["modes"].items():
        by = m.get("ttft_by_tokens_computed")
        if by and by["by_range"]:
            rows = ", ".join(f"{row['tokens_computed']}: {row['ttft_p50_ms']} ({row['requests']})" for row in by["by_range"])
            lines.append(f"{mode}: {by['sent_while_none_in_flight']:.0%} sent with none in flight; "
                         f"TTFT p50 ms (requests) by tokens computed: {rows}")
    for key, value in r.get("summary", {}).items():
        lines.append(f"{key}: x{value}")
    for mode in _FLOOR_MODES:
        floor = r["modes"].get(mode, {}).get("idle_floor")
        if floor:
            lines.append(f"{mode}, one request at a time, {floor['prompt_tokens']} tokens: cold "
                         f"{floor['cold_ttft_p50_ms']} ms, {floor['shared_share']:.0%} shared "
                         f"{floor['partial_ttft_p50_ms']} ms (x{floor['partial_vs_cold']}), fully cached "
                         f"{floor['cached_ttft_p50_ms']} ms (x{floor['cached_vs_cold']})")
    return "\n".join(lines)
