"""gRPC adapter of a model worker (any role: prefill, decode, aggregated).

All engine work runs on one compute thread, in arrival order; the asyncio side only converts
protobuf to engine calls, waits on KV transfers and streams tokens. A request's lifecycle:
- Generate(remote_prefill=false): admit -> prefill locally -> join the decode batch -> stream;
- ReserveKV then Generate(remote_prefill=true): blocks + staging + armed receiver -> wait for the
  transfer -> import -> join the batch -> stream; a reservation nobody claims expires (lease);
- Prefill: compute layer by layer, sending each layer's KV as it is ready; answer with the first
  token once the receiver has acknowledged everything.
A client that goes away cancels its Generate; the `finally` blocks free its KV on this worker.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import random
import threading
from dataclasses import dataclass

import grpc

from pdserve.clock import Clock
from pdserve.kvtransfer import BaseKVAgent, TransferLayout, TransferState, as_bytes_view
from pdserve.policy.cost_model import CalibratedCostModel
from pdserve.policy.online_fit import OnlineLinearFit
from pdserve.workers.engine import Engine, PrefillResult, Reservation
from pdserve.workers.kv_cache import OutOfKVBlocks
from pdserve.workers.model.sampling import SamplingConfig, sample_token
from pdserve.workers.prefill_runner import PrefillRunner, Rejected
from pdserve.workers.output import Delta, Finish
from pdserve.v1 import kvtransfer_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("pdserve.worker")

_FINISH = {None: worker_pb2.FINISH_REASON_UNSPECIFIED, Finish.STOP: worker_pb2.FINISH_REASON_STOP,
           Finish.LENGTH: worker_pb2.FINISH_REASON_LENGTH, Finish.ABORT: worker_pb2.FINISH_REASON_ABORT}
_ROLES = {"prefill": worker_pb2.WORKER_ROLE_PREFILL, "decode": worker_pb2.WORKER_ROLE_DECODE,
          "aggregated": worker_pb2.WORKER_ROLE_AGGREGATED}
_REAP_INTERVAL_S = 0.5


def sampling_from_proto(p: worker_pb2.SamplingParams) -> SamplingConfig:
    return SamplingConfig(max_tokens=p.max_tokens or 16, temperature=p.temperature,
                          top_p=p.top_p if p.top_p > 0 else 1.0,
                          seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop),
                          ignore_eos=p.ignore_eos)


@dataclass
class _Pending:
    reservation: Reservation
    receiver: object
    created_s: float
    claimed: bool = False


class _LazySender:
    """Creates the KV sender on first use (the first finished layer), so a prefill rejected at
    admission never touches the decode worker's armed receiver."""

    def __init__(self, agent: BaseKVAgent, address: bytes, layout: TransferLayout, timeout_s: float, checksum: bool):
        self._args = (address, layout, timeout_s, checksum)
        self._agent = agent
        self._sender = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._sender is None:
                self._sender = self._agent.create_sender(*self._args)
            return self._sender

    def abort_if_active(self, reason: str) -> None:
        sender = self._sender
        if sender is not None and sender.poll() in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING):
            sender.abort(reason)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, agents: dict[str, BaseKVAgent], clock: Clock, *, worker_id: str,
                 role: str, transfer_timeout_s: float, lease_s: float, checksum: bool,
                 prefill_runner: PrefillRunner | None = None, default_ttft_slo_ms: float = 2000.0):
        self.engine = engine
        self.agents = agents
        self.clock = clock
        self.worker_id = worker_id
        self.role = role
        self._transfer_timeout_s = transfer_timeout_s
        self._lease_s = lease_s
        self._checksum = checksum
        self._prefill_runner = prefill_runner
        self._default_ttft_slo_ms = default_ttft_slo_ms
        self.decode_fit = OnlineLinearFit()
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._pending: dict[str, _Pending] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._wakeup = asyncio.Event()
        # Random start so transfer ids from a restarted worker do not collide with stale ones.
        self._transfer_ids = itertools.count(random.getrandbits(40))
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._decode_loop())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        if self._prefill_runner is not None:
            self._prefill_runner.stop()
        for agent in self.agents.values():
            agent.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    @property
    def num_reservations(self) -> int:
        """KV reservations whose transfer or Generate call has not finished yet."""
        return len(self._pending)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    # ---- info ----
    async def GetInfo(self, request, context):
        alloc = self.engine.allocator
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, role=_ROLES[self.role], model=self.engine.loaded.name,
            kv_endpoints=[worker_pb2.KVEndpoint(backend=b, address=a.address()) for b, a in self.agents.items()],
            num_free_kv_blocks=alloc.num_free_blocks, num_total_kv_blocks=alloc.num_blocks,
            num_active_requests=len(self.engine.running) + len(self._pending),
            kv_block_size_tokens=alloc.block_size_tokens,
            max_model_len_tokens=self.engine.config.max_position_tokens,
            num_pending_transfers=sum(a.num_active_transfers() for a in self.agents.values()),
            **self._measured())

    def _measured(self) -> dict:
        fit = self.decode_fit.fit()
        out = {"num_decode_steps": self.decode_fit.n}
        if fit is not None:
            out.update(measured_decode_step_base_s=fit[0], measured_decode_step_per_seq_s=fit[1])
        cost = self._prefill_runner.scheduler.cost_model if self._prefill_runner else None
        if isinstance(cost, CalibratedCostModel):
            out["prefill_cost_scale"] = (cost.scale["attention"] + cost.scale["mlp"]) / 2
        return out

    # ---- decode side of disaggregation ----
    async def ReserveKV(self, request, context):
        agent = self.agents.get(request.backend)
        if agent is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"backend {request.backend!r} not served here; have {sorted(self.agents)}")
        if not request.req_id or request.req_id in self._pending or request.req_id in self.engine.running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS if request.req_id else
                                grpc.StatusCode.INVALID_ARGUMENT, f"bad or duplicate req_id {request.req_id!r}")
        try:
            self.engine.check_prompt(request.num_prompt_tokens, SamplingConfig())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            res = await self._run(self.engine.reserve, request.req_id, request.num_prompt_tokens)
        except OutOfKVBlocks as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        layout = TransferLayout(next(self._transfer_ids), self.engine.layer_nbytes(res.num_prompt_tokens))
        rx = agent.create_receiver(layout, as_bytes_view(res.staging.numpy()), self._lease_s)
        self._pending[request.req_id] = _Pending(res, rx, self.clock.now_s())
        return worker_pb2.ReserveKVResponse(
            endpoint=worker_pb2.KVEndpoint(backend=request.backend, address=agent.address()),
            transfer_id=layout.transfer_id, lease_s=self._lease_s)

    async def _await_remote_kv(self, req_id: str, num_prompt_tokens: int, context) -> tuple[Reservation, int]:
        pending = self._pending.get(req_id)
        if pending is None or pending.claimed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown request id {req_id!r}: call ReserveKV first")
        pending.claimed = True
        rx = pending.receiver
        try:
            if pending.reservation.num_prompt_tokens != num_prompt_tokens:
                raise ValueError(f"prompt has {num_prompt_tokens} tokens, reservation was for "
                                 f"{pending.reservation.num_prompt_tokens}")
            while rx.poll() in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING):
                await asyncio.to_thread(rx.status.finished.wait, _REAP_INTERVAL_S)
            if rx.poll() is TransferState.FAILED:
                log.warning("request %s: KV transfer failed: %s", req_id, rx.failure())
                raise RuntimeError(f"KV transfer failed: {rx.failure()}")
            trailer = kvtransfer_pb2.PrefillTrailer.FromString(rx.trailer)
            if trailer.req_id != req_id:
                raise RuntimeError(f"KV transfer carried request {trailer.req_id!r}, expected {req_id!r}")
            return pending.reservation, trailer.first_token_id
        except BaseException:
            rx.abort("request ended before its KV arrived")
            await self._run(self.engine.release, req_id)
            raise
        finally:
            self._pending.pop(req_id, None)

    # ---- generation ----
    async def Generate(self, request, context):
        req_id = request.req_id
        try:
            params = await self._checked_params(request, context)
        except BaseException:
            if request.remote_prefill:   # a rejected decode request must not hold its reservation
                await self._drop_reservation(req_id, "request rejected")
            raise
        queue: asyncio.Queue = asyncio.Queue()
        try:
            if request.remote_prefill:
                try:
                    res, first = await self._await_remote_kv(req_id, len(request.prompt_token_ids), context)
                except (ValueError, RuntimeError) as exc:
                    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, ValueError) else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, str(exc))
                self._streams[req_id] = queue
                first_delta = await self._run(self.engine.start_remote, res, params, first)
            else:
                self._streams[req_id] = queue
                try:
                    first_delta = await self._run(self.engine.start_local, req_id, list(request.prompt_token_ids),
                                                  params)
                except OutOfKVBlocks as exc:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            self._wakeup.set()
            delta, num_generated = first_delta, 0
            while True:
                num_generated += len(delta.token_ids)
                yield self._chunk(req_id, delta, len(request.prompt_token_ids), num_generated)
                if delta.finish is not None:
                    log.info("request %s: generated %d tokens, finish=%s", req_id, num_generated, delta.finish.value)
                    return
                delta = await queue.get()
        except asyncio.CancelledError:
            log.info("request %s: cancelled by the caller; freeing its KV", req_id)
            raise
        finally:
            self._streams.pop(req_id, None)
            if req_id in self.engine.running:
                await self._run(self.engine.release, req_id)

    async def _checked_params(self, request, context) -> SamplingConfig:
        if not request.req_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "req_id is required")
        if request.req_id in self._streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request.req_id!r} is already running")
        params = sampling_from_proto(request.sampling)
        try:
            self.engine.check_prompt(len(request.prompt_token_ids), params)
            vocab = self.engine.config.vocab_size
            if any(t >= vocab for t in request.prompt_token_ids):
                raise ValueError(f"prompt token ids must be < vocab size {vocab}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return params

    @staticmethod
    def _chunk(req_id: str, delta: Delta, num_prompt: int, num_generated: int) -> worker_pb2.TokenChunk:
        return worker_pb2.TokenChunk(req_id=req_id, token_ids=delta.token_ids, text=delta.text,
                                     finish_reason=_FINISH[delta.finish], num_prompt_tokens=num_prompt,
                                     num_generated_tokens=num_generated)

    async def _decode_loop(self) -> None:
        last = None   # (start time, batch size) of the previous step while the loop stayed busy
        while True:
            if not self.engine.running:
                last = None
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), _REAP_INTERVAL_S)
                except asyncio.TimeoutError:
                    await self._reap_expired()
                continue
            now = self.clock.now_s()
            if last is not None:
                # The interval between step starts is what a token costs in service: compute plus
                # streaming the previous step's tokens out.
                self.decode_fit.add(last[1], now - last[0])
            last = (now, len(self.engine.running))
            try:
                deltas = await self._run(self.engine.step)
            except Exception:
                log.exception("decode step failed; aborting the batch")
                deltas = {r: Delta([], "", Finish.ABORT) for r in list(self.engine.running)}
                for r in deltas:
                    await self._run(self.engine.release, r)
            for req_id, delta in deltas.items():
                stream = self._streams.get(req_id)
                if stream is not None:
                    stream.put_nowait(delta)

    async def _drop_reservation(self, req_id: str, reason: str) -> None:
        pending = self._pending.get(req_id)
        if pending is not None and not pending.claimed:
            self._pending.pop(req_id, None)
            pending.receiver.abort(reason)
            await self._run(self.engine.release, req_id)

    async def _reap_expired(self) -> None:
        """Free reservations whose transfer failed or whose Generate never came within the lease."""
        now = self.clock.now_s()
        for req_id, p in list(self._pending.items()):
            expired = now - p.created_s > self._lease_s
            if not p.claimed and (expired or p.receiver.poll() is TransferState.FAILED):
                p.receiver.abort("reservation expired")
                self._pending.pop(req_id, None)
                await self._run(self.engine.release, req_id)

    # ---- prefill side ----
    async def Prefill(self, request, context):
        agent = self.agents.get(request.target.backend)
        if agent is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"backend {request.target.backend!r} not served here")
        params = sampling_from_proto(request.sampling)
        ids = list(request.prompt_token_ids)
        try:
            self.engine.check_prompt(len(ids), params)
            if any(t >= self.engine.config.vocab_size for t in ids):
                raise ValueError("prompt token ids must be < vocab size")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        layout = TransferLayout(request.transfer_id, self.engine.layer_nbytes(len(ids)))
        link = _LazySender(agent, request.target.address, layout, self._transfer_timeout_s, self._checksum)
        try:
            try:
                result = await self._prefill(request, ids, params, link)
            except Rejected as exc:
                # Nothing was sent: the decode worker's receiver stays armed for another prefill worker.
                log.info("request %s: rejected for on-demand forwarding: %s", request.req_id, exc)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill rejected: {exc}")
            sender = link.get()
            trailer = kvtransfer_pb2.PrefillTrailer(req_id=request.req_id, first_token_id=result.first_token_id,
                                                    num_prompt_tokens=len(ids))
            sender.finish(trailer.SerializeToString())
            tail_start = self.clock.now_s()
            while sender.poll() in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING):
                await asyncio.to_thread(sender.status.finished.wait, _REAP_INTERVAL_S)
            if sender.poll() is TransferState.FAILED:
                log.warning("request %s: KV transfer failed: %s", request.req_id, sender.failure())
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {sender.failure()}")
            log.info("request %s: prefilled %d tokens in %.1f ms, sent %d KV bytes", request.req_id, len(ids),
                     result.compute_s * 1e3, result.kv_bytes)
            return worker_pb2.PrefillResponse(
                req_id=request.req_id, first_token_id=result.first_token_id, prefill_ms=result.compute_s * 1e3,
                kv_bytes=result.kv_bytes, transfer_tail_ms=(self.clock.now_s() - tail_start) * 1e3)
        finally:
            link.abort_if_active("prefill request ended")

    async def _prefill(self, request, ids: list[int], params: SamplingConfig, link: "_LazySender") -> PrefillResult:
        if self._prefill_runner is None:    # no scheduler configured: in order on the compute thread
            return await self._run(self.engine.prefill_and_send, ids, params, link.get())
        started = self.clock.now_s()
        ttft_s = (request.ttft_slo_ms or self._default_ttft_slo_ms) / 1e3
        kv_bytes = 0

        def on_layer(layer: int, kv) -> None:   # compute thread: hand the layer over at once
            nonlocal kv_bytes
            view = as_bytes_view(kv.numpy())
            kv_bytes += len(view)
            link.get().send_layer(layer, view)

        future = self._prefill_runner.submit(request.req_id, ids, started + ttft_s, on_layer,
                                             admission=request.ttft_slo_ms > 0)
        try:
            logits = await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if self._prefill_runner.cancel(request.req_id):
                log.info("request %s: cancelled before its prefill started", request.req_id)
            raise
        return PrefillResult(sample_token(logits, params, 0), self.clock.now_s() - started, kv_bytes)

    async def SetRole(self, request, context):
        role = {v: k for k, v in _ROLES.items()}.get(request.role)
        if role is None or role == "aggregated":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be PREFILL or DECODE")
        log.info("role %s -> %s", self.role, role)
        self.role = role   # every worker can serve both roles; the label tells the router which it has
        return await self.GetInfo(worker_pb2.GetInfoRequest(), context)

    async def Abort(self, request, context):
        found = request.req_id in self._pending or request.req_id in self.engine.running
        pending = self._pending.pop(request.req_id, None)
        if pending is not None:
            pending.receiver.abort(request.reason or "aborted by client")
        stream = self._streams.get(request.req_id)
        if stream is not None:
            stream.put_nowait(Delta([], "", Finish.ABORT))
        await self._run(self.engine.release, request.req_id)
        return worker_pb2.AbortResponse(found=found)
