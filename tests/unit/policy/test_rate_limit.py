"""Per-key token buckets on a virtual clock: bursts up to a minute's allowance, then the average
rate; a refusal charges nothing and says how long to wait; keys do not share buckets."""
import pytest

from pdserve.policy.rate_limit import KeyLimits, RateLimiter, retry_after_header


def test_requests_per_minute_allow_a_burst_then_the_average_rate():
    rl, limits = RateLimiter(), KeyLimits(requests_per_minute=6)
    assert all(rl.admit("k", limits, 10, now_s=0.0).admitted for _ in range(6))
    refused = rl.admit("k", limits, 10, now_s=0.0)
    assert not refused.admitted and not refused.never
    assert refused.retry_after_s == pytest.approx(10.0)     # 6 per minute: one every 10 s
    assert "6 requests per minute" in refused.reason
    assert not rl.admit("k", limits, 10, now_s=9.9).admitted
    assert rl.admit("k", limits, 10, now_s=10.0).admitted
    assert not rl.admit("k", limits, 10, now_s=10.0).admitted


def test_tokens_per_minute_count_prompt_plus_max_tokens_and_a_refusal_charges_nothing():
    rl, limits = RateLimiter(), KeyLimits(requests_per_minute=100, tokens_per_minute=600)
    assert rl.admit("k", limits, 500, now_s=0.0).admitted
    refused = rl.admit("k", limits, 200, now_s=0.0)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(10.0)   # 100 tokens at 10/s
    assert rl.admit("k", limits, 100, now_s=0.0).admitted    # the refused request took nothing
    assert not rl.admit("k", limits, 1, now_s=0.0).admitted


def test_a_request_larger_than_the_limit_is_refused_for_good():
    decision = RateLimiter().admit("k", KeyLimits(tokens_per_minute=100), 101, now_s=0.0)
    assert not decision.admitted and decision.never and "more than the key's limit" in decision.reason


def test_keys_have_their_own_buckets_and_zero_means_no_limit():
    rl, limits = RateLimiter(), KeyLimits(requests_per_minute=1)
    assert rl.admit("a", limits, 1, 0.0).admitted and rl.admit("b", limits, 1, 0.0).admitted
    assert not rl.admit("a", limits, 1, 0.0).admitted
    assert all(rl.admit("c", KeyLimits(), 10**9, 0.0).admitted for _ in range(1000))


def test_a_lowered_limit_applies_at_once():
    rl = RateLimiter()
    assert rl.admit("k", KeyLimits(requests_per_minute=60), 1, 0.0).admitted
    assert rl.admit("k", KeyLimits(requests_per_minute=1), 1, 0.0).admitted   # bucket capped at 1, then spent
    assert not rl.admit("k", KeyLimits(requests_per_minute=1), 1, 0.0).admitted


def test_retry_after_is_whole_seconds_rounded_up():
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 9.01)] == ["1", "1", "1", "10"]
