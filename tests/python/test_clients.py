"""The official `openai` and `ollama` Python clients against a real agent
process in front of a real sim-backend process."""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("LLMESH_BIN", str(ROOT / "target" / "debug" / "llmesh"))


def start(*args):
    """Starts `llmesh ARGS` and returns (process, base URL) once it listens."""
    proc = subprocess.Popen(
        [BIN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"(http://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError(f"llmesh {args} did not start")


def agent(name, backend, data_dir, *extra):
    """Starts an agent; returns (process, base URL, libp2p address)."""
    proc = subprocess.Popen(
        [BIN, "agent", "--listen", "127.0.0.1:0", *(["--backend", backend] if backend else []),
         "--data-dir", data_dir, "--name", name,
         "--no-mdns", "--mesh-listen", "/ip4/127.0.0.1/tcp/0", "--data-listen", "127.0.0.1:0",
         "--control-listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    p2p, deadline = None, time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("llmesh mesh listening on "):
            p2p = line.removeprefix("llmesh mesh listening on ").strip()
        url = re.search(r"(http://\S+)", line)
        if url and "listening on" in line:
            return proc, url.group(1).removesuffix("/v1"), p2p
    proc.kill()
    raise RuntimeError(f"agent {name} did not start")


@pytest.fixture(scope="module")
def agent_url():
    sim, sim_url = start("sim-backend", "--listen", "127.0.0.1:0", "--embedding-dim", "32")
    agent, url = start("agent", "--listen", "127.0.0.1:0", "--backend", sim_url, "--name", "py-node", "--no-mesh")
    yield url
    for proc in (agent, sim):
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def oai(agent_url):
    return openai.OpenAI(base_url=f"{agent_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def oll(agent_url):
    return ollama.Client(host=agent_url)


def test_openai_lists_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["qwen2.5:7b", "llama3.2:3b", "nomic-embed-text"]
    assert oai.models.retrieve("qwen2.5:7b").id == "qwen2.5:7b"


def test_openai_chat(oai):
    reply = oai.chat.completions.create(
        model="qwen2.5:7b", messages=[{"role": "user", "content": "Hello there"}], max_tokens=7
    )
    assert len(reply.choices[0].message.content.split()) == 7
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == 2


def test_openai_streaming_chat(oai):
    stream = oai.chat.completions.create(
        model="qwen2.5:7b",
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert len(text.split()) == 9
    assert usage is not None and usage.completion_tokens == 9


def test_openai_tool_calls(oai):
    reply = oai.chat.completions.create(
        model="qwen2.5:7b",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    )
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_openai_embeddings(oai):
    # The client asks for base64 by default and decodes it.
    result = oai.embeddings.create(model="nomic-embed-text", input=["one", "two words"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 32
    norm = sum(x * x for x in result.data[1].embedding)
    assert abs(norm - 1.0) < 1e-3


def test_openai_errors_are_typed(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="missing:1b", messages=[{"role": "user", "content": "x"}])
    assert "missing:1b" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])


def test_ollama_lists_models(oll):
    names = [m.model for m in oll.list().models]
    assert names == ["qwen2.5:7b", "llama3.2:3b", "nomic-embed-text"]
    running = [m.model for m in oll.ps().models]
    assert "qwen2.5:7b" in running


def test_ollama_chat(oll):
    reply = oll.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 5})
    assert len(reply.message.content.split()) == 5
    assert reply.done and reply.eval_count == 5


def test_ollama_streaming_chat(oll):
    parts = list(
        oll.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 6}, stream=True)
    )
    assert parts[-1].done
    text = "".join(p.message.content for p in parts)
    assert len(text.split()) == 6


def test_ollama_generate_stream(oll):
    parts = list(oll.generate(model="llama3.2:3b", prompt="Once upon a time", options={"num_predict": 4}, stream=True))
    assert parts[-1].done and parts[-1].eval_count == 4
    assert len("".join(p.response for p in parts).split()) == 4


def test_ollama_embed_and_show(oll):
    result = oll.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 32
    shown = oll.show("qwen2.5:7b")
    assert shown.details.family == "qwen"


def test_ollama_errors(oll):
    with pytest.raises(ollama.ResponseError) as err:
        oll.chat(model="missing:1b", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert "missing:1b" in err.value.error


@pytest.fixture(scope="module")
def openai_kind_url():
    """An agent with --backend-kind openai: the sim serves only as an
    OpenAI-compatible server, and the agent translates Ollama-native calls."""
    sim, sim_url = start("sim-backend", "--listen", "127.0.0.1:0")
    agent, url = start("agent", "--listen", "127.0.0.1:0", "--backend", sim_url, "--backend-kind", "openai", "--no-mesh")
    yield url
    for proc in (agent, sim):
        proc.terminate()
        proc.wait(timeout=10)


def test_ollama_client_against_an_openai_compatible_backend(openai_kind_url):
    client = ollama.Client(host=openai_kind_url)
    assert "qwen2.5:7b" in [m.model for m in client.list().models]
    reply = client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3})
    assert len(reply.message.content.split()) == 3
    parts = list(client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert parts[-1].done and parts[-1].eval_count == len("".join(p.message.content for p in parts).split())
    assert len(client.embed(model="nomic-embed-text", input="x").embeddings) == 1


def test_ollama_ps_and_durations_against_an_openai_compatible_backend(openai_kind_url):
    # Ollama's docs: /api/ps's expires_at is a time (an unknown one is left
    # out, never ""), and the final line's durations are nanoseconds that
    # clients divide by (prompt speed = prompt_eval_count / prompt_eval_duration).
    client = ollama.Client(host=openai_kind_url)
    client.ps()
    reply = client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3})
    assert reply.prompt_eval_duration > 0 and reply.eval_duration > 0
    assert reply.prompt_eval_duration + reply.eval_duration <= reply.total_duration
    shown = client.show("nomic-embed-text")
    assert "embedding" in shown.capabilities


