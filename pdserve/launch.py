"""Start pdserve components as processes and wait until they serve; `LocalCluster` wires a whole
local cluster (router, workers, gateway) for `pdserve up`, tests and benchmarks.

Each component prints `PDSERVE_READY component=... port=N` when it serves, so nothing guesses
ports: every component binds port 0 unless told otherwise and the launcher reads the real one.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

READY_MARKER = "PDSERVE_READY"


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    port: int
    log_lines: list[str]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_process(name: str, args: list[str], env: dict[str, str] | None = None, timeout_s: float = 180.0,
                  echo: bool = False) -> Process:
    cmd = [sys.executable, "-m", "pdserve.cli", *args]
    full_env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    lines: list[str] = []
    port_box: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        # Drain output for the process's whole life so it never blocks on a full pipe.
        for line in proc.stdout:
            lines.append(line.rstrip())
            if echo:
                print(f"[{name}] {line.rstrip()}", file=sys.stderr, flush=True)
            if line.startswith(READY_MARKER) and not port_box:
                port_box.append(int(line.rsplit("port=", 1)[1]))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{name} not ready in {timeout_s} s:\n" + "\n".join(lines[-30:]))
    if not port_box:
        raise RuntimeError(f"{name} exited with {proc.wait()}:\n" + "\n".join(lines[-30:]))
    return Process(name, proc, port_box[0], lines)


def start_worker(role: str, model: str = "tiny", kv_backends: str = "ucx,tcp", router_address: str = "",
                 extra_env: dict[str, str] | None = None, name: str | None = None, echo: bool = False) -> Process:
    env = {"PDSERVE_MODEL__NAME": model, "PDSERVE_WORKER__PORT": "0",
           "PDSERVE_KVTRANSFER__BACKENDS": "[" + ",".join(f'"{b}"' for b in kv_backends.split(",")) + "]",
           "PDSERVE_WORKER__ROUTER_ADDRESS": router_address, **(extra_env or {})}
    return start_process(name or role, ["serve", role], env, echo=echo)


@dataclass
class LocalCluster:
    """Router + prefill/decode (and optionally aggregated) workers + gateway on loopback."""

    model: str = "tiny"
    num_prefill: int = 1
    num_decode: int = 1
    num_aggregated: int = 0
    gateway_port: int = 0
    router_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    echo: bool = False
    processes: list[Process] = field(default_factory=list)

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        try:
            router = start_process("router", ["serve", "router"],
                                   {**self.env, "PDSERVE_ROUTER__PORT": str(self.router_port)}, echo=self.echo)
            self.processes.append(router)
            self.router_address = f"127.0.0.1:{router.port}"
            for role, count in (("prefill", self.num_prefill), ("decode", self.num_decode),
                                ("aggregated", self.num_aggregated)):
                for i in range(count):
                    self.processes.append(start_worker(role, self.model, router_address=self.router_address,
                                                       extra_env=self.env, name=f"{role}-{i}", echo=self.echo))
            gateway = start_process("gateway", ["serve", "gateway"], {
                **self.env, "PDSERVE_MODEL__NAME": self.model, "PDSERVE_GATEWAY__PORT": str(self.gateway_port),
                "PDSERVE_GATEWAY__ROUTER_ADDRESS": self.router_address}, echo=self.echo)
            self.processes.append(gateway)
            self.url = f"http://127.0.0.1:{gateway.port}"
            self._wait_ready(timeout_s)
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per readiness poll is noise
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("cluster did not become ready")

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def stop(self) -> None:
        for p in reversed(self.processes):   # gateway first, router last
            p.stop()
        self.processes.clear()
