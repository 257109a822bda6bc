"""`phi3 generate · chat · info · serve · quantize · bench · finetune · merge · eval`: thin argparse subcommands over the library.

A subcommand is a pair, `_add_<name>_args(parser)` (its flags; each help says the default) and
`cmd_<name>(args) -> int` (the work), listed in COMMANDS. A command checks its input before the
slow load and raises ValueError, OSError or RuntimeError with a one-line message; `main` prints it
as `phi3: error: …`. torch and the library are imported inside the commands, so `--help` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "microsoft/Phi-3-mini-128k-instruct"
OFFLINE_MODEL = "smollm2-135m-instruct"


class _LibraryDefault:
    """A flag's default as the library's dataclass defines it (the one source for CLI and API):
    `SamplingParams` unless `owner` names another ("module.Class"). Looked up only when --help shows
    it, because those modules import torch; a flag left at it is not passed on, so the library's
    own default applies."""

    def __init__(self, field: str, owner: str = "sampling.SamplingParams"):
        self.field, self.owner = field, owner

    def __str__(self) -> str:
        from dataclasses import MISSING, fields
        from importlib import import_module

        module, name = self.owner.rsplit(".", 1)
        field = next(f for f in fields(getattr(import_module(f".{module}", __package__), name)) if f.name == self.field)
        return str(field.default_factory() if field.default is MISSING else field.default)


def _library_flag(p: argparse.ArgumentParser, name: str, type, help: str, owner: str = "sampling.SamplingParams") -> None:
    """--NAME for the library field `name` of `owner`, with its default shown in --help (`_LibraryDefault`)."""
    p.add_argument(f"--{name.replace('_', '-')}", type=type, default=_LibraryDefault(name, owner),
                   help=f"{help} (default: %(default)s)")


# -- flags shared by several subcommands ----------------------------------------------------------
def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="a model directory, .gguf file, hub id or alias (default: %(default)s, from the Hugging "
                        f"Face hub or its local cache; {OFFLINE_MODEL} is a small real model that needs no hub)")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="bf16, fp16 or fp32 (default: fp32 on CPU, which gives the reference's answers; "
                        "the checkpoint's own on GPU)")
    p.add_argument("--activations", default="fp32", choices=["fp32", "int16"],
                   help="int16: packed int4/int8 weights on the CPU decode faster with their inputs rounded to "
                        "int16 (opt-in, approximate: docs/QUANTIZATION.md) (default: fp32, exact)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="positions in the KV cache, one pool shared by all sequences (default: as many as the "
                        "rows could fill, capped by free memory; on a CPU memory is touched only as used)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not keep prompts' keys for later requests with the same prefix (default: keep them; "
                        "the answers are the same either way)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="int8: keys and values stored as int8 with a scale per 32 elements (Q8_0), 1.8x the tokens "
                        "of a bf16 cache in the same memory (3.6x of fp32); opt-in, approximate: what it costs is in "
                        "docs/PERFORMANCE.md (default: auto, the model's dtype)")


def _add_speculate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", default=None, metavar="ngram[:K[:N]]|MODEL[:K]|layers:N[:K]",
                   help="speculative decoding, the same output: guess K tokens a step and check them in one "
                        "forward. ngram: by prompt lookup (K default 5), from the latest earlier match of the last "
                        "N tokens (default 3) in the prompt or answer, faster where the answer quotes its input; "
                        "MODEL: by a draft model of the same tokenizer, anything phi3 loads (K default 4); "
                        "layers:N: by the model's own first N layers (default: off)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    def flag(name: str, type, help: str) -> None:
        _library_flag(p, name, type, help)

    flag("max_new_tokens", int, "most tokens to generate")
    flag("temperature", float, "0 is greedy")
    flag("top_p", float, "nucleus sampling: keep the most likely tokens up to this probability mass")
    flag("top_k", int, "keep the k most likely tokens; 0 is off")
    flag("min_p", float, "drop tokens below this fraction of the most likely one's probability")
    flag("repetition_penalty", float, "penalize tokens already seen (as transformers does); 1 is off")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=None, help="a string that ends the answer; repeatable "
                                                                 "(default: none)")
    p.add_argument("--system", default=None, help="a system message (default: none)")
    _add_speculate_arg(p)


def _add_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply (default: none)")


def _sampling(args):
    """SamplingParams from the flags the user gave (validated here, before the slow load)."""
    from dataclasses import fields

    from .sampling import SamplingParams

    given = {f.name: getattr(args, f.name, None) for f in fields(SamplingParams)}  # None: no such flag
    for text in given["stop"] or ():
        _check_text(text, "a --stop string")
    return SamplingParams(**{k: v for k, v in given.items() if v is not None and not isinstance(v, _LibraryDefault)})


def _check_text(text: str, what: str) -> str:
    """`text` if it is valid UTF-8 (the shell hands Python undecodable bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            byte = f"byte 0x{text[e.start].encode('utf-8', 'surrogateescape').hex()}"
        except UnicodeEncodeError:
            byte = "a lone surrogate"
        raise ValueError(f"{what} is not valid UTF-8 ({byte} at character {e.start}); "
                         "check the encoding of your terminal or file") from None
    return text


def _check_prompt(text: str) -> str:
    if not _check_text(text, "the prompt").strip():
        raise ValueError("the prompt is empty")
    return text


def _load(args):
    from .loader import load

    return load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter, activations=args.activations,
                kv_cache_tokens=args.kv_cache_tokens, prefix_cache=args.prefix_cache, kv_cache_dtype=args.kv_cache_dtype)


