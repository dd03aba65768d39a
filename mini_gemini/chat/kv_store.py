"""The one place KV caches are kept between answers: per conversation, bounded, reused by common prefix.

A cache is described by the *units* of the sequence it holds: ("t", token id) for a text position and
(image key, j) for the j-th visual token of an image (`cache_units`). A new prompt continues a cache by the
longest common prefix of the two unit lists, so a follow-up turn prefills only its new tokens; results never
depend on the cache (it only saves recomputing the same keys and values).

Caches are handed out, never shared: `take` removes the owner's cache from the store (a run that fails cannot
leave a half-written cache for anybody), `put` gives it back once the answer is written. The least recently
used caches beyond `capacity` are dropped. A cache may also be kept without an owner (`owner=None`): requests
of a stateless API then continue whichever kept cache shares the longest prefix with their prompt.

The prompt prefix every conversation starts with (the template's system prompt, learnt as the common prefix
of two prompts prefilled from scratch) is kept once and copied into new caches (as vLLM's prefix caching does).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..constants import IMAGE_TOKEN_INDEX

SHARED_MIN = 16        # shortest prompt prefix worth sharing between conversations


def cache_units(ids, images) -> list:
    """The prompt as cache units: ("t", id) for text, (image key, j) for the image's j-th visual token.

    Args:
        ids: token ids with one IMAGE_TOKEN_INDEX slot per image.
        images: objects with `key` (content hash) and `tokens` ((T, D) visual tokens), one per slot, in order.
    """
    out, k = [], 0
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            im = images[k]
            k += 1
            out.extend((im.key, j) for j in range(im.tokens.shape[0]))
        else:
            out.append(("t", i))
    return out


def common_prefix(a, b, limit: int) -> int:
    """Length of the common prefix of sequences `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def rollback(cache: DynamicCache, length: int) -> None:
    """Cut every layer of `cache` back to `length` positions (after a failed step).

    Raises:
        RuntimeError: a layer that cannot be cut (e.g. a sliding-window layer that already dropped positions).
    """
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            if type(layer) is not DynamicLayer:
                raise RuntimeError("this cache cannot be rolled back")
            layer.crop(-extra)


class CacheOwner:
    """Whose cache it is: one conversation for one life (a session that is cleared or closed gets a new owner,
    so that an answer still running for the old one cannot hand back a cache nobody will ask for)."""
    __slots__ = ("name", "closed")

    def __init__(self, name: str = ""):
        self.name, self.closed = name, False

    def __repr__(self):
        return f"CacheOwner({self.name!r}{', closed' if self.closed else ''})"


class KVStore:
    """Caches kept between answers, the least recently used dropped beyond the bounds (each cache costs
    2 x layers x positions x kv-width of memory).

    Args:
        capacity: caches of conversations (owners) kept at most; 0 keeps none.
        anonymous: caches of requests without an owner (a stateless API) kept at most.
    """

    def __init__(self, capacity: int, anonymous: int = 0):
        self.capacity, self.anonymous = max(0, int(capacity)), max(0, int(anonymous))
        self._entries: OrderedDict[object, tuple[DynamicCache, list]] = OrderedDict()
        self._lock = threading.Lock()
        self._shared = None            # (units, [(keys, values) per layer]) of the prefix all prompts share
        self._last_fresh: list = []    # units of the last prompt prefilled from scratch

    # ---- what is held ------------------------------------------------------------------------------------
    def holders(self) -> list[str]:
        """Names of the owners whose cache is kept, least recently used first ("" for anonymous ones)."""
        with self._lock:
            return [k.name if isinstance(k, CacheOwner) else "" for k in self._entries]

    def holds(self, owner: CacheOwner) -> bool:
        with self._lock:
            return owner in self._entries

    # ---- handing caches out and back ----------------------------------------------------------------------
    def take(self, owner: CacheOwner | None, units: list, limit: int, config, share: bool = True
             ) -> tuple[DynamicCache, int]:
        """A cache to write the sequence `units` into, and how many of its first positions it holds already.

        The owner's kept cache (or, without an owner, the anonymous one with the longest common prefix) is
        removed from the store and cropped to the longest common prefix with `units` (at most `limit`, so that
        at least one position is left to compute); without one, a new cache starts from the shared prefix
        (when `share` and it matches) or empty.

        Args:
            owner: the conversation, or None (stateless request).
            units: the prompt's cache units (`cache_units`).
            limit: most positions that may be reused (the prompt's length - 1).
            config: the LLM's config (for a new `DynamicCache`).
            share: whether a new cache may start from the shared prefix.
        """
        cache, held = self._pop(owner, units)
        reuse = common_prefix(held, units, limit) if cache is not None else 0
        if reuse and cache.get_seq_length() > reuse:
            try:
                cache.crop(reuse - cache.get_seq_length())
            except Exception:  # noqa: BLE001 - e.g. a sliding window that cannot roll back: start afresh
                reuse = 0
        if reuse and cache.get_seq_length() == reuse:
            return cache, reuse
        cache = DynamicCache(config=config)
        shared = self._shared if share else None
        n = common_prefix(shared[0], units, limit) if shared is not None else 0
        if n >= SHARED_MIN:  # e.g. the template's system prompt, computed once for everybody
            for layer, (k, v) in enumerate(shared[1]):
                cache.update(k[:, :, :n], v[:, :, :n], layer)
            return cache, n
        return cache, 0

    def put(self, owner: CacheOwner | None, cache: DynamicCache, prompt_units: list, new_ids: list[int]) -> None:
        """Keep `cache` after an answer: it holds the prompt and every new token but the last (never fed back).
        A closed owner's cache is dropped."""
        if (self.capacity if owner is not None else self.anonymous) == 0 or (owner is not None and owner.closed):
            return
        held = (prompt_units + [("t", t) for t in new_ids])[:cache.get_seq_length()]
        key = owner if owner is not None else object()
        with self._lock:
            if owner is not None and owner.closed:
                return
            self._entries.pop(key, None)
            self._entries[key] = (cache, held)
            for named, bound in ((True, self.capacity), (False, self.anonymous)):
                keys = [k for k in self._entries if isinstance(k, CacheOwner) == named]
                for k in keys[:max(0, len(keys) - bound)]:  # least recently used first
                    del self._entries[k]

    def drop(self, owner: CacheOwner) -> None:
        """Forget the owner's cache and refuse any it hands back later (the conversation ended or was cleared)."""
        with self._lock:
            owner.closed = True
            self._entries.pop(owner, None)

    def _pop(self, owner, units) -> tuple[DynamicCache | None, list]:
        with self._lock:
            if owner is not None:
                return self._entries.pop(owner, (None, []))
            best, best_n = None, 0
            for k, (_, held) in self._entries.items():
                if not isinstance(k, CacheOwner):
                    n = common_prefix(held, units, len(units))
                    if n > best_n:
                        best, best_n = k, n
            return self._entries.pop(best) if best is not None else (None, [])

    # ---- the prefix every conversation shares ---------------------------------------------------------------
    def learn_prefix(self, units: list, cache: DynamicCache, prefilled: int) -> None:
        """After a prompt was prefilled from scratch: the prefix it shares with the previous such prompt (at
        least SHARED_MIN text positions: the system prompt, say) becomes the shared prefix, its keys and values
        copied. `prefilled`: positions of `units` the cache holds."""
        n = common_prefix(self._last_fresh, units, prefilled)
        self._last_fresh = units
        n = next((i for i in range(n) if units[i][0] != "t"), n)  # text only: images are per conversation
        shared = self._shared
        if n < SHARED_MIN or (shared is not None and common_prefix(shared[0], units, n) >= n):
            return
        layers = cache.layers
        if not all(type(layer) is DynamicLayer and layer.get_seq_length() >= n for layer in layers):
            return  # e.g. sliding-window layers: not shared
        self._shared = (units[:n], [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone())
                                    for layer in layers])
