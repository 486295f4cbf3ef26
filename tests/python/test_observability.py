"""`/metrics` read by Prometheus's own text-format parser while requests
flow, and the dashboard rendered by headless Chromium against a live
3-node mesh (`llmesh demo`), asserted on its DOM, with a screenshot."""

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_clients import ROOT, start


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def samples(base):
    """{(name, frozenset(labels)): value} from /metrics, via the official parser."""
    out = {}
    for family in text_string_to_metric_families(get(f"{base}/metrics")):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(parsed, name, **labels):
    want = set(labels.items())
    return sum(v for (n, l), v in parsed.items() if n == name and want <= set(l))


@pytest.fixture(scope="module")
def demo():
    proc, url = start("demo", "--listen", "127.0.0.1:0")
    base = url.removesuffix("/v1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = json.loads(get(f"{base}/mesh/v1/nodes"))["nodes"]
        cluster = json.loads(get(f"{base}/mesh/v1/cluster"))
        if sum(n["liveness"] == "alive" for n in nodes) == 3 and len(cluster.get("voters", [])) == 3:
            break
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=15)


def test_metrics_parse_and_counters_move(demo):
    before = samples(demo)
    assert total(before, "llmesh_raft_term") >= 1
    assert total(before, "llmesh_gossip_peers", liveness="alive") == 2
    client = openai.OpenAI(base_url=f"{demo}/v1", api_key="unused", max_retries=0)
    for model in ["qwen2.5:7b", "mistral:7b", "qwen2.5:7b"]:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    after = samples(demo)
    moved = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)
    assert moved("llmesh_requests_total", model="qwen2.5:7b", route="local", outcome="ok") == 2
    assert moved("llmesh_requests_total", model="mistral:7b", route="peer", outcome="ok") == 1
    assert moved("llmesh_requests_total", outcome="model_not_found") == 1
    assert moved("llmesh_tokens_total", direction="out") >= 15
    assert moved("llmesh_request_duration_seconds_count") >= 3
    assert moved("llmesh_time_to_first_byte_seconds_count") >= 3
    assert moved("llmesh_scheduler_decisions_total") >= 3
    assert total(after, "llmesh_peer_rtt_seconds") > 0, "the forwarded request used a measured QUIC connection"


def test_every_metric_family_has_help_and_type(demo):
    text = get(f"{demo}/metrics")
    typed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    helped = {name for name, help_text in re.findall(r"^# HELP (\S+) (.*)$", text, re.M) if help_text.strip()}
    assert "llmesh_requests_total" in typed and "llmesh_raft_term" in typed
    assert typed <= helped, f"families without # HELP: {sorted(typed - helped)}"


def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed (scripts/test.sh installs Debian's chromium package)"
    return path


def test_dashboard_shows_the_three_nodes_and_their_models(demo):
    page = get(f"{demo}/")
    assert "<script src=" not in page and "cdn" not in page.lower(), "the dashboard loads nothing from outside"
    common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=6000"]
    dom = subprocess.run([*common, "--dump-dom", f"{demo}/"], capture_output=True, text=True, timeout=120).stdout
    found = re.findall(r'<tr class="node[^"]*" data-name="([^"]+)" data-state="([^"]+)">(.*?)</tr>', dom, re.S)
    rows = {name: row for name, _, row in found}
    assert set(rows) == {"demo-1", "demo-2", "demo-3"}, dom[:2000]
    assert {name: state for name, state, _ in found} == dict.fromkeys(rows, "alive")
    assert all('class="served-rate"' in row for row in rows.values()), "each node shows its served rate"
    assert 'id="mesh-rate"' in dom
    models = {name: set(re.findall(r'data-model="([^"]+)"', row)) for name, row in rows.items()}
    assert models["demo-1"] == {"qwen2.5:7b", "nomic-embed-text"}
    assert models["demo-2"] == {"qwen2.5:7b", "llama3.2:3b"}
    assert models["demo-3"] == {"mistral:7b"}
    assert re.search(r'id="leader"[^>]*>demo-\d<', dom), "the leader is shown"
    assert "3 of 3 nodes alive" in dom
    shot = ROOT / "target" / "dashboard.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*common, "--window-size=1280,800", f"--screenshot={shot}", f"{demo}/"],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000, "a screenshot was saved"
