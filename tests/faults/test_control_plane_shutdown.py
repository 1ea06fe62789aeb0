"""SIGTERM to the router or the gateway mid-stream: it stops accepting new work, lets the open
stream finish (within its shutdown_grace_s) and exits; the client sees a complete stream."""
import json
import signal
import threading

import httpx
import pytest

from pdserve.launch import LocalCluster

MAX_TOKENS = 300


@pytest.fixture()
def cluster(tmp_path):
    c = LocalCluster(model="tiny", num_prefill=1, num_decode=1, env={
        "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db", "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600"})
    c.start()
    yield c
    c.stop()


def _stream_with_sigterm_after_first_token(cluster, component: str) -> tuple[int, bool]:
    body = {"model": "tiny", "prompt": "finish me", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    num_tokens, done, signalled = 0, False, threading.Event()
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    num_tokens += 1
                    if not signalled.is_set():
                        cluster.process(component).proc.terminate()     # SIGTERM
                        signalled.set()
    return num_tokens, done


@pytest.mark.parametrize("component", ["router", "gateway"])
def test_sigterm_lets_the_open_stream_finish(cluster, component):
    num_events, done = _stream_with_sigterm_after_first_token(cluster, component)
    assert done and num_events >= 2
    # uvicorn re-raises the SIGTERM once its graceful shutdown is over, so the gateway reports
    # the signal as its exit status; the router returns normally.
    expected = 0 if component == "router" else -signal.SIGTERM
    assert cluster.process(component).proc.wait(60) == expected
