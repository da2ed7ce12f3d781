"""The one KV cache: each layer's keys and values for a batch of rows, every row filled to its own length.

Callers plan a forward (``prefill`` some rows, a ``decode`` step, or by default the same new positions on
every row), ``fork``, ``free`` and ``view`` rows by index; the model calls ``start`` and ``append``. Nobody
touches the storage, so it can become paged (fixed-size blocks, a block table, shared prefixes) without
changing a caller.

    cache = KVCache.for_model(model, rows=2, capacity=64)
    logits = model(prompt_ids, cache=cache)       # appends to every row at the length they share
    logits = model(next_ids, cache=cache)         # one more position per row

``GradKVCache`` is the same interface for a training forward (GRPO's groups share one prompt pass): its
keys and values stay autograd values, so gradients flow through the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.gpt import GPTConfig


def _shared_length(lengths: list[int]) -> int:
    if len(set(lengths)) > 1:
        raise ValueError(f"the cache's rows hold different lengths ({lengths}): plan the forward "
                         f"(prefill/decode) and pass positions and a mask")
    return lengths[0] if lengths else 0


class KVCache:
    """Preallocated keys/values: ``capacity`` positions for each of ``num_rows`` rows.

    The engine makes one per generation (its rows share one length; left pads are the caller's to mask),
    the server one for its lifetime (rows are slots, filled and freed independently)."""

    def __init__(self, cfg: GPTConfig, rows: int, capacity: int, device=None, dtype=torch.float32):
        shape = (rows, cfg.n_kv_head, capacity, cfg.head_dim)
        # a tensor of its own per layer, not views of one block: a compiled step (decode_step.py) writes into
        # them in place, where views of one storage would make it copy the whole cache at every step
        self._k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]
        self._v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]
        self.capacity = capacity
        self._lengths = [0] * rows
        self._write: Callable | None = None  # how the forward being run writes a layer (see ``start``)
        self._plan: tuple[Callable, int | None] | None = None  # a prefill/decode: (its write, what start returns)
        self._uniform = False  # the forward being run appends to every row at one length

    @classmethod
    def for_model(cls, model, rows: int, capacity: int) -> KVCache:
        """A cache on the model's device, in its dtype."""
        p = model.tok_emb.weight
        return cls(model.cfg, rows, capacity, device=p.device, dtype=p.dtype)

    # ---- what callers read
    @property
    def num_rows(self) -> int:
        return len(self._lengths)

    @property
    def device(self) -> torch.device:
        return self._k[0].device

    @property
    def lengths(self) -> list[int]:
        """Positions each row holds (a copy)."""
        return list(self._lengths)

    @property
    def length(self) -> int:
        """Positions every row holds; a ValueError where rows differ."""
        return _shared_length(self._lengths)

    # ---- planning a forward (the default, without a plan: ``start``)
    def prefill(self, rows: list[int], lengths: list[int]) -> None:
        """The next forward writes prompts from position 0 into ``rows``, right-padded to its width; row
        ``rows[i]`` then holds ``lengths[i]`` positions (the pads past it are overwritten later)."""
        index = torch.tensor(rows, device=self.device)

        def write(K, V, k, v):  # nothing before position 0: the new keys are all a query sees
            t = k.size(2)
            K[index, :, :t] = k
            V[index, :, :t] = v
            return k, v

        for r, n in zip(rows, lengths):
            self._lengths[r] = n
        self._plan = (write, 0)

    def extend(self, rows: list[int], starts: list[int], lengths: list[int]) -> None:
        """The next forward continues rows ``rows``: row ``rows[i]`` already holds ``starts[i]`` positions (a
        cached prefix, an earlier chunk of its prompt) and takes ``lengths[i]`` new ones, right-padded to the
        forward's width (pads are not written). Its queries attend over the rows' keys up to the longest row's
        end: the caller masks each row to its own (``extend_mask``)."""
        index = torch.tensor(rows, device=self.device)
        ends = [s + n for s, n in zip(starts, lengths)]
        if max(ends) > self.capacity:
            raise ValueError(f"KV cache overflow: a row of {max(ends)} positions > capacity {self.capacity}")
        span = max(ends)

        def write(K, V, k, v):
            for i, (r, s, n) in enumerate(zip(rows, starts, lengths)):
                K[r, :, s:s + n] = k[i, :, :n]
                V[r, :, s:s + n] = v[i, :, :n]
            return K[:, :, :span].index_select(0, index), V[:, :, :span].index_select(0, index)

        for r, e in zip(rows, ends):
            self._lengths[r] = e
        self._plan = (write, None)

    @staticmethod
    def extend_mask(starts: list[int], lengths: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (rows, width) and the attention mask (rows, 1, width, span) of an ``extend`` forward (width:
        the longest of ``lengths``; span: the longest row's end): row i's query t sits at starts[i] + t and sees
        keys 0..starts[i] + t. A pad's position is held below the span (a learned position table ends at the
        context); its output is never read."""
        span = max(s + n for s, n in zip(starts, lengths))
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(max(lengths), device=device)[None]
        pos = pos.clamp(max=span - 1)
        mask = torch.arange(span, device=device)[None, None] <= pos[:, :, None]
        return pos, mask[:, None]

    def load(self, row: int, kv: torch.Tensor) -> None:
        """Row ``row`` holds ``kv`` (layers, 2, kv_heads, n, head_dim) as its first n positions (a cached
        prefix, prefix_cache.py) and nothing after them."""
        n = kv.size(3)
        if n > self.capacity:
            raise ValueError(f"KV cache overflow: a prefix of {n} positions > capacity {self.capacity}")
        for layer, (K, V) in enumerate(zip(self._k, self._v)):
            K[row, :, :n] = kv[layer, 0]
            V[row, :, :n] = kv[layer, 1]
        self._lengths[row] = n

    def read(self, row: int, a: int, b: int) -> torch.Tensor:
        """Row ``row``'s keys and values of positions a..b-1: (layers, 2, kv_heads, b - a, head_dim), a copy."""
        return torch.stack([torch.stack((K[row, :, a:b], V[row, :, a:b])) for K, V in zip(self._k, self._v)])

    def decode(self, rows: list[int]) -> torch.Tensor:
        """The next forward is one new position for each of rows 0..n-1 (n = max(rows) + 1), each written
        at its own length; only ``rows`` grow (the others ride along, for the caller to mask). Returns
        rows 0..n-1's lengths before the step, (n,) on the device: the new positions' places."""
        n = max(rows) + 1
        before = self._lengths[:n]
        span = max(before) + 1  # keys to attend over
        if span > self.capacity:
            raise ValueError(f"KV cache overflow: a row of {span - 1} positions is at capacity {self.capacity}")
        at = torch.tensor(before, device=self.device)
        # where row r's new key for head h goes in a layer flattened to (row*head*position, dim): one
        # index_copy_ per layer instead of a strided scatter
        _, H, S, _ = self._k[0].shape
        heads = torch.arange(H, device=at.device)
        flat = ((torch.arange(n, device=at.device)[:, None] * H + heads[None]) * S + at[:, None]).reshape(-1)

        def write(K, V, k, v):  # k: (n, heads, 1, dim)
            d = k.size(-1)
            K.view(-1, d).index_copy_(0, flat, k.reshape(-1, d))
            V.view(-1, d).index_copy_(0, flat, v.reshape(-1, d))
            return K[:n, :, :span], V[:n, :, :span]  # views: no copy

        for r in rows:
            self._lengths[r] += 1
        self._plan = (write, None)
        return at

    def advance(self, rows: list[int]) -> torch.Tensor:
        """For a step that writes keys itself (decode_step.py ``SlotStep``): rows ``rows`` grow by one position.
        Returns every row's place for its new key, (num_rows,) on the device: its length before the step
        (a row that does not grow — free, or half way through a chunked prefill — gets a key past what it
        holds, which its next write overwrites)."""
        grow = set(rows)
        if max(self._lengths[r] for r in rows) + 1 > self.capacity:
            raise ValueError(f"KV cache overflow: a row of {max(self._lengths[r] for r in rows)} positions is at "
                             f"capacity {self.capacity}")
        at = [min(n, self.capacity - 1) for n in self._lengths]
        for r in grow:
            self._lengths[r] += 1
        return torch.tensor(at, device=self.device)

    # ---- what the model calls
    def start(self, tokens: int) -> int | None:
        """A forward of ``tokens`` new positions per row begins: as planned, or else appended to every row
        at the length they share. Returns that length (0 for a prefill), None for a decode step (rows at
        different lengths: the caller passes positions and a mask)."""
        self._uniform = self._plan is None
        if self._plan is not None:
            (self._write, past), self._plan = self._plan, None
            if tokens > self.capacity:
                raise ValueError(f"KV cache overflow: {tokens} positions > capacity {self.capacity}")
            return past
        past = self.length
        if past + tokens > self.capacity:
            raise ValueError(f"KV cache overflow: {past}+{tokens} positions > capacity {self.capacity}")

        def write(K, V, k, v):
            end = past + k.size(2)
            K[:, :, past:end] = k
            V[:, :, past:end] = v
            return K[:, :, :end], V[:, :, :end]

        self._lengths = [n + tokens for n in self._lengths]
        self._write = write
        return past

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values of ``layer`` (rows, kv_heads, tokens, head_dim) -> the keys and
        values its queries attend over: each row's earlier ones, then these."""
        return self._write(self._k[layer], self._v[layer], k, v)

    # ---- rows
    def fork(self, rows: list[int]) -> None:
        """Row i continues row ``rows[i]`` (a prompt prefilled once for every row that asked for it)."""
        index = torch.tensor(rows, device=self.device)
        self._k = [t.index_select(0, index) for t in self._k]
        self._v = [t.index_select(0, index) for t in self._v]
        self._lengths = [self._lengths[r] for r in rows]

    def free(self, row: int) -> None:
        """``row`` holds nothing from now on; its next prefill overwrites what is left."""
        self._lengths[row] = 0

    @property
    def viewable(self) -> bool:
        """Whether ``view`` can split the forward being run by rows: an unplanned one (every row appends
        at the same length). The server's slot-wise prefill and decode run whole."""
        return self._uniform

    def view(self, rows: slice) -> _RowView:
        """Rows ``rows`` of the forward being run, whose appends write into this cache (a micro-batch of
        model/offload.py's block schedule)."""
        if not self.viewable:
            raise ValueError("only an unplanned forward (every row at one length) splits into row views")
        return _RowView(self, rows)

    # ---- a decode step that places keys itself (decode_step.py)
    def buffers(self, span: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer key and value buffers (rows, kv_heads, slots, head_dim), the filled positions first.
        ``span`` None: the cache's own (``capacity`` slots; what a step writes past ``length`` lands in
        the cache, which stays at its length). ``span`` given: zeroed copies of that many slots, for a
        step whose shapes never change; the cache is left as it is."""
        if span is None:
            return list(self._k), list(self._v)
        n = self.length
        ks, vs = [], []
        for K, V in zip(self._k, self._v):
            for bufs, src in ((ks, K), (vs, V)):
                buf = src.new_zeros(src.size(0), src.size(1), span, src.size(3))
                buf[:, :, :n] = src[:, :, :n]
                bufs.append(buf)
        return ks, vs


class _RowView:
    """Rows of a cache during one forward (``KVCache.view``): appends write the parent's rows."""

    def __init__(self, parent: KVCache, rows: slice):
        self._parent, self._rows = parent, rows

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, r = self._parent, self._rows
        return p._write(p._k[layer][r], p._v[layer][r], k, v)


class GradKVCache:
    """``KVCache``'s interface for a training forward: keys and values are kept as autograd values (a
    preallocated buffer written in place would route every gradient through one shared tensor), and a
    ``fork`` into groups repeats them as each layer next reads them, so autograd sums the copies'
    gradients. train/rollout.py's ``forward_answers`` runs a group's prompt once this way, its answers after."""

    viewable = False  # a training forward runs whole through a block schedule

    def __init__(self, rows: int):
        self._lengths = [0] * rows
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._forks: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}  # layer -> its pending fork

    @property
    def length(self) -> int:
        return _shared_length(self._lengths)

    def start(self, tokens: int) -> int:
        past = self.length
        self._lengths = [n + tokens for n in self._lengths]
        return past

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self._k:
            fork = self._forks.pop(layer, None) or (lambda t: t)
            k, v = torch.cat([fork(self._k[layer]), k], 2), torch.cat([fork(self._v[layer]), v], 2)
        self._k[layer], self._v[layer] = k, v
        return k, v

    def fork(self, rows: list[int]) -> None:
        """As ``KVCache.fork``; rows that repeat each row g times in place (a group) take one repeat."""
        if self._forks:
            raise ValueError("fork twice before a forward")
        n = len(self._lengths)
        g = len(rows) // n
        if rows == [r for r in range(n) for _ in range(g)]:
            def fork(t):
                return t.repeat_interleave(g, 0)
        else:
            def fork(t):
                return t.index_select(0, torch.tensor(rows, device=t.device))
        self._forks = dict.fromkeys(self._k, fork)
        self._lengths = [self._lengths[r] for r in rows]
