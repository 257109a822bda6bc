"""Serving benchmark: time to first token, inter-token latency and output tok/s at 1, 8, 32 and 64
concurrent streaming clients, over loopback; prints a table.

    python bench/serve.py                                  # starts `phi3 serve --model smollm2-135m-instruct`
    python bench/serve.py --levels 1,8 --output-len 32 --requests-per-client 1       # a short run
    python bench/serve.py --model DIR --device cuda --input-len 512 --output-len 128 --requests-per-client 4
    python bench/serve.py --url http://127.0.0.1:8000 --served-model-name NAME      # a server already running
    python bench/serve.py --random phi-3-mini-128k-instruct --layers 4 --dtype float32   # Phi-3-mini width

It starts `phi3 serve` on a free 127.0.0.1 port (--max-batch: the largest level; --max-len: room
for the prompts and answers, unless given) and stops it with SIGTERM at the end; the server
inherits the environment (on a CPU shared with other work, OMP_NUM_THREADS=1 avoids torch's
threads spinning against each other). At each level, N clients each send
--requests-per-client streamed /v1/completions requests back to back: a raw-text prompt of
about --input-len tokens (seeded word salad; the table shows the real count from `usage`) and
exactly --output-len new tokens (`ignore_eos`). Per request: TTFT = first text chunk - send;
ITL = (last chunk - first chunk) / (tokens - 1), i.e. vLLM's TPOT (a chunk may carry several tokens
when the server batches its writes). Output tok/s = all new tokens / the level's wall time; the
last column is that throughput over the 1-client level's.

`--random PRESET [--layers N]` serves the preset's shapes with random weights (as `phi3 bench
--random`) and the real Phi-3 tokenizer (llama.cpp's Phi-3 vocabulary file): a checkpoint written to
a temporary folder first. Answers are noise, but every request still produces exactly
--output-len tokens, so throughput is the real model's at that width.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "river mountain history science music garden window market letter morning evening doctor teacher").split()


def prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    sent = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if '"choices":[]' in line:  # the usage chunk
                usage = json.loads(line[6:])["usage"]
                continue
            if '"error"' in line and line.startswith('data: {"error"'):
                raise RuntimeError(line)
            first = first or now
            last = now
    if usage is None or first is None:
        raise RuntimeError("the stream ended without text or usage")
    n = usage["completion_tokens"]
    return {"ttft": first - sent, "itl": (last - first) / (n - 1) if n > 1 else None, "tokens": n,
            "prompt": usage["prompt_tokens"], "e2e": last - sent}


async def level(url: str, name: str, clients: int, per_client: int, input_len: int, output_len: int,
                timeout: float) -> tuple[list[dict], float]:
    async def client_loop(k: int, client: httpx.AsyncClient) -> list[dict]:
        out = []
        for j in range(per_client):
            body = {"model": name, "prompt": prompt(input_len, seed=k * 1000 + j), "max_tokens": output_len,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            out.append(await one_request(client, url, body))
        return out

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(client_loop(k, client) for k in range(clients))), timeout)
        wall = time.perf_counter() - start
    return [r for rs in results for r in rs], wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def start_server(args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`phi3 serve` on a free loopback port with args' settings and `extra` options; (process, url) once healthy."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "phi3", "serve", "--model", args.model, "--port", str(port), "--served-model-name",
           args.served_model_name, "--max-batch", str(args.max_batch), "--max-queue", "1024"]
    cmd += ["--max-len", str(args.max_len)] if args.max_len else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--activations", args.activations] if args.activations else []
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if args.quiet else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"phi3 serve exited with {proc.returncode}" +
                             (f": {proc.stderr.read().decode()[-2000:]}" if args.quiet else ""))
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"phi3 serve did not get ready in {args.timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), then kill if it has not gone within 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def write_random_checkpoint(preset: str, layers: int | None, dtype: str | None, folder: Path) -> None:
    """A Hugging Face checkpoint with the preset's shapes, random weights and the Phi-3 tokenizer."""
    import torch

    from phi3 import assets, load_tokenizer
    from phi3.bench import random_llm, save_hf_checkpoint
    from phi3.loader import pick_dtype

    llm, raw = random_llm(preset, layers, torch.device("cpu"), pick_dtype(dtype, torch.device("cpu"), "float32"))
    save_hf_checkpoint(llm, raw, folder)
    load_tokenizer(assets.fetch(assets.PHI3_VOCAB_GGUF)).save(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--activations", default=None, help="phi3 serve --activations (int16: the opt-in CPU mode)")
    ap.add_argument("--url", default=None, help="benchmark a server already running here instead of starting one")
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--levels", default="1,8,32,64", help="concurrent clients per level")
    ap.add_argument("--max-batch", type=int, default=None, help="server slots (default: the largest level)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="server tokens per slot (default: a power of two >= 2 x input-len + output-len)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128, help="prompt length, in words (~tokens)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per level (and for the server to load)")
    ap.add_argument("--quiet", action="store_true", help="hide the server's log")
    ap.add_argument("--random", metavar="PRESET", default=None,
                    help="serve this preset's shapes with random weights (e.g. phi-3-mini-128k-instruct)")
    ap.add_argument("--layers", type=int, default=None, help="with --random: this many layers (default: the preset's)")
    args = ap.parse_args()
    if args.random:
        if args.url:
            raise SystemExit("--random starts its own server: not with --url")
        tmp = tempfile.TemporaryDirectory()
        write_random_checkpoint(args.random, args.layers, args.dtype, Path(tmp.name))
        args.model = tmp.name
    levels = [int(x) for x in args.levels.split(",")]
    args.max_batch = args.max_batch or max(levels)
    args.max_len = args.max_len or 1 << (2 * args.input_len + args.output_len - 1).bit_length()  # words -> tokens
    for host in ([httpx.URL(args.url).host] if args.url else []):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("loopback only: --url must point at 127.0.0.1 or localhost")
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        info = httpx.get(url + "/health", timeout=10).json()
        print(f"# {info.get('model')} · {info.get('slots')} slots × {info.get('max_len')} tokens · "
              f"{args.requests_per_client} requests per client · ~{args.input_len} words in, {args.output_len} tokens "
              f"out (ignore_eos) · greedy · {time.strftime('%Y-%m-%d %H:%M')} · {os.cpu_count()} CPUs")
        asyncio.run(level(url, args.served_model_name, 1, 1, args.input_len, 4, args.timeout))  # warm-up
        header = (f"{'clients':>7} {'reqs':>5} {'in tok':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
                  f"{'ITL p99':>8} {'out tok/s':>10} {'per client':>10} {'vs 1':>6}")
        print(header + "\n" + "-" * len(header))
        base = None
        for clients in levels:
            results, wall = asyncio.run(level(url, args.served_model_name, clients, args.requests_per_client,
                                              args.input_len, args.output_len, args.timeout))
            tps = sum(r["tokens"] for r in results) / wall
            base = base or (tps if clients == 1 else None)
            ttft = [r["ttft"] * 1e3 for r in results]
            itl = [r["itl"] * 1e3 for r in results if r["itl"] is not None]
            per_client = statistics.mean(r["tokens"] / r["e2e"] for r in results)
            print(f"{clients:>7} {len(results):>5} {statistics.mean(r['prompt'] for r in results):>6.0f} "
                  f"{pct(ttft, 50):>7.0f}ms {pct(ttft, 99):>7.0f}ms {pct(itl, 50):>6.1f}ms {pct(itl, 99):>6.1f}ms "
                  f"{tps:>10.1f} {per_client:>10.1f} {f'{tps / base:.2f}x' if base else '':>6}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    main()
