"""LoRA adapters on the model's linear layers, read and written in PEFT's format.

    y = base(x) + (dropout(x) @ A^T @ B^T) * scale        A (r, in), B (out, r), scale = alpha / r

Files: `adapter_config.json` + `adapter_model.safetensors`, tensors keyed
`base_model.model.<module path>.lora_A.weight`, module paths as transformers names the base model's
modules. A Phi-3 base has the fused `qkv_proj` and `gate_up_proj` in transformers too. A Llama-layout
base keeps q/k/v and gate/up apart in transformers (we fuse them on load): a LoRA on a fused
projection is exactly a set of LoRAs on its parts that share A, with B split by rows, and is saved
so. An adapter whose parts have their own A's (trained elsewhere) is read as one LoRA of the
stacked rank with a block-diagonal B: the same function. Target names map both ways: on either
layout, `qkv_proj` means q, k and v, and `q_proj` the Q rows of `qkv_proj`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Phi3Config
from .model import Phi3

FUSED = ("qkv_proj", "gate_up_proj")
ALL_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {part: fused for fused, parts in PARTS.items() for part in parts}
PARENT = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter (or a target list) that does not fit the model; the message names the file or target."""


class LoRALinear(nn.Module):
    """`base(x)` plus a low-rank update. `base` is any module mapping (..., in) -> (..., out).

    `rows` (out,) marks the output rows the update may change (None: all): a LoRA on some parts
    of a fused projection. The update is computed in fp32 and added before casting back, as PEFT
    does. No host syncs or data-dependent branches: the step can be captured in a CUDA graph.
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 rows: torch.Tensor | None = None, targets: tuple[str, ...] | None = None):
        super().__init__()
        self.base = base
        self.targets = targets  # the parts of a fused projection it adapts (None: all), for saving
        out_features, in_features = base.out_features, base.in_features
        device = next(itertools.chain(base.parameters(), base.buffers())).device  # a packed base may hold only buffers
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init (B = 0: starts as the base)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.register_buffer("rows", None if rows is None else rows.to(device, torch.float32)[:, None], persistent=False)

    @property
    def delta_B(self) -> torch.Tensor:
        """B with the rows outside the targeted parts held at zero."""
        return self.lora_B if self.rows is None else self.lora_B * self.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.delta_B.T  # (..., out)
        return (y + update * self.scale).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in: W + scale * B @ A (computed in fp32)."""
        w = self.base.weight
        return (w.float() + self.scale * (self.delta_B.float() @ self.lora_A.float())).to(w.dtype)


# -- naming --------------------------------------------------------------------------------------
def row_parts(config: Phi3Config, module: str) -> dict[str, slice]:
    """transformers' part name -> its rows in our module (one entry, the module itself, when unfused)."""
    if module == "qkv_proj":
        q, kv = config.q_size, config.kv_size
        return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    if module == "gate_up_proj":
        i = config.intermediate_size
        return {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i)}
    return {module: slice(None)}


