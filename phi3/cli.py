"""`phi3 generate · chat · info`: thin argparse subcommands over the library."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "microsoft/Phi-3-mini-128k-instruct"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"directory, .gguf file, hub id or alias (default {DEFAULT_MODEL}; offline: smollm2-135m-instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: the fastest exact-enough choice)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--system", default=None, help="a system message")


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                     repetition_penalty=args.repetition_penalty, seed=args.seed,
                                     stop=tuple(args.stop))


def _load(args):
    from .loader import load

    return load(args.model, device=args.device, dtype=args.dtype)


def _print_stream(chunks) -> None:
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()


def cmd_generate(args) -> int:
    params = _sampling(args)  # validate before the (slow) load
    llm = _load(args)
    if args.raw:
        prompt = (args.system + "\n" if args.system else "") + args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    _print_stream(llm.stream(prompt, params))
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"phi3 chat with {args.model}. /reset clears the conversation, /exit (or Ctrl-D) quits; "
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
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        answer = []
        try:
            for chunk in llm.stream(system + history, params):
                answer.append(chunk.text)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_info(args) -> int:
    from .config import PRESETS, preset
    from .weights import ModelNotFoundError, read_config

    try:
        config, where = read_config(args.model)
    except ModelNotFoundError:
        if args.model.lower().removeprefix("microsoft/") not in PRESETS:
            raise
        config, where = preset(args.model), "built-in preset (weights not downloaded)"
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
    for name, size in (("bf16/fp16", 2), ("fp32", 4)):
        weights, kv = n * size, config.kv_cache_bytes(context, size)
        print(f"memory {name:<9} weights {weights / gib:6.2f} GiB + KV cache at {context} tokens "
              f"{kv / gib:6.2f} GiB = {(weights + kv) / gib:6.2f} GiB")
    return 0


def cmd_quantize(args) -> int:
    from .convert import quantize_checkpoint

    group_size = ... if args.group_size is None else args.group_size  # ...: the default for the bit width
    out = quantize_checkpoint(args.model, args.out, args.bits, args.method, group_size, args.calibration,
                              args.keep_lm_head, args.device)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3", description="Run Phi-3 models: generate, chat, info.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streaming")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="an interactive multi-turn chat")
    _add_model_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    i = sub.add_parser("info", help="config summary, parameter count, memory needs")
    _add_model_args(i)
    i.add_argument("--context", type=int, default=None, help="tokens of context for the KV-cache estimate")
    i.set_defaults(func=cmd_info)
    q = sub.add_parser("quantize", help="write an int8 / int4 weight-only quantized checkpoint")
    q.add_argument("--model", "-m", required=True, help="directory, .gguf file, hub id or alias to quantize")
    q.add_argument("--out", required=True, help="the new checkpoint directory (must not exist or be empty)")
    q.add_argument("--bits", required=True, help="8 (per-channel symmetric) or 4 (group-wise affine)")
    q.add_argument("--method", default="rtn", help="rtn (round to nearest, default) or awq (activation-aware)")
    q.add_argument("--group-size", type=int, default=None, help="columns per scale: int4 32 (default), 64, 128; "
                   "int8 one scale per row unless given")
    q.add_argument("--calibration", default=None, help="AWQ: a UTF-8 text file (default: a built-in mixed set)")
    q.add_argument("--keep-lm-head", action="store_true", help="leave lm_head (tied: the embedding) unquantized")
    q.add_argument("--device", default=None, help="where to run the quantization (default: cuda when present)")
    q.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
