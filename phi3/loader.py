"""`load()`: a model name -> an `LLM`. Finds the checkpoint, picks device and dtype, builds the
modules, reads the weights, attaches the tokenizer.

    name ─► weights.resolve ─► directory or .gguf ─► Phi3Config ─► Phi3 on meta ─► prepare(model)
         ─► strict, lazy weight load ─► LLM(model, tokenizer, stop ids)

`prepare` is the point where modules are swapped before any weight arrives (quantized linears
replace `nn.Linear`, so the checkpoint's packed tensors are checked against the packed shapes).
"""

from __future__ import annotations

import math

from collections.abc import Callable

import torch

from .cache import kv_dtype_of
from .config import Phi3Config
from .generate import LLM
from .model import Phi3

Prepare = Callable[[Phi3], None]


def load(model, *, device=None, dtype=None, attn_implementation: str = "sdpa",
         prepare: Prepare | None = None, quantize: str | None = None, adapter=None,
         activations: str = "fp32", kv_cache_tokens: int | None = None, prefix_cache: bool = True,
         kv_cache_dtype: str = "auto") -> LLM:
    """Load a model: a local directory, a .gguf file, a hub id or an alias (see `phi3.weights.resolve`).

    `device` defaults to CUDA when present, else CPU; `dtype` to fp32 on CPU and the checkpoint's
    own on GPU (see `pick_dtype`). `attn_implementation`: "sdpa" (torch's fused flash /
    memory-efficient kernels where available) or "eager". `prepare(model)` runs on the model built
    on the meta device, before the weights are read. `quantize` ("int8" or "int4") quantizes a
    floating-point checkpoint on the fly (round to nearest, the defaults of
    `phi3.convert.quantize_model`); quantized checkpoints (config.json `quantization`) and GGUF
    files load into packed modules by themselves. `adapter`: a PEFT LoRA adapter directory
    (`adapter_config.json` + `adapter_model.safetensors`) applied on top (see `phi3.lora`).
    `activations`: "fp32" (exact, the default) or "int16", an opt-in faster decode for packed int4/int8
    weights on the CPU that rounds the linears' inputs to int16 (see `phi3.quantize.set_activations`);
    asking for it where no linear can take it is an error. `kv_cache_tokens`: the size of the
    paged KV cache in positions, shared by all sequences (default: what `LLM.max_batch` rows could
    fill, capped by free memory); `prefix_cache`: keep prompts' keys for later requests with the same
    prefix (on by default; the output is the same either way); `kv_cache_dtype`: "auto" (the model's
    dtype, exact) or "int8" (opt-in: 1.8x the tokens of a bf16 cache in the same memory, 3.6x of an
    fp32 one, approximate; see `phi3.cache`).
    """
    from .lora import apply_adapter, read_adapter
    from .quantize import check_activations, set_activations

    check_activations(activations)  # fails before the slow part, as a bad adapter does
    if kv_cache_tokens is not None and (not isinstance(kv_cache_tokens, int) or isinstance(kv_cache_tokens, bool)
                                        or kv_cache_tokens < 1):
        raise ValueError(f"kv_cache_tokens must be a positive integer, got {kv_cache_tokens!r}")
    kv_dtype_of(kv_cache_dtype)  # a bad name fails before the slow part
    lora = read_adapter(adapter) if adapter is not None else None
    llm = _load(model, device, dtype, attn_implementation, prepare, quantize)
    if activations != "fp32":
        set_activations(llm.model, activations)
    if lora is not None:
        apply_adapter(llm.model, lora)
    llm.kv_cache_tokens, llm.prefix_cache, llm.kv_cache_dtype = kv_cache_tokens, bool(prefix_cache), kv_cache_dtype
    return llm


