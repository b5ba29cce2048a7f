"""A reduced soak (a few seconds) in the test suite: the bookkeeping stays bounded and exact while
thousands of keys come and go. Memory and speed are measured by ``python benchmarks/soak.py``,
not asserted here (no timed asserts in tests)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import soak  # noqa: E402


def test_reduced_soak_keeps_the_store_bounded_and_loses_nothing():
    r = soak.run_soak(steps=60_000, keys=6_000, active=300, max_streams=400, idle_ticks=3_000,
                      hidden=8, window=5_000, save_every=20_000)
    eng, store = r["engine"], r["engine"]._store
    assert r["steps"] >= 60_000 and r["keys_opened"] >= 6_000
    assert r["lost"] == []  # every key stepped is open, closed by us, or went to on_evict
    assert r["closed"] > 1_000 and r["evicted"] > 1_000 and r["saves"] == 3
    assert r["peak_streams"] == 400  # the LRU path ran, not only the idle one
    assert eng.capacity <= 400 and len(eng) <= 400
    # The store's own structures are exactly as large as the open streams, no larger.
    assert len(store.slot_of) == len(store.recency) == len(eng)
    assert store.available + len(store.slot_of) == store.capacity
    assert store.n_free + len(store.slot_of) == store.top <= store.capacity
    free = store.free_stack[:store.n_free].tolist()
    assert len(set(free) | set(store.slot_of.values())) == store.top  # every slot exactly once
    assert store.free_stack.shape[0] == store.capacity == store.states.shape[0]
    assert np.isfinite(store.states[list(store.slot_of.values())]).all()
    assert len(r["samples"]) == 12
