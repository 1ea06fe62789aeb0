"""Prefill scheduling policies on a virtual clock; operator durations come from the cost model."""
import pytest

from pdserve.clock import VirtualClock
from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import (ChunkedScheduler, FcfsScheduler, FlowPrefillScheduler, PrefillJob,
                                              make_scheduler)

LAYERS = 4
# ~1 ms fixed + 20 us/token attention (plus a quadratic term), 10 us/token MLP.
COST = OperatorCostModel(LAYERS, (1e-3, 2e-5, 1e-9), (5e-4, 1e-5))


def make_job(req_id: str, tokens: int, now: float, ttft_s: float) -> PrefillJob:
    return PrefillJob(req_id, tokens, now, now + ttft_s)


class Sim:
    """Minimal executor: runs units operator by operator on virtual time, like PrefillRunner."""

    def __init__(self, sched):
        self.sched, self.clock = sched, VirtualClock()
        self.unit, self.started, self.finished = None, {}, {}
        self.preempt_at = None

    def arrive(self, job):
        if self.sched.add(job, self.clock.now_s()) and self.unit is not None:
            self.preempt_at = self.clock.now_s()

    def step(self):
        if self.unit is None:
            self.unit = self.sched.next_unit(self.clock.now_s())
            if self.unit is None:
                return False
            for p in self.unit.pieces:
                self.started.setdefault(p.job.req_id, self.clock.now_s())
        self.clock.advance(COST.op_s(self.unit.next_op, self.unit.piece_tokens()))
        self.sched.on_operator_done(self.unit, self.clock.now_s())
        if self.unit.finished:
            for job in self.sched.on_unit_done(self.unit, self.clock.now_s()):
                self.finished[job.req_id] = self.clock.now_s()
            self.unit = None
        elif self.preempt_at is not None:
            self.sched.on_preempted(self.unit, self.clock.now_s())
            self.unit, self.preempt_at = None, None
        return True

    def run_until(self, t):
        while self.clock.now_s() < t and self.step():
            pass


def test_urgent_short_request_starts_within_one_operator():
    sim = Sim(FlowPrefillScheduler(LAYERS, COST))
    sim.arrive(make_job("long", 4000, 0.0, ttft_s=5.0))
    sim.run_until(0.05)                                   # long prefill is mid-way through its operators
    arrival = sim.clock.now_s()
    sim.arrive(make_job("short", 50, arrival, ttft_s=0.1))
    longest_op = max(COST.attention_s(4000), COST.mlp_s(4000))
    sim.run_until(10)
    assert sim.started["short"] - arrival <= longest_op + 1e-12
    assert sim.finished["short"] <= arrival + 0.1         # met its TTFT
    assert sim.finished["long"] <= 5.0                    # and the long one still met its own


def test_fcfs_blocks_the_short_request_behind_the_long_one():
    sim = Sim(FcfsScheduler(LAYERS))
    sim.arrive(make_job("long", 4000, 0.0, 5.0))
    sim.run_until(0.05)
    sim.arrive(make_job("short", 50, sim.clock.now_s(), 0.1))
    sim.run_until(10)
    assert sim.finished["short"] > sim.finished["long"]


def test_no_preemption_when_waiting_still_meets_the_deadline():
    sched = FlowPrefillScheduler(LAYERS, COST)
    sched.add(make_job("long", 500, 0.0, 5.0), 0.0)
    sched.next_unit(0.0)
    assert sched.add(make_job("relaxed", 50, 0.001, 3.0), 0.001) is False


def test_lost_deadlines_are_demoted_behind_feasible_work():
    sched = FlowPrefillScheduler(LAYERS, COST)
    sched.add(make_job("hopeless", 3000, 0.0, 0.001), 0.0)       # cannot finish in 1 ms
    sched.add(make_job("feasible", 100, 0.0, 1.0), 0.0)
    assert sched.next_unit(0.0).req_ids[0] == "feasible"


def test_short_prompts_are_batched_while_all_keep_slack():
    sched = FlowPrefillScheduler(LAYERS, COST, batch_budget_tokens=256)
    for i in range(5):
        sched.add(make_job(f"s{i}", 60, 0.0, 0.5), 0.0)
    unit = sched.next_unit(0.0)
    assert len(unit.pieces) == 4                                  # 4 x 60 <= 256 < 5 x 60
    tight = FlowPrefillScheduler(LAYERS, COST, batch_budget_tokens=256)
    alone = COST.prefill_s(60)
    tight.add(make_job("t0", 60, 0.0, alone * 1.05), 0.0)         # no room for a partner
    tight.add(make_job("t1", 60, 0.0, 10.0), 0.0)
    assert tight.next_unit(0.0).req_ids == ["t0"]


