"""Property tests of the GGUF reader on damaged and random files: a GGUFError or a clean load, nothing else.

Whenever our header validation accepts a file, `gguf.GGUFReader` (which trusts the header) must
read it without error and agree with our metadata: we never hand it a file it chokes on.
CI runs a few hundred examples in a few seconds; set PHI3_FUZZ_EXAMPLES for a longer local run
(with --hypothesis-show-statistics to see how far into the format the cases get).
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf_fixture import gguf_string, tiny_phi3, write_gguf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phi3.gguf import GGUFError, load_gguf, read_metadata

EXAMPLES = int(os.environ.get("PHI3_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seed(qtype) -> tuple[bytes, list[int]]:
    """A valid tiny Phi-3 GGUF and the offset of every field in its header (counts, lengths, types, dims...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        config, state = tiny_phi3(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=16, max_position_embeddings=512)
        write_gguf(path, config, state, qtype=qtype)
        reader = gguf.GGUFReader(path)
        offsets = []
        for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
            offset = field.offset
            for part in field.parts:
                offsets.append(offset)
                offset += part.nbytes
        return path.read_bytes(), sorted(set(offsets) | {reader.data_offset})


SEEDS = [_seed(T.F32), _seed(T.Q4_0)]
WIDTHS = {1: "<B", 4: "<I", 8: "<Q"}


def check(blob: bytes) -> None:
    """The property: only GGUFError escapes, and accepted headers satisfy GGUFReader too."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.gguf"
        path.write_bytes(blob)
        try:
            md = read_metadata(path)
        except GGUFError as e:
            event("header rejected: " + re.sub(r"'.*'|\d+|\(.*", "_", str(e).split(": ", 1)[1])[:40])
            return
        reader = gguf.GGUFReader(path)
        ref = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert repr(md) == repr(ref)  # repr: a damaged float may be NaN
        try:
            with np.errstate(all="ignore"):  # damaged scales dequantize to inf/NaN, which is no error of ours
                load_gguf(path)
                load_gguf(path, packed=True)
            event("loaded")
        except GGUFError:
            event("header ok, model rejected")


@st.composite
def damage(draw) -> tuple[int, list[tuple[int, int, int]], int | None]:
    """(seed, overwrites (offset, width, value), truncation point), aimed mostly at header fields."""
    i = draw(st.integers(0, len(SEEDS) - 1))
    blob, fields = SEEDS[i]
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(fields) | st.sampled_from(range(fields[-1] + 64)) | st.sampled_from(range(len(blob))))
        width = draw(st.sampled_from(list(WIDTHS)))
        bits = 8 * width
        edits.append((at, width, draw(st.sampled_from([0, 1, 2, 3, 31, 32, 255, 2 ** (bits - 1), 2**bits - 1])
                                      | st.integers(0, 2**bits - 1))))
    cut = draw(st.none() | st.sampled_from(fields) | st.integers(0, len(blob)))
    return i, edits, cut


@fuzz
@given(damage())
def test_damaged_files(case):
    i, edits, cut = case
    blob = bytearray(SEEDS[i][0])
    for at, width, value in edits:
        blob[at : at + width] = struct.pack(WIDTHS[width], value)
    check(bytes(blob[: len(SEEDS[i][0])][:cut]))


@fuzz
@given(st.binary(max_size=600))
def test_random_bytes_after_magic(tail):
    check(b"GGUF" + tail)


# random key/value entries and tensor infos behind a plausible header
kv = st.builds(lambda key, vtype, body: gguf_string(key) + struct.pack("<I", vtype) + body,
               st.text(max_size=12), st.integers(0, 14), st.binary(max_size=40))
info = st.builds(lambda name, dims, ggml_type, offset: gguf_string(name) + struct.pack(
                 f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset),
                 st.text(max_size=12), st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 300), max_size=5),
                 st.integers(0, 45), st.integers(0, 2**64 - 1) | st.sampled_from([0, 32, 64]))


@fuzz
@given(st.sampled_from([2, 3]), st.lists(kv, max_size=5), st.lists(info, max_size=3), st.binary(max_size=300),
       st.integers(0, 2))
def test_random_entries(version, kvs, infos, tail, miscount):
    header = b"GGUF" + struct.pack("<IQQ", version, len(infos) + miscount % 2, len(kvs) + miscount // 2)
    check(header + b"".join(kvs) + b"".join(infos) + tail)


def test_seeds_are_valid():
    for blob, _ in SEEDS:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "f.gguf").write_bytes(blob)
            cfg, state, _ = load_gguf(Path(tmp) / "f.gguf")
        assert cfg["num_hidden_layers"] == 1 and len(state) == 9
