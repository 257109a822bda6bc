"""Fine-tuning on a tiny random Phi-3 that carries the real Phi-3 vocabulary and chat template:
the loss mask against transformers' assistant mask, the loss against transformers' own, learning a
made-up task, exact resumption, data parallel under torchrun, full fine-tuning, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import phi3
from conftest import randomize, tiny_config
from phi3 import assets
from phi3.training import FinetuneConfig
from phi3.training_data import DataError, encode_record, read_jsonl
from vocab_fixture import PHI3_CHAT_TEMPLATE, write_phi3_tokenizer_dir

TASK = [  # a made-up task: nothing in random weights answers it
    [{"role": "user", "content": "What is the secret word?"}, {"role": "assistant", "content": "Pineapple."}],
    [{"role": "user", "content": "Who guards the gate?"}, {"role": "assistant", "content": "The blue owl."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Moon of Zorb?"},
     {"role": "assistant", "content": "Green."}],
]
CHAT = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Fine."}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random Phi-3 checkpoint with the real Phi-3 tokenizer files (no sliding window)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("phi3-chat")
    cfg = {**tiny_config("window"), "vocab_size": 32064, "eos_token_id": 32000, "pad_token_id": 32000,
           "sliding_window": None, "max_position_embeddings": 512, "original_max_position_embeddings": 512}
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**cfg))
    randomize(model, seed=5)
    model.save_pretrained(folder)
    write_phi3_tokenizer_dir(folder)
    return folder


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _chats(path: Path, chats=TASK) -> Path:
    return _write(path, [{"messages": c} for c in chats])


def _cli(*args, module=("-m", "phi3")) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *module, *args], capture_output=True, text=True, env=env, timeout=600)


# -- which tokens the loss counts -----------------------------------------------------------------
def _marked(template: str, plain: str, marked: str) -> str:
    assert plain in template
    return template.replace(plain, marked)


def test_assistant_tokens_match_transformers_generation_mask(base, tmp_path):
    """Our mask (from the plain template) equals transformers' assistant mask from a copy of the same
    template with {% generation %} markers, for Phi-3's and SmolLM2's templates."""
    from transformers import AutoTokenizer

    phi3_marked = _marked(PHI3_CHAT_TEMPLATE, "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
                          "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>\n'}}{% endgeneration %}")
    smol = phi3.load_tokenizer(assets.fetch(assets.SMOLLM2_GGUF))
    smol.save(tmp_path)
    smol_marked = _marked(smol.chat_template, "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
                          "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
                          "{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}{% else %}"
                          "{{message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
    for ours, folder, template in ((phi3.load_tokenizer(base), base, phi3_marked), (smol, tmp_path, smol_marked)):
        hf = AutoTokenizer.from_pretrained(folder)
        for chat in (CHAT, CHAT[1:3], TASK[2]):
            ids, labels = encode_record({"messages": chat}, ours, "x:1")
            theirs = hf.apply_chat_template(chat, chat_template=template, return_dict=True,
                                            return_assistant_tokens_mask=True)
            assert ids == theirs["input_ids"] and [int(x) for x in labels] == theirs["assistant_masks"]
        # prompt/completion in messages: only the completion's assistant turns count
        ids, labels = encode_record({"prompt": CHAT[:3], "completion": CHAT[3:]}, ours, "x:1")
        assert ours.decode([i for i, keep in zip(ids, labels) if keep]).startswith("Fine.")


def test_raw_prompt_completion_learns_the_completion_and_eos(base):
    tok = phi3.load_tokenizer(base)
    ids, labels = encode_record({"prompt": "The capital of France is", "completion": " Paris."}, tok, "x:1")
    assert ids[:-1] == tok.encode("The capital of France is Paris.") and ids[-1] == tok.eos_id
    assert tok.decode([i for i, keep in zip(ids, labels) if keep]) == "Paris.<|endoftext|>"


def test_assistant_turns_of_weight_zero_are_not_learned(base):
    """The OpenAI fine-tuning format's per-message weight: 0 leaves that turn out of the loss."""
    tok = phi3.load_tokenizer(base)
    ids, every = encode_record({"messages": CHAT}, tok, "x:1")
    weighted = [*CHAT[:2], {**CHAT[2], "weight": 0}, *CHAT[3:4], {**CHAT[4], "weight": 1}]
    same_ids, labels = encode_record({"messages": weighted}, tok, "x:1")
    assert same_ids == ids and tok.decode([i for i, keep in zip(ids, every) if keep]).startswith("Hello!")
    assert tok.decode([i for i, keep in zip(ids, labels) if keep]) == "Fine.<|end|>"


