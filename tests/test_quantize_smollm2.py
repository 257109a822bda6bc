"""Quantization quality on a real trained model, SmolLM2-135M-Instruct (its Q4_1 GGUF, whose exact
dequantized weights are the fp32 reference): perplexity through `LLM.logits` on held-out text that
the calibration set never saw, and a GGUF quantized into a checkpoint that no longer needs the GGUF.

Bounds from issue 8: int8 within 2% of fp32, int4 round-to-nearest within 35%, AWQ no worse than
round-to-nearest and clearly better at a coarse group size (64: 128 does not divide SmolLM2's 576).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import phi3
from phi3 import assets
from phi3.awq import calibration_text
from phi3.convert import install, quantize_weights, save_quantized
from phi3.engine import Engine
from phi3.sampling import SamplingParams
from phi3.tokenizer import load_tokenizer

HELDOUT = """The lighthouse keeper kept a logbook for forty years. Every evening he wrote down the wind \
direction, the height of the waves and the names of the ships that passed, and on quiet nights he added a line \
about the birds that rested on the railing. When the light was finally automated, the logbooks were given to the \
county library, where a retired teacher spent two winters reading them. She found storms that no official record \
mentioned, a whale that circled the rocks for three days, and a note from 1962 that simply said: "Fog. Heard a \
piano from somewhere across the water."

To make a basic budget, start by listing everything you earn in a month after tax. Then write down fixed costs \
such as rent, insurance and loan payments, followed by variable costs like groceries, transport and \
entertainment. Subtract the total costs from your income. If the result is negative, look first at the variable \
costs, because they are usually easier to change.

Question: Why does ice float on water?
Answer: Most substances are denser as solids than as liquids, but water is unusual. When water freezes, its \
molecules arrange themselves in a hexagonal lattice held together by hydrogen bonds, and this open structure \
takes up more space than liquid water. Ice is therefore about nine percent less dense than the water around it, \
so it floats.

