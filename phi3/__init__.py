"""phi3: a fast, exact, self-contained engine for Microsoft's Phi-3 small language models.

    import phi3
    llm = phi3.load("microsoft/Phi-3-mini-128k-instruct")   # or a directory, a .gguf file, an alias
    print(llm.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=64).text)
    phi3.finetune("phi-3-mini-4k-instruct", "chats.jsonl", "adapter/")     # LoRA; then load(..., adapter="adapter/")
"""

from importlib import import_module

from .config import Phi3Config, preset
from .pipeline import pipeline

# Names whose modules import torch: imported on first use, so that `import phi3` (and with it the
# CLI's `--help` and argument errors) answers at once. name -> module.
_LAZY = {"load": "loader", "LLM": "generate", "Completion": "generate", "Chunk": "generate", "Usage": "generate",
         "SamplingParams": "sampling", "finetune": "training", "merge": "save"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'phi3' has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load_tokenizer(path):
    """A `Tokenizer` from a Hugging Face model directory or a .gguf file."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["load", "load_tokenizer", "pipeline", "finetune", "merge", "LLM", "Completion", "Chunk", "Usage",
           "SamplingParams", "Phi3Config", "preset"]
