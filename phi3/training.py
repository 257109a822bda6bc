"""Supervised fine-tuning (`phi3.finetune`): LoRA (default) or all weights, on chat or prompt/completion JSONL.

    phi3.finetune("smollm2-135m-instruct", "chats.jsonl", "out")               # LoRA r=16 on every linear
    torchrun --nproc-per-node 2 -m phi3 finetune --model M --data D --out O     # data parallel (DDP)

One step is one global batch of batch_size x grad_accum x world_size examples, taken in order from
a permutation of the data drawn from (seed, epoch): every example once per epoch, split across the
ranks. The loss is the summed cross-entropy of the batch's learned tokens over their count in the
whole global batch, so an update does not depend on how the batch is split into micro-batches or
ranks. A checkpoint (every `save_every` steps; see `phi3.checkpoints`) holds the trainable weights,
the optimizer state and every rank's RNG state; the step fixes the data order, so `resume`
continues a run exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoints, lora
from .training_data import Example, read_jsonl

SCHEDULES = ("linear", "constant", "cosine")
# Settings that may change between a run and its resumption; every other one must match.
_RESUMABLE = ("out", "resume", "device", "save_every", "keep_checkpoints")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the CLI flags, in snake case). Validated on creation."""

    model: str
    data: str
    out: str
    epochs: int = 1
    lr: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full fine-tuning
    batch_size: int = 1  # examples per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per step on each rank
    max_len: int = 2048  # longer examples are dropped, with a count
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(lora.ALL_TARGETS))
    full: bool = False  # train every weight instead of a LoRA
    quantize: str | None = None  # "int4" or "int8": LoRA on a base quantized on the fly (QLoRA)
    seed: int = 0
    resume: bool = False
    gradient_checkpointing: bool = False
    dtype: str | None = None  # compute dtype; None: bf16 on GPU, fp32 on CPU
    device: str | None = None
    save_every: int = 500  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    warmup_steps: int = 0
    schedule: str = "linear"  # as transformers' schedulers: linear decay, constant, cosine
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self) -> None:
        self.model, self.data, self.out = str(self.model), str(self.data), str(self.out)
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = list(self.targets)
        lora.normalize_targets(self.targets)  # unknown names fail here, before anything loads
        if self.lr is None:
            self.lr = 2e-5 if self.full else 2e-4
        for name in ("epochs", "batch_size", "grad_accum", "max_len", "lora_r", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("save_every", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        if not (self.lr > 0 and self.lora_alpha > 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise ValueError("lr and lora-alpha must be positive, weight-decay and max-grad-norm non-negative")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.quantize is not None:
            from .convert import parse_bits

            parse_bits(self.quantize)
            if self.full:
                raise ValueError("--quantize trains a LoRA on a quantized base; it cannot be combined with --full")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    def identity(self) -> dict:
        """What makes two runs the same run: every setting but those in _RESUMABLE, and the data's hash."""
        settings = {k: v for k, v in asdict(self).items() if k not in _RESUMABLE}
        return {**settings, "data_sha256": _sha256(Path(self.data))}


@dataclass
class FinetuneResult:
    out: Path
    steps: int  # optimizer steps taken in total (a resumed run counts the earlier ones)
    losses: list[float]  # the loss of each step, from the first step of the run (log.jsonl)
    start_step: int = 0  # the step this call started from (> 0: resumed from a checkpoint)


def finetune(model, data, out, **options) -> FinetuneResult:
    """Fine-tune `model` (anything `phi3.load` accepts; a packed base, such as a GGUF's int4 blocks,
    stays packed under a LoRA (QLoRA; `quantize="int4"` packs a float one) and is dequantized for
    full fine-tuning) on the JSONL file
    `data`, writing to the directory `out`: a PEFT adapter (LoRA, the default) or a full checkpoint
    (`full=True`), checkpoints `checkpoint-<step>/`, and `log.jsonl` (one line per step).

    Options are `FinetuneConfig`'s fields. Under torchrun (WORLD_SIZE > 1) it trains data-parallel
    with DDP (NCCL on GPUs, gloo on CPU); rank 0 writes every file.
    """
    cfg = FinetuneConfig(model=model, data=data, out=out, **options)
    rank, world, device, owned = _init_distributed(cfg.device)
    try:
        return _Run(cfg, rank, world, device).train()
    finally:
        if owned:
            dist.destroy_process_group()


def _init_distributed(device: str | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, this rank's device, whether we started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if world == 1:
        return 0, 1, torch.device(device or ("cuda" if cuda else "cpu")), False
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"), owned


class _Run:
    def __init__(self, cfg: FinetuneConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out = Path(cfg.out)
        self.compute_dtype = _dtype(cfg.dtype, device)
        self.identity = cfg.identity()
        self.start_fresh = checkpoints.check_out(self.out, self.identity, cfg.resume)
        if world > 1:
            dist.barrier()  # every rank has judged --out before rank 0 writes to it

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"phi3 finetune: {message}", file=sys.stderr)

    # -- setup -----------------------------------------------------------------------------------
    def train(self) -> FinetuneResult:
        cfg = self.cfg
        finished = checkpoints.finished_step(self.out)
        if not self.start_fresh and finished is not None:
            self.log(f"{self.out} holds a finished run; nothing to resume")
            return FinetuneResult(self.out, finished, checkpoints.read_losses(self.out), finished)
        from .loader import load

        # Full fine-tuning keeps fp32 master weights and computes under autocast; a LoRA trains
        # fp32 adapters beside a base held in the compute dtype.
        # A packed base (a GGUF, a quantized checkpoint, or `quantize`) dequantizes per call: QLoRA.
        from .quantize import dequantize_per_call

        llm = load(cfg.model, device=self.device, dtype=torch.float32 if cfg.full else self.compute_dtype,
                   prepare=dequantize_per_call)
        if cfg.quantize is not None:
            from .convert import quantize_model

            quantize_model(llm, bits=cfg.quantize, kernel="packed")
        if cfg.full:  # every weight trains: a packed base becomes float (its exact dequantized values)
            from .quantize import dequantize_model

            dequantize_model(llm.model)
        if llm.tokenizer is None:
            raise ValueError(f"{cfg.model}: fine-tuning needs the model's tokenizer, and none was found")
        data = read_jsonl(cfg.data, llm.tokenizer, cfg.max_len)
        if data.dropped:
            lines = ", ".join(map(str, data.dropped[:10])) + (" …" if len(data.dropped) > 10 else "")
            self.log(f"dropped {len(data.dropped)} of {len(data.dropped) + len(data.examples)} examples longer "
                     f"than max-len {cfg.max_len} tokens ({data.path} lines {lines})")
        self.llm, self.data, self.model = llm, data, llm.model
        self.pad_id = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else 0
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        if cfg.full:
            self.model.requires_grad_(True)
            self.params = list(self.model.parameters())
        else:
            self.params = lora.add_lora(self.model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        self.model.train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.names = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout draws, different on each rank
        self.step = 0 if self.start_fresh else self._restore()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run.json").write_text(json.dumps(self.identity, indent=2) + "\n")
            checkpoints.truncate_log(self.out, self.step)
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                               broadcast_buffers=False)
        return self._loop()

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> FinetuneResult:
        cfg, n = self.cfg, len(self.data.examples)
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        steps_per_epoch = math.ceil(n / per_step)
        total = cfg.epochs * steps_per_epoch
        self.log(f"{n} examples, {total} steps of {per_step} examples ({cfg.epochs} epoch(s)), "
                 f"{'full' if cfg.full else f'LoRA r={cfg.lora_r}'} on {self.device} in "
                 f"{str(self.compute_dtype).removeprefix('torch.')}" + (f", {self.world} ranks" if self.world > 1 else ""))
        bar = tqdm(total=total, initial=self.step, desc="fine-tuning", unit="step", disable=None if self.rank == 0 else True)
        order, order_epoch, start = None, -1, self.step
        while self.step < total:
            epoch, index = divmod(self.step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = _order(n, cfg.seed, epoch), epoch
            batch = [self.data.examples[i] for i in order[index * per_step:(index + 1) * per_step]]
            started, lr = time.perf_counter(), _lr(cfg, self.step, total)
            loss, tokens = self._step(batch, lr)
            self.step += 1
            seconds = time.perf_counter() - started
            if self.rank == 0:
                checkpoints.append_log(self.out, {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr,
                                                  "tokens": tokens, "seconds": round(seconds, 4)})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                bar.update()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                self._save_checkpoint()
        bar.close()
        self._save_final(total)
        losses = checkpoints.read_losses(self.out) if self.rank == 0 else []
        if losses:
            self.log(f"done: {total} steps, last loss {losses[-1]:.4f}; wrote {self.out}")
        return FinetuneResult(self.out, total, losses, start)

    def _step(self, batch: list[Example], lr: float) -> tuple[float, int]:
        """One optimizer step on this rank's share of the global `batch`: (global loss, tokens seen)."""
        cfg, W = self.cfg, self.world
        n_learned = sum(sum(e.labels[1:]) for e in batch)  # the global batch's learned tokens
        mine = batch[self.rank::W]
        micro = [mine[m * cfg.batch_size:(m + 1) * cfg.batch_size] for m in range(cfg.grad_accum)]
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        autocast = torch.autocast(self.device.type, dtype=self.compute_dtype,
                                  enabled=cfg.full and self.compute_dtype != torch.float32)
        for m, examples in enumerate(micro):
            if not examples and W == 1:
                continue
            last = m == len(micro) - 1
            sync = self.net.no_sync() if W > 1 and not last else nullcontext()
            with sync:
                with autocast:
                    if examples:
                        tokens_in, targets = _batch(examples, self.pad_id, self.device)
                        logits = self.net(tokens_in)  # (b, T, V)
                        summed = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                 reduction="sum")
                        tokens += sum(len(e.ids) for e in examples)
                    else:  # this rank's share of a short last batch ran out: a zero-weight pass keeps DDP in step
                        summed = self.net(torch.full((1, 1), self.pad_id, device=self.device)).float().sum() * 0
                (summed * (W / n_learned)).backward()
            loss_sum += summed.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64, device=self.device)
        if W > 1:
            dist.all_reduce(stats)
        return stats[0].item() / n_learned, int(stats[1].item())

    # -- files -----------------------------------------------------------------------------------
    def _save_final(self, total: int) -> None:
        if self.rank != 0:
            return
        self.model.eval()
        if self.cfg.full:
            from .save import save_pretrained
            from .weights import resolve

            self.model.requires_grad_(False)
            save_pretrained(self.llm, self.out, base=resolve(self.cfg.model), dtype=self.compute_dtype)
        else:
            lora.save_adapter(self.model, self.out, dropout=self.cfg.lora_dropout, base_model=self.cfg.model)
        checkpoints.mark_finished(self.out, total)

    def _gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states (on rank 0; the others get {})."""
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        out = {}
        for kind, state in mine.items():
            if self.world == 1:
                out[f"{kind}.0"] = state
                continue
            local = state.to(self.device)
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            out.update({f"{kind}.{r}": p.cpu() for r, p in enumerate(parts)})
        return out if self.rank == 0 else {}

    def _save_checkpoint(self) -> None:
        rng = self._gather_rng()
        if self.rank != 0:
            return
        cfg = self.cfg
        extra = None if cfg.full else partial(lora.save_adapter, self.model, dropout=cfg.lora_dropout,
                                              base_model=cfg.model)  # a usable adapter too
        checkpoints.save_checkpoint(self.out, self.step, self.world, self._named_params(), self.optimizer, rng,
                                    cfg.keep_checkpoints, extra)

    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        return {self.names[id(p)]: p for p in self.params}

    def _restore(self) -> int:
        """Load the latest checkpoint into the model, optimizer and RNG; its step (0 if none)."""
        found = checkpoints.checkpoints(self.out)
        if not found:
            self.log(f"no checkpoint in {self.out} yet: starting from step 0")
            return 0
        saved, rng = checkpoints.restore_checkpoint(found[-1], self._named_params(), self.optimizer, self.device)
        if saved["world_size"] == self.world:
            torch.set_rng_state(rng[f"cpu.{self.rank}"])
            if self.device.type == "cuda" and f"cuda.{self.rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{self.rank}"], self.device)
        else:
            self.log(f"{found[-1]} was written by {saved['world_size']} ranks, this run has {self.world}: the data "
                     "order is the same, dropout draws are not")
        self.log(f"resuming from {found[-1]} (step {saved['step']})")
        return saved["step"]


# -- helpers -------------------------------------------------------------------------------------
def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of `epoch`: the (epoch+1)-th permutation drawn from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.randperm(n, generator=g)
    return torch.randperm(n, generator=g).tolist()


def _batch(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (b, T) padded on the right, targets (b, T): the next token where it is learned, else -100."""
    T = max(len(e.ids) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        tokens[i, :len(ids)] = ids
        targets[i, :len(ids) - 1] = torch.where(torch.tensor(e.labels[1:]), ids[1:], -100)
    return tokens.to(device), targets.to(device)


def _lr(cfg: FinetuneConfig, step: int, total: int) -> float:
    """transformers' schedules (get_{linear,constant,cosine}_schedule_with_warmup) at `step` (0-based)."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.lr * step / max(1, w)
    progress = (step - w) / max(1, total - w)
    factor = {"linear": max(0.0, 1 - progress), "constant": 1.0,
              "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.schedule]
    return cfg.lr * factor


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from .loader import pick_dtype

    dtype = pick_dtype(name, device, None)
    if dtype == torch.float16:
        raise ValueError("fp16 training is not supported (it needs loss scaling); use bf16 or fp32")
    return dtype


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