def _stream(chunks, answer: list[str]):
    """Print the chunks as they come, keeping their text in `answer`; the last chunk."""
    last = None
    for last in chunks:
        answer.append(last.text)
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return last


def _say_if_context_was_the_limit(last, params) -> None:
    """Both limits end an answer with finish_reason "length": the context's cut it short of --max-new-tokens."""
    if last.finish_reason == "length" and last.usage.completion_tokens < params.max_new_tokens:
        print(f"phi3: the answer stopped at the model's context limit ({last.usage.total_tokens} tokens: "
              f"{last.usage.prompt_tokens} of prompt, {last.usage.completion_tokens} of answer)", file=sys.stderr)


# -- generate --------------------------------------------------------------------------------------
def _add_generate_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    _add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template "
                                                      "(default: off)")
    _add_adapter_arg(p)
    p.add_argument("prompt", help="the user message (raw text with --raw)")


def cmd_generate(args) -> int:
    prompt = _check_prompt(args.prompt)
    system = _check_text(args.system, "the --system message") if args.system else None
    params = _sampling(args)
    llm = _load(args)
    if args.raw:
        prompt = (system + "\n" if system else "") + prompt
    else:
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    _say_if_context_was_the_limit(_stream(llm.stream(prompt, params), []), params)
    return 0


# -- chat ------------------------------------------------------------------------------------------
def _add_chat_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    _add_sampling_args(p)
    _add_adapter_arg(p)


def cmd_chat(args) -> int:
    system = [{"role": "system", "content": _check_text(args.system, "the --system message")}] if args.system else []
    params = _sampling(args)
    llm = _load(args)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 gets a message, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict] = []
    print(f"phi3 chat with {args.model}. /reset clears the conversation, /exit, /quit (or Ctrl-D) quits; "
          "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            history.append({"role": "user", "content": _check_text(line, "the line")})
        except ValueError as e:
            print(f"phi3: error: {e}", file=sys.stderr)
            continue
        answer: list[str] = []
        try:
            _say_if_context_was_the_limit(_stream(llm.stream(system + history, params), answer), params)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            sys.stdout.write("\n")
        except ValueError as e:  # the conversation outgrew the context: say so, keep chatting (/reset)
            history.pop()
            print(f"phi3: error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": "".join(answer)})


