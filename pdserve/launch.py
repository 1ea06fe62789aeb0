"""Start pdserve components as processes and wait until they serve; `LocalCluster` wires a whole
local cluster (router, workers, gateway) for `pdserve up`, tests and benchmarks.

Each component prints `PDSERVE_READY component=... port=N` when it serves, so nothing guesses
ports: every component binds port 0 unless told otherwise and the launcher reads the real one.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import grpc
import httpx

from pdserve import rpc
from pdserve.certs import CertFiles, cluster_env, make_dev_pki
from pdserve.cluster_auth import ClusterCredential, TlsMaterial, new_secret
from pdserve.cpus import available_cpus

READY_MARKER = "PDSERVE_READY"
SECRET_ENV = "PDSERVE_CLUSTER__SECRET"
THREADS_ENV = "PDSERVE_MODEL__TORCH_NUM_THREADS"


def host_cpus() -> int:
    """CPUs this process may use (a container's cpuset and CPU quota, not the host's count)."""
    return available_cpus()


def torch_threads_share(num_workers: int, num_cpus: int) -> int:
    """Intra-op threads for each of `num_workers` workers sharing `num_cpus`: an even share, one
    share kept for the router and gateway. Every worker taking all cores (torch's default) makes
    their thread teams contend: on 2 cores, a tiny 1-token request took 6.0 ms of worker compute
    with 2 threads, 3.4 ms with 1 (`pdserve bench gateway`, README)."""
    return max(1, num_cpus // (num_workers + 1))


def threads_env(num_workers: int, environ: dict[str, str], num_cpus: int) -> dict[str, str]:
    """The worker environment entry for the share, unless the user chose a thread count (in the
    environment, or in the config file it names)."""
    if environ.get(THREADS_ENV):
        return {}
    from pdserve.config import load_config
    if load_config(environ=environ).model.torch_num_threads:
        return {}
    return {THREADS_ENV: str(torch_threads_share(num_workers, num_cpus))}


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    port: int
    log_lines: list[str]
    ports: dict[str, int] = field(default_factory=dict)   # per component that announced itself
    announced: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait_ready(self, timeout_s: float = 180.0) -> "Process":
        """Until it announced itself (every component it runs); raises if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while not self.announced.wait(0.1):
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"{self.name} not ready in {timeout_s} s:\n" + "\n".join(self.log_lines[-30:]))
        if not self.port:
            raise RuntimeError(f"{self.name} exited with {self.proc.wait()}:\n" + "\n".join(self.log_lines[-30:]))
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_process(name: str, args: list[str], env: dict[str, str] | None = None, timeout_s: float = 180.0,
                  echo: bool = False, components: tuple[str, ...] = ()) -> Process:
    """Ready at its first READY line, or once every one of `components` has announced itself (a
    gateway with an embedded router announces both)."""
    return spawn_process(name, args, env, echo, components).wait_ready(timeout_s)


def spawn_process(name: str, args: list[str], env: dict[str, str] | None = None, echo: bool = False,
                  components: tuple[str, ...] = ()) -> Process:
    """Start a component without waiting for it (`Process.wait_ready` does), so several can start
    at once."""
    cmd = [sys.executable, "-m", "pdserve.cli", *args]
    full_env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    started = Process(name, proc, 0, [])

    def pump() -> None:
        # Drain output for the process's whole life so it never blocks on a full pipe.
        for line in proc.stdout:
            started.log_lines.append(line.rstrip())
            if echo:
                print(f"[{name}] {line.rstrip()}", file=sys.stderr, flush=True)
            if line.startswith(READY_MARKER):
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                started.ports[fields.get("component", "")] = int(fields["port"])
                if not started.port and all(c in started.ports for c in components):
                    started.port = int(fields["port"])
                    started.announced.set()
        started.announced.set()

    threading.Thread(target=pump, daemon=True).start()
    return started


def worker_env(model: str = "tiny", kv_backends: str = "ucx,tcp", router_address: str = "",
               extra_env: dict[str, str] | None = None) -> dict[str, str]:
    return {"PDSERVE_MODEL__NAME": model, "PDSERVE_WORKER__PORT": "0",
            "PDSERVE_KVTRANSFER__BACKENDS": "[" + ",".join(f'"{b}"' for b in kv_backends.split(",")) + "]",
            "PDSERVE_WORKER__ROUTER_ADDRESS": router_address, **(extra_env or {})}


