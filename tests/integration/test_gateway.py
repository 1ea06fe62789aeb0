"""The official `openai` client against a real multi-process cluster (router, prefill and decode
workers over UCX, gateway), plus the raw HTTP error paths and cancellation."""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pdserve.launch import LocalCluster, start_process
from pdserve.store import Store
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers import client as wclient
from pdserve.workers.model.tokenizer import ByteTokenizer
from tests.conftest import wait_until
from tests.routing import route

PROMPT = "Disaggregated serving splits prefill from decode."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "pdserve.db"
    c = LocalCluster(model="tiny", num_aggregated=0, env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}"}).start()
    c.db_url = f"sqlite:///{db}"
    yield c
    c.stop()


@pytest.fixture(scope="module")
def oai(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def _worker_info(cluster, name: str) -> worker_pb2.WorkerInfo:
    async def get():
        stub = worker_pb2_grpc.WorkerStub(cluster.channel(cluster.process(name).port))
        return await stub.GetInfo(worker_pb2.GetInfoRequest())
    return asyncio.run(get())


def _workers_idle(cluster) -> bool:
    infos = [_worker_info(cluster, n) for n in ("prefill-0", "decode-0")]
    return all(i.num_free_kv_blocks == i.num_total_kv_blocks and i.num_active_requests == 0
               and i.num_pending_transfers == 0 for i in infos)


def _aggregated_reference(prompt_ids: list[int], max_tokens: int) -> str:
    """Greedy output of an aggregated worker (separate process) for the same tokens."""
    agg = start_process("aggregated-ref", ["serve", "aggregated"], {"PDSERVE_MODEL__NAME": "tiny"})
    try:
        async def run():
            stub = worker_pb2_grpc.WorkerStub(wclient.channel(agg.port))
            return await route([stub], "ref", prompt_ids, worker_pb2.SamplingParams(max_tokens=max_tokens))
        return asyncio.run(run()).text
    finally:
        agg.stop()


def test_completions_non_streaming_equals_aggregated_reference(oai):
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    prompt_ids = ByteTokenizer().encode(PROMPT)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].text == _aggregated_reference(prompt_ids, 12)


def test_streaming_matches_non_streaming_with_usage(oai):
    full = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def _metric(text: str, name: str) -> float:
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)), 0.0)


