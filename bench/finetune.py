"""Training speed: `phi3.finetune` against TRL's SFTTrainer + PEFT on the same model, data and settings,
in one run; prints tokens/s side by side.

    python bench/finetune.py                                    # SmolLM2-135M-Instruct, LoRA r=16, CPU fp32
    python bench/finetune.py --steps 3 --batch-size 2           # a quick check that both sides run
    python bench/finetune.py --device cuda --batch-size 8 --steps 50 --max-len 1024

Needs the `bench` extra (TRL, PEFT). Both sides train from the same Hugging Face directory (a GGUF
base is dequantized and written once with phi3's `save_pretrained`), on the same made-up
conversations in prompt/completion form (the loss on the completion: TRL's completion_only_loss),
one epoch of `steps x batch-size` examples, LoRA on every linear layer, AdamW at the same learning
rate with transformers' linear schedule, gradient clipping at 1.0, padding to the longest example of
a micro-batch, no packing, gradient checkpointing off (or on for both). CPU trains in fp32; CUDA in
bf16 (base in bf16, LoRA weights in fp32 on both sides). Tokens/s counts the non-pad tokens a step
trains on, over every step but the first (warm-up), step time measured end to end (data included).
Both sides draw the data order from torch.randperm seeded with 0, so their first losses should agree
(B = 0 at the start): a check that they train on the same tokens with the same loss.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

import phi3
from phi3.save import save_pretrained
from phi3.weights import resolve

WORDS = ("river stone light garden paper window cloud market engine silver orange music winter harbor "
         "forest signal letter bridge candle valley planet number question answer morning story").split()


def make_data(n: int, seed: int, max_len: int) -> list[dict]:
    """`n` made-up prompt/completion conversations of varied length, all well within `max_len` tokens
    (so that neither side drops or truncates any)."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": [{"role": "user", "content": f"Summarize in a few words: {words(5, max_len // 4)}"}],
             "completion": [{"role": "assistant", "content": words(3, max_len // 8) + "."}]} for _ in range(n)]


def hf_base(model: str, folder: Path) -> Path:
    """A Hugging Face directory of `model` (written once, dequantized to fp32, when it is a GGUF file)."""
    path = resolve(model)
    if path.is_dir():
        return path
    if not (folder / "config.json").exists():
        save_pretrained(phi3.load(path, device="cpu", dtype=torch.float32), folder, base=path, dtype=torch.float32)
    return folder


def steady(tokens: list[int], seconds: list[float]) -> float:
    """Tokens/s over every step but the first (the warm-up), or the one step there is."""
    skip = 1 if len(seconds) > 1 else 0
    return sum(tokens[skip:]) / sum(seconds[skip:])


def bench_ours(base: Path, data: Path, out: Path, args) -> dict:
    run = phi3.finetune(base, data, out, epochs=1, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        max_len=args.max_len, lr=args.lr, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                        lora_dropout=0.05, save_every=0, device=args.device, dtype=args.dtype,
                        gradient_checkpointing=args.gradient_checkpointing)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"tok_s": steady([e["tokens"] for e in log], [e["seconds"] for e in log]), "losses": run.losses}


def bench_trl(base: Path, records: list[dict], out: Path, args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = args.device.startswith("cuda")
    step_ends, batch_tokens = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            _sync(args.device)
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            _sync(args.device)
            step_ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(args.device)
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=args.grad_accum, num_train_epochs=1, learning_rate=args.lr,
                       lr_scheduler_type="linear", max_grad_norm=1.0, max_length=args.max_len, packing=False,
                       completion_only_loss=True, gradient_checkpointing=args.gradient_checkpointing,
                       bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
                       seed=0, dataloader_num_workers=0)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(base), peft_config=lora, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    seconds = [b - a for a, b in zip(step_ends, step_ends[1:])]
    a = args.grad_accum
    tokens = [sum(batch_tokens[i * a:(i + 1) * a]) for i in range(len(seconds))]
    return {"tok_s": steady(tokens, seconds), "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (one epoch of steps x batch-size examples)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--peers", default="ours,trl")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    records = make_data(args.steps * args.batch_size * args.grad_accum, seed=0, max_len=args.max_len)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = hf_base(args.model, tmp / "base")
        data = tmp / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        if "ours" in args.peers:
            results["phi3"] = bench_ours(base, data, tmp / "ours", args)
        if "trl" in args.peers:
            results["TRL SFTTrainer + PEFT"] = bench_trl(base, records, tmp / "trl", args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"\n{args.model} on {device} ({torch.get_num_threads()} threads), {args.dtype}, LoRA r={args.lora_r} on every "
          f"linear, {args.steps} steps x {args.batch_size * args.grad_accum} examples, max-len {args.max_len}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'trainer':<24} {'tokens/s':>10} {'first loss':>11} {'mean loss':>10}")
    for name, r in results.items():
        print(f"{name:<24} {r['tok_s']:>10.0f} {r['losses'][0]:>11.4f} {sum(r['losses']) / len(r['losses']):>10.4f}")
    if len(results) == 2:
        ours, theirs = (r["tok_s"] for r in results.values())
        print(f"phi3 / TRL: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
