"""Mutual TLS between components, HTTPS at the gateway (`pdserve up --tls`), real processes:
requests are served end to end through the real openai client; a peer without a certificate
from the cluster CA cannot connect to the router or a worker, whatever secret it holds."""
import asyncio
import json
import os
import stat
import subprocess
import sys

import grpc
import httpx
import openai
import pytest

from pdserve import rpc
from pdserve.certs import make_dev_pki
from pdserve.cluster_auth import ClusterCredential, TlsMaterial
from pdserve.launch import LocalCluster
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

ADMIN_TOKEN = "admin-token-for-tls-tests"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "tls.db"
    c = LocalCluster(model="tiny", tls=True, env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}",
                                                  "PDSERVE_ROUTER__ADMIN_TOKEN": ADMIN_TOKEN}).start()
    yield c
    c.stop()


def _material(files) -> TlsMaterial:
    return TlsMaterial(files.ca_file.read_bytes(), files.cert_file.read_bytes(), files.key_file.read_bytes())


def test_certs_command_writes_a_ca_and_private_keys(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "certs", "--out", str(tmp_path), "--host",
                          "gw.example.com", "--json"], capture_output=True, text=True, check=True)
    listing = json.loads(out.stdout)
    assert set(listing) == {"router", "worker", "gateway", "admin"}
    for files in listing.values():
        assert stat.S_IMODE(os.stat(files["key_file"]).st_mode) == 0o600
        assert b"BEGIN CERTIFICATE" in open(files["cert_file"], "rb").read()


def test_requests_are_served_end_to_end_over_https_and_mutual_tls(cluster):
    assert cluster.url.startswith("https://")
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", http_client=cluster.http_client())
    out = client.completions.create(model="tiny", prompt="over TLS", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    with pytest.raises(httpx.HTTPError):   # the gateway speaks only TLS
        httpx.get(cluster.url.replace("https://", "http://") + "/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # and its certificate is not trusted without the CA
        httpx.get(f"{cluster.url}/health", timeout=5)


async def _code(address: str, credential, call) -> grpc.StatusCode:
    async with rpc.channel(address, credential) as ch:
        try:
            await call(ch)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


def _list_workers(ch):
    return router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)


def _worker_info(ch):
    return worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest(), timeout=5)


def test_only_certificates_from_the_cluster_ca_connect(cluster, tmp_path):
    targets = [(cluster.router_address, _list_workers)] + [
        (f"127.0.0.1:{cluster.process(name).port}", _worker_info) for name in ("prefill-0", "decode-0")]
    foreign = _material(make_dev_pki(tmp_path, components=("admin",))["admin"])
    own = cluster.credential
    strangers = {
        "plaintext with the secret": ClusterCredential(secret=cluster.cluster_secret),
        "certificate from another CA": ClusterCredential(cluster.cluster_secret, foreign),
        # Trusts the cluster CA but presents a certificate the cluster does not trust.
        "foreign client certificate": ClusterCredential(cluster.cluster_secret, TlsMaterial(
            own.tls.ca_pem, foreign.cert_pem, foreign.key_pem)),
    }
    for name, credential in strangers.items():
        for address, call in targets:
            assert asyncio.run(_code(address, credential, call)) is grpc.StatusCode.UNAVAILABLE, (name, address)
    for address, call in targets:
        assert asyncio.run(_code(address, own, call)) is grpc.StatusCode.OK, address


def test_admin_cli_connects_with_its_certificate(cluster):
    admin = cluster.cert_files("admin")
    env = {**os.environ, "PDSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    base = [sys.executable, "-m", "pdserve.cli", "admin", "--router", cluster.router_address]
    refused = subprocess.run([*base, "workers"], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0
    tls = ["--tls-ca-file", str(admin.ca_file), "--tls-cert-file", str(admin.cert_file),
           "--tls-key-file", str(admin.key_file)]
    out = subprocess.run([*base, *tls, "workers"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "decode" in out.stdout and "prefill" in out.stdout