def count_words(text):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,!?;:")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])
"""


def perplexity(llm) -> float:
    ids = llm.tokenizer.encode(HELDOUT)
    logits = llm.logits(ids)
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


@pytest.fixture(scope="module")
def gguf_path():
    return assets.fetch(assets.SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def fp32(gguf_path):
    return perplexity(phi3.load(gguf_path, dtype="float32"))


def test_heldout_text_is_not_calibration_text():
    calibration = calibration_text()
    for paragraph in HELDOUT.split("\n\n"):
        assert paragraph[:60] not in calibration
    assert 300 < len(phi3.load_tokenizer(assets.fetch(assets.SMOLLM2_GGUF)).encode(HELDOUT)) < 600


def quantized_ratio(gguf_path, fp32, **kw) -> float:
    llm = phi3.load(gguf_path, dtype="float32")
    install(llm, *quantize_weights(llm, **kw))
    return perplexity(llm) / fp32


@pytest.fixture(scope="module")
def int4_rtn(gguf_path, fp32):
    return quantized_ratio(gguf_path, fp32, bits=4)  # the default group size, 32


@pytest.fixture(scope="module")
def int8_checkpoint(gguf_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "int8"
    done = subprocess.run([sys.executable, "-m", "phi3", "quantize", "--model", "smollm2-135m-instruct", "--out",
                           str(out), "--bits", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_int8_within_two_percent(int8_checkpoint, fp32, gguf_path):
    llm = phi3.load(int8_checkpoint, dtype="float32")
    assert 1.0 - 0.02 < perplexity(llm) / fp32 < 1.02
    on_the_fly = phi3.load(gguf_path, dtype="float32", quantize="int8")
    ids = llm.tokenizer.encode(HELDOUT)[:64]
    assert torch.equal(llm.logits(ids), on_the_fly.logits(ids))


def test_gguf_source_writes_hugging_face_tokenizer_files(int8_checkpoint, gguf_path):
    from transformers import AutoTokenizer

    assert not list(int8_checkpoint.glob("*.gguf"))
    ours, gguf = load_tokenizer(int8_checkpoint), phi3.load_tokenizer(gguf_path)
    theirs = AutoTokenizer.from_pretrained(int8_checkpoint)
    texts = [HELDOUT, "<|im_start|>user\nHi there!<|im_end|>\n", " 12345 ümlaut 日本語 \t tabs  ", "a<|endoftext|>b"]
    for text in texts:
        assert ours.encode(text) == gguf.encode(text) == theirs.encode(text), text
        assert ours.decode(gguf.encode(text), skip_special_tokens=True) == gguf.decode(gguf.encode(text), True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat) == gguf.apply_chat_template(chat)
    assert (ours.stop_ids, ours.bos_id, ours.eos_id, ours.add_bos) == (gguf.stop_ids, gguf.bos_id, gguf.eos_id, gguf.add_bos)
    answer = phi3.load(int8_checkpoint, dtype="float32").generate([{"role": "user", "content": "What is the capital "
                                                                    "of France?"}], max_new_tokens=30)
    assert "Paris" in answer.text and answer.finish_reason == "stop"


def test_int4_round_to_nearest_within_35_percent(int4_rtn):
    assert int4_rtn < 1.35


@pytest.fixture(scope="module")
def awq_checkpoint(gguf_path, tmp_path_factory):
    """AWQ at the default settings, written to disk, and the perplexity of the model it was written from."""
    llm = phi3.load(gguf_path, dtype="float32")
    quantization, packed = quantize_weights(llm, bits=4, method="awq")
    out = save_quantized(llm, gguf_path, tmp_path_factory.mktemp("smollm2") / "awq", quantization, packed,
                         torch.float32)
    install(llm, quantization, packed)
    return out, llm


def test_awq_no_worse_than_round_to_nearest(awq_checkpoint, int4_rtn, fp32):
    out, llm = awq_checkpoint
    assert perplexity(llm) / fp32 <= int4_rtn
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == "awq" and config["quantization"]["group_size"] == 32
    loaded = phi3.load(out, dtype="float32")
    assert loaded.model.model.layers[0].mlp.down_proj.scheme.input_scale
    ids = loaded.tokenizer.encode(HELDOUT)[:64]
    assert torch.equal(loaded.logits(ids), llm.logits(ids))


def test_awq_decode_steps_in_c_are_the_models_own_logits(awq_checkpoint, ran_in_c):
    """Decode steps with AWQ's packed weights (an input scale on every linear) run all layers in C
    (csrc/layer.c): each step's log-probabilities and top alternatives equal the full-sequence
    forward's (torch ops) at that position."""
    _, llm = awq_checkpoint
    engine = Engine(llm.model, slots=2, max_len=256)
    ids = llm.tokenizer.encode(HELDOUT)
    rows = [engine.submit(ids[:40], SamplingParams(max_new_tokens=24, logprobs=2)),
            engine.submit(ids[100:117], SamplingParams(max_new_tokens=24, logprobs=2))]
    while engine.busy:
        engine.step()
    assert ran_in_c and all(ran_in_c)
    for row in rows:
        logp = llm.logits(row.prompt + row.tokens).log_softmax(-1)[len(row.prompt) - 1:-1]
        for step, (token, (lp, top)) in zip(logp, zip(row.tokens, row.logprobs)):
            assert token == step.argmax().item() and abs(lp - step[token].item()) < 1e-4
            assert all(abs(v - step[i].item()) < 1e-4 for i, v in top)


def test_awq_clearly_better_at_coarse_groups(gguf_path, fp32):
    rtn = quantized_ratio(gguf_path, fp32, bits=4, group_size=64)
    awq = quantized_ratio(gguf_path, fp32, bits=4, group_size=64, method="awq")
    assert awq - 1 < 0.75 * (rtn - 1), (awq, rtn)


def test_int16_activations_keep_the_answers(gguf_path):
    """The opt-in activations="int16" on SmolLM2's own Q4_1/Q8_0 blocks: in decode steps (where it
    applies) each greedy token is the exact model's choice, with a log-probability within 0.02 of the
    exact forward's at that position (measured: 0.003; bf16 compute moved them by 0.23 and changed 5
    of 160 tokens), and chat answers are the exact model's."""
    fast, exact = phi3.load(gguf_path, activations="int16"), phi3.load(gguf_path)
    engine = Engine(fast.model, slots=4, max_len=256)
    ids = fast.tokenizer.encode(HELDOUT)
    rows = [engine.submit(ids[a:a + n], SamplingParams(max_new_tokens=40, logprobs=1))
            for a, n in [(0, 40), (100, 17), (200, 60), (300, 9)]]
    while engine.busy:
        engine.step()
    for row in rows:
        logp = exact.logits(row.prompt + row.tokens).log_softmax(-1)[len(row.prompt) - 1:-1]
        assert row.tokens == logp.argmax(-1).tolist()
        assert max(abs(lp - step[t].item()) for step, t, (lp, _) in zip(logp, row.tokens, row.logprobs)) < 0.02
    for question in ["What is the capital of France?", "Write a haiku about the sea.", "List three uses of copper."]:
        chat = [{"role": "user", "content": question}]
        assert fast.generate(chat, max_new_tokens=48).text == exact.generate(chat, max_new_tokens=48).text
