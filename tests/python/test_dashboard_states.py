"""The dashboard, driven by Playwright in headless Chromium, against a real
3-node mesh of processes: a healthy node, a drained one and one whose
backend is down render differently, and under a steady load the mesh-wide
request rate it shows matches both the sum of its per-node rates and the
rate the load actually achieved."""

import re
import shutil
import subprocess
import tempfile
import threading
import time

import openai
import pytest
from playwright.sync_api import sync_playwright

from test_clients import BIN, ROOT, agent, start, stop_all
from test_real_backend import get_json, wait_for

RATE = 10.0  # requests per second offered by the load
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def mesh():
    procs, dirs = [], [tempfile.mkdtemp(prefix="llmesh-dash-") for _ in range(3)]
    try:
        yield build_mesh(procs, dirs)
    finally:
        # Also when building it failed: nothing is left running.
        stop_all(procs, dirs)


def build_mesh(procs, dirs):
    """Three sims and three agents (healthy, drained, down); returns the
    healthy node's base URL once the drain and the dead backend show."""
    sims = []
    for _ in range(3):
        sims.append(start("sim-backend", "--listen", "127.0.0.1:0"))
        procs.append(sims[-1][0])
    first, base, boot = agent("healthy", sims[0][1], dirs[0])
    procs.append(first)
    token = next(l for l in subprocess.run([BIN, "init", "--data-dir", dirs[0]], capture_output=True, text=True,
                                           check=True).stdout.splitlines() if l.startswith("lmj2."))
    for name, (_, backend), data_dir in [("drained", sims[1], dirs[1]), ("down", sims[2], dirs[2])]:
        procs.append(agent(name, backend, data_dir, "--join", token, "--bootstrap", boot)[0])
    nodes = lambda: get_json(f"{base}/mesh/v1/nodes")["nodes"]
    wait_for("three alive nodes", lambda: sum(n["liveness"] == "alive" and n["addresses"]["data"] != "" for n in nodes()) == 3)
    # A node is a member (drainable) once the leader has added it to Raft.
    wait_for("'drained' drained", lambda: subprocess.run(
        [BIN, "node", "drain", "drained", "--node", base, "--data-dir", dirs[0], "--json"],
        capture_output=True, timeout=30).returncode == 0)
    sims[2][0].kill()
    wait_for("the drain in the cluster state",
             lambda: any(d.get("name") == "drained" for d in get_json(f"{base}/mesh/v1/cluster").get("drained", [])))
    wait_for("node 'down' gossiping its backend as down",
             lambda: any(n["name"] == "down" and not n["backend"]["healthy"] for n in nodes()))
    return base


def steady_load(base, stop, done):
    """Requests at RATE per second (paced, not back to back) until `stop`."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    started = time.monotonic()
    for i in range(int(RATE * 120)):  # bounded: two minutes at most
        if stop.is_set():
            return
        time.sleep(max(0.0, started + i / RATE - time.monotonic()))
        client.chat.completions.create(model="qwen2.5:7b", max_tokens=MAX_TOKENS,
                                       messages=[{"role": "user", "content": f"steady {i}"}])
        done.append(time.monotonic())


def test_dashboard_tells_node_states_apart_and_sums_the_mesh_rate(mesh):
    stop, done = threading.Event(), []
    load = threading.Thread(target=steady_load, args=(mesh, stop, done), daemon=True)
    load.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            time.sleep(2)  # the load is running before the page's first sample
            opened = time.monotonic()
            page.goto(f"{mesh}/")
            page.wait_for_selector("#mesh-rate[data-rate]", timeout=30_000)
            # A window of at least 10 s of steady load.
            page.wait_for_timeout(max(0, 10_000 - (time.monotonic() - opened) * 1000))
            page.wait_for_timeout(2_500)
            shown = page.evaluate("""() => ({
              states: Object.fromEntries([...document.querySelectorAll('tr.node')].map(r => [r.dataset.name, r.dataset.state])),
              colors: Object.fromEntries([...document.querySelectorAll('tr.node')].map(r => [r.dataset.name, getComputedStyle(r.querySelector('td.state')).color])),
              loaded: Object.fromEntries([...document.querySelectorAll('tr.node')].map(r => [r.dataset.name, r.querySelectorAll('.model.loaded').length])),
              rates: [...document.querySelectorAll('td.served-rate')].map(td => parseFloat(td.dataset.rate || '0')),
              mesh: parseFloat(document.querySelector('#mesh-rate').dataset.rate),
              tokens: parseFloat(document.querySelector('#mesh-tokens').dataset.rate),
              p50: parseFloat(document.querySelector('#mesh-ttft').dataset.p50),
              raft: document.querySelector('#raft').textContent,
            })""")
            shot = ROOT / "target" / "dashboard-states.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        stop.set()
        load.join(timeout=30)
    assert shown["states"] == {"healthy": "alive", "drained": "drained", "down": "backend-down"}, shown
    assert len(set(shown["colors"].values())) == 3, f"each state has its own colour: {shown['colors']}"
    assert shown["loaded"]["down"] == 0, "a node whose backend is down shows no model as loaded"
    assert "1 drained" in shown["raft"], shown["raft"]
    achieved = (len(done) - 1) / (done[-1] - done[0])
    assert abs(shown["mesh"] - sum(shown["rates"])) <= 0.01 * shown["mesh"] + 1e-3, shown
    assert abs(shown["mesh"] - achieved) <= 0.10 * achieved, f"mesh rate {shown['mesh']} vs the load's {achieved:.2f}/s"
    assert abs(shown["tokens"] - MAX_TOKENS * achieved) <= 0.10 * MAX_TOKENS * achieved, shown
    assert 0 < shown["p50"] < 1000, shown
    assert shot.stat().st_size > 10_000
