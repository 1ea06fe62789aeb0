"""gRPC adapter of a model worker (any role: prefill, decode, aggregated).

A request's path through one worker:
- Generate(remote_prefill=false): admit (blocks) -> prompt through the prefill scheduler
  (prefill_side.py) -> KV into the paged pool -> join the decode batch -> stream;
- ReserveKV then Generate(remote_prefill=true): blocks + staging + armed receiver -> wait for the
  transfer -> import (staging dropped) -> join the batch -> stream;
- Prefill: prompt through the prefill scheduler, each layer's KV sent as it is ready.
Every request's KV is owned by `RequestLifecycle` (lifecycle.py), which releases it exactly once
whatever the exit. Engine work runs on one compute thread; the decode loop (decode_loop.py) steps
the engine while it has work, and a separate reaper frees reservations whose lease ran out, busy
or not.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets

import grpc

from pdserve import timeline
from pdserve.clock import Clock
from pdserve.kvtransfer import (MAX_TRANSFER_ID, BaseKVAgent, TransferLayout, TransferState, as_bytes_view,
                               new_token)
from pdserve.policy.cost_model import CalibratedCostModel
from pdserve.policy.registry import Role
from pdserve.proto_maps import ROLE_FROM_PROTO, ROLE_TO_PROTO
from pdserve.v1 import kvtransfer_pb2, worker_pb2, worker_pb2_grpc
from pdserve.workers.chunks import token_chunk, with_logprobs, with_prefill_figures
from pdserve.workers.decode_loop import IDLE_WAIT_S, DecodeLoop
from pdserve.workers.engine import Engine
from pdserve.workers.kv_cache import OutOfKVBlocks
from pdserve.workers.lifecycle import RequestGone, RequestLifecycle, Stage
from pdserve.workers.model.sampling import SamplingConfig
from pdserve.workers.output import Delta, Finish
from pdserve.workers.prefill_runner import PrefillRunner, Rejected
from pdserve.workers.prefill_side import PrefillSide, checked_params, logprob_from_proto, wait_transfer

log = logging.getLogger("pdserve.worker")



# Why a request could not be admitted (a reservation or a local prompt): the status that says so.
# ValueError: the id is taken.
_ADMISSION_CODES = ((RequestGone, grpc.StatusCode.ABORTED), (OutOfKVBlocks, grpc.StatusCode.RESOURCE_EXHAUSTED),
                    (ValueError, grpc.StatusCode.ALREADY_EXISTS))
_ADMISSION_REFUSALS = tuple(kind for kind, _ in _ADMISSION_CODES)


async def _refuse_admission(context, exc: Exception) -> None:
    await context.abort(next(code for kind, code in _ADMISSION_CODES if isinstance(exc, kind)), str(exc))


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, agents: dict[str, BaseKVAgent], clock: Clock, *, worker_id: str,
                 role: str, transfer_timeout_s: float, lease_s: float, checksum: bool,
                 prefill_runner: PrefillRunner, default_ttft_slo_ms: float = 2000.0,
                 max_prefill_wait_s: float = 30.0, send_group_bytes: int = 0, decode_pause_file: str = ""):
        self.engine = engine
        self.agents = agents
        self.clock = clock
        self.worker_id = worker_id
        self.instance_id = secrets.token_hex(16)    # this process: the router binds worker_id to it
        self.role = Role(role)
        self._lease_s = lease_s
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._streams: dict[str, asyncio.Queue] = {}
        self.decode_loop = DecodeLoop(engine, self._run, clock, self._to_stream, decode_pause_file)
        self.requests = RequestLifecycle(engine, self._run, clock, lease_s, on_release=self.decode_loop.wake)
        self.prefill = PrefillSide(prefill_runner, engine, agents, clock, transfer_timeout_s=transfer_timeout_s,
                                   checksum=checksum, default_ttft_slo_ms=default_ttft_slo_ms,
                                   max_prefill_wait_s=max_prefill_wait_s, run_compute=self._run,
                                   send_group_bytes=send_group_bytes)
        # Random start so transfer ids from a restarted worker do not collide with stale ones.
        # Random, not sequential: a transfer id is the capability a KV sender must present, so
        # nobody can guess another request's (48 bits: what the UCX tag layout leaves).
        self._new_transfer_id = lambda: secrets.randbelow(MAX_TRANSFER_ID) + 1
        self._tasks: list[asyncio.Task] = []
        self._closing: set[asyncio.Task] = set()     # answered streams still importing or releasing
        self._compute_stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.decode_loop.run()), asyncio.create_task(self._reap_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.prefill.runner.stop()
        await self.settled()
        self._stopping = True
        await asyncio.to_thread(self._compute.shutdown, True, cancel_futures=True)
        self._compute_stopped.set()
        for agent in self.agents.values():
            agent.close()

    @property
    def has_work(self) -> bool:
        """Requests holding KV here, prompts in (or queued for) the prefill scheduler, or KV still
        being sent."""
        return (len(self.requests) > 0 or self.prefill.runner.num_pending > 0
                or any(a.num_active_transfers() for a in self.agents.values()))

    @property
    def num_reservations(self) -> int:
        """KV reservations whose transfer or Generate call has not finished yet."""
        return self.requests.num_in(Stage.RESERVED) + self.requests.num_in(Stage.RECEIVING)

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)
        except RuntimeError:
            if not self._stopping:
                raise
            # Shutting down: calls cancelled by the server stop still release their KV, here,
            # once the compute thread has finished (nothing is left to race with).
            await self._compute_stopped.wait()
            return fn(*args)

    # ---- info ----
    async def GetInfo(self, request, context):
        # An answered stream's release is not waited for by its caller, but is by anyone looking
        # at the pool; a health check is not, and must not wait behind a long decode step.
        if not request.liveness_only:
            await self.settled()
        alloc = self.engine.allocator
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, role=ROLE_TO_PROTO[self.role], model=self.engine.loaded.name,
            kv_endpoints=[worker_pb2.KVEndpoint(backend=b, address=a.address()) for b, a in self.agents.items()],
            num_free_kv_blocks=alloc.num_free_blocks, num_total_kv_blocks=alloc.num_blocks,
            num_active_requests=len(self.requests), kv_block_size_tokens=alloc.block_size_tokens,
            max_model_len_tokens=self.engine.config.max_position_tokens,
            num_pending_transfers=sum(a.num_active_transfers() for a in self.agents.values()),
            instance_id=self.instance_id, prefix_cache=self.prefix_cache_stats(),
            num_preemptions=self.prefill.num_preemptions, **self._measured())

    async def drain_prefix_events(self, snapshot: bool = False) -> tuple[list[int], list[int], bool]:
        """Prefix blocks stored and evicted since the last call (for the router's index)."""
        if not self.engine.allocator.prefix_caching:
            return [], [], False
        return self.engine.drain_prefix_events(snapshot)

    def prefix_cache_stats(self) -> worker_pb2.PrefixCacheStats:
        alloc = self.engine.allocator
        st = alloc.stats
        return worker_pb2.PrefixCacheStats(
            enabled=alloc.prefix_caching, query_tokens=st.query_tokens, hit_tokens=st.hit_tokens,
            query_blocks=st.query_blocks, hit_blocks=st.hit_blocks, evictions=st.evictions,
            num_cached_blocks=alloc.num_cached_blocks)

    def _measured(self) -> dict:
        fit = self.decode_loop.fit.fit()
        out = {"num_decode_steps": self.decode_loop.fit.n}
        if fit is not None:
            out.update(measured_decode_step_base_s=fit[0], measured_decode_step_per_seq_s=fit[1])
        cost = self.prefill.runner.scheduler.cost_model
        if isinstance(cost, CalibratedCostModel):
            out["prefill_cost_scale"] = (cost.scale["attention"] + cost.scale["mlp"]) / 2
        return out

    # ---- decode side of disaggregation ----
    async def ReserveKV(self, request, context):
        agent = self.agents.get(request.backend)
        if agent is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"backend {request.backend!r} not served here; have {sorted(self.agents)}")
        if not request.req_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "req_id is required")
        prompt_ids = list(request.prompt_token_ids) or None
        try:
            self.engine.check_prompt(request.num_prompt_tokens, SamplingConfig())
            if prompt_ids is not None:
                self._check_prompt_ids(prompt_ids, request.num_prompt_tokens)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        transfer_id, token = self._new_transfer_id(), new_token()
        timeline.mark("decode.reserve_received", request.req_id)

        def arm(req):   # the transfer carries only what the prefix cache does not hold
            layout = TransferLayout(transfer_id, self.engine.layer_nbytes(req.num_prompt_tokens - req.cached_tokens),
                                    token)
            return agent.create_receiver(layout, as_bytes_view(req.staging.numpy()), self._lease_s)
        try:
            req = await self.requests.reserve(request.req_id, request.num_prompt_tokens, arm, prompt_ids)
        except _ADMISSION_REFUSALS as exc:
            await _refuse_admission(context, exc)
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s <= 0:
            # Handled after the caller's deadline: nobody will claim it (the caller also aborts).
            await self.requests.drop_unclaimed(request.req_id, "ReserveKV past its deadline")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "reservation made after the call's deadline")
        timeline.mark("decode.reserve_answered", request.req_id)
        return worker_pb2.ReserveKVResponse(
            endpoint=worker_pb2.KVEndpoint(backend=request.backend, address=agent.address()),
            transfer_id=transfer_id, lease_s=self._lease_s, transfer_token=token, num_cached_tokens=req.cached_tokens)

    def _check_prompt_ids(self, prompt_ids: list[int], num_prompt_tokens: int) -> None:
        if len(prompt_ids) != num_prompt_tokens:
            raise ValueError(f"{len(prompt_ids)} prompt_token_ids given for num_prompt_tokens={num_prompt_tokens}")
        vocab = self.engine.config.vocab_size
        if any(t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be < vocab size {vocab}")

    async def _receive(self, req, prompt_ids: list[int], resume: list[int], params,
                       context) -> tuple[Delta, asyncio.Future, kvtransfer_pb2.PrefillTrailer]:
        """Wait for a claimed reservation's KV; return the first delta, the import of the KV into
        the pool, under way on the compute thread, and the transfer's trailer. The first token came
        with the KV (the trailer) and needs none of it, so it is streamed without waiting for the
        import, or for the decode step the compute thread may be running when the KV arrives."""
        rx = req.receiver
        if req.num_prompt_tokens != len(prompt_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt has {len(prompt_ids)} tokens, "
                                f"reservation was for {req.num_prompt_tokens}")
        if req.prompt_ids is not None and req.prompt_ids != prompt_ids:
            # Its cached blocks were matched against the reserved prompt: another one would decode
            # from the wrong KV.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt differs from the one reserved")
        if await wait_transfer(rx) is TransferState.FAILED:
            log.warning("request %s: KV transfer failed: %s", req.req_id, rx.failure())
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {rx.failure()}")
        timeline.mark("decode.kv_arrived", req.req_id)
        trailer = kvtransfer_pb2.PrefillTrailer.FromString(rx.trailer)
        if trailer.req_id != req.req_id:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"KV transfer carried request {trailer.req_id!r}, expected {req.req_id!r}")
        output, delta = self.engine.first_output(prompt_ids, params, trailer.first_token_id, resume)
        importing = asyncio.ensure_future(self._import(req, prompt_ids, params, trailer.first_token_id, resume,
                                                       (output, delta)))
        first = logprob_from_proto(trailer.first_token_logprob) if trailer.HasField("first_token_logprob") else None
        delta = with_logprobs(delta, first, [logprob_from_proto(p) for p in trailer.prompt_logprobs])
        return delta, importing, trailer

    async def _import(self, req, prompt_ids: list[int], params, first_token_id: int, resume: list[int], first) -> None:
        await self.requests.start(req, prompt_ids, req.staging, params, first_token_id, resume,
                                  layers_start_tokens=req.cached_tokens, first=first)
        timeline.mark("decode.kv_imported", req.req_id)

    async def _prefill_local(self, req, prompt_ids: list[int], resume: list[int], params, ttft_slo_ms: float,
                             context) -> Delta:
        layers: list = [None] * self.engine.config.num_layers
        # No other worker to forward to: FlowPrefill orders by the SLO but refuses only overload.
        prefix = (await self._run(self.engine.cached_prefix, req.req_id, len(prompt_ids))
                  if req.cached_tokens else None)
        try:
            result = await self.prefill.compute(req.req_id, prompt_ids, params, ttft_slo_ms, layers.__setitem__,
                                                admission_budget_s=self.prefill.max_prefill_wait_s,
                                                first_output_index=len(resume), prefix=prefix)
        except Rejected as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill refused: {exc}")
        delta = await self.requests.start(req, prompt_ids, layers, params, result.first_token_id, resume)
        delta.num_cached_tokens = result.cached_tokens
        return with_logprobs(delta, result.first_logprob, result.prompt_logprobs or [])

    # ---- generation ----
    async def Generate(self, request, context):
        req_id, prompt_ids = request.req_id, list(request.prompt_token_ids)
        resume = list(request.resume_output_token_ids)
        if not req_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "req_id is required")
        if req_id in self._streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req_id!r} is already running")
        queue = self._streams[req_id] = asyncio.Queue()
        timeline.mark("decode.generate_received", req_id)
        held, reason = None, "request ended"     # held: the request this call owns and must release
        answered = False
        importing = None        # a remote prefill's KV import, finished after its first chunk went out
        trailer = None          # a remote prefill's figures, for its first chunk
        try:
            params = await self._params_or_drop(request, prompt_ids, context)
            if request.remote_prefill:
                held = self.requests.claim(req_id)
                if held is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown request id {req_id!r}: call ReserveKV first")
                delta, importing, trailer = await self._receive(held, prompt_ids, resume, params, context)
            else:
                held = await self._admit_local(req_id, prompt_ids, context)
                delta = await self._prefill_local(held, prompt_ids, resume, params, request.ttft_slo_ms, context)
                self.decode_loop.wake()
            num_generated, num_prompt_tokens = len(resume), len(prompt_ids) - len(resume)
            while True:
                num_generated += len(delta.token_ids)
                timeline.mark("decode.chunk", req_id)
                chunk = token_chunk(req_id, delta, num_prompt_tokens, num_generated)
                if trailer is not None:
                    with_prefill_figures(chunk, trailer)
                    trailer = None
                yield chunk
                if delta.finish is not None:
                    reason, answered = f"finished ({delta.finish.value}, {num_generated} tokens)", True
                    return
                if importing is not None:
                    await importing
                    importing = None
                    self.decode_loop.wake()
                delta = await queue.get()
        except asyncio.CancelledError:
            reason = "cancelled by the caller"
            raise
        except BaseException as exc:
            reason = f"failed: {exc}"
            raise
        finally:
            self._streams.pop(req_id, None)
            if answered and held is not None:
                self._close_later(importing, req_id, reason)
                importing = held = None
            if importing is not None:
                # Not started: it never will be. Running on the compute thread: the release
                # below is queued behind it there, so it frees what the import linked. Its
                # failure, if any, went with the stream: nothing is left to report.
                importing.cancel()
                importing.add_done_callback(lambda task: task.cancelled() or task.exception())
            if held is not None:
                await self.requests.release(req_id, reason)

    def _close_later(self, importing: asyncio.Future | None, req_id: str, reason: str) -> None:
        """An answered request's stream ends at once; its import (a one-token answer's, which keeps
        the prompt's blocks for reuse; it queues on the compute thread behind any decode step) and
        then its release finish here."""
        async def close() -> None:
            if importing is not None:
                try:
                    await importing
                except Exception:
                    log.exception("request %s: importing the KV of an answered request failed", req_id)
            await self.requests.release(req_id, reason)
        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def settled(self) -> None:
        """Wait for the imports and releases of the requests answered so far (GetInfo, shutdown),
        not for later ones: under load those never stop coming."""
        if self._closing:
            await asyncio.wait(list(self._closing))

    async def _params_or_drop(self, request, prompt_ids: list[int], context):
        try:
            resume = list(request.resume_output_token_ids)
            if resume and (len(resume) >= len(prompt_ids) or prompt_ids[-len(resume):] != resume):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "resume_output_token_ids must end the prompt and leave a prompt before them")
            return await checked_params(self.engine, prompt_ids, request.sampling, context)
        except BaseException:
            if request.remote_prefill:   # a rejected decode request must not hold its reservation
                await self.requests.drop_unclaimed(request.req_id, "request rejected")
            raise

    async def _admit_local(self, req_id: str, prompt_ids: list[int], context):
        try:
            return self.requests.admit_local(req_id, prompt_ids)
        except _ADMISSION_REFUSALS as exc:
            await _refuse_admission(context, exc)

    def _to_stream(self, req_id: str, delta: Delta) -> None:
        stream = self._streams.get(req_id)
        if stream is not None:
            stream.put_nowait(delta)

    async def _reap_loop(self) -> None:
        """Reservations nobody claims are freed within the lease plus one interval, however busy
        the decode loop is (it runs on its own timer, not between decode steps)."""
        interval_s = min(IDLE_WAIT_S, self._lease_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.requests.release_expired()
            except Exception:
                log.exception("reaping expired reservations failed")

    # ---- prefill side ----
    async def Prefill(self, request, context):
        return await self.prefill.prefill_and_send(request, context)

    async def SetRole(self, request, context):
        role = ROLE_FROM_PROTO.get(request.role)
        if role not in (Role.PREFILL, Role.DECODE):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be PREFILL or DECODE")
        log.info("role %s -> %s", self.role.value, role.value)
        self.role = role   # every worker can serve both roles; the label tells the router which it has
        return await self.GetInfo(worker_pb2.GetInfoRequest(), context)

    async def Abort(self, request, context):
        reason = request.reason or "aborted by client"
        found = request.req_id in self.requests
        stream = self._streams.get(request.req_id)
        if stream is None:
            if not await self.requests.release(request.req_id, reason):
                self.requests.remember_abort(request.req_id)
        else:   # its Generate ends (a KV wait fails at once) and releases in its own `finally`
            self.requests.abort_transfer(request.req_id, reason)
            stream.put_nowait(Delta([], "", Finish.ABORT))
        return worker_pb2.AbortResponse(found=found)

