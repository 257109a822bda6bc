"""Text in, text out on a tiny random Phi-3 that carries the real Phi-3 vocabulary and template:
pipeline against transformers' pipeline, stream == generate, stop strings, the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import phi3
from conftest import randomize, tiny_config
from vocab_fixture import write_phi3_tokenizer_dir

MESSAGES = [
    {"role": "system", "content": "You are a helpful AI assistant."},
    {"role": "user", "content": "Can you provide ways to eat combinations of bananas and dragonfruits?"},
    {"role": "assistant", "content": "Sure! Try a smoothie: blend bananas and dragonfruits with some milk and honey."},
    {"role": "user", "content": "What about solving an 2x + 3 = 7 equation?"},
]


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    """(folder, transformers model): random weights, real vocabulary, tokenizer files and generation config."""
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("phi3-real-vocab")
    write_phi3_tokenizer_dir(folder)
    # A context of 512: room for SamplingParams' default 256 new tokens after a short prompt.
    cfg = {**tiny_config("longrope"), "vocab_size": 32064, "eos_token_id": 32000, "pad_token_id": 32000,
           "max_position_embeddings": 512}
    torch.manual_seed(0)
    ref = Phi3ForCausalLM(Phi3Config(**cfg)).eval()
    randomize(ref, seed=5)
    ref.save_pretrained(folder)
    write_phi3_tokenizer_dir(folder)  # save_pretrained wrote its own generation_config.json: restore the real one
    return folder, ref


@pytest.fixture(scope="session")
def llm(text_model):
    return phi3.load(text_model[0], device="cpu", dtype="float32")


def test_stop_ids_come_from_generation_config(llm):
    assert llm.stop_ids == {32000, 32001, 32007}


@pytest.mark.parametrize("return_full_text", [False, True])
@pytest.mark.parametrize("prompt", [MESSAGES, MESSAGES[1:2], "The history of the Roman Empire"])
def test_pipeline_equals_transformers(text_model, llm, prompt, return_full_text):
    import transformers

    folder, ref = text_model
    args = {"max_new_tokens": 40, "return_full_text": return_full_text, "temperature": 0.0, "do_sample": False}
    theirs = transformers.pipeline("text-generation", model=ref, tokenizer=str(folder))(prompt, **args)
    ours = phi3.pipeline("text-generation", model=llm)(prompt, **args)
    assert ours == theirs


def test_pipeline_loads_by_path(text_model):
    out = phi3.pipeline("text-generation", model=text_model[0], dtype="float32")(MESSAGES[1:2], max_new_tokens=5)
    assert isinstance(out[0]["generated_text"], list) and out[0]["generated_text"][-1]["role"] == "assistant"


def test_pipeline_tokenizer_brings_its_stop_ids(text_model, tmp_path):
    """A tokenizer handed to `pipeline` replaces the model's, and its stop ids with it."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (text_model[0] / name).exists():
            shutil.copy(text_model[0] / name, tmp_path / name)
    tok = phi3.load_tokenizer(tmp_path)  # no generation_config.json here: only its eos stops
    own = phi3.load(text_model[0], dtype="float32")
    assert own.stop_ids == {32000, 32001, 32007} and tok.stop_ids == {32000}
    pipe = phi3.pipeline("text-generation", model=own, tokenizer=tok)
    assert pipe.llm.tokenizer is tok and pipe.llm.stop_ids == {32000}


