"""How many CPUs this process may use, and how many torch threads a worker should run.

torch sizes its thread teams by the CPUs the process may be scheduled on, which in a container
with a CPU limit (Kubernetes `resources.limits.cpu`, a CFS quota) is every core of the node: a
pod limited to 2 CPUs on a 64-core node would run teams of 64 threads and spend its quota
spinning and being throttled. The quota is read from the cgroup (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`) of this process.
"""
from __future__ import annotations

import math
import os
import pathlib

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
# A worker runs torch on two threads (the prefill runner and the engine's compute thread); each
# gets its own OpenMP team. Teams that together outnumber the CPUs make libgomp stop spinning
# between operators, and small operators then run about twice as slowly (README, worker threads).
WORKER_COMPUTE_THREADS = 2


def affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cgroup_cpu_quota(proc_cgroup: str, root: pathlib.Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (fractional), or None when there is no quota or none is
    readable. `proc_cgroup`: the text of /proc/self/cgroup."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":                               # cgroup v2
            for base in (root / rel, root):
                if (quota := _read_v2(base / "cpu.max")) is not None:
                    return quota
        elif "cpu" in controllers.split(","):               # cgroup v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for base in (mount / rel, mount):
                    if (quota := _read_v1(base)) is not None:
                        return quota
    return None


def _read_v2(path: pathlib.Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)


def _read_v1(base: pathlib.Path) -> float | None:
    try:
        quota = int((base / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by its cgroup's CPU quota (rounded up)."""
    cpus = affinity_cpus()
    try:
        quota = cgroup_cpu_quota(pathlib.Path("/proc/self/cgroup").read_text())
    except OSError:
        quota = None
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def default_worker_threads(num_cpus: int) -> int:
    """torch intra-op threads for a worker left to choose: its compute threads' teams fit the CPUs."""
    return max(1, num_cpus // WORKER_COMPUTE_THREADS)
