"""Automatic prefix caching: a prompt's keys and values computed once, reused by every later prompt that
starts with the same tokens (a chat resends its whole conversation each turn; many requests share a system
prompt).

The server's KV cache (kv_cache.py) holds a row per slot. When a row's request ends, its positions are cut
into fixed-size blocks of ``block`` tokens and each full block's keys and values are copied here, keyed by
its tokens *and* the block before it — so a block is found only behind the very same prefix, and a key is
the tokens themselves (no hash to collide). A new request walks its prompt block by block from the start;
the blocks found are copied into its row and only the rest of the prompt is prefilled (batching.py).

Memory is bounded by ``budget`` bytes; past it the least recently used block goes. Every use touches a
chain's blocks deepest first, so a block is always used more recently than the blocks that continue it:
eviction takes leaves before their parents and never strands a reachable block.

    pc = PrefixCache(block=16, budget=256 << 20)
    n, kv = pc.match(prompt, limit=len(prompt) - 1)    # n tokens found (a multiple of block); kv: (L, 2, H, n, D)
    pc.store(tokens, read=lambda a, b: kv_of_positions(a, b))
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch


class PrefixCache:
    def __init__(self, block: int = 16, budget: int = 256 << 20):
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.block, self.budget = block, int(budget)
        # (the block before's id, 0 for none; this block's tokens) -> id; id -> (its key, its KV)
        self._ids: dict[tuple[int, tuple[int, ...]], int] = {}
        self._blocks: collections.OrderedDict[int, tuple[tuple, torch.Tensor]] = collections.OrderedDict()
        self._next_id = 1
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens served from here instead of prefilled (for stats and tests)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: list[int], limit: int) -> list[int | tuple]:
        """The ids of ``tokens``' leading full blocks (at most ``limit`` tokens) found here, then the key of the
        first block not found, if one is within the limit."""
        out: list[int | tuple] = []
        parent = 0
        for a in range(0, limit - self.block + 1, self.block):
            key = (parent, tuple(tokens[a:a + self.block]))
            parent = self._ids.get(key, 0)
            if not parent:
                out.append(key)
                break
            out.append(parent)
        return out

    def _touch(self, ids: list[int]) -> None:
        for i in reversed(ids):  # deepest first: each block ends up more recent than those that continue it
            self._blocks.move_to_end(i)

    def match(self, tokens: list[int], limit: int | None = None) -> tuple[int, torch.Tensor | None]:
        """The longest run of ``tokens``' leading full blocks held here, at most ``limit`` tokens (a prompt
        keeps at least its last token to prefill: its logits are what the first sample needs) -> (tokens
        found, their keys and values (layers, 2, kv_heads, tokens, head_dim) or None)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        ids = [i for i in self._chain(tokens, limit) if isinstance(i, int)]
        if not ids:
            return 0, None
        self._touch(ids)
        self.hit_tokens += len(ids) * self.block
        kv = torch.cat([self._blocks[i][1] for i in ids], dim=3)
        return len(ids) * self.block, kv

    def store(self, tokens: list[int], read: Callable[[int, int], torch.Tensor]) -> int:
        """Keep the full blocks of ``tokens`` (the positions a row holds) not held yet; ``read(a, b)``: the
        row's keys and values of positions a..b-1, (layers, 2, kv_heads, b - a, head_dim). Returns the blocks
        added. A block bigger than the whole budget is not kept."""
        ids: list[int] = []
        parent, added = 0, 0
        for a in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[a:a + self.block]))
            parent = self._ids.get(key, 0)
            if not parent:
                kv = read(a, a + self.block).clone()
                size = kv.numel() * kv.element_size()
                if size > self.budget:
                    break
                self._evict(self.budget - size, keep=set(ids))
                parent = self._next_id
                self._next_id += 1
                self._ids[key] = parent
                self._blocks[parent] = (key, kv)
                self.bytes += size
                added += 1
            ids.append(parent)
        self._touch(ids)
        return added

    def _evict(self, room: int, keep: set[int]) -> None:
        """Least recently used blocks out until ``room`` bytes hold what is left (never one of ``keep``:
        the chain being stored)."""
        for i in list(self._blocks):
            if self.bytes <= room:
                return
            if i in keep:
                continue
            key, kv = self._blocks.pop(i)
            del self._ids[key]
            self.bytes -= kv.numel() * kv.element_size()
            self.evicted += 1

    def clear(self) -> None:
        self._ids.clear()
        self._blocks.clear()
        self.bytes = 0
