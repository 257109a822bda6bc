"""lm-evaluation-harness over phi3: the `phi3` model backend and `evaluate`, what `phi3 eval` runs.

Importing this module imports lm-eval (the optional extra, `pip install 'phi3[eval]'`) and
registers the backend under the name "phi3", so lm-eval's own API can use it:
`lm_eval.simple_evaluate(model="phi3", model_args="model=M,quantize=int4", …)` after
`import phi3.evaluate`. (lm-eval 0.4 finds backends by import only, not by package entry points:
`python -m phi3.evaluate …` is lm-eval's command line with the backend registered.)

The backend follows lm-eval's `hf` backend request by request, so that its numbers are those of
`--model hf` on the same checkpoint: the same tokenization (`TemplateLM`'s context/continuation
split, the tokenizer's own BOS rule, BOS as the context of an empty one), the same truncation from
the left to `max_length` (the model's context), the same rolling windows, the same greedy
generation cut at the first `until` string. Log-likelihoods come from `phi3.scoring.score`,
generations from `LLM.generate` with all of a task's prompts in one batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from lm_eval import simple_evaluate, utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from .sampling import SamplingParams
from .scoring import score

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


@register_model("phi3")
class Phi3LM(TemplateLM):
    """lm-eval's `LM` over a `phi3.LLM`: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

    model_args: `model` (or `pretrained`; a directory, .gguf file, hub id or alias), `dtype`,
    `device`, `quantize` ("int4"/"int8"), `adapter` (a LoRA directory), `max_length` (default: the
    model's context), `max_gen_toks` (256), `add_bos_token` and `prefix_token_id` as in `hf`,
    `prefix_cache` (default true: scored inputs reuse the engine's cached prefixes, see `phi3.scoring`).
    Or `llm=`: an already loaded `phi3.LLM`. `batch_size` is accepted and has no effect on the
    numbers: the engine batches by tokens (see `phi3.scoring`).
    """

    def __init__(self, model=None, pretrained=None, *, llm=None, dtype=None, device=None, quantize=None,
                 adapter=None, max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, add_bos_token=None,
                 prefix_token_id=None, batch_size=None, max_batch_size=None, prefix_cache=True, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"the phi3 backend takes no model_args {sorted(unused)}")
        if llm is None:
            from .loader import load

            name = model or pretrained
            if device is not None and str(device).startswith("cuda"):
                import torch

                if not torch.cuda.is_available():  # lm-eval's command line asks for cuda:0 by default
                    log.warning("phi3 backend: no CUDA device here; running on the CPU")
                    device = None
            if not name:
                raise ValueError("the phi3 backend needs model=<a directory, .gguf file, hub id or alias>")
            llm = load(name, device=device, dtype=dtype, quantize=quantize, adapter=adapter,
                       prefix_cache=_flag(prefix_cache) is not False)
        if llm.tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer, and this model was loaded without one")
        self.llm, self.tokenizer = llm, llm.tokenizer
        self._max_length = int(max_length) if max_length else llm.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.batch_size = batch_size

    # -- tokenization, as lm-eval's hf backend ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context: the BOS token, else EOS (hf's rule)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False  # the text brings its own BOS
        ids = self.tokenizer.encode(string, **({} if add_special_tokens is None else
                                               {"add_special_tokens": add_special_tokens}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- the three request types -----------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(strings, context ids, continuation ids) -> (log-likelihood, is greedy), hf's left truncation."""
        pairs = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.max_length + 1):]  # the model reads all but the last
            pairs.append((whole[:len(whole) - len(cont)], cont))
        scored = score(self.llm, pairs)
        out = []
        for (key, _, _), s in zip(requests, scored):
            out.append((s.total, s.is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood in windows of `max_length` tokens, each predicting new tokens only."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if a task asks) continuations, cut at the first `until` string; one
        engine batch per distinct set of generation options."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for k, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for members in tqdm(groups.values(), disable=disable_tqdm, desc="generate_until"):
            options = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            max_new = options.pop("max_gen_toks")
            params = _sampling_params(options, max_new, [s for s in until if s])
            budget = self.max_length - max_new
            if budget <= 0:
                raise ValueError(f"max_gen_toks ({max_new}) must be less than max_length ({self.max_length})")
            prompts = [self.tok_encode(requests[k].args[0], left_truncate_len=budget) for k in members]
            for k, done in zip(members, self.llm.generate(prompts, params)):
                text = postprocess_generated_text(done.text, until, None)
                out[k] = text
                self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out


def _flag(value) -> bool | None:
    """A model_args boolean, which lm-eval may hand over as a string."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


def _sampling_params(options: dict, max_new: int, stop: list[str]) -> SamplingParams:
    """lm-eval's normalized generation kwargs -> SamplingParams (greedy unless do_sample)."""
    options = dict(options)
    do_sample = options.pop("do_sample", False)
    temperature = float(options.pop("temperature", 0.0) or 0.0)
    chosen = {"top_p": options.pop("top_p", None), "top_k": options.pop("top_k", None),
              "seed": options.pop("seed", None)}
    if options:
        log.warning("phi3 backend: ignoring generation options %s", sorted(options))
    if not do_sample:
        temperature = 0.0
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=stop,
                          **{k: v for k, v in chosen.items() if v is not None})


# -- a whole run, as `lm_eval run` does it -------------------------------------------------------
def evaluate(llm, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | None = None, log_samples: bool = False, output_path: str | None = None,
             seed: int | Sequence[int] = (0, 1234, 1234, 1234), max_length: int | None = None, model_name: str = "phi3",
             manager=None) -> dict:
    """Run lm-eval's `tasks` on `llm` (a `phi3.LLM`) -> lm-eval's results dict.

    With `output_path`, writes lm-eval's layout there: `<model>/results_<time>.json` and, with
    `log_samples`, `<model>/samples_<task>_<time>.jsonl`. `seed`: lm-eval's four seeds (python, numpy,
    torch, few-shot sampling), one integer for all four; its default is lm-eval's. Task data must be on this machine
    (files named by a task YAML under `include_path`, or the datasets cache); when they are not,
    a ValueError says so rather than a stack of hub errors. `manager`: a `task_manager(tasks, include_path)`
    made beforehand (the CLI checks the task names before it loads the model).
    """
    from lm_eval.loggers import EvaluationTracker

    manager = task_manager(tasks, include_path) if manager is None else manager
    seeds = [seed] * 4 if isinstance(seed, int) else list(seed)
    if len(seeds) != 4:
        raise ValueError(f"seed: one integer or four (python, numpy, torch, few-shot), got {seed!r}")
    lm = Phi3LM(llm=llm, max_length=max_length)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=log_samples, evaluation_tracker=tracker,
                                  random_seed=seeds[0], numpy_random_seed=seeds[1], torch_random_seed=seeds[2],
                                  fewshot_random_seed=seeds[3])
    except (ConnectionError, OSError) as e:  # the datasets library could not reach the hub
        raise ValueError(f"a task's data could not be read ({type(e).__name__}): this machine has neither the "
                         "data in its datasets cache nor the hub in reach; point a task YAML at local files "
                         "(dataset_path: json, dataset_kwargs: data_files) and pass its folder with --include_path"
                         ) from None
    results["config"]["model"] = results["model_name"] = model_name
    if tracker is not None:
        samples = results.pop("samples", None) if log_samples else None
        tracker.general_config_tracker.model_name = model_name
        tracker.general_config_tracker.model_name_sanitized = _sanitize(model_name)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if log_samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
        if samples is not None:
            results["samples"] = samples
    return results


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's TaskManager over its own tasks and those under `include_path`; a ValueError naming
    any of `tasks` it does not know."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include_path {include_path}: no such folder")
    if not tasks:
        raise ValueError("no tasks given: --tasks t1,t2 (lm-eval lists its tasks with `lm-eval ls tasks`)")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: lm-eval lists its tasks with `lm-eval ls tasks`"
                         + ("" if include_path else "; local task YAMLs go in a folder given with --include_path"))
    return manager


