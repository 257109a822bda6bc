"""phi3: a fast, exact, self-contained engine for Microsoft's Phi-3 small language models.

    import phi3
    llm = phi3.load("microsoft/Phi-3-mini-128k-instruct")   # or a directory, a .gguf file, an alias
    print(llm.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=64).text)
    phi3.finetune("phi-3-mini-4k-instruct", "chats.jsonl", "adapter/")     # LoRA; then load(..., adapter="adapter/")
"""

from .config import Phi3Config, preset
from .finetune import finetune
from .generate import LLM, Chunk, Completion, Usage
from .loader import load
from .pipeline import pipeline
from .save import merge
from .sampling import SamplingParams


def load_tokenizer(path):
    """A `Tokenizer` from a Hugging Face model directory or a .gguf file."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["load", "load_tokenizer", "pipeline", "finetune", "merge", "LLM", "Completion", "Chunk", "Usage",
           "SamplingParams", "Phi3Config", "preset"]