# -- info ------------------------------------------------------------------------------------------
def _add_info_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context for the KV-cache estimate (default: the model's whole context)")


def cmd_info(args) -> int:
    from .config import PRESETS, preset
    from .weights import ModelNotFoundError, read_config

    try:
        config, where = read_config(args.model)
        from .loader import packed_weight_bytes

        packed = packed_weight_bytes(args.model, config)  # None unless the checkpoint is packed
    except ModelNotFoundError:
        if args.model.lower().removeprefix("microsoft/") not in PRESETS:
            raise
        config, where, packed = preset(args.model), "built-in preset (weights not downloaded)", None
    gib = 1024 ** 3
    n = config.num_parameters()
    print(f"model            {args.model}\nconfig from      {where}")
    print(f"architecture     {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV), head dim {config.head_dim}, "
          f"MLP {config.intermediate_size}, vocab {config.vocab_size}")
    rope = (f"LongRoPE (original context {config.original_max_position_embeddings})" if config.is_longrope
            else f"RoPE theta {config.rope_theta:g}")
    window = config.sliding_window if config.sliding_window and config.sliding_window < config.max_position_embeddings else None
    print(f"context          {config.max_position_embeddings} tokens, {rope}"
          f"{f', sliding window {window}' if window else ''}")
    print(f"parameters       {n:,} ({n / 1e9:.2f}B)")
    context = min(args.context or config.max_position_embeddings, config.max_position_embeddings)
    for name, size, weights in (("bf16/fp16", 2, n * 2), ("fp32", 4, n * 4), ("fp32 packed", 4, packed)):
        if weights is None:
            continue
        kv = config.kv_cache_bytes(context, size)
        print(f"memory {name:<11} weights {weights / gib:6.2f} GiB + KV cache at {context} tokens "
              f"{kv / gib:6.2f} GiB = {(weights + kv) / gib:6.2f} GiB")
    if packed is not None:
        print("                 (packed: the file's int4/int8 blocks as phi3's CPU kernels keep them in fp32)")
    from .kernels import build_info
    from .machine import warnings

    for line in warnings("cpu"):
        print(f"warning          {line}")
    built = build_info()
    if built["flags"]:
        print(f"CPU kernels      {built['simd'] or 'portable C'}, {built['threads']} threads ({' '.join(built['flags'])})")
    return 0


# -- serve ---------------------------------------------------------------------------------------
def _add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $PHI3_API_KEY if set, else no key needed)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (rows, not memory: see --kv-cache-tokens) (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row before 429s (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=None,
                   help="the longest sequence, prompt and answer (default: the model's context)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM lets requests in flight finish (default: %(default)s)")
    p.add_argument("--allowed-hosts", type=_names, default=None,
                   help="comma-separated Host names to answer besides localhost (on a loopback --host), or only "
                        "these (on another); '*' for any (default: loopback names on a loopback --host, else any)")
    p.add_argument("--allowed-origins", type=_names, default=[],
                   help="comma-separated web page origins (https://ui.example) that may call the server from a "
                        "browser (CORS); '*' for any (default: none)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most (default: below the file limit, ulimit -n, at most 4096)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a request's headers may take to arrive (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a request's body may take to arrive (default: %(default)s)")
    _add_speculate_arg(p)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_serve(args) -> int:
    from .server import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("PHI3_API_KEY")
    return serve(args.model, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
                 max_queue=args.max_queue, max_len=args.max_len, served_model_name=args.served_model_name,
                 device=args.device, dtype=args.dtype, activations=args.activations, drain_timeout=args.drain_timeout,
                 kv_cache_tokens=args.kv_cache_tokens, prefix_cache=args.prefix_cache, kv_cache_dtype=args.kv_cache_dtype,
                 allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
                 max_connections=args.max_connections, header_timeout=args.header_timeout,
                 body_timeout=args.body_timeout, speculate=args.speculate)


# -- bench ---------------------------------------------------------------------------------------
def _long_beside(text: str) -> tuple[int, int]:
    long, _, n = text.partition(":")
    if not (long.isdigit() and n.isdigit() and int(long) > 0 and int(n) > 0):
        raise argparse.ArgumentTypeError(f"expected LONG:N, two positive integers (e.g. 130000:32), got {text!r}")
    return int(long), int(n)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--random", action="store_true",
                   help="random weights with the shapes of the preset named by --model, no download (default: off)")
    p.add_argument("--layers", type=int, default=None, help="with --random: this many layers (default: all)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row for decode (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (default: %(default)s)")
    p.add_argument("--batch", default="1,8,16,64", help="batch sizes for decode, comma-separated; '' for none (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=4096, help="prompt tokens for the prefill / first-token figure, "
                   "0 skips it (default: %(default)s)")
    p.add_argument("--compare", default="", help="peers in the same run: transformers,llama.cpp (default: none)")
    p.add_argument("--prefix-cache-workloads", action="store_true",
                   help="also time a multi-turn conversation over a 2,000-token document and 3-shot-shaped "
                        "prompts, with the prefix cache on and off (default: off)")
    p.add_argument("--speculate", default=None, metavar="ngram[:K[:N]]|MODEL[:K]|layers:N[:K]",
                   help="also time batch-1 greedy decode with this speculative decoding against without, on an "
                        "input-grounded prompt and free chat, with the acceptance rate (default: off)")
    p.add_argument("--long-beside", type=_long_beside, default=None, metavar="LONG:N",
                   help="also time one LONG-token prompt served together with N --prompt-len-token ones: its cold "
                        "first token, then the decode of all N+1 rows against the N alone, and the peak memory "
                        "(default: off)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (default: off; on a CPU in fp32 the eager step runs its "
                        "layers in C, which is faster)")
    p.add_argument("--quantize", default=None, choices=["int4", "int8"],
                   help="round the weights to int4 (group 32) or int8 before timing; not with --compare "
                        "(default: off)")