def test_late_prompts_are_batched_oldest_first_within_the_budget():
    """Under overload every waiting deadline can be lost: those prompts still batch, so the
    worker keeps its throughput, and the oldest go first."""
    sched = FlowPrefillScheduler(LAYERS, COST, batch_budget_tokens=256)
    for i, tokens in enumerate((60, 200, 60, 60, 60)):
        sched.add(make_job(f"late{i}", tokens, 0.01 * i, 0.001), 0.01 * i)
    unit = sched.next_unit(1.0)                                   # every deadline passed long ago
    assert unit.req_ids == ["late0", "late2", "late3", "late4"]   # late1 would overflow the budget
    assert sched.next_unit(1.0).req_ids == ["late1"]
    sched.add(make_job("fresh", 60, 1.0, 1.0), 1.0)
    sched.add(make_job("late5", 60, 0.5, 0.001), 1.0)
    assert sched.next_unit(1.0).req_ids == ["fresh"]              # feasible work still goes first


def test_chunked_fills_its_token_budget_in_arrival_order():
    sched = ChunkedScheduler(LAYERS, chunk_tokens=512)
    sched.add(make_job("long", 1000, 0.0, 5.0), 0.0)
    sched.add(make_job("short", 100, 0.0, 1.0), 0.0)
    first = sched.next_unit(0.0)
    assert [(p.job.req_id, p.start_token, p.num_tokens) for p in first.pieces] == [("long", 0, 512)]
    first.next_op = first.num_ops
    assert sched.on_unit_done(first, 0.1) == []
    second = sched.next_unit(0.1)
    assert [(p.job.req_id, p.start_token, p.num_tokens) for p in second.pieces] == [("long", 512, 488), ("short", 0, 24)]


def test_cost_model_fit_recovers_coefficients():
    samples = [(k, n, COST.attention_s(n) if k == "attention" else COST.mlp_s(n))
               for n in (16, 64, 256, 1024, 4096) for k in ("attention", "mlp")]
    fitted = OperatorCostModel.fit(LAYERS, samples)
    for n in (32, 512, 2048):
        assert fitted.prefill_s(n) == pytest.approx(COST.prefill_s(n), rel=1e-6)
    with pytest.raises(ValueError):
        make_scheduler("flowprefill", LAYERS)


def test_calibration_learns_a_constant_slowdown_deterministically():
    from pdserve.policy.cost_model import CalibratedCostModel

    cal = CalibratedCostModel(COST, smoothing=0.2)
    for _ in range(60):
        cal.observe(0, [500], 1.3 * COST.op_s(0, [500]))
        cal.observe(1, [500], 0.9 * COST.op_s(1, [500]))
    assert cal.op_s(0, [100]) == pytest.approx(1.3 * COST.op_s(0, [100]), rel=1e-3)
    assert cal.op_s(1, [100]) == pytest.approx(0.9 * COST.op_s(1, [100]), rel=1e-3)
    cal.observe(0, [500], 1000.0)                      # an outlier moves it by a bounded step only
    assert cal.scale["attention"] < 2.2


PAST_COST = OperatorCostModel(LAYERS, COST.attention_coeffs, COST.mlp_coeffs, attention_past_s=2e-9)


def test_the_past_term_is_fitted_from_pieces_after_earlier_kv():
    samples = [(n, p, PAST_COST.attention_s(n, p)) for n, p in ((16, 512), (64, 2048), (512, 512), (1024, 2048))]
    fitted = COST.with_past(samples)
    assert fitted.attention_past_s == pytest.approx(2e-9, rel=1e-6)
    assert fitted.attention_s(300, 3000) == pytest.approx(PAST_COST.attention_s(300, 3000), rel=1e-6)
    with pytest.raises(ValueError):
        COST.with_past([(16, 0, 1e-3)])
    assert OperatorCostModel.from_dict(fitted.to_dict()) == fitted
    old = {k: v for k, v in COST.to_dict().items() if k != "attention_past_s"}
    assert OperatorCostModel.from_dict(old).attention_past_s == 0.0       # profiles from before the term


def test_a_piece_after_a_cached_prefix_is_costed_with_its_attention_over_it():
    """Only the uncached tokens are computed, but their attention reads the cached keys."""
    sched = FlowPrefillScheduler(LAYERS, PAST_COST)
    job = PrefillJob("cached", 3000 + 100, 0.0, 10.0, cached_tokens=3000)
    sched.add(job, 0.0)
    unit = sched.next_unit(0.0)
    assert unit.piece_past() == [3000]
    expected = PAST_COST.prefill_s(100, 3000)
    assert expected > PAST_COST.prefill_s(100) + LAYERS * 100 * 3000 * 1e-9     # the past term counts
    assert sched.slack_s(unit, 0.0) == pytest.approx(10.0 - expected)
    fresh = FlowPrefillScheduler(LAYERS, PAST_COST)
    accept, finish_s = fresh.admission(PrefillJob("c2", 3100, 0.0, 10.0, cached_tokens=3000), 0.0)
    assert accept and finish_s == pytest.approx(expected)


def test_calibration_with_the_past_term_is_not_inflated_by_cached_pieces():
    from pdserve.policy.cost_model import CalibratedCostModel

    cal = CalibratedCostModel(PAST_COST, smoothing=0.2)
    for _ in range(60):     # measured exactly as modelled: attention over 3000 cached tokens
        cal.observe(0, [100], PAST_COST.op_s(0, [100], [3000]), [3000])
    assert cal.scale["attention"] == pytest.approx(1.0)
    assert cal.op_s(0, [100], [3000]) == pytest.approx(PAST_COST.attention_s(100, 3000))
