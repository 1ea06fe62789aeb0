"""Worker start-up on a shared host: one process at a time loads and profiles (a file lock), and
the decode profile, like the prefill one, is timed once and cached."""
import pathlib
import threading

from pdserve.config import load_config
from pdserve.workers import main
from pdserve.workers.model.loader import load_model


def test_start_up_turns_exclude_each_other(tmp_path):
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with main.start_up_turn(tmp_path):
            inside.set()
            release.wait(30)

    def second():
        with main.start_up_turn(tmp_path):
            second_in.set()
    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(30)
    b = threading.Thread(target=second)
    b.start()
    # Blocked for as long as the first holds its turn (each open of the lock file is its own
    # lock holder, as two processes' are); the timeout only bounds a failure.
    assert not second_in.wait(0.3)
    release.set()
    assert second_in.wait(30)
    a.join(30)
    b.join(30)


def test_the_decode_profile_is_timed_once_and_read_back(tmp_path, monkeypatch):
    cfg = load_config(environ={"PDSERVE_MODEL__CACHE_DIR": str(tmp_path)})
    model = load_model("tiny", pathlib.Path("/nonexistent")).model
    timed = []
    real = main.profile_decode
    monkeypatch.setattr(main, "profile_decode", lambda m: timed.append(1) or real(m))
    first = main.load_or_profile_decode(cfg, model)
    assert main.load_or_profile_decode(cfg, model) == first and len(timed) == 1
    assert all(s > 0 for s in first)
    assert not list(tmp_path.glob("*.tmp"))           # published by rename, nothing left behind
