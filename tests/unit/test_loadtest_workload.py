"""The load test's plan (which requests, when, how long) and its report, without a cluster."""
import pytest

from pdserve.loadtest.report import Outcome, percentiles, summarise
from pdserve.loadtest.workload import PromptSynthesizer, Slo, plan
from pdserve.traces import load
from pdserve.workers.model.loader import load_tokenizer
from pdserve.workers.model.tokenizer import ByteTokenizer


def test_plan_merges_scenarios_in_send_order_and_clips():
    reqs = plan("azure", None, minutes=1, speedup=4, max_input_tokens=300, max_output_tokens=20)
    conv = [r for r in load("azure-conv") if r.arrival_s < 60]
    code = [r for r in load("azure-code") if r.arrival_s < 60]
    assert len(reqs) == len(conv) + len(code)
    assert {r.scenario for r in reqs} == {"conv", "code"}
    assert all(a.send_s <= b.send_s for a, b in zip(reqs, reqs[1:]))
    assert max(r.send_s for r in reqs) < 60 / 4
    assert all(1 <= r.input_tokens <= 300 and 1 <= r.output_tokens <= 20 for r in reqs)
    assert [r.index for r in reqs] == list(range(len(reqs)))


def test_plan_from_a_file_is_one_scenario(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("0,10,5\n2,20,6\n100,30,7\n")
    assert [(r.scenario, r.send_s, r.input_tokens) for r in plan(None, str(path), 1, 2)] == [
        ("default", 0.0, 10), ("default", 1.0, 20)]


@pytest.mark.parametrize("tokenizer", ["tiny", "smollm2-135m"])
def test_prompts_encode_to_exactly_the_asked_length(tokenizer, tmp_path):
    from pdserve.config import load_config

    tok = ByteTokenizer() if tokenizer == "tiny" else load_tokenizer(tokenizer, load_config().model.cache_dir)
    synth = PromptSynthesizer(tok)
    for n in (1, 2, 7, 513, 1500):
        assert len(tok.encode(synth.prompt(n, request_seed=n))) == n
    # Trace block hashes become shared text: equal leading hashes, equal leading 512-token blocks.
    a, b = synth.prompt(1100, (1, 2, 3), 1), synth.prompt(1100, (1, 2, 4), 2)
    ta, tb = tok.encode(a), tok.encode(b)
    shared = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
    assert shared >= 1024
    assert synth.prompt(300, (), 5) != synth.prompt(300, (), 6)       # no accidental sharing otherwise


def test_report_counts_failures_by_status_and_attainment():
    slos = {"conv": Slo(100, 10)}
    ok_fast = Outcome(0, "conv", 0.0, 0.001, 10, 3, "ok", first_token_s=0.05, end_s=0.06, output_tokens=3)
    ok_slow = Outcome(1, "conv", 1.0, 1.002, 10, 3, "ok", first_token_s=1.5, end_s=1.6, output_tokens=3)
    refused = Outcome(2, "conv", 2.0, 2.030, 10, 3, "429", end_s=2.04)
    summary = summarise([ok_fast, ok_slow, refused], slos, {"trace": "t"})
    conv = summary["scenarios"]["conv"]
    assert (conv["sent"], conv["completed"], conv["failed"], conv["failed_by_status"]) == (3, 2, 1, {"429": 1})
    assert conv["slo_attainment"] == round(1 / 3, 4)
    assert conv["send_lateness_ms"]["max"] == 30.0
    assert conv["intended_rate_rps"] == 1.0 and summary["all"]["sent"] == 3
    assert percentiles([1, 2, 3, 4]) == {"p50": 2, "p90": 4, "p99": 4}
