"""Automatic prefix caching, as vLLM V1 does it and as the sim accounts for it.

A prompt's token ids are cut into blocks of ``BLOCK`` (16) tokens; each full
block is named by a hash chained over every block before it, so a block
matches only where the whole prefix up to it matches. A sequence that
starts looks up its leading blocks; those found are not prefilled again (at
least the prompt's last token always is, as in vLLM). A sequence holds its
blocks while it runs; when it ends its blocks are kept, free, in an LRU, its
last blocks first in line for eviction, and reused by any later prompt that
starts the same way.

The sim's simplification: a running sequence's KV counts all its tokens,
shared blocks included (vLLM counts a shared block once), and free cached
blocks are evicted, oldest first, so that they never take room the running
sequences need (``trim``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK = 16


def block_hashes(token_ids: Sequence[int]) -> tuple[int, ...]:
    """The chained hash of each full block of ``token_ids``."""
    hashes = []
    parent = 0
    for start in range(0, len(token_ids) - BLOCK + 1, BLOCK):
        parent = hash((parent, tuple(token_ids[start:start + BLOCK])))
        hashes.append(parent)
    return tuple(hashes)


class PrefixCache:
    """The blocks the engine holds: in use (with how many sequences hold each)
    or free in an LRU, and vLLM's counters of lookups and hits."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict()
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found

    @property
    def free_tokens(self) -> int:
        return BLOCK * len(self.free)

    def cached_tokens(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """Tokens of a prompt found cached: its leading blocks, less its last token."""
        found = 0
        for block in blocks:
            if block not in self.held and block not in self.free:
                break
            found += 1
        return min(found, (prompt_tokens - 1) // BLOCK) * BLOCK

    def count(self, prompt_tokens: int, hit: int) -> None:
        """A lookup made for a sequence that starts."""
        self.queries += prompt_tokens
        self.hits += hit

    def take(self, blocks: Sequence[int]) -> None:
        """A running sequence now holds ``blocks`` (out of the free LRU)."""
        for block in blocks:
            self.free.pop(block, None)
            self.held[block] = self.held.get(block, 0) + 1

    def give_back(self, blocks: Sequence[int]) -> None:
        """A sequence let go of ``blocks``: those nobody holds become free,
        its last blocks nearest eviction."""
        for block in reversed(blocks):
            left = self.held[block] - 1
            if left:
                self.held[block] = left
            else:
                # Appended newest: a sequence's first block last, so evicted last.
                del self.held[block]
                self.free[block] = None

    def trim(self, room_tokens: int) -> None:
        """Evict free blocks, least recently used first, until they fit in ``room_tokens``."""
        while self.free and self.free_tokens > room_tokens:
            self.free.popitem(last=False)

    def clear(self) -> None:
        self.held.clear()
        self.free.clear()
