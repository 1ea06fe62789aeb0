"""P/D ratio controller (P/D-Serve): per scenario, split its workers between prefill and decode
so both roles run at the same utilisation under the scenario's SLOs.

Demand model, from a sliding window of observed requests and the workers' profiled speed:
- prefill load (in workers) = arrival rate x mean input tokens / prefill tokens per second;
- decode load (in workers) = the higher of its compute and its KV memory:
  - compute: arrival rate x mean output tokens / decode tokens per second, where a decode worker's
    rate is B/step(B) at the largest batch B whose step time meets the TPOT SLO;
  - KV: the token-seconds of KV each request holds on its decode worker (its prompt from the
    reservation, through its prefill, and its growing sequence while it decodes at step(B) per
    token) x arrival rate / one decode worker's KV tokens. Long prompts with short answers need
    little decode compute but much decode memory; sized by compute alone, the split leaves too
    few decode workers and requests are refused for KV while prefill workers idle.
Target prefill count = round(N x prefill load / (prefill + decode load)), clamped to the
scenario's bounds. Stability: no change while utilisations differ by less than `hysteresis`
(relative) or while neither role is busier than `min_utilisation` (at such loads the split does
not matter, and a relative gap between two near-zero estimates is noise: a 2 + 2 cluster serving
one-token answers at a few requests a second became 3 + 1 within seconds, leaving long answers
that came next one decode worker's KV), none within `cooldown_s` of the previous change, at
most `max_step` workers per change, and a pinned ratio overrides everything. Pure: the caller
passes `now_s`.

`decide()` returns the whole effect as a `RatioPlan`: the new split, which workers change role
(`plan_role_changes`, the least busy ones), typed demand inputs and a typed reason. Whoever runs
it (the live rebalancer, the simulator) only carries the plan out.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import asdict, dataclass, field

from pdserve.policy.registry import Role, WorkerPerf, WorkerRecord
from pdserve.policy.scenarios import ScenarioSpec


@dataclass(frozen=True)
class ControllerConfig:
    window_s: float = 60.0
    cooldown_s: float = 30.0
    hysteresis: float = 0.2
    max_step: int = 1
    min_utilisation: float = 0.05


class RatioReason(enum.Enum):
    PINNED = "pinned by an operator"
    IMBALANCE = "prefill and decode utilisation differ"


@dataclass(frozen=True)
class Demand:
    """What the window of observed requests asks of a scenario's workers, in workers' worth."""

    arrival_rps: float = 0.0
    mean_input_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    prefill_load: float = 0.0
    decode_load: float = 0.0            # the higher of the two below
    decode_compute_load: float = 0.0
    decode_kv_load: float = 0.0         # 0 when the workers' KV capacity is unknown


@dataclass(frozen=True)
class RoleChange:
    worker_id: str
    from_role: Role
    to_role: Role


@dataclass(frozen=True)
class RatioPlan:
    scenario: str
    at_s: float
    old: tuple[int, int]
    new: tuple[int, int]
    reason: RatioReason
    role_changes: tuple[RoleChange, ...]
    demand: Demand | None = None
    imbalance: float | None = None        # |util_p - util_d| / max(util_p, util_d)

    @property
    def reason_text(self) -> str:
        if self.reason is RatioReason.PINNED or self.demand is None:
            return self.reason.value
        d, (p, n) = self.demand, self.old
        util_p, util_d = d.prefill_load / max(p, 1e-9), d.decode_load / max(n, 1e-9)
        bound = "KV" if d.decode_kv_load > d.decode_compute_load else "compute"
        return (f"prefill utilisation {util_p:.2f} vs decode {util_d:.2f} ({bound}; imbalance {self.imbalance:.0%}); "
                f"target {self.new[0]}:{self.new[1]}")

    @property
    def inputs(self) -> dict:
        """Flat numbers for the ratio history (the store keeps them as JSON)."""
        if self.demand is None:
            return {}
        return {**{k: round(v, 6) for k, v in asdict(self.demand).items()}, "imbalance": round(self.imbalance, 6)}


def plan_role_changes(members: list[WorkerRecord], target: tuple[int, int]) -> tuple[RoleChange, ...]:
    """Which workers switch role to move a scenario's split to `target`: the least busy ones (fewest
    requests in flight, ties by id), skipping any already draining. One home for this choice."""
    num_prefill = sum(w.role is Role.PREFILL for w in members)
    num_decode = sum(w.role is Role.DECODE for w in members)
    if num_prefill > target[0] and num_decode < target[1]:
        src, dst, count = Role.PREFILL, Role.DECODE, min(num_prefill - target[0], target[1] - num_decode)
    elif num_decode > target[1] and num_prefill < target[0]:
        src, dst, count = Role.DECODE, Role.PREFILL, min(num_decode - target[1], target[0] - num_prefill)
    else:
        return ()
    movable = sorted((w for w in members if w.role is src and not w.draining),
                     key=lambda w: (w.num_inflight, w.worker_id))
    return tuple(RoleChange(w.worker_id, src, dst) for w in movable[:count])


@dataclass
class _ScenarioState:
    arrivals: deque = field(default_factory=deque)    # (t_s, input_tokens, output_tokens)
    # Running sums over the window (exact integers), so a decision costs O(1) however many
    # requests a fleet's window holds: [sum in, sum out, sum in^2, sum 2*in*out + out^2].
    sums: list = field(default_factory=lambda: [0, 0, 0, 0])
    last_change_s: float = float("-inf")
    pinned: tuple[int, int] | None = None

    def add(self, arrival: tuple[float, int, int], sign: int) -> None:
        _, i, o = arrival
        for k, v in enumerate((i, o, i * i, 2 * i * o + o * o)):
            self.sums[k] += sign * v


class RatioController:
    def __init__(self, config: ControllerConfig = ControllerConfig()):
        self.config = config
        self._states: dict[str, _ScenarioState] = {}

    def _state(self, scenario: str) -> _ScenarioState:
        return self._states.setdefault(scenario, _ScenarioState())

    def observe(self, scenario: str, now_s: float, input_tokens: int, output_tokens: int) -> None:
        st = self._state(scenario)
        arrival = (now_s, int(input_tokens), int(output_tokens))
        st.arrivals.append(arrival)
        st.add(arrival, +1)
        self._trim(st, now_s)

    def _trim(self, st: _ScenarioState, now_s: float) -> None:
        while st.arrivals and st.arrivals[0][0] < now_s - self.config.window_s:
            st.add(st.arrivals.popleft(), -1)

    def pin(self, scenario: str, num_prefill: int, num_decode: int) -> None:
        if num_prefill < 0 or num_decode < 0:
            raise ValueError("worker counts must be >= 0")
        self._state(scenario).pinned = (num_prefill, num_decode)

    def unpin(self, scenario: str) -> None:
        self._state(scenario).pinned = None

    def pinned(self, scenario: str) -> tuple[int, int] | None:
        return self._state(scenario).pinned

    def last_change_s(self, scenario: str) -> float:
        return self._state(scenario).last_change_s

    def restore_last_change(self, scenario: str, last_change_s: float) -> None:
        """After a router restart: the cooldown runs from the last recorded change."""
        st = self._state(scenario)
        st.last_change_s = max(st.last_change_s, last_change_s)

    def demand(self, scenario: str, spec: ScenarioSpec, perf: WorkerPerf, now_s: float,
               kv_tokens_per_worker: float = 0.0) -> Demand:
        """`kv_tokens_per_worker`: one decode worker's KV capacity in tokens (0: unknown, KV not modelled)."""
        st = self._state(scenario)
        self._trim(st, now_s)
        n = len(st.arrivals)
        if n == 0:
            return Demand()
        rate = n / self.config.window_s
        sum_in, sum_out, sum_in_sq, sum_kv_decode = st.sums
        mean_in, mean_out = sum_in / n, sum_out / n
        tpot_s = spec.tpot_slo_ms / 1e3
        compute = rate * mean_out / perf.decode_tokens_per_s(tpot_s)
        kv = 0.0
        if kv_tokens_per_worker > 0:
            step_s, prefill_tps = perf.decode_step_s(tpot_s), perf.prefill_tokens_per_s
            # Per request, summed (long prompts tend to hold their KV longest): prompt held through
            # its prefill, then prompt plus on average half the answer for the answer's steps.
            token_s = sum_in_sq / prefill_tps + sum_kv_decode / 2 * step_s
            kv = token_s / self.config.window_s / kv_tokens_per_worker
        return Demand(rate, mean_in, mean_out, prefill_load=rate * mean_in / perf.prefill_tokens_per_s,
                      decode_load=max(compute, kv), decode_compute_load=compute, decode_kv_load=kv)

    def decide(self, scenario: str, spec: ScenarioSpec, members: list[WorkerRecord], perf: WorkerPerf,
               now_s: float) -> RatioPlan | None:
        """Called once per control interval per scenario with its live prefill/decode workers
        (draining ones included). Returns the plan to carry out, or None to leave things as they are.
        Side effect: a returned plan starts the scenario's cooldown.
        A scenario whose workers serve more than one model is left alone: its split mixes pools
        that cannot stand in for each other, and a move could take one model's last prefill or
        decode worker (give each model's pool its own scenario)."""
        if len({w.model for w in members}) > 1:
            return None
        st = self._state(scenario)
        current = (sum(w.role is Role.PREFILL for w in members), sum(w.role is Role.DECODE for w in members))
        total = current[0] + current[1]
        if st.pinned is not None:
            if st.pinned == current:
                return None
            return self._plan(scenario, st, now_s, members, current, st.pinned, RatioReason.PINNED)
        d = self.demand(scenario, spec, perf, now_s, _kv_tokens_per_worker(members))
        if total < 2 or d.prefill_load + d.decode_load == 0:
            return None
        target_p = round(total * d.prefill_load / (d.prefill_load + d.decode_load))
        target_p = max(spec.min_prefill, min(target_p, spec.max_prefill, total - spec.min_decode))
        target_p = max(target_p, total - spec.max_decode)
        if target_p == current[0] or now_s - st.last_change_s < self.config.cooldown_s:
            return None
        util_p = d.prefill_load / max(current[0], 1e-9)
        util_d = d.decode_load / max(current[1], 1e-9)
        imbalance = abs(util_p - util_d) / max(util_p, util_d)
        if imbalance < self.config.hysteresis or max(util_p, util_d) < self.config.min_utilisation:
            return None
        step = max(-self.config.max_step, min(self.config.max_step, target_p - current[0]))
        new = (current[0] + step, total - current[0] - step)
        return self._plan(scenario, st, now_s, members, current, new, RatioReason.IMBALANCE, d, imbalance)

    def _plan(self, scenario: str, st: _ScenarioState, now_s: float, members: list[WorkerRecord],
              old: tuple[int, int], new: tuple[int, int], reason: RatioReason, demand: Demand | None = None,
              imbalance: float | None = None) -> RatioPlan:
        st.last_change_s = now_s
        return RatioPlan(scenario, now_s, old, new, reason, plan_role_changes(members, new), demand, imbalance)


def _kv_tokens_per_worker(members: list[WorkerRecord]) -> float:
    """A member's KV capacity in tokens, on average (roles switch, so every member counts)."""
    return sum(w.num_total_kv_blocks * w.block_size_tokens for w in members) / len(members) if members else 0.0
