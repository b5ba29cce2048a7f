"""The state store: stream keys -> slots, and the (capacity, state_size) buffer of states.

Keys are ints (Python or NumPy integers within int64) or strings; one engine holds one kind,
fixed by the first key it opens (so ``1`` and ``"1"`` can never be two different streams that a
caller confuses, and snapshots round-trip exactly). ``bool`` and floats are refused: ``True == 1``
and ``1.0 == 1`` would silently alias another stream. A str key holding a NUL character
(``"\x00"``) is refused everywhere: numpy's ``U`` arrays drop trailing NULs, so ``"a\x00"`` in a
list and ``"a"`` from an array would otherwise be two spellings of one stream (or two streams).

Every mutating method allocates before it changes anything (a ``MemoryError`` leaves the store
as it was), and :meth:`StateStore.slots` closes the keys it opened if anything at all goes wrong,
``KeyboardInterrupt`` included.

Slots of closed streams are reused. When no slot is free the buffer grows (doubling, but never
past ``limit`` when one is set): rows are copied into the new buffer, so every stream keeps its slot
and its state.

Missing input values: with ``memory`` > 0 (the engine's ``missing="last"`` policy) the store also
keeps ``last``, each slot's last observed input values. That row belongs to the stream like its
state: zeroed when the key is opened (never observed), copied by :meth:`StateStore.grow`, given
back by :meth:`StateStore.restore`; closing a key drops it with the slot.

Recency (for eviction): when the engine tracks it, ``recency`` is an ``OrderedDict`` of open keys
to the clock time they were last used, least recently used first. Keeping it up to date costs one
``move_to_end`` per key per call; finding the least recently used stream costs O(1).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import kernels as K

__all__ = ["StateStore", "normalize_key", "check_str_keys"]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def normalize_key(key, what="key"):
    """Return the canonical form of one key (a Python int or str), or raise TypeError/ValueError."""
    if isinstance(key, str):
        if "\x00" in key or not key.isascii():
            _check_str_key(key, what)
        return key
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"{what}: expected an int or str stream key, got bool {key!r}")
    if isinstance(key, (int, np.integer)):
        k = int(key)
        if not _I64_MIN <= k <= _I64_MAX:
            raise ValueError(f"{what}: expected an int within int64, got {k}")
        return k
    raise TypeError(f"{what}: expected an int or str stream key, got {type(key).__name__} {key!r}")


def _check_str_key(key, what):
    """Refuse a str key holding NUL or not encodable as UTF-8 (a lone surrogate): snapshots store
    keys as UTF-8, so such a stream could never be saved. Checked at the boundary, before a call
    evicts or opens anything."""
    if "\x00" in key:
        raise_nul(key, what)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what}: expected a str encodable as UTF-8, got {key!r} ({exc.reason} "
                         f"at index {exc.start})") from None


def check_str_keys(keys, what):
    """:func:`_check_str_key` for a list of str keys (e.g. from a numpy str array): one scan of
    their concatenation, then a search for the culprit only when it fails."""
    joined = "".join(keys)
    if "\x00" not in joined and joined.isascii():
        return
    try:
        joined.encode("utf-8")
        if "\x00" not in joined:
            return
    except UnicodeEncodeError:
        pass
    for i, k in enumerate(keys):
        _check_str_key(k, f"{what}[{i}]")


def raise_nul(key, what):
    """Refuse a str key holding NUL (see the module docstring: numpy strips trailing NULs)."""
    raise ValueError(f"{what}: expected a str key without NUL characters, got {key!r} (numpy str "
                     f"arrays drop trailing NULs, so such a key could alias another)")


_FIB = np.uint64(11400714819323198485)  # 2**64 / golden ratio: Fibonacci hashing


class IntSlotTable:
    """A compiled mirror of ``StateStore.slot_of`` for int keys: a batch of keys in an int array
    maps to slots in one kernel call instead of one dict lookup per key.

    Open addressing with linear probing over ``keys``/``vals`` (int64, power-of-two size, at most
    half full counting tombstones). Opened keys queue in ``pending`` and are inserted in one batch
    before the next lookup; a close deletes at once.
    """

    def __init__(self, items=()):
        items = list(items)
        self.pending = []
        self._build(items)

    def _build(self, items):
        """Rebuild from ``items``; everything is allocated before any attribute changes."""
        cap = 1024
        while cap < 4 * max(len(items), 1):
            cap *= 2
        bits = cap.bit_length() - 1
        keys = np.zeros(cap, np.int64)
        vals = np.full(cap, K.TAB_EMPTY, np.int64)
        if items:
            ks = np.fromiter((k for k, _ in items), np.int64, len(items))
            ss = np.fromiter((s for _, s in items), np.int64, len(items))
            hs = ((ks.view(np.uint64) * _FIB) >> np.uint64(64 - bits)).astype(np.int64)
            K.table_insert(keys, vals, ks, ss, hs)
        self.bits, self.keys, self.vals = bits, keys, vals
        self.used = len(items)  # live entries + tombstones

    def hash(self, keys):
        """Probe start for each key (int64 array): the top bits of key * 2**64/phi."""
        # uint64 array arithmetic wraps silently, which is the point here.
        return ((keys.view(np.uint64) * _FIB) >> np.uint64(64 - self.bits)).astype(np.int64)

    def flush(self, live):
        """Insert the pending (key, slot) pairs; ``live`` is the current number of int keys."""
        if not self.pending:
            return
        items = self.pending
        if 2 * (self.used + len(items)) > self.keys.shape[0]:
            self._build(list(live.items()))  # too full (or too many tombstones)
        else:
            ks = np.fromiter((k for k, _ in items), np.int64, len(items))
            ss = np.fromiter((s for _, s in items), np.int64, len(items))
            K.table_insert(self.keys, self.vals, ks, ss, self.hash(ks))
            self.used += len(items)
        self.pending = []  # only once they are in: a failure above keeps them queued

    def delete(self, key, live):
        self.flush(live)
        k = np.array([key], np.int64)
        K.table_delete(self.keys, self.vals, key, int(self.hash(k)[0]))

    def lookup(self, keys, live):
        """Slots of ``keys`` (int64 array); -1 for keys not open. Returns (slots, n_missing)."""
        self.flush(live)
        out = np.empty(keys.shape[0], np.int64)
        return out, K.table_lookup(self.keys, self.vals, keys, self.hash(keys), out)


class StateStore:
    """Key-to-slot map plus the state buffer.

    Attributes
    ----------
    states : (capacity, state_size) float32 or float64
        Row ``slot`` is the state of the stream in that slot; free rows hold garbage.
    mark : (capacity,) int64
        All zero between kernel calls (the kernels' duplicate-key scratch).
    recency : OrderedDict or None
        ``key -> time last used``, least recently used first; None when not tracked.
    limit : int or None
        The buffer never grows past this many rows (the engine's ``max_streams``).
    missing : str
        The engine's missing-value policy (``Engine(missing=...)``), kept with the store it
        shapes; the store itself only reads it through ``memory``.
    last : (capacity, memory) array of ``dtype``, or None
        Row ``slot`` holds the stream's last observed input values (0 where never observed);
        None unless ``memory`` > 0.
    """

    def __init__(self, state_size, dtype, capacity, track=False, limit=None, missing="refuse",
                 memory=0):
        self.state_size = int(state_size)
        self.dtype = np.dtype(dtype)
        self.states = np.zeros((capacity, max(self.state_size, 1)), self.dtype)
        self.mark = np.zeros(capacity, np.int64)
        self.slot_of: dict = {}
        self.key_of: list = [None] * capacity
        self.free: list = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self.key_kind = None  # int or str, fixed by the first key
        self.recency = OrderedDict() if track else None
        self.limit = limit
        self.itable = None  # IntSlotTable, built on the first int-array lookup
        self.missing = missing
        self.last = np.zeros((capacity, memory), self.dtype) if memory else None

    @property
    def capacity(self):
        return self.states.shape[0]

    def __len__(self):
        return len(self.slot_of)

    def check_kind(self, keys, what="keys"):
        """Refuse keys whose kind (int/str) differs from each other or from the engine's."""
        kind = self.key_kind
        for k in keys:
            t = str if isinstance(k, str) else int
            if kind is None:
                kind = t
            elif t is not kind:
                raise TypeError(
                    f"{what}: expected all keys to be {kind.__name__}s (an engine holds one kind "
                    f"of key), got {t.__name__} {k!r}"
                )

    def grow(self, needed):
        """Make room for ``needed`` more streams. Every new buffer and list is built first and
        assigned last, so a MemoryError leaves the store as it was."""
        cap = self.capacity
        new_cap = max(2 * cap, cap + needed, 16)
        if self.limit is not None:  # the engine never holds more than `limit` streams
            new_cap = min(new_cap, max(self.limit, cap + needed))
        states = np.zeros((new_cap, self.states.shape[1]), self.dtype)
        states[:cap] = self.states
        mark = np.zeros(new_cap, np.int64)
        last = None
        if self.last is not None:
            last = np.zeros((new_cap, self.last.shape[1]), self.dtype)
            last[:cap] = self.last
        key_of = self.key_of + [None] * (new_cap - cap)
        free = list(range(new_cap - 1, cap - 1, -1)) + self.free
        self.states, self.mark, self.key_of, self.free = states, mark, key_of, free
        if last is not None:
            self.last = last

    def reserve(self, count):
        """Grow now if fewer than ``count`` slots are free (allocate before opening)."""
        if len(self.free) < count:
            self.grow(count - len(self.free))

    def open(self, key):
        """Give ``key`` (canonical, not yet open) a zeroed slot and return it.

        A str key must be encodable as UTF-8 (a lone surrogate is not): snapshots store keys in
        UTF-8, and a stream that could not be saved is refused here, when it is opened.
        """
        if isinstance(key, str) and ("\x00" in key or not key.isascii()):
            _check_str_key(key, "key")
        if not self.free:
            self.grow(1)
        if self.itable is not None and type(key) is int:
            self.itable.pending.append((key, -1))  # room in the queue first; slot set below
        slot = self.free.pop()
        self.states[slot] = 0
        if self.last is not None:
            self.last[slot] = 0
        self.slot_of[key] = slot
        self.key_of[slot] = key
        if self.key_kind is None:
            self.key_kind = str if isinstance(key, str) else int
        if self.itable is not None and type(key) is int:
            self.itable.pending[-1] = (key, slot)
        if self.recency is not None:
            # Listed at once (a placeholder time the caller's touch replaces), so keys() and
            # len() never disagree, even while a call that opened it is still running.
            self.recency[key] = -np.inf
        return slot

    def close(self, key):
        slot = self.slot_of[key]
        if self.itable is not None and len(self.slot_of) > 1:
            # First, while the key is still open: the only step here that may allocate
            # (flushing queued keys) runs before anything changes.
            self.itable.delete(key, self.slot_of)
        self.free.append(slot)
        del self.slot_of[key]
        if self.recency is not None:
            self.recency.pop(key, None)
        self.key_of[slot] = None
        if not self.slot_of:
            self.key_kind = None
            self.itable = None
        return slot

    def slots_array(self, keys):
        """As :meth:`slots` for an int64 array of keys (an int-key engine, or an empty one):
        open keys map in one kernel call; only a batch with new keys takes the general path."""
        if self.key_kind is int:
            if self.itable is None:
                self.itable = IntSlotTable(self.slot_of.items())
            out, missing = self.itable.lookup(keys, self.slot_of)
            if missing == 0:
                return out, []
        return self.slots(keys.tolist())

    def slots(self, keys):
        """Slots of canonical ``keys``, opening unknown ones. Returns (slots, newly opened keys)."""
        slot_of = self.slot_of
        # Common case, every key already open: one C-level pass instead of a Python loop.
        found = list(map(slot_of.get, keys))
        if None not in found:
            return np.array(found, np.int64), []
        out = np.empty(len(keys), np.int64)
        self.reserve(len({k for k, s in zip(keys, found) if s is None}))  # allocate, then open
        opened = []
        try:
            for i, k in enumerate(keys):
                s = slot_of.get(k)
                if s is None:
                    opened.append(k)  # listed first, so that rollback finds it whatever fails
                    s = self.open(k)
                out[i] = s
        except BaseException:  # MemoryError and KeyboardInterrupt too: all or nothing
            self.rollback(opened)
            raise
        return out, opened

    def touch(self, keys, now):
        """Mark ``keys`` (open, canonical) as used at ``now``, in order: the last is the most recent."""
        rec = self.recency
        for k in keys:
            rec[k] = now
            rec.move_to_end(k)

    def lru(self, count, exclude):
        """Up to ``count`` least recently used keys not in ``exclude``, oldest first, with their times."""
        out = []
        if count <= 0:
            return out
        for k, t in self.recency.items():
            if k not in exclude:
                out.append((k, t))
                if len(out) == count:
                    break
        return out

    def idle(self, before):
        """Keys last used at or before ``before``, oldest first, with their times."""
        out = []
        for k, t in self.recency.items():
            if t > before:
                break
            out.append((k, t))
        return out

    def oldest_time(self):
        """Time of the least recently used key, or None when no stream is open."""
        for t in self.recency.values():
            return t
        return None

    def restore(self, key, state, t, last=None):
        """Reopen ``key`` (just closed) with ``state`` (and ``last``, its last observed values,
        when the store keeps them) as the least recently used stream."""
        slot = self.open(key)
        self.states[slot, :state.shape[0]] = state
        if last is not None:
            self.last[slot] = last
        self.recency[key] = t
        self.recency.move_to_end(key, last=False)
        return slot

    def rollback(self, opened):
        """Close keys opened by a call that then failed, so the failed call changes nothing
        (a listed key that did not get opened is skipped)."""
        for k in opened:
            if k in self.slot_of:
                self.close(k)
