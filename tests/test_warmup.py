"""``streamgru warmup``: after it, a new process compiles nothing (the one test that compiles
every kernel from scratch; it runs beside the suite, see tests/background.py)."""

import json
import os
import pathlib
import sys
import tempfile

import background
import pytest

from streamgru import GRUModel
from streamgru.cli import main

# Routes every kernel of the engine is built with: the fast path and the batch and run kernels
# of both thread settings (the thresholds set to 0 send small calls to the wide kernels), and
# the int-key table. It prints {kernel: (loaded from the cache, compiled)}.
_FIRST_CALLS = """
import json, sys
import numpy as np
import streamgru
from streamgru import engine as engine_mod, kernels
m = streamgru.load(sys.argv[1])
for threads in (1, 2):
    e = streamgru.Engine(m, threads=threads)
    x = np.ones((1, m.input_size), np.float32)
    e.step(["a"], x)  # opens "a" (the general path)
    e.step(["a"], x)  # the one-event path
    e.step([f"k{i}" for i in range(100)], np.ones((100, m.input_size), np.float32))
    e.run("a", np.ones((7, m.input_size), np.float32))
    engine_mod.WIDE_MIN_MACS = engine_mod.RUN_WIDE_MIN_MACS = 0
    e.step(["a", "b", "c"], np.ones((3, m.input_size), np.float32))
    e.run("a", np.ones((7, m.input_size), np.float32))
    engine_mod.WIDE_MIN_MACS, engine_mod.RUN_WIDE_MIN_MACS = 350_000, 150_000
    ints = streamgru.Engine(m, threads=threads)
    keys = np.arange(100, dtype=np.int64)
    ints.step(keys, np.ones((100, m.input_size), np.float32))
    ints.step(keys, np.ones((100, m.input_size), np.float32))
    ints.close(5)
print(json.dumps(kernels.cache_counts()))
"""


# `streamgru warmup MODEL` (the CLI's entry), then the signatures each separately compiled helper
# was compiled for, as its last line.
_WARMUP = """
import json, sys
from streamgru import kernels as K
from streamgru.cli import main
code = main(["warmup", sys.argv[1]])
names = ("_gemm", "_act", "_act_common", "_lstm_std32", "_cell_std32", "_tanh32", "_gemv")
print(json.dumps({n: [str(s) for s in getattr(K, n).signatures] for n in names}))
sys.exit(code)
"""


@background.job("warmup")
def _warmup_then_first_calls():
    """``streamgru warmup`` into an empty cache directory, then the first calls in a new process:
    (warmup's CompletedProcess, the new process's), or the reason to skip."""
    from streamgru.isa import TILE

    if TILE.forced:
        return "STREAMGRU_TILE is set: kernels are not cached"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.sgru"
        GRUModel.random(3, [5], dense_after=[(2, "softmax")], seed=1).save(path)
        cache = pathlib.Path(tmp) / "cache"
        env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="2")
        warm = background.run([sys.executable, "-c", _WARMUP, str(path)], env=env, timeout=900)
        first = background.run([sys.executable, "-c", _FIRST_CALLS, str(path)], env=env,
                               timeout=900)
        return warm, first, cache


@pytest.mark.background("warmup")
@pytest.mark.slow
def test_warmup_leaves_nothing_to_compile_for_a_new_process():
    """After ``streamgru warmup`` in a process with an empty cache directory, a new process's
    first step, batch and run, on every route and both thread settings, compile nothing: every
    kernel is loaded from the cache. The one test that compiles every kernel from scratch (tens
    of seconds, run beside the suite: tests/background.py): counting compilations instead of
    timing them makes it exact."""
    got = background.result("warmup")
    if isinstance(got, str):
        pytest.skip(got)
    warm, first, cache = got
    assert warm.returncode == 0, warm.stderr
    assert f"cache: {cache}" in warm.stdout and "compiled: " in warm.stdout
    assert "step_one" in warm.stdout
    # Each helper compiled once for float32 (docs/kernels.md, "One compilation per helper and
    # dtype"): a literal argument would add a specialization. The product has three on
    # purpose: gathered rows or not, and the serial run's literal start panel.
    sigs = json.loads(warm.stdout.strip().splitlines()[-1])
    gemm = sigs.pop("_gemm")
    assert len(gemm) == 3 and sum("Literal" in s for s in gemm) == 1, gemm
    assert all(len(v) == 1 for v in sigs.values()), sigs
    assert first.returncode == 0, first.stderr
    counts = json.loads(first.stdout.strip().splitlines()[-1])
    assert {k: c for k, (_, c) in counts.items() if c} == {}  # nothing compiled
    used = ("step_one", "step_serial", "step_parallel", "step_wide", "run_sequence",
            "run_sequence_wide", "table_lookup", "table_insert")
    assert all(counts[k][0] >= 1 for k in used), counts  # each loaded from the cache