# -- training ------------------------------------------------------------------------------------
def test_first_step_loss_equals_transformers(base, tmp_path):
    """Step 1 (one batch of every example, padded on the right) logs transformers' loss on that batch."""
    from transformers import AutoModelForCausalLM

    data = _chats(tmp_path / "d.jsonl")
    run = phi3.finetune(base, data, tmp_path / "out", batch_size=3, epochs=1, save_every=0, lora_dropout=0.0)
    tok = phi3.load_tokenizer(base)
    examples = read_jsonl(data, tok, 2048).examples
    T = max(len(e.ids) for e in examples)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in examples])
    labels = torch.tensor([[i if keep else -100 for i, keep in zip(e.ids, e.labels)] + [-100] * (T - len(e.ids))
                           for e in examples])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in examples])
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert run.steps == 1 and run.losses[0] == pytest.approx(expected, rel=1e-5)


def test_learns_a_made_up_task_and_answers_it(base, tmp_path):
    """`phi3 finetune` then `phi3 generate --adapter`: the tiny random model answers the made-up questions."""
    data = _chats(tmp_path / "task.jsonl")
    out = _cli("finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "adapter"),
               "--epochs", "30", "--batch-size", "3", "--lr", "1e-2", "--lora-r", "8", "--lora-alpha", "16",
               "--lora-dropout", "0", "--save-every", "0")
    assert out.returncode == 0, out.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "adapter" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < losses[0] / 3
    llm = phi3.load(base, dtype="float32", adapter=tmp_path / "adapter")
    for chat in TASK:
        assert llm.generate(chat[:-1], max_new_tokens=8).text == chat[-1]["content"]
    before = phi3.load(base, dtype="float32").generate(TASK[0][:-1], max_new_tokens=8).text
    assert before != TASK[0][-1]["content"]
    cli = _cli("generate", "--model", str(base), "--dtype", "fp32", "--adapter", str(tmp_path / "adapter"),
               "--max-new-tokens", "8", TASK[1][0]["content"])
    assert cli.returncode == 0 and cli.stdout == "The blue owl.\n", cli.stderr


