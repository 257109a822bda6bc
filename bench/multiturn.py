"""Multi-turn chat through `phi3 serve`: time to first token of each turn over a long document, with
the prefix cache on and off (two servers, conversations interleaved between them).

    python bench/multiturn.py                      # SmolLM2, a ~2,000-token document, 5 turns, 3 rounds
    python bench/multiturn.py --doc-words 800 --turns 3 --rounds 1     # a short run

A conversation: the document in the system message, then one question per turn through streamed
/v1/chat/completions (temperature 0, up to --answer-tokens new tokens). Each request carries the
whole conversation so far, the assistant's earlier answers as the server streamed them, as a chat
client sends it. TTFT = first chunk with answer text (or the finish) - send. Each round uses a new
document, so its first turn is a cold prefill; rounds alternate between the two servers (prefix
cache on, off), and the tables give each turn's min and median over the rounds.

Whether turn N+1's prompt starts with turn N's prompt and answer tokens (else the cache cannot
hit): each turn reads the server's /metrics counter of prefix-cache hit tokens, and the "hit"
column shows how many of the prompt's tokens came from the cache against "reusable", the full
blocks of the previous turn's prompt and answer (what an exact prefix match must find).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import httpx

from serve import start_server, stop_server

QUESTIONS = ["Summarize the document in two sentences.", "Which town is mentioned first, and what happened there?",
             "List three numbers that appear in the document.", "What is the document's main subject?",
             "Write a short title for the document.", "Which year comes last in the document?"]
TOWNS = "Ardley Brennan Calder Dunmore Elgin Fenwick Glenrock Harlow Inverness Kelso Lanark Moffat".split()
THINGS = ("bridge mill school market library harbour railway station orchard church farm bakery museum "
          "lighthouse brewery").split()
VERBS = "built repaired closed opened moved sold painted rebuilt extended".split()


def document(n_words: int, seed: int) -> str:
    """A readable made-up local history of about `n_words` words (about as many tokens)."""
    rng, out, words = random.Random(seed), [], 0
    while words < n_words:
        s = (f"In {rng.randint(1700, 1990)}, the people of {rng.choice(TOWNS)} {rng.choice(VERBS)} the "
             f"{rng.choice(THINGS)} near the {rng.choice(THINGS)}, and {rng.randint(2, 900)} families "
             f"came to see it.")
        out.append(s)
        words += len(s.split())
    return " ".join(out)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f"phi3:{name} "):
            return float(line.split()[1])
    raise RuntimeError(f"/metrics has no phi3:{name}")


def turn(client: httpx.Client, url: str, name: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: its TTFT, answer text, finish reason and usage."""
    body = {"model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, text, finish, usage = None, [], None, None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(line)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                if (piece or choice.get("finish_reason")) and first is None:
                    first = time.perf_counter()
                text.append(piece)
                finish = choice.get("finish_reason") or finish
    if first is None or usage is None:
        raise RuntimeError("the stream ended without an answer or usage")
    return {"ttft": first - sent, "text": "".join(text), "finish": finish, "prompt": usage["prompt_tokens"],
            "completion": usage["completion_tokens"]}


def conversation(url: str, name: str, doc: str, turns: int, max_tokens: int, block: int) -> list[dict]:
    messages = [{"role": "system", "content": "Answer questions about this document.\n\n" + doc}]
    out = []
    with httpx.Client(timeout=600) as client:
        for k in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
            hits = metric(url, "prefix_cache_hit_tokens_total")
            t = turn(client, url, name, messages, max_tokens)
            t["hit"] = int(metric(url, "prefix_cache_hit_tokens_total") - hits)
            if out:  # the full blocks of the previous prompt + answer (the stop id's own key is never written)
                last = out[-1]
                written = last["prompt"] + last["completion"] - (last["finish"] != "stop")
                t["reusable"] = written // block * block
            out.append(t)
            messages.append({"role": "assistant", "content": t["text"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--doc-words", type=int, default=1150, help="document length in words (~1.75 tokens each)")
    ap.add_argument("--turns", type=int, default=5, help="questions per conversation (the first and the follow-ups)")
    ap.add_argument("--answer-tokens", type=int, default=48, help="max_tokens of each answer")
    ap.add_argument("--rounds", type=int, default=3, help="conversations per server, alternating between them")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for a server to load")
    args = ap.parse_args()
    args.served_model_name, args.max_batch, args.activations, args.quiet = "bench", 1, None, True
    servers = {}
    try:
        for label, extra in (("on", []), ("off", ["--no-prefix-cache"])):
            servers[label] = start_server(args, extra)
        block = int(httpx.get(servers["on"][1] + "/health", timeout=10).json().get("block_size", 16))
        print(f"# {args.model} · phi3 serve --max-batch 1 · ~{args.doc_words}-word document · {args.turns} turns · "
              f"answers ≤ {args.answer_tokens} tokens, greedy · {args.rounds} rounds · "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {os.cpu_count()} CPUs · "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        for _, url in servers.values():  # warm-up (first-request set-up), in neither table
            with httpx.Client(timeout=600) as client:
                turn(client, url, args.served_model_name, [{"role": "user", "content": document(60, seed=-1)}], 4)
        runs = {"on": [], "off": []}
        for r in range(args.rounds):
            for label in ("on", "off"):
                proc, url = servers[label]
                runs[label].append(conversation(url, args.served_model_name, document(args.doc_words, seed=r),
                                                args.turns, args.answer_tokens, block))
                print(f"round {r + 1}, prefix cache {label}: TTFT " +
                      " ".join(f"{t['ttft']:.3f}s" for t in runs[label][-1]), flush=True)
        for label in ("on", "off"):
            print(f"\nprefix cache {label}")
            print(f"{'turn':>4} {'prompt':>6} {'hit':>5} {'reusable':>8} {'answer':>6} {'TTFT min':>9} "
                  f"{'TTFT med':>9} {'/turn 1 (med of ratios)':>24}")
            for k in range(args.turns):
                ts = [run[k] for run in runs[label]]
                ttft = [t["ttft"] for t in ts]
                ratio = [t["ttft"] / run[0]["ttft"] for t, run in zip(ts, runs[label])]
                reusable = ts[0].get("reusable")
                print(f"{k + 1:>4} {ts[0]['prompt']:>6} {ts[0]['hit']:>5} {'' if reusable is None else reusable:>8} "
                      f"{ts[0]['completion']:>6} {min(ttft):>8.3f}s {statistics.median(ttft):>8.3f}s "
                      f"{statistics.median(ratio) * 100:>23.1f}%")
        on = runs["on"]
        worst = max(run[k]["ttft"] / run[0]["ttft"] for run in on for k in range(1, args.turns))
        exact = all(run[k]["hit"] >= run[k]["reusable"] for run in on for k in range(1, args.turns))
        same = all(a["text"] == b["text"] for x, y in zip(on, runs["off"]) for a, b in zip(x, y))
        print(f"\n{'PASS' if worst <= 0.15 else 'FAIL'}: turns 2-{args.turns} TTFT ≤ 15% of turn 1's "
              f"(worst {worst * 100:.1f}%, prefix cache on)")
        print(f"{'PASS' if exact else 'FAIL'}: every follow-up's cache hit covers the previous prompt + answer's full blocks")
        print(f"{'PASS' if same else 'FAIL'}: the answers with the prefix cache on equal those with it off")
    finally:
        for proc, _ in servers.values():
            stop_server(proc)


if __name__ == "__main__":
    main()
