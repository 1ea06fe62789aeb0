"""SIGTERM to a worker under continuous load (what Kubernetes sends before it kills a pod): it
deregisters, finishes what it has, exits cleanly, and no client request fails."""
import signal
import threading

import httpx
import pytest

from pdserve.launch import LocalCluster
from tests.conftest import wait_until
from tests.faults.test_migration import _workers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "d.db"
    c = LocalCluster(model="tiny", num_prefill=1, num_decode=2, env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}",
                                                                         "PDSERVE_ROUTER__CONTROL_INTERVAL_S": "3600"}).start()
    assert wait_until(lambda: len(_workers(c)) == 3, timeout_s=60), "workers did not register"
    yield c
    c.stop()


def test_sigterm_under_load_fails_no_request(cluster):
    completed, failures = [0], []
    stop = threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            n = 0
            while not stop.is_set():
                r = http.post("/v1/completions", json={"model": "tiny", "prompt": f"client {i} request {n}",
                                                       "max_tokens": 24, "temperature": 0})
                if r.status_code == 200:
                    completed[0] += 1
                else:
                    failures.append(r.text)
                n += 1

    def traffic_flows() -> None:
        before = completed[0]
        assert wait_until(lambda: completed[0] >= before + 8 or failures, timeout_s=60), "no traffic completed"

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        traffic_flows()
        leaving = cluster.process("decode-0")
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(60) == 0
        traffic_flows()                 # the other decode worker carries on alone
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    log = "\n".join(leaving.log_lines)
    assert "deregistered from router" in log
    assert "is shutting down; no new work goes to it" in "\n".join(cluster.process("router").log_lines)
