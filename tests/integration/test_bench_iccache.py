"""`pdserve bench iccache` end to end on two tiny models and a small trivia list: every policy
answers every held-out question through a real cluster, and the report says who answered, with
how many examples, and what each pool was sent."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

LISTS = pathlib.Path(__file__).parents[1] / "data" / "trivia"
HELD_OUT, POOL = 6, 10


def test_bench_iccache_reports_every_policy_on_one_json_document():
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "iccache", "--large-model", "tiny-large",
                           "--small-model", "tiny", "--held-out", str(HELD_OUT), "--train", "4", "--pool", str(POOL),
                           "--lists-dir", str(LISTS), "--json"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    rows = r["results"]
    assert list(rows) == ["always_large", "always_small", "small_random_examples", "semantic_cache_0.8",
                          "semantic_cache_0.9", "iccache"]
    for name, row in rows.items():
        assert row["requests"] == row["answered"] == HELD_OUT and row["errors"] == {}, (name, row)
        assert row["throughput_rps"] > 0 and row["latency_p50_ms"] <= row["latency_p99_ms"]
        lo, hi = row["exact_match_ci95"]
        assert lo <= row["exact_match"] <= hi
    assert rows["always_large"]["answered_by"] == {"tiny-large": HELD_OUT}
    assert rows["always_small"]["answered_by"] == {"tiny": HELD_OUT} and rows["always_small"]["offload_ratio"] == 1
    assert rows["small_random_examples"]["mean_examples"] == 3
    for name in ("semantic_cache_0.8", "semantic_cache_0.9"):
        assert set(rows[name]["answered_by"]) <= {"tiny-large", "cache"}
    assert set(rows["iccache"]["answered_by"]) <= {"tiny-large", "tiny"}
    state = r["iccache_state"]
    assert r["pool"] == POOL and state["routed"] >= POOL + 4 + HELD_OUT and state["num_examples"] > 0
    # Examples before the question are prefill work on the small pool. The tiny model's tokens are
    # bytes, and each shot is at least "Question: ...?\nAnswer: \n\n" (30 bytes and more).
    plain, shots = rows["always_small"]["pools"]["tiny"], rows["small_random_examples"]["pools"]["tiny"]
    assert shots["prompt_tokens"] - plain["prompt_tokens"] >= HELD_OUT * 3 * 30 and plain["prompt_tokens"] > 0
    assert "controller_split" in shots and sum(shots["controller_split"]) == r["fleet_workers"]
    assert rows["always_small"]["pools"]["tiny-large"]["requests"] == 0
    assert "exact_match_difference" in rows["iccache"]["vs_always_large"] and "large_beats_small" in r
