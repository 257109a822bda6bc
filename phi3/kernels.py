"""phi3's own CPU kernels for packed int4/int8 weights with fp32 activations (`csrc/packed.c`), and
whole decoder layers of a decode step in C (`csrc/layer.c`, `decode_layers`).

Decoding on a CPU streams every weight once per token. Torch's packed-weight kernels want bf16
activations, which change a small model's answers; its fp32 linear wants fp32 weights, 4 bytes
each. These kernels read the packed blocks (0.56 bytes per int4 weight) and compute in fp32, so a
GGUF or quantized checkpoint decodes faster than its dequantized fp32 copy with the same answers
(`x @ dequantize(W).T` up to the order of fp32 sums), in a fifth of the memory. With the weights
that small, the torch ops around the linears were half of a step: `decode_layers` runs all the
layers of an eager fp32 decode step in C instead (how much faster: docs/PERFORMANCE.md).

The C files are compiled once per machine with its C compiler (`$CC`, else `cc`; `-O3 -march=native
-fopenmp -fno-trapping-math`; `-mcpu=native` on arm64) into `$PHI3_CACHE/kernels/` and loaded with
ctypes. The hot loops are AVX2+FMA+F16C on x86 (the one-row dots of a batch-1 decode on 512-bit
registers where the compiler targets AVX-512), NEON on arm64, plain C elsewhere. Threads are
OpenMP's, or POSIX threads where the compiler refuses -fopenmp (Apple's clang; `PHI3_OPENMP=0`
forces that build). Without a compiler, or with `PHI3_KERNELS=0`, `available()` says why and packed
modules dequantize to fp32 at load instead (the same answers, slower; a warning says so once).
`PHI3_KERNELS=portable` builds the plain C path (what a CPU without AVX2/FMA/F16C or NEON runs);
`PHI3_KERNELS=avx2` the AVX2 path on a CPU that has AVX-512 (for comparisons).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .assets import cache_dir
from .cache import kv_group

__all__ = ["CLinear", "available", "build_info", "cpu_linear", "dense_linear", "int16_ok", "packed_linear", "q4_linear",
           "q8_linear", "threads_seen"]

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "packed.c", CSRC / "layer.c", CSRC / "parallel.c"]  # one library
HEADERS = [CSRC / "packed.h", CSRC / "parallel.h"]  # what layer.c takes from packed.c; the threads
SIMD = {0: None, 1: "avx2", 2: "neon", 3: "avx512"}  # phi3_simd()'s answer: which hot loops were compiled
_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL | None, "why": str (why not), "simd": a SIMD value


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> tuple[ctypes.CDLL | None, str]:
    mode = os.environ.get("PHI3_KERNELS", "1")
    if mode == "0":
        return None, "PHI3_KERNELS=0"
    if mode not in ("1", "portable", "avx2"):
        return None, f"PHI3_KERNELS={mode!r} is not 0, 1, avx2 or portable"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    source = b"".join(f.read_bytes() for f in [*SOURCES, *HEADERS])
    native = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    openmp = os.environ.get("PHI3_OPENMP", "1") != "0"
    # the plain C path (-DPHI3_PORTABLE), for machines (and tests) without AVX2 or NEON
    targets = {"portable": [["-DPHI3_PORTABLE"]], "avx2": [[native, "-DPHI3_NO_AVX512"]]}.get(mode, [[native], []])
    # -fno-trapping-math: no code here reads floating-point exception flags, and it lets the
    # compiler vectorize layer.c's branch-free exp
    attempts = [["-O3", *target, threads, "-fno-trapping-math"] for target in targets
                for threads in (["-fopenmp", "-pthread"] if openmp else ["-pthread"])]
    key = hashlib.sha256(source + cc.encode() + _cpu_id().encode() + platform.machine().encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    errors = []
    for flags in attempts:
        lib = folder / f"packed-{key}-{'-'.join(f.strip('-=') for f in flags)}.so"
        if not lib.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, renamed: no half-written .so
                out = Path(tmp) / lib.name
                try:
                    proc = subprocess.run([cc, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(out), "-lm"],
                                          capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.TimeoutExpired) as e:
                    return None, f"the C compiler {cc} did not run ({e})"
                if proc.returncode != 0:
                    errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                os.replace(out, lib)
        try:
            _state["flags"] = flags
            return _declare(ctypes.CDLL(str(lib))), ""
        except OSError as e:
            errors.append(f"{lib}: {e}")
    return None, "could not build phi3/csrc/packed.c and layer.c: " + "; ".join(errors)


P, I64, C_INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int  # the C functions' argument types


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.phi3_q4_linear.argtypes = [P, P, P, P, P, I64, I64, I64, I64, C_INT]
    lib.phi3_q8_linear.argtypes = [P, P, P, P, I64, I64, I64, I64, C_INT]
    lib.phi3_f32_linear.argtypes = [P, P, P, I64, I64, I64, C_INT]
    lib.phi3_a16_linear.argtypes = [P, P, P, P, P, I64, I64, I64, I64, P, C_INT]
    lib.phi3_a16_work_floats.argtypes, lib.phi3_a16_work_floats.restype = [I64, I64], I64
    lib.phi3_q4_dequantize.argtypes = [P, P, P, P, I64, I64, I64, C_INT]
    lib.phi3_q8_dequantize.argtypes = [P, P, P, I64, I64, I64, C_INT]
    for f in (lib.phi3_q4_linear, lib.phi3_q8_linear, lib.phi3_f32_linear, lib.phi3_a16_linear, lib.phi3_q4_dequantize,
              lib.phi3_q8_dequantize):
        f.restype = None
    lib.phi3_simd.restype = C_INT
    lib.phi3_threads_kind.restype = C_INT
    lib.phi3_threads_seen.argtypes, lib.phi3_threads_seen.restype = [C_INT], C_INT
    lib.phi3_work_floats.argtypes, lib.phi3_work_floats.restype = [P], I64
    lib.phi3_decode_layers.argtypes, lib.phi3_decode_layers.restype = [P, P, I64, P], None
    return lib


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _build()
                _state.update(lib=lib, why=why, simd=SIMD.get(lib.phi3_simd()) if lib else None)
    return _state["lib"]


def available() -> tuple[bool, str]:
    """(True, "") when the kernels are built and loaded (building them on first call), else (False, why)."""
    return _lib() is not None, _state["why"]


def build_info() -> dict:
    """How the loaded kernels were built: {"simd": "avx512", "avx2", "neon" or None (plain C), "threads":
    "openmp" or "pthreads", "flags": [...]}; None values where they are not built."""
    lib = _lib()
    return {"simd": _state["simd"] if lib else None, "threads": {1: "openmp", 2: "pthreads"}.get(lib.phi3_threads_kind())
            if lib else None, "flags": _state.get("flags") if lib else None}


def threads_seen(threads: int) -> int:
    """How many distinct threads a parallel region of the kernels asked for `threads` really ran on
    (each having met the others at a barrier); 0 if not built. For tests."""
    lib = _lib()
    return lib.phi3_threads_seen(threads) if lib else 0


_warned = False


def warn_unavailable() -> None:
    """Say once, on stderr, that packed weights are being dequantized because the kernels are missing."""
    global _warned
    if not _warned and os.environ.get("PHI3_KERNELS", "1") != "0":
        _warned = True
        print(f"phi3: packed weights run dequantized to fp32 (same answers, slower, 5x the memory): "
              f"{_state.get('why')}", file=sys.stderr)


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None) -> None:
    """A ValueError naming what is wrong with tensors the C code would misread or read past."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        raise ValueError(f"phi3.kernels: (M, K) fp32 CPU activations expected, got {tuple(x.shape)} {x.dtype} on {x.device}")
    bits, packed = (4, {"weight": weight, "scales": scales, "biases": biases}) if biases is not None else \
        (8, {"weight": weight, "scales": scales})
    for name, t in packed.items():
        if t.device.type != "cpu" or t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"phi3.kernels: {name} must be a contiguous 2-D CPU tensor, got {tuple(t.shape)} "
                             f"on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")
    if weight.dtype != (torch.uint8 if bits == 4 else torch.int8):
        raise ValueError(f"phi3.kernels: int{bits} weights are {'uint8 (N, K/2)' if bits == 4 else 'int8 (N, K)'}, "
                         f"got {weight.dtype}")
    (N, K), G = (weight.shape[0], weight.shape[1] * (2 if bits == 4 else 1)), scales.shape[1]
    if x.shape[1] != K:
        raise ValueError(f"phi3.kernels: activations have {x.shape[1]} columns, the int{bits} weight {K}")
    step = 32 if bits == 4 else 16  # the C loops' blocks: int4 nibble blocks, int8 vectors
    if scales.dtype != torch.float16 or scales.shape[0] != N or G == 0 or K % G or (K // G) % step:
        raise ValueError(f"phi3.kernels: scales must be fp16 ({N}, G) with K={K} in G groups of a multiple of "
                         f"{step} columns, got {scales.dtype} {tuple(scales.shape)}")
    if biases is not None and (biases.dtype != torch.float16 or biases.shape != scales.shape):
        raise ValueError(f"phi3.kernels: biases must be fp16 of the scales' shape {tuple(scales.shape)}, got "
                         f"{biases.dtype} {tuple(biases.shape)}")


def q4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 @ int4 W (N, K/2) uint8, scales/biases (N, G) fp16 -> (M, N) fp32."""
    return packed_linear(x, weight, scales, biases)


def q8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 @ int8 W (N, K), scales (N, G) fp16 -> (M, N) fp32."""
    return packed_linear(x, weight, scales, None)


FP32_ROWS = 24  # fp32 linears (and decode steps with fp32 layers, in C) below this many rows; from here oneDNN (measured)


_ONEDNN = torch.backends.mkldnn.is_available()


def cpu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32 @ weight (N, K) fp32 on the CPU, no gradients: phi3's kernel below FP32_ROWS
    rows (`dense_linear`), oneDNN's inner product from there (bench/linear.py), F.linear without oneDNN."""
    y = dense_linear(x, weight)
    if y is not None:
        return y
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) fp32 @ weight (N, K) fp32 -> (..., N) with phi3's kernel, for fewer than FP32_ROWS
    rows of x (a decode step's batch), where it beats oneDNN's inner product (measured in
    docs/PERFORMANCE.md). None where it does not apply (more
    rows, other dtypes or devices, a non-contiguous weight, kernels not built): the caller runs
    oneDNN."""
    K = x.shape[-1]
    if (x.numel() >= FP32_ROWS * K or K == 0 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[1] != K
            or not weight.is_contiguous()):
        return None
    lib = _lib()
    if lib is None:
        return None
    M, N = x.numel() // K, weight.shape[0]
    rows = x.reshape(M, K).contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    lib.phi3_f32_linear(rows.data_ptr(), weight.data_ptr(), y.data_ptr(), M, N, K, torch.get_num_threads())
    return y


def packed_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None,
                  int16: bool = False) -> torch.Tensor:
    """int4 weights when `biases` is given (the module docstring's layouts), int8 otherwise. `int16`:
    below DENSE_ROWS rows, round x to int16 per block of 32 columns and take integer dots (opt-in,
    `activations="int16"`: see `int16_ok` and csrc/packed.c); from DENSE_ROWS on it is exact as always."""
    if torch.compiler.is_compiling():  # an opaque op to the compiler; in eager a direct call (less dispatch overhead)
        return torch.ops.phi3.packed_linear(x, weight, scales, biases, int16)
    return _packed_linear(x, weight, scales, biases, int16)


def int16_ok(bits: int, in_features: int, groups: int) -> bool:
    """Whether int16 activations apply to a packed linear: its inputs and groups whole 32-column blocks."""
    return bits in (4, 8) and in_features % 32 == 0 and (in_features // groups) % 32 == 0


DENSE_ROWS = 24  # from this many rows of x on (prefill, large batches), dequantize and run oneDNN (measured)
TILE_BYTES = 1 << 20  # ... a tile of weight rows at a time, in a buffer that stays in the cache (measured),
TILE_ROWS = 1024  # but at least this many rows: narrower matmuls repack x once per tile (measured)

_scratch_buf = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer reused across calls: a fresh tensor per call costs more in page faults
    than the dequantization itself."""
    buf = getattr(_scratch_buf, "t", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch_buf.t = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                   biases: torch.Tensor | None, int16: bool = False) -> torch.Tensor:
    _check(x, weight, scales, biases)
    lib, threads = _lib(), torch.get_num_threads()
    if lib is None:
        raise RuntimeError(f"phi3.kernels are not available: {_state['why']}")
    (M, K), N, G = x.shape, weight.shape[0], scales.shape[1]
    w, s = weight.data_ptr(), scales.data_ptr()
    if M >= DENSE_ROWS:  # dequantize a tile of rows at a time into a cache-sized buffer, then oneDNN
        rows = min(N, max(TILE_ROWS, TILE_BYTES // (4 * K)))
        row_bytes = K // 2 if biases is not None else K
        y = torch.empty(M, N, dtype=torch.float32) if rows < N else None
        for n0 in range(0, N, rows):
            n = min(rows, N - n0)
            dense = _scratch(n * K).view(n, K)
            if biases is not None:
                lib.phi3_q4_dequantize(w + n0 * row_bytes, s + n0 * G * 2, biases.data_ptr() + n0 * G * 2,
                                       dense.data_ptr(), n, K, G, threads)
            else:
                lib.phi3_q8_dequantize(w + n0 * row_bytes, s + n0 * G * 2, dense.data_ptr(), n, K, G, threads)
            if y is None:
                return cpu_linear(x, dense)
            y[:, n0:n0 + n] = cpu_linear(x, dense)
        return y
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    if int16:
        if not int16_ok(4 if biases is not None else 8, K, G):
            raise ValueError(f"phi3.kernels: int16 activations need whole 32-column blocks, got K={K} in {G} groups")
        work = _scratch(threads * lib.phi3_a16_work_floats(M, K))
        lib.phi3_a16_linear(x.data_ptr(), w, s, biases.data_ptr() if biases is not None else None, y.data_ptr(),
                            M, N, K, G, work.data_ptr(), threads)
    elif biases is not None:
        lib.phi3_q4_linear(x.data_ptr(), w, s, biases.data_ptr(), y.data_ptr(), M, N, K, G, threads)
    else:
        lib.phi3_q8_linear(x.data_ptr(), w, s, y.data_ptr(), M, N, K, G, threads)
    return y


_op = torch.library.custom_op("phi3::packed_linear", _packed_linear, mutates_args=())


@_op.register_fake
def _(x, weight, scales, biases, int16=False):
    return x.new_empty(x.shape[0], weight.shape[0])


# -- whole decoder layers of a decode step (csrc/layer.c) -------------------------------------------

class _Linear(ctypes.Structure):
    _fields_ = [("weight", P), ("scales", P), ("biases", P), ("input_scale", P), ("groups", I64), ("bits", I64),
                ("activation_bits", I64)]


class _Layer(ctypes.Structure):
    _fields_ = [*((n, _Linear) for n in ("qkv", "o", "gate_up", "down")),
                *((n, P) for n in ("input_norm", "post_attention_norm", "k_cache", "v_cache", "k_scale", "v_scale"))]


class _Step(ctypes.Structure):
    _fields_ = [*((n, I64) for n in ("rows", "hidden", "heads", "kv_heads", "head_dim", "rotary_dim", "intermediate",
                                     "block_size", "columns", "kv_len", "window", "first_slot")),
                *((n, P) for n in ("block_table", "positions", "cos", "sin", "work")), ("eps", ctypes.c_double),
                ("threads", I64), ("slots", P), ("kv_group", I64)]


class CLinear(NamedTuple):
    """What layer.c reads of one linear layer, as the layer's `c_linear()` method returns it: the
    weight, fp32 (N, K), or packed with its fp16 (N, G) `scales` (and `biases` for int4: the layouts in
    the module docstring); an AWQ `input_scale` (K,) multiplied into its input; the activations'
    precision ("fp32", or "int16": `packed_linear`). A module offers `c_linear()` when its forward is
    exactly that product, so this module needs no knowledge of the layer classes."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None
    biases: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    activations: str = "fp32"


def _linear_args(module, keep: list) -> tuple | None:
    """A linear layer.c can run -> its `_Linear` fields (its tensors' storages appended to `keep`);
    None for any other (an adapter, a hook, a module without `c_linear`, bf16 or CUDA tensors)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    describe = getattr(module, "c_linear", None)
    c = describe() if describe is not None else None
    if c is None:
        return None
    w, s, z, scale = c.weight, c.scales, c.biases, c.input_scale
    if not (w.is_cpu and w.is_contiguous()) or w.dtype != (torch.float32 if s is None else torch.uint8 if z is not None
                                                            else torch.int8):
        return None
    if s is not None and (s.dtype != torch.float16 or not s.is_cpu or not s.is_contiguous()):
        return None
    if z is not None and (s is None or z.dtype != torch.float16 or not z.is_contiguous()):
        return None
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
        return None
    keep += [t.untyped_storage() for t in (w, s, z, scale) if t is not None]
    return (w.data_ptr(), s.data_ptr() if s is not None else 0, z.data_ptr() if z is not None else 0,
            scale.data_ptr() if scale is not None else 0, s.shape[1] if s is not None else 1,
            32 if s is None else 4 if z is not None else 8, 16 if c.activations == "int16" else 32)


def _norm_weight(norm, keep: list) -> int | None:
    w = norm._parameters["weight"]
    if norm._forward_hooks or norm._forward_pre_hooks or w.dtype != torch.float32 or not w.is_contiguous():
        return None
    keep.append(w.untyped_storage())
    return w.data_ptr()


def _layer_args(model, cache, keep: list) -> tuple | None:
    """Every layer's pointers for layer.c, or None when a layer does not qualify (an adapted
    linear, a hook, another dtype): then the torch path runs. The storages of the weights pointed at
    are appended to `keep` (the cache's are the cache's own: `_Plan` checks it is the same cache).
    Global hooks are `decode_layers`' to check, at every step."""
    args = []
    for i, block in enumerate(model.model.layers._modules.values()):
        parts = block._modules
        attn, mlp = parts["self_attn"], parts["mlp"]
        if any(m._forward_hooks or m._forward_pre_hooks for m in (block, attn, mlp)):
            return None
        linears = [_linear_args(m, keep) for m in (attn._modules["qkv_proj"], attn._modules["o_proj"],
                                                   mlp._modules["gate_up_proj"], mlp._modules["down_proj"])]
        norms = [_norm_weight(parts["input_layernorm"], keep), _norm_weight(parts["post_attention_layernorm"], keep)]
        if None in linears or None in norms:
            return None
        scales = (cache.k_scale[i].data_ptr(), cache.v_scale[i].data_ptr()) if cache.quantized else (None, None)
        args.append((*linears, *norms, cache.k[i].data_ptr(), cache.v[i].data_ptr(), *scales))
    return tuple(args)


class _Plan:
    """What `decode_layers` read from a model's layers: layer.c's arguments (None: the layers do not
    qualify), when it read them, and the storages of the weights it points at (`keep`): a weight
    replaced during a request by code outside phi3 is not freed under the C layers (which read its
    old values until the next request). The engine drops the plan when it runs out of requests
    (`forget`), so that a model changed between requests does not keep its old weights alive."""

    def __init__(self, args, layers, limit: int, prefills: int, cache, k0: int, keep: list):
        self.args, self.layers, self.limit, self.keep = args, layers, limit, keep
        self.prefills, self.cache, self.k0 = prefills, weakref.ref(cache), k0  # weak: an old cache can go


_plans = weakref.WeakKeyDictionary()  # model -> _Plan


def forget(model) -> None:
    """Make the next decode step re-read `model`'s layers (phi3 calls this where it changes them)."""
    _plans.pop(model, None)


def _plan(model, cache) -> _Plan:
    """The model's plan, re-read when it may have changed: after any forward other than a one-token
    cached step (a prefill: each new request has one), with another cache, or after `forget`. Reading
    every layer's modules, hooks and pointers at every step would be a noticeable part of a small
    model's step (its layers' Python objects are out of the CPU caches by then); between two decode
    steps of the same requests nothing in phi3 changes them. A change made there by other code (a hook
    registered mid-generation) takes effect from the next request."""
    plan, k0 = _plans.get(model), cache.k[0].data_ptr()
    prefills = model.__dict__.get("prefills", 0)
    if plan is not None and plan.prefills == prefills and plan.cache() is cache and plan.k0 == k0:
        return plan
    keep = []
    args = _layer_args(model, cache, keep)
    if plan is not None and args is not None and plan.args == args:
        layers, limit = plan.layers, plan.limit
    elif args is not None:
        layers = (_Layer * len(args))()
        for layer, (qkv, o, gate_up, down, norm1, norm2, k, v, ks, vs) in zip(layers, args):
            layer.qkv, layer.o, layer.gate_up, layer.down = (_Linear(*a) for a in (qkv, o, gate_up, down))
            layer.input_norm, layer.post_attention_norm, layer.k_cache, layer.v_cache = norm1, norm2, k, v
            layer.k_scale, layer.v_scale = ks, vs
        fp32 = any(linear[5] == 32 for layer in args for linear in layer[:4])
        limit = FP32_ROWS if fp32 else DENSE_ROWS
    else:
        layers, limit = None, 0
    plan = _plans[model] = _Plan(args, layers, limit, prefills, cache, k0, keep if args is not None else [])
    return plan


def decode_layers(model, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache, slot: int | torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """All decoder layers of one decode step in C (csrc/layer.c): x (B, 1, C) -> (B, 1, C), each row
    one token at `positions` (B, 1) written into cache row `slot + b` (or `slot[b]` for a (B,) tensor:
    several rows may be one sequence's next positions, a verify step) through its block table,
    cos/sin (B, 1, R) its rotary factors. None when the layers do not qualify (every linear packed on phi3's kernels or plain
    fp32, no adapters, no hooks), the batch is large (oneDNN on tiles is faster there), or the
    kernels are not built: the caller runs the torch path. The layers are read once per request
    (`_plan`), not at every step."""
    lib = _lib()
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or cache.k[0].dtype not in (torch.float32, torch.int8)
            or positions.dtype != torch.long or x.shape[0] >= DENSE_ROWS):  # large batches: oneDNN on tiles
        return None
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None  # checked every step: cheap
    plan = _plan(model, cache)
    if plan.args is None or x.shape[0] >= plan.limit:
        return None
    config, (B, _, C) = model.config, x.shape
    table = cache.block_table
    rows = None if isinstance(slot, int) else slot
    if rows is not None:
        rows = rows.to(torch.long).contiguous()
        if rows.shape != (B,) or B and not 0 <= int(rows.min()) <= int(rows.max()) < cache.rows:
            raise ValueError(f"phi3.kernels: rows {rows.tolist()} outside a cache of {cache.rows} rows")
        slot = 0
    if not (0 <= slot and (rows is not None or slot + B <= cache.rows) and 1 <= kv_len <= cache.scratch and table.dtype == torch.long
            and table.is_contiguous() and 0 <= int(positions.min()) and int(positions.max()) <= cache.scratch):
        raise ValueError(f"phi3.kernels: rows {slot}..{slot + B - 1}, kv_len {kv_len} or positions "
                         f"{positions.flatten().tolist()} outside a cache of {cache.rows} rows x {cache.scratch} positions")
    x = x.reshape(B, C).clone()  # updated in place by the layers
    positions = positions.reshape(B).contiguous()
    cos, sin = cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous()
    window = config.sliding_window or 0
    step = _Step(B, C, config.num_attention_heads, config.num_key_value_heads, config.head_dim, cos.shape[1],
                 config.intermediate_size, cache.block_size, table.shape[1], kv_len, window, slot,
                 table.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), 0, config.rms_norm_eps,
                 torch.get_num_threads(), 0 if rows is None else rows.data_ptr(),
                 kv_group(config.head_dim) if cache.quantized else 0)
    step.work = _scratch(lib.phi3_work_floats(ctypes.byref(step))).data_ptr()
    lib.phi3_decode_layers(ctypes.byref(step), plan.layers, len(plan.args), x.data_ptr())
    return x.view(B, 1, C)
