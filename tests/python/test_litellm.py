"""Cloud fallback through a real aggregator: LiteLLM's proxy (from PyPI) on
loopback in front of a sim backend, configured as the agent's cloud
provider. Requests for a model only the cloud has, and requests that
overflow a saturated mesh, go through LiteLLM and come back intact
(compared with the same request sent to LiteLLM directly)."""

import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from test_clients import start

LITELLM = str(Path(sys.executable).parent / "litellm")
MASTER_KEY = "sk-litellm-test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {seconds}s")


@pytest.fixture(scope="module")
def mesh():
    assert os.path.exists(LITELLM), f"LiteLLM is not installed in {sys.prefix} (scripts/test.sh installs it)"
    procs = []
    work = tempfile.mkdtemp(prefix="llmesh-litellm-")
    try:
        sim, sim_url = start("sim-backend", "--listen", "127.0.0.1:0", "--deterministic",
                             "--slots", "1", "--decode-tps", "50")
        procs.append(sim)
        port = free_port()
        config = Path(work) / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: cloud-model\n"
            f"    litellm_params: {{ model: openai/qwen2.5:7b, api_base: \"{sim_url}/v1\", api_key: none }}\n"
        )
        env = dict(os.environ, LITELLM_MASTER_KEY=MASTER_KEY, LITELLM_LOCAL_MODEL_COST_MAP="True")
        litellm = subprocess.Popen(
            [LITELLM, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=open(Path(work) / "litellm.log", "w"), stdin=subprocess.DEVNULL, env=env,
        )
        procs.append(litellm)
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180)
        agent_config = Path(work) / "agent.toml"
        agent_config.write_text(
            "[cloud]\noverflow_after = \"0s\"\n"
            "[[cloud.providers]]\nname = \"litellm\"\n"
            f"base_url = \"http://127.0.0.1:{port}\"\napi_key_env = \"LITELLM_KEY\"\nresponse_timeout = \"30s\"\n"
            "[cloud.providers.models]\n\"big:70b\" = \"cloud-model\"\n\"qwen2.5:7b\" = \"cloud-model\"\n"
        )
        os.environ["LITELLM_KEY"] = MASTER_KEY
        agent, url = start("agent", "--listen", "127.0.0.1:0", "--backend", sim_url, "--name", "lite-node",
                           "--no-mesh", "--parallel-slots", "1", "--config", str(agent_config))
        procs.append(agent)
        yield {"agent": url, "litellm": f"http://127.0.0.1:{port}"}
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=15)
        shutil.rmtree(work, ignore_errors=True)


def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Tell me about meshes"}]


def test_a_cloud_only_model_goes_through_litellm_intact(mesh):
    direct = client(mesh["litellm"]).chat.completions.create(model="cloud-model", messages=MESSAGES, max_tokens=12)
    raw = client(mesh["agent"]).chat.completions.with_raw_response.create(
        model="big:70b", messages=MESSAGES, max_tokens=12)
    assert raw.headers["x-llmesh-route"] == "cloud:litellm"
    via = raw.parse()
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.completion_tokens == direct.usage.completion_tokens == 12


def test_streaming_through_litellm_arrives_whole(mesh):
    def collect(base, model):
        stream = client(base).chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, stream=True)
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    direct = collect(mesh["litellm"], "cloud-model")
    via = collect(mesh["agent"], "big:70b")
    assert via == direct
    assert via[0] and via[1] == "length"


def test_a_saturated_mesh_overflows_through_litellm(mesh):
    oai = client(mesh["agent"])

    def one(_):
        raw = oai.chat.completions.with_raw_response.create(model="qwen2.5:7b", messages=MESSAGES, max_tokens=40)
        return raw.headers["x-llmesh-route"], raw.parse().choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    routes = sorted(route for route, _ in results)
    assert "local" in routes and "cloud:litellm" in routes, routes
    # The sim is deterministic: local and overflowed answers are the same text.
    assert len({text for _, text in results}) == 1, results
