"""`pdserve bench kv` ends with an error, not a hang, when its receiver process dies, and times a
transfer up to the receiver seeing it done, not up to the harness's pipe telling the sender."""
import pytest

from pdserve.bench import kv


def _dies_at_start(*args):
    raise SystemExit(3)


def test_a_receiver_that_dies_at_start_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(kv, "receiver_main", _dies_at_start)
    with pytest.raises(RuntimeError, match="exited \\(code 3\\)"):
        kv.run(["tcp"], [0.25], num_layers=1, repeats=1)


def test_latency_ends_where_the_receiver_saw_the_transfer_done():
    (row,) = [r for r in kv.run(["tcp"], [0.25], num_layers=2, repeats=5)["results"] if r["backend"] == "tcp"]
    # The receiver's stamp comes before the pipe carries it back (run() checks each transfer).
    assert 0 < row["latency_p50_ms"] <= row["reply_p50_ms"]
    assert row["gbps"] > 0
