"""`pdserve bench kv` ends with an error, not a hang, when its receiver process dies."""
import pytest

from pdserve.bench import kv


def _dies_at_start(conn, backends):
    raise SystemExit(3)


def test_a_receiver_that_dies_at_start_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(kv, "receiver_main", _dies_at_start)
    with pytest.raises(RuntimeError, match="exited \\(code 3\\)"):
        kv.run(["tcp"], [0.25], num_layers=1, repeats=1)
