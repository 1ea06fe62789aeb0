"""`pdserve bench fidelity`: the simulator against a real cluster on the same trace slice.

A real local cluster (router + 1 prefill + 1 decode worker, `tiny`) replays the first minutes
of the Azure conv trace in real time through the router (prompt lengths clipped to the model's
context, outputs of exactly the trace's length). The simulator, calibrated from this host's
profiles (prefill cost model, decode step vs batch) and one measured per-request overhead,
replays the same requests on a simulated 1P+1D fleet. Reports mean TTFT and TPOT of both and
their relative differences.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import statistics
import tempfile
import time


from pdserve.config import load_config
from pdserve.launch import LocalCluster
from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.scenarios import ScenarioClassifier, ScenarioSpec
from pdserve.sim.fleet import SimRequest, Simulation
from pdserve.sim.hardware import from_host_profile
from pdserve.traces import load_azure, load_file
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdserve.workers.model.loader import load_model
from pdserve.workers.profiler import profile_decode, profile_path

# Clipped so that this 2-core host (router, two workers and the client share it) is loaded but not
# saturated: the comparison is about timing under load, not about queues growing without bound.
MAX_INPUT = 512
MAX_OUTPUT = 64
_LOOSE = ScenarioSpec("default", ttft_slo_ms=1e9, tpot_slo_ms=1e9)


def trace_slice(minutes: float, trace_file: pathlib.Path | None = None) -> list[SimRequest]:
    out = []
    for i, t in enumerate(load_file(trace_file) if trace_file else load_azure("conv")):
        if t.arrival_s > minutes * 60:
            break
        out.append(SimRequest(f"f{i}", "", t.arrival_s, max(8, min(t.input_tokens, MAX_INPUT)),
                              max(2, min(t.output_tokens, MAX_OUTPUT))))
    return out


async def _one(stub, r: SimRequest, start_wall: float, results: dict) -> None:
    await asyncio.sleep(max(0.0, start_wall + r.arrival_s - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    n = 0
    async for chunk in stub.Generate(router_pb2.RouteRequest(
            req_id=r.req_id, model="tiny", prompt_token_ids=[(i * 7) % 250 for i in range(r.input_tokens)],
            sampling=worker_pb2.SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))):
        now = time.perf_counter()
        first = first or now
        last = now
        n += len(chunk.token_ids)
    results[r.req_id] = (first - sent, (last - first) / max(n - 1, 1))


async def _measured(cluster: LocalCluster, port: int) -> worker_pb2.WorkerInfo:
    async with cluster.channel(port) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest())


async def _replay(cluster: LocalCluster, reqs: list[SimRequest]) -> dict:
    results: dict = {}
    async with cluster.channel(cluster.router_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        for i in range(5):   # warm-up, and the per-request overhead at idle
            await _one(stub, SimRequest(f"warm{i}", "", 0.0, 16, 2), time.perf_counter(), results)
        overhead = statistics.median(results[f"warm{i}"][0] for i in range(5))
        start = time.perf_counter() + 0.2
        await asyncio.gather(*(_one(stub, r, start, results) for r in reqs))
    return {"overhead_s": overhead, "per_request": {r.req_id: results[r.req_id] for r in reqs}}


def run(minutes: float = 2.0, trace_file: pathlib.Path | None = None) -> dict:
    reqs = trace_slice(minutes, trace_file)
    cfg = load_config()
    model = load_model("tiny", cfg.model.cache_dir).model
    with tempfile.TemporaryDirectory() as db:
        # A KV pool large enough that capacity never refuses: the comparison is about timing.
        cluster = LocalCluster(model="tiny", env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}/f.db",
                                                  "PDSERVE_WORKER__NUM_KV_BLOCKS": "8192",
                                                  "PDSERVE_WORKER__MAX_BATCH_SIZE": "256"}).start()
        try:
            real = asyncio.run(_replay(cluster, reqs))
            decode_info = asyncio.run(_measured(cluster, cluster.process("decode-0").port))
            prefill_info = asyncio.run(_measured(cluster, cluster.process("prefill-0").port))
        finally:
            cluster.stop()
    cost_file = profile_path(cfg.model.cache_dir, "tiny")
    cost = OperatorCostModel.from_dict(json.loads(cost_file.read_text()))
    # Calibrated from the real cluster: decode step interval as measured in service, prefill
    # cost model with the correction factor the prefill worker learned in service.
    base_s = decode_info.measured_decode_step_base_s or profile_decode(model)[0]
    per_seq_s = decode_info.measured_decode_step_per_seq_s
    scale = prefill_info.prefill_cost_scale or 1.0
    cost = OperatorCostModel(cost.num_layers, tuple(c * scale for c in cost.attention_coeffs),
                             tuple(c * scale for c in cost.mlp_coeffs), cost.attention_past_s * scale)
    small = cost.prefill_s(16)
    hw = from_host_profile("this-host-tiny", cost, base_s, per_seq_s, model.config.kv_bytes_per_token, 3e9,
                           request_overhead_s=max(0.0, real["overhead_s"] - small - base_s))
    sim = Simulation(hw, {"default": (1, 1)}, ScenarioClassifier({"default": _LOOSE}), None)
    simulated = sim.run([SimRequest(r.req_id, "", r.arrival_s, r.input_tokens, r.output_tokens) for r in reqs])
    real_ttft = statistics.mean(v[0] for v in real["per_request"].values())
    real_tpot = statistics.mean(v[1] for v in real["per_request"].values())
    sim_ttft = statistics.mean(r.first_token_s - r.arrival_s for r in simulated)
    sim_tpot = statistics.mean((r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in simulated)
    return {"requests": len(reqs), "minutes": minutes, "request_overhead_ms": round(hw.request_overhead_s * 1e3, 2),
            "calibration": {"decode_step_base_ms": round(base_s * 1e3, 3), "decode_step_per_seq_ms": round(per_seq_s * 1e3, 4),
                            "num_decode_steps": decode_info.num_decode_steps, "prefill_cost_scale": round(scale, 3)},
            "real": {"mean_ttft_ms": round(real_ttft * 1e3, 1), "mean_tpot_ms": round(real_tpot * 1e3, 2)},
            "sim": {"mean_ttft_ms": round(sim_ttft * 1e3, 1), "mean_tpot_ms": round(sim_tpot * 1e3, 2)},
            "ttft_rel_diff": round(abs(sim_ttft - real_ttft) / real_ttft, 3),
            "tpot_rel_diff": round(abs(sim_tpot - real_tpot) / real_tpot, 3)}
