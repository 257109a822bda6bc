"""`phi3 eval` against lm-evaluation-harness's own `hf` backend (transformers) on the same checkpoint.

lm-eval (with its api extra) and matplotlib come with the test extra. The tasks are tiny local ones (tests/eval_tasks: multiple choice with long and one-token answers,
a rolling log-likelihood, a greedy generate_until), read from json files as a user's would be.
Both backends must see the same prompts and give the same per-sample log-likelihoods (1e-3, fp32),
the same greedy flags and generations, and so the same accuracies.
"""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import randomize, tiny_config
from phi3.cli import main
from vocab_fixture import write_phi3_tokenizer_dir

TASKS_DIR = Path(__file__).parent / "eval_tasks"
TASKS = ["tiny_mc", "tiny_letters", "tiny_rolling", "tiny_sums"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: the tasks read local files (their YAMLs name them relative to the tasks folder)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(TASKS_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Phi-3 (grouped-query attention, a sliding window of 32) with the real Phi-3 tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("eval-model")
    cfg = {**tiny_config("gqa"), "vocab_size": 32064, "eos_token_id": 32000, "pad_token_id": 32000,
           "sliding_window": 32, "max_position_embeddings": 512, "original_max_position_embeddings": 512}
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**cfg)).eval()
    randomize(model, seed=7)
    model.save_pretrained(folder)
    write_phi3_tokenizer_dir(folder)
    return folder


def _samples(folder: Path, task: str) -> dict[int, dict]:
    (path,) = glob.glob(f"{folder}/**/samples_{task}_*.jsonl", recursive=True)
    return {s["doc_id"]: s for s in map(json.loads, Path(path).read_text().splitlines())}


def _results(folder: Path) -> dict:
    (path,) = glob.glob(f"{folder}/**/results_*.json", recursive=True)
    return json.loads(Path(path).read_text())


def _hf_run(out: Path, model_args: str, tasks=TASKS, limit=None):
    """lm-eval's `hf` backend through lm-eval's own command line, writing lm-eval's files to `out`."""
    from lm_eval.__main__ import cli_evaluate

    argv = ["lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", ",".join(tasks),
            "--include_path", str(TASKS_DIR), "--num_fewshot", "3", "--batch_size", "4", "--log_samples",
            "--output_path", str(out), *(["--limit", str(limit)] if limit else [])]
    import sys
    old, sys.argv = sys.argv, argv
    try:
        cli_evaluate()
    finally:
        sys.argv = old


def _assert_same(ours: Path, theirs: Path, tasks=TASKS) -> None:
    for task in tasks:
        a, b = _samples(ours, task), _samples(theirs, task)
        assert a.keys() == b.keys() and a
        for doc in a:
            assert a[doc]["arguments"] == b[doc]["arguments"], (task, doc)  # the same prompts
            for x, y in zip(a[doc]["resps"], b[doc]["resps"], strict=True):
                x, y = x[0], y[0]
                if isinstance(x, str) and task == "tiny_sums":
                    assert x == y, (task, doc)  # the same greedy generation
                    continue
                if isinstance(x, list):  # loglikelihood: (logprob, is_greedy)
                    assert x[1] == y[1], (task, doc)
                    x, y = x[0], y[0]
                assert abs(float(x) - float(y)) < 1e-3, (task, doc, x, y)
    ra, rb = _results(ours)["results"], _results(theirs)["results"]
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in rb[task]:
                assert ra[task][metric] == rb[task][metric], (task, metric)
        for metric in ("word_perplexity,none", "bits_per_byte,none"):
            if metric in rb[task]:
                assert ra[task][metric] == pytest.approx(rb[task][metric], rel=1e-4)


def test_phi3_eval_gives_hf_backends_numbers_and_files(model_dir, tmp_path, capsys):
    """max_length 128: long few-shot prompts are cut from the left and texts roll over several windows."""
    ours, theirs = tmp_path / "phi3", tmp_path / "hf"
    assert main(["eval", "--model", str(model_dir), "--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR),
                 "--num-fewshot", "3", "--max_length", "128", "--log_samples", "--output_path", str(ours)]) == 0
    table = capsys.readouterr().out
    assert all(f"|{t}" in table for t in TASKS) and "exact_match" in table  # lm-eval's table
    _hf_run(theirs, f"pretrained={model_dir},dtype=float32,max_length=128")
    _assert_same(ours, theirs)
    assert len(list(ours.glob("*/samples_*.jsonl"))) == len(TASKS)