def test_a_shared_prefix_is_served_from_the_caches_and_reported(cluster, oai):
    """Prefix caching through the whole stack, with the real client: the second prompt shares a
    long prefix with the first; its usage reports the cached tokens, and the workers' counters
    reach /metrics and the router's prefix index through their heartbeats."""
    system = "You are a careful assistant who answers briefly. " * 6
    tok = ByteTokenizer()
    first_ids, second_ids = tok.encode(system + "First question?"), tok.encode(system + "Another one!")
    common = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    first = oai.completions.create(model="tiny", prompt=system + "First question?", max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = oai.completions.create(model="tiny", prompt=system + "Another one!", max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == common // 16 * 16 > 0
    with httpx.Client(base_url=cluster.url) as http:
        reported = lambda text: (_metric(text, 'pdserve_prefix_cache_hit_rate{unit="tokens"}') > 0  # noqa: E731
                                 and _metric(text, 'pdserve_router_prefix_index{kind="blocks"}') > 0)
        assert wait_until(lambda: reported(http.get("/metrics").text))   # the next heartbeats bring them
        text = http.get("/metrics").text
    assert _metric(text, 'pdserve_tokens_total{kind="cached_prompt"}') >= common // 16 * 16
    # The router's counters: both requests routed, neither prefilled on its decode worker (off by default).
    assert _metric(text, 'pdserve_router_requests{kind="routed"}') >= 2
    assert 'pdserve_router_requests{kind="local_prefills"} 0.0' in text


def test_chat_streaming_and_not(oai):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = oai.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=9, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert full.usage.prompt_tokens == len(ByteTokenizer().apply_chat_template(messages))


def test_stop_sequence_is_honoured(oai):
    base = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = base[5:7]
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(oai):
    runs = [oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=5).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_models_health_ready_metrics_and_request_ids(cluster, oai):
    assert [m.id for m in oai.models.list()] == ["tiny"]
    assert httpx.get(f"{cluster.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{cluster.url}/ready").status_code == 200
    r = httpx.post(f"{cluster.url}/v1/completions", headers={"x-request-id": "trace-me-42"},
                   json={"model": "tiny", "prompt": "id", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-42"
    for name in ("gateway", "router", "prefill-0", "decode-0"):
        assert wait_until(lambda: any("trace-me-42" in line for line in cluster.process(name).log_lines), 5), name
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert "pdserve_ttft_seconds_count" in metrics and "pdserve_workers_alive" in metrics
    sample = [l for l in metrics.splitlines() if l.startswith("pdserve_kv_transfer_bytes_total")][0]
    assert float(sample.split()[-1]) > 0
    internal_id = r.json()["id"].removeprefix("cmpl-")      # the client's id plus a suffix that keeps it unique
    assert internal_id.startswith("trace-me-42.")
    assert wait_until(lambda: Store(cluster.db_url).get_request(internal_id) is not None, 5)
    rec = Store(cluster.db_url).get_request(internal_id)
    assert rec.outcome == "ok" and rec.num_completion_tokens == 2 and rec.ttft_ms > 0


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "abc"}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": -5}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000000}', 400, "context_length_exceeded"),
    (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400, None),
    (b'{"model": "tiny", "prompt": 42}', 400, None),
    (b'[1, 2, 3]', 400, None),
    (b'{"model": "gpt-9", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "tiny", "prompt": "' + b"a" * 5000 + b'"}', 400, "context_length_exceeded"),
    (b'{"model": "tiny", "prompt": "\xff\xfe bad utf8"}', 400, None),
    (b'{"model": "tiny", "prompt": "' + b"a" * (10 << 20) + b'"}', 413, "request_too_large"),
    (b'{"model": "tiny", "prompt": "x", "tools": [{"type": "function"}]}', 400, "unsupported_parameter"),
    (b'{"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}', 400, "unsupported_parameter"),
    (b'{"model": "tiny", "prompt": "x", "presence_penalty": 0.5}', 400, "unsupported_parameter"),
    (b'{"model": "tiny", "prompt": "x", "max_token": 5}', 400, "unsupported_parameter"),
    (b'{"model": "tiny", "prompt": "x", "n": 2}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "min_tokens": 3}', 400, None),
    (b'{"model": "tiny", "prompt": [1, 2, 99999]}', 400, None),
    (b'{"model": "tiny", "prompt": [1, 2, 99999], "echo": true}', 400, None),
    (b'{"model": "tiny", "prompt": []}', 400, None),
], ids=["malformed", "wrong-type", "negative-max", "huge-max", "bad-temperature", "prompt-type", "not-object",
        "unknown-model", "too-long", "invalid-utf8", "10MB", "tools", "response-format", "penalty", "typo-field",
        "n-2", "min-over-max", "token-id-out-of-vocab", "token-id-echo", "no-token-ids"])
def test_bad_input_gets_openai_errors_and_cluster_keeps_serving(cluster, oai, body, status, code):
    r = httpx.post(f"{cluster.url}/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert code is None or err["code"] == code
    assert oai.completions.create(model="tiny", prompt="still alive?", max_tokens=2).usage.completion_tokens >= 1


def test_unknown_route_and_method_use_openai_format(cluster):
    assert httpx.get(f"{cluster.url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{cluster.url}/v1/completions").status_code == 405


def test_client_disconnect_mid_stream_frees_kv_on_both_workers(cluster):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{cluster.url}/v1/completions", json={
                "model": "tiny", "prompt": PROMPT, "max_tokens": 3000, "stream": True, "temperature": 0}) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    # Still streaming: the decode worker holds this request's KV.
                    busy = _worker_info(cluster, "decode-0")
                    break                 # leaving the iterator closes the connection
            assert busy.num_free_kv_blocks < busy.num_total_kv_blocks
    assert wait_until(lambda: _workers_idle(cluster), 15)


