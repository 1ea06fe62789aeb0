"""The chunked-prefill aggregated baseline: decodes keep stepping while a long prompt is prefilled."""
import pytest

from pdserve.policy.baseline_routers import RoundRobin
from pdserve.sim.aggregated import AggregatedSimulation
from pdserve.sim.fleet import SimRequest
from pdserve.sim.hardware import HardwareProfile

# 1,000 prefill tokens/s, no quadratic term; a decode step costs 10 ms + 1 ms per sequence.
HW = HardwareProfile("toy", prefill_base_s=0.005, prefill_tokens_per_s=1000.0, prefill_quad_s=0.0,
                     decode_step_base_s=0.010, decode_step_per_seq_s=0.001, kv_bytes_per_token=1,
                     interconnect_bytes_per_s=1e9)


def _run(chunk_tokens):
    short = SimRequest("short", "", 0.0, 10, 6)         # decoding when the long prompt arrives
    long = SimRequest("long", "", 0.05, 1000, 2)
    AggregatedSimulation(HW, 1, RoundRobin(), {}, chunk_tokens).run([short, long])
    return short, long


def test_a_whole_prompt_stalls_the_running_decode():
    short, long = _run(None)
    assert long.first_token_s - long.arrival_s >= 1.0           # 1,000 tokens at 1,000/s
    assert short.finish_s > long.first_token_s                  # its last tokens waited for that


def test_chunks_share_steps_with_decodes_under_the_budget():
    short, long = _run(100)
    # The short request decodes its 5th token until 0.059 s; the next step carries its last
    # token beside a 99-token chunk (11 + 99 ms), then nine 100-token chunks alone (5 + 100 ms
    # each) and the prompt's last token (5 + 1 ms).
    assert long.first_token_s == pytest.approx(0.059 + 0.110 + 9 * 0.105 + 0.006, abs=1e-6)
    assert short.finish_s < 0.5 < long.first_token_s            # it kept decoding meanwhile
    assert short.num_generated_tokens == short.output_tokens and long.num_generated_tokens == long.output_tokens


def test_a_cached_prefix_is_not_prefilled_again():
    hashes = {"a": (1, 2), "b": (1, 2, 3)}
    a = SimRequest("a", "", 0.0, 1024, 1)
    b = SimRequest("b", "", 5.0, 1536, 1)
    AggregatedSimulation(HW, 1, RoundRobin(), hashes, 8192).run([a, b])
    assert b.first_token_s - b.arrival_s == pytest.approx(0.005 + 0.512, abs=1e-6)   # only the third block