def start_worker(role: str, model: str = "tiny", kv_backends: str = "ucx,tcp", router_address: str = "",
                 extra_env: dict[str, str] | None = None, name: str | None = None, echo: bool = False,
                 wait: bool = True) -> Process:
    """`wait=False`: started, not yet ready (`Process.wait_ready`)."""
    env = worker_env(model, kv_backends, router_address, extra_env)
    proc = spawn_process(name or role, ["serve", role], env, echo=echo)
    return proc.wait_ready() if wait else proc


class RestartBackoff:
    """When a component that keeps dying may be started again: 0.5 s after its first exit,
    doubling per further exit within `window_s`, at most `max_delay_s`."""

    def __init__(self, base_s: float = 0.5, max_delay_s: float = 30.0, window_s: float = 60.0):
        self.base_s, self.max_delay_s, self.window_s = base_s, max_delay_s, window_s
        self._exits: dict[str, list[float]] = {}

    def delay_s(self, name: str, now_s: float) -> float:
        """Record an exit of `name` at `now_s` and return how long to wait before restarting it."""
        recent = [t for t in self._exits.get(name, []) if now_s - t < self.window_s] + [now_s]
        self._exits[name] = recent
        return min(self.max_delay_s, self.base_s * 2 ** (len(recent) - 1))