def cmd_bench(args) -> int:
    if args.quantize and args.compare:
        raise ValueError("--quantize: the peers in --compare would run other weights; time them apart")
    if args.speculate:
        from .speculate import parse

        parse(args.speculate)  # a bad one fails before the load
    from .bench import run

    return run(args)


# -- quantize ------------------------------------------------------------------------------------
def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="directory, .gguf file, hub id or alias to quantize (required)")
    p.add_argument("--out", required=True, help="the new checkpoint directory, new or empty (required)")
    p.add_argument("--bits", required=True, help="8 (per-channel symmetric) or 4 (group-wise affine) (required)")
    p.add_argument("--method", default="rtn", help="rtn (round to nearest) or awq (activation-aware) (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=None, help="columns per scale: int4 32, 64 or 128; int8 one "
                   "scale per row unless given (default: 32 for int4)")
    p.add_argument("--calibration", default=None, help="AWQ: a UTF-8 text file (default: a built-in mixed set)")
    p.add_argument("--keep-lm-head", action="store_true", help="leave lm_head (tied: the embedding) unquantized "
                   "(default: off)")
    p.add_argument("--device", default=None, help="where to run the quantization (default: cuda when present, else cpu)")


def cmd_quantize(args) -> int:
    from .save import quantize_checkpoint

    group_size = ... if args.group_size is None else args.group_size  # ...: the default for the bit width
    out = quantize_checkpoint(args.model, args.out, args.bits, args.method, group_size, args.calibration,
                              args.keep_lm_head, args.device)
    print(f"phi3 quantize: wrote {out}", file=sys.stderr)
    return 0


