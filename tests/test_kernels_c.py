"""phi3/csrc's kernels built as plain C programs with tests/csrc/kernels_check.c, on this machine and
for arm64 (cross-compiled, run under qemu-user): every build's results against a double-precision
reference (in the driver), the SIMD build's (AVX2 here, NEON on arm64) against the portable C
build's, and OpenMP's against POSIX threads'.

arm64 needs Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (.ci/run installs
them and sets PHI3_REQUIRE_ARM64=1, which turns their absence into a failure instead of a skip).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "phi3/csrc" / f for f in ("packed.c", "layer.c", "parallel.c")] + [ROOT / "tests/csrc/kernels_check.c"]
SYSROOT = "/usr/aarch64-linux-gnu"


def _native() -> tuple[list[str], list[str]] | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return ([cc], []) if cc else None


def _arm64() -> tuple[list[str], list[str]] | None:
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not (cc and qemu and Path(SYSROOT).is_dir()):
        if os.environ.get("PHI3_REQUIRE_ARM64") == "1":
            pytest.fail("PHI3_REQUIRE_ARM64=1 but aarch64-linux-gnu-gcc, qemu-aarch64 or /usr/aarch64-linux-gnu is missing")
        return None
    return [cc], [qemu, "-L", SYSROOT]


def _simd_expected(compiler: list[str], flags: list[str]) -> int:
    """Which hot loops the compiler targets under these flags, in phi3_simd's numbers: 1 AVX2+FMA+F16C,
    3 the same with AVX-512F (the one-row dots on 512-bit registers), 2 NEON, 0 none."""
    macros = subprocess.run([*compiler, *flags, "-dM", "-E", "-"], input="", capture_output=True, text=True).stdout
    if all(f"#define __{m}__ 1" in macros for m in ("AVX2", "FMA", "F16C")):
        return 3 if "#define __AVX512F__ 1" in macros and "-DPHI3_NO_AVX512" not in flags else 1
    return 2 if "#define __ARM_NEON 1" in macros and "#define __aarch64__ 1" in macros else 0


def _run(compiler: list[str], runner: list[str], flags: list[str], tmp: Path, name: str) -> tuple[dict, dict]:
    """Build and run the driver -> (its header: simd, threads, seen; {check: results})."""
    exe, out = tmp / name, tmp / f"{name}.out"
    built = subprocess.run([*compiler, "-O3", "-fno-trapping-math", *flags, f"-I{ROOT / 'phi3/csrc'}", *map(str, SOURCES),
                            "-o", str(exe), "-lm"], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "-fopenmp" in flags:
        return {}, {}  # a compiler without OpenMP: the POSIX threads build covers it
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([*runner, str(exe), str(out)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr  # a line says FAILED, or DIFFER (1 vs 3 threads)
    lines = ran.stdout.splitlines()
    words = lines[0].split()
    header = dict(zip(words[::2], map(int, words[1::2])))
    values, results, at = np.fromfile(out, dtype=np.float32), {}, 0
    for line in lines[1:]:
        what, n = line.split(" n ")[0].strip(), int(line.split(" n ")[1].split()[0])
        if n:
            results[what], at = values[at:at + n], at + n
    assert at == values.size and len(results) > 50 and lines[-1].endswith(" ok")
    return header, results


@pytest.mark.parametrize("target", ["native", "arm64"])
def test_simd_and_portable_builds_agree(target, tmp_path):
    """The SIMD build (AVX2; where the compiler targets AVX-512, that build and the AVX2 one; or NEON)
    and the portable build each pass the driver's reference checks, with 1 and 3 threads equal to the
    bit, and agree with each other to fp32 rounding; the OpenMP and POSIX-threads builds give the same
    bits; a region of 4 threads runs on 4."""
    tools = _native() if target == "native" else _arm64()
    if tools is None:
        pytest.skip("no aarch64 cross compiler and qemu-user (apt install gcc-aarch64-linux-gnu libc6-dev-arm64-cross "
                    "qemu-user)")
    compiler, runner = tools
    arm = platform.machine().lower() in ("arm64", "aarch64")
    native = [] if target == "arm64" else ["-mcpu=native" if arm else "-march=native"]
    simd, results = _run(compiler, runner, [*native, "-pthread"], tmp_path, "simd")
    portable, plain = _run(compiler, runner, ["-DPHI3_PORTABLE", "-pthread"], tmp_path, "portable")
    openmp, with_openmp = _run(compiler, runner, [*native, "-fopenmp"], tmp_path, "openmp")
    assert simd["simd"] == _simd_expected(compiler, native) and (target == "native" or simd["simd"] == 2)  # NEON there
    assert portable["simd"] == 0 and simd["threads"] == portable["threads"] == 2 and simd["seen"] == portable["seen"] == 4
    if with_openmp:
        assert openmp["threads"] == 1 and openmp["seen"] == 4
        assert all(np.array_equal(with_openmp[k], results[k]) for k in results)
    assert results.keys() == plain.keys()
    if simd["simd"] == 3:  # AVX-512: the AVX2 build too, which machines without AVX-512 run
        avx2, results_avx2 = _run(compiler, runner, [*native, "-DPHI3_NO_AVX512", "-pthread"], tmp_path, "avx2")
        assert avx2["simd"] == 1 and results_avx2.keys() == plain.keys()
        for what, y in results_avx2.items():
            assert np.abs(y - plain[what]).max() <= 1e-5 * np.abs(plain[what]).max(), what
    for what, y in results.items():
        ref = plain[what]
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), what
