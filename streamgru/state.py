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

Slots of closed streams are reused. When no slot is free the buffers grow (doubling, but never
past ``limit`` when one is set) and every stream keeps its slot and its state. The per-slot arrays
live in anonymous memory maps: untouched rows commit no memory, and growing moves the mapping
instead of copying it, so growth never holds two copies of the states (see :class:`SlotBuffer`).

Memory per open stream besides its state (docs/scaling.md has the measurements): int keys live in
an :class:`IntSlotTable` (32-48 bytes), str keys in a dict (the key object, a slot object and the
entry: ~130 bytes for a 13-character key); each slot also has a ``mark`` (8 bytes).

Missing input values: with ``memory`` > 0 (the engine's ``missing="last"`` policy) the store also
keeps ``last``, each slot's last observed input values, one more per-slot buffer. That row belongs
to the stream like its state: zeroed when the key is opened (never observed), kept by
:meth:`StateStore.grow`, given back by :meth:`StateStore.restore`; closing a key drops it with the
slot.

Recency (for eviction): when the engine tracks it, ``recency`` is an ``OrderedDict`` of open keys
to the clock time they were last used, least recently used first. Keeping it up to date costs one
``move_to_end`` per key per call; finding the least recently used stream costs O(1).
"""

from __future__ import annotations

import errno
import mmap
import sys
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from . import kernels as K

__all__ = ["StateStore", "normalize_key", "normalize_keys", "check_kind", "check_str_keys"]

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


def normalize_keys(keys, kind=None, what="keys"):
    """Validate a batch of stream keys (the one check ``Engine`` and ``ShardedEngine`` share).

    Parameters
    ----------
    keys : sequence of int or str, or 1-D integer or str array
    kind : {int, str, None}
        The kind of key the engine already holds (None: the batch's first key decides).
    what : str
        The argument's name, for error messages.

    Returns
    -------
    keys : numpy.ndarray of int64 or list
        An integer array comes back as an int64 array (no per-key Python objects: the caller
        chooses); anything else as a list of canonical keys (:func:`normalize_key`).
    kind : {int, str, None}
        The kind of these keys (``kind`` if given; None for an empty batch and no ``kind``).

    Raises
    ------
    TypeError
        Not a sequence of keys, a key that is neither int nor str (bools and floats included),
        or keys of mixed kinds or of another kind than ``kind``.
    ValueError
        A multi-dimensional array, an int outside int64, a str key with NUL or not encodable as
        UTF-8.

    Examples
    --------
    >>> normalize_keys(["a", "b"])
    (['a', 'b'], <class 'str'>)
    >>> normalize_keys([1, "a"])
    Traceback (most recent call last):
    ...
    TypeError: keys: expected all keys to be ints (an engine holds one kind of key), got str 'a'
    """
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise ValueError(f"{what}: expected a 1-D sequence of keys, got an array of "
                             f"shape {keys.shape}")
        if keys.dtype.kind not in "iuU" or keys.dtype.kind == "b":
            raise TypeError(f"{what}: expected integer or str keys, got an array of dtype "
                            f"{keys.dtype}")
        if keys.dtype.kind == "u" and keys.size and keys.max() > _I64_MAX:
            raise ValueError(f"{what}: expected keys within int64, got {keys.max()}")
        if keys.dtype.kind == "U":
            ks = keys.tolist()
            check_str_keys(ks, what)  # NULs (trailing ones are gone already), surrogates
        else:
            ks = keys.astype(np.int64, copy=False)
        # The array's dtype says every key's kind: check one, not each.
        return ks, check_kind(ks[:1].tolist() if isinstance(ks, np.ndarray) else ks[:1], kind, what)
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(f"{what}: expected a sequence of int or str keys, got "
                        f"{type(keys).__name__}; wrap a single key in a list: [key]")
    ks = [normalize_key(k, f"{what}[{i}]") for i, k in enumerate(keys)]
    return ks, check_kind(ks, kind, what)


def check_kind(keys, kind=None, what="keys"):
    """Refuse canonical keys whose kind (int/str) differs from each other or from ``kind`` (the
    kind the engine holds; None: the first key decides). Returns the kind (None if neither
    ``kind`` nor a key gave one)."""
    for k in keys:
        t = str if isinstance(k, str) else int
        if kind is None:
            kind = t
        elif t is not kind:
            raise TypeError(
                f"{what}: expected all keys to be {kind.__name__}s (an engine holds one kind "
                f"of key), got {t.__name__} {k!r}"
            )
    return kind


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


def _anonymous(nbytes):
    """A private anonymous memory map of ``nbytes`` (zero pages, committed only when written)."""
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise MemoryError(f"cannot map {nbytes} bytes for stream states") from None
        raise
    _huge_pages(m)
    return m


def _huge_pages(m):
    """Ask for transparent huge pages, as numpy does for its large arrays: the kernels gather
    rows scattered over the whole buffer, and with 4 KiB pages nearly every row costs a TLB miss
    (a step of 4,096 of 100,000 streams measured ~20% slower without)."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # not supported by this kernel: 4 KiB pages it is
            pass


class SlotBuffer:
    """One per-slot array, ``(capacity, width)`` (``width`` 0: ``(capacity,)``), kept in a private
    anonymous memory map.

    Rows never written cost no memory (their pages are not committed), and :meth:`resize` moves
    the mapping (``mremap``) rather than copying it, so growing never needs the old and the new
    buffer at once. Where the mapping cannot move (an array over it is still alive somewhere, or
    the system has no ``mremap``), it is copied into a new one, as a numpy buffer would be.
    """

    def __init__(self, capacity, width, dtype):
        self.width, self.dtype = int(width), np.dtype(dtype)
        self.capacity = int(capacity)
        self._map = _anonymous(self._nbytes(self.capacity))

    def _nbytes(self, capacity):
        page = mmap.PAGESIZE
        nbytes = capacity * max(self.width, 1) * self.dtype.itemsize
        return max(page, -(-nbytes // page) * page)

    def array(self):
        """A numpy view of the buffer: drop every view before :meth:`resize` (mremap cannot move
        a mapping that is exported)."""
        a = np.frombuffer(self._map, self.dtype, self.capacity * max(self.width, 1))
        return a.reshape(self.capacity, self.width) if self.width else a

    def resize(self, capacity, used):
        """Make room for ``capacity`` rows, keeping the first ``used``; new rows read as zero.

        Returns a function that undoes the resize (it allocates nothing). A MemoryError leaves
        the buffer as it was.
        """
        old_map, old_cap = self._map, self.capacity
        nbytes = self._nbytes(capacity)
        try:
            self._map.resize(nbytes)  # mremap: page tables move, no byte is copied
            _huge_pages(self._map)  # the advice covers the mapping as it was: renew it
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise MemoryError(f"cannot map {nbytes} bytes for stream states") from None
            moved = False
        except (BufferError, SystemError, TypeError):  # still exported; no mremap here
            moved = False
        else:
            moved = True
        if not moved:
            new = _anonymous(nbytes)
            n = min(used * max(self.width, 1) * self.dtype.itemsize, nbytes)
            np.frombuffer(new, np.uint8, n)[:] = np.frombuffer(old_map, np.uint8, n)
            self._map = new
        self.capacity = int(capacity)

        def undo():
            if moved:
                self._map.resize(self._nbytes(old_cap))  # shrinking in place: never fails
            else:
                self._map = old_map
            self.capacity = old_cap

        return undo


_SIZE_MAX = 2**31 - 1  # largest table (a prime below this): (size - 1)**2 fits an int64
_PHI = 0.6180339887498949  # 1/golden ratio
HOT_MAX = 4096  # keys in IntSlotTable.hot (~100 bytes each)
# Fewer keys than this are looked up and inserted by Python probes of the table rather than a
# kernel call (~0.4 us a key against ~1.5 us a call), so a process whose first event carries an
# int key compiles no table kernel before its first answer; batches take the kernels (16 keys
# by Python probes made a 16-row step at H=128 15% slower). Deletes are always Python probes.
PY_PROBE_MAX = 4


def _is_prime(n):
    """Deterministic Miller-Rabin for n < 3.4e14 (bases 2, 3, 5, 7, 11, 13, 17)."""
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_prime(n):
    while not _is_prime(n):
        n += 1
    return n


class IntSlotTable:
    """The key -> slot map of an int-key store: open addressing with linear probing in one int64
    array (see the table kernels in :mod:`streamgru.kernels`), 16 bytes a cell, at most half full
    counting tombstones and rebuilt to a third full when that would be exceeded: 32-48 bytes per
    open stream, against ~100 for a dict of Python ints (entry, key object, slot object).

    It reads like the dict it replaces (``get``, ``in``, ``[]``, ``len``, iteration; keys iterate
    in slot order). One key is found in Python (the same home cell as the kernels, no kernel
    call); an array of keys in one kernel call (:meth:`lookup`).
    """

    def __init__(self, expected=0):
        self.live = 0  # open keys
        self.used = 0  # open keys + tombstones
        # key -> slot of keys found one at a time lately (at most HOT_MAX): a dict lookup
        # (C-level, ~40 ns) for the one-event fast path where the table probe in Python costs
        # ~3x that. Cleared when full; a key leaves it when it is deleted.
        self.hot = {}
        self._alloc(self._size_for(expected))

    @staticmethod
    def _size_for(count):
        size = _next_prime(max(3 * count, 1021))
        if size > _SIZE_MAX:
            size = _next_prime(2 * count + 1)
            if size > _SIZE_MAX:
                raise MemoryError(f"an int-key engine holds at most {(_SIZE_MAX - 1) // 2} "
                                  f"streams, got {count}")
        return size

    def _alloc(self, size):
        tab = np.zeros(2 * size, np.int64)
        tab[1::2] = K.TAB_EMPTY
        # Home of key k: (k mod size) * mult mod size with mult/size ~ 1/phi, i.e. Fibonacci
        # hashing modulo a prime: consecutive keys land ~0.38 of the table apart and never
        # bunch up (a multiplier whose ratio to the size is near a simple fraction would stack
        # consecutive keys a few cells apart: probe chains of hundreds measured).
        self.mult = int(size * _PHI)
        self.tab, self.size, self._cells, self._mv = tab, size, 2 * size, memoryview(tab)

    def _index(self, key):
        """Index in ``tab`` of int ``key``'s cell, or -1: the table kernels' probe sequence, in
        Python."""
        t = self._mv
        j = key * self.mult % self.size * 2  # the kernels' home cell, in exact integers
        while True:
            s = t[j + 1]
            if s == K.TAB_EMPTY:
                return -1
            if t[j] == key and s >= 0:
                return j
            j += 2
            if j == self._cells:
                j = 0

    def _find(self, key):
        """Slot of int ``key``, or -1."""
        j = self._index(key)
        return -1 if j < 0 else self._mv[j + 1]

    def get(self, key, default=None):
        if type(key) is not int:  # a str (or np.int64) never matches: no arithmetic on it
            return default
        s = self._find(key)
        if s < 0:
            return default
        hot = self.hot
        if len(hot) >= HOT_MAX:
            hot.clear()
        hot[key] = s
        return s

    def __contains__(self, key):
        return self.get(key) is not None

    def __getitem__(self, key):
        s = self.get(key)
        if s is None:
            raise KeyError(key)
        return s

    def __len__(self):
        return self.live

    def _live(self):
        """(keys, slots) of the open keys, in slot order."""
        cells = self.tab.reshape(-1, 2)
        cells = cells[cells[:, 1] >= 0]
        cells = cells[np.argsort(cells[:, 1], kind="stable")]
        return cells[:, 0], cells[:, 1]

    def __iter__(self):
        return iter(self._live()[0].tolist())

    def items(self):
        ks, ss = self._live()
        return list(zip(ks.tolist(), ss.tolist()))

    def values(self):
        return self._live()[1].tolist()

    def lookup(self, keys):
        """Slots of ``keys`` (int64 array); -1 for keys not open. Returns (slots, n_missing)."""
        if keys.shape[0] < PY_PROBE_MAX:
            out = np.array([self._find(k) for k in keys.tolist()], np.int64)
            return out, int(np.count_nonzero(out < 0))
        out = np.empty(keys.shape[0], np.int64)
        return out, K.table_lookup(self.tab, self.mult, keys, out)

    def make_room(self, count):
        """Before :meth:`insert` of ``count`` keys: rebuild (allocating, changing nothing on
        failure) if they would fill more than half the table."""
        if 2 * (self.used + count) > self.size:
            size = self._size_for(self.live + count)
            ks, ss = self._live()
            old = self.tab, self.size, self._cells, self._mv, self.mult
            self._alloc(size)
            try:
                self._put(ks, ss)
            except BaseException:
                self.tab, self.size, self._cells, self._mv, self.mult = old
                raise
            self.used = self.live

    def insert(self, keys, slots):
        """Add ``keys`` (int64 array, none of them open, no duplicates) at ``slots``; call
        :meth:`make_room` first."""
        self._put(keys, slots)
        self.live += keys.shape[0]
        self.used += keys.shape[0]

    def _put(self, keys, slots):
        """Write keys[i] -> slots[i] into free cells: the kernel for many keys, Python probes for
        few (the same cells either way)."""
        if keys.shape[0] >= PY_PROBE_MAX:
            K.table_insert(self.tab, self.mult, keys, slots)
            return
        t, size, mult, cells = self._mv, self.size, self.mult, self._cells
        for key, slot in zip(keys.tolist(), slots.tolist()):
            j = key * mult % size * 2
            while t[j + 1] >= 0:  # the first empty or deleted cell (as table_insert)
                j += 2
                if j == cells:
                    j = 0
            t[j] = key
            t[j + 1] = slot

    def delete(self, key):
        j = self._index(key)
        if j >= 0:
            self._mv[j + 1] = K.TAB_TOMB  # a tombstone: later keys' probes pass over it
            self.live -= 1
        self.hot.pop(key, None)


class StateStore:
    """Key-to-slot map plus the per-slot arrays (states, marks).

    Every per-slot array is a :class:`SlotBuffer` in ``_buffers`` and follows the store through
    :meth:`grow` (in one place, all or nothing); ``_views`` refreshes the array attributes.

    Attributes
    ----------
    states : (capacity, state_size) float32 or float64
        Row ``slot`` is the state of the stream in that slot; free rows hold garbage.
    mark : (capacity,) int64
        All zero between kernel calls (the kernels' duplicate-key scratch).
    free_stack : (capacity,) int64
        ``free_stack[:n_free]``: slots of closed streams, reused last-closed first; slots from
        ``top`` up were never handed out.
    slot_of : dict or IntSlotTable
        ``key -> slot``: a dict for str keys, an :class:`IntSlotTable` for int keys.
    hot : dict
        ``key -> slot`` for some open keys, for one-key lookups at dict speed: ``slot_of``
        itself for str keys, the table's recently found keys for int keys. A key missing
        from it may still be open: ask ``slot_of``.
    recency : OrderedDict or None
        ``key -> time last used``, least recently used first; None when not tracked.
    limit : int or None
        The buffers never grow past this many rows (the engine's ``max_streams``).
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
        capacity = int(capacity)
        self._buffers = {
            "states": SlotBuffer(capacity, max(self.state_size, 1), self.dtype),
            "mark": SlotBuffer(capacity, 0, np.int64),
            "free_stack": SlotBuffer(capacity, 0, np.int64),
        }
        if memory:
            self._buffers["last"] = SlotBuffer(capacity, int(memory), self.dtype)
        self.missing = missing
        self._capacity = capacity
        self._views()
        self.top = 0
        self.n_free = 0
        self._free_peak = 0  # deepest the free stack has been (its pages stay committed)
        self.slot_of = {}  # becomes an IntSlotTable when the first key is an int
        self.hot = self.slot_of  # some open keys -> slot (see the class docstring)
        self.key_kind = None  # int or str, fixed by the first key
        self.recency = OrderedDict() if track else None
        self.limit = limit

    def _views(self):
        b = self._buffers
        self.states = b["states"].array()
        self.mark = b["mark"].array()
        self.free_stack = b["free_stack"].array()
        self.last = b["last"].array() if "last" in b else None

    @property
    def capacity(self):
        return self._capacity

    @property
    def available(self):
        """Slots that can be handed out without growing."""
        return self.n_free + self._capacity - self.top

    def __len__(self):
        return len(self.slot_of)

    def check_kind(self, keys, what="keys"):
        """Refuse keys whose kind (int/str) differs from each other or from the engine's."""
        check_kind(keys, self.key_kind, what)

    def grow(self, needed):
        """Make room for ``needed`` more streams: every per-slot buffer is resized (doubling,
        never past ``limit``), keeping every stream in its slot. The buffers' mappings move
        rather than copy (see :class:`SlotBuffer`), and pages are committed only as streams
        arrive, so doubling costs address space, not memory. All or nothing: on any failure
        the resized buffers are put back as they were."""
        cap = self._capacity
        new_cap = max(2 * cap, cap + needed, 16)
        if self.limit is not None:  # the engine never holds more than `limit` streams
            new_cap = min(new_cap, max(self.limit, cap + needed))
        undo = []
        try:
            # no view may pin the mappings
            self.states = self.mark = self.free_stack = self.last = None
            for buf in self._buffers.values():
                undo.append(buf.resize(new_cap, self.top))
        except BaseException:
            for u in reversed(undo):
                u()
            self._views()
            raise
        self._capacity = new_cap
        self._views()

    def reserve(self, count):
        """Grow now if fewer than ``count`` slots are free (allocate before opening)."""
        if self.available < count:
            self.grow(count - self.available)

    def _take(self, count):
        """The ``count`` slots the next opens get (closed slots first, last closed first),
        as an int64 array; nothing changes until :meth:`_took`."""
        a = min(count, self.n_free)
        reused = self.free_stack[self.n_free - a:self.n_free][::-1]
        return np.concatenate([reused, np.arange(self.top, self.top + count - a)])

    def _took(self, count):
        a = min(count, self.n_free)
        self.n_free -= a
        self.top += count - a

    def open(self, key):
        """Give ``key`` (canonical, not yet open) a zeroed slot and return it.

        A str key must be encodable as UTF-8 (a lone surrogate is not): snapshots store keys in
        UTF-8, and a stream that could not be saved is refused here, when it is opened.
        """
        if type(key) is int:
            slots, _ = self._open_ints(np.array([key], np.int64))
            return int(slots[0])
        if "\x00" in key or not key.isascii():
            _check_str_key(key, "key")
        self.reserve(1)
        slot = int(self._take(1)[0])
        self.states[slot] = 0
        if self.last is not None:
            self.last[slot] = 0
        self.slot_of[key] = slot
        self._took(1)
        self.key_kind = str
        if self.recency is not None:
            # Listed at once (a placeholder time the caller's touch replaces), so keys() and
            # len() never disagree, even while a call that opened it is still running.
            self.recency[key] = -np.inf
        return slot

    def _open_ints(self, new):
        """Open the int keys ``new`` (int64 array, none open, no duplicates); returns (their
        slots, them as a list). All or nothing."""
        m = new.shape[0]
        if m == 0:
            return new.copy(), []
        self.reserve(m)
        table = self.slot_of if self.key_kind is int else IntSlotTable(m)
        table.make_room(m)
        slots = self._take(m)
        opened = new.tolist()
        n_free, top, kind, slot_of, hot = self.n_free, self.top, self.key_kind, self.slot_of, \
            self.hot
        try:
            self.states[slots] = 0
            if self.last is not None:
                self.last[slots] = 0
            table.insert(new, slots)
            self._took(m)
            self.key_kind, self.slot_of, self.hot = int, table, table.hot
            if self.recency is not None:
                for k in opened:
                    self.recency[k] = -np.inf
        except BaseException:  # KeyboardInterrupt too: put every count back
            for k in opened:
                if self.recency is not None:
                    self.recency.pop(k, None)
                if table.get(k) is not None:
                    table.delete(k)
            self.n_free, self.top, self.key_kind, self.slot_of, self.hot = \
                n_free, top, kind, slot_of, hot
            raise
        return slots, opened

    def close(self, key):
        slot = self.slot_of[key]
        if self.key_kind is int:
            self.slot_of.delete(key)  # first: the one step here that may fail
        else:
            del self.slot_of[key]
        self.free_stack[self.n_free] = slot
        self.n_free += 1
        self._free_peak = max(self._free_peak, self.n_free)
        if self.recency is not None:
            self.recency.pop(key, None)
        if not self.slot_of:
            self.key_kind = None
            self.slot_of = self.hot = {}
        return slot

    def slots_array(self, keys):
        """As :meth:`slots` for an int64 array of keys (an int-key engine, or an empty one): open
        keys map in one kernel call; new keys are opened in one more."""
        if self.key_kind is int:
            out, missing = self.slot_of.lookup(keys)
            if missing == 0:
                return out, []
            miss = keys[out < 0]
        else:
            miss = keys
        uniq, first = np.unique(miss, return_index=True)
        _, opened = self._open_ints(uniq[np.argsort(first, kind="stable")])  # batch order
        try:
            out, _ = self.slot_of.lookup(keys)
        except BaseException:
            self.rollback(opened)
            raise
        return out, opened

    def slots(self, keys):
        """Slots of canonical ``keys``, opening unknown ones. Returns (slots, newly opened keys)."""
        if not keys:
            return np.empty(0, np.int64), []
        if self.key_kind is int or (self.key_kind is None and type(keys[0]) is int):
            return self.slots_array(np.fromiter(keys, np.int64, len(keys)))
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

    def footprint(self):
        """Bytes held per component, as committed memory: rows ever handed out (``top``) of the
        per-slot arrays, the deepest the free stack has been, the key map (for str keys the dict
        and the key and slot objects it holds; O(streams) to count) and the recency order.

        Returns
        -------
        dict of str to int
        """
        row = self.states.shape[1] * self.dtype.itemsize
        parts = {"states": self.top * row, "mark": self.top * self.mark.itemsize,
                 "free_stack": self._free_peak * self.free_stack.itemsize}
        def obj(o):  # what the allocator hands out: 16-byte granules
            return -(-sys.getsizeof(o) // 16) * 16

        if isinstance(self.slot_of, IntSlotTable):
            parts["key_table"] = self.slot_of.tab.nbytes
            hot = self.slot_of.hot  # bounded (HOT_MAX keys), whatever the number of streams
            parts["hot_keys"] = sys.getsizeof(hot) + sum(obj(k) + obj(s) for k, s in hot.items())
        else:
            parts["key_dict"] = sys.getsizeof(self.slot_of)
            parts["key_objects"] = sum(map(obj, self.slot_of))
            # ints up to 256 are shared by the interpreter; larger slots are objects of their own
            parts["slot_objects"] = sum(obj(s) for s in self.slot_of.values() if s > 256)
        if self.last is not None:
            parts["last_observed"] = self.top * self.last.shape[1] * self.dtype.itemsize
        if self.recency is not None:
            parts["recency"] = sys.getsizeof(self.recency)
        return parts

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
