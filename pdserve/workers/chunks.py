"""What a Generate stream sends: a TokenChunk per delta, the first one carrying what the prefill
computed (its logprobs, and a remote prefill's figures from the KV transfer's trailer)."""
from __future__ import annotations

from pdserve.v1 import kvtransfer_pb2, worker_pb2
from pdserve.workers.model.sampling import TokenLogprob
from pdserve.workers.output import Delta, Finish
from pdserve.workers.prefill_side import logprob_to_proto

_FINISH = {None: worker_pb2.FINISH_REASON_UNSPECIFIED, Finish.STOP: worker_pb2.FINISH_REASON_STOP,
           Finish.LENGTH: worker_pb2.FINISH_REASON_LENGTH, Finish.ABORT: worker_pb2.FINISH_REASON_ABORT}


def token_chunk(req_id: str, delta: Delta, num_prompt: int, num_generated: int) -> worker_pb2.TokenChunk:
    return worker_pb2.TokenChunk(req_id=req_id, token_ids=delta.token_ids, text=delta.text,
                                 finish_reason=_FINISH[delta.finish], num_prompt_tokens=num_prompt,
                                 num_generated_tokens=num_generated,
                                 logprobs=[logprob_to_proto(lp) for lp in delta.logprobs],
                                 prompt_logprobs=[logprob_to_proto(lp) for lp in delta.prompt_logprobs],
                                 num_cached_tokens=delta.num_cached_tokens)


def with_logprobs(first: Delta, first_logprob: TokenLogprob | None, prompt: list[TokenLogprob]) -> Delta:
    """The first token's delta, with the logprobs the prefill computed (the decode loop adds the
    rest as it samples)."""
    if first_logprob is not None and first.token_ids:
        first.logprobs = [first_logprob]
    first.prompt_logprobs = prompt
    return first


def with_prefill_figures(chunk: worker_pb2.TokenChunk, trailer: kvtransfer_pb2.PrefillTrailer) -> None:
    """A remote prefill's figures (usage, metrics) on the request's first chunk: they come with the
    KV, so nobody waits for the prefill worker's reply to report them."""
    chunk.kv_transfer_bytes = trailer.kv_bytes
    chunk.prefill_ms = trailer.prefill_ms
    chunk.num_cached_tokens = trailer.num_cached_tokens
