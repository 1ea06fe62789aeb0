"""`pdserve up` as a user runs it, with an admin token, shared by this module's tests: the
dashboard is refused without the token, and in headless Chromium (Debian's chromium +
chromium-driver) it shows the cluster's workers and P/D split after signing in (the screenshot
lands in $PDSERVE_SCREENSHOT_DIR when set: the README's). The last test stops it with Ctrl-C."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

TOKEN = "dashboard-test-admin-token"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Up:
    url: str
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """`pdserve up` as a user runs it, with the admin token in its environment, and some traffic."""
    port, db = _free_port(), tmp_path_factory.mktemp("dashboard") / "d.db"
    env = {**os.environ, "PDSERVE_DATABASE__URL": f"sqlite:///{db}", "PDSERVE_ROUTER__ADMIN_TOKEN": TOKEN,
           "UCX_WARN_UNUSED_ENV_VARS": "n"}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--model", "tiny", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "pdserve is up" in line or time.monotonic() > deadline:
                break
        assert f"pdserve is up: http://127.0.0.1:{port}/v1" in line, "the cluster did not come up"
        url = f"http://127.0.0.1:{port}"
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for i in range(6):
            assert oai.completions.create(model="tiny", prompt=f"traffic {i}", max_tokens=4).usage.completion_tokens >= 1
        yield Up(url, proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_state_is_refused_without_the_token_and_describes_the_cluster_with_it(up):
    assert httpx.get(f"{up.url}/dashboard").status_code == 401
    assert httpx.get(f"{up.url}/dashboard/state").status_code == 401
    state = httpx.get(f"{up.url}/dashboard/state", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert state["router_error"] is None and state["model"] == "tiny"
    assert sorted(w["role"] for w in state["workers"] if w["alive"]) == ["decode", "prefill"]
    assert all(w["kv_total_blocks"] > 0 for w in state["workers"])
    assert state["router"]["routed"] >= 6 and state["router"]["rejected"] == 0
    default = next(s for s in state["scenarios"] if s["name"] == "default")
    assert default["live"]["prefill"] == 1 and default["live"]["decode"] == 1
    assert default["ttft_slo_ms"] == 2000.0 and default["decisions"] == []   # the router's defaults, no change yet
    assert state["gateway"]["ok"] >= 6 and state["gateway"]["ttft_ms"]["p50"] > 0


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(.ci/run installs them: apt-get install chromium chromium-driver)")
def test_browser_signs_in_and_sees_workers_and_the_pd_chart(up, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{up.url}/dashboard")
        assert driver.find_elements(By.ID, "token"), "without the token the page asks for it"
        assert not driver.find_elements(By.ID, "workers")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "sign-in").click()
        wait = WebDriverWait(driver, 60)
        rows = wait.until(lambda d: len(r := d.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2 and r)
        assert sorted(r.find_element(By.CSS_SELECTOR, ".role").text for r in rows) == ["decode", "prefill"]
        chart = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.pd-chart[data-scenario='default']"))[0]
        for role in ("prefill", "decode"):
            assert chart.find_element(By.CSS_SELECTOR, f"path.{role}").get_attribute("d").startswith("M")
        assert "1 prefill, 1 decode" in driver.find_element(By.CSS_SELECTOR, "#scenarios h3").text
        assert driver.find_element(By.CSS_SELECTOR, "#latency-chart path.p50").get_attribute("d").startswith("M")
        wait.until(lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed") or 0) >= 2)
        out = pathlib.Path(os.environ.get("PDSERVE_SCREENSHOT_DIR", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(out / "dashboard.png"))
    finally:
        driver.quit()


def test_pdserve_up_stops_cleanly_on_ctrl_c(up):
    """Last in this module: Ctrl-C stops every component, exit status 0, the port is closed."""
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{up.url}/health")
