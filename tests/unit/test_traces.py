"""Traces ship inside the package; a user's own trace file in any of the three formats loads the
same way, and a bad one gets a one-line error naming the file and line."""
import gzip
import json
import subprocess
import sys

import pytest

from pdserve import traces


def test_builtin_traces_load_from_the_package_with_their_licences():
    for name in traces.BUILTIN:
        reqs = traces.load(name, limit=100)
        assert len(reqs) == 100 and reqs[0].arrival_s == 0.0
        assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert len(traces.load("azure-conv")) == 19366         # the whole trace, not a sample
    for folder in ("azure2023", "mooncake_fast25"):
        for required in ("LICENSE", "ATTRIBUTION.md", "SOURCE.txt"):
            assert (traces.DATA_DIR / folder / required).is_file()
    assert traces.load_mooncake("conversation", limit=1)[0].block_hashes[:2] == (0, 1)


def test_the_three_file_formats(tmp_path):
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.1805900,10,0\n")
    mooncake = tmp_path / "m.jsonl.gz"
    with gzip.open(mooncake, "wt") as f:
        f.write(json.dumps({"timestamp": 1000, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]}) + "\n")
        f.write(json.dumps({"timestamp": 1500, "input_length": 20, "output_length": 1}) + "\n")
    plain = tmp_path / "p.csv"
    plain.write_text("timestamp_s,input_tokens,output_tokens,session_id\n5.0,100,10,s1\n4.5,50,3,s2\n")
    headerless = tmp_path / "h.csv"
    headerless.write_text("0,100,10\n0.25,50,3\n")

    a = traces.load_file(azure)
    assert [(round(r.arrival_s, 3), r.input_tokens, r.output_tokens) for r in a] == [(0, 374, 44), (0.5, 10, 0)]
    m = traces.load_file(mooncake)
    assert [(r.arrival_s, r.block_hashes) for r in m] == [(0.0, (7, 8)), (0.5, ())]
    p = traces.load_file(plain)       # sorted by time and rebased to the first request
    assert [(r.arrival_s, r.input_tokens, r.session_id) for r in p] == [(0.0, 50, "s2"), (0.5, 100, "s1")]
    assert [r.arrival_s for r in traces.load_file(headerless)] == [0.0, 0.25]


@pytest.mark.parametrize("name, text, message", [
    ("bad.csv", "timestamp_s,input_tokens,output_tokens\n0,10,2\n1,ten,2\n", "bad.csv:3: input_tokens must be an integer"),
    ("bad.csv", "0,10\n", "bad.csv:1: expected timestamp_s,input_tokens,output_tokens[,session_id], got 2 fields"),
    ("bad.csv", "-1,10,2\n", "bad.csv:1: timestamp_s must be a finite number >= 0"),
    ("bad.csv", "0,0,2\n", "bad.csv:1: input_tokens must be at least 1"),
    ("bad.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1\n', "bad.jsonl:2: not JSON"),
    ("bad.jsonl", '{"timestamp": 0, "output_length": 1}\n', "bad.jsonl:1: missing field(s) input_length"),
    ("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,3,4\n", "bad.csv:2: TIMESTAMP is not a date"),
    ("empty.csv", "", "empty.csv: no requests in the trace"),
    ("bin.csv.gz", "not gzip at all", "bin.csv.gz: cannot read"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(traces.TraceError) as err:
        traces.load_file(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_unknown_name():
    with pytest.raises(traces.TraceError, match="cannot read"):
        traces.load_file("/nonexistent/trace.csv")
    with pytest.raises(traces.TraceError, match="built in: azure-conv"):
        traces.load("azure-chat")


def test_cli_reports_a_bad_trace_file_in_one_line(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("0,10,2\n1,10\n")
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "sim", "--trace-file", str(bad), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"pdserve: error: {bad}:2: expected "
                                               "timestamp_s,input_tokens,output_tokens[,session_id], got 2 fields"]


def test_sim_replays_a_trace_file(tmp_path):
    from pdserve.sim import compare

    path = tmp_path / "mine.csv"
    path.write_text("".join(f"{i * 0.5},{200 + i},{20 + i % 7}\n" for i in range(60)))
    report = compare.run(minutes=1, speedup=1, workers_per_scenario=2, trace_file=path)
    assert report["workload"] == str(path) and report["num_requests"] == 60
