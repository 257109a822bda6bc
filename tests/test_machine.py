"""Every user's machine: free memory read from the system on any OS (psutil), the KV cache sized
from it, and a machine without a C compiler told what that costs in `phi3 info` and /health."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from conftest import write_checkpoint
from phi3 import kernels, machine
from phi3.cache import KVCache
from phi3.config import preset
from phi3.engine import UNKNOWN_MEMORY_TOKENS, default_pool_tokens, free_memory
from vocab_fixture import write_phi3_tokenizer_dir

CPU = torch.device("cpu")


def test_free_memory_is_what_the_kernel_says_is_available():
    free = free_memory(CPU)
    assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # Linux: the kernel's own estimate, read apart from psutil
        line = next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemAvailable:"))
        assert abs(free - int(line.split()[1]) * 1024) < 0.05 * free


def _llm(name: str) -> SimpleNamespace:
    return SimpleNamespace(config=preset(name), device=CPU, dtype=torch.float32)


def _pool(llm, slots: int) -> int:
    config = llm.config
    return default_pool_tokens(SimpleNamespace(config=config), slots, config.max_position_embeddings, CPU, llm.dtype)


def test_the_kv_cache_fits_what_the_system_reports(monkeypatch):
    """A Mac with 8 GiB available (no /proc/meminfo there: psutil asks the system) gets a pool in half
    of it, not the 128K context x 8 rows a missing reading used to give (68 GiB in fp32)."""
    llm, slots = _llm("microsoft/Phi-3-mini-128k-instruct"), 8
    available = 8 * 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available, total=16 * 2**30))
    tokens = _pool(llm, slots)
    assert KVCache.nbytes(llm.config, tokens, llm.dtype) <= available / 2
    assert KVCache.nbytes(llm.config, tokens + 1, llm.dtype) > available / 2  # the largest that fits


def test_unknown_free_memory_gives_a_modest_cache(monkeypatch):
    def unreadable():
        raise NotImplementedError("this platform")

    monkeypatch.setattr(psutil, "virtual_memory", unreadable)
    assert free_memory(CPU) is None
    assert _pool(_llm("microsoft/Phi-3-mini-128k-instruct"), 8) == 8 * UNKNOWN_MEMORY_TOKENS
    assert _pool(_llm("microsoft/Phi-3-mini-4k-instruct"), 1) == 4096  # the model's context, when less


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("machine-model")
    write_checkpoint(folder, "longrope", seed=5, vocab_size=32064, eos_token_id=32000, pad_token_id=32000)
    write_phi3_tokenizer_dir(folder)
    return folder


HEALTH = """if True:
    import json, sys, time
    from fastapi.testclient import TestClient
    import phi3
    from phi3.server import create_app
    with TestClient(create_app(lambda: phi3.load(sys.argv[1], device="cpu", dtype="float32"), name="m")) as client:
        while (r := client.get("/health")).json()["status"] == "loading":
            time.sleep(0.05)
        print(json.dumps(r.json()))
"""


def _health(model_dir, env) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", HEALTH, str(model_dir)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_without_a_compiler_info_and_health_say_what_it_costs(model_dir, tmp_path):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "PHI3_CACHE": str(tmp_path / "cache")}
    info = subprocess.run([sys.executable, "-m", "phi3", "info", "--model", str(model_dir)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert info.returncode == 0, info.stderr
    warning = [ln for ln in info.stdout.splitlines() if ln.startswith("warning")]
    assert len(warning) == 1 and "no-such-cc" in warning[0] and "install a C compiler" in warning[0]
    health, log = _health(model_dir, env)
    assert health["status"] == "ok" and len(health["warnings"]) == 1
    assert "no-such-cc" in health["warnings"][0] and "5x the memory" in health["warnings"][0]
    assert "install a C compiler" in log  # and in the server's log at start-up


def test_with_the_kernels_built_there_is_nothing_to_say(model_dir):
    ok, _ = kernels.available()
    assert (machine.warnings("cpu") == []) == ok
    assert machine.warnings("cuda") == []  # the CPU kernels are no concern of a GPU
    health, _ = _health(model_dir, dict(os.environ))
    assert ("warnings" in health) == (not ok)
    info = subprocess.run([sys.executable, "-m", "phi3", "info", "--model", str(model_dir)], capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0 and ("warning" in info.stdout) == (not ok), info.stderr
    built = kernels.build_info()  # and it names how the kernels were built: which SIMD path, which threads
    line = [ln for ln in info.stdout.splitlines() if ln.startswith("CPU kernels")]
    assert line == ([f"CPU kernels      {built['simd'] or 'portable C'}, {built['threads']} threads "
                     f"({' '.join(built['flags'])})"] if ok else [])