def test_lm_eval_python_api_finds_the_phi3_backend(model_dir):
    """`import phi3.evaluate` registers "phi3" with lm-eval: its simple_evaluate builds it from model_args."""
    import lm_eval

    import phi3.evaluate  # noqa: F401
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model="phi3", model_args=f"model={model_dir},max_length=128", tasks=["tiny_letters"],
                                  num_fewshot=3, task_manager=TaskManager(include_path=str(TASKS_DIR)), limit=4)
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,max_length=128",
                                  tasks=["tiny_letters"], num_fewshot=3, limit=4, device="cpu",
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)))
    assert res["results"]["tiny_letters"]["acc,none"] == ref["results"]["tiny_letters"]["acc,none"]


def test_smollm2_eval_gives_hf_backends_numbers(tmp_path):
    """The real model (Q4_1 GGUF; transformers dequantizes it to fp32, phi3 runs it packed)."""
    from phi3 import assets

    gguf = assets.fetch(assets.SMOLLM2_GGUF)
    ours, theirs = tmp_path / "phi3", tmp_path / "hf"
    tasks = ["tiny_mc", "tiny_rolling", "tiny_sums"]
    assert main(["eval", "--model", str(gguf), "--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR),
                 "--num_fewshot", "3", "--limit", "5", "--log_samples", "--output_path", str(ours)]) == 0
    _hf_run(theirs, f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32", tasks, limit=5)
    _assert_same(ours, theirs, tasks)


def test_plot_draws_each_run(model_dir, tmp_path):
    runs = []
    for name, extra in (("base", []), ("int8", ["--quantize", "int8"])):
        assert main(["eval", "--model", str(model_dir), "--tasks", "tiny_letters", "--include_path", str(TASKS_DIR),
                     "--limit", "4", "--output_path", str(tmp_path / name), *extra]) == 0
        runs.append(str(tmp_path / name))
    assert _results(tmp_path / "int8")["model_name"].endswith("+int8")
    png = tmp_path / "cmp.png"
    assert main(["eval", "--plot", str(png), "--compare", *runs]) == 0
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 100


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task"], "unknown task(s) no_such_task"),
    (["--tasks", "tiny_mc", "--num_fewshot", "-1"], "--num_fewshot must be at least 0"),
    (["--tasks", "tiny_mc", "--limit", "0"], "--limit must be positive"),
    (["--tasks", "tiny_mc", "--seed", "1,2"], "--seed must be"),
    (["--tasks", "tiny_mc", "--include_path", "/no/such/folder"], "no such folder"),
    ([], "give --tasks"),
])
def test_bad_arguments_fail_before_loading(argv, message, capsys):
    """The model does not exist: every error here comes before the load would have failed."""
    where = [] if "--include_path" in argv else ["--include_path", str(TASKS_DIR)]
    assert main(["eval", "--model", "/no/such/model", *where, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phi3: error:") and message in err and len(err.splitlines()) == 1


def test_task_data_out_of_reach_is_one_clear_error(model_dir):
    """lm-eval's arc_easy reads its data from the hub, which the (offline) test cannot reach. In a
    process of its own, as a user runs it (loggers that other tests pointed at pytest's captured
    streams would write their own errors here)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "phi3", "eval", "--model", str(model_dir), "--tasks", "arc_easy",
                           "--limit", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("phi3: error: a task's data could not be read") and "--include_path" in err
    assert len(err.splitlines()) == 1


def test_without_lm_eval_one_line_says_how_to_get_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", "--tasks", "tiny_mc"]) == 2
    assert capsys.readouterr().err == "phi3: error: phi3 eval needs lm-evaluation-harness: pip install 'phi3[eval]'\n"


# -- the server: lm-eval's local-completions against `phi3 serve`'s /v1/completions ----------------
@pytest.fixture(scope="module")
def server_url(model_dir):
    """The model served by uvicorn in a thread on a free loopback port."""
    import socket
    import threading
    import time

    import uvicorn

    import phi3
    from phi3.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(phi3.load(model_dir, device="cpu", dtype="float32"), name="tiny", max_batch=8)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(60)


def test_echo_gives_the_prompts_log_probabilities(server_url, model_dir):
    """OpenAI's SDK, `echo` + `logprobs` + `max_tokens: 0`: each prompt token's log-probability under
    the model (log_softmax of `LLM.logits`), the first one null, the prompt as the text."""
    import openai

    import phi3

    llm = phi3.load(model_dir, device="cpu", dtype="float32")
    prompt = "Question: What is the capital of France?\nAnswer: Paris"
    ids = llm.tokenizer.encode(prompt)
    client = openai.OpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0, timeout=60)
    out = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=0, temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = torch.log_softmax(llm.logits(ids), dim=-1)
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(expected[j - 1, ids[j]]), abs=1e-4)
        assert max(lp.top_logprobs[j].values()) == pytest.approx(float(expected[j - 1].max()), abs=1e-4)
    both = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0)
    alone = llm.generate(ids, max_new_tokens=3)
    assert both.choices[0].text == prompt + alone.text
    assert both.choices[0].logprobs.token_logprobs[:len(ids)] == lp.token_logprobs
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)


def test_echo_runs_on_the_servers_engine_and_fills_its_prefix_cache(server_url, model_dir):
    """Echoed prompts are scored by the server's engine, over the pool generation uses: the cache
    serves none of an echo (every position is read), but a completion of the same prompts afterwards
    takes their blocks from it (/health's prefix_hit_tokens); an echo again gives the same
    log-probabilities (1e-5), `LLM.logits`' (1e-4); several prompts in one request, a one-token one too."""
    import httpx

    import phi3

    llm = phi3.load(model_dir, device="cpu", dtype="float32")
    shots = "".join(f"Question: What is {a} plus {a}?\nAnswer: {2 * a}\n\n" for a in range(2, 7))
    prompts = [shots + "Question: What is 7 plus 7?\nAnswer: 14", shots + "Question: What is 8 plus 8?\nAnswer: 16", "Q"]
    echo = {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 0, "max_tokens": 0}

    def hits() -> int:
        return httpx.get(server_url + "/health").json()["kv_cache"]["prefix_hit_tokens"]
    before = hits()
    first = httpx.post(server_url + "/v1/completions", json=echo, timeout=60).json()["choices"]
    assert hits() == before
    httpx.post(server_url + "/v1/completions", json={"model": "tiny", "prompt": prompts[:2], "max_tokens": 1},
               timeout=60).raise_for_status()
    assert hits() - before >= 2 * 16 * (len(llm.tokenizer.encode(shots)) // 16)
    again = httpx.post(server_url + "/v1/completions", json=echo, timeout=60).json()["choices"]
    for prompt, a, b in zip(prompts, first, again):
        ids = llm.tokenizer.encode(prompt)
        got, repeat = a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"]
        assert a["text"] == prompt and len(got) == len(ids) and got[0] is None and repeat[0] is None
        assert repeat[1:] == pytest.approx(got[1:], abs=1e-5)
        want = torch.log_softmax(llm.logits(ids), dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert got[1:] == pytest.approx(want.tolist(), abs=1e-4)


def test_local_completions_against_the_server_gives_phi3_evals_numbers(server_url, model_dir, tmp_path):
    """lm-eval's API backends leave BOS out unless told (add_bos_token=True): Phi-3's tokenizer adds it."""
    from lm_eval.__main__ import cli_evaluate

    ours, theirs = tmp_path / "phi3", tmp_path / "served"
    assert main(["eval", "--model", str(model_dir), "--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR),
                 "--num_fewshot", "3", "--limit", "4", "--log_samples", "--output_path", str(ours)]) == 0
    import sys
    argv = ["lm_eval", "--model", "local-completions", "--model_args",
            f"base_url={server_url}/v1/completions,model=tiny,tokenizer={model_dir},tokenizer_backend=huggingface,"
            "tokenized_requests=True,add_bos_token=True,max_length=512,num_concurrent=2", "--tasks", ",".join(TASKS),
            "--include_path", str(TASKS_DIR), "--num_fewshot", "3", "--limit", "4", "--batch_size", "4",
            "--log_samples", "--output_path", str(theirs)]
    old, sys.argv = sys.argv, argv
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    _assert_same(ours, theirs)
