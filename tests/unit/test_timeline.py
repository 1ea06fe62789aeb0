"""The request timeline: off by default, one line per mark when on, read back per request."""
from pdserve import timeline


def test_marks_are_kept_only_while_enabled_and_read_back_per_request(tmp_path):
    path = tmp_path / "timeline.log"
    timeline.mark("gateway.received", "r0")            # off: nothing written anywhere
    timeline.enable(str(path))
    try:
        timeline.mark("gateway.received", "r1")
        timeline.mark("decode.chunk", "r1")
        timeline.mark("decode.chunk", "r1")            # a later pass of the same stage is ignored
        timeline.mark("gateway.received", "r2")
    finally:
        timeline.disable()
    timeline.mark("gateway.answered", "r1")
    got = timeline.read(path)
    assert set(got) == {"r1", "r2"} and set(got["r1"]) == {"gateway.received", "decode.chunk"}
    assert got["r1"]["gateway.received"] <= got["r1"]["decode.chunk"] <= got["r2"]["gateway.received"]
    assert len(path.read_text().splitlines()) == 4


def test_an_empty_path_leaves_it_off(tmp_path):
    timeline.enable("")
    timeline.mark("gateway.received", "r1")
    timeline.disable()
    assert list(tmp_path.iterdir()) == []
