"""`phi3 bench`: prefill and decode speed, time to first token, peak memory and the fraction of the
memory-bandwidth floor; with `--compare`, transformers and llama.cpp on the same weights in the
same run.

Decode speed is measured the same way for every engine: the time of a run that makes `new`
tokens per row, minus the time of a run that makes one (its prefill and first token), over the
`new - 1` tokens in between. The floor: bytes a decode step must read (the weights once, plus
each row's KV cache at its mean context) over the measured device copy bandwidth.

`--random` builds the named preset's shapes with random weights (optionally `--layers N` of
them), so Phi-3-mini can be measured where its weights cannot be downloaded; with `--compare` the
same weights are written once as a Hugging Face checkpoint for transformers to read.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import KVCache, kv_dtype_of
from .generate import LLM
from .sampling import SamplingParams


@dataclass
class Row:
    engine: str
    what: str
    value: float | None
    unit: str
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Read + write bytes per second of a large device-to-device copy (best of 5)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # touched: untouched pages read as free zeros
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def random_llm(preset_name: str, layers: int | None, device, dtype, seed: int = 0) -> tuple[LLM, dict]:
    """An LLM with the preset's shapes (and `layers` layers) and random weights; its config dict."""
    from importlib import resources

    from .config import Phi3Config
    from .model import Phi3

    key = preset_name.lower().removeprefix("microsoft/")
    try:
        raw = json.loads((resources.files("phi3") / "presets" / f"{key}.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"--random needs a preset name with a full config, got {preset_name!r}") from None
    if layers is not None:
        raw["num_hidden_layers"] = layers
    config = Phi3Config.from_dict(raw, source=f"preset {key}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Phi3(config)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    model.reset_rope(device)
    model = model.to(dtype).eval().requires_grad_(False)
    return LLM(model, name=f"{key} (random weights, {config.num_hidden_layers} layers)"), raw


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: parameters and buffers (packed weights are buffers),
    not the RoPE tables, nor the embedding table (one row per token) unless lm_head reads it too."""
    skip = set() if model.config.tie_word_embeddings else \
        {t.data_ptr() for t in (*model.model.embed_tokens.parameters(), *model.model.embed_tokens.buffers())}
    tensors = {t.data_ptr(): t for t in model.parameters()}
    tensors.update({t.data_ptr(): t for n, t in model.named_buffers() if not n.startswith("rope.")})
    return sum(t.numel() * t.element_size() for p, t in tensors.items() if p not in skip)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (n, length), generator=g).tolist()


def time_ours(llm: LLM, batch: list[list[int]], new: int) -> float:
    """Seconds for one batched generate of `new` tokens per row (stop ids ignored)."""
    seconds, done = _timed(llm, batch, SamplingParams(max_new_tokens=new))
    assert all(len(c.token_ids) == new for c in done)
    return seconds


def bench_ours(llm: LLM, *, prompt_len: int, new: int, batches: list[int], prefill: int) -> list[Row]:
    llm.stop_ids = frozenset()
    llm.prefix_cache = False  # the same prompts run several times: time computing them, not reusing them
    rows, device, vocab = [], llm.device, llm.config.vocab_size
    if prefill:
        batch = prompts(1, prefill, vocab)
        time_ours(llm, batch, 1)  # warm-up
        t = time_ours(llm, batch, 1)
        rows += [Row("phi3", f"prefill {prefill} tokens", prefill / t, "tok/s"),
                 Row("phi3", f"time to first token, {prefill}-token prompt", t, "s")]
    weights = weight_bytes(llm.model)
    kv_per_token = KVCache.nbytes(llm.config, 1, llm.dtype, kv_dtype_of(llm.kv_cache_dtype))
    bandwidth = copy_bandwidth(device)
    for b in batches:
        batch = prompts(b, prompt_len, vocab, seed=b)
        time_ours(llm, batch, 2)  # warm-up (and, on CUDA, graph capture for these shapes)
        time_ours(llm, batch, new)
        first, full = time_ours(llm, batch, 1), time_ours(llm, batch, new)
        tps = b * (new - 1) / (full - first)
        floor = b / ((weights + b * kv_per_token * (prompt_len + new / 2)) / bandwidth)
        rows.append(Row("phi3", f"decode, batch {b}, {prompt_len}-token prompts", tps, "tok/s",
                        f"{tps / floor:.0%} of the floor ({floor:.0f} tok/s at {bandwidth / 1e9:.0f} GB/s)"))
    if rows:
        rows.append(Row("phi3", "peak memory", None, "", peak_memory(device)))
    return rows


def bench_prefix(llm: LLM, *, doc_len: int = 2000, turns: int = 4, shots: int = 3, items: int = 24) -> list[Row]:
    """The workloads the prefix cache is for, with it on and off in the same run (greedy, stop ids
    ignored): a `doc_len`-token document then `turns` follow-up turns, each prompt the last one
    plus its answer and a new question (time to first token of each turn); and `items` prompts
    sharing `shots` examples (an evaluation's shape: prefill tokens computed, wall time)."""
    llm.stop_ids = frozenset()
    vocab, rows = llm.config.vocab_size, []
    doc = prompts(1, doc_len, vocab, seed=7)[0]
    questions = prompts(turns, 24, vocab, seed=8)
    examples = sum(prompts(shots, 160, vocab, seed=9), [])
    tails = prompts(items, 40, vocab, seed=10)
    for on in (False, True):
        llm.prefix_cache = on
        llm.engine_for([(1, SamplingParams())])  # built (or rebuilt) outside the timings
        label, history, firsts = "on" if on else "off", doc, []
        for q in questions:
            history = history + q
            sync(llm.device)
            t = time.perf_counter()
            chunks = llm.stream(history, max_new_tokens=32)
            first = next(chunks)
            sync(llm.device)
            firsts.append(time.perf_counter() - t)
            history = history + first.token_ids + [i for c in chunks for i in c.token_ids]
        for k, first in enumerate(firsts):
            note = "" if k == 0 else f"{first / firsts[0]:.0%} of turn 1"
            rows.append(Row("phi3", f"multi-turn, {doc_len}-token document: time to first token, turn {k + 1}, "
                                    f"prefix cache {label}", first, "s", note))
        engine = llm.engine_for([(1, SamplingParams())])
        computed = engine.computed_tokens
        t = time.perf_counter()
        llm.generate([examples + tail for tail in tails], max_new_tokens=1)
        sync(llm.device)
        wall = time.perf_counter() - t
        rows += [Row("phi3", f"{shots}-shot-shaped: {items} prompts of {len(examples) + 40} tokens, wall time, "
                             f"prefix cache {label}", wall, "s"),
                 Row("phi3", f"{shots}-shot-shaped: prefill tokens computed, prefix cache {label}",
                     engine.computed_tokens - computed, "tokens")]
    return rows


def bench_beside(llm: LLM, *, long_len: int, n: int, prompt_len: int, new: int) -> list[Row]:
    """One `long_len`-token prompt served together with `n` prompts of `prompt_len` tokens (greedy,
    stop ids ignored), with the prefix cache on: the long one's prefill is timed cold once, then the
    cache holds it, so the decode of all n + 1 rows is timed without paying it again; against the n
    short rows alone (their prompts cached too). One engine throughout: a second would need the
    first one's pool freed on a GPU."""
    llm.stop_ids, vocab = frozenset(), llm.config.vocab_size
    long, short = prompts(1, long_len, vocab, seed=11), prompts(n, prompt_len, vocab, seed=12)
    llm.prefix_cache = True
    time_ours(llm, short, 2)  # warm-up: the engine built, the short prompts cached
    alone = n * (new - 1) / (time_ours(llm, short, new) - time_ours(llm, short, 1))
    together = long + short
    cold = time_ours(llm, together, 1)
    full = time_ours(llm, together, new)
    tps = (n + 1) * (new - 1) / (full - time_ours(llm, together, 1))
    return [Row("phi3", f"{long_len}-token prompt beside {n} of {prompt_len}: all first tokens (cold)", cold, "s"),
            Row("phi3", f"decode, {n} rows of {prompt_len} tokens alone", alone, "tok/s"),
            Row("phi3", f"decode, the same {n} beside the {long_len}-token row", tps, "tok/s",
                f"{tps / alone:.2f}x of alone, with 1 more row"),
            Row("phi3", "peak memory", None, "", peak_memory(llm.device))]


_PASSAGE = ("The lighthouse on the northern cape was built in 1874 from granite quarried two miles inland. "
            "Its lamp, first fuelled by whale oil and later by kerosene, was electrified in 1931, and the keeper's "
            "cottage beside it became a small museum after the last keeper retired in 1968. Visitors climb 142 "
            "steps to the gallery, from which, on a clear day, the coast of the neighbouring island can be seen.")
SPECULATE_PROMPTS = {  # (what it is, the user's message): where prompt lookup pays, and where it should not cost
    "input-grounded": "Repeat the following paragraph exactly, word for word, but write 'granite' as 'basalt':\n\n"
                      + _PASSAGE,
    "free chat": "Write a short story about a fox who learns to play the violin.",
}


def bench_speculate(llm: LLM, spec: str, new: int) -> list[Row]:
    """Batch-1 greedy decode with and without speculative decoding `spec`, on an input-grounded prompt
    and on free chat (token prompts for a model without a tokenizer: a random one repeated, and a
    random one); decode tokens/s both ways, whether the tokens are identical, and the acceptance rate."""
    llm.prefix_cache = False
    if llm.tokenizer is not None:
        work = {what: llm.encode_prompt([{"role": "user", "content": text}]) for what, text in SPECULATE_PROMPTS.items()}
    else:
        (head,), (free,) = prompts(1, 64, llm.config.vocab_size, seed=7), prompts(1, 64, llm.config.vocab_size, seed=8)
        work = {"input-grounded (repeated tokens)": head * 3, "free (random tokens)": free}
    rows = []
    for what, ids in work.items():
        runs = {}
        for speculate in (None, spec):
            params = SamplingParams(max_new_tokens=new, speculate=speculate)
            llm.generate(ids, params)  # warm-up
            engine = llm.engine_for([(len(ids), params)])
            drafted, accepted = engine.draft_tokens, engine.accepted_tokens
            first, _ = _timed(llm, ids, SamplingParams(max_new_tokens=1))
            seconds, done = _timed(llm, ids, params)
            tokens = done.token_ids
            runs[speculate] = (tokens, (len(tokens) - 1) / (seconds - first), engine.draft_tokens - drafted,
                               engine.accepted_tokens - accepted)
        (plain, plain_tps, _, _), (fast, fast_tps, drafted, accepted) = runs[None], runs[spec]
        rate = f"{accepted}/{drafted} guesses accepted ({accepted / drafted:.0%})" if drafted else "nothing guessed"
        rows += [Row("phi3", f"decode, batch 1, {what}, plain", plain_tps, "tok/s", f"{len(plain)} tokens"),
                 Row("phi3", f"decode, batch 1, {what}, --speculate {spec}", fast_tps, "tok/s",
                     f"{fast_tps / plain_tps:.2f}x; {'identical tokens' if fast == plain else 'TOKENS DIFFER'}; {rate}")]
    return rows


def _timed(llm: LLM, prompt, params: SamplingParams):
    """(seconds, what `llm.generate(prompt, params)` returned), the device synchronised both sides."""
    sync(llm.device)
    t = time.perf_counter()
    done = llm.generate(prompt, params)
    sync(llm.device)
    return time.perf_counter() - t, done


def save_hf_checkpoint(llm: LLM, raw_config: dict, folder: Path) -> None:
    """Write the LLM's weights and config as a Hugging Face checkpoint (the keys are the same)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in llm.model.state_dict().items()}
    if llm.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**raw_config, "torch_dtype": str(llm.dtype).removeprefix("torch.")}))


def bench_transformers(source: str | Path, gguf_file: str | None, device, dtype, *, prompt_len: int, new: int,
                       batches: list[int], prefill: int) -> list[Row]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **({"gguf_file": gguf_file} if gguf_file else {}))
    ref = ref.to(device).eval()
    vocab = ref.config.vocab_size

    def run(batch, n) -> float:
        ids = torch.tensor(batch, device=device)
        kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(ids))
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            ref.generate(ids, **kw)
        sync(device)
        return time.perf_counter() - t

    rows = []
    if prefill:
        batch = prompts(1, prefill, vocab)
        try:
            run(batch, 1)
            t = run(batch, 1)
            rows += [Row("transformers", f"prefill {prefill} tokens", prefill / t, "tok/s"),
                     Row("transformers", f"time to first token, {prefill}-token prompt", t, "s")]
        except torch.OutOfMemoryError:
            rows.append(Row("transformers", f"prefill {prefill} tokens", None, "", "out of memory"))
    for b in batches:
        batch = prompts(b, prompt_len, vocab, seed=b)
        try:
            run(batch, 2)
            first, full = run(batch, 1), run(batch, new)
            rows.append(Row("transformers", f"decode, batch {b}, {prompt_len}-token prompts",
                            b * (new - 1) / (full - first), "tok/s"))
        except torch.OutOfMemoryError:
            rows.append(Row("transformers", f"decode, batch {b}, {prompt_len}-token prompts", None, "", "out of memory"))
    return rows


def bench_llama_cpp(gguf: Path, *, prompt_len: int, new: int, threads: int) -> list[Row]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return [Row("llama.cpp", "decode, batch 1", None, "", "llama-cpp-python not installed")]
    # n_batch=1: llama-cpp-python 0.3.36 built on some machines here crashes on batched prompt evaluation.
    llm = Llama(str(gguf), n_threads=threads, n_batch=1, n_ctx=prompt_len + new + 8, verbose=False)
    prompt = prompts(1, prompt_len, llm.n_vocab())[0]

    def run(n) -> float:
        llm.reset()
        t = time.perf_counter()
        made = 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            made += 1
            if made == n:
                break
        return time.perf_counter() - t

    run(2)
    first, full = run(1), run(new)
    # named as our batch-1 row, so that the table shows the ratio
    return [Row("llama.cpp", f"decode, batch 1, {prompt_len}-token prompts", (new - 1) / (full - first), "tok/s")]


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    ours = {r.what: r.value for r in rows if r.engine == "phi3"}
    print("| engine | what | value | phi3 is | note |\n|---|---|---:|---:|---|")
    for r in rows:
        value = "" if r.value is None else f"{r.value:,.3f} {r.unit}" if r.unit == "s" else f"{r.value:,.1f} {r.unit}"
        base = ours.get(r.what)
        ratio = "" if r.engine == "phi3" or not (base and r.value) else \
            f"{(r.value / base if r.unit == 's' else base / r.value):.2f}x as fast"
        print(f"| {r.engine} | {r.what} | {value} | {ratio} | {r.note} |")


def run(args) -> int:
    """The `phi3 bench` command (see cli.py for the flags)."""
    import platform

    from .loader import load, pick_device, pick_dtype
    from .weights import resolve

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",") if b]
    compare = [c for c in (args.compare or "").split(",") if c]
    if args.random:
        llm, raw = random_llm(args.model, args.layers, device, pick_dtype(args.dtype, device, "bfloat16"))
        source, gguf = None, None
    else:
        llm, raw = load(args.model, device=device, dtype=args.dtype), None
        path = resolve(args.model)
        source, gguf = (path.parent, path.name) if path.suffix == ".gguf" else (path, None)
    if args.quantize:
        from .convert import quantize_model

        quantize_model(llm, bits=int(args.quantize.removeprefix("int")))
    if args.activations != "fp32":
        from .quantize import set_activations

        set_activations(llm.model, args.activations)
    llm.kv_cache_dtype = args.kv_cache_dtype
    if args.kv_cache_tokens is not None:
        llm.kv_cache_tokens = args.kv_cache_tokens
    scheme = f", {args.quantize} RTN (g32 for int4)" if args.quantize else ""
    scheme += ", int8 KV cache" if args.kv_cache_dtype == "int8" else ""
    scheme += f", {args.activations} activations" if args.activations != "fp32" else ""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"# {llm.name or args.model}, {llm.dtype}{scheme}, {device} ({card}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; decode: {args.new_tokens} new tokens "
              f"per row after {args.prompt_len}-token prompts")
    llm.compile = args.compile
    kw = dict(prompt_len=args.prompt_len, new=args.new_tokens, batches=batches, prefill=args.prefill)
    rows, dtype = bench_ours(llm, **kw), llm.dtype
    if args.prefix_cache_workloads:
        rows += bench_prefix(llm)
    if args.speculate:
        rows += bench_speculate(llm, args.speculate, args.new_tokens)
    if args.long_beside:
        long_len, n = args.long_beside
        rows += bench_beside(llm, long_len=long_len, n=n, prompt_len=args.prompt_len, new=args.new_tokens)
    if "transformers" in compare:
        with tempfile.TemporaryDirectory() as tmp:
            if args.random:
                save_hf_checkpoint(llm, raw, Path(tmp))
                source = tmp
            del llm  # free its weights and cache before the peer loads its own
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            rows += bench_transformers(source, gguf, device, dtype, **kw)
            rows.append(Row("transformers", "peak memory", None, "", peak_memory(device)))
    if "llama.cpp" in compare:
        if gguf is None:
            rows.append(Row("llama.cpp", "decode", None, "", "needs a .gguf model"))
        else:
            rows += bench_llama_cpp(Path(source) / gguf, prompt_len=args.prompt_len, new=args.new_tokens,
                                    threads=torch.get_num_threads())
    print_table(rows, header)
    return 0

