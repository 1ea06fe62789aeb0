"""What the fleet simulation tracks: requests and simulated workers (state only; `fleet.py` runs them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.policy.kv_blocks import BlockAllocator
from pdserve.policy.prefill_scheduler import BasePrefillScheduler
from pdserve.policy.registry import Role, WorkerRecord


@dataclass
class SimRequest:
    req_id: str
    scenario_header: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    scenario: str = ""
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    num_generated_tokens: int = 0
    decode_id: str = ""
    rejected: bool = False
    decode_start_token_clock: float = 0.0
    decode_cached_tokens: int = 0       # prompt tokens the decode worker linked from its cache

    def met_slo(self) -> bool:
        if self.finish_s is None or self.first_token_s is None:
            return False
        tpot = (self.finish_s - self.first_token_s) / max(self.output_tokens - 1, 1)
        return self.first_token_s - self.arrival_s <= self.ttft_slo_s and tpot <= self.tpot_slo_s


@dataclass
class SimWorker:
    rec: WorkerRecord
    prefill: BasePrefillScheduler
    busy: bool = False
    pending_role: Role | None = None
    batch: list = field(default_factory=list)        # heap of (finish token clock, seq, request)
    token_clock: float = 0.0
    clock_s: float = 0.0
    sum_input_tokens: int = 0
    sum_start_token_clock: float = 0.0
    decode_version: int = 0
    role_since_s: float = 0.0
    cache: BlockAllocator | None = None      # prefix cache of 512-token trace blocks
    # Requests reserved here (ReserveKV) whose KV has not arrived: their prompts hold KV already.
    reserved: dict = field(default_factory=dict)     # req_id -> prompt tokens
    # Local prefills (one after another) stop decode steps: one interval, which starts at or
    # before the simulated now whenever it is still running.
    stall_from_s: float = 0.0
    stall_until_s: float = 0.0

    def stalled_s(self, start_s: float, end_s: float) -> float:
        """Seconds of [start_s, end_s] during which decode steps were stopped."""
        return max(0.0, min(end_s, self.stall_until_s) - max(start_s, self.stall_from_s))
