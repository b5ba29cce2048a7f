"""The engine and kernels lean on five things Numba does not promise: the compiled entry point of
a dispatcher (``_compiled``), the thread-local thread-count accessors (``_get_num_threads`` /
``_set_num_threads``), LLVM intrinsics that address rows with ``shape[1]`` as the stride, a
dispatcher subclass built the way ``njit`` builds its own (``kernels._inner``), and a code
library subclass for its helpers (``kernels._HelperLibrary``).
Each has a fallback or a guard; these tests force the fallback and check the results still match
the float64 oracle, that an intrinsic refuses, at typing time, an array it cannot read, and that
a helper without a CPython wrapper refuses a call from Python.
"""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from helpers import OracleStreams

import streamgru.engine as engine_mod
import streamgru.kernels as K
from streamgru import Engine, GRUModel

needs_jit = pytest.mark.skipif(numba.config.DISABLE_JIT, reason="intrinsics need the compiler")


def _model():
    return GRUModel.random(4, [6, 5], dense_after=[(3, "tanh")], seed=7)


def _one_event_steps(eng, ref, key, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = rng.normal(size=(1, 4)).astype(np.float32)
        np.testing.assert_allclose(eng.step([key], x), ref.step([key], x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(eng.state(key), ref.state(key), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- kernel-only helpers


@needs_jit
def test_a_kernel_only_helper_refuses_python_and_serves_compiled_code():
    """The helpers only kernels call are compiled without a CPython wrapper (kernels._inner).
    Called from Python, Numba's own dispatcher would then jump to no code and kill the process;
    ours raises a TypeError naming the helper. From compiled code the helper works."""
    for helper in (K._tanh32, K._gemv, K._act, K._act_common, K._cell_std32, K._step_block):
        assert isinstance(helper, K._KernelOnly), helper
    with pytest.raises(TypeError, match=r"kernels\._tanh32 is called only from compiled kernels"):
        K._tanh32(np.float32(0.5))
    tanh = numba.njit(cache=False)(lambda v: K._tanh32(v))
    assert abs(tanh(np.float32(0.5)) - np.tanh(0.5)) < 1e-6
    for kernel in (K.step_one, K.step_serial, K.run_sequence, K.gather_rows):
        assert not isinstance(kernel, K._KernelOnly), kernel  # the engine calls these


@needs_jit
def test_helpers_compile_and_cache_as_plain_functions_when_numba_lacks_the_library_internals(
        tmp_path):
    """kernels._HelperLibrary overrides code-library internals of the pinned Numba. In a fresh
    interpreter whose Numba has another library class (what a Numba whose internals moved looks
    like to the check), the helpers are compiled and cached as any function, and the engine's
    results still match the oracle."""
    code = textwrap.dedent("""
        import os, pathlib
        import numba.core.codegen as cg
        import numpy as np
        cg.JITCPUCodegen._library_class = type("Moved", (cg.JITCodeLibrary,), {})
        import streamgru.kernels as K
        assert K._HELPER_LIBRARIES is False
        from helpers import OracleStreams
        from streamgru import Engine, GRUModel
        model = GRUModel.random(4, [6], dense_after=[(3, "tanh")], seed=7)
        keys = list(range(40))
        x = np.random.default_rng(1).normal(size=(len(keys), 4)).astype(np.float32)
        eng, ref = Engine(model, threads=1), OracleStreams(model)
        err = float(np.abs(eng.step(keys, x) - ref.step(keys, x)).max())
        err = max(err, float(np.abs(eng.step([3], x[:1]) - ref.step([3], x[:1])).max()))
        index = pathlib.Path(os.environ["NUMBA_CACHE_DIR"]).rglob("*.nbi")
        print(sorted({p.name.split("-")[0] for p in index}))
        print(err)
    """)
    here = os.path.dirname(__file__)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(
        [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    *_, index, err = r.stdout.strip().splitlines()
    assert float(err) < 1e-5
    if K._JIT["cache"]:  # the helpers have cache entries of their own again
        assert "kernels._cell_std32" in index and "kernels._gemv" in index, index


def test_helpers_call_no_kernel_with_an_entry_point():
    """While a helper compiles, every library Numba makes is a _HelperLibrary (no machine code
    of its own). A function with an entry point that the engine calls from Python (_plan,
    step_serial, ...) compiled there first would have none: so no helper, and no inlined
    function a helper pulls in, may call one."""
    disp = {n: d for n, d in vars(K).items() if isinstance(d, numba.core.registry.CPUDispatcher)}
    if not disp:
        pytest.skip("NUMBA_DISABLE_JIT: no dispatchers")
    inner = {n for n, d in disp.items()
             if isinstance(d, K._KernelOnly) or d.targetoptions.get("inline") == "always"}
    entry = set(disp) - inner
    assert {"_plan", "step_serial", "run_sequence", "gather_rows"} <= entry
    assert {"_gemv", "_cell_std32", "_step_block", "_cell"} <= inner

    def names(code):
        out = set(code.co_names)
        for c in code.co_consts:
            if hasattr(c, "co_names"):
                out |= names(c)
        return out

    calls = {n: sorted(names(disp[n].py_func.__code__) & entry) for n in inner}
    assert {n: c for n, c in calls.items() if c} == {}


# ---------------------------------------------------------------------------- entry points


def test_compiled_returns_the_dispatcher_when_there_is_no_entry_point():
    class NoOverloads:  # what a Numba without ``overloads[...].entry_point`` looks like
        overloads = {}

    kernel = NoOverloads()
    assert engine_mod._compiled(kernel, (np.zeros(2),)) is kernel


@pytest.mark.parametrize("wide", [False, True])
def test_one_event_path_through_the_dispatcher_matches_the_oracle(monkeypatch, wide):
    """With the entry-point lookup failing (as on a Numba that moved it), the one-event path keeps
    calling the dispatcher: same results. ``wide`` takes the weight-split kernel instead."""
    model = _model()
    if wide:
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    eng = Engine(model, threads=2 if wide else 1)
    eng.open("k")
    _one_event_steps(eng, OracleStreams(model), "k", 2)  # compiled: entry points in use
    if not numba.config.DISABLE_JIT:
        ks = eng._packed.kernels
        assert (eng._wide1 if wide else eng._run1) not in (ks.step_wide, ks.step_one)

    def no_typeof(value):
        raise AttributeError("typeof moved")

    monkeypatch.setattr(numba, "typeof", no_typeof)
    eng = Engine(model, threads=2 if wide else 1)
    eng.open("k")
    _one_event_steps(eng, OracleStreams(model), "k", 5)
    ks = eng._packed.kernels
    assert (eng._wide1 if wide else eng._run1) is (ks.step_wide if wide else ks.step_one)


# ---------------------------------------------------------------------------- thread count


def _check_thread_switch(eng):
    """A parallel step of ``eng`` (2 threads) called with Numba's count at 1: it matches the
    oracle and leaves the caller's count at 1."""
    model = eng.model
    keys = list(range(engine_mod.PARALLEL_MIN_ROWS))  # enough rows for the parallel kernel
    x = np.random.default_rng(1).normal(size=(len(keys), 4)).astype(np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        y = eng.step(keys, x)
        assert numba.get_num_threads() == 1  # the caller's setting is restored
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(y, OracleStreams(model).step(keys, x), atol=1e-5, rtol=0)


def test_engine_uses_the_thread_local_accessors_once_the_pool_is_up(monkeypatch):
    """The accessors are bound by Numba when it launches its thread pool, so they are looked up
    then (a lookup at import found none, and every engine paid the public pair's checks)."""
    from numba.np.ufunc import parallel

    monkeypatch.setattr(engine_mod, "_get_num_threads", None)
    monkeypatch.setattr(engine_mod, "_set_num_threads", None)
    eng = Engine(_model(), threads=2)
    assert engine_mod._get_num_threads is parallel._get_num_threads
    assert engine_mod._set_num_threads is parallel._set_num_threads
    assert engine_mod._get_num_threads is not numba.get_num_threads
    _check_thread_switch(eng)


def test_engine_falls_back_to_the_public_thread_pair_when_the_private_one_moves(monkeypatch):
    """A Numba whose pool binds no accessors under these names: the public pair, and a parallel
    step still switches to the engine's count and back."""
    monkeypatch.setattr(engine_mod, "_get_num_threads", None)
    monkeypatch.setattr(engine_mod, "_set_num_threads", None)
    monkeypatch.setattr(engine_mod, "_ACCESSORS", ("_moved_get", "_moved_set"))
    eng = Engine(_model(), threads=2)
    assert engine_mod._get_num_threads is numba.get_num_threads
    assert engine_mod._set_num_threads is numba.set_num_threads
    _check_thread_switch(eng)


# ---------------------------------------------------------------------------- intrinsics


@needs_jit
@pytest.mark.parametrize("make, call, message", [
    (lambda: np.zeros((4, 8), np.float32, order="F"), "w",
     r"_prefetch_w: A: expected a C-contiguous 2-D array .*got array\(float32, 2d, F\)"),
    (lambda: np.zeros((4, 8, 2), np.float32), "w",
     r"_prefetch_w: A: expected a C-contiguous 2-D array .*got array\(float32, 3d, C\)"),
    (lambda: np.zeros((8, 4), np.float32)[:, 1], "r",
     r"_prefetch_r: A: expected a C-contiguous 1-D array .*got array\(float32, 1d, A\)"),
])
def test_prefetch_refuses_an_array_it_cannot_address(make, call, message):
    from numba.core.errors import TypingError

    if call == "w":
        fn = numba.njit(lambda A: K._prefetch_w(A, 1, 2))
    else:
        fn = numba.njit(lambda A: K._prefetch_r(A, 1))
    with pytest.raises(TypingError, match=message):
        fn(make())
    fn(np.ascontiguousarray(make()) if make().ndim <= 2 else np.zeros((4, 8), np.float32))


@needs_jit
def test_tile_refuses_a_strided_matrix_and_mixed_dtypes():
    from numba.core.errors import TypingError

    tile = K._make_tile(1, 1)
    fn = numba.njit(lambda A, P, F, C: tile(A, None, 0, 0, 1, P, 0, F, 0, 0, 1, C, 0, 0))
    A, P, C = np.ones((2, 3), np.float32), np.zeros(64, np.float32), np.zeros((2, 32), np.float32)
    F = np.zeros((10, 7), np.float32)
    with pytest.raises(TypingError, match=r"tile: A: expected a C-contiguous 2-D array"):
        fn(np.asfortranarray(A), P, F, C)
    with pytest.raises(TypingError, match=r"tile: C: expected a C-contiguous 2-D float32 array"):
        fn(A, P, F, C.astype(np.float64))
    with pytest.raises(TypingError, match=r"tile: F: expected a C-contiguous 2-D float32 array"):
        fn(A, P, F.astype(np.float64), C)
    # compact weights (float16 bits, int8) only under float32 arithmetic; nothing else
    with pytest.raises(TypingError, match=r"tile: params: expected a C-contiguous 1-D float64 "):
        fn(A.astype(np.float64), P.view(np.uint16), F.astype(np.float64), C.astype(np.float64))
    with pytest.raises(TypingError, match=r"tile: params: expected a C-contiguous 1-D float32 "):
        fn(A, P.view(np.int32), F, C)
    fn(A, P, F, C)  # the layouts the kernels pass compile and run
    fn(A, np.zeros(64, np.int8), F, C)
    fn(A, np.zeros(64, np.uint16), F, C)