def normalize_targets(targets) -> dict[str, tuple[str, ...] | None]:
    """Target names (ours or transformers', either layout) -> our module -> the parts it adapts (None: all).

    Raises AdapterError naming an unknown target."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets or ALL_TARGETS)
    if targets in (["all"], ["all-linear"]):
        targets = list(ALL_TARGETS)
    parts: dict[str, set[str]] = {}
    for t in targets:
        module = t if t in ALL_TARGETS else PART_OF.get(t)
        if module is None:
            known = ", ".join([*ALL_TARGETS, *PART_OF])
            raise AdapterError(f"unknown target module {t!r}; known: {known} (or 'all')")
        parts.setdefault(module, set()).update(PARTS.get(t, {t}) if t == module else {t})
    return {m: None if m not in PARTS or p == set(PARTS[m]) else tuple(x for x in PARTS[m] if x in p)
            for m, p in parts.items()}


def _modules(model: Phi3):
    """(layer index, our module name, the parent module holding it) for every adaptable linear."""
    for i, block in enumerate(model.model.layers):
        for name, parent in PARENT.items():
            yield i, name, getattr(block, parent)


# -- training-time injection -----------------------------------------------------------------------
def add_lora(model: Phi3, targets=None, rank: int = 16, alpha: float = 32, dropout: float = 0.0) -> list[nn.Parameter]:
    """Wrap the targeted linears of `model` in fresh LoRAs (B = 0, so the model is unchanged at first).

    Returns the LoRA parameters (A and B of each), the only ones that require grad."""
    if not (isinstance(rank, int) and rank > 0):
        raise AdapterError(f"LoRA rank must be a positive integer, got {rank!r}")
    wanted = normalize_targets(targets)
    params = []
    for layer, name, parent in _modules(model):
        if name not in wanted:
            continue
        base = getattr(parent, name)
        rows = None
        if wanted[name] is not None:
            rows = torch.zeros(base.out_features)
            for part, span in row_parts(model.config, name).items():
                if part in wanted[name]:
                    rows[span] = 1
        lora = LoRALinear(base, rank, alpha / rank, dropout, rows, wanted[name])
        setattr(parent, name, lora)
        params += [lora.lora_A, lora.lora_B]
    return params


def lora_modules(model: Phi3):
    """(layer, module name, LoRALinear) for every LoRA in `model`."""
    for layer, name, parent in _modules(model):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            yield layer, name, module


# -- PEFT's format -------------------------------------------------------------------------------
def adapter_tensors(model: Phi3) -> dict[str, torch.Tensor]:
    """The model's LoRAs keyed as PEFT saves them for the transformers model of this layout."""
    llama = model.config.model_type == "llama"
    out = {}
    for layer, name, lora in lora_modules(model):
        A, B = lora.lora_A.detach(), lora.delta_B.detach()
        parts = row_parts(model.config, name) if llama else {name: slice(None)}
        chosen = lora.targets if llama and lora.targets is not None else tuple(parts)
        for part in chosen:
            key = f"{PEFT_PREFIX}model.layers.{layer}.{PARENT[name]}.{part}"
            out[f"{key}.lora_A.weight"] = A.float().clone()  # each part its own copy of the shared A
            out[f"{key}.lora_B.weight"] = B[parts[part]].float().contiguous()
    return out


def save_adapter(model: Phi3, folder: str | Path, *, dropout: float = 0.0, base_model: str | None = None) -> None:
    """Write the model's LoRAs as a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`).

    `r` and `lora_alpha` are the most common rank and alpha (= scale * rank); modules that differ
    get `rank_pattern` / `alpha_pattern` entries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model)
    targets = sorted({k.split(".")[-3] for k in tensors})  # ...qkv_proj.lora_A.weight
    shapes = {(layer, name): (m.lora_A.shape[0], round(m.scale * m.lora_A.shape[0], 6))
              for layer, name, m in lora_modules(model)}
    rank, alpha = max(set(shapes.values()), key=list(shapes.values()).count)
    rank_pattern, alpha_pattern = {}, {}
    for key in (k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for k in tensors if k.endswith("lora_A.weight")):
        layer, module = int(key.split(".")[2]), PART_OF.get(key.rsplit(".", 1)[1], key.rsplit(".", 1)[1])
        r, a = shapes[layer, module]
        if r != rank:
            rank_pattern[re.escape(key)] = r
        if a != alpha:
            alpha_pattern[re.escape(key)] = a
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "layers_to_transform": None,
              "layers_pattern": None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


@dataclass
class Adapter:
    """A PEFT LoRA adapter as read from its directory."""

    config: dict  # adapter_config.json
    tensors: dict[str, torch.Tensor]
    path: Path  # its adapter_model.safetensors, for error messages


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter directory, checking its config for what we support."""
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        pickled = " (adapter_model.bin is pickled: convert it to safetensors)" if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder}: not an adapter directory (no adapter_config.json){pickled}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} "
                           "is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None),
                    ("layer_replication", None), ("lora_bias", False)):
        if cfg.get(key, ok) not in (ok, [] if ok is None else ok):
            raise AdapterError(f"{cfg_path}: {key} = {cfg[key]!r} is not supported (expected {ok!r})")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise AdapterError(f"{cfg_path}: lora_alpha must be a number, got {cfg['lora_alpha']!r}")
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: cannot read safetensors file ({e})") from None
    return Adapter(cfg, tensors, weights)


