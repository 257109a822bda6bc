"""A new user's first minutes with the CLI: --version, a mistyped flag, leaving chat, a missing file,
and a start-up that imports only what it uses."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import write_checkpoint
from phi3.cli import main
from vocab_fixture import write_phi3_tokenizer_dir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Phi-3 checkpoint with the real Phi-3 tokenizer and generation config."""
    folder = tmp_path_factory.mktemp("first-contact-model")
    write_checkpoint(folder, "longrope", seed=5, vocab_size=32064, eos_token_id=32000, pad_token_id=32000)
    write_phi3_tokenizer_dir(folder)
    return folder


def _phi3(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi3", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=ENV)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"phi3 {version('phi3')}"


@pytest.mark.parametrize("args,hint", [
    (["generate", "--max-tokens", "8", "hi"], "did you mean --max-new-tokens?"),
    (["generate", "--temprature=0", "hi"], "did you mean --temperature?"),
    (["serve", "--max-conections", "9"], "did you mean --max-connections?"),
])
def test_a_mistyped_flag_gets_a_suggestion(capsys, args, hint):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and hint in err


def test_a_missing_file_is_no_such_file(tmp_path):
    for path in (tmp_path / "model.gguf", "./model.gguf"):
        done = _phi3("generate", "--model", str(path), "hi")
        assert done.returncode == 2
        assert done.stderr.strip() == f"phi3: error: {path}: no such file or directory"


@pytest.mark.parametrize("command", ["/quit", "/exit", "  /quit  "])
def test_quit_and_exit_leave_chat(model_dir, command):
    done = _phi3("chat", "--model", str(model_dir), "--max-new-tokens", "4", stdin=command + "\nnever asked\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ">>>"  # one prompt; neither line reached the model


def test_generate_does_not_import_the_compiler(model_dir):
    """torch._dynamo (~1.6 s of a 2 s start) is imported only by what compiles."""
    code = ("import sys; from phi3.cli import main; "
            f"main(['generate', '--model', {str(model_dir)!r}, '--max-new-tokens', '2', 'hi']); "
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no dynamo"


def test_generate_speculate_flag(model_dir):
    """`phi3 generate --speculate ngram:K` and `--speculate layers:1` (a draft model: the model's own
    first layer): the text of plain greedy generate; a bad value is a usage error before the model
    loads; a draft model that is not there, one line naming it."""
    args = ("generate", "--model", str(model_dir), "--max-new-tokens", "24", "--temperature", "0",
            "Say 'one two three one two three one two three'")
    plain = _phi3(*args)
    for spec in ("ngram:4", "layers:1"):
        fast = _phi3(*args, "--speculate", spec)
        assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
        assert fast.stdout == plain.stdout
    missing = _phi3(*args, "--speculate", str(model_dir / "no-draft"))
    assert missing.returncode != 0 and "no-draft" in missing.stderr and "Traceback" not in missing.stderr
    bad = _phi3("generate", "--model", str(model_dir / "missing"), "--speculate", "ngram:0", "hi")
    assert bad.returncode == 2 and "speculate must be" in bad.stderr
