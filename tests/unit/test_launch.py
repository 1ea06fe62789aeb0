"""Restart backoff of `pdserve up`'s supervisor, on explicit times."""
from pdserve.launch import RestartBackoff


def test_backoff_doubles_for_repeated_exits_and_resets_after_the_window():
    b = RestartBackoff(base_s=0.5, max_delay_s=4.0, window_s=60.0)
    assert [b.delay_s("decode-0", t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.delay_s("prefill-0", 5.0) == 0.5            # per component
    assert b.delay_s("decode-0", 100.0) == 0.5           # a minute of quiet forgives the past
