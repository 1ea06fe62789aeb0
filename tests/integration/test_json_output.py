"""`--json` prints exactly one JSON document on stdout: UCX's log and library warnings go to
stderr. Run as a user would, in a fresh process, without the test suite's UCX settings."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_bench_kv_json_is_one_document_with_ucx_in_play():
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "kv", "--json", "--backends", "ucx,tcp",
                          "--sizes-mib", "0.25", "--repeats", "2"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)          # fails on any stray line before or after the document
    assert {r["backend"] for r in report["results"]} == {"memcpy", "ucx", "tcp"}
    transfers = [r for r in report["results"] if r["backend"] != "memcpy"]
    assert all(r["size_mib"] == 0.25 and 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] for r in transfers)
    assert "UCX" not in out.stdout


@pytest.mark.timeout(900)
def test_bench_chaos_json_reports_every_fault_and_nothing_held():
    """A short chaos run as a user would start it: every fault is reported, the cluster recovers
    from each, no request hangs and no worker holds KV, requests or transfers afterwards."""
    try:
        # Two of the four faults: each one has its own test in tests/faults; this one checks the
        # benchmark's report (and keeps CI within its time).
        out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "chaos", "--json", "--rate", "2",
                              "--gap-s", "3", "--faults", "kill-decode,restart-router"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=840)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench chaos ran past 840 s; its log ends:\n{(exc.stderr or b'')[-4000:]!r}")
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert all(f["recovered_s"] is not None for f in report["faults"]), report["faults"]
    assert [f["fault"] for f in report["faults"]] == ["sigkill decode", "router restart"]
    assert report["hung"] == 0
    assert report["leaked_total"] == 0, report["held_after_run"]
    assert report["completed"] > 0


def test_bench_auth_json_compares_the_channel_kinds():
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "auth", "--json", "--calls", "20",
                          "--rounds", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    for kind in ("unary", "stream"):
        assert set(report["results"][kind]) == {"bare", "plain", "secret", "secret_by_interceptor", "mtls_and_secret"}
        assert report["results"][kind]["bare"]["p50_ratio_to_bare"] == 1.0


@pytest.mark.parametrize("stream_tokens,decode_load", [(0, 0), (3, 0), (0, 1)])
def test_bench_timeline_json_has_every_stage_in_order(stream_tokens, decode_load):
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "timeline", "--json", "--requests", "2",
                          "--prefill", "1", "--decode", "1", "--kv-backend", "tcp", "--stream-tokens", str(stream_tokens),
                          "--decode-load", str(decode_load), "--load-context-tokens", "64"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    assert report["output_tokens"] == max(1, stream_tokens) and report["streamed"] == bool(stream_tokens)
    assert report["errors"] == {}
    if decode_load:     # the load streamed throughout, without errors
        load = report["decode_load"]
        assert load["streams"] == 1 and load["chunks_per_s"] > 0 and load["errors"] == {}, load
    else:
        assert report["decode_load"] is None
    # Causally ordered in every request, so in their medians too (prefill.trailer_sent is not:
    # the backend's thread may deliver the trailer before the handler marks it sent; nor is
    # decode.kv_imported: the first chunk goes out while the KV is imported).
    # A streamed answer's first chunk goes on while the rest is generated: the gateway's stages
    # follow the first chunk, not the last.
    ending = ["router.last_chunk"] if stream_tokens else ["router.last_chunk", "gateway.first_chunk", "gateway.answered"]
    expected = ["client.sent", "gateway.received", "router.received", "decode.reserve_received", "router.reserved",
                "prefill.received", "prefill.computed", "decode.kv_arrived", "decode.chunk", *ending, "client.received"]
    unordered = {"prefill.trailer_sent", "prefill.acked", "decode.kv_imported"}
    for kind, k in report["kinds"].items():
        at = {s["stage"]: s["at_ms_p50"] for s in k["stages"]}
        assert set(expected) | unordered <= set(at), (kind, sorted(at))
        assert at["decode.kv_imported"] > at["decode.kv_arrived"], (kind, at)
        assert 0 < k["ttft_ms_p50"] <= k["end_to_end_ms_p50"]
        if stream_tokens:
            assert at["decode.chunk"] < at["gateway.first_chunk"] <= at["gateway.answered"] < at["client.received"]
            assert k["ttft_ms_p50"] < k["end_to_end_ms_p50"]
        assert [at[s] for s in expected] == sorted(at[s] for s in expected), (kind, at)
    assert report["kinds"]["cached"]["cached_tokens_p50"] > 0 == report["kinds"]["cold"]["cached_tokens_p50"]