def test_ollama_refuses_what_ollama_refuses(oll):
    # Ollama's docs and server: a body field of the wrong type is a 400;
    # a chat without messages only loads the model.
    import httpx

    host = oll._client.base_url
    bad = httpx.post(f"{host}/api/chat", json={"model": "qwen2.5:7b", "messages": "notalist"})
    assert bad.status_code == 400 and "cannot unmarshal string" in bad.json()["error"]
    bad = httpx.post(f"{host}/api/generate", json={"model": "qwen2.5:7b", "prompt": 5})
    assert bad.status_code == 400 and "GenerateRequest.prompt" in bad.json()["error"]
    loaded = oll.chat(model="qwen2.5:7b", messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    oll.ps()


@pytest.fixture(scope="module", params=["ollama", "openai"])
def chat_only_url(request):
    """An agent in front of a backend without /v1/messages and /v1/responses
    (Ollama before 0.13.3, older vLLM): the agent translates both to chat
    completions, for either backend kind."""
    sim, sim_url = start("sim-backend", "--listen", "127.0.0.1:0", "--chat-only")
    agent, url = start(
        "agent", "--listen", "127.0.0.1:0", "--backend", sim_url, "--backend-kind", request.param, "--no-mesh"
    )
    yield url
    for proc in (agent, sim):
        proc.terminate()
        proc.wait(timeout=10)


def test_anthropic_messages_plain_streamed_and_a_tool_round_trip(agent_url):
    check_anthropic_messages(agent_url)


def test_anthropic_messages_translated_for_a_backend_without_them(chat_only_url):
    check_anthropic_messages(chat_only_url)


def check_anthropic_messages(url):
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="unused")
    reply = client.messages.create(
        model="qwen2.5:7b", max_tokens=5, system="be brief", messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.role == "assistant" and reply.stop_reason == "max_tokens"
    assert len(reply.content[0].text.split()) == 5 and reply.usage.output_tokens == 5
    with client.messages.stream(model="qwen2.5:7b", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert len(text.split()) == 4 and final.content[0].text == text
    tools = [{"name": "get_time", "description": "the time", "input_schema": {"type": "object", "properties": {}}}]
    asked = [{"role": "user", "content": "What time is it?"}]
    call = client.messages.create(model="qwen2.5:7b", max_tokens=8, tools=tools, messages=asked)
    assert call.stop_reason == "tool_use" and call.content[0].name == "get_time"
    result = [{"type": "tool_result", "tool_use_id": call.content[0].id, "content": "noon"}]
    answer = client.messages.create(
        model="qwen2.5:7b", max_tokens=3, tools=tools,
        messages=asked + [{"role": "assistant", "content": call.content}, {"role": "user", "content": result}],
    )
    assert answer.stop_reason == "max_tokens" and answer.content[0].type == "text"
    assert client.messages.count_tokens(model="qwen2.5:7b", messages=asked).input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="missing:1b", max_tokens=3, messages=asked)


def test_openai_responses_plain_and_streamed(oai):
    check_openai_responses(oai)


def stop_all(procs, dirs):
    """Kills `procs` and removes `dirs`: a fixture's teardown, also after a
    failed start, so nothing is left running."""
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def forwarded_url():
    """An entry node without a backend of its own in a mesh with one GPU
    node: everything sent to it crosses the data plane."""
    procs, dirs = [], [tempfile.mkdtemp(prefix="llmesh-fwd-") for _ in range(2)]
    try:
        sim, sim_url = start("sim-backend", "--listen", "127.0.0.1:0")
        procs.append(sim)
        gpu, gpu_url, boot = agent("gpu", sim_url, dirs[0])
        procs.append(gpu)
        init = subprocess.run([BIN, "init", "--data-dir", dirs[0]], capture_output=True, text=True, check=True)
        token = next(line for line in init.stdout.splitlines() if line.startswith("lmj2."))
        entry, url, _ = agent("entry", None, dirs[1], "--backend-kind", "none", "--join", token, "--bootstrap", boot)
        procs.append(entry)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            if any(m["id"] == "qwen2.5:7b" for m in listed):
                break
            time.sleep(0.25)
        yield url
    finally:
        stop_all(procs, dirs)


def test_anthropic_and_responses_through_a_forwarded_node(forwarded_url):
    routed = httpx.post(f"{forwarded_url}/v1/messages", timeout=10,
                        json={"model": "qwen2.5:7b", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert routed.status_code == 200 and routed.headers["x-llmesh-route"] == "peer:gpu"
    check_anthropic_messages(forwarded_url)
    check_openai_responses(openai.OpenAI(base_url=f"{forwarded_url}/v1", api_key="unused", max_retries=0))


def test_openai_responses_translated_for_a_backend_without_them(chat_only_url):
    client = openai.OpenAI(base_url=f"{chat_only_url}/v1", api_key="unused", max_retries=0)
    check_openai_responses(client)
    tools = [{"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}]
    call = client.responses.create(model="qwen2.5:7b", input="What time is it?", tools=tools, max_output_tokens=8)
    calls = [item for item in call.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_time"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="qwen2.5:7b", input="x", previous_response_id="resp_1")


def check_openai_responses(oai):
    response = oai.responses.create(model="qwen2.5:7b", input="Hello there", max_output_tokens=6)
    assert response.status == "completed" and len(response.output_text.split()) == 6
    events = list(oai.responses.create(model="qwen2.5:7b", input="Hello", max_output_tokens=3, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed" and events[-1].response.output_text == deltas
    assert len(deltas.split()) == 3


def test_ollama_pull_with_progress_copy_and_delete(oll):
    # Ollama's API docs (docs/api.md): a pull streams status lines, with
    # digest/total/completed while downloading, and ends with "success";
    # copy and delete answer 200, and 404 for a model that is not there.
    parts = list(oll.pull("tinyllama:1b", stream=True))
    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    downloads = [p for p in parts if p.total]
    assert len(downloads) >= 3 and downloads[-1].completed == downloads[-1].total
    assert "tinyllama:1b" in [m.model for m in oll.list().models]
    assert oll.pull("tinyllama:1b").status == "success"
    assert oll.copy("tinyllama:1b", "tiny-copy").status == "success"
    assert "tiny-copy:latest" in [m.model for m in oll.list().models]
    assert oll.delete("tiny-copy").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        oll.delete("tiny-copy")
    assert err.value.status_code == 404
    reply = oll.generate(model="tinyllama:1b", prompt="Hi", options={"num_predict": 2})
    assert reply.done
