"""Weight-only quantization on tiny checkpoints: the schemes against an independent numpy rounding,
whole models against transformers running the same rounded weights, the kernels against the
dense weight, checkpoints written and read back, and every bad input's one-line error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import phi3
from phi3.convert import quantize_weights
from phi3.engine import Engine
from phi3.quantize import QuantEmbedding, QuantizationError, QuantLinear, Scheme, dequantize, quantize_int4, quantize_int8
from phi3.sampling import SamplingParams
from phi3.weights import WeightsError


# ---------------------------------------------------------------- the schemes, by their definition in numpy


def numpy_int4(w: np.ndarray, g: int) -> np.ndarray:
    """Affine min/max rounding per group, scale and min stored in fp16: the scheme as documented."""
    wg = w.astype(np.float32).reshape(w.shape[0], -1, g)
    lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    s, b = ((hi - lo) / 15).astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.round((wg - b) / np.maximum(s, 2.0 ** -24)), 0, 15)
    return (q * s + b).reshape(w.shape)


def numpy_int8(w: np.ndarray, g: int | None) -> np.ndarray:
    wg = w.astype(np.float32).reshape(w.shape[0], -1, g or w.shape[1])
    s = (np.abs(wg).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    return (np.clip(np.round(wg / np.maximum(s, 2.0 ** -24)), -127, 127) * s).reshape(w.shape)


@pytest.mark.parametrize("bits,g", [(4, 32), (4, 64), (8, None), (8, 32)])
def test_rounding_matches_the_numpy_definition(bits, g):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[3, :32] = 0.25  # a constant group: zero range
    packed = quantize_int4(w, g) if bits == 4 else quantize_int8(w, g)
    ours = dequantize(*packed).numpy()
    ref = numpy_int4(w.numpy(), g) if bits == 4 else numpy_int8(w.numpy(), g)
    np.testing.assert_array_equal(ours, ref)
    assert packed[0].dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert packed[0].shape == ((48, 64) if bits == 4 else (48, 128))  # two weights per byte
    wg = w.view(48, -1, g or 128)
    step = (wg.amax(-1) - wg.amin(-1)) / 15 if bits == 4 else wg.abs().amax(-1) / 127
    err = (torch.from_numpy(ours) - w).abs().view(48, -1, g or 128).amax(-1)
    assert (err <= step * 0.5 + 1e-3 * step.max()).all()  # half a step, give or take fp16 scales


KERNELS = [(bits, kernel, dtype) for bits in (4, 8) for kernel, dtype in
           [("dense", torch.float32), ("cpu-fp32", torch.float32), ("dense", torch.bfloat16), ("int8", torch.bfloat16),
            ("int8-dequant", torch.bfloat16), ("int4", torch.bfloat16)]
           if not (kernel == "int4" and bits == 8)]  # the int4 kernels take int4 weights only


@pytest.mark.parametrize("bits,kernel,dtype", KERNELS, ids=lambda x: str(x).removeprefix("torch."))
def test_kernels_against_the_dense_weight(bits, kernel, dtype):
    """Every kernel, on (B, T, C) inputs of several shapes, computes x @ dequantized(w).T (to bf16 precision)."""
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.1
    scheme = Scheme(bits, 32)
    packed = quantize_int4(w, 32) if bits == 4 else quantize_int8(w, 32)
    names = ("weight", "scales", "biases")
    module = QuantLinear(128, 96, scheme, dtype, kernel).set_packed(**dict(zip(names, [t.clone() for t in packed])))
    table = QuantEmbedding(96, 128, scheme, dtype, kernel).set_packed(**dict(zip(names, [t.clone() for t in packed])))
    ref = dequantize(*packed)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: activations and (for int8 from int4) re-rounded rows
    for shape in [(1, 1), (1, 7), (3, 5), (2, 40)]:
        x = torch.randn(*shape, 128)
        y = module(x.to(dtype)).float()
        assert y.shape == (*shape, 96) and module.kernel == kernel
        assert ((y - x @ ref.T).abs().max() / (x @ ref.T).abs().max()) <= tol
        tokens = torch.randint(0, 96, shape)
        assert (table(tokens).float() - ref[tokens]).abs().max() <= tol * ref.abs().max()
    assert (module.dequantized() - ref).abs().max() <= tol * ref.abs().max()


def _compiler_targets_simd(flags: list[str]) -> str | None:
    """Which SIMD path the C compiler phi3 builds with targets under the build's flags ("avx2" where it
    defines AVX2, FMA and F16C, "avx512" where AVX-512F too, "neon" on arm64, else None): the compiler's own answer, which phi3's
    build must agree with."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    macros = subprocess.run([cc, *flags, "-dM", "-E", "-"], input="", capture_output=True, text=True).stdout
    if "-DPHI3_PORTABLE" in flags:
        return None
    if all(f"#define __{m}__ 1" in macros for m in ("AVX2", "FMA", "F16C")):
        return "avx512" if "#define __AVX512F__ 1" in macros and "-DPHI3_NO_AVX512" not in flags else "avx2"
    return "neon" if "#define __ARM_NEON 1" in macros and "#define __aarch64__ 1" in macros else None


