"""Overload and failure answers (429/503 with Retry-After) and the real
SmolLM2 model answering through the whole stack."""
import socket

import httpx
import openai
import pytest

from pdserve.launch import LocalCluster, start_process
from tests.conftest import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_workers_gives_503_with_retry_after(tmp_path):
    router = start_process("router", ["serve", "router"], {"PDSERVE_ROUTER__PORT": "0"})
    gw = start_process("gateway", ["serve", "gateway"], {
        "PDSERVE_MODEL__NAME": "tiny", "PDSERVE_GATEWAY__PORT": "0", "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db",
        "PDSERVE_GATEWAY__ROUTER_ADDRESS": f"127.0.0.1:{router.port}"})
    try:
        url = f"http://127.0.0.1:{gw.port}"
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
        assert httpx.get(f"{url}/ready").status_code == 503
    finally:
        gw.stop()
        router.stop()


def test_full_worker_gives_429_and_dead_worker_gets_no_work(tmp_path):
    # A decode worker with room for one sequence, busy with a 3000-token stream for seconds: the
    # worker itself refuses the next request (whatever the router's last heartbeat said) -> 429.
    cluster = LocalCluster(model="tiny", env={"PDSERVE_WORKER__MAX_BATCH_SIZE": "1",
                                              "PDSERVE_WORKER__NUM_KV_BLOCKS": "256",
                                              "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db"}).start()
    try:
        with httpx.Client(base_url=cluster.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "long one", "stream": True,
                                                             "max_tokens": 3000, "ignore_eos": True}) as big:
                assert big.status_code == 200
                r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 40})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            decode = cluster.process("decode-0")
            decode.proc.kill()
            decode.proc.wait()
            # The first call that fails marks the worker suspect: 503 (no decode path left), not a hang.
            assert wait_until(lambda: http.post("/v1/completions", json={
                "model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 503, 15)
    finally:
        cluster.stop()


# `pdserve up` itself (serves, stops cleanly on Ctrl-C) is tested in test_dashboard.py, which
# shares one `pdserve up` between the dashboard's tests.


@pytest.mark.slow
def test_smollm2_answers_through_the_whole_stack(tmp_path):
    # One aggregated worker: gateway, router and a real SmolLM2 worker, loaded once (the split
    # across processes is test_disaggregation.py's SmolLM2 test).
    cluster = LocalCluster(model="smollm2-135m", num_prefill=0, num_decode=0, num_aggregated=1,
                           env={"PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db"}).start()
    try:
        oai = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)
        r = oai.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=24,
                                        messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    finally:
        cluster.stop()
