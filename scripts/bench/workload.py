"""Workload generator for scripts/bench/scheduling.

Poisson arrivals at a fixed rate for a fixed time; every request streams
(so time to first token is measured) and asks for usage, whose cached
prompt tokens give the prefix-cache hit rate. Two scenarios:

  cold  a seeded mix of three models; multi-turn sessions that repeat their
        earlier messages (the historical scenario: cold loads dominate).
  warm  one model, loaded everywhere; 48 users, each in a conversation that
        grows turn by turn (up to 8 turns, then a new one); four system
        prompts shared between users; the common multi-turn chat case.

Each request goes to a target drawn at random (seeded, so every system gets
the same draws). Besides latency, throughput and the measured hit rate, it
computes the hit rate of an oracle that always sends a request to the node
holding its longest cached prefix (every prefix any earlier request or
reply left anywhere, counted in the sim's tokens: whitespace words per
message), and per target its share of arrivals and of completions.

Prints one JSON summary line on stdout.

usage: workload.py --targets URL[,URL...] --rate R --duration S --seed N
                   [--scenario cold|warm] [--api-key K] [--model M]
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
COLD_MODELS = [("qwen2.5:7b", 0.5), ("llama3.1:8b", 0.3), ("mistral:7b", 0.2)]
WARM_USERS = 48
WARM_TURNS = 8


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


class ColdSessions:
    """Conversations of three models: a system prompt, then turns."""

    def __init__(self, rng, _model):
        self.rng = rng
        self.idle = []  # sessions whose last turn finished

    def next_request(self):
        rng = self.rng
        if self.idle and rng.random() < 0.6:
            session = self.idle.pop(rng.randrange(len(self.idle)))
        else:
            model = rng.choices([m for m, _ in COLD_MODELS], [w for _, w in COLD_MODELS])[0]
            session = {"model": model, "messages": [{"role": "system", "content": text(rng, rng.randint(150, 400))}]}
        session["messages"].append({"role": "user", "content": text(rng, rng.randint(20, 120))})
        return session, rng.randint(40, 160)

    def finished(self, session, reply, ok):
        session["messages"].append({"role": "assistant", "content": reply})
        if ok and len(session["messages"]) < 9:
            self.idle.append(session)


class WarmSessions:
    """48 users chatting with one model; four shared system prompts."""

    def __init__(self, rng, model):
        self.rng = rng
        self.model = model
        self.systems = [text(rng, rng.randint(200, 400)) for _ in range(4)]
        self.users = [self.new_conversation() for _ in range(WARM_USERS)]
        self.idle = list(range(WARM_USERS))

    def new_conversation(self):
        system = self.rng.choice(self.systems)
        return {"model": self.model, "messages": [{"role": "system", "content": system}]}

    def next_request(self):
        rng = self.rng
        if self.idle:
            user = self.idle.pop(rng.randrange(len(self.idle)))
        else:
            # Every user waits for an answer: a new one arrives.
            self.users.append(self.new_conversation())
            user = len(self.users) - 1
        session = self.users[user]
        if len(session["messages"]) >= 1 + 2 * WARM_TURNS:
            session = self.users[user] = self.new_conversation()
        session["user"] = user
        session["messages"].append({"role": "user", "content": text(rng, rng.randint(20, 120))})
        return session, rng.randint(40, 160)

    def finished(self, session, reply, ok):
        if ok:
            session["messages"].append({"role": "assistant", "content": reply})
        else:
            # The turn failed: the user starts over.
            self.users[session["user"]] = self.new_conversation()
        self.idle.append(session["user"])


class Oracle:
    """Every prefix (at message boundaries) any request or reply left on any
    node, with its length in the sim's tokens; a request's oracle hit is the
    longest of them it starts with."""

    def __init__(self):
        self.seen = set()

    @staticmethod
    def prefixes(model, messages):
        key, tokens = (model,), 0
        for m in messages:
            key = key + ((m["role"], m["content"]),)
            tokens += len(m["content"].split())
            yield hash(key), tokens

    def request(self, model, messages):
        best = 0
        for key, tokens in self.prefixes(model, messages):
            if key in self.seen:
                best = tokens
            self.seen.add(key)
        return best

    def reply(self, model, messages, reply):
        for key, _ in self.prefixes(model, messages + [{"role": "assistant", "content": reply}]):
            self.seen.add(key)


async def one(client, url, session, max_tokens, results, target):
    body = {"model": session["model"], "messages": list(session["messages"]), "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    ttft, reply, usage, ok = None, [], None, False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                results.append({"ok": False, "status": response.status_code, "target": target})
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
        results.append({"ok": False, "status": type(err).__name__, "target": target})
        return None
    end = time.monotonic() - start
    prompt = (usage or {}).get("prompt_tokens", 0)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    results.append({"ok": ok and ttft is not None, "ttft": ttft, "e2e": end, "prompt": prompt, "cached": cached,
                    "tokens": (usage or {}).get("completion_tokens", 0), "target": target,
                    "done_at": time.monotonic()})
    return "".join(reply) if ok else None


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results, oracle_hits, wall, targets, arrivals_at, window_end):
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in good]
    e2e = [r["e2e"] for r in good]
    prompt = sum(r["prompt"] for r in good)
    oracle_prompt = sum(p for p, _ in oracle_hits)
    # Completions within the arrival window: an entry whose requests wait
    # longer than the others' completes fewer of them by then.
    completions = [sum(1 for r in good if r["target"] == t and r["done_at"] <= window_end) for t in range(len(targets))]
    ttft_at = [[r["ttft"] for r in good if r["target"] == t] for t in range(len(targets))]
    return {
        "requests": len(results), "ok": len(good), "errors": len(results) - len(good),
        "error_statuses": sorted({str(r["status"]) for r in results if not r["ok"] and "status" in r}),
        "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "ttft_p99": pct(ttft, 0.99),
        "e2e_p50": pct(e2e, 0.5), "e2e_p95": pct(e2e, 0.95), "e2e_p99": pct(e2e, 0.99),
        "throughput_tok_s": sum(r["tokens"] for r in good) / wall if wall else 0,
        "req_s": len(good) / wall if wall else 0,
        "cache_hit": (sum(r["cached"] for r in good) / prompt) if prompt else 0,
        "oracle_hit": (sum(c for _, c in oracle_hits) / oracle_prompt) if oracle_prompt else 0,
        "mean_ttft": statistics.mean(ttft) if ttft else None,
        "arrival_share": [a / max(1, sum(arrivals_at)) for a in arrivals_at],
        "completion_share": [c / max(1, sum(completions)) for c in completions],
        "entry_ttft_p95": [pct(t, 0.95) for t in ttft_at],
    }


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", choices=["cold", "warm"], default="cold")
    parser.add_argument("--model", default="qwen2.5:7b", help="the warm scenario's model")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token (LiteLLM's proxy wants one)")
    args = parser.parse_args()
    targets = args.targets.split(",")
    urls = [u.rstrip("/") + "/v1/chat/completions" for u in targets]
    # Arrival times and entries come from their own generators, so every
    # system gets the same ones; which session a request continues depends
    # on which finished, which depends on the system under test.
    arrivals = random.Random(args.seed)
    entries = random.Random(args.seed + 2)
    kind = WarmSessions if args.scenario == "warm" else ColdSessions
    sessions = kind(random.Random(args.seed + 1), args.model)
    oracle = Oracle()
    results, tasks, oracle_hits = [], [], []
    arrivals_at = [0] * len(urls)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(180.0), limits=limits, trust_env=False, headers=headers) as client:
        started = time.monotonic()
        at = 0.0
        while True:
            at += arrivals.expovariate(args.rate)
            if at > args.duration:
                break
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            session, max_tokens = sessions.next_request()
            target = entries.randrange(len(urls))
            arrivals_at[target] += 1
            messages = list(session["messages"])
            prompt_tokens = sum(len(m["content"].split()) for m in messages)
            oracle_hits.append((prompt_tokens, oracle.request(session["model"], messages)))

            async def run(session=session, max_tokens=max_tokens, target=target, messages=messages):
                reply = await one(client, urls[target], session, max_tokens, results, target)
                if reply is not None:
                    oracle.reply(session["model"], messages, reply)
                sessions.finished(session, reply or "", reply is not None)

            tasks.append(asyncio.create_task(run()))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - started
    window_end = started + args.duration
    print(json.dumps(summarize(results, oracle_hits, wall, targets, arrivals_at, window_end)))


asyncio.run(main())