def test_kernels_choice_on_this_machine():
    """fp32 stays packed on phi3's kernels where they built, dense where they did not (with the reason
    said); the SIMD path is built exactly where the compiler targets AVX2+FMA+F16C (or arm64's NEON)."""
    s4 = Scheme(4, 32)
    cpu = torch.device("cpu")
    ok, why = phi3.kernels.available()
    assert ok == (why == "")
    if ok:
        info = phi3.kernels.build_info()
        assert info["simd"] == _compiler_targets_simd(info["flags"])
    fp32 = "cpu-fp32" if ok else "dense"
    assert phi3.quantize.choose_kernel(s4, 96, 128, cpu, torch.float32) == fp32  # fp32: exact, stays packed
    assert phi3.quantize.choose_kernel(Scheme(8, 32), 96, 128, cpu, torch.float32) == fp32
    assert phi3.quantize.choose_kernel(Scheme(8), 96, 120, cpu, torch.float32) == "dense"  # rows not in 16s
    assert phi3.quantize.choose_kernel(s4, 96, 128, cpu, torch.bfloat16) == "int4"
    assert phi3.quantize.choose_kernel(s4, 40, 128, cpu, torch.bfloat16) == "int8"  # int4 kernel: rows in 16s
    assert phi3.quantize.choose_kernel(Scheme(8), 96, 128, cpu, torch.bfloat16) == "int8"
    assert phi3.quantize.choose_kernel(Scheme(8, 32), 96, 128, cpu, torch.bfloat16) == "int8"  # re-rounded per row


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (9, 0)])
def test_kernels_choice_on_cuda(monkeypatch, capability):
    """On CUDA (its capability stubbed: no GPU here) packed weights stay packed in 16 bits: int4 on
    tinygemm where it runs (bf16, sm80+), else per-row int8 widened per call; fp32 dequantizes. A
    packed checkpoint loads in bf16 by default (fp16 before sm80), a float one in its own dtype."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda, choose = torch.device("cuda"), phi3.quantize.choose_kernel
    sm80 = capability >= (8, 0)
    assert choose(Scheme(4, 32), 96, 128, cuda, torch.bfloat16) == ("int4" if sm80 else "int8-dequant")
    assert choose(Scheme(4, 32), 96, 128, cuda, torch.float16) == "int8-dequant"  # tinygemm takes bf16 only
    assert choose(Scheme(4, 32), 96, 96, cuda, torch.bfloat16) == "int8-dequant"  # K not in 128s
    assert choose(Scheme(8), 96, 128, cuda, torch.bfloat16) == "int8-dequant"
    assert choose(Scheme(8, 32), 96, 128, cuda, torch.float16) == "int8-dequant"  # re-rounded per row
    assert choose(Scheme(4, 32), 96, 128, cuda, torch.float32) == "dense"
    from phi3.loader import pick_dtype as pick
    assert pick(None, cuda, "float32", packed=True) == (torch.bfloat16 if sm80 else torch.float16)
    assert pick(None, cuda, None, packed=True) == (torch.bfloat16 if sm80 else torch.float16)  # a GGUF's blocks
    assert pick(None, cuda, "float32") == torch.float32 and pick(None, cuda, None) == torch.float32
    assert pick("float32", cuda, None, packed=True) == torch.float32  # asked for: exact, dequantized
    assert pick(None, torch.device("cpu"), "bfloat16", packed=True) == torch.float32


@pytest.mark.parametrize("bits,g", [(4, 32), (4, 64), (4, 128), (8, None), (8, 32)])
def test_cpu_kernels_against_the_dequantized_weight(bits, g):
    """phi3's own fp32 kernels (phi3/csrc/packed.c) compute x @ dequantize(W).T to fp32 rounding, for any
    number of rows (the register blocks of 8 and 4 rows, their remainders, and the dense path from
    kernels.DENSE_ROWS rows on, a tile of kernels.TILE_BYTES at a time), odd output counts and each
    group size."""
    gen = torch.Generator().manual_seed(bits * 1000 + (g or 0))
    K = 256
    N = phi3.kernels.TILE_BYTES // (4 * K) * 2 + 37  # two whole tiles and a part of one
    w = torch.randn(N, K, generator=gen) * 0.05
    packed = quantize_int4(w, g) if bits == 4 else quantize_int8(w, g)
    ref = dequantize(*packed).double()
    fn = phi3.kernels.q4_linear if bits == 4 else phi3.kernels.q8_linear
    for M in (1, 2, 3, 4, 5, 8, 9, 10, 17, phi3.kernels.DENSE_ROWS - 1, phi3.kernels.DENSE_ROWS, 70):
        x = torch.randn(M, K, generator=gen)
        y = fn(x, *packed)
        expected = x.double() @ ref.T
        assert y.shape == (M, N) and y.dtype == torch.float32
        assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), M
    with pytest.raises(ValueError, match="fp32 CPU activations"):
        fn(x.bfloat16(), *packed)
    with pytest.raises(ValueError, match="activations have 128 columns"):
        fn(x[:, :128], *packed)


def test_packed_kernels_refuse_tensors_they_would_misread():
    """Tensors whose shapes, dtypes or devices the C loops would read past or misread: a ValueError
    naming the tensor, never garbage or a crash."""
    gen = torch.Generator().manual_seed(7)
    w, x = torch.randn(64, 128, generator=gen), torch.randn(2, 128, generator=gen)
    q4, s4, b4 = quantize_int4(w, 32)
    q8, s8 = quantize_int8(w, 32)
    k = phi3.kernels
    cases = [
        (lambda: k.q4_linear(x, q4, s4[:32], b4[:32]), "scales must be fp16 \\(64, G\\)"),  # fewer rows
        (lambda: k.q4_linear(x, q4, s4[:, :3].contiguous(), b4), "scales must be fp16"),  # K not in 3 groups
        (lambda: k.q4_linear(x, q4, s4.float(), b4), "scales must be fp16"),
        (lambda: k.q4_linear(x, q4, s4, b4[:, :2].contiguous()), "biases must be fp16 of the scales' shape"),
        (lambda: k.q4_linear(x, q4, s4, b4.float()), "biases must be fp16"),
        (lambda: k.q4_linear(x, q4.view(torch.int8), s4, b4), "int4 weights are uint8"),
        (lambda: k.q8_linear(x, q8.view(torch.uint8), s8), "int8 weights are int8"),
        (lambda: k.q8_linear(x, q8, s8.T.contiguous().T), "scales must be a contiguous"),
        (lambda: k.q8_linear(x, q8, s8.to("meta")), "scales must be a contiguous 2-D CPU tensor"),
        (lambda: k.q4_linear(x, q4, s4, b4.to("meta")), "biases must be a contiguous 2-D CPU tensor"),
        (lambda: k.q8_linear(x, q8[:, :64].contiguous(), s8), "activations have 128 columns, the int8 weight 64"),
        (lambda: k.q8_linear(x, q8.flatten(), s8), "weight must be a contiguous 2-D"),
        (lambda: k.q8_linear(torch.randn(2, 48), *quantize_int8(torch.randn(4, 48), 8)), "multiple of 16"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("N,K", [(6 * 41, 256), (6 * 40 + 5, 512), (7, 100), (13, 4096)])
def test_fp32_kernel_against_double_precision(N, K):
    """phi3's fp32 kernel (what `phi3.model.linear` runs for fewer than kernels.FP32_ROWS rows: a
    batched decode step's linears and lm_head) equals x @ W.T to fp32 rounding for every row count
    it takes (pairs of rows, an odd last row; one row of short or of long weight rows), output counts
    that are not a multiple of its six-row groups, and an input size that is not a multiple of 8;
    from FP32_ROWS rows on it declines (oneDNN runs)."""
    gen = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    for M in range(1, phi3.kernels.FP32_ROWS):
        x = torch.randn(M, K, generator=gen)
        y = phi3.kernels.dense_linear(x, w)
        expected = x.double() @ w.double().T
        assert y.shape == (M, N) and y.dtype == torch.float32
        assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), M
        with torch.no_grad():
            assert torch.equal(phi3.model.linear(x.view(M, 1, K), w), y.view(M, 1, N))
    assert phi3.kernels.dense_linear(torch.randn(phi3.kernels.FP32_ROWS, K), w) is None
    assert phi3.kernels.dense_linear(x, w.T.contiguous().T) is None  # a transposed view: not contiguous


INT16_CASES = [(4, 32, 3), (8, None, 2), (4, 64, 1)]


def test_portable_cpu_kernels_against_the_dequantized_weight(checkpoints, tmp_path):
    """The plain C path of phi3/csrc/packed.c and layer.c (CPUs without AVX2), built with
    PHI3_KERNELS=portable: each linear against the dequantized weight (with int16 activations: against
    their definition), and a batched decode (all layers in C; int4 with fp32 and with int16
    activations, then fp32 weights) giving the tokens and log-probabilities of this machine's SIMD build."""
    code = """if True:
        import torch, phi3.kernels as k
        from phi3.quantize import quantize_int4, quantize_int8, dequantize
        info = k.build_info()  # -fopenmp where the compiler takes it
        assert not info["simd"] and info["flags"][0] == "-O3" and "-march=native" not in info["flags"], info
        g = torch.Generator().manual_seed(0)
        for bits, gs, M in [(4, 32, 1), (4, 64, 5), (8, None, 3), (8, 32, 1), (4, 32, 60), (8, 32, 60)]:
            w = torch.randn(37, 256, generator=g)
            packed = quantize_int4(w, gs) if bits == 4 else quantize_int8(w, gs)
            x = torch.randn(M, 256, generator=g)
            y = (k.q4_linear if bits == 4 else k.q8_linear)(x, *packed).double()
            ref = x.double() @ dequantize(*packed).double().T
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (bits, gs, M)
        print("ok")
        import json
        g, int16 = torch.Generator().manual_seed(1), []
        for bits, gs, M in INT16_CASES:
            w = torch.randn(37, 256, generator=g)
            packed = quantize_int4(w, gs) if bits == 4 else quantize_int8(w, gs)
            x = torch.randn(M, 256, generator=g)
            int16.append(k.packed_linear(x, *packed[:2], packed[2] if bits == 4 else None, True).tolist())
        print(json.dumps(int16))
    """.rstrip().replace("INT16_CASES", repr(INT16_CASES)) + "\n" + DECODE
    env = {**__import__("os").environ, "PHI3_KERNELS": "portable", "PHI3_CACHE": str(tmp_path)}
    folder = str(checkpoints["gqa"][0])
    done = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "ok", done.stderr
    g = torch.Generator().manual_seed(1)  # the int16 activations' cases again, against their definition
    for (bits, gs, M), y in zip(INT16_CASES, json.loads(done.stdout.splitlines()[1]), strict=True):
        w = torch.randn(37, 256, generator=g)
        packed = quantize_int4(w, gs) if bits == 4 else quantize_int8(w, gs)
        expected = numpy_int16_linear(torch.randn(M, 256, generator=g), packed, gs)
        assert np.abs(np.array(y) - expected).max() <= 1e-5 * np.abs(expected).max(), (bits, gs, M)
    here = subprocess.run([sys.executable, "-c", DECODE, folder], capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr
    # another build's code (plain C against SIMD): each kernel agrees with the double-precision reference
    # to 1e-5 of its largest output (above), which through this model may move a log-probability by ~1e-4
    # (int16 activations' 3e-5 steps move them by 2e-4); the tokens must be the same
    _same_decodes(json.loads(done.stdout.splitlines()[2]), json.loads(here.stdout), (3e-4, 1e-3, 3e-4),
                  lambda: k_info(env) + " against " + k_info())


def test_kernels_without_openmp_run_on_posix_threads(checkpoints, tmp_path):
    """Where the compiler refuses -fopenmp (Apple's clang), the kernels are built with POSIX threads
    (forced here with PHI3_OPENMP=0): a region asked for 2 threads runs on 2 distinct threads that meet
    at a barrier, and a batched decode (all layers in C, many barriers a step) gives this machine's
    OpenMP build's tokens and log-probabilities."""
    code = """if True:
        import torch, phi3.kernels as k
        torch.set_num_threads(2)
        info = k.build_info()
        assert info["threads"] == "pthreads" and "-fopenmp" not in info["flags"], info
        print(k.threads_seen(2), k.threads_seen(3))
    """ + "\n" + DECODE.replace("import json, sys, phi3, phi3.kernels", "import json, sys, torch, phi3, phi3.kernels\n"
                                "    torch.set_num_threads(2)")
    env = {**os.environ, "PHI3_OPENMP": "0", "PHI3_CACHE": str(tmp_path)}
    folder = str(checkpoints["gqa"][0])
    done = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "2 3"
    here = subprocess.run([sys.executable, "-c", DECODE, folder], capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr
    # the same SIMD code on other threads: rounding apart at most
    _same_decodes(json.loads(done.stdout.splitlines()[1]), json.loads(here.stdout), (1e-5, 1e-3, 1e-5),
                  lambda: k_info(env) + " against " + k_info())


SMALL_BATCHES = """if True:
    import json, torch, phi3.kernels as k
    from phi3.quantize import quantize_int4, quantize_int8, dequantize
    print(k.build_info()["simd"])
    g, out = torch.Generator().manual_seed(2), []
    for bits, K, gs in [(4, 1536, 32), (4, 576, 32), (4, 1536, 64), (4, 2048, 128), (4, 96, 32),
                        (8, 1536, 32), (8, 576, 64), (8, 1024, None), (8, 80, 16)]:
        w = torch.randn(40, K, generator=g)
        packed = quantize_int4(w, gs) if bits == 4 else quantize_int8(w, gs)
        for M in (1, 2, 3, 4, 8, 13):  # one row; the multi-row kernels; eight rows and a rest
            x = torch.randn(M, K, generator=g)
            y = (k.q4_linear if bits == 4 else k.q8_linear)(x, *packed).double()
            ref = x.double() @ dequantize(*packed).double().T
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (bits, K, gs, M)
            out.append(y.tolist())
    print(json.dumps(out))
"""


def test_small_batch_kernels_of_both_x86_builds(tmp_path):
    """A decode's packed linears for 1-13 rows, on 512-bit registers where the compiler targets
    AVX-512, and the AVX2 build's (PHI3_KERNELS=avx2), each against the dequantized weight in double
    precision: groups of one block and of several, group counts below and above sixteen with uneven
    tails; the two builds' outputs within 1e-5 of each other's largest."""
    ok, _ = phi3.kernels.available()
    if not ok or phi3.kernels.build_info()["simd"] not in ("avx2", "avx512"):
        pytest.skip("the AVX2 and AVX-512 paths are x86's; this build has neither")
    runs = {}
    for mode in ("1", "avx2"):
        env = {**os.environ, "PHI3_KERNELS": mode, "PHI3_CACHE": str(tmp_path / mode)}
        done = subprocess.run([sys.executable, "-c", SMALL_BATCHES], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        simd, values = done.stdout.splitlines()
        runs[mode] = (simd, json.loads(values))
    assert runs["avx2"][0] == "avx2" and runs["1"][0] == phi3.kernels.build_info()["simd"]
    for a, b in zip(runs["1"][1], runs["avx2"][1], strict=True):
        a, b = np.array(a), np.array(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert len(runs["1"][1]) == 9 * 6


def _same_decodes(a: list, b: list, atols: tuple, builds) -> None:
    """Two builds' DECODE outputs (`builds()` names them, for a failure message): the same tokens, and
    each run's log-probabilities within its entry of `atols`."""
    for run, (run_a, run_b, atol) in enumerate(zip(a, b, atols, strict=True)):
        assert [t for t, _ in run_a] == [t for t, _ in run_b], (run, builds())
        gap = np.abs(np.array([lp for _, lp in run_a]) - np.array([lp for _, lp in run_b]))
        assert gap.max() <= atol, (f"run {run}: log-probabilities {gap.max():.2e} apart at position "
                                   f"{gap.argmax()} (of {len(gap)}), above {atol}; {builds()}")


def k_info(env: dict | None = None) -> str:
    """How phi3.kernels is built under `env` (this process's environment when None): the flags, the
    compiler's version and the CPU, read in a fresh process."""
    code = ("import phi3.kernels as k, subprocess, os, platform; i = k.build_info(); "
            "cc = os.environ.get('CC') or 'cc'; "
            "v = subprocess.run([cc, '--version'], capture_output=True, text=True).stdout.split(chr(10))[0]; "
            "cpu = [ln for ln in open('/proc/cpuinfo') if ln.startswith('model name')][:1] "
            "if os.path.exists('/proc/cpuinfo') else [platform.processor()]; "
            "print(i['simd'], i['threads'], ' '.join(i['flags']), '|', v, '|', ''.join(cpu).strip())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    return done.stdout.strip() or done.stderr.strip()[-300:]


# Rows decoded in one batch (sys.argv[1]: the gqa checkpoint), all layers in C: three with int4
# weights (fp32 activations, then int16 ones), then two with fp32 weights; prints, per run, [[token,
# log-probability], ...] of every row in turn.
DECODE = """if True:
    import json, sys, phi3, phi3.kernels
    from phi3.engine import Engine
    from phi3.sampling import SamplingParams
    out, ran, real = [], [], phi3.kernels.decode_layers
    def spy(*args):
        ran.append(real(*args))
        return ran[-1]
    phi3.kernels.decode_layers = spy
    for quantize, activations, lengths in (("int4", "fp32", (9, 2, 17)), ("int4", "int16", (9, 2, 17)),
                                           (None, "fp32", (9, 2))):
        llm = phi3.load(sys.argv[1], dtype="float32", quantize=quantize, activations=activations)
        engine = Engine(llm.model, slots=4, max_len=64)
        rows = [engine.submit(list(range(3, 3 + n)), SamplingParams(max_new_tokens=16, logprobs=0)) for n in lengths]
        while engine.busy:
            engine.step()
        out.append([[t, lp] for r in rows for t, (lp, _) in zip(r.tokens, r.logprobs)])
    assert ran and all(x is not None for x in ran)
    print(json.dumps(out))
"""


def test_without_a_compiler_packed_weights_run_dequantized_and_say_so(checkpoints, tmp_path):
    """No C compiler: the same logits through the dequantized fp32 weights, and one line on stderr."""
    folder, _ = checkpoints["gqa"]
    code = ("import sys, phi3; llm = phi3.load(sys.argv[1], dtype='float32', quantize='int4'); "
            "print(llm.model.model.layers[0].mlp.down_proj.kernel); print(llm.logits([3, 1, 4, 1, 5])[-1].tolist())\n"
            "import torch; from phi3.quantize import quantize_int4\n"
            "try: phi3.kernels.q4_linear(torch.ones(1, 32), *quantize_int4(torch.ones(4, 32), 32))\n"
            "except RuntimeError as e: print(e)")
    env = {**__import__("os").environ, "CC": str(tmp_path / "no-such-cc"), "PHI3_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    kernel, logits, error = done.stdout.splitlines()
    assert kernel == "dense" and error.startswith("phi3.kernels are not available: the C compiler")
    assert done.stderr.count("packed weights run dequantized to fp32") == 1 and "no-such-cc" in done.stderr
    ours = phi3.load(folder, dtype="float32", quantize="int4")
    assert ours.model.model.layers[0].mlp.down_proj.kernel == "cpu-fp32"
    torch.testing.assert_close(ours.logits([3, 1, 4, 1, 5])[-1], torch.tensor(json.loads(logits)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- whole models against transformers


def fake_quantized_reference(folder, ref_model, bits: int, g: int | None, keep_lm_head: bool = False,
                             float_dtype=torch.float32):
    """transformers' own model with every linear (and lm_head) replaced by its numpy-rounded weights,
    the others (norms, embedding, a kept lm_head) rounded to `float_dtype` (what a checkpoint stores)."""
    model = type(ref_model).from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        rounded = set()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not (keep_lm_head and name == "lm_head"):
                w = module.weight.numpy()
                module.weight.copy_(torch.from_numpy(numpy_int4(w, g) if bits == 4 else numpy_int8(w, g)))
                rounded.add(module.weight)
        for p in model.parameters():
            if p not in rounded:
                p.copy_(p.to(float_dtype).float())
    return model


@pytest.mark.parametrize("bits,g", [(4, 32), (8, None)])
def test_on_the_fly_quantization_equals_transformers_on_rounded_weights(checkpoints, bits, g):
    folder, ref = checkpoints["gqa"]
    theirs = fake_quantized_reference(folder, ref, bits, g)
    ours = phi3.load(folder, dtype="float32", quantize=f"int{bits}")
    assert isinstance(ours.model.lm_head, QuantLinear) and isinstance(ours.model.model.embed_tokens, torch.nn.Embedding)
    assert ours.config.quantization == {"method": "rtn", "bits": bits, "group_size": g, "modules": {}}
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
        assert not torch.allclose(expected, ref(torch.tensor([ids])).logits[0], atol=1e-3)  # rounding shows
    torch.testing.assert_close(ours.logits(ids), expected, atol=2e-4, rtol=0)
    greedy = ours.generate(ids, max_new_tokens=12).token_ids
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert greedy == out[0, len(ids):].tolist()



def numpy_int16_linear(x: np.ndarray, packed, g: int | None) -> np.ndarray:
    """y = x @ W.T with int16 activations as `phi3.quantize.set_activations` defines them, in float64:
    each block of 32 columns of x rounded in fp32 to q = rint(x * (32767 / max|x|)) with d = max|x| /
    32767, the block's integer dot with the packed integers times the weight scale and d, and for int4
    the biases times the group's sum of x. The int4 integers are read from the documented layout."""
    w = packed[0].numpy()
    N, K = w.shape[0], x.shape[1]
    if w.dtype == np.uint8:  # byte j of a 32-column block: column j (low nibble), j + 16 (high)
        blocks = w.reshape(N, K // 32, 16)
        qw = np.concatenate([blocks & 15, blocks >> 4], axis=-1).reshape(N, K).astype(np.float64)
    else:
        qw = w.astype(np.float64)
    gs = K // packed[1].shape[1]
    scales = np.repeat(packed[1].float().numpy().astype(np.float64), gs, axis=1)  # (N, K): each column's scale
    xb = x.numpy().astype(np.float32).reshape(len(x), K // 32, 32)
    top = np.abs(xb).max(-1, keepdims=True)
    inv = (np.float32(32767) / np.where(top > 0, top, np.float32(1))) * (top > 0)  # 0 for an all-zero block
    qx = np.rint(xb * inv).reshape(len(x), K).astype(np.float64)
    d = np.repeat((top / np.float32(32767)).astype(np.float64).reshape(len(x), K // 32), 32, axis=1)  # (M, K)
    y = (qx * d) @ (qw * scales).T  # d and the weight scale are constant over a block: the same sum
    if len(packed) > 2 and packed[2] is not None:
        biases = np.repeat(packed[2].float().numpy().astype(np.float64), gs, axis=1)
        y += x.numpy().astype(np.float64) @ biases.T
    return y


@pytest.mark.parametrize("bits,g", [(4, 32), (4, 64), (4, 128), (8, None), (8, 32)])
def test_int16_activations_against_their_definition(bits, g):
    """The opt-in int16 activations (csrc/packed.c) compute numpy_int16_linear to fp32 rounding, stay
    within the rounding's bound of the exact product (half a step of each block's scale per input),
    give each row the same result in any batch of up to kernels.DENSE_ROWS - 1 rows, and leave calls
    of DENSE_ROWS rows and more exact."""
    gen = torch.Generator().manual_seed(bits * 100 + (g or 0))
    N, K = 37, 384
    w = torch.randn(N, K, generator=gen) * 0.05
    packed = quantize_int4(w, g) if bits == 4 else quantize_int8(w, g)
    linear = lambda x, int16: phi3.kernels.packed_linear(x, *packed[:2], packed[2] if bits == 4 else None, int16)  # noqa: E731
    x = torch.randn(phi3.kernels.DENSE_ROWS - 1, K, generator=gen) * torch.rand(1, K, generator=gen) * 4
    x[3, 32:64] = 0.0  # an all-zero block
    y = linear(x, True)
    expected = numpy_int16_linear(x, packed, g)
    assert np.abs(y.double().numpy() - expected).max() <= 1e-5 * np.abs(expected).max()
    exact = x.double() @ dequantize(*packed).double().T
    steps = x.abs().reshape(len(x), K // 32, 32).amax(-1, keepdim=True).double() / 32767 / 2  # half a step
    bound = (dequantize(*packed).double().abs().reshape(N, K // 32, 32).sum(-1) @ steps[..., 0].T).T
    assert ((y.double() - exact).abs() <= bound + 1e-6 * exact.abs().max()).all()
    assert not torch.equal(y, linear(x, False))  # the rounding shows
    for M in (1, 2, 3, 8, 9, phi3.kernels.DENSE_ROWS - 1):
        for i in range(M):
            assert torch.equal(linear(x[:M], True)[i], linear(x[i:i + 1], True)[0]), (M, i)
    many = torch.randn(phi3.kernels.DENSE_ROWS, K, generator=gen)
    assert torch.equal(linear(many, True), linear(many, False))
    if bits == 8:
        odd = quantize_int8(torch.randn(N, 48, generator=gen), 16)  # groups of 16 columns: not whole blocks
        with pytest.raises(ValueError, match="whole 32-column blocks"):
            phi3.kernels.packed_linear(torch.randn(1, 48), *odd[:2], None, True)

# Rows of different lengths decoded together: the LongRoPE model's pre-training context is 32
# tokens (the 20-token row crosses it), the window model's window is 8 and the gqa model's 16.
@pytest.mark.parametrize("kind,bits", [("longrope", 4), ("window", 8), ("gqa", 4), ("gqa", 8), ("partial", 4),
                                       ("longrope", None), ("gqa", None)])
def test_decode_in_c_equals_transformers_per_row(checkpoints, ran_in_c, kind, bits):
    """In fp32 on the CPU with packed weights (bits 4, 8) or plain fp32 ones (None) at small batches,
    every layer of a decode step runs in C: each row's greedy tokens are transformers' on the same
    (rounded) weights, and each step's log-probabilities transformers' own logits (within 1e-4)."""
    folder, ref = checkpoints[kind]
    theirs = fake_quantized_reference(folder, ref, bits, 32 if bits == 4 else None) if bits else ref
    ours = phi3.load(folder, dtype="float32", quantize=f"int{bits}" if bits else None)
    engine = Engine(ours.model, slots=4, max_len=96)
    lengths = [(20, 24), (5, 30), (11, 8)]
    requests = [engine.submit(torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                              SamplingParams(max_new_tokens=new, logprobs=0)) for n, new in lengths]
    while engine.busy:
        engine.step()
    assert ran_in_c and all(ran_in_c)
    for req in requests:
        tokens, expected = transformers_greedy(theirs, req)
        assert req.tokens == tokens
        assert np.allclose([lp for lp, _ in req.logprobs], expected, atol=1e-4, rtol=0)


def transformers_greedy(model, req) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of an engine request's prompt, as long as its tokens, and the
    log-probability of each of the request's tokens at its step."""
    with torch.no_grad():
        out = model.generate(torch.tensor([req.prompt]), max_new_tokens=len(req.tokens), do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             attention_mask=torch.ones(1, len(req.prompt), dtype=torch.long))
    return (out.sequences[0, len(req.prompt):].tolist(),
            [logits[0].log_softmax(-1)[t].item() for logits, t in zip(out.logits, req.tokens)])


def test_decode_in_c_rereads_the_layers_for_each_request(checkpoints, ran_in_c):
    """Decode steps in C keep what they read of the layers between steps, and read them again after
    each prefill: a hook registered between two requests runs at every decode step of the next one
    (which then takes the torch path), and once it is removed the steps run in C again."""
    llm = phi3.load(checkpoints["gqa"][0], dtype="float32", quantize="int4")
    engine = Engine(llm.model, slots=2, max_len=64)

    def decode(n_new):
        ran_in_c.clear()
        engine.submit([5, 6, 7, 8], SamplingParams(max_new_tokens=n_new))
        while engine.busy:
            engine.step()
        return list(ran_in_c)

    assert decode(6) == [True] * 5  # the first token comes from the prefill
    seen = []
    handle = llm.model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    assert decode(6) == [False] * 5 and seen.count(1) == 5  # 5 decode steps of one token each went through the hook
    handle.remove()
    assert decode(6) == [True] * 5


def test_decode_in_c_after_weights_are_replaced(checkpoints, ran_in_c):
    """Weights replaced by new tensors (the old ones freed) between two requests: the next request's
    decode steps in C use the new ones (its tokens are the full forward's greedy choices); replaced in
    the middle of a request: no crash, the request ends on the weights it started with."""
    import gc

    llm = phi3.load(checkpoints["gqa"][0], dtype="float32", quantize="int4")
    engine, prompt = Engine(llm.model, slots=1, max_len=64), [5, 6, 7, 8, 9]

    def replace_down_projections(scale):
        for block in llm.model.model.layers:
            m = block.mlp.down_proj
            m.set_packed(m.weight.clone(), (m.scales.float() * scale).half(), (m.biases.float() * scale).half())
        gc.collect()

    def greedy(req):
        logits = llm.logits(req.prompt + req.tokens)[len(req.prompt) - 1:-1]
        return logits.argmax(-1).tolist()

    first = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    while engine.busy:
        engine.step()
    assert first.tokens == greedy(first) and all(ran_in_c)
    replace_down_projections(-3.0)
    second = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    while engine.busy:
        engine.step()
    assert second.tokens == greedy(second) and second.tokens != first.tokens and all(ran_in_c)
    third = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    for _ in range(4):
        engine.step()
    replace_down_projections(-1 / 3)  # back to the first weights (up to fp16 rounding), mid-request
    while engine.busy:
        engine.step()
    assert third.tokens == second.tokens

@pytest.mark.parametrize("kind,bits", [("longrope", 4), ("gqa", 8), ("partial", 4)])
def test_int16_activations_decode_rows_alone_as_in_a_batch(checkpoints, ran_in_c, kind, bits):
    """With activations="int16" every layer of a decode step still runs in C; each row's tokens and
    log-probabilities are the same served alone as in a batch of three, and close to transformers' on
    the same rounded weights (the int16 rounding of the inputs is all that differs)."""
    folder, ref = checkpoints[kind]
    theirs = fake_quantized_reference(folder, ref, bits, 32 if bits == 4 else None)
    ours = phi3.load(folder, dtype="float32", quantize=f"int{bits}", activations="int16")
    assert all(m.activations == "int16" for m in ours.model.modules() if isinstance(m, QuantLinear))

    def run(lengths, slots):
        engine = Engine(ours.model, slots=slots, max_len=96)
        requests = [engine.submit(torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                                  SamplingParams(max_new_tokens=new, logprobs=2)) for n, new in lengths]
        while engine.busy:
            engine.step()
        return requests

    lengths = [(20, 24), (5, 30), (11, 8)]
    batch = run(lengths, 4)
    assert ran_in_c and all(ran_in_c)
    for (n, new), req in zip(lengths, batch):
        alone = run([(n, new)], 1)[0]
        assert (alone.tokens, alone.logprobs) == (req.tokens, req.logprobs)
        tokens, expected = transformers_greedy(theirs, req)
        assert req.tokens == tokens
        assert np.abs(np.array([lp for lp, _ in req.logprobs]) - expected).max() < 2e-3
    phi3.quantize.set_activations(ours.model, "fp32")
    assert [r.logprobs for r in run(lengths, 4)] != [r.logprobs for r in batch]  # the rounding shows


def test_int16_activations_requests(checkpoints):
    folder, _ = checkpoints["window"]
    with pytest.raises(ValueError, match="activations must be one of fp32, int16, got 'int8'"):
        phi3.load(folder, activations="int8")
    with pytest.raises(ValueError, match="activations='int16' needs packed int4/int8 weights"):
        phi3.load(folder, activations="int16")  # fp32 weights: nothing would change
    with pytest.raises(ValueError, match="activations='int16' needs packed"):
        phi3.load(folder, dtype="bfloat16", quantize="int4", activations="int16")  # torch's bf16 kernels
    from phi3.server import serve

    with pytest.raises(ValueError, match="activations must be one of"):
        serve(str(folder), activations="int8")  # before loading, before listening
    done = run_cli("generate", "--model", folder, "--activations", "int16", "hello")
    assert done.returncode == 2 and "needs packed int4/int8 weights" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    llm = phi3.load(folder, quantize="int4", activations="int16")
    assert phi3.quantize.set_activations(llm.model, "fp32") > 0  # and back: exact again
    assert all(m.activations == "fp32" for m in llm.model.modules() if isinstance(m, QuantLinear))

def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "phi3", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_cli_writes_a_checkpoint_that_loads_into_packed_modules(checkpoints, tmp_path):
    folder, ref = checkpoints["longrope"]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    out = tmp_path / "int4"
    done = run_cli("quantize", "--model", folder, "--out", out, "--bits", "4", "--keep-lm-head")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"method": "rtn", "bits": 4, "group_size": 32, "modules": {"lm_head": None}}
    source = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in config.items() if k in source and "dtype" not in k} == \
        {k: v for k, v in source.items() if "dtype" not in k}  # the source's config, LongRoPE factors included
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [7, 8]
    tensors = load_file(out / "model.safetensors")
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert tensors[f"{qkv}.weight"].dtype == torch.uint8 and tensors[f"{qkv}.weight"].shape == (192, 32)
    assert tensors[f"{qkv}.scales"].shape == tensors[f"{qkv}.biases"].shape == (192, 2)
    # kept in 16 bits (fp16: the values fit), not the fp32 source's 32; files as readable as their neighbours
    assert {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith((".scales", ".biases"))} \
        == {torch.float16} and tensors["lm_head.weight"].dtype == torch.float16 and config["torch_dtype"] == "float16"
    assert len({(out / f).stat().st_mode for f in ("model.safetensors", "config.json", "tokenizer.json")
                if (out / f).exists()}) == 1
    loaded = phi3.load(out, dtype="float32")
    assert isinstance(loaded.model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(loaded.model.lm_head, torch.nn.Linear) and loaded.stop_ids == {7, 8}
    ids = [5, 4, 3, 2, 1, 40, 41]
    theirs = fake_quantized_reference(folder, ref, 4, 32, keep_lm_head=True, float_dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ids), theirs(torch.tensor([ids])).logits[0], atol=2e-4, rtol=0)
    on_the_fly = phi3.load(folder, dtype="float32")
    phi3.convert.quantize_model(on_the_fly, 4, keep_lm_head=True)
    with torch.no_grad():  # the float tensors as the file holds them
        for p in on_the_fly.model.parameters():
            p.copy_(p.half().float())
    assert torch.equal(loaded.logits(ids), on_the_fly.logits(ids))
    # bf16 loads run the packed kernels: answers close to the fp32 ones, weights a fraction of the bytes
    fast = phi3.load(out, dtype="bfloat16")
    assert fast.model.model.layers[0].self_attn.qkv_proj.kernel in ("int8", "int4")
    assert (fast.logits(ids) - loaded.logits(ids)).abs().max() < 0.1 * loaded.logits(ids).abs().max()


def test_float_tensors_beyond_fp16_range_are_written_in_bf16(checkpoints, tmp_path):
    """An fp32 source with a value fp16 cannot hold: the float tensors go to bf16 (fp32's range), not inf."""
    import shutil

    source = tmp_path / "big"
    shutil.copytree(checkpoints["window"][0], source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.embed_tokens.weight"][3, 5] = 1e5
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    from phi3.save import quantize_checkpoint

    out = quantize_checkpoint(source, tmp_path / "q", 8)
    written = load_file(out / "model.safetensors")
    assert written["model.embed_tokens.weight"].dtype == written["model.norm.weight"].dtype == torch.bfloat16
    assert written["model.embed_tokens.weight"][3, 5] == torch.tensor(1e5).bfloat16()


def test_tied_embeddings_are_packed_once(checkpoints, tmp_path):
    folder, ref = checkpoints["partial"]  # tied embeddings
    quantization, packed = quantize_weights(phi3.load(folder, dtype="float32"), bits=8)
    assert set(packed) == {f"model.layers.{i}.{s}" for i in range(2) for s in phi3.quantize.LINEAR_SUFFIXES} | \
        {"model.embed_tokens"}
    assert quantization["modules"] == {"model.embed_tokens": {"bits": 8, "group_size": None}}
    out = tmp_path / "tied"
    assert run_cli("quantize", "--model", folder, "--out", out, "--bits", "8").returncode == 0
    assert not any(k.startswith("lm_head") for k in load_file(out / "model.safetensors"))
    loaded = phi3.load(out, dtype="float32")
    assert isinstance(loaded.model.model.embed_tokens, QuantEmbedding)
    theirs = fake_quantized_reference(folder, ref, 8, None, float_dtype=torch.float16)  # lm_head: the tied embedding
    with torch.no_grad():
        theirs.model.embed_tokens.weight.copy_(theirs.lm_head.weight)
        ids = [9, 8, 7, 100, 200, 300]
        torch.testing.assert_close(loaded.logits(ids), theirs(torch.tensor([ids])).logits[0], atol=2e-4, rtol=0)


# ---------------------------------------------------------------- bad input: one clear line each


def test_bad_requests(checkpoints, tmp_path):
    folder, _ = checkpoints["window"]  # hidden 64, intermediate 96
    llm = phi3.load(folder, dtype="float32")
    cases = {"unsupported quantization 3": dict(bits=3), "unsupported method 'gptq'": dict(bits=4, method="gptq"),
             "group size 64 does not divide the input dimension 96": dict(bits=4, group_size=64),
             "group size 48 is not a positive multiple of 32": dict(bits=8, group_size=48),
             "AWQ needs the model's tokenizer": dict(bits=4, method="awq")}
    for needle, kw in cases.items():
        with pytest.raises(QuantizationError, match=needle):
            quantize_weights(llm, **kw)
    with pytest.raises(QuantizationError, match="unsupported quantization 'int3'"):
        phi3.load(folder, quantize="int3")


def test_bad_calibration_files(tmp_path):
    from phi3.awq import CalibrationError, calibration_text

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\x02text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, needle in [("empty.txt", "empty"), ("binary.bin", "not text"), ("latin1.txt", "not UTF-8"),
                         ("missing.txt", "cannot read")]:
        with pytest.raises(CalibrationError, match=needle) as e:
            calibration_text(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    assert "photosynthesis" in calibration_text().lower()  # the built-in set


def test_cli_errors_are_one_line_and_come_before_loading(checkpoints, tmp_path):
    folder, _ = checkpoints["window"]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = tmp_path / "out"
    cases = [(["--bits", "3"], "unsupported quantization '3'"), (["--bits", "4", "--method", "gptq"], "unsupported method"),
             (["--bits", "4", "--group-size", "64"], "does not divide the input dimension 96"),
             (["--bits", "4", "--method", "awq", "--calibration", tmp_path / "empty.txt"], "empty"),
             (["--bits", "4", "--out", tmp_path / "full"], "not an empty directory")]
    for args, needle in cases:
        args = args if "--out" in args else [*args, "--out", out]
        done = run_cli("quantize", "--model", folder, *args)
        assert done.returncode == 2 and needle in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists()
    assert run_cli("quantize", "--model", folder, "--out", out, "--bits", "8").returncode == 0
    again = run_cli("quantize", "--model", out, "--out", tmp_path / "again", "--bits", "4")
    assert again.returncode == 2 and "already quantized" in again.stderr and len(again.stderr.splitlines()) == 1
    with pytest.raises(QuantizationError, match="already quantized"):
        phi3.load(out, quantize="int4")


@pytest.fixture(scope="module")
def int4_checkpoint(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    assert run_cli("quantize", "--model", checkpoints["gqa"][0], "--out", out, "--bits", "4").returncode == 0
    return out


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in
               [*model.parameters(), *(b for n, b in model.named_buffers() if not n.startswith("rope."))])


def test_packed_weight_bytes_match_the_loaded_model(int4_checkpoint, checkpoints):
    """`phi3 info`'s packed memory line, from the headers alone, against what loading really keeps."""
    from phi3.loader import packed_weight_bytes

    llm = phi3.load(int4_checkpoint, dtype="float32")
    assert llm.model.model.layers[0].mlp.down_proj.kernel == "cpu-fp32"
    assert packed_weight_bytes(int4_checkpoint) == _weight_bytes(llm.model)
    assert packed_weight_bytes(checkpoints["gqa"][0]) is None  # a plain checkpoint: 4 bytes a parameter in fp32
    done = run_cli("info", "--model", int4_checkpoint)
    assert done.returncode == 0 and "memory fp32 packed weights" in done.stdout, done.stderr


@pytest.mark.parametrize("key,tensor,needle", [
    ("model.layers.1.mlp.down_proj.weight", torch.zeros(128, 40, dtype=torch.uint8), "(128, 40) in the file, (128, 48)"),
    ("model.layers.1.mlp.down_proj.weight", torch.zeros(128, 48, dtype=torch.int8), "is torch.int8; expected torch.uint8"),
    ("model.layers.0.self_attn.o_proj.scales", torch.zeros(128, 3, dtype=torch.float16), "o_proj.scales"),
    ("model.layers.0.self_attn.o_proj.biases", torch.zeros(128, 4, dtype=torch.int32), "is not floating point"),
])
def test_damaged_packed_tensors_name_the_file(int4_checkpoint, tmp_path, key, tensor, needle):
    tensors = load_file(int4_checkpoint / "model.safetensors")
    assert key in tensors
    tensors[key] = tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((int4_checkpoint / "config.json").read_text())
    with pytest.raises(WeightsError) as e:
        phi3.load(bad, dtype="float32")
    assert str(bad / "model.safetensors") in str(e.value) and needle in str(e.value), str(e.value)


def test_bad_quantization_entries(int4_checkpoint, tmp_path):
    config = json.loads((int4_checkpoint / "config.json").read_text())
    for change, needle in [({"bits": 3}, "3-bit weights are not supported"), ({"method": "magic"}, "method 'magic'"),
                           ({"group_size": 48}, "not a positive multiple of 32"),
                           ({"modules": {"model.norm": None}}, "'model.norm', which is not a linear")]:
        bad = tmp_path / f"bad{len(needle)}"
        bad.mkdir()
        (bad / "model.safetensors").symlink_to(int4_checkpoint / "model.safetensors")
        (bad / "config.json").write_text(json.dumps({**config, "quantization": {**config["quantization"], **change}}))
        with pytest.raises(QuantizationError, match=needle) as e:
            phi3.load(bad, dtype="float32")
        assert str(bad / "config.json") in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_kernels(bits):
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.05
    scheme = Scheme(bits, 128 if bits == 4 else None)
    packed = quantize_int4(w, 128) if bits == 4 else quantize_int8(w, None)
    module = QuantLinear(512, 256, scheme, torch.bfloat16).set_packed(*[t.cuda() for t in packed])
    int4 = bits == 4 and phi3.quantize.tinygemm_ok(torch.device("cuda"))
    assert module.kernel == ("int4" if int4 else "int8-dequant")
    x = torch.randn(2, 3, 512, device="cuda")
    ref = x @ dequantize(*packed).cuda().T
    y = module(x.bfloat16()).float()
    assert (y - ref).abs().max() / ref.abs().max() < 2e-2


def test_requantizing_a_gguf_loaded_for_the_int_kernels(tmp_path):
    """A GGUF loaded in bf16 holds kernel layouts (int4 read back through the kernel); quantizing it
    again must still produce layouts the int8 kernel takes."""
    from gguf import GGMLQuantizationType
    from gguf_fixture import tiny_phi3, write_gguf

    config, state = tiny_phi3(hidden_size=64, intermediate_size=96, vocab_size=64)
    write_gguf(tmp_path / "q.gguf", config, state, qtype=GGMLQuantizationType.Q4_1)
    write_gguf(tmp_path / "f.gguf", config, state, qtype=GGMLQuantizationType.F32)
    from phi3.gguf import has_packed_blocks  # what makes a GGUF load in bf16 on CUDA by default

    assert has_packed_blocks(tmp_path / "q.gguf") and not has_packed_blocks(tmp_path / "f.gguf")
    packed = phi3.load(tmp_path / "q.gguf", dtype="bfloat16")
    assert packed.model.model.layers[0].self_attn.qkv_proj.kernel == "int4"
    requantized = phi3.load(tmp_path / "q.gguf", dtype="bfloat16", quantize="int8")
    assert requantized.model.model.layers[0].self_attn.qkv_proj.kernel == "int8"
    ids = [1, 2, 3, 4, 5]
    assert (requantized.logits(ids) - packed.logits(ids)).abs().max() < 0.05 * packed.logits(ids).abs().max()
