"""`--json` prints exactly one JSON document on stdout: UCX's log and library warnings go to
stderr. Run as a user would, in a fresh process, without the test suite's UCX settings."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_bench_kv_json_is_one_document_with_ucx_in_play():
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "kv", "--json", "--backends", "ucx,tcp",
                          "--sizes-mib", "1", "--repeats", "1"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)          # fails on any stray line before or after the document
    assert {r["backend"] for r in report["results"]} == {"memcpy", "ucx", "tcp"}
    assert "UCX" not in out.stdout