def test_api_keys_required_when_enabled(cluster):
    store = Store(cluster.db_url)
    key = store.create_api_key(f"tester-{time.time_ns()}", tenant="acme")
    gw = start_process("gateway-auth", ["serve", "gateway"], {
        "PDSERVE_MODEL__NAME": "tiny", "PDSERVE_GATEWAY__PORT": "0", "PDSERVE_GATEWAY__REQUIRE_API_KEY": "true",
        "PDSERVE_GATEWAY__ROUTER_ADDRESS": cluster.router_address, "PDSERVE_DATABASE__URL": cluster.db_url,
        "PDSERVE_CLUSTER__SECRET": cluster.cluster_secret})
    try:
        base = f"http://127.0.0.1:{gw.port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        r = ok.completions.create(model="tiny", prompt="auth", max_tokens=2)
        assert r.usage.completion_tokens >= 1
        req_id = r.id.removeprefix("cmpl-")
        assert wait_until(lambda: store.get_request(req_id) is not None, 5)   # recorded off the hot path
        assert store.get_request(req_id).tenant == "acme"
        _same_request_id_from_two_tenants(store, f"http://127.0.0.1:{gw.port}/v1/completions", key)
        _rate_limits_give_429_with_retry_after(store, base)
    finally:
        gw.stop()


def _rate_limits_give_429_with_retry_after(store: Store, base: str) -> None:
    """A key limited to 2 requests a minute gets its third refused with 429, Retry-After and an
    OpenAI-format error; a request larger than its token limit is refused without Retry-After."""
    key = store.create_api_key(f"limited-{time.time_ns()}", tenant="acme", requests_per_minute=2,
                               tokens_per_minute=1000)
    limited = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    for _ in range(2):
        assert limited.completions.create(model="tiny", prompt="rl", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.RateLimitError) as refused:
        limited.completions.create(model="tiny", prompt="rl", max_tokens=2)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.body["code"] == "rate_limit_exceeded" and "2 requests per minute" in refused.value.message
    big = httpx.post(f"{base}/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                     json={"model": "tiny", "prompt": "rl", "max_tokens": 2000})
    assert big.status_code == 429 and "retry-after" not in big.headers
    assert "more than the key's limit of 1000 tokens" in big.json()["error"]["message"]


def _same_request_id_from_two_tenants(store: Store, url: str, acme_key: str) -> None:
    """Two tenants send the same x-request-id at once: both are served (no 500) and each gets its
    own usage record, neither overwriting the other."""
    other_key = store.create_api_key(f"other-{time.time_ns()}", tenant="globex")
    shared = f"same-{time.time_ns()}"

    async def both():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(url, headers={"authorization": f"Bearer {k}", "x-request-id": shared},
                                                    json={"model": "tiny", "prompt": "dup", "max_tokens": 8,
                                                          "ignore_eos": True})
                                          for k in (acme_key, other_key)))
    responses = asyncio.run(both())
    assert [r.status_code for r in responses] == [200, 200]
    assert all(r.headers["x-request-id"] == shared for r in responses)
    ids = [r.json()["id"].removeprefix("cmpl-") for r in responses]
    assert ids[0] != ids[1] and all(i.startswith(shared) for i in ids)
    assert wait_until(lambda: all(store.get_request(i) is not None for i in ids), 5)
    assert sorted(store.get_request(i).tenant for i in ids) == ["acme", "globex"]


