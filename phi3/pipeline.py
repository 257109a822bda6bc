"""transformers-style `pipeline("text-generation")`, so the model card's code runs unchanged:

    pipe = phi3.pipeline("text-generation", model="microsoft/Phi-3-mini-128k-instruct")
    out = pipe(messages, max_new_tokens=500, return_full_text=False, temperature=0.0, do_sample=False)
    print(out[0]["generated_text"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: `import phi3` must not import torch (the CLI's --help)
    from .generate import LLM

# transformers' sampling defaults when do_sample=True and nothing else is said.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
_IGNORED = {"clean_up_tokenization_spaces", "pad_token_id", "eos_token_id", "use_cache", "num_return_sequences"}


class TextGenerationPipeline:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.tokenizer = llm.tokenizer

    def __call__(self, inputs, *, return_full_text: bool = True, do_sample: bool = False, **kwargs):
        """Chat messages or text (or a list of either) -> [{"generated_text": ...}] per input."""
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], (list, str)) and not _is_chat(inputs):
            return [self(x, return_full_text=return_full_text, do_sample=do_sample, **kwargs) for x in inputs]
        params = self._sampling(do_sample, kwargs)
        chat = _is_chat(inputs)
        if chat and inputs[-1].get("role") == "assistant":
            raise ValueError("a conversation ending in an assistant message (a prefill) is not supported; "
                             "end it with a user message")
        prompt_ids = self.llm.encode_prompt(inputs if chat else str(inputs))
        answer = self.llm.generate(prompt_ids, **params).text  # the new tokens only, as transformers 5
        if not return_full_text:
            return [{"generated_text": answer}]
        if chat:
            return [{"generated_text": [*inputs, {"role": "assistant", "content": answer}]}]
        return [{"generated_text": str(inputs) + answer}]

    @staticmethod
    def _sampling(do_sample: bool, kwargs: dict) -> dict:
        unknown = set(kwargs) - {"max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                                 "repetition_penalty", "seed", "stop"} - _IGNORED
        if unknown:
            raise TypeError(f"unsupported generation arguments: {', '.join(sorted(unknown))}")
        params = {k: v for k, v in kwargs.items() if k not in _IGNORED}
        if not do_sample:  # greedy, whatever temperature says (transformers ignores it too)
            for k in ("temperature", "top_p", "top_k", "min_p", "seed"):
                params.pop(k, None)
            return params
        return {**_HF_SAMPLING_DEFAULTS, **params}


def _is_chat(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def pipeline(task: str, model, tokenizer=None, **load_kwargs) -> TextGenerationPipeline:
    """`task` must be "text-generation"; `model` a name or path (see `phi3.load`) or an `LLM`."""
    if task != "text-generation":
        raise ValueError(f"phi3.pipeline supports only 'text-generation', got {task!r}")
    from .generate import LLM
    from .loader import load

    llm = model if isinstance(model, LLM) else load(model, **load_kwargs)
    if tokenizer is not None:
        from .tokenizer import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError("tokenizer must be a phi3 Tokenizer (phi3.load_tokenizer) or None; "
                            "a loaded model already carries its own")
        llm.tokenizer = tokenizer
    if llm.tokenizer is None:
        raise ValueError("the text-generation pipeline needs a tokenizer; this model has none")
    return TextGenerationPipeline(llm)