def _sanitize(name: str) -> str:
    """lm-eval's folder name for a model: path separators and colons become '__'."""
    return name.replace("/", "__").replace(":", "__")


def table(results: dict) -> str:
    """lm-eval's results table (and its groups table, if any) as its command line prints them."""
    out = utils.make_table(results)
    if "groups" in results:
        out += "\n" + utils.make_table(results, "groups")
    return out


def plot(runs: Sequence[str | Path | dict], out: str | Path) -> Path:
    """A bar chart of each task's main metric, one bar per run (e.g. base, int4, fine-tuned) -> `out`.

    `runs`: lm-eval `results_*.json` files, folders holding them (the newest is read), or results
    dicts as `evaluate` returns them. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install matplotlib") from None
    bars = []
    for run in runs:
        data = run if isinstance(run, dict) else _read_results(Path(run))
        label = data.get("model_name") or data.get("config", {}).get("model") or "run"
        scores = {}
        for task, metrics in data["results"].items():
            name = next((m for m in metrics if m.split(",")[0] in ("acc", "acc_norm", "exact_match", "word_perplexity")
                         and not m.split(",")[0].endswith("_stderr")), None)
            if name is not None:
                scores[f"{task}\n{name.split(',')[0]}"] = metrics[name]
        bars.append((label, scores))
    tasks = sorted({t for _, s in bars for t in s})
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(tasks)), 3.2))
    width = 0.8 / len(bars)
    for i, (label, scores) in enumerate(bars):
        ax.bar([t + i * width for t in range(len(tasks))], [scores.get(t, 0.0) for t in tasks], width, label=label)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def _read_results(path: Path) -> dict:
    if path.is_dir():
        found = sorted(path.rglob("results_*.json"))
        if not found:
            raise ValueError(f"no results_*.json under {path}")
        path = found[-1]
    if not path.is_file():
        raise ValueError(f"{path}: no such results file")
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":  # lm-eval's own command line, with the "phi3" backend registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
