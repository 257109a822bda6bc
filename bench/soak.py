"""Soak: `phi3 serve --max-batch 64 --kv-cache-tokens 20000` under many concurrent requests and one
long prompt, every answer checked against the library's greedy answer for the request alone.

    python bench/soak.py                        # SmolLM2, the issue-18 figures (a few minutes)
    python bench/soak.py --requests 8 --short 4 --long-words 1500      # a short run

Checks (each printed PASS or FAIL with its figures):
1. the server starts, and its resident memory while idle (the process and its children, psutil)
   is under --rss-limit-gb;
2. --requests concurrent streamed /v1/completions of ~--words words each;
3. one ~--long-words-word prompt alongside --short short ones;
4. with --all-at-once: all of them together (more requests than rows: queueing);
each answer (greedy, up to --answer-tokens) equal, text and token count, to `phi3.load(model,
prefix_cache=False).generate(prompt, max_new_tokens=..., temperature=0)` run for that prompt alone.
Then the resident memory once idle again (the pool's pages touched by the run stay resident).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import httpx
import psutil

from serve import prompt, start_server, stop_server


def rss(pid: int) -> int:
    """Resident bytes of the process and its children."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


async def one(client: httpx.AsyncClient, url: str, name: str, text: str, max_tokens: int) -> dict:
    body = {"model": name, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": line[:300]}
            usage = chunk.get("usage") or usage
            pieces += [c["text"] for c in chunk.get("choices", [])]
    if usage is None:
        return {"error": "no usage chunk"}
    return {"text": "".join(pieces), "completion": usage["completion_tokens"], "prompt": usage["prompt_tokens"]}


async def batch(url: str, name: str, texts: list[str], max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        out = await asyncio.gather(*(one(client, url, name, t, max_tokens) for t in texts))
        return list(out), time.perf_counter() - start


def verdict(ok: bool, what: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
    return ok


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("phi3:") and " " in line:
            key, value = line.rsplit(" ", 1)
            out[key[5:]] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--kv-cache-tokens", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=48, help="concurrent requests of --words words")
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--long-words", type=int, default=6000, help="the long prompt, in words (~tokens)")
    ap.add_argument("--short", type=int, default=16, help="short requests beside the long one")
    ap.add_argument("--short-words", type=int, default=24)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--rss-limit-gb", type=float, default=2.0)
    ap.add_argument("--all-at-once", action="store_true",
                    help="also send every request together (more than --max-batch rows; slow on a CPU)")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    args.served_model_name, args.device, args.dtype, args.activations, args.quiet = "soak", None, None, None, True
    args.max_len = None  # the model's own context
    many = [prompt(args.words, seed=100 + k) for k in range(args.requests)]
    long = [prompt(args.long_words, seed=7)]
    short = [prompt(args.short_words, seed=200 + k) for k in range(args.short)]
    print(f"# {args.model} · phi3 serve --max-batch {args.max_batch} --kv-cache-tokens {args.kv_cache_tokens} · "
          f"answers ≤ {args.answer_tokens} tokens, greedy · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
          f"{os.cpu_count()} CPUs · OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    t0 = time.perf_counter()
    proc, url = start_server(args, ["--kv-cache-tokens", str(args.kv_cache_tokens)])
    ok = True
    try:
        ready = time.perf_counter() - t0
        time.sleep(2)
        idle = rss(proc.pid)
        ok &= verdict(idle < args.rss_limit_gb * 2**30, f"started in {ready:.1f} s; idle RSS {idle / 2**30:.2f} GiB "
                      f"(limit {args.rss_limit_gb} GiB)")
        served = {}
        phases = [(f"{args.requests} concurrent ~{args.words}-word requests", many),
                  (f"one ~{args.long_words}-word prompt and {args.short} short ones", long + short)]
        if args.all_at_once:
            phases.append((f"all {len(many) + len(long) + len(short)} at once", many + long + short))
        for what, texts in phases:
            before = metrics(url)
            out, wall = asyncio.run(batch(url, args.served_model_name, texts, args.answer_tokens, args.timeout))
            after = metrics(url)
            errors = [o["error"] for o in out if "error" in o]
            tokens = sum(o.get("completion", 0) for o in out)
            pre = after.get("num_preemptions_total", 0) - before.get("num_preemptions_total", 0)
            hit = after.get("prefix_cache_hit_tokens_total", 0) - before.get("prefix_cache_hit_tokens_total", 0)
            prompts = [o.get("prompt", 0) for o in out]
            print(f"  {what}: {wall:.1f} s, prompts {min(prompts)}-{max(prompts)} tokens, {tokens} tokens out, "
                  f"{pre:.0f} preemptions, {hit:.0f} prefix-cache hit tokens, peak-so-far RSS "
                  f"{rss(proc.pid) / 2**30:.2f} GiB", flush=True)
            ok &= verdict(not errors, f"{what}: every request answered" + (f" ({errors[0]})" if errors else ""))
            served[what] = dict(zip(texts, out))
        time.sleep(2)
        after_rss = rss(proc.pid)
        print(f"  idle RSS after the soak: {after_rss / 2**30:.2f} GiB (the pool's touched pages stay resident)")
    finally:
        stop_server(proc)
    # the library's answers, one request at a time, no prefix cache
    import phi3

    llm = phi3.load(args.model, prefix_cache=False)
    t = time.perf_counter()
    alone = {}
    for text in dict.fromkeys(many + long + short):
        done = llm.generate(text, max_new_tokens=args.answer_tokens, temperature=0)
        alone[text] = (done.text, len(done.token_ids))
    print(f"  the library alone: {len(alone)} prompts in {time.perf_counter() - t:.1f} s")
    for what, got in served.items():
        wrong = [text for text, o in got.items() if (o.get("text"), o.get("completion")) != alone[text]]
        ok &= verdict(not wrong, f"{what}: every answer equals the library's greedy answer alone"
                      + (f" ({len(wrong)} differ; first: {got[wrong[0]]!r} vs {alone[wrong[0]]!r})" if wrong else ""))
    print("ALL PASS" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
