"""The one cache layer: an LRU bounded in entries and bytes, and the store watcher that tells when a cache is stale.

Composition (`tpv.compose.Composer`, prompts) and serving (`serve.batching.PromptServer`, prompts with their
keys/values) both keep built things keyed by what built them and must forget them when the store changes; this
module is the one implementation of both halves, so bounds, counters and staleness mean the same everywhere.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from pydantic import BaseModel

from tpv.store import VectorStore

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CacheInfo(BaseModel):
    """What a cache holds and has done, for /v1/health, metrics and tests."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


class BoundedLRU(Generic[K, V]):
    """Least-recently-used entries, at most `max_entries` of them and `max_bytes` in all (`size_of` each; without
    one, entries are only counted).

    An entry bigger than `max_bytes` is not kept (it is served once and rebuilt next time); bounds of 0 keep nothing.
    Thread-safe; `get` counts hits and misses, eviction by a bound counts evictions (clearing does not)."""

    def __init__(self, max_entries: int, max_bytes: int = sys.maxsize, size_of: Callable[[V], int] = lambda _: 0
                 ) -> None:
        _check_bounds(max_entries, max_bytes)
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._size_of = size_of
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            held = self._data.get(key)
            if held is None:
                self._misses += 1
                return None
            self._data.move_to_end(key)
            self._hits += 1
            return held[0]

    def put(self, key: K, value: V) -> None:
        size = self._size_of(value)
        with self._lock:
            if size > self.max_bytes or self.max_entries == 0:
                return
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, size)
            self._bytes += size
            self._evict()

    def drop(self, stale: Callable[[K], bool]) -> int:
        """Forget every entry whose key is `stale`; returns how many."""
        with self._lock:
            keys = [k for k in self._data if stale(k)]
            for k in keys:
                self._bytes -= self._data.pop(k)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def resize(self, max_entries: int, max_bytes: int) -> None:
        _check_bounds(max_entries, max_bytes)
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._evict()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(hits=self._hits, misses=self._misses, evictions=self._evictions, entries=len(self._data),
                             bytes=self._bytes, max_entries=self.max_entries, max_bytes=self.max_bytes)

    def __len__(self) -> int:
        return len(self._data)

    def _evict(self) -> None:  # under the lock
        while self._data and (len(self._data) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, size) = self._data.popitem(last=False)
            self._bytes -= size
            self._evictions += 1


def _check_bounds(max_entries: int, max_bytes: int) -> None:
    if max_entries < 0 or max_bytes < 0:
        raise ValueError(f"cache bounds must be >= 0, got max_entries={max_entries}, max_bytes={max_bytes}")


class StoreWatcher:
    """Cheap change detection: `store.version()` at most every `interval_s` seconds (0 = on every check); on a
    change `on_change(new_version)` runs once, so the caches built on the old version can be dropped."""

    def __init__(self, store: VectorStore, interval_s: float, on_change: Callable[[str], None]) -> None:
        if not interval_s >= 0:
            raise ValueError(f"reload interval must be >= 0 seconds, got {interval_s}")
        self.store = store
        self.interval_s = float(interval_s)
        self.on_change = on_change
        self._lock = threading.Lock()
        self.version = store.version()
        self.checked_at = time.monotonic()
        self.reloads = 0

    def check(self, force: bool = False) -> str:
        """The current store version (polling the store if the interval has passed, or when `force`)."""
        with self._lock:
            now = time.monotonic()
            if force or now - self.checked_at >= self.interval_s:
                self.checked_at = now
                version = self.store.version()
                if version != self.version:
                    self.version = version
                    self.reloads += 1
                    self.on_change(version)
            return self.version
