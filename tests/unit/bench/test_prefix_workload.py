"""The prefix benchmark's workload: whole conversations, equal trace blocks -> equal tokens."""
from pdserve.bench.prefix import conversation_key, prompt_ids, sample_conversations, upper_bound_hit_rate, workload
from pdserve.traces import TraceRequest, load_mooncake


def _req(arrival_s: float, hashes: list[int], input_tokens: int) -> TraceRequest:
    return TraceRequest(arrival_s=arrival_s, input_tokens=input_tokens, output_tokens=1, block_hashes=tuple(hashes))


def test_equal_block_hashes_give_equal_token_prefixes():
    a = prompt_ids(_req(0, [0, 7, 8], 3 * 512), 16)
    b = prompt_ids(_req(1, [0, 7, 9], 3 * 512), 16)
    assert len(a) == len(b) == 48
    assert a[:32] == b[:32] and a[32:] != b[32:]


def test_sampling_keeps_whole_conversations():
    trace = [_req(0, [0, 20, 21], 1000), _req(1, [0, 21], 900), _req(2, [0, 20, 21, 22], 1500),
             _req(3, [0, 40], 600), _req(4, [0], 100)]
    kept = sample_conversations(trace, 20)
    assert [r.arrival_s for r in kept] == [0, 2, 3, 4]     # keys 20, 20, 40 and a lone opening block
    assert {conversation_key(r) % 20 for r in kept} == {0}
    assert sample_conversations(trace, 1) == trace


def test_whole_conversations_keep_the_reuse_a_consecutive_slice_loses():
    trace = load_mooncake("conversation")
    sampled, _ = workload(sample_conversations(trace, 20), 16, 4000)
    consecutive, _ = workload(trace[:len(sampled)], 16, 4000)
    assert upper_bound_hit_rate([ids for _, ids in sampled]) > 2 * upper_bound_hit_rate([ids for _, ids in consecutive])


def test_idle_floor_prompts_share_exactly_the_stated_prefix():
    from pdserve.bench.prefix import floor_prompts
    p = floor_prompts(388, 0.43, num_samples=5)
    shared = p["warm"][0][:167]
    assert all(len(ids) == 388 for kind in p.values() for ids in kind)
    assert all(ids[:167] == shared for ids in p["partial"])                # round(388 * 0.43) tokens
    assert len({tuple(ids[167:]) for ids in [*p["partial"], p["warm"][0]]}) == 6   # then each its own
    assert len({tuple(ids[:16]) for ids in p["cold"]}) == 5                 # nothing shared among cold ones
    assert all(ids[:16] != shared[:16] for ids in p["cold"])
    assert p["cached"] == [p["warm"][1]] * 5


def test_the_compute_only_ratio_is_the_median_left_to_compute_over_the_median_prompt():
    from pdserve.bench.prefix import compute_only_ttft_p50_ratio
    first = list(range(64))
    prompts = [first, first + [7] * 32, [9] * 96, first + [7] * 32 + [8] * 32]
    # 16-token blocks; left to compute: 64, 32 (first cached), 96, 32 (first 96 cached)
    assert compute_only_ttft_p50_ratio(prompts) == 64 / 96
    assert compute_only_ttft_p50_ratio([]) == 0.0


def test_hit_rate_by_role_sums_each_roles_workers_gauges():
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from pdserve.bench.prefix import _hit_rate_by_role
    registry = CollectorRegistry()
    gauges = {k: Gauge(f"pdserve_worker_prefix_{k}_tokens", k, ["worker_id", "role"], registry=registry)
              for k in ("query", "hit")}
    for worker_id, role, query, hit in (("p0", "prefill", 100, 30), ("p1", "prefill", 100, 10),
                                        ("d0", "decode", 200, 100)):
        gauges["query"].labels(worker_id, role).set(query)
        gauges["hit"].labels(worker_id, role).set(hit)
    assert _hit_rate_by_role(generate_latest(registry).decode()) == {"decode": 0.5, "prefill": 0.2}


def test_ttft_by_tokens_computed_buckets_requests_and_counts_those_sent_to_an_idle_cluster():
    from pdserve.bench.prefix import ttft_by_tokens_computed
    records = [(0.0, 5, 0.010), (1.0, 20, 0.030), (1.01, 300, 0.050), (2.0, 2000, 0.200), (3.0, 40, 0.020)]
    out = ttft_by_tokens_computed(records)
    # The request sent at 1.01 s found the one sent at 1.0 s still in flight; the others found none.
    assert out["sent_while_none_in_flight"] == 0.8
    assert out["by_range"] == [
        {"tokens_computed": "0-31", "requests": 2, "ttft_p50_ms": 30.0},
        {"tokens_computed": "32-127", "requests": 1, "ttft_p50_ms": 20.0},
        {"tokens_computed": "256-511", "requests": 1, "ttft_p50_ms": 50.0},
        {"tokens_computed": "1024+", "requests": 1, "ttft_p50_ms": 200.0}]
    assert ttft_by_tokens_computed([]) == {"sent_while_none_in_flight": None, "by_range": []}