def _load(model, device, dtype, attn_implementation, prepare, quantize) -> LLM:
    from .tokenizer import generation_stop_ids, load_tokenizer
    from .weights import build_model, load_safetensors_model, resolve

    device = pick_device(device)  # device, dtype and quantize checked before anything slow
    pick_dtype(dtype, device, None)
    if quantize is not None:
        from .convert import parse_bits

        parse_bits(quantize)
    path = resolve(model)
    if path.suffix == ".gguf":
        from .gguf import has_packed_blocks, load_gguf
        from .tokenizer import tokenizer_from_gguf_metadata

        dtype = pick_dtype(dtype, device, None, packed=has_packed_blocks(path))
        config_dict, state, metadata = load_gguf(path, dtype=dtype, packed=True)  # Q4_0/Q4_1/Q8_0 stay packed
        config = Phi3Config.from_dict(config_dict, source=str(path))
        net = build_model(config, state, device=device, dtype=dtype, attn_implementation=attn_implementation,
                          source=str(path), prepare=_prepare(config, dtype, prepare, quantize))
        llm = LLM(net, tokenizer_from_gguf_metadata(metadata), name=path.name)
    else:
        config = Phi3Config.from_file(path / "config.json")
        dtype = pick_dtype(dtype, device, config.torch_dtype, packed=config.quantization is not None)
        net = load_safetensors_model(path, config, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                     prepare=_prepare(config, dtype, prepare, quantize))
        tokenizer = load_tokenizer(path) if (path / "tokenizer.json").exists() else None
        # A tokenizer owns the stop ids; a bare checkpoint still has its generation config.
        stop_ids = (generation_stop_ids(path) or []) if tokenizer is None else None
        llm = LLM(net, tokenizer, stop_ids=stop_ids, name=str(model))
    if quantize is not None:
        from .convert import quantize_model

        quantize_model(llm, bits=quantize)
    return llm


def _prepare(config: Phi3Config, dtype: torch.dtype, prepare: Prepare | None, quantize: str | None) -> Prepare | None:
    """The caller's `prepare`, after swapping in the packed modules a quantized checkpoint needs.
    An on-the-fly `quantize` request is checked against the config here, before the weights are read."""
    if quantize is not None:
        from .convert import check_request

        check_request(config, quantize)
    if config.quantization is None:
        return prepare
    from .quantize import prepare as packed_modules

    swap = packed_modules(config.quantization, dtype, config.source)

    def both(model: Phi3) -> None:
        swap(model)
        if prepare is not None:
            prepare(model)

    return both


# -- choosing device and dtype -------------------------------------------------------------------
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def pick_device(device=None) -> torch.device:
    """`device` as a torch.device that this machine has (default: CUDA when present, else CPU);
    a ValueError naming what is wrong otherwise, before anything is loaded."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is built without CUDA; "
                             "install a CUDA build of torch or use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is visible to torch")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: there is no GPU {dev.index}; this machine has {count} "
                             f"(cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return dev


def pick_dtype(dtype, device: torch.device, checkpoint_dtype: str | None, packed: bool = False) -> torch.dtype:
    """Explicit dtype if given (`"bf16"`, `"float32"`, a torch.dtype …); else fp32 on CPU and the
    checkpoint's own on GPU (fp32 for a GGUF, which names none, as transformers does), except for a
    `packed` checkpoint (int4/int8 blocks: a GGUF's Q4/Q8, `phi3 quantize`) on GPU: bf16 (fp16 before
    sm80), so that its weights stay packed on torch's int kernels instead of dequantized for fp32.

    fp32 on CPU, whatever the checkpoint is stored in, because it gives the reference's answers:
    bf16 compute changes a real model's greedy answers (SmolLM2-135M: 6 of 10 everyday prompts),
    so it is an explicit choice.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if dtype is not None and dtype != "auto":
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")
        return _DTYPES[key]
    if device.type == "cuda":
        if packed:
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return _DTYPES.get(str(checkpoint_dtype).lower(), torch.float32)
    return torch.float32


def packed_weight_bytes(model, config: Phi3Config | None = None) -> int | None:
    """Bytes of weights `load(model)` keeps in fp32 on a CPU with phi3's kernels when the checkpoint
    is packed (a GGUF's Q4_0/Q4_1/Q8_0 blocks, a `phi3 quantize` checkpoint), from the headers alone;
    None for a plain floating-point checkpoint (fp32: 4 bytes a parameter). `config`: the model's,
    if already read."""
    from contextlib import ExitStack

    from .weights import read_config, read_safetensors, resolve, safetensors_files

    path = resolve(model)
    if path.suffix == ".gguf":
        from .gguf import packed_memory_bytes

        return packed_memory_bytes(path)
    if not (config or read_config(path)[0]).quantization:
        return None
    with ExitStack() as stack:  # packed tensors and their fp16 scales as stored, float tensors as fp32
        return sum(math.prod(t.shape) * (t.dtype.itemsize if name.endswith((".scales", ".biases")) or not t.floating
                                         else 4) for name, t in read_safetensors(safetensors_files(path), stack).items())
