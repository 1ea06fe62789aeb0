"""`pdserve up` supervises its components: one that dies is restarted with backoff while the rest
keeps serving, and Ctrl-C still stops everything."""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading

import httpx

from tests.conftest import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_pid(parent_pid: int, component: str) -> int | None:
    """The pid of `pdserve serve <component>` started by `parent_pid`."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent_pid and b"serve" in cmdline and component.encode() in cmdline:
            return int(entry.name)
    return None


def test_a_killed_worker_is_restarted_and_the_cluster_serves_again(tmp_path):
    port = _free_port()
    env = {**os.environ, "PDSERVE_DATABASE__URL": f"sqlite:///{tmp_path}/d.db"}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--model", "tiny", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "tiny", "prompt": "still there?", "max_tokens": 3}
    try:
        assert wait_until(lambda: any("pdserve is up" in line for line in lines), timeout_s=180), lines[-20:]
        assert httpx.post(url, json=body, timeout=30).status_code == 200
        decode_pid = _child_pid(proc.pid, "decode")
        assert decode_pid is not None
        os.kill(decode_pid, signal.SIGKILL)
        assert wait_until(lambda: any("decode-0 restarted" in line for line in lines), timeout_s=120), lines[-20:]
        assert any("decode-0 exited with code -9" in line for line in lines)
        assert wait_until(lambda: httpx.post(url, json=body, timeout=30).status_code == 200, timeout_s=60)
        assert proc.poll() is None                       # the cluster never went down
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
