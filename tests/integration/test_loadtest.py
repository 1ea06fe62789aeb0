"""`pdserve loadtest --local`: Locust, headless, replays a 20-second slice of the packaged Azure
conv trace open-loop against a real tiny cluster, as a user would run it (fresh process, --json)."""
import json
import subprocess
import sys

import pytest

from pdserve.loadtest.workload import plan
from tests.conftest import REPO_ROOT

SLICE_S = 15.0


@pytest.mark.timeout(600)
def test_locust_replays_a_trace_slice_open_loop(tmp_path):
    args = ["--trace", "azure-conv", "--minutes", str(SLICE_S / 60), "--speedup", "1",
            "--max-input-tokens", "256", "--max-output-tokens", "16"]
    expected = plan("azure-conv", None, SLICE_S / 60, 1.0, 256, 16)
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "loadtest", "--local", *args, "--out", str(tmp_path),
                          "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout)                    # one document, Locust's tables went to stderr
    everything = summary["all"]
    assert summary["planned"] == len(expected) > 20 and summary["complete"]
    assert everything["sent"] == everything["completed"] == len(expected), everything["failed_by_status"]
    assert everything["send_lateness_ms"]["p99"] <= 50.0, everything["send_lateness_ms"]

    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [(r["input_tokens"], r["max_tokens"]) for r in rows] == [(p.input_tokens, p.output_tokens) for p in expected]
    # Exact lengths: each prompt encodes to the trace's count, each output is as long as asked.
    assert all(r["prompt_tokens_reported"] == r["input_tokens"] and r["output_tokens"] == r["max_tokens"]
               for r in rows)
    assert all(abs(r["intended_s"] - p.send_s) < 1e-9 for r, p in zip(rows, expected))
    # Locust's own report agrees: its end-of-run JSON (its CSV is a once-a-second snapshot).
    [entry] = [e for e in json.loads((tmp_path / "locust_stats.json").read_text()) if e["name"] == "completions [conv]"]
    assert (entry["method"], entry["num_requests"], entry["num_failures"]) == ("POST", len(expected), 0)
    assert (tmp_path / "locust_stats.csv").stat().st_size > 0
    for name in ("latency_over_time.png", "attainment.png", "locust.html", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
