"""Ratio controller on a virtual clock: direction, cooldown, no flapping, pins, bounds."""
import random

from pdserve.clock import VirtualClock
from pdserve.policy.ratio_controller import ControllerConfig, RatioController, RatioReason, RoleChange, plan_role_changes
from pdserve.policy.registry import Role, WorkerPerf, WorkerRecord
from pdserve.policy.scenarios import ScenarioClassifier, ScenarioSpec, prefix_hash

PERF = WorkerPerf(prefill_tokens_per_s=20_000, decode_step_base_s=0.010, decode_step_per_seq_s=0.0005)
SPEC = ScenarioSpec("chat", ttft_slo_ms=1000, tpot_slo_ms=50)
CFG = ControllerConfig(window_s=30, cooldown_s=20, hysteresis=0.2, max_step=1)


AMPLE_KV_BLOCKS = 65_536       # 1M tokens a worker: the tests of compute balance never run short of KV


def members(ratio: tuple[int, int], inflight: dict[str, int] | None = None,
            kv_blocks: int = AMPLE_KV_BLOCKS) -> list[WorkerRecord]:
    roles = [Role.PREFILL] * ratio[0] + [Role.DECODE] * ratio[1]
    out = [WorkerRecord(f"w{i}", role, "m", "", {}, kv_blocks, 16, 32_768, scenario="chat")
           for i, role in enumerate(roles)]
    for w in out:
        w.num_inflight = (inflight or {}).get(w.worker_id, 0)
    return out


def drive(ctrl, clock, ratio, seconds, rps, input_tokens, output_tokens, rng, kv_blocks=AMPLE_KV_BLOCKS):
    changes = []
    for _ in range(int(seconds)):
        for _ in range(rng.randint(rps - 1, rps + 1)):
            ctrl.observe("chat", clock.now_s(), input_tokens, output_tokens)
        d = ctrl.decide("chat", SPEC, members(ratio, kv_blocks=kv_blocks), PERF, clock.now_s())
        if d is not None:
            changes.append(d)
            assert len(d.role_changes) == abs(d.new[0] - d.old[0])   # the plan moves exactly that many
            ratio = d.new
        clock.advance(1.0)
    return ratio, changes


def test_step_change_moves_the_ratio_the_right_way_then_holds():
    clock, ctrl, rng = VirtualClock(), RatioController(CFG), random.Random(0)
    ratio = (4, 4)
    # Prefill-heavy: long prompts, short answers.
    ratio, changes = drive(ctrl, clock, ratio, 200, 10, 8000, 20, rng)
    assert ratio[0] > 4 and changes and all(c.new[0] > c.old[0] for c in changes)
    first_change_at = changes[0].at_s
    assert first_change_at <= CFG.window_s            # reacts within one window, not at random
    settled, later = drive(ctrl, clock, ratio, 300, 10, 8000, 20, rng)
    assert later == [] and settled == ratio            # steady load: no flapping
    # Step to decode-heavy: short prompts, long answers.
    ratio, changes = drive(ctrl, clock, ratio, 300, 10, 200, 800, rng)
    assert ratio[0] < 4 and all(c.new[0] < c.old[0] for c in changes)
    gaps = [b.at_s - a.at_s for a, b in zip(changes, changes[1:])]
    assert all(g >= CFG.cooldown_s for g in gaps)      # one worker per cooldown at most
    assert sum(ratio) == 8


def test_pinned_ratio_is_respected_and_unpin_resumes_control():
    clock, ctrl, rng = VirtualClock(), RatioController(CFG), random.Random(1)
    ctrl.pin("chat", 2, 6)
    ratio, changes = drive(ctrl, clock, (4, 4), 120, 10, 8000, 20, rng)
    assert ratio == (2, 6) and [c.reason for c in changes] == [RatioReason.PINNED]
    assert {c.from_role for c in changes[0].role_changes} == {Role.PREFILL}
    ctrl.unpin("chat")
    ratio, _ = drive(ctrl, clock, ratio, 200, 10, 8000, 20, rng)
    assert ratio[0] > 2


def test_bounds_and_no_data():
    ctrl = RatioController(CFG)
    bounded = ScenarioSpec("chat", tpot_slo_ms=50, min_decode=3, max_prefill=5)
    assert ctrl.decide("chat", bounded, members((4, 4)), PERF, 0.0) is None     # no traffic yet
    ratio = (4, 4)
    for t in range(400):
        for _ in range(10):
            ctrl.observe("chat", float(t), 20000, 1)
        d = ctrl.decide("chat", bounded, members(ratio), PERF, float(t))
        ratio = d.new if d else ratio
    assert ratio == (5, 3)


def test_a_scenario_whose_roles_are_both_nearly_idle_keeps_its_split():
    """One-token answers at a couple of requests a second: prefill-heavy, but neither role is 5%
    busy, so the split stays (it used to become 3 + 1, leaving the long answers that came next one
    decode worker's KV); the same shape at a load that keeps the prefill workers busy moves it."""
    idle, _ = drive(RatioController(CFG), VirtualClock(), (2, 2), 200, 1, 200, 1, random.Random(4))
    assert idle == (2, 2)
    unguarded, _ = drive(RatioController(ControllerConfig(window_s=30, cooldown_s=20, min_utilisation=0.0)),
                         VirtualClock(), (2, 2), 200, 1, 200, 1, random.Random(4))
    assert unguarded[0] > 2          # the relative gap alone would have moved it
    busy, _ = drive(RatioController(CFG), VirtualClock(), (2, 2), 200, 20, 2000, 1, random.Random(4))
    assert busy[0] > 2


