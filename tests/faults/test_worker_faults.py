"""Real processes, real ucx/tcp: truncated or corrupted KV, a sender that dies mid-transfer, a decode
worker that dies mid-transfer, unknown request ids. Each fails with a clear error, frees KV on both
sides, and the workers keep serving."""
import asyncio
import json
import subprocess
import sys

import grpc
import pytest

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers import client
from pdserve.launch import start_worker
from tests.conftest import REPO_ROOT
from tests.integration.conftest import Cluster
from tests.routing import collect, route

PROMPT = list(b"fault injection prompt " * 10)
# A bad transfer is found by the 2 s stall limit (the receiver waits for bytes that never come);
# the 6 s transfer deadline and lease stay well behind it, so the receiver's own verdict reaches
# the sender before any deadline aborts the transfer (a 3 s deadline left under 1 s of margin).
FAST_FAIL_ENV = {"PDSERVE_WORKER__RESERVATION_LEASE_S": "6", "PDSERVE_KVTRANSFER__TIMEOUT_S": "6",
                 "PDSERVE_KVTRANSFER__STALL_TIMEOUT_S": "2"}
KV_BYTES_PER_TOKEN_PER_LAYER = 2 * 4 * 32 * 4   # tiny: (K,V) * kv heads * head dim * fp32
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("tiny", extra_env=FAST_FAIL_ENV)
    yield c
    c.stop()


def _status(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    # Read the status while the event loop that produced the error is still running.
    return err.code(), err.details()


def _params():
    return worker_pb2.SamplingParams(max_tokens=8, ignore_eos=True)


async def _reserve_and_generate(stubs, backend, req_id):
    res = await stubs["decode"].ReserveKV(worker_pb2.ReserveKVRequest(
        req_id=req_id, num_prompt_tokens=len(PROMPT), backend=backend))
    gen = asyncio.ensure_future(collect(stubs["decode"].Generate(worker_pb2.GenerateRequest(
        req_id=req_id, prompt_token_ids=PROMPT, sampling=_params(), remote_prefill=True))))
    return res, gen


def _still_serves(cluster):
    async def run():
        s = cluster.stubs()
        return await route([s["prefill"], s["decode"]], "after-fault", PROMPT, _params(), backend="tcp")
    assert len(asyncio.run(run()).token_ids) == 8
    cluster.assert_idle()


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
@pytest.mark.parametrize("fault,needs_checksum", [("truncated", False), ("corrupted", True)],
                         ids=["truncated", "corrupted"])
def test_bad_kv_message_fails_cleanly(cluster, backend, fault, needs_checksum):
    async def run():
        s = cluster.stubs()
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.faults.faulty_sender", cwd=REPO_ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert (await sender.stdout.readline()).strip() == b"ready"      # warm before the reservation
        res, gen = await _reserve_and_generate(s, backend, f"bad-{backend}-{needs_checksum}")
        args = (backend, res.endpoint.address.hex(), res.transfer_id, res.transfer_token.hex(),
                len(PROMPT) * KV_BYTES_PER_TOKEN_PER_LAYER, NUM_LAYERS, fault, "1" if needs_checksum else "0")
        sender.stdin.write((" ".join(map(str, args)) + "\n").encode())
        await sender.stdin.drain()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gen
        out, _ = await asyncio.wait_for(sender.communicate(), 60)
        return _status(err.value), json.loads(out.decode().strip().splitlines()[-1])
    (code, details), tx = asyncio.run(run())
    assert code is grpc.StatusCode.UNAVAILABLE
    expected = "checksum mismatch" if needs_checksum else "bytes"
    assert "KV transfer failed" in details and expected in details
    assert tx["state"] == "FAILED" and "receiver refused" in tx["failure"], tx
    _still_serves(cluster)


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
def test_sender_process_dies_mid_transfer(cluster, backend):
    async def run():
        s = cluster.stubs()
        res, gen = await _reserve_and_generate(s, backend, f"orphaned-{backend}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.faults.dying_sender", backend, res.endpoint.address.hex(),
            str(res.transfer_id), str(len(PROMPT) * KV_BYTES_PER_TOKEN_PER_LAYER), str(NUM_LAYERS), "2",
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await proc.communicate(res.transfer_token.hex().encode() + b"\n")   # the token: stdin, not argv
        assert await proc.wait() == 17
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(gen, 15)    # bounded: nothing may hang
        return _status(err.value)
    code, details = asyncio.run(run())
    assert code is grpc.StatusCode.UNAVAILABLE and "KV transfer failed" in details
    _still_serves(cluster)


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
def test_decode_worker_dies_mid_transfer(cluster, backend):
    doomed = start_worker("decode", model="tiny", extra_env=FAST_FAIL_ENV)

    async def run():
        s = cluster.stubs()
        doomed_stub = worker_pb2_grpc.WorkerStub(client.channel(doomed.port))
        res = await doomed_stub.ReserveKV(worker_pb2.ReserveKVRequest(
            req_id="doomed", num_prompt_tokens=len(PROMPT), backend=backend))
        doomed.proc.kill()
        doomed.proc.wait()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(s["prefill"].Prefill(worker_pb2.PrefillRequest(
                req_id="doomed", prompt_token_ids=PROMPT, sampling=_params(), target=res.endpoint,
                transfer_id=res.transfer_id, transfer_token=res.transfer_token)), 15)
        return _status(err.value)
    try:
        code, details = asyncio.run(run())
    finally:
        doomed.stop()
    assert code is grpc.StatusCode.UNAVAILABLE and "KV transfer failed" in details
    _still_serves(cluster)


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
def test_unknown_ids_are_refused(cluster, backend):
    async def run():
        s = cluster.stubs()
        info = await s["decode"].GetInfo(worker_pb2.GetInfoRequest())
        endpoint = next(e for e in info.kv_endpoints if e.backend == backend)
        with pytest.raises(grpc.aio.AioRpcError) as prefill_err:
            await s["prefill"].Prefill(worker_pb2.PrefillRequest(
                req_id="ghost", prompt_token_ids=PROMPT, sampling=_params(), target=endpoint, transfer_id=424242))
        with pytest.raises(grpc.aio.AioRpcError) as gen_err:
            await collect(s["decode"].Generate(worker_pb2.GenerateRequest(
                req_id="ghost", prompt_token_ids=PROMPT, sampling=_params(), remote_prefill=True)))
        return _status(prefill_err.value), _status(gen_err.value)
    (p_code, p_details), (g_code, g_details) = asyncio.run(run())
    assert p_code is grpc.StatusCode.UNAVAILABLE and "unknown or expired transfer id" in p_details
    assert g_code is grpc.StatusCode.NOT_FOUND and "unknown request id" in g_details
    _still_serves(cluster)