# -- finetune · merge ------------------------------------------------------------------------------
def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--data", required=True, help='JSONL, one {"messages": [...]} or {"prompt": ..., "completion": ...} '
                                                 "per line (required)")
    p.add_argument("--out", required=True, help="directory for the adapter (or model), checkpoints and log.jsonl "
                                                "(required)")

    def flag(name: str, type, help: str) -> None:
        _library_flag(p, name, type, help, "training.FinetuneConfig")

    flag("epochs", int, "passes over the data")
    flag("batch_size", int, "examples per micro-batch, per process")
    flag("grad_accum", int, "micro-batches per optimizer step")
    flag("max_len", int, "longer examples are dropped, with a count")
    flag("lora_r", int, "LoRA rank")
    flag("lora_alpha", float, "LoRA alpha (scale = alpha / rank)")
    flag("lora_dropout", float, "dropout on the LoRA input")
    flag("seed", int, "seed of the data order, LoRA init and dropout")
    flag("save_every", int, "steps between checkpoints, 0 for none")
    flag("keep_checkpoints", int, "checkpoints kept")
    flag("warmup_steps", int, "steps of linear warm-up")
    flag("weight_decay", float, "AdamW weight decay")
    flag("max_grad_norm", float, "gradient clipping, 0 for none")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4, or 2e-5 with --full)")
    p.add_argument("--targets", default=None, help="comma-separated modules for the LoRA, Phi-3 or Llama names "
                                                   "(default: all linear layers: qkv_proj,o_proj,gate_up_proj,down_proj)")
    p.add_argument("--schedule", choices=("linear", "constant", "cosine"), default="linear",
                   help="learning-rate schedule, as transformers' (default: %(default)s)")
    p.add_argument("--full", action="store_true", help="train every weight instead of a LoRA (default: off)")
    p.add_argument("--quantize", default=None, help="int4 or int8: a LoRA on the base quantized on the fly "
                                                    "(QLoRA; a GGUF's packed blocks stay packed anyway) (default: off)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, more compute (default: off)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                                                         "(default: off)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present; under torchrun, each "
                                                  "process its LOCAL_RANK's GPU)")
    p.add_argument("--dtype", default=None, help="compute dtype, bf16 or fp32 (default: bf16 on GPU, fp32 on CPU)")


def cmd_finetune(args) -> int:
    from .training import finetune

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "model", "data", "out")
               and v is not None and not isinstance(v, _LibraryDefault)}
    finetune(args.model, args.data, args.out, **options)
    return 0


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--adapter", required=True, help="the PEFT LoRA adapter directory (required)")
    p.add_argument("--out", required=True, help="a new directory for the merged checkpoint (required)")
    p.add_argument("--dtype", default=None, help="the saved weights' dtype (default: the base checkpoint's; fp32 "
                                                 "for a GGUF base)")
    p.add_argument("--device", default=None, help="where to merge, cpu or cuda (default: cuda when present)")


def cmd_merge(args) -> int:
    from .save import merge

    print(f"phi3 merge: wrote {merge(args.model, args.adapter, args.out, dtype=args.dtype, device=args.device)}",
          file=sys.stderr)
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    def flag(name: str, **kw) -> None:  # lm-eval's spelling and the dashed one
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kw)

    _add_model_arg(p)
    flag("tasks", default=None, help="lm-eval task names, comma-separated; needed unless only plotting (default: none)")
    flag("num_fewshot", type=int, default=None, help="examples in each prompt (default: each task's own)")
    flag("limit", type=float, default=None, help="at most this many documents per task; below 1, a fraction "
                                                 "(default: all)")
    flag("include_path", default=None, help="a folder of task YAMLs, e.g. tasks over local data files (default: "
                                            "lm-eval's tasks only)")
    flag("batch_size", default="auto", help="accepted as lm-eval takes it; phi3 batches by tokens on its own "
                                            "(default: %(default)s)")
    flag("log_samples", action="store_true", help="also write every request and answer, samples_<task>_*.jsonl (default: off)")
    flag("output_path", default=None, help="a folder for lm-eval's results_*.json (and samples) (default: none)")
    flag("seed", default="0,1234,1234,1234", help="lm-eval's seeds: python,numpy,torch,few-shot, or one for all "
                                                  "(default: %(default)s, lm-eval's)")
    flag("max_length", type=int, default=None, help="tokens the model reads at once (default: its context)")
    _add_adapter_arg(p)
    p.add_argument("--quantize", default=None, choices=["int4", "int8"],
                   help="quantize a floating-point checkpoint in memory first (default: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: fp32 on CPU, the reference's "
                                                 "numbers; the checkpoint's own on GPU)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every scored input whole, not after the longest cached prefix of few-shot "
                        "examples (default: reuse them; the numbers are the same either way)")
    p.add_argument("--plot", default=None, help="write a bar chart (png, svg, pdf) of this run beside --compare's "
                                                "(needs matplotlib) (default: none)")
    p.add_argument("--compare", nargs="+", default=[], help="earlier runs' results_*.json files or --output_path "
                                                            "folders to draw beside this one in --plot (default: none)")


