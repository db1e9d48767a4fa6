"""The KV block manager: which block of the paged cache (core/cache.py PagedKVCache) holds what, as
Python numbers. It never touches a tensor; the scheduler asks it for blocks and gives them back.

Prefix caching: a full block of prompt tokens is keyed by a digest of its tokens and of every token
before it (the digest of the block before it, chained), so two requests whose prompts begin alike
(a shared system prompt, the earlier turns of a chat) reuse the same blocks: the second one's
prefill starts after them. A block in no request's table that still holds a keyed prefix stays
findable until the pool needs it back; the least recently used goes first.

    blocks = BlockManager(num_blocks=1024, block_size=16)
    hits = blocks.lookup(prompt)             # the keyed blocks the prompt begins with, in order
    blocks.take(hits)                        # held by one more request
    new = blocks.allocate(3)                 # or None when there are not 3 to give
    blocks.register(table, prompt, n_full)   # key the first n_full full blocks of a prompt
    blocks.release(table)                    # a finished or preempted request's blocks
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free = list(range(num_blocks - 1, -1, -1))  # never used or unkeyed: popped from the end (low first)
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}  # block -> its prefix digest
        self.block_of: dict[bytes, int] = {}  # prefix digest -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # keyed blocks no request holds, oldest first

    # ------------------------------------------------------------------ counts
    @property
    def available(self) -> int:
        """Blocks allocate() can give now (free, or keyed and held by nobody)."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return self.num_blocks - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ prefixes
    def digests(self, tokens: list[int], n_blocks: int) -> list[bytes]:
        """The chained digest of each of the first n_blocks full blocks of `tokens`."""
        out, prev, bs = [], b"", self.block_size
        for i in range(n_blocks):
            prev = hashlib.blake2b(prev + np.asarray(tokens[i * bs:(i + 1) * bs], dtype=np.int64).tobytes(),
                                   digest_size=16).digest()
            out.append(prev)
        return out

    def lookup(self, prompt: list[int], salt: bytes = b"") -> list[int]:
        """The keyed blocks `prompt` begins with (at most every full block but the one holding its
        last token: that token's logits must be computed). salt keys what else the keys depend on
        (a LoRA adapter)."""
        if not self.prefix_caching:
            return []
        n = (len(prompt) - 1) // self.block_size
        found = []
        for d in self.digests(prompt, n):
            b = self.block_of.get(salt + d)
            if b is None:
                break
            found.append(b)
        return found

    def register(self, table: list[int], prompt: list[int], n_full: int, salt: bytes = b"") -> None:
        """Key the first n_full blocks of `table`, full of `prompt`'s tokens (a digest already kept by
        another block stays with that one)."""
        if not self.prefix_caching:
            return
        for b, d in zip(table[:n_full], self.digests(prompt, n_full)):
            d = salt + d
            if b not in self.key_of and d not in self.block_of:
                self.key_of[b], self.block_of[d] = d, b

    def reset(self) -> None:
        """Forget every key (POST /reset_prefix_cache): held blocks stay with their requests."""
        for b in self.evictable:
            self.free.append(b)
        self.evictable.clear()
        self.key_of.clear()
        self.block_of.clear()

    # ------------------------------------------------------------------ holding
    def take(self, blocks: list[int]) -> None:
        """One more request holds these (keyed) blocks."""
        for b in blocks:
            if self.refs[b] == 0:
                self.evictable.pop(b, None)
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for one request, or None (nothing taken) when fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:  # the least recently used keyed block loses its key
                b, _ = self.evictable.popitem(last=False)
                del self.block_of[self.key_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, table: list[int]) -> None:
        """A request lets its blocks go, last first: its tail is what is reused least."""
        for b in reversed(table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
