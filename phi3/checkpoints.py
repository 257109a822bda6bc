"""A fine-tuning run's directory: the guard on `--out`, `checkpoint-<step>/` written and restored, `log.jsonl`.

    out/run.json              the run's settings and data hash (what --resume must match)
    out/log.jsonl             one line per step: loss, lr, tokens, seconds
    out/checkpoint-<step>/    trainable.safetensors (by parameter name), optimizer.safetensors +
                              optimizer.json, rng.safetensors (every rank's), state.json; a LoRA
                              run's also holds the adapter in PEFT's format
    out/trainer_state.json    written when the run has finished

Nothing is pickled: tensors go to safetensors, the rest to JSON. A checkpoint is written to a
temporary directory and renamed into place, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def check_out(out: Path, identity: dict, resume: bool) -> bool:
    """Refuse an `out` that holds something else; True when the run starts fresh there."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return True
    run = out / "run.json"
    if not run.is_file():
        raise ValueError(f"--out {out} is not empty and holds no phi3 fine-tuning run; pick a new or empty directory")
    if not resume:
        raise ValueError(f"--out {out} already holds a fine-tuning run; pass --resume to continue it, "
                         "or pick another directory")
    saved = json.loads(run.read_text())
    changed = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"--out {out} holds a different run, so --resume cannot continue it ({'; '.join(changed)})")
    return False


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint directories in `out`, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def save_checkpoint(out: Path, step: int, world: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: dict[str, torch.Tensor], keep: int, extra: Callable[[Path], None] | None = None) -> Path:
    """Write `checkpoint-<step>` (then drop all but the newest `keep`); `extra(folder)` adds files to it."""
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "trainable.safetensors")
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(state["param_groups"]) + "\n")
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world}) + "\n")
    if extra is not None:
        extra(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(out)[:-keep]:  # keep >= 1
        shutil.rmtree(old)
    return final


def restore_checkpoint(ckpt: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                       device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load `ckpt` into `params` (by name) and `optimizer`; returns (state.json, every rank's RNG states)."""
    weights = load_file(ckpt / "trainable.safetensors")
    if set(weights) != set(params):
        raise ValueError(f"{ckpt}: its trainable tensors do not match this run's")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    groups = json.loads((ckpt / "optimizer.json").read_text())
    for g in groups:
        g["betas"] = tuple(g["betas"])
    state: dict[int, dict] = {}
    for key, t in load_file(ckpt / "optimizer.safetensors").items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = t if k == "step" else t.to(device)  # Adam keeps its step count on the CPU
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((ckpt / "state.json").read_text()), load_file(ckpt / "rng.safetensors")


def mark_finished(out: Path, step: int) -> None:
    (out / "trainer_state.json").write_text(json.dumps({"step": step, "done": True}) + "\n")


def finished_step(out: Path) -> int | None:
    """The last step of a finished run in `out`, or None."""
    path = out / "trainer_state.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None


def truncate_log(out: Path, step: int) -> None:
    """Keep log.jsonl's lines up to `step`, where the run restarts (a crash may have logged more)."""
    path = out / "log.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def append_log(out: Path, entry: dict) -> None:
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_losses(out: Path) -> list[float]:
    path = out / "log.jsonl"
    return [json.loads(ln)["loss"] for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