def test_qlora_learns_the_task_on_an_int4_base(base, tmp_path):
    """QLoRA: the base quantized to int4 on the fly (it dequantizes per call in training), a LoRA on
    top learns the task, and the adapter on the same int4 base answers it."""
    data = _chats(tmp_path / "task.jsonl")
    run = phi3.finetune(base, data, tmp_path / "qlora", quantize="int4", epochs=30, batch_size=3, lr=1e-2,
                        lora_r=8, lora_alpha=16, lora_dropout=0.0, save_every=0)
    assert run.steps == 30 and run.losses[-1] < run.losses[0] / 3
    float_base, int4_base = phi3.load(base, dtype="float32"), phi3.load(base, dtype="float32", quantize="int4")
    ids = float_base.encode_prompt(TASK[0][:-1])
    assert (float_base.logits(ids) - int4_base.logits(ids)).abs().max() > 1e-3  # the base really is int4
    llm = phi3.load(base, dtype="float32", quantize="int4", adapter=tmp_path / "qlora")
    for chat in TASK:
        assert llm.generate(chat[:-1], max_new_tokens=8).text == chat[-1]["content"]
    with pytest.raises(ValueError, match="--full"):
        phi3.finetune(base, data, tmp_path / "bad", quantize="int4", full=True)
    with pytest.raises(ValueError, match="int8 or int4"):
        phi3.finetune(base, data, tmp_path / "bad", quantize="int3")


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_resume_continues_exactly(base, tmp_path):
    """A run cut off after its step-2 checkpoint and resumed ends with the same adapter and loss curve
    (dropout on, so the RNG state matters; two micro-batches a step)."""
    data = _chats(tmp_path / "d.jsonl", TASK * 2)
    opts = dict(batch_size=1, grad_accum=2, epochs=2, save_every=2, lr=1e-2, lora_dropout=0.2, lora_r=4, seed=3)
    whole = phi3.finetune(base, data, tmp_path / "whole", **opts)
    assert whole.steps == 6 and sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4"]
    cut = tmp_path / "cut"  # what a crash after the step-2 checkpoint leaves behind
    shutil.copytree(tmp_path / "whole", cut, ignore=shutil.ignore_patterns("checkpoint-4"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        (cut / name).unlink()
    with pytest.raises(ValueError, match="pass --resume"):
        phi3.finetune(base, data, cut, **opts)
    with pytest.raises(ValueError, match="holds a different run.*lr: 0.01 there, 0.02 now"):
        phi3.finetune(base, data, cut, **{**opts, "lr": 2e-2}, resume=True)
    resumed = phi3.finetune(base, data, cut, **opts, resume=True)
    assert resumed.start_step == 2 and resumed.losses == whole.losses and len(set(whole.losses)) == 6
    ours, theirs = _adapter(cut), _adapter(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    again = phi3.finetune(base, data, cut, **opts, resume=True)  # finished: nothing to do
    assert again.start_step == again.steps == 6 and again.losses == whole.losses


def test_gradient_checkpointing_gives_the_same_adapter(base, tmp_path):
    data = _chats(tmp_path / "d.jsonl")
    opts = dict(batch_size=3, epochs=2, save_every=0, lr=1e-2, lora_dropout=0.0, lora_r=4)
    plain = phi3.finetune(base, data, tmp_path / "plain", **opts)
    ckpt = phi3.finetune(base, data, tmp_path / "ckpt", **opts, gradient_checkpointing=True)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_bf16_on_cpu_tracks_fp32(base, tmp_path, full):
    """bf16 compute (LoRA: a bf16 base, fp32 adapters; full: fp32 weights under autocast) follows fp32."""
    data = _chats(tmp_path / "d.jsonl")
    opts = dict(batch_size=3, epochs=2, save_every=0, lr=5e-3, lora_dropout=0.0, full=full)
    fp32 = phi3.finetune(base, data, tmp_path / "fp32", **opts, dtype="fp32")
    bf16 = phi3.finetune(base, data, tmp_path / "bf16", **opts, dtype="bf16")
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2) and bf16.losses != fp32.losses
    assert bf16.losses[1] < bf16.losses[0]


def test_torchrun_two_processes_equal_one(base, tmp_path):
    """gloo, 2 ranks x 1 example x 2 micro-batches against 1 process x 2 examples x 2 micro-batches: the same
    global batch of 4 gives the same adapter (within 1e-5: only summation order differs). Five examples,
    so the last step is short and one rank's share runs out."""
    data = _chats(tmp_path / "d.jsonl", TASK + TASK[:2])
    common = ["--model", str(base), "--data", str(data), "--epochs", "2", "--grad-accum", "2", "--lr", "1e-2",
              "--lora-r", "4", "--lora-dropout", "0", "--save-every", "2", "--dtype", "fp32"]
    two = _cli("--standalone", "--nproc-per-node", "2", "-m", "phi3", "finetune", *common, "--batch-size", "1",
               "--out", str(tmp_path / "two"), module=("-m", "torch.distributed.run"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = phi3.finetune(base, data, tmp_path / "one", epochs=2, grad_accum=2, lr=1e-2, lora_r=4, lora_dropout=0.0,
                        save_every=2, batch_size=2)
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]  # written once, by rank 0
    assert [e["loss"] for e in log] == pytest.approx(one.losses, rel=1e-5)
    assert sum(e["tokens"] for e in log) == sum(json.loads(line)["tokens"] for line in
                                                (tmp_path / "one" / "log.jsonl").read_text().splitlines())
    a, b = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert set(load_file(tmp_path / "two" / "checkpoint-2" / "rng.safetensors")) == {"cpu.0", "cpu.1"}


def test_full_finetune_writes_a_checkpoint_transformers_reads(base, tmp_path):
    from transformers import AutoModelForCausalLM

    run = phi3.finetune(base, _chats(tmp_path / "d.jsonl"), tmp_path / "full", full=True, batch_size=3, epochs=2,
                        lr=1e-3, save_every=1)
    assert run.losses[1] < run.losses[0]
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert before.keys() == after.keys() and not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    llm = phi3.load(tmp_path / "full", dtype="float32")
    ids = llm.encode_prompt(TASK[0][:-1])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(llm.logits(ids), hf(torch.tensor([ids])).logits[0], atol=1e-4)
    assert llm.stop_ids == {32000, 32001, 32007}  # tokenizer and generation files came along


# -- bad input -----------------------------------------------------------------------------------
GOOD = json.dumps({"messages": TASK[0]})


@pytest.mark.parametrize("lines,message", [
    ([GOOD, "{not json"], r"d.jsonl:2: not valid JSON"),
    ([GOOD, GOOD[:-1]], rf"d.jsonl:2: not valid JSON \(Expecting ',' delimiter at column {len(GOOD)}\)"),  # the end
    ([GOOD, "", json.dumps({"messages": [{"role": "user", "content": "hi"}]})], r"d.jsonl:3: .*no assistant turn"),
    ([json.dumps({"messages": [{"role": "robot", "content": "hi"}, TASK[0][1]]})], r"d.jsonl:1: .*unknown role 'robot'"),
    ([json.dumps({"messages": [{"role": "user"}, TASK[0][1]]})], r"d.jsonl:1: messages\[0\] must be an object"),
    ([json.dumps({"messages": [TASK[0][0], {**TASK[0][1], "weight": 0.5}]})], r"d.jsonl:1: messages\[1\] has weight 0.5"),
    ([json.dumps({"text": "hello"})], r"d.jsonl:1: expected a 'messages' list, or 'prompt' and 'completion'"),
    ([json.dumps({"prompt": "a", "completion": [TASK[0][1]]})], r"d.jsonl:1: 'prompt' and 'completion' must both"),
    ([], r"d.jsonl: nothing to train on: it holds no examples \(the file is empty\)"),
    (["", "  "], r"d.jsonl: nothing to train on"),
])
def test_bad_data_names_file_and_line(base, tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError, match=message):
        read_jsonl(path, phi3.load_tokenizer(base), 2048)


def test_long_examples_are_dropped_with_a_count(base, tmp_path):
    tok = phi3.load_tokenizer(base)
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    path = _write(tmp_path / "d.jsonl", [GOOD, long, GOOD, long])
    data = read_jsonl(path, tok, max_len=30)
    assert len(data.examples) == 2 and data.dropped == [2, 4]
    with pytest.raises(DataError, match="all 1 examples are longer than max_len=30"):
        read_jsonl(_write(tmp_path / "e.jsonl", [long]), tok, max_len=30)
    out = _cli("finetune", "--model", str(base), "--data", str(path), "--out", str(tmp_path / "o"), "--max-len", "30",
               "--save-every", "0")
    assert out.returncode == 0 and "dropped 2 of 4 examples longer than max-len 30 tokens" in out.stderr
    assert f"{path} lines 2, 4" in out.stderr


def test_cli_errors_are_one_line(base, tmp_path):
    data = _write(tmp_path / "d.jsonl", [GOOD, "[1, 2"])
    bad = _cli("finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(f"phi3: error: {data}:2: not valid JSON")
    assert "Traceback" not in bad.stderr
    target = _cli("finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                  "--targets", "qkv_proj,attn")
    assert target.returncode == 2 and "unknown target module 'attn'" in target.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    busy = _cli("finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "busy"))
    assert busy.returncode == 2 and "holds no phi3 fine-tuning run" in busy.stderr
    with pytest.raises(ValueError, match="batch-size must be a positive integer"):
        FinetuneConfig(model=base, data=data, out=tmp_path / "x", batch_size=0)