@dataclass
class LocalCluster:
    """Router + prefill/decode (and optionally aggregated) workers + gateway on loopback."""

    model: str = "tiny"
    num_prefill: int = 1
    num_decode: int = 1
    num_aggregated: int = 0
    # More worker pools of other models: (model, num_prefill, num_decode) each (IC-Cache's small
    # model). Each pool is its own scenario, named after its model: its own P/D ratio control.
    extra_pools: tuple[tuple[str, int, int], ...] = ()
    gateway_port: int = 0
    router_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    echo: bool = False
    # Carried by every call between the components; a fresh one per cluster unless env names one.
    cluster_secret: str = ""
    # Mutual TLS between the components and HTTPS at the gateway, with a fresh development CA.
    tls: bool = False
    # The router inside the gateway's process (gateway.embedded_router): one process fewer, one
    # gRPC hop fewer per request. Its process is named "gateway".
    embedded_router: bool = False
    # Intra-op threads each worker was given (threads_env); 0 where the user chose them.
    worker_torch_threads: int = 0
    processes: list[Process] = field(default_factory=list)
    _recipes: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _certs: dict[str, CertFiles] = field(default_factory=dict)
    _tls_dir: pathlib.Path | None = None

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        self.cluster_secret = self.cluster_secret or self.env.get(SECRET_ENV) or new_secret()
        # Environment, not command line: other users on the host can read a command line in ps.
        self.env = {**self.env, SECRET_ENV: self.cluster_secret}
        try:
            if self.tls:
                self._tls_dir = pathlib.Path(tempfile.mkdtemp(prefix="pdserve-tls-"))
                self._certs = make_dev_pki(self._tls_dir)
            if self.embedded_router:
                self._start_embedded()
            else:
                router = self._launch("router", ["serve", "router"], {
                    **self._env_of("router"), "PDSERVE_ROUTER__PORT": str(self.router_port)})
                # A restarted router comes back on the same port: workers and the gateway keep its address.
                self.router_port = router.port
                self.router_address = f"127.0.0.1:{router.port}"
            pools = [(self.model, "", {}, (("prefill", self.num_prefill), ("decode", self.num_decode),
                                            ("aggregated", self.num_aggregated)))]
            pools += [(model, f"{model}-", {"PDSERVE_WORKER__SCENARIO": model}, (("prefill", p), ("decode", d)))
                      for model, p, d in self.extra_pools]
            threads = threads_env(sum(n for *_, counts in pools for _, n in counts),
                                  {**os.environ, **self.env}, host_cpus())
            self.worker_torch_threads = int(threads.get(THREADS_ENV, 0))
            # Workers and the gateway need only the router, so they start together, except a
            # model's first worker: it starts alone, so the profile it times (and caches for
            # the others) is the hardware's own, not shared with other processes starting.
            for model, prefix, scenario_env, counts in pools:
                first = True
                for role, count in counts:
                    for i in range(count):
                        self._launch(f"{prefix}{role}-{i}", ["serve", role], worker_env(
                            model, router_address=self.router_address,
                            extra_env={**threads, **self._env_of("worker"), **scenario_env}), wait=first)
                        first = False
            if not self.embedded_router:
                self._launch("gateway", ["serve", "gateway"], {
                    **self._env_of("gateway"), "PDSERVE_MODEL__NAME": self.model,
                    "PDSERVE_GATEWAY__PORT": str(self.gateway_port),
                    "PDSERVE_GATEWAY__ROUTER_ADDRESS": self.router_address}, wait=False)
            for proc in self.processes:
                proc.wait_ready(timeout_s)
            if not self.embedded_router:
                self._gateway_started(self.process("gateway").port)
            self._wait_ready(timeout_s)
            return self
        except BaseException:
            self.stop()
            raise

    def _start_embedded(self) -> None:
        if self.tls:
            raise ValueError("embedded_router: the development PKI issues the router and the gateway separate "
                             "certificates; run them as two processes under tls")
        proc = self._launch("gateway", ["serve", "gateway"], {
            **self._env_of("gateway"), "PDSERVE_MODEL__NAME": self.model, "PDSERVE_GATEWAY__EMBEDDED_ROUTER": "true",
            "PDSERVE_ROUTER__PORT": str(self.router_port), "PDSERVE_GATEWAY__PORT": str(self.gateway_port)},
            components=("router", "gateway"))
        self.router_port = proc.ports["router"]
        self.router_address = f"127.0.0.1:{self.router_port}"
        self._gateway_started(proc.ports["gateway"])

    def _gateway_started(self, port: int) -> None:
        self.gateway_port = port
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    def _env_of(self, component: str) -> dict[str, str]:
        if not self.tls:
            return dict(self.env)
        files = self._certs[component]
        env = {**self.env, **cluster_env(files)}
        if component == "gateway":
            env |= {"PDSERVE_GATEWAY__TLS_CERT_FILE": str(files.cert_file),
                    "PDSERVE_GATEWAY__TLS_KEY_FILE": str(files.key_file)}
        return env

    @property
    def ca_file(self) -> pathlib.Path | None:
        """The development CA clients verify the gateway with (None without tls)."""
        return self._certs["admin"].ca_file if self.tls else None

    def cert_files(self, component: str) -> CertFiles:
        """Under tls: the certificate files of router, worker, gateway or admin (the operator's)."""
        return self._certs[component]

    @property
    def credential(self) -> ClusterCredential:
        """What a test or benchmark presents to the cluster: the secret and the admin certificate."""
        tls = None
        if self.tls:
            f = self.cert_files("admin")
            tls = TlsMaterial(f.ca_file.read_bytes(), f.cert_file.read_bytes(), f.key_file.read_bytes())
        return ClusterCredential(self.cluster_secret, tls)

    def _launch(self, name: str, args: list[str], env: dict[str, str], components: tuple[str, ...] = (),
                wait: bool = True) -> Process:
        proc = spawn_process(name, args, env, echo=self.echo, components=components)
        self._recipes[name] = (args, env)
        self.processes.append(proc)     # stop() ends it whether or not it got ready
        return proc.wait_ready() if wait else proc

    def restart(self, name: str) -> Process:
        """Start a component that exited again, as it was started (the router and the gateway on
        the ports they had)."""
        old = self.process(name)
        args, env = self._recipes[name]
        if name == "router":
            env = {**env, "PDSERVE_ROUTER__PORT": str(self.router_port)}
        elif name == "gateway":
            env = {**env, "PDSERVE_GATEWAY__PORT": str(self.gateway_port)}
            if self.embedded_router:
                env["PDSERVE_ROUTER__PORT"] = str(self.router_port)
        components = ("router", "gateway") if name == "gateway" and self.embedded_router else ()
        new = start_process(name, args, env, echo=self.echo, components=components)
        self.processes[self.processes.index(old)] = new
        return new

    def _wait_ready(self, timeout_s: float) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per readiness poll is noise
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0, verify=self._verify()).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("cluster did not become ready")

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else True

    def http_client(self, **kwargs) -> httpx.Client:
        """An HTTP client for the gateway that trusts the cluster's development CA under tls."""
        return httpx.Client(verify=self._verify(), **kwargs)

    def channel(self, target: str | int) -> grpc.aio.Channel:
        """A channel (carrying the cluster credential) to an address, or to a port on loopback."""
        return rpc.channel(f"127.0.0.1:{target}" if isinstance(target, int) else target, self.credential)

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def stop(self) -> None:
        for p in reversed(self.processes):   # gateway first, router last
            p.stop()
        self.processes.clear()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
