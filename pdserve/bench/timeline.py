"""`pdserve bench timeline`: where one request's time goes, stage by stage, on a real cluster.

Starts a `tiny` (or `--model`) cluster (2 prefill + 2 decode by default, one torch thread each, as
`bench prefix` runs) with `diagnostics.timeline_file` set, so every component appends the stages
a request passes (pdserve/timeline.py). Then sends requests one at a time, so nothing queues:
`cached` ones repeat one prompt whose prefix the workers hold, `cold` ones are fresh prompts,
interleaved so drift hits both alike. Requests are max_tokens=1 completions, or with
`--stream-tokens N` streamed completions of N tokens (the first token then is not the last,
as in chat traffic). With `--decode-load N`, N long streamed completions keep the decode workers
stepping a batch throughout (bench/decode_load.py), as in production. Per kind: the client's time to the first token and to the end of the
answer and, per stage in the order requests pass them, the median time since the client sent
the request and since the previous stage (medians of per-request differences, so the columns
need not add up).
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import statistics
import tempfile
import time

import httpx

from pdserve import timeline
from pdserve.bench.decode_load import DecodeLoad
from pdserve.bench import FIXED_ROLES_ENV
from pdserve.launch import LocalCluster

KINDS = ("cached", "cold")


def _ask(http: httpx.Client, model: str, ids: list[int], stream_tokens: int = 0) -> tuple[str, float, float, float, int]:
    """(request id, sent, first token received, answer received, cached tokens), wall seconds.
    Without `stream_tokens` a max_tokens=1 completion, whose answer is its first token."""
    sent = time.time()
    if not stream_tokens:
        r = http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1})
        r.raise_for_status()
        got = time.time()
        return r.headers["x-request-id"], sent, got, got, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    body = {"model": model, "prompt": ids, "max_tokens": stream_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    first, cached = None, 0
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk["choices"]:
                first = time.time()
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return r.headers["x-request-id"], sent, first, time.time(), cached


def _summary(samples: list[tuple[dict[str, float], float, float]]) -> list[dict]:
    """samples: (stage -> wall s, client sent s, client received s) per request."""
    rows = [{"client.sent": sent, **stages, "client.received": got} for stages, sent, got in samples]
    names = {name for row in rows for name in row}
    at = {name: statistics.median(row[name] - row["client.sent"] for row in rows if name in row) for name in names}
    order = sorted(names, key=lambda name: at[name])
    out = []
    for prev, name in zip([None, *order], order):
        gaps = [row[name] - row[prev] for row in rows if prev is not None and name in row and prev in row]
        out.append({"stage": name, "at_ms_p50": round(1e3 * at[name], 2),
                    "since_previous_ms_p50": round(1e3 * statistics.median(gaps), 2) if gaps else None})
    return out


def run(num_requests: int = 20, prompt_tokens: int = 293, num_prefill: int = 2, num_decode: int = 2,
        backend: str = "ucx", stream_tokens: int = 0, model: str = "tiny", decode_load: int = 0,
        load_context_tokens: int = 1024) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/timeline.log"
        env = {"PDSERVE_DATABASE__URL": f"sqlite:///{tmp}/bench.db", "PDSERVE_MODEL__TORCH_NUM_THREADS": "1",
               "PDSERVE_DIAGNOSTICS__TIMELINE_FILE": path,
               "PDSERVE_ROUTER__KV_BACKEND_PREFERENCE": f'["{backend}"]', **FIXED_ROLES_ENV}
        cluster = LocalCluster(model=model, num_prefill=num_prefill, num_decode=num_decode, env=env).start()
        try:
            load = DecodeLoad(cluster.url, model, decode_load, load_context_tokens) if decode_load else None
            errors: dict[str, int] = {}
            raw = _replay(cluster.url, model, num_requests, prompt_tokens, num_prefill, stream_tokens, load, errors)
        finally:
            cluster.stop()
        stages = timeline.read(path)
    kinds = {}
    for kind in KINDS:
        done = raw[kind]
        if not done:            # every one failed (see errors)
            kinds[kind] = {"requests": 0, "cached_tokens_p50": None, "ttft_ms_p50": None,
                           "end_to_end_ms_p50": None, "stages": []}
            continue
        kinds[kind] = {
            "requests": len(done),
            "cached_tokens_p50": statistics.median(c for *_, c in done),
            "ttft_ms_p50": round(1e3 * statistics.median(first - sent for _, sent, first, _, _ in done), 2),
            "end_to_end_ms_p50": round(1e3 * statistics.median(got - sent for _, sent, _, got, _ in done), 2),
            "stages": _summary([(stages.get(rid, {}), sent, got) for rid, sent, _, got, _ in done])}
    return {"model": model, "cluster": f"{num_prefill} prefill + {num_decode} decode", "kv_backend": backend,
            "prompt_tokens": prompt_tokens, "output_tokens": stream_tokens or 1, "streamed": bool(stream_tokens),
            "decode_load": load.report() if load else None, "errors": errors, "kinds": kinds}


def _replay(url: str, model: str, num_requests: int, prompt_tokens: int, num_prefill: int, stream_tokens: int,
            load: DecodeLoad | None, errors: dict[str, int]) -> dict[str, list]:
    rng = random.Random(1)
    fresh = lambda: [rng.randrange(256) for _ in range(prompt_tokens)]  # noqa: E731
    cached = fresh()
    raw: dict[str, list] = {kind: [] for kind in KINDS}
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(2 * num_prefill):     # every prefill worker may be chosen at first
            _ask(http, model, cached, stream_tokens)
            _ask(http, model, fresh(), stream_tokens)
        with load or contextlib.nullcontext():
            for _ in range(num_requests):
                for kind, ids in (("cached", cached), ("cold", fresh())):
                    try:
                        raw[kind].append(_ask(http, model, ids, stream_tokens))
                    except httpx.HTTPStatusError as exc:     # counted (a full cluster's 429), not fatal
                        errors[str(exc.response.status_code)] = errors.get(str(exc.response.status_code), 0) + 1
    return raw


def format_report(r: dict) -> str:
    lines = [f"{r['model']}, {r['cluster']}, {r['prompt_tokens']}-token prompts, {r['output_tokens']} output tokens"
             f"{' streamed' if r['streamed'] else ''}, KV over {r['kv_backend']}; medians, one request at a time"]
    if r["decode_load"]:
        d = r["decode_load"]
        lines.append(f"decode load: {d['streams']} streams of {d['context_tokens']}-token contexts, "
                     f"{d['chunks_per_s']} chunks/s, errors {d['errors'] or 'none'}")
    if r["errors"]:
        lines.append(f"measured requests that failed (HTTP status: count): {r['errors']}")
    for kind, k in r["kinds"].items():
        lines.append(f"{kind}: {k['requests']} requests, {k['cached_tokens_p50']} tokens cached, "
                     f"first token {k['ttft_ms_p50']} ms, end to end {k['end_to_end_ms_p50']} ms")
        lines.append(f"  {'stage':<28}{'at ms':>9}{'since previous':>16}")
        for s in k["stages"]:
            since = "" if s["since_previous_ms_p50"] is None else f"{s['since_previous_ms_p50']:.2f}"
            lines.append(f"  {s['stage']:<28}{s['at_ms_p50']:>9.2f}{since:>16}")
    return "\n".join(lines)
