"""IC-Cache end to end: a gateway serving 'tiny-large' (large) and 'tiny' (small, with examples)
behind the routed name 'auto', each model its own disaggregated pool, with the real openai client,
MiniLM embeddings and the store. Feedback steers the router toward the small model. API keys are
required: the tests speak as tenant acme, whose examples another tenant never sees."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from pdserve.launch import LocalCluster
from pdserve.store import Store
from pdserve.proto_maps import role_name
from pdserve.v1 import admin_pb2, admin_pb2_grpc

TOKEN = "iccache-test-admin-token"
QUESTIONS = ["What is the capital of France?", "Which city is the capital of France?",
             "Name the capital city of France.", "France's capital is which city?",
             "Tell me the capital of France.", "What city is France's capital?"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("iccache") / "d.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    keys = {tenant: store.create_api_key(f"{tenant}-key", tenant=tenant) for tenant in ("acme", "globex")}
    store.engine.dispose()
    c = LocalCluster(model="tiny-large", num_prefill=1, num_decode=1, extra_pools=(("tiny", 1, 1),), env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{db}", "PDSERVE_ICCACHE__ENABLED": "true",
        "PDSERVE_GATEWAY__REQUIRE_API_KEY": "true",
        "PDSERVE_ICCACHE__SMALL_MODEL": "tiny", "PDSERVE_ICCACHE__LOAD_PENALTY": "0",
        "PDSERVE_ICCACHE__REPLAY_INTERVAL_S": "3600", "PDSERVE_ROUTER__ADMIN_TOKEN": TOKEN})
    c.start()
    c.db_url = f"sqlite:///{db}"
    c.keys = keys
    yield c
    c.stop()


def _oai(cluster, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=cluster.keys[tenant], max_retries=0)


def _http(cluster, tenant: str = "acme") -> httpx.Client:
    return httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {cluster.keys[tenant]}"})


def _ask(cluster, question: str, tenant: str = "acme"):
    raw = _oai(cluster, tenant).chat.completions.with_raw_response
    resp = raw.create(model="auto", max_tokens=8, temperature=0, messages=[{"role": "user", "content": question}])
    return resp.headers, resp.parse()


def test_routed_requests_learn_from_feedback_and_offload_with_examples(cluster):
    url, http = cluster.url, _http(cluster)
    models = {m.id for m in _oai(cluster).models.list()}
    assert models == {"tiny-large", "tiny", "auto"}
    headers, first = _ask(cluster, QUESTIONS[0])
    assert headers["x-pdserve-model"] == "tiny-large" and headers["x-pdserve-iccache-examples"] == "0"
    assert first.model == "tiny-large" and first.usage.model_extra["iccache"] == {"model": "tiny-large", "num_examples": 0}
    seen = []
    for question in QUESTIONS[1:] * 3:
        headers, reply = _ask(cluster, question)
        arm_small = headers["x-pdserve-model"] == "tiny"
        seen.append((headers["x-pdserve-model"], int(headers["x-pdserve-iccache-examples"])))
        # The operator's ratings: the small model with examples does well here, the large one not.
        r = http.post("/v1/feedback", json={"response_id": reply.id, "rating": 1.0 if arm_small else 0.0})
        assert r.status_code == 200 and r.json()["recorded"] is True
    small = [n for model, n in seen if model == "tiny"]
    assert small and all(n >= 1 for n in small)             # an offload always carries examples
    # After the feedback the router offloads. Thompson sampling still explores now and then, so
    # the check is on the last six requests, not the last one alone.
    assert sum(model == "tiny" for model, _ in seen[-6:]) >= 4, seen
    again = http.post("/v1/feedback", json={"response_id": reply.id, "rating": 0.0})
    assert again.json()["recorded"] is False                # the first rating counts
    assert http.post("/v1/feedback", json={"response_id": "cmpl-nope", "rating": 1}).status_code == 404
    assert http.post("/v1/feedback", json={"response_id": reply.id, "rating": 7}).status_code == 400
    with create_engine(cluster.db_url).connect() as conn:
        num_examples = conn.execute(text("select count(*) from iccache_examples")).scalar()
        arms = dict(conn.execute(text("select arm, count(*) from iccache_answers group by arm")).all())
        used = conn.execute(text("select sum(num_uses) from iccache_examples")).scalar()
    assert num_examples == arms["large"] >= 1 and arms.get("small", 0) == len(small) and used >= len(small)
    dash = httpx.get(f"{url}/dashboard/state", headers={"Authorization": f"Bearer {TOKEN}"}).json()["iccache"]
    assert dash["offloaded"] == len(small) and dash["num_examples"] == num_examples
    metrics = httpx.get(f"{url}/metrics").text
    assert f'pdserve_iccache_requests_total{{arm="small"}} {float(len(small))}' in metrics


def test_explicit_models_bypass_iccache_and_operators_can_pause_it(cluster):
    url, http, oai = cluster.url, _http(cluster), _oai(cluster)
    raw = oai.completions.with_raw_response.create(model="tiny", prompt="hello", max_tokens=4)
    assert raw.headers["x-pdserve-model"] == "tiny" and "x-pdserve-iccache-examples" not in raw.headers
    assert "iccache" not in (raw.parse().usage.model_extra or {})
    assert httpx.get(f"{url}/admin/iccache").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stats = httpx.get(f"{url}/admin/iccache", headers=auth).json()
    assert stats["num_examples"] >= 1 and stats["small_model"] == "tiny" and not stats["paused"]
    assert httpx.post(f"{url}/admin/iccache/pause", headers=auth).json()["paused"] is True
    headers, _ = _ask(cluster, QUESTIONS[1])
    assert headers["x-pdserve-model"] == "tiny-large"       # paused: everything goes to the large model
    assert httpx.post(f"{url}/admin/iccache/resume", headers=auth).json()["paused"] is False
    cli = subprocess.run([sys.executable, "-m", "pdserve.cli", "admin", "iccache", "--gateway", url],
                         capture_output=True, text=True, env={**os.environ, "PDSERVE_ADMIN_TOKEN": TOKEN}, timeout=60)
    assert cli.returncode == 0 and "tiny-large (large) / tiny (small + examples)" in cli.stdout, cli.stderr
    assert "offloaded:" in cli.stdout and "small" in cli.stdout
    _, reply = _ask(cluster, QUESTIONS[2])
    both = http.post("/v1/feedback", json={"response_id": reply.id, "rating": 1, "gold": "Paris"})
    assert both.status_code == 400
    scored = http.post("/v1/feedback", json={"response_id": reply.id, "gold": "Paris"})
    assert scored.status_code == 200 and scored.json()["recorded"] is True
    with pytest.raises(openai.BadRequestError, match="text prompt"):   # token ids cannot be matched
        oai.completions.create(model="auto", prompt=[1, 2, 3], max_tokens=2)


def _admin(cluster, method: str, request):
    async def call():
        async with cluster.channel(cluster.router_address) as ch:
            return await getattr(admin_pb2_grpc.AdminStub(ch), method)(
                request, metadata=(("authorization", f"Bearer {TOKEN}"),))
    return asyncio.run(call())


def test_a_request_the_small_pool_cannot_take_moves_to_the_large_one(cluster):
    # The small pool loses its only decode worker; the bandit, taught above, still prefers it.
    workers = _admin(cluster, "ListWorkers", admin_pb2.Empty()).workers
    decode = next(w for w in workers if w.model == "tiny" and role_name(w.role) == "decode")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = httpx.get(f"{cluster.url}/admin/iccache", headers=auth).json()
    _admin(cluster, "DrainWorker", admin_pb2.WorkerRef(worker_id=decode.worker_id))
    try:
        answered_by = [_ask(cluster, q)[0]["x-pdserve-model"] for q in QUESTIONS]
    finally:
        _admin(cluster, "UndrainWorker", admin_pb2.WorkerRef(worker_id=decode.worker_id))
    assert answered_by == ["tiny-large"] * len(QUESTIONS)     # every one answered, none failed
    after = httpx.get(f"{cluster.url}/admin/iccache", headers=auth).json()
    assert after["moved"] - before["moved"] >= 1
    assert after["offloaded"] == before["offloaded"]           # a moved offload is not one


def test_another_tenant_never_gets_a_tenants_examples(cluster):
    # acme's large answers above made the examples, and the router, taught above, offloads
    # whenever examples are found. globex asks the same questions and finds none of acme's: its
    # first request goes to the large model without examples; later ones may use globex's own.
    def query(sql: str):
        with create_engine(cluster.db_url).connect() as conn:
            return conn.execute(text(sql)).all()
    before = dict(query("select tenant, count(*) from iccache_examples group by tenant"))
    assert set(before) == {"acme"}
    answered = [_ask(cluster, q, tenant="globex") for q in QUESTIONS]
    assert answered[0][0]["x-pdserve-iccache-examples"] == "0" and answered[0][0]["x-pdserve-model"] == "tiny-large"
    after = dict(query("select tenant, count(*) from iccache_examples group by tenant"))
    assert after["acme"] == before["acme"] and after.get("globex", 0) >= 1   # its own, kept apart
    owner = dict(query("select id, tenant from iccache_examples"))
    shown = [i for (chosen,) in query("select chosen from iccache_answers where tenant = 'globex'")
             for i, _, _ in json.loads(chosen)]
    assert all(owner.get(i) == "globex" for i in shown)
    # A rating must come from the tenant that got the answer.
    reply = answered[0][1]
    assert _http(cluster, "acme").post("/v1/feedback", json={"response_id": reply.id, "rating": 1}).status_code == 404
    assert _http(cluster, "globex").post("/v1/feedback", json={"response_id": reply.id, "rating": 1}).status_code == 200
