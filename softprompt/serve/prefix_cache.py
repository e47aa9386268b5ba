"""The prefix cache: the key/value states of each task's constant prefix (soft tokens and fixed text
before the first input field), computed once and reused by every request of that task.

Entries are keyed by content (the task's digest of model fingerprint and prompt bytes, and the prefix
ids), never by task name, so a task reloaded with new weights cannot be served stale states. The
least recently used entries are evicted beyond a bound in bytes; a bound of 0 keeps nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from ..splice import Prefix


def content_key(digest: str, prefix_ids: list[int]) -> str:
    """The cache key of a prefix: what it is made of, not whose it is."""
    return hashlib.sha256(f"{digest}|{prefix_ids}".encode()).hexdigest()


class PrefixCache:
    """Prefix key/value states by content key, least recently used evicted beyond `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Prefix] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], Prefix]) -> Prefix:
        """The entry under `key`, or `compute()`'s result, kept if it fits the bound."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key]
            self.misses += 1
        prefix = compute()  # outside the lock: other tasks' hits need not wait for a model pass
        if 0 < prefix.nbytes <= self.max_bytes:
            with self.lock:
                if key not in self.entries:
                    self.entries[key] = prefix
                    self.bytes += prefix.nbytes
                while self.bytes > self.max_bytes:
                    _, old = self.entries.popitem(last=False)
                    self.bytes -= old.nbytes
        return prefix
