"""benchmarks/timeline_ab.py compares the same metric of both checkouts, round by round."""
import importlib.util

from tests.conftest import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("timeline_ab", REPO_ROOT / "benchmarks" / "timeline_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(ttft_ms: float, reserve_ms: float) -> dict:
    stages = [{"stage": "client.sent", "at_ms_p50": 0.0, "since_previous_ms_p50": None},
              {"stage": "router.reserved", "at_ms_p50": reserve_ms, "since_previous_ms_p50": reserve_ms}]
    return {"kinds": {"cached": {"ttft_ms_p50": ttft_ms, "end_to_end_ms_p50": ttft_ms, "stages": stages}}}


def test_ratios_are_of_the_medians_over_rounds_this_over_baseline():
    ab = _script()
    rounds = [{"this": ab.figures(_report(t, r)), "baseline": ab.figures(_report(bt, br))}
              for t, r, bt, br in [(10, 1, 20, 4), (12, 2, 18, 5), (11, 9, 30, 6)]]
    cached = ab.compare(rounds)["cached"]
    assert cached["ttft_ms_p50"] == {"this_ms": [10, 12, 11], "baseline_ms": [20, 18, 30], "ratio_of_medians": 0.55}
    assert cached["router.reserved (since previous)"]["ratio_of_medians"] == 0.4
    assert "client.sent (since previous)" not in cached      # the first stage has no previous one