_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight")


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of `key`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def load_adapter(model: Phi3, folder: str | Path) -> None:
    """Attach the PEFT LoRA adapter in `folder` to `model` (in place)."""
    apply_adapter(model, read_adapter(folder))


def apply_adapter(model: Phi3, adapter: Adapter) -> None:
    """Wrap the adapted linears of `model` in LoRAs holding `adapter`'s weights (fp32, frozen)."""
    cfg, tensors, weights, config = adapter.config, adapter.tensors, adapter.path, model.config
    pieces: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}  # (layer, module) -> part -> A, B
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        part = m and m.group(3)
        module = part if part in ALL_TARGETS else PART_OF.get(part)
        if m is None or module is None or PARENT[module] != m.group(2) or int(m.group(1)) >= config.num_hidden_layers:
            raise AdapterError(f"{weights}: tensor {key} is not a LoRA on a linear layer of this model "
                               f"({config.num_hidden_layers} layers of {', '.join(ALL_TARGETS)})")
        pieces.setdefault((int(m.group(1)), module), {}).setdefault(part, {})[m.group(4)] = t
    rslora = bool(cfg.get("use_rslora", False))
    for (layer, module), parts in sorted(pieces.items()):
        parent = getattr(model.model.layers[layer], PARENT[module])
        base = getattr(parent, module)
        if isinstance(base, LoRALinear):
            raise AdapterError(f"{weights}: the model already carries an adapter; load one adapter at a time")
        spans = row_parts(config, module) if module in PARTS else {module: slice(None)}
        As, Bs, scales = [], [], []
        for part, ab in parts.items():
            name = f"model.layers.{layer}.{PARENT[module]}.{part}"
            where = f"{weights}: {name}"
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{where} has lora_{next(iter(ab))} but not its partner")
            A, B = ab["A"], ab["B"]
            span = spans.get(part, slice(None))
            rows = len(range(*span.indices(base.out_features)))
            if A.ndim != 2 or B.ndim != 2 or A.shape[1] != base.in_features or B.shape != (rows, A.shape[0]):
                raise AdapterError(f"{where}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
                                   f"a ({rows}, {base.in_features}) projection")
            r = A.shape[0]
            alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
            As.append(A.float())
            full_B = torch.zeros(base.out_features, r)
            full_B[span] = B.float()
            Bs.append(full_B)
            scales.append(alpha / (math.sqrt(r) if rslora else r))
        shared = all(a.shape == As[0].shape and torch.equal(a, As[0]) for a in As) and len(set(scales)) == 1
        if shared:  # one LoRA: A shared, B the parts' rows stacked (what we save)
            A, B, scale = As[0], sum(Bs), scales[0]
        else:  # stacked rank, block-diagonal B, each part's scale folded into its B
            A, B, scale = torch.cat(As), torch.cat([b * s for b, s in zip(Bs, scales)], dim=1), 1.0
        lora = LoRALinear(base, A.shape[0], scale)
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        lora.requires_grad_(False)
        setattr(parent, module, lora)


def merge_lora(model: Phi3) -> None:
    """Fold every LoRA into its base weight and put the plain linear back (in place)."""
    for _, name, parent in _modules(model):
        lora = getattr(parent, name)
        if not isinstance(lora, LoRALinear):
            continue
        if not isinstance(lora.base, nn.Linear):
            raise AdapterError(f"cannot merge a LoRA into a {type(lora.base).__name__} (a quantized base): "
                               "load the base unquantized to merge")
        with torch.no_grad():
            lora.base.weight.copy_(lora.merged_weight())
        setattr(parent, name, lora.base)