def test_plan_moves_the_least_busy_workers_and_skips_draining_ones():
    ws = members((3, 1), inflight={"w0": 5, "w1": 0, "w2": 2})
    assert plan_role_changes(ws, (1, 3)) == (RoleChange("w1", Role.PREFILL, Role.DECODE),
                                             RoleChange("w2", Role.PREFILL, Role.DECODE))
    ws[1].draining = True
    assert [c.worker_id for c in plan_role_changes(ws, (2, 2))] == ["w2"]
    assert plan_role_changes(ws, (3, 1)) == ()


def test_decode_workers_short_of_kv_draw_the_split_toward_decode():
    # Long prompts, short answers: by compute the scenario is prefill-bound (4 prefill workers'
    # worth against 0.13 of decode), but each request holds 8k tokens of KV on its decode worker
    # through its prefill and its answer: about 11 workers' worth at 10k tokens a worker.
    clock, rng = VirtualClock(), random.Random(3)
    ample, _ = drive(RatioController(CFG), clock, (4, 4), 200, 10, 8000, 20, rng)
    short, changes = drive(RatioController(CFG), clock, (4, 4), 200, 10, 8000, 20, rng, kv_blocks=625)
    assert ample[0] > 4 and short[0] < 4 and changes
    d = changes[0].demand
    assert d.decode_kv_load > 10 * d.decode_compute_load and d.decode_load == d.decode_kv_load
    assert "(KV;" in changes[0].reason_text and changes[0].inputs["decode_kv_load"] == round(d.decode_kv_load, 6)
    # The KV model in numbers: rate x (prompt through its prefill + prompt and half the answer
    # for the answer's steps) / one worker's KV tokens.
    only = RatioController(CFG)
    for _ in range(300):
        only.observe("chat", 0.0, 8000, 20)
    step_s = PERF.decode_step_s(SPEC.tpot_slo_ms / 1e3)
    expected = 10 * (8000 * 8000 / 20_000 + 8010 * 20 * step_s) / 10_000
    assert abs(only.demand("chat", SPEC, PERF, 0.0, 10_000).decode_kv_load - expected) < 1e-9
    assert only.demand("chat", SPEC, PERF, 0.0).decode_kv_load == 0       # capacity unknown: not modelled


def test_plan_reason_and_inputs_are_typed_and_recordable():
    clock, ctrl, rng = VirtualClock(), RatioController(CFG), random.Random(2)
    _, changes = drive(ctrl, clock, (4, 4), 60, 10, 8000, 20, rng)
    plan = changes[0]
    assert plan.reason is RatioReason.IMBALANCE and plan.demand.prefill_load > plan.demand.decode_load
    assert "prefill utilisation" in plan.reason_text and set(plan.inputs) >= {"arrival_rps", "imbalance"}


def test_classifier_order_header_tenant_prefix_default():
    system = [1, 2, 3, 4]
    c = ScenarioClassifier({
        "code": ScenarioSpec("code", header_values=("coding",), tenants=("acme",)),
        "rag": ScenarioSpec("rag", prefix_tokens=4, prefix_hashes=(prefix_hash(system, 4),)),
    })
    assert c.classify("coding", "", []) == "code"
    assert c.classify("rag", "acme", []) == "rag"          # header beats tenant
    assert c.classify("", "acme", system + [9]) == "code"   # tenant beats prefix
    assert c.classify("", "", system + [9, 9]) == "rag"
    assert c.classify("", "other", [4, 3, 2, 1]) == "default"


def test_a_scenario_header_is_honoured_only_for_its_tenants():
    c = ScenarioClassifier({
        "premium": ScenarioSpec("premium", header_values=("fast",), tenants=("acme",)),
        "open": ScenarioSpec("open", header_values=("any",)),
    })
    assert c.classify("fast", "acme", []) == "premium"
    assert c.classify("premium", "intruder", []) == "default"     # ignored: not its tenant
    assert c.classify("fast", "intruder", []) == "default"
    assert c.classify("fast", "", []) == "premium"                 # API keys off: no tenants to check
    assert c.classify("any", "intruder", []) == "open"             # a scenario without tenants is open


def test_a_scenario_mixing_models_is_left_alone():
    """Two models' pools in one scenario (IC-Cache's large and small): a combined split could flip
    one model's only prefill worker; the controller leaves such a scenario as it is."""
    clock, ctrl, rng = VirtualClock(), RatioController(CFG), random.Random(3)
    mixed = members((2, 2))
    mixed[0].model = mixed[2].model = "small"
    for _ in range(60):
        for _ in range(rng.randint(9, 11)):
            ctrl.observe("chat", clock.now_s(), 200, 800)        # decode-heavy: would move a prefill worker
        assert ctrl.decide("chat", SPEC, mixed, PERF, clock.now_s()) is None
        clock.advance(1.0)
    assert ctrl.decide("chat", SPEC, members((2, 2)), PERF, clock.now_s()) is not None   # one model: it acts


def test_a_workers_batch_limit_bounds_its_decode_rate():
    # A 50 ms TPOT SLO allows batches of 80 at this speed; a worker that runs at most 32 is
    # worth 32/step(32), not 80/step(80).
    capped = WorkerPerf(20_000, 0.010, 0.0005, max_batch=32)
    assert PERF.decode_batch(0.05) == 80 and capped.decode_batch(0.05) == 32
    assert capped.decode_tokens_per_s(0.05) == 32 / (0.010 + 0.0005 * 32)
    assert WorkerPerf.mean([capped, capped]).max_batch == 32        # the mean keeps it
