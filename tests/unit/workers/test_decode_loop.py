"""The decode loop's pause hook (`diagnostics.decode_pause_file`), which fault tests use to hold
requests in flight after their first token (tests/faults/test_overload.py runs it in real
processes): while the file exists no decode step runs, and once it is gone the requests finish
with the tokens they would have had."""
import asyncio

import grpc

from pdserve.v1 import worker_pb2
from tests.conftest import assert_no_leaks_async, eventually
from tests.inprocess import worker_cluster
from tests.routing import route

PROMPT = list(b"The quick brown fox jumps over the lazy dog. " * 4)


def test_no_decode_step_runs_while_the_pause_file_exists(model_cache_dir, tmp_path):
    pause = tmp_path / "paused"

    async def body():
        async with worker_cluster(model_cache_dir, roles=("prefill", "decode"),
                                  decode_pause_file=str(pause)) as (services, (p, d)):
            params = worker_pb2.SamplingParams(max_tokens=6, ignore_eos=True)
            ref = await route([p, d], "ref", PROMPT, params, backend="fake")
            decode = services[1]
            steps, checks, held = [], [], asyncio.Event()
            real_step, real_paused = decode.engine.step, decode.decode_loop.paused
            decode.engine.step = lambda: steps.append(1) or real_step()

            def paused() -> bool:       # the loop asked with the request in its batch
                checks.append(1)
                if len(checks) >= 3:
                    held.set()
                return real_paused()
            decode.decode_loop.paused = paused
            pause.touch()
            reservation = await d.ReserveKV(worker_pb2.ReserveKVRequest(
                req_id="h", num_prompt_tokens=len(PROMPT), prompt_token_ids=PROMPT, backend="fake"))
            call = d.Generate(worker_pb2.GenerateRequest(req_id="h", prompt_token_ids=PROMPT, remote_prefill=True,
                                                         sampling=params))
            await p.Prefill(worker_pb2.PrefillRequest(
                req_id="h", prompt_token_ids=PROMPT, sampling=params, target=reservation.endpoint,
                transfer_id=reservation.transfer_id, transfer_token=reservation.transfer_token))
            first = await asyncio.wait_for(call.read(), 60)        # the prefill's token needs no step
            await asyncio.wait_for(held.wait(), 60)
            assert steps == [] and decode.engine.running, "a step ran while paused"
            pause.unlink()
            chunks = [first]
            while (chunk := await asyncio.wait_for(call.read(), 60)) is not grpc.aio.EOF:
                chunks.append(chunk)
            assert steps
            assert [t for c in chunks for t in c.token_ids] == ref.token_ids
            for svc in services:
                await assert_no_leaks_async(allocator=svc.engine.allocator, agents=svc.agents.values())
                assert await eventually(lambda: len(svc.requests) == 0)
    asyncio.run(body())
