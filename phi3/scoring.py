"""Log-likelihood scoring: how likely the model finds given tokens after given tokens.

One function, `score`, serves every reader that needs it: the lm-evaluation-harness backend
(`phi3.evaluate`: `loglikelihood`, `loglikelihood_rolling`) and the server's `echo` of a prompt's
log-probabilities (through `Scoring`, on the server's engine thread). It takes (context ids,
continuation ids) pairs and returns, per continuation token, its log-probability and whether it is
the model's greedy choice there.

The forwards are the engine's (`Engine.submit_reads`): each distinct input is one scoring request
over the same paged KV cache and prefix cache as generation, so an input computes only what follows
the longest cached prefix of full blocks (few-shot prompts share their examples; the answers of one
question share the question), never its read positions themselves (a cached position has no hidden
state: the match stops before the first continuation token, as vLLM's prompt_logprobs). The shared
prefixes run first (`Scoring`'s first wave: sorted, inputs that share a prefix are adjacent), then
the inputs, together, each from its cached prefix on; requests with the same input share its
forward (a multiple choice of one-token answers is one request). The output layer runs only at the read positions, on the hidden
states the engine returns, `batch_tokens` positions at a time (a vocabulary of 32k-50k makes it the
larger part of a short sequence's work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BATCH_TOKENS = 8192  # positions per output-layer call: bounds the (positions, vocabulary) logits held at once


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


def score(llm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, top: int = 0,
          batch_tokens: int = BATCH_TOKENS) -> list[ContinuationScore]:
    """Score each (context ids, continuation ids) pair -> one `ContinuationScore` per pair, in order.

    The model reads context + continuation (all but the last token) from position 0; the context
    must hold at least one token, the continuation too, and the whole at most the model's context
    + 1 tokens (truncate before calling: which end to cut is the caller's choice). A whole
    sequence's tokens after its first are the pair (ids[:1], ids[1:]). `top`: also the `top` most
    likely tokens at each continuation position. Runs on the LLM's engine (`LLM.engine_for`),
    whose prefix cache it reads and fills (`LLM.prefix_cache`); other requests in that engine
    advance meanwhile. Deterministic: the same pairs give the same numbers whatever else is in the
    call or the cache (up to float rounding: a cached prefix's keys against recomputed ones).
    """
    work = Scoring(llm, pairs, top, batch_tokens)
    engine = llm.engine_for([])
    while requests := work.submit(engine):
        try:
            while not all(r.finished for r in requests):
                engine.step()
        finally:
            for r in requests:
                if not r.finished:
                    engine.cancel(r)
    return work.results()


class Scoring:
    """One `score` call's work, apart from who steps the engine (the caller, or a server's engine
    thread): the pairs checked, the engine requests in two waves (`submit`), and the scores read
    off their hidden states once all have ended (`results`).

    The first wave computes the shared prefixes: for each input, the whole blocks it shares with
    its neighbours in sorted order before its first read position, each distinct prefix once (not
    one that starts another). The second, one request per distinct input, then finds them all
    cached and computes only its own tail: the inputs go through the engine together in a few
    padded forwards, rather than each group's first input alone and then its siblings."""

    def __init__(self, llm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], top: int = 0,
                 batch_tokens: int = BATCH_TOKENS):
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            raise ValueError(f"top must be a non-negative integer, got {top!r}")
        if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
        self.llm, self.top, self.batch_tokens = llm, top, batch_tokens
        inputs: dict[tuple[int, ...], set[int]] = {}  # distinct model input -> the positions read in it
        self.pairs = []  # per pair: (its input, first position read, continuation ids)
        context = llm.config.max_position_embeddings
        for ctx, cont in pairs:
            ctx, cont = list(ctx), list(cont)
            if not ctx or not cont:
                raise ValueError("a scored pair needs at least one context token and one continuation token")
            if len(ctx) + len(cont) - 1 > context:
                raise ValueError(f"context + continuation is {len(ctx) + len(cont)} tokens; the model reads at "
                                 f"most {context} + 1 (truncate the context first)")
            seq = tuple(llm._check_ids(ctx + cont)[:-1])
            inputs.setdefault(seq, set()).update(range(len(ctx) - 1, len(seq)))
            self.pairs.append((seq, len(ctx) - 1, cont))
        self.inputs = {seq: sorted(inputs[seq]) for seq in sorted(inputs)}  # sorted: shared prefixes adjacent
        self.requests: dict[tuple[int, ...], object] = {}
        self._waves = 0

    def submit(self, engine) -> list:
        """Queue the next wave of requests in `engine` and return them (once the previous wave's have
        ended): the shared prefixes, then one per distinct input; [] when both are done."""
        self._waves += 1
        if self._waves == 1:
            prefixes = self._prefixes(engine.cache.block_size) if engine.blocks.prefix_cache else []
            if prefixes:
                return [engine.submit_reads(p, [len(p) - 1]) for p in prefixes]
            self._waves += 1
        if self._waves == 2:
            self.requests = {seq: engine.submit_reads(seq, reads) for seq, reads in self.inputs.items()}
            return list(self.requests.values())
        return []

    def _prefixes(self, block_size: int) -> list[tuple[int, ...]]:
        """The first wave: per input, the whole blocks before its first read position that it shares
        with the input before or after it (sorted), distinct, none the start of another."""
        seqs = list(self.inputs)
        shared = [0] * len(seqs)
        for i in range(1, len(seqs)):
            a, b, n = seqs[i - 1], seqs[i], 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            shared[i - 1], shared[i] = max(shared[i - 1], n), max(shared[i], n)
        found = set()
        for seq, n in zip(seqs, shared):
            n = min(n, self.inputs[seq][0]) // block_size * block_size
            if n:
                found.add(seq[:n])
        ordered = sorted(found)
        return [p for p, after in zip(ordered, ordered[1:] + [()]) if after[:len(p)] != p]

    @torch.inference_mode()
    def results(self) -> list[ContinuationScore]:
        """One `ContinuationScore` per pair, in order (every request submitted has ended "scored")."""
        if not self.pairs:
            return []
        first, rows = {}, []  # per input: its first row in `hidden`; the rows
        for seq, req in self.requests.items():
            if req.finish_reason != "scored":
                raise RuntimeError(f"a scoring request ended {req.finish_reason!r}")
            first[seq] = sum(len(r) for r in rows)
            rows.append(req.hidden)
        hidden = torch.cat(rows)  # (N, C): every read position of every input
        where = {seq: dict(zip(reads, range(first[seq], first[seq] + len(reads)))) for seq, reads in self.inputs.items()}
        picks = [(where[seq][start + j], t) for seq, start, cont in self.pairs for j, t in enumerate(cont)]
        index, target = torch.tensor(picks).T  # per continuation token: its row, its id
        logprob, argmax, alternatives = torch.empty(len(picks)), torch.empty(len(picks), dtype=torch.long), {}
        for a in range(0, len(hidden), self.batch_tokens):
            lp = torch.log_softmax(self.llm.model.lm_head(hidden[a:a + self.batch_tokens][None])[0].float(), dim=-1).cpu()
            mine = ((index >= a) & (index < a + len(lp))).nonzero()[:, 0]  # the picks of these rows
            logprob[mine] = lp[index[mine] - a, target[mine]]
            argmax[mine] = lp.argmax(dim=-1)[index[mine] - a]
            if self.top:
                values, ids = lp.topk(min(self.top, lp.shape[-1]), dim=-1)
                for n, (i, v) in enumerate(zip(ids.tolist(), values.tolist())):
                    alternatives[a + n] = list(zip(i, v))
        out, k = [], 0
        logprob, argmax, index = logprob.tolist(), argmax.tolist(), index.tolist()
        for _, _, cont in self.pairs:
            span = range(k, k + len(cont))
            out.append(ContinuationScore([logprob[i] for i in span], [argmax[i] == t for i, t in zip(span, cont)],
                                         [alternatives[index[i]] for i in span] if self.top else []))
            k += len(cont)
        return out