def test_grpc_health_and_reflection_on_router_and_workers(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def check(address: str):
        async with wclient.grpc.aio.insecure_channel(address) as ch:
            status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = [s.name async for r in responses for s in r.list_services_response.service]
            return status.status, services

    status, services = asyncio.run(check(cluster.router_address))
    assert status == health_pb2.HealthCheckResponse.SERVING and "pdserve.v1.Router" in services
    status, services = asyncio.run(check(f"127.0.0.1:{cluster.process('decode-0').port}"))
    assert status == health_pb2.HealthCheckResponse.SERVING and "pdserve.v1.Worker" in services


def test_router_records_worker_history_and_enforces_deadlines(cluster):
    from pdserve.v1 import router_pb2, router_pb2_grpc
    import grpc

    async def run():
        async with cluster.channel(cluster.router_address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            workers = (await stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
            call = stub.Generate(router_pb2.RouteRequest(
                req_id="too-slow", model="tiny", prompt_token_ids=[i % 250 for i in range(3000)],
                sampling=worker_pb2.SamplingParams(max_tokens=500), timeout_s=0.05))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            return workers, err.value
    workers, err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "too-slow" in err.details()
    store = Store(cluster.db_url)
    for w in workers:
        assert "registered" in [e.event for e in store.worker_events(w.worker_id)]
    assert wait_until(lambda: _workers_idle(cluster), 15)     # the timed-out request left nothing behind


def test_token_id_prompts_min_tokens_and_no_op_fields(cluster, oai):
    ids = ByteTokenizer().encode(PROMPT)
    as_text = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    as_ids = oai.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, user="u-1",
                                    presence_penalty=0, extra_body={"metadata": {"k": "v"}})
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == len(ids)
    echoed = oai.completions.create(model="tiny", prompt=[ids], max_tokens=1, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)
    # A stop string that greedy decoding hits at once is ignored until min_tokens are out.
    first = as_text.choices[0].text[:1]
    stopped = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stop=[first])
    held = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stop=[first],
                                  extra_body={"min_tokens": 4})
    assert stopped.usage.completion_tokens == 1 and held.usage.completion_tokens >= 4
    assert held.choices[0].text.startswith(as_text.choices[0].text[:1])


def test_completion_logprobs_with_echo_agree_across_prefill_and_decode(cluster, oai):
    """Generated tokens' logprobs (the first from the prefill worker, the rest from the decode
    worker) agree with the same tokens scored as a prompt (echo), and greedy picks the top one."""
    out = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and max(top.values()) == pytest.approx(value) and top[token] == value
    assert lp.text_offset == sorted(lp.text_offset)
    as_ids = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert as_ids.token_logprobs == lp.token_logprobs
    ids = ByteTokenizer().encode(PROMPT) + [int(t.removeprefix("token_id:")) for t in as_ids.tokens]
    scored = oai.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=0, echo=True)
    slp = scored.choices[0].logprobs
    assert slp.token_logprobs[0] is None and len(slp.token_logprobs) == len(ids) + 1
    prompt_part = slp.token_logprobs[len(ids) - 4:len(ids)]     # the 4 generated tokens, scored as prompt
    assert prompt_part == pytest.approx(lp.token_logprobs, abs=2e-3)
    streamed = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                      stream=True)
    tokens = [t for chunk in streamed for t in (chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else [])]
    assert tokens == lp.tokens


def test_chat_logprobs_streamed_and_not(cluster, oai):
    msgs = [{"role": "user", "content": "hi"}]
    full = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)     # greedy
    streamed = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                           top_logprobs=3, stream=True)
    entries = [c for ch in streamed if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    # The second request's prompt comes from the prefix cache: same tokens, logprobs equal up to
    # float rounding (the cached prefix was computed in a differently shaped matmul).
    assert [e.logprob for e in entries] == pytest.approx([c.logprob for c in content], abs=1e-5)
    assert [e.token for e in entries] == [c.token for c in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, top_logprobs=2)


def test_a_burst_of_long_answer_requests_is_admitted_while_the_pool_has_room(oai):
    """Each request may answer 4,000 tokens, half the decode worker's default pool, but stops after
    a few. The worker admits a request by its prompt; the router used to count max_tokens too for
    every placement a heartbeat had not shown yet, so the third of a burst got 429."""
    base = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = base[2:4]

    def ask(_):
        return oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4000, temperature=0, stop=[stop])
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert [a.choices[0].text for a in answers] == [base[:base.index(stop)]] * 6