def test_generate_accepts_text_messages_and_ids(llm):
    tok = llm.tokenizer
    ids = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)
    by_messages = llm.generate(MESSAGES, max_new_tokens=12)
    by_ids = llm.generate(ids, max_new_tokens=12)
    assert by_messages.token_ids == by_ids.token_ids and by_messages.text == by_ids.text
    assert by_messages.usage.prompt_tokens == len(ids)
    raw = llm.generate("Hello there", max_new_tokens=5)
    assert raw.usage.prompt_tokens == len(tok.encode("Hello there"))
    assert by_messages.text == tok.decode(by_messages.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_generate(llm, seed):
    kw = dict(max_new_tokens=120, temperature=1.0, seed=seed)
    chunks = list(llm.stream(MESSAGES, **kw))
    done = llm.generate(MESSAGES, **kw)
    assert "".join(c.text for c in chunks) == done.text
    assert [i for c in chunks for i in c.token_ids] == done.token_ids
    assert chunks[-1].finish_reason == done.finish_reason and chunks[-1].usage == done.usage
    assert all(c.finish_reason is None for c in chunks[:-1])
    # UTF-8 safety: no chunk holds a replacement character that the whole decode does not have.
    assert sum(c.text.count("\ufffd") for c in chunks) == llm.tokenizer.decode(done.token_ids, skip_special_tokens=True).count("\ufffd")


def test_stop_string_across_token_boundary(llm):
    full = llm.generate(MESSAGES, max_new_tokens=60)
    tok = llm.tokenizer
    # Find a boundary between two tokens inside the text, and a stop string that spans it.
    for k in range(5, len(full.token_ids)):
        head = tok.decode(full.token_ids[:k], skip_special_tokens=True)
        if 3 <= len(head) < len(full.text) - 3 and full.text.startswith(head) and full.text[len(head) - 2:len(head) + 2].strip():
            break
    stop = full.text[len(head) - 2:len(head) + 2]
    expected = full.text[: full.text.find(stop)]
    done = llm.generate(MESSAGES, max_new_tokens=60, stop=[stop, "never-appears-xyz"])
    assert done.finish_reason == "stop" and done.text == expected
    assert "".join(c.text for c in llm.stream(MESSAGES, max_new_tokens=60, stop=[stop])) == expected


def test_stop_token_ends_generation(llm):
    first = llm.generate(MESSAGES, max_new_tokens=30)
    llm2 = phi3.LLM(llm.model, llm.tokenizer, stop_ids=[first.token_ids[4]])
    done = llm2.generate(MESSAGES, max_new_tokens=30)
    assert done.finish_reason == "stop"
    assert done.token_ids == first.token_ids[: first.token_ids.index(first.token_ids[4])]


# -- CLI ------------------------------------------------------------------------------------------
def _cli(*args, stdin: str | bytes | None = None, python: tuple[str, ...] = (), **env) -> subprocess.CompletedProcess:
    # Offline: a name that is not on disk must never reach for the network in a test.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env}
    out = subprocess.run([sys.executable, *python, "-m", "phi3", *args], input=stdin, capture_output=True, env=env,
                         timeout=300)
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2 and out.stdout == "", (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("phi3: error: ") and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_cli_generate_prints_the_answer(text_model, llm):
    folder = str(text_model[0])
    out = _cli("generate", "--model", folder, "--dtype", "fp32", "--max-new-tokens", "15",
               "--system", MESSAGES[0]["content"], MESSAGES[1]["content"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == llm.generate(MESSAGES[:2], max_new_tokens=15).text + "\n"
    raw = _cli("generate", "--model", folder, "--dtype", "fp32", "--max-new-tokens", "10", "--raw", "Once upon")
    assert raw.stdout == llm.generate("Once upon", max_new_tokens=10).text + "\n"


def test_cli_chat_keeps_history_and_resets(text_model, llm):
    folder = str(text_model[0])
    out = _cli("chat", "--model", folder, "--dtype", "fp32", "--max-new-tokens", "8",
               stdin=b"Hello\nTell me more\n/reset\nTell me more\n/exit\n")
    assert out.returncode == 0, out.stderr
    a1 = llm.generate([{"role": "user", "content": "Hello"}], max_new_tokens=8).text
    a2 = llm.generate([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": a1},
                       {"role": "user", "content": "Tell me more"}], max_new_tokens=8).text
    a3 = llm.generate([{"role": "user", "content": "Tell me more"}], max_new_tokens=8).text
    assert out.stdout.replace(">>> ", "") == f"{a1}\n{a2}\n{a3}\n"
    assert "conversation cleared" in out.stderr


def test_cli_info_and_errors(text_model, llm):
    out = _cli("info", "--model", str(text_model[0]), "--context", "100")
    assert out.returncode == 0, out.stderr
    assert f"{llm.config.num_parameters():,}" in out.stdout
    preset = _cli("info", "--model", "phi-3-mini-128k-instruct", "--context", "131072")
    assert "3,821,079,552" in preset.stdout and "48.00 GiB" in preset.stdout  # 384 KiB/token KV in bf16
    bad = _cli("generate", "--model", str(text_model[0]), "--temperature", "-1", "hi")
    assert bad.returncode == 2 and "temperature" in bad.stderr
    missing = _cli("generate", "--model", "/no/such/model", "hi")
    assert missing.returncode == 2 and "error" in missing.stderr


def test_cli_and_api_share_the_max_new_tokens_default(text_model, llm):
    default = phi3.SamplingParams().max_new_tokens
    api = llm.generate("Once upon")
    assert api.finish_reason == "length" and len(api.token_ids) == default  # not cut short by a stop or the context
    out = _cli("generate", "--model", str(text_model[0]), "--dtype", "fp32", "--raw", "Once upon")
    assert out.returncode == 0, out.stderr
    assert out.stdout == api.text + "\n" and out.stderr == ""


def test_cli_help_shows_every_default_without_importing_torch():
    top = _cli("--help", python=("-X", "importtime"))
    assert top.returncode == 0 and "generate" in top.stdout
    wrong = _cli("generate", "--temperature", "warm", "hi", python=("-X", "importtime"))
    assert wrong.returncode == 2 and "invalid float value: 'warm'" in wrong.stderr
    for out in (top, wrong):
        imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
        assert "phi3.cli" in imported and "torch" not in imported
    from phi3.cli import COMMANDS

    for command in COMMANDS:
        out = _cli(command, "--help")
        assert out.returncode == 0, out.stderr
        entries = re.split(r"\n  (?=-)", out.stdout.split("options:", 1)[1])[1:]  # one per flag
        assert len(entries) > 1 and entries[0].startswith("-h, --help")
        for entry in entries[1:]:
            assert "(default:" in entry or "(required)" in entry, entry
        if command in ("generate", "chat"):
            assert f"most tokens to generate (default: {phi3.SamplingParams().max_new_tokens})" in " ".join(out.stdout.split())


def test_cli_bad_input_is_one_line_before_loading(tmp_path):
    """Each is refused before the model is looked for: the model named does not exist."""
    nothing = str(tmp_path / "no-such-model")
    _one_line_error(_cli("generate", "--model", nothing, "--device", "tpu", "hi"), "unknown device 'tpu'")
    if not torch.cuda.is_available():
        _one_line_error(_cli("generate", "--model", nothing, "--device", "cuda", "hi"), "device 'cuda'")
    _one_line_error(_cli("generate", "--model", nothing, "--dtype", "fp8", "hi"), "unknown dtype 'fp8'")
    _one_line_error(_cli("generate", "--model", nothing, b"caf\xe9"),
                    "the prompt is not valid UTF-8 (byte 0xe9 at character 3)")
    _one_line_error(_cli("generate", "--model", nothing, "--system", b"\xff", "hi"), "the --system message")
    for raw in ((), ("--raw",)):  # the same refusal with and without the chat template
        for empty in ("", " \n"):
            _one_line_error(_cli("generate", "--model", nothing, *raw, empty), "phi3: error: the prompt is empty")
    _one_line_error(_cli("chat", "--model", nothing, "--stop", ""), "stop must be non-empty strings")


def test_cli_default_model_offline_and_uncached_is_one_clear_error(tmp_path):
    out = _cli("generate", "hi", HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"))
    _one_line_error(out, "microsoft/Phi-3-mini-128k-instruct", "HF_HUB_OFFLINE", "`hf download microsoft/Phi-3-mini-128k-instruct`",
                    "--model smollm2-135m-instruct")


def test_cli_stops_quietly_when_the_reader_leaves(text_model):
    """`phi3 generate … | head -c 20`: the reader is gone before the first write (here: from the start)."""
    proc = subprocess.Popen([sys.executable, "-m", "phi3", "generate", "--model", str(text_model[0]), "--raw",
                             "Once upon"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err


def test_cli_says_when_the_context_ends_the_answer(text_model, llm):
    folder = str(text_model[0])
    prompt = "hello " * 500
    n = len(llm.tokenizer.encode(prompt))
    assert 500 < n < 512
    out = _cli("generate", "--model", folder, "--raw", "--max-new-tokens", "20", prompt)
    assert out.returncode == 0, out.stderr
    done = llm.generate(prompt, max_new_tokens=20)
    assert done.finish_reason == "length" and len(done.token_ids) == 512 - n < 20
    assert out.stdout == done.text + "\n"
    assert out.stderr == f"phi3: the answer stopped at the model's context limit (512 tokens: {n} of prompt, {512 - n} of answer)\n"
    short = _cli("generate", "--model", folder, "--raw", "--max-new-tokens", str(512 - n), prompt)
    assert short.returncode == 0 and short.stdout == out.stdout and short.stderr == ""  # --max-new-tokens was the limit


def test_cli_chat_refuses_bad_lines_and_goes_on(text_model, llm):
    """A line that is not UTF-8, then one longer than the context: each an error line, neither kept."""
    too_long = b"hello " * 600
    out = _cli("chat", "--model", str(text_model[0]), "--max-new-tokens", "5",
               stdin=b"caf\xe9\n" + too_long + b"\nHello\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "phi3: error: the line is not valid UTF-8 (byte 0xe9 at character 3)" in out.stderr
    assert "phi3: error: the prompt has" in out.stderr and "the model's context is 512" in out.stderr
    assert out.stdout.replace(">>> ", "") == llm.generate([{"role": "user", "content": "Hello"}], max_new_tokens=5).text + "\n"


def test_phi3_is_on_path():
    exe = shutil.which("phi3", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the phi3 console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout and "chat" in out.stdout


def test_cli_chat_ctrl_c_stops_the_answer_and_keeps_the_conversation(text_model, llm, monkeypatch, capsys):
    """Ctrl-C during the first answer: the partial answer stays in the history for the next turn."""
    from phi3 import cli

    class Interrupted:
        """The real model, with a Ctrl-C arriving after the first two chunks of the first answer."""

        def __init__(self):
            self.calls, self.prompts = 0, []

        def stream(self, prompt, params):
            self.calls += 1
            self.prompts.append([dict(m) for m in prompt])
            for n, chunk in enumerate(llm.stream(prompt, params)):
                if self.calls == 1 and n == 2:
                    raise KeyboardInterrupt
                yield chunk

    fake = Interrupted()
    monkeypatch.setattr(cli, "_load", lambda args: fake)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\nGo on\n/exit\n"))
    assert cli.main(["chat", "--model", str(text_model[0]), "--max-new-tokens", "30"]) == 0
    partial = "".join(c.text for c in list(llm.stream([{"role": "user", "content": "Hello"}], max_new_tokens=30))[:2])
    assert fake.prompts[1] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": partial},
                               {"role": "user", "content": "Go on"}]
    assert "(stopped)" in capsys.readouterr().err