def cmd_eval(args) -> int:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise RuntimeError("phi3 eval needs lm-evaluation-harness: pip install 'phi3[eval]'")
    if args.plot is None and args.compare:
        raise ValueError("--compare names runs to draw in --plot; give --plot FILE")
    if args.tasks is None and not (args.plot and args.compare):
        raise ValueError("give --tasks (comma-separated lm-eval task names), or --plot FILE --compare RUNS to draw "
                         "earlier runs only")
    for name, value, low in (("num_fewshot", args.num_fewshot, 0), ("max_length", args.max_length, 1)):
        if value is not None and value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")
    if args.limit is not None and not args.limit > 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        raise ValueError(f"--batch_size must be a positive integer or auto, got {args.batch_size!r}")
    try:
        seed = [int(x) for x in args.seed.split(",")]
    except ValueError:
        raise ValueError(f"--seed must be an integer or four comma-separated ones, got {args.seed!r}") from None
    if len(seed) not in (1, 4):
        raise ValueError(f"--seed must be an integer or four comma-separated ones, got {args.seed!r}")
    from . import evaluate

    files = []
    if args.tasks is not None:
        tasks = [t for t in args.tasks.split(",") if t.strip()]
        manager = evaluate.task_manager(tasks, args.include_path)
        from .loader import load

        llm = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, adapter=args.adapter,
                   prefix_cache=args.prefix_cache)
        name = args.model + (f"+{args.quantize}" if args.quantize else "") + ("+adapter" if args.adapter else "")
        results = evaluate.evaluate(llm, tasks, num_fewshot=args.num_fewshot,
                                    limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                                    include_path=args.include_path, log_samples=args.log_samples,
                                    output_path=args.output_path, seed=seed[0] if len(seed) == 1 else seed,
                                    max_length=args.max_length, model_name=name, manager=manager)
        print(f"phi3 ({name}), limit: {args.limit}, num_fewshot: {args.num_fewshot}")
        print(evaluate.table(results))
        if args.plot:
            files.append(results)
    if args.plot:
        print(f"phi3 eval: wrote {evaluate.plot([*args.compare, *files], args.plot)}", file=sys.stderr)
    return 0


# -- the program -----------------------------------------------------------------------------------
COMMANDS = {  # name: (what it does, its flags, its work)
    "generate": ("answer one prompt, streaming", _add_generate_args, cmd_generate),
    "chat": ("an interactive multi-turn chat", _add_chat_args, cmd_chat),
    "info": ("config summary, parameter count, memory needs", _add_info_args, cmd_info),
    "serve": ("an OpenAI-compatible HTTP server (chat and text completions)", _add_serve_args, cmd_serve),
    "quantize": ("write an int8 / int4 weight-only quantized checkpoint (RTN or AWQ)", _add_quantize_args,
                 cmd_quantize),
    "bench": ("prefill/decode speed, first-token time, memory, fraction of the floor", _add_bench_args, cmd_bench),
    "finetune": ("LoRA or full fine-tuning on chat or prompt/completion JSONL (data-parallel under torchrun)",
                 _add_finetune_args, cmd_finetune),
    "merge": ("fold a LoRA adapter into its base and write a plain checkpoint", _add_merge_args, cmd_merge),
    "eval": ("lm-evaluation-harness tasks (few-shot, greedy) with lm-eval's table and output files", _add_eval_args,
             cmd_eval),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3", description="Run Phi-3 models: " + ", ".join(COMMANDS) + ".")
    parser.add_argument("--version", action="version", version=f"phi3 {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}  # name -> its parser, for `_unrecognized`
    for name, (summary, add_args, run) in COMMANDS.items():
        p = parser.commands[name] = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        add_args(p)
        p.set_defaults(func=run)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phi3")
    except PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def _unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """argparse's message for flags it does not know, with the closest flags of the command."""
    import difflib

    flags = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.7) if arg.startswith("--") else []
        hints += [f"did you mean {close[0]}? (for {arg.split('=')[0]})"] if close else []
    return f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands[args.command]
        command.error(_unrecognized(command, unknown))
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader left (`phi3 generate … | head -c 20`): stop quietly, as other Unix tools do.
        # stdout goes to /dev/null so that the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
