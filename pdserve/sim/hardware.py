"""Worker speed models for the simulator: presets from published figures, or this host's profile.

prefill_s(n) = base + n / prefill_tokens_per_s + quad * n^2 (attention's quadratic share);
decode step(B) = decode_step_base_s + decode_step_per_seq_s * B; KV moves at interconnect speed.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.policy.registry import WorkerPerf

KV_POOL_BYTES = 40 << 30    # HBM left for KV on a decode worker (the presets' accelerators)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    prefill_base_s: float
    prefill_tokens_per_s: float
    prefill_quad_s: float
    decode_step_base_s: float
    decode_step_per_seq_s: float
    kv_bytes_per_token: int
    interconnect_bytes_per_s: float
    max_batch: int = 256
    # Fixed per-request cost outside the model (RPCs, scheduling); calibrated on a real cluster.
    request_overhead_s: float = 0.0

    def prefill_s(self, num_tokens: int) -> float:
        return self.prefill_base_s + num_tokens / self.prefill_tokens_per_s + self.prefill_quad_s * num_tokens ** 2

    def decode_step_s(self, batch: int) -> float:
        return self.decode_step_base_s + self.decode_step_per_seq_s * batch

    def kv_transfer_s(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.interconnect_bytes_per_s

    def perf(self) -> WorkerPerf:
        return WorkerPerf(1024 / self.prefill_s(1024), self.decode_step_base_s, self.decode_step_per_seq_s,
                          self.max_batch)


# Llama-3-8B (bf16) on one H100-SXM: ~990 TFLOP/s dense bf16 at ~40-50% MFU in prefill gives
# ~12k tokens/s at 2*8e9 FLOP/token; decode is memory-bound: 16 GB of weights at ~3.35 TB/s is
# ~5 ms, ~12 ms per step with kernels and sampling, plus KV reads per sequence. KV: 32 layers x
# 8 KV heads x 128 dims x (K,V) x 2 bytes = 128 KiB/token. RDMA at 200 Gb/s = 25 GB/s.
LLAMA3_8B_H100 = HardwareProfile("llama3-8b-h100", 0.004, 12_000.0, 2e-9, 0.012, 0.00015, 131_072, 25e9)
# Llama-3-70B on 8x H200 (TP8): ~10x the FLOPs/token over 8 GPUs; 140 GB of weights over 8x4.8 TB/s;
# KV: 80 layers x 8 heads x 128 x 2 x 2 bytes = 320 KiB/token; 400 Gb/s links.
LLAMA3_70B_H200X8 = HardwareProfile("llama3-70b-h200x8", 0.010, 9_000.0, 1e-9, 0.020, 0.00025, 327_680, 50e9)
PRESETS = {p.name: p for p in (LLAMA3_8B_H100, LLAMA3_70B_H200X8)}


def from_host_profile(name: str, cost, decode_base_s: float, decode_per_seq_s: float, kv_bytes_per_token: int,
                      interconnect_bytes_per_s: float, request_overhead_s: float = 0.0) -> HardwareProfile:
    """A profile of this host from `pdserve profile` (an OperatorCostModel) and the decode profile."""
    layers = cost.num_layers
    a0, a1, a2 = cost.attention_coeffs
    m0, m1 = cost.mlp_coeffs
    return HardwareProfile(name, layers * (a0 + m0), 1.0 / (layers * (a1 + m1)), layers * a2, decode_base_s,
                           decode_per_seq_s, kv_bytes_per_token, interconnect_bytes_per_s,
                           request_overhead_s=request_overhead_s)