def test_warmup_help_and_bad_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["warmup", "--help"])
    assert exc.value.code == 0
    assert "NUMBA_CACHE_DIR" in capsys.readouterr().out
    assert main(["warmup", str(tmp_path / "missing.sgru")]) == 2
    assert "streamgru warmup: error: model:" in capsys.readouterr().err


# A new process's first event on a standard GRU model with a softmax head, with an empty cache:
# it prints how many signatures each cell helper compiled.
_COLD_ONE_EVENT = """
import json, sys
import numpy as np
import streamgru
from streamgru import kernels as K
m = streamgru.load(sys.argv[1])
e = streamgru.Engine(m, threads=1)
e.step([7], np.ones((1, m.input_size), np.float32))  # a new int key: opened, then stepped
names = ("_cell_std32", "_act_common", "_act", "_lstm_std32", "_lstm_gates", "_gates_zr",
         "_gates_n_lbr1", "_gates_n_lbr0", "_update", "_gru_pre", "table_lookup",
         "table_insert", "step_serial", "run_sequence")
ks = e._packed.kernels
import os, pathlib
cache = pathlib.Path(os.environ["NUMBA_CACHE_DIR"])
index = sorted(p.name.split("-")[0] for p in cache.rglob("*.nbi"))
print(json.dumps({"set": ks.cells, "step_one": len(ks.step_one.signatures),
                  **{n: len(getattr(K, n).signatures) for n in names}, "index": index}))
"""


@background.job("cold_one_event")
def _cold_one_event():
    from streamgru.isa import TILE

    if TILE.forced:
        return "STREAMGRU_TILE is set: kernels are not cached"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.sgru"
        GRUModel.random(3, [5, 4], dense_after=[(2, "softmax")], seed=2).save(path)
        env = dict(os.environ, NUMBA_CACHE_DIR=str(pathlib.Path(tmp) / "cache"))
        return background.run([sys.executable, "-c", _COLD_ONE_EVENT, str(path)], env=env,
                              timeout=900)


@pytest.mark.background("cold_one_event")
@pytest.mark.slow
def test_a_first_event_compiles_only_its_models_cells():
    """Cold start (docs/kernels.md, "Cell sets"): the first event of a standard float32 GRU
    model with a softmax head compiles the one-event kernel of its cell set with the standard
    GRU cell and the common activations only: no LSTM cell, no general GRU path, no
    thirteen-activation function, no batch, run or key-table kernel."""
    from streamgru import kernels as K

    got = background.result("cold_one_event")
    if isinstance(got, str):
        pytest.skip(got)
    assert got.returncode == 0, got.stderr
    counts = json.loads(got.stdout.strip().splitlines()[-1])
    assert counts.pop("set") == K.CELL_GRU_STD32 | K.CELL_DENSE
    # What the process cached: the one-event kernel alone; its entry holds its helpers' code
    # (the helpers themselves are never cached, see kernels._HelperLibrary).
    index = counts.pop("index")
    assert "kernels.step_one" in index and not [n for n in index if n.startswith("kernels._")]
    assert counts.pop("step_one") == 1
    assert counts.pop("_cell_std32") == 1 and counts.pop("_act_common") == 1
    assert counts == dict.fromkeys(counts, 0), counts
