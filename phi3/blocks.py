"""Who holds which block of the KV cache's pool, and the prefix index over full blocks.

    free blocks ──allocate──► held by rows (ref count ≥ 1) ──release──► cached (ref 0, LRU order)
         ▲                         ▲   │ full blocks registered               │
         └──── evicted (LRU) ◄─────┼───┴───────────────────────────────────────┘
                                   └── a later prompt with the same prefix takes them back (ref + 1)

One owner for block lifetimes: the engine asks for blocks, gives them back, and registers full
ones; nothing else changes a block's count. Automatic prefix caching (vLLM's): a full block is
keyed by all the tokens up to its end, as a chain — each block's key hashes its parent's key and
its own tokens — plus the LongRoPE factor set its keys were rotated with (`salt`). A lookup walks
the chain from the first block and stops at the first miss. A hit is verified, not trusted: the
block's own tokens and its parent (by a serial number that no other registration ever reuses)
must be the ones asked for, so a hash collision can never hand out another sequence's keys.

Released blocks stay cached until the pool needs them: evicted least recently used first, and a
sequence's blocks are released tail first, so its deepest blocks go before its shared prefix.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(eq=False)
class _Block:
    refs: int = 0
    key: int | None = None  # its prefix-index key, while registered
    tokens: tuple[int, ...] = ()  # its own tokens, while registered
    parent: int = -1  # the serial of the block before it in its sequence (-1: none)
    serial: int = -1  # this registration's serial number
    used: bool = False  # written at least once (a fresh block is zeroed first)


class OutOfBlocks(Exception):
    """The pool has no free or evictable block left."""


class BlockManager:
    def __init__(self, blocks: int, block_size: int, prefix_cache: bool = True):
        # block 0 is the cache's scratch block: never handed out
        self.block_size, self.prefix_cache = block_size, prefix_cache
        self._blocks = [_Block() for _ in range(blocks)]
        self._free = list(range(blocks - 1, 0, -1))  # popped from the end: low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref-0 registered blocks, least recently used first
        self._index: dict[int, int] = {}  # key -> block
        self._serials = itertools.count()
        self.hit_tokens = 0  # prompt tokens whose keys came from the prefix cache
        self.queried_tokens = 0  # prompt tokens looked up

    # -- counts --------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self._blocks) - 1

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free, or cached and unused (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def cached(self) -> int:
        """Blocks kept for the prefix cache that no row holds."""
        return len(self._cached)

    @property
    def used(self) -> int:
        """Blocks held by rows."""
        return self.total - self.available

    # -- holding blocks ------------------------------------------------------------------------------
    def allocate(self, n: int) -> tuple[list[int], list[int]]:
        """`n` blocks for one row (raises OutOfBlocks, taking none, if there are fewer); also which of
        them were never written (the caller zeroes those)."""
        if n > self.available:
            raise OutOfBlocks(n)
        out, fresh = [], []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached block
                b, _ = self._cached.popitem(last=False)
                self._unregister(b)
            block = self._blocks[b]
            block.refs = 1
            if not block.used:
                block.used = True
                fresh.append(b)
            out.append(b)
        return out, fresh

    def release(self, blocks: Sequence[int]) -> None:
        """A row gives its blocks back; registered ones stay cached (tail first: evicted first)."""
        for b in reversed(blocks):
            block = self._blocks[b]
            block.refs -= 1
            assert block.refs >= 0, f"block {b} released more often than held"
            if block.refs == 0:
                if block.key is not None:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # -- the prefix index ----------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], salt) -> list[int]:
        """The longest chain of cached full blocks that starts `tokens`, each taken (ref + 1). At
        least one token is left over: a prompt's last token must be computed for its logits."""
        if not self.prefix_cache:
            return []
        bs, out, key, parent = self.block_size, [], hash(("phi3", salt)), -1
        self.queried_tokens += len(tokens)
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            key = hash((key, chunk))
            b = self._index.get(key)
            if b is None:
                break
            block = self._blocks[b]
            if block.tokens != chunk or block.parent != parent:  # a hash collision: not our prefix
                break
            if block.refs == 0:
                del self._cached[b]
            block.refs += 1
            out.append(b)
            parent = block.serial
        self.hit_tokens += len(out) * bs
        return out

    def register(self, blocks: Sequence[int], tokens: Sequence[int], salt) -> None:
        """Record a row's full blocks: `blocks[i]` holds the keys of `tokens[i*bs:(i+1)*bs]`, all
        written. Blocks already registered (a prefix taken from the cache, or registered at an
        earlier call) are walked over; a block whose chain is already cached under another block
        stays unregistered (both hold the same keys; the first one serves lookups)."""
        if not self.prefix_cache:
            return
        bs, key, parent = self.block_size, hash(("phi3", salt)), -1
        for i in range(min(len(blocks), len(tokens) // bs)):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            key = hash((key, chunk))
            block = self._blocks[blocks[i]]
            if block.key is not None:  # already registered: only follow it if it is this chain's
                if block.key != key or block.tokens != chunk or block.parent != parent:
                    return
            elif key in self._index:  # the same prefix, computed twice: the first serves, the chain goes on from it
                block = self._blocks[self._index[key]]
                if block.tokens != chunk or block.parent != parent:
                    return
            else:
                block.key, block.tokens, block.parent, block.serial = key, chunk, parent, next(self._serials)
                self._index[key] = blocks[i]
            parent = block.serial

    def clear(self) -> None:
        """Forget every cached prefix (the model changed): cached blocks become free, held ones unregistered."""
        for b in list(self._cached):
            self._unregister(b)
            self._free.append(b)
        self._cached.clear()
        for b in list(self._index.values()):
            self._unregister(b)

    def _unregister(self, b: int) -> None:
        block = self._blocks[b]
        if block.key is not None and self._index.get(block.key) == b:
            del self._index[block.key]
        block.key, block.tokens, block.parent, block.serial = None, (), -1, -1
