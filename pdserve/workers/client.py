"""Client-side orchestration of one request across workers (used by tests, benches, the router).

Disaggregated flow: ReserveKV on the decode worker (blocks + armed receiver) -> Prefill on the
prefill worker (streams KV layer by layer to that receiver) concurrently with Generate on the
decode worker (waits for the KV, then streams tokens). If any step fails the others are aborted.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = worker_pb2.FINISH_REASON_UNSPECIFIED
    num_prompt_tokens: int = 0
    prefill: worker_pb2.PrefillResponse | None = None


def channel(port: int, host: str = "127.0.0.1") -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"{host}:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])


async def _collect(stream) -> Completion:
    out = Completion()
    async for chunk in stream:
        out.token_ids.extend(chunk.token_ids)
        out.text += chunk.text
        out.finish_reason = chunk.finish_reason
        out.num_prompt_tokens = chunk.num_prompt_tokens
    return out


async def generate_aggregated(stub: worker_pb2_grpc.WorkerStub, req_id: str, prompt_ids: list[int],
                              sampling: worker_pb2.SamplingParams) -> Completion:
    return await _collect(stub.Generate(worker_pb2.GenerateRequest(
        req_id=req_id, prompt_token_ids=prompt_ids, sampling=sampling)))


async def generate_disaggregated(prefill: worker_pb2_grpc.WorkerStub, decode: worker_pb2_grpc.WorkerStub,
                                 backend: str, req_id: str, prompt_ids: list[int],
                                 sampling: worker_pb2.SamplingParams) -> Completion:
    reservation = await decode.ReserveKV(worker_pb2.ReserveKVRequest(
        req_id=req_id, num_prompt_tokens=len(prompt_ids), backend=backend))
    gen = asyncio.ensure_future(_collect(decode.Generate(worker_pb2.GenerateRequest(
        req_id=req_id, prompt_token_ids=prompt_ids, sampling=sampling, remote_prefill=True))))
    try:
        prefill_resp = await prefill.Prefill(worker_pb2.PrefillRequest(
            req_id=req_id, prompt_token_ids=prompt_ids, sampling=sampling, target=reservation.endpoint,
            transfer_id=reservation.transfer_id))
    except BaseException:
        gen.cancel()
        await decode.Abort(worker_pb2.AbortRequest(req_id=req_id, reason="prefill failed"))
        raise
    result = await gen
    result.prefill = prefill_resp
    return result
