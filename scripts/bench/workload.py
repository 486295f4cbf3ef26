"""Workload generator for scripts/bench/scheduling.

Poisson arrivals at a fixed rate for a fixed time, a seeded mix of models,
and multi-turn sessions whose later turns repeat the earlier messages (so
they share a prefix a backend can cache). Every request streams, so time to
first token is measured; usage (with cached prompt tokens) comes in the last
chunk. Prints one JSON summary line on stdout.

usage: workload.py --targets URL[,URL...] --rate R --duration S --seed N [--api-key K]
"""

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

WORDS = ("mesh node model token cache prefix stream queue slot leader gossip "
         "quiet river stone bright fast steady local cloud policy").split()
MODELS = [("qwen2.5:7b", 0.5), ("llama3.1:8b", 0.3), ("mistral:7b", 0.2)]


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Sessions:
    """Conversations: a system prompt, then turns that grow the history."""

    def __init__(self, rng):
        self.rng = rng
        self.idle = []  # sessions whose last turn finished

    def next_request(self):
        rng = self.rng
        if self.idle and rng.random() < 0.6:
            session = self.idle.pop(rng.randrange(len(self.idle)))
        else:
            model = rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0]
            session = {"model": model, "messages": [{"role": "system", "content": text(rng, rng.randint(150, 400))}]}
        session["messages"].append({"role": "user", "content": text(rng, rng.randint(20, 120))})
        return session, rng.randint(40, 160)

    def finished(self, session, reply, turns_left):
        session["messages"].append({"role": "assistant", "content": reply})
        if turns_left and len(session["messages"]) < 9:
            self.idle.append(session)


async def one(client, url, session, max_tokens, results):
    body = {"model": session["model"], "messages": list(session["messages"]), "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    ttft, reply, usage, ok = None, [], None, False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                results.append({"ok": False, "status": response.status_code})
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    ok = True
                    break
                event = json.loads(data)
                if "error" in event:
                    break
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        if ttft is None:
                            ttft = time.monotonic() - start
                        reply.append(content)
    except httpx.HTTPError as err:
        results.append({"ok": False, "status": type(err).__name__})
        return None
    end = time.monotonic() - start
    prompt = (usage or {}).get("prompt_tokens", 0)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    results.append({"ok": ok and ttft is not None, "ttft": ttft, "e2e": end, "prompt": prompt, "cached": cached,
                    "tokens": (usage or {}).get("completion_tokens", 0)})
    return "".join(reply) if ok else None


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token (LiteLLM's proxy wants one)")
    args = parser.parse_args()
    urls = [u.rstrip("/") + "/v1/chat/completions" for u in args.targets.split(",")]
    # Arrival times come from their own generator, so every system gets the
    # same arrivals; which session a request continues depends on which
    # finished, which depends on the system under test.
    arrivals = random.Random(args.seed)
    sessions = Sessions(random.Random(args.seed + 1))
    results, tasks = [], []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(180.0), limits=limits, trust_env=False, headers=headers) as client:
        started = time.monotonic()
        at = 0.0
        n = 0
        while True:
            at += arrivals.expovariate(args.rate)
            if at > args.duration:
                break
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            session, max_tokens = sessions.next_request()
            url = urls[n % len(urls)]
            n += 1

            async def run(session=session, max_tokens=max_tokens, url=url):
                reply = await one(client, url, session, max_tokens, results)
                sessions.finished(session, reply or "", reply is not None)

            tasks.append(asyncio.create_task(run()))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - started

    good = [r for r in results if r["ok"]]

    def pct(values, q):
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    ttft = [r["ttft"] for r in good]
    e2e = [r["e2e"] for r in good]
    prompt = sum(r["prompt"] for r in good)
    summary = {
        "requests": len(results), "ok": len(good), "errors": len(results) - len(good),
        "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "ttft_p99": pct(ttft, 0.99),
        "e2e_p50": pct(e2e, 0.5), "e2e_p95": pct(e2e, 0.95), "e2e_p99": pct(e2e, 0.99),
        "throughput_tok_s": sum(r["tokens"] for r in good) / wall if wall else 0,
        "req_s": len(good) / wall if wall else 0,
        "cache_hit": (sum(r["cached"] for r in good) / prompt) if prompt else 0,
        "mean_ttft": statistics.mean(ttft) if ttft else None,
    }
    print(json.dumps(summary))


asyncio.run(main())
