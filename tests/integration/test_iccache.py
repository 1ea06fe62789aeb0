"""IC-Cache end to end: a gateway serving 'tiny-large' (large) and 'tiny' (small, with examples)
behind the routed name 'auto', each model its own disaggregated pool, with the real openai client,
MiniLM embeddings and the store. Feedback steers the router toward the small model."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from pdserve.launch import LocalCluster
from pdserve.proto_maps import role_name
from pdserve.v1 import admin_pb2, admin_pb2_grpc

TOKEN = "iccache-test-admin-token"
QUESTIONS = ["What is the capital of France?", "Which city is the capital of France?",
             "Name the capital city of France.", "France's capital is which city?",
             "Tell me the capital of France.", "What city is France's capital?"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("iccache") / "d.db"
    c = LocalCluster(model="tiny-large", num_prefill=1, num_decode=1, extra_pools=(("tiny", 1, 1),), env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{db}", "PDSERVE_ICCACHE__ENABLED": "true",
        "PDSERVE_ICCACHE__SMALL_MODEL": "tiny", "PDSERVE_ICCACHE__LOAD_PENALTY": "0",
        "PDSERVE_ICCACHE__REPLAY_INTERVAL_S": "3600", "PDSERVE_ROUTER__ADMIN_TOKEN": TOKEN})
    c.start()
    c.db_url = f"sqlite:///{db}"
    yield c
    c.stop()


def _ask(url: str, question: str):
    raw = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0).chat.completions.with_raw_response
    resp = raw.create(model="auto", max_tokens=8, temperature=0, messages=[{"role": "user", "content": question}])
    return resp.headers, resp.parse()


def test_routed_requests_learn_from_feedback_and_offload_with_examples(cluster):
    url = cluster.url
    models = {m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key="none").models.list()}
    assert models == {"tiny-large", "tiny", "auto"}
    headers, first = _ask(url, QUESTIONS[0])
    assert headers["x-pdserve-model"] == "tiny-large" and headers["x-pdserve-iccache-examples"] == "0"
    assert first.model == "tiny-large" and first.usage.model_extra["iccache"] == {"model": "tiny-large", "num_examples": 0}
    seen = []
    for question in QUESTIONS[1:] * 3:
        headers, reply = _ask(url, question)
        arm_small = headers["x-pdserve-model"] == "tiny"
        seen.append((headers["x-pdserve-model"], int(headers["x-pdserve-iccache-examples"])))
        # The operator's ratings: the small model with examples does well here, the large one not.
        r = httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "rating": 1.0 if arm_small else 0.0})
        assert r.status_code == 200 and r.json()["recorded"] is True
    small = [n for model, n in seen if model == "tiny"]
    assert small and all(n >= 1 for n in small)             # an offload always carries examples
    # After the feedback the router offloads. Thompson sampling still explores now and then, so
    # the check is on the last six requests, not the last one alone.
    assert sum(model == "tiny" for model, _ in seen[-6:]) >= 4, seen
    again = httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "rating": 0.0})
    assert again.json()["recorded"] is False                # the first rating counts
    assert httpx.post(f"{url}/v1/feedback", json={"response_id": "cmpl-nope", "rating": 1}).status_code == 404
    assert httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "rating": 7}).status_code == 400
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
    url = cluster.url
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    raw = oai.completions.with_raw_response.create(model="tiny", prompt="hello", max_tokens=4)
    assert raw.headers["x-pdserve-model"] == "tiny" and "x-pdserve-iccache-examples" not in raw.headers
    assert "iccache" not in (raw.parse().usage.model_extra or {})
    assert httpx.get(f"{url}/admin/iccache").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stats = httpx.get(f"{url}/admin/iccache", headers=auth).json()
    assert stats["num_examples"] >= 1 and stats["small_model"] == "tiny" and not stats["paused"]
    assert httpx.post(f"{url}/admin/iccache/pause", headers=auth).json()["paused"] is True
    headers, _ = _ask(url, QUESTIONS[1])
    assert headers["x-pdserve-model"] == "tiny-large"       # paused: everything goes to the large model
    assert httpx.post(f"{url}/admin/iccache/resume", headers=auth).json()["paused"] is False
    cli = subprocess.run([sys.executable, "-m", "pdserve.cli", "admin", "iccache", "--gateway", url],
                         capture_output=True, text=True, env={**os.environ, "PDSERVE_ADMIN_TOKEN": TOKEN}, timeout=60)
    assert cli.returncode == 0 and "tiny-large (large) / tiny (small + examples)" in cli.stdout, cli.stderr
    assert "offloaded:" in cli.stdout and "small" in cli.stdout
    _, reply = _ask(url, QUESTIONS[2])
    both = httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "rating": 1, "gold": "Paris"})
    assert both.status_code == 400
    scored = httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "gold": "Paris"})
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
        answered_by = [_ask(cluster.url, q)[0]["x-pdserve-model"] for q in QUESTIONS]
    finally:
        _admin(cluster, "UndrainWorker", admin_pb2.WorkerRef(worker_id=decode.worker_id))
    assert answered_by == ["tiny-large"] * len(QUESTIONS)     # every one answered, none failed
    after = httpx.get(f"{cluster.url}/admin/iccache", headers=auth).json()
    assert after["moved"] - before["moved"] >= 1
    assert after["offloaded"] == before["offloaded"]           # a moved offload is not one
