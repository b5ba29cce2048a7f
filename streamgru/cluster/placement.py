"""Placement: which shard holds a stream key (no Ray needed).

A key's shard is chosen by rendezvous (highest-random-weight) hashing, which depends only on the
key and the shard count, never on Python's per-process ``hash()``: every client, in every process,
routes a key to the same shard, and going from N to N+1 shards moves only the keys whose new
owner is the new shard (about 1/(N+1) of them); going from N to N-1 moves only the keys of the
removed shard. Precisely (all arithmetic modulo 2**64, ``mix`` is SplitMix64's finalizer)::

    digest(int k) = mix(uint64(k) ^ 0x5354524541474955)           # vectorised over int arrays
    digest(str k) = blake2b(b"s" + utf8(k), digest_size=8) as little-endian uint64
    score(k, s)   = mix(digest(k) ^ mix(s + 0x9E3779B97F4A7C15))
    shard(k)      = argmax over s in 0..N-1 of score(k, s)  (ties: the lowest s)

Shards are numbered 0..N-1; ``ShardedEngine.resize(n)`` adds shards at the top or removes them
from the top. Keys are validated as ``Engine`` validates them (:func:`streamgru.state.normalize_keys`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..state import normalize_key, normalize_keys

__all__ = ["PLACEMENT", "shard_of", "owners", "positive_int"]

# Written into snapshot manifests: a snapshot placed by another rule is refused, not misread.
PLACEMENT = "rendezvous-splitmix64-blake2b-v1"

_U64 = np.uint64
_INT_TAG = _U64(0x5354524541474955)
_SHARD_SALT = 0x9E3779B97F4A7C15


def _mix64(z):
    """SplitMix64's finalizer on a uint64 array (wraps modulo 2**64, no warnings for arrays)."""
    z = z ^ (z >> _U64(30))
    z = z * _U64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> _U64(27))
    z = z * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _digests(keys):
    """uint64 digests of canonical keys: an int64 array, or a list of all-int or all-str keys."""
    if isinstance(keys, np.ndarray):
        return _mix64(keys.astype(np.int64, copy=False).view(_U64) ^ _INT_TAG)
    if keys and isinstance(keys[0], str):
        b2 = hashlib.blake2b
        return np.fromiter((int.from_bytes(b2(b"s" + k.encode("utf-8"), digest_size=8).digest(),
                                           "little") for k in keys), _U64, len(keys))
    return _mix64(np.array(keys, dtype=np.int64).reshape(-1).view(_U64) ^ _INT_TAG)


def owners(keys, shards):
    """Shard index (int64 array) of each canonical key under ``shards`` shards.

    ``keys``: an int64 array, or a list of canonical keys of one kind (as
    :func:`streamgru.state.normalize_keys` returns them); not validated here.
    """
    n = len(keys)
    if shards == 1 or n == 0:
        return np.zeros(n, np.int64)
    seeds = _mix64(np.arange(shards, dtype=_U64) + _U64(_SHARD_SALT))
    return np.argmax(_mix64(_digests(keys)[:, None] ^ seeds[None, :]), axis=1).astype(np.int64)


def shard_of(keys, shards):
    """The shard of each key under ``shards`` shards (rendezvous hashing; see the module docstring).

    Stable across processes, machines and Python versions; ints and strs never share a digest
    function (``1`` and ``"1"`` are placed independently).

    Parameters
    ----------
    keys : int, str, sequence of int or str, or 1-D integer array
    shards : int
        Number of shards, at least 1.

    Returns
    -------
    int (for one key) or numpy.ndarray of int64 (for a sequence)

    Examples
    --------
    >>> from streamgru.cluster import shard_of
    >>> shard_of([1, 2, 3], 1).tolist()
    [0, 0, 0]
    >>> int(shard_of("sensor-17", 4)) == int(shard_of(["sensor-17"], 4)[0])
    True
    """
    shards = positive_int(shards, "shards")
    if isinstance(keys, (str, int, np.integer)) and not isinstance(keys, (bool, np.bool_)):
        return int(owners([normalize_key(keys, "keys")], shards)[0])
    ks, _ = normalize_keys(keys, None, "keys")
    return owners(ks, shards)


def positive_int(n, what):
    """``n`` as an int if it is a positive integer (not a bool), else ValueError naming ``what``."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what}: expected a positive int, got {n!r}")
    return int(n)
