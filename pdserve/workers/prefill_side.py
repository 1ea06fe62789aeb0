"""Every prompt a worker computes goes through here, and through the prefill scheduler.

- `compute()`: submit a prompt to the `PrefillRunner` (FlowPrefill by default) with its TTFT
  deadline; each finished layer goes to `on_layer` at once; the first token is sampled from the
  last position. A client that goes away before its prompt started drops it from the queue.
- `prefill_and_send()`: the `Prefill` RPC of a prefill worker. With a TTFT budget it may refuse
  at once (on-demand forwarding: the router offers the request to the next worker and nothing
  was sent); otherwise each layer is handed to a KV sender as soon as it is computed, the
  trailer carries the first token, and the answer waits for the receiver's acknowledgement.
Local (aggregated) prompts call `compute()` and collect the layers for the paged pool.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import grpc

from pdserve import timeline
from pdserve.clock import Clock
from pdserve.kvtransfer import BaseKVAgent, TransferLayout, TransferState, as_bytes_view
from pdserve.v1 import kvtransfer_pb2, logprobs_pb2, worker_pb2
from pdserve.workers.engine import Engine
from pdserve.workers.model.sampling import SamplingConfig, TokenLogprob, sample_token, token_logprob
from pdserve.workers.model.unit_execution import CachedPrefix
from pdserve.workers.prefill_runner import LayerCallback, PrefillRunner, Rejected

log = logging.getLogger("pdserve.worker")
# A transfer's deadline passes without any thread ending it (poll() fails it lazily): a waiter
# polls at least this often.
_WAIT_SLICE_S = 0.5


@dataclass(frozen=True)
class Prefilled:
    first_token_id: int
    compute_s: float
    first_logprob: TokenLogprob | None = None       # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0                          # taken from the prefix cache, not computed


class _LazySender:
    """Creates the KV sender on first use, so a prefill rejected at admission never touches the
    decode worker's armed receiver. Finished layers go out in groups of at least `group_bytes`
    while the prefill runs; the rest waits for `flush()` once it finished. Every send costs the
    compute thread time (posting, and waking the transfer's thread, which then competes with the
    next operator for the interpreter), and a small layer's transfer takes less than that: sent
    alone it delays the first token instead of hiding behind compute, while sent after the
    prefill it adds at most a group's transfer time (benchmarks/layer_groups.py)."""

    def __init__(self, agent: BaseKVAgent, address: bytes, layout: TransferLayout, timeout_s: float, checksum: bool,
                 skip_tokens: int = 0, group_bytes: int = 0):
        self._args = (address, layout, timeout_s, checksum)
        self._skip_tokens = skip_tokens     # the receiver holds these already (its prefix cache)
        self._group_bytes = group_bytes
        self._held: list[tuple[int, memoryview]] = []
        self._held_bytes = 0
        self._agent = agent
        self._sender = None
        self._closed = False
        self._lock = threading.Lock()
        self.kv_bytes = 0

    def get(self):
        with self._lock:
            if self._sender is None:
                self._sender = self._agent.create_sender(*self._args)
            return self._sender

    def send_layer(self, layer: int, kv) -> None:    # compute thread
        if self._skip_tokens:
            kv = kv[:, self._skip_tokens:].contiguous()
        view = as_bytes_view(kv.numpy())
        with self._lock:
            # A request that ended (cancelled while its operator still ran) sends nothing more: a
            # sender created now would wait for layers that never come until its deadline.
            if self._closed:
                return
            self._held.append((layer, view))
            self._held_bytes += len(view)
            if self._held_bytes < self._group_bytes:
                return
        self.flush()

    def flush(self) -> None:
        """Send the layers held back, if any (the prefill finished, or a group is complete)."""
        with self._lock:
            if self._closed or not self._held:
                return
            group, self._held, self._held_bytes = self._held, [], 0
            if self._sender is None:
                self._sender = self._agent.create_sender(*self._args)
            sender = self._sender
        for index, buf in group:
            self.kv_bytes += len(buf)
            sender.send_layer(index, buf)

    def abort_if_active(self, reason: str) -> None:
        with self._lock:
            self._closed = True
            sender = self._sender
        if sender is not None and sender.poll() in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING):
            sender.abort(reason)


