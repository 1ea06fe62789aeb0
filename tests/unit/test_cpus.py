"""A worker's CPUs: affinity capped by the cgroup CPU quota, read as Kubernetes sets it."""
import pathlib

from pdserve.cpus import available_cpus, affinity_cpus, cgroup_cpu_quota, default_worker_threads


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_cgroup(tmp_path):
    _write(tmp_path / "kubepods/pod1/cpu.max", "250000 100000\n")
    assert cgroup_cpu_quota("0::/kubepods/pod1\n", tmp_path) == 2.5


def test_cgroup_v2_in_a_container_namespace_reads_the_root(tmp_path):
    _write(tmp_path / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_quota("0::/\n", tmp_path) == 2.0


def test_cgroup_v2_without_a_limit(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota("0::/\n", tmp_path) is None


def test_cgroup_v1_quota_under_either_mount_name(tmp_path):
    _write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000\n")
    _write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert cgroup_cpu_quota(text, tmp_path) == 1.5


def test_cgroup_v1_unlimited_and_unreadable(tmp_path):
    _write(tmp_path / "cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota("3:cpu:/\n", tmp_path) is None
    assert cgroup_cpu_quota("3:cpu:/\n", tmp_path / "missing") is None
    assert cgroup_cpu_quota("garbage\n", tmp_path) is None


def test_available_cpus_never_exceeds_affinity_and_is_at_least_one():
    assert 1 <= available_cpus() <= affinity_cpus()


def test_a_worker_left_to_choose_runs_half_the_cpus_never_none():
    assert [default_worker_threads(n) for n in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 32]


def test_a_lone_worker_sets_torch_to_its_default_unless_configured():
    import torch

    from pdserve.config import PDServeConfig
    from pdserve.workers.main import configure_torch_threads
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(PDServeConfig(), num_cpus=8) == 4 == torch.get_num_threads()
        assert configure_torch_threads(PDServeConfig(model={"torch_num_threads": 3}), num_cpus=8) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
