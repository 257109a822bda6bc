"""Log-likelihood scoring: how likely the model finds given tokens after given tokens.

One function, `score`, serves every reader that needs it: the lm-evaluation-harness backend
(`phi3.evaluate`: `loglikelihood`, `loglikelihood_rolling`) and the server's `echo` of a prompt's
log-probabilities. It takes (context ids, continuation ids) pairs and returns, per continuation
token, its log-probability and whether it is the model's greedy choice there: nothing in the
signature says how the forwards run, so the engine's prefix cache can back it later (few-shot
prompts share their examples) without its callers changing.

Today each distinct input runs once (requests with the same input share its forward: a multiple
choice of one-token answers is one forward), inputs are sorted by length and batched, right-padded
(causal attention: padding after a token cannot change it), and the output layer runs only where a
continuation token is read, not at every position (a vocabulary of 32k-50k makes that the larger
part of a short sequence's work).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BATCH_TOKENS = 8192  # padded tokens per forward: rows × longest row (activations stay small on a CPU)
MAX_ROWS = 64


@dataclass
class ContinuationScore:
    """One continuation's tokens under the model, one entry per continuation token."""

    logprobs: list[float]  # log P(token | the tokens before it), fp32 log-softmax of the logits
    greedy: list[bool]  # the token is the argmax there
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, the `top` most likely (id, logprob)

    @property
    def total(self) -> float:
        """The continuation's log-likelihood: the sum of its tokens' log-probabilities."""
        return sum(self.logprobs)

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding from the context would write exactly this continuation."""
        return all(self.greedy)


@torch.inference_mode()
def score(llm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, top: int = 0,
          batch_tokens: int = BATCH_TOKENS) -> list[ContinuationScore]:
    """Score each (context ids, continuation ids) pair -> one `ContinuationScore` per pair, in order.

    The model reads context + continuation (all but the last token) from position 0; the context
    must hold at least one token, the continuation too, and the whole at most the model's context
    + 1 tokens (truncate before calling: which end to cut is the caller's choice). A whole
    sequence's tokens after its first are the pair (ids[:1], ids[1:]). `top`: also the `top` most
    likely tokens at each continuation position. Deterministic: the same pairs give the same
    numbers whatever else is in the call (up to float rounding in batched matrix products).
    """
    if not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a non-negative integer, got {top!r}")
    inputs: dict[tuple[int, ...], int] = {}  # distinct model input -> its row
    reads = []  # per pair: (row, first position read, continuation ids)
    context = llm.config.max_position_embeddings
    for ctx, cont in pairs:
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise ValueError("a scored pair needs at least one context token and one continuation token")
        if len(ctx) + len(cont) - 1 > context:
            raise ValueError(f"context + continuation is {len(ctx) + len(cont)} tokens; the model reads at most "
                             f"{context} + 1 (truncate the context first)")
        seq = tuple(llm._check_ids(ctx + cont)[:-1])
        row = inputs.setdefault(seq, len(inputs))
        reads.append((row, len(ctx) - 1, cont))
    rows = list(inputs)
    wanted: list[list[tuple[int, int]]] = [[] for _ in rows]  # per row: (position, pair index)
    for k, (row, start, cont) in enumerate(reads):
        wanted[row].extend((start + j, k) for j in range(len(cont)))
    out: list[ContinuationScore | None] = [None] * len(reads)
    results: dict[tuple[int, int], tuple[float, int, list]] = {}  # (row, position) -> (logprob of target, argmax, top)
    for batch in _batches(rows, llm, batch_tokens):
        _run(llm, [rows[r] for r in batch], batch, wanted, reads, results, top)
    for k, (row, start, cont) in enumerate(reads):
        got = [results[(row, start + j, k)] for j in range(len(cont))]
        out[k] = ContinuationScore([g[0] for g in got], [g[1] == t for g, t in zip(got, cont)],
                                   [g[2] for g in got] if top else [])
    return out


def _batches(rows: list[tuple[int, ...]], llm, batch_tokens: int) -> list[list[int]]:
    """Row indices in batches: longest first, rows × longest ≤ batch_tokens, one LongRoPE factor set each."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    batches, current = [], []
    for r in order:
        if current:
            longest, long_rope = len(rows[current[0]]), llm.model.uses_long_rope(len(rows[current[0]]))
            fits = (len(current) + 1) * longest <= batch_tokens and len(current) < MAX_ROWS
            if not fits or llm.model.uses_long_rope(len(rows[r])) != long_rope:
                batches.append(current)
                current = []
        current.append(r)
    if current:
        batches.append(current)
    return batches


def _run(llm, seqs: list[tuple[int, ...]], batch: list[int], wanted, reads, results, top: int) -> None:
    """One forward of `seqs` (rows `batch`, longest first); store in `results` what `wanted` asks of each row."""
    T = len(seqs[0])
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T), right-padded
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.tensor(s)
    picks = [(b, pos, k) for b, r in enumerate(batch) for pos, k in wanted[r]]
    places = list(dict.fromkeys((b, pos) for b, pos, _ in picks))  # distinct positions read, in order
    place = {p: n for n, p in enumerate(places)}
    where_b, where_t = torch.tensor(places).T

    # Only the read positions go through the output layer: a pre-hook hands lm_head those rows, in
    # this thread's forward only (a server's engine thread may be running the same model meanwhile).
    me = threading.get_ident()

    def gather(module, args):
        if threading.get_ident() != me:
            return None
        return (args[0][where_b, where_t][None],)  # (1, N, C)
    handle = llm.model.lm_head.register_forward_pre_hook(gather)
    try:
        logits = llm.model(tokens.to(llm.device), long_rope=llm.model.uses_long_rope(T))[0]  # (N, V)
    finally:
        handle.remove()
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (N, V) fp32
    argmax = logprobs.argmax(dim=-1).tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    for b, pos, k in picks:
        n = place[(b, pos)]
        target = reads[k][2][pos - reads[k][1]]
        results[(batch[b], pos, k)] = (float(logprobs[n, target]), argmax[n], alternatives[n] if top else [])