async def wait_transfer(end) -> TransferState:
    """Wait for a sender or receiver to finish without blocking the event loop. The backend's
    thread wakes the loop directly when the transfer ends: a wait on its threading.Event in the
    default executor held one of its few threads for each transfer in flight (6 on a 2-core
    host), so under concurrency finished transfers queued behind unfinished ones' waits."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_resolve, ended)
        except RuntimeError:
            pass            # the loop closed meanwhile: nobody waits any more
    end.status.add_finish_callback(wake)
    while end.poll() in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING):
        await asyncio.wait({ended}, timeout=_WAIT_SLICE_S)
    return end.poll()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class PrefillSide:
    def __init__(self, runner: PrefillRunner, engine: Engine, agents: dict[str, BaseKVAgent], clock: Clock, *,
                 transfer_timeout_s: float, checksum: bool, default_ttft_slo_ms: float,
                 max_prefill_wait_s: float = 30.0, run_compute=None, send_group_bytes: int = 0):
        self.runner = runner
        self._send_group_bytes = send_group_bytes
        self._run = run_compute     # the engine's compute thread (owner of the paged pool)
        self.engine = engine
        self.agents = agents
        self.clock = clock
        self._transfer_timeout_s = transfer_timeout_s
        self._checksum = checksum
        self.default_ttft_slo_ms = default_ttft_slo_ms
        self.max_prefill_wait_s = max_prefill_wait_s
        self._stores: set[asyncio.Task] = set()     # prompts being copied into the prefix cache

    @property
    def num_preemptions(self) -> int:
        return len(self.runner.stats.preemption_latencies_s)

    async def compute(self, req_id: str, prompt_ids: list[int], params: SamplingConfig, ttft_slo_ms: float,
                      on_layer: LayerCallback, admission_budget_s: float, first_output_index: int = 0,
                      prefix: CachedPrefix | None = None) -> Prefilled:
        """Raises Rejected when the queue is full or the scheduler predicts the prompt cannot
        finish within `admission_budget_s`. `first_output_index`: which output token the sampled
        one is (non-zero after a migration). `prefix`: a cached prefix's KV, in buffers for the
        prompt; ignored when the request wants prompt logprobs (they need every position computed)."""
        started = self.clock.now_s()
        deadline_s = started + (ttft_slo_ms or self.default_ttft_slo_ms) / 1e3
        if params.prompt_logprobs:
            prefix = None
        future = self.runner.submit(req_id, prompt_ids, deadline_s, on_layer,
                                    admission_deadline_s=started + admission_budget_s,
                                    prompt_top=params.logprobs if params.prompt_logprobs else None,
                                    prefix=prefix)
        try:
            state = await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if self.runner.cancel(req_id):
                log.info("request %s: prefill cancelled (client went away)", req_id)
            raise
        token = sample_token(state.logits, params, first_output_index, self.engine.config.eos_token_ids)
        first_logprob = None if params.logprobs is None else token_logprob(state.logits, token, params.logprobs)
        return Prefilled(token, self.clock.now_s() - started, first_logprob,
                         state.prompt_logprobs if params.prompt_logprobs else None,
                         0 if prefix is None else prefix.num_tokens)

    def admission_budget_s(self, ttft_slo_ms: float) -> float:
        """A request with a TTFT SLO must be able to meet it here (else on-demand forwarding
        offers it elsewhere); any other may wait up to `max_prefill_wait_s`, so overload gets
        a quick refusal instead of an unbounded queue."""
        return ttft_slo_ms / 1e3 if ttft_slo_ms > 0 else self.max_prefill_wait_s

    async def prefill_and_send(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillResponse:
        agent = self.agents.get(request.target.backend)
        if agent is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"backend {request.target.backend!r} not served here")
        if problem := agent.check_peer_address(request.target.address):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        timeline.mark("prefill.received", request.req_id)
        ids = list(request.prompt_token_ids)
        params = await checked_params(self.engine, ids, request.sampling, context)
        skip = request.skip_kv_tokens
        if skip >= len(ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"skip_kv_tokens={skip} must leave part of the "
                                f"{len(ids)}-token prompt to send")
        layout = TransferLayout(request.transfer_id, self.engine.layer_nbytes(len(ids) - skip), request.transfer_token)
        link = _LazySender(agent, request.target.address, layout, self._transfer_timeout_s, self._checksum, skip,
                           self._send_group_bytes)
        layers: list = [None] * self.engine.config.num_layers

        def on_layer(layer: int, kv) -> None:
            layers[layer] = kv
            link.send_layer(layer, kv)
        try:
            try:
                prefix = (await self._run(self.engine.lookup_prefix, ids)
                          if self.engine.allocator.prefix_caching else None)
                timeline.mark("prefill.prefix_looked_up", request.req_id)
                result = await self.compute(request.req_id, ids, params, request.ttft_slo_ms, on_layer,
                                            admission_budget_s=self.admission_budget_s(request.ttft_slo_ms),
                                            first_output_index=len(request.resume_output_token_ids),
                                            prefix=prefix)
            except Rejected as exc:
                # Nothing was sent: the decode worker's receiver stays armed for another prefill worker.
                log.info("request %s: rejected for on-demand forwarding: %s", request.req_id, exc)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill rejected: {exc}")
            timeline.mark("prefill.computed", request.req_id)
            if self.engine.allocator.prefix_caching:
                # Queued on the compute thread before the trailer goes: the request can end at
                # the client before this reply does, and the client's next prompt must find these
                # blocks (its lookup queues behind the store).
                self._store_later(ids, layers)
            link.flush()
            sender = link.get()
            trailer = kvtransfer_pb2.PrefillTrailer(req_id=request.req_id, first_token_id=result.first_token_id,
                                                    num_prompt_tokens=len(ids), prefill_ms=result.compute_s * 1e3,
                                                    kv_bytes=link.kv_bytes, num_cached_tokens=result.cached_tokens)
            if result.first_logprob is not None:
                trailer.first_token_logprob.CopyFrom(logprob_to_proto(result.first_logprob))
            trailer.prompt_logprobs.extend(logprob_to_proto(lp) for lp in result.prompt_logprobs or ())
            sender.finish(trailer.SerializeToString())
            tail_start = self.clock.now_s()
            timeline.mark("prefill.trailer_sent", request.req_id)
            if await wait_transfer(sender) is TransferState.FAILED:
                log.warning("request %s: KV transfer failed: %s", request.req_id, sender.failure())
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {sender.failure()}")
            tail_ms = (self.clock.now_s() - tail_start) * 1e3
            timeline.mark("prefill.acked", request.req_id)
            log.info("request %s: prefilled %d tokens (%d cached) in %.1f ms, sent %d KV bytes (%d tokens held "
                     "by the receiver)", request.req_id, len(ids), result.cached_tokens, result.compute_s * 1e3,
                     link.kv_bytes, skip)
            return worker_pb2.PrefillResponse(
                req_id=request.req_id, first_token_id=result.first_token_id, prefill_ms=result.compute_s * 1e3,
                kv_bytes=link.kv_bytes, transfer_tail_ms=tail_ms, num_cached_tokens=result.cached_tokens)
        finally:
            link.abort_if_active("prefill request ended")


    def _store_later(self, ids: list[int], layers: list) -> None:
        """Keep the prompt's blocks for later prompts; neither the trailer nor the reply waits for
        the copy. A prompt whose transfer then fails is kept too: its KV is computed and correct."""
        async def store() -> None:
            try:
                await self._run(self.engine.store_prefix, ids, layers)
            except Exception:
                log.exception("keeping a prefilled prompt in the prefix cache failed")
        task = asyncio.ensure_future(store())
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def drain_stores(self) -> None:
        """Wait for cache stores still running (tests, shutdown)."""
        while self._stores:
            await asyncio.gather(*list(self._stores), return_exceptions=True)


def sampling_from_proto(p: worker_pb2.SamplingParams) -> SamplingConfig:
    return SamplingConfig(max_tokens=p.max_tokens or 16, temperature=p.temperature,
                          top_p=p.top_p if p.top_p > 0 else 1.0,
                          seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop),
                          ignore_eos=p.ignore_eos, min_tokens=p.min_tokens,
                          logprobs=p.logprobs if p.HasField("logprobs") else None,
                          prompt_logprobs=p.prompt_logprobs)


def logprob_to_proto(lp: TokenLogprob) -> logprobs_pb2.TokenLogprob:
    return logprobs_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                     top=[logprobs_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_proto(p: logprobs_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(p.token_id, p.logprob, tuple((t.token_id, t.logprob) for t in p.top))


async def checked_params(engine: Engine, prompt_ids: list[int], sampling: worker_pb2.SamplingParams,
                         context) -> SamplingConfig:
    """Validated sampling parameters, or INVALID_ARGUMENT saying what is wrong."""
    params = sampling_from_proto(sampling)
    try:
        engine.check_prompt(len(prompt_ids), params)
        vocab = engine.config.vocab_size
        if any(t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be < vocab size {vocab}")
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return params
