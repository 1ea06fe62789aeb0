"""Start worker processes and wait until they serve (used by tests, benches and `pdserve up`)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from pdserve.workers.main import READY_MARKER


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    port: int
    role: str
    log_lines: list[str]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(role: str, model: str = "tiny", kv_backends: str = "ucx,tcp", timeout_s: float = 120.0,
                 extra_env: dict[str, str] | None = None) -> WorkerProcess:
    cmd = [sys.executable, "-m", "pdserve.cli", "worker", "--role", role, "--model", model,
           "--port", "0", "--kv-backends", kv_backends]
    env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **(extra_env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    port_box: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        # Keep draining output for the process's whole life so it never blocks on a full pipe.
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(READY_MARKER):
                port_box.append(int(line.split("port=")[1]))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{role} worker not ready in {timeout_s} s:\n" + "\n".join(lines[-30:]))
    if not port_box:
        raise RuntimeError(f"{role} worker exited with {proc.wait()}:\n" + "\n".join(lines[-30:]))
    return WorkerProcess(proc, port_box[0], role, lines)
