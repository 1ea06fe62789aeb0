"""Restart backoff of `pdserve up`'s supervisor, on explicit times; the worker thread share."""
from pdserve.launch import THREADS_ENV, RestartBackoff, threads_env, torch_threads_share


def test_backoff_doubles_for_repeated_exits_and_resets_after_the_window():
    b = RestartBackoff(base_s=0.5, max_delay_s=4.0, window_s=60.0)
    assert [b.delay_s("decode-0", t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.delay_s("prefill-0", 5.0) == 0.5            # per component
    assert b.delay_s("decode-0", 100.0) == 0.5           # a minute of quiet forgives the past


def test_each_worker_gets_an_even_share_of_the_cores_with_one_kept_for_the_control_plane():
    assert torch_threads_share(num_workers=1, num_cpus=2) == 1
    assert torch_threads_share(num_workers=2, num_cpus=16) == 5
    assert torch_threads_share(num_workers=4, num_cpus=2) == 1      # never below one thread
    assert threads_env(3, {}, num_cpus=8) == {THREADS_ENV: "2"}


def test_a_thread_count_the_user_chose_is_kept(tmp_path):
    assert threads_env(1, {THREADS_ENV: "3"}, num_cpus=64) == {}
    config = tmp_path / "pdserve.yaml"
    config.write_text("model:\n  torch_num_threads: 3\n")
    assert threads_env(1, {"PDSERVE_CONFIG": str(config)}, num_cpus=64) == {}
    config.write_text("model:\n  name: tiny\n")
    assert threads_env(1, {"PDSERVE_CONFIG": str(config)}, num_cpus=64) == {THREADS_ENV: "32"}
