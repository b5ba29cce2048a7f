"""The product tile fitted to the target (streamgru.isa): which configuration each target gets,
and every configuration against the float64 oracle, including those this host would not pick
(built in subprocesses for another Numba target, or forced with STREAMGRU_TILE)."""

import os
import pathlib
import re
import sys

import background
import llvmlite.binding as ll
import numpy as np
import oracle
import pytest
from helpers import OracleStreams, dequantized

from streamgru import Engine, GRUModel, isa
from streamgru import engine as engine_mod
from streamgru import kernels as K

TOL = {"float32": 1e-5, "float64": 1e-9}
ROOT = pathlib.Path(__file__).resolve().parents[1]
X86 = "x86_64-unknown-linux-gnu"


@pytest.mark.parametrize("cpu, name, vec, regs, fma", [
    ("skylake-avx512", "avx512", 64, 32, True),
    ("znver4", "avx512", 64, 32, True),
    ("haswell", "avx2", 32, 16, True),
    ("znver3", "avx2", 32, 16, True),
    ("corei7-avx", "avx2", 32, 16, False),  # AVX without FMA: multiply, then add
    ("x86-64", "vec16", 16, 16, False),
])
def test_selection_follows_the_llvm_target(cpu, name, vec, regs, fma):
    t = isa.select((X86, cpu, ""), forced="")
    assert (t.name, t.vec_bytes, t.registers, t.fma, t.forced) == (name, vec, regs, fma, False)


def test_host_features_decide_over_the_cpu_name():
    # NUMBA_CPU_NAME alone keeps the host's feature list: the features decide, as for Numba.
    t = isa.select((X86, "haswell", "+avx512f,+avx2,+fma,+avx"), forced="")
    assert t.name == "avx512"
    assert isa.select((X86, "skylake-avx512", "-avx512f"), forced="").name == "avx2"


def test_aarch64_gets_16_byte_vectors_with_fma():
    t = isa.select(("aarch64-unknown-linux-gnu", "generic", ""), forced="")
    assert (t.name, t.vec_bytes, t.registers, t.fma, t.k_split) == ("vec16", 16, 32, True, 1)


def test_a_target_llvm_cannot_build_for_gets_the_portable_tile():
    t = isa.select(("nosuchcpu-unknown-none", "x", ""), forced="")
    assert (t.name, t.vec_bytes, t.fma) == ("vec16", 16, False)


def test_avx512_configuration_is_the_tuned_one():
    # The tile the kernels were tuned with on AVX-512: 64-byte vectors, 6/4/2/1 rows, one panel,
    # k split in two; 32 float32 (16 float64) columns per panel.
    t = isa.make_config("avx512", "x", 32, True)
    assert (t.vec_bytes, t.k_split, t.rows, t.panels) == (64, 2, (6, 4, 2, 1), (1, 1, 1, 1))
    assert (t.panel_width("float32"), t.panel_width("float64"), t.panel_group) == (32, 16, 1)


def test_compact_conversions_in_256_bit_vectors_where_512_bit_ones_are_half_rate():
    # Zen 4 converts float16 and int8 no faster per value with 512-bit instructions than with
    # 256-bit ones: its one- and two-row tiles take compact weights in 32-byte vectors. Other
    # AVX-512 CPUs keep 64 until measured; a forced avx512 tile splits, so any host builds it.
    assert isa.make_config("avx512", "znver4", 32, True).compact_vec_bytes == 32
    assert isa.make_config("avx512", "skylake-avx512", 32, True).compact_vec_bytes == 64
    assert isa.make_config("avx512", "haswell", 16, True, forced=True).compact_vec_bytes == 32
    for name, vec in (("avx2", 32), ("vec16", 16)):
        assert isa.make_config(name, "znver4", 16, True).compact_vec_bytes == vec
    assert "compact weights in 32-byte vectors" in isa.make_config("avx512", "znver4", 32,
                                                                    True).describe()
    assert "compact" not in isa.make_config("avx512", "skylake-avx512", 32, True).describe()
    assert K.COMPACT_SPLIT == isa.TILE.vec_bytes // isa.TILE.compact_vec_bytes


def test_fitted_configurations_never_split_k():
    # No k-split: each output is summed in k order in every tile (bit-identical batches), and the
    # 6-row tile holds 12 accumulators, which fit 16 registers with the weights and a broadcast.
    for name in ("avx2", "vec16"):
        t = isa.make_config(name, "x", 16, True)
        assert t.k_split == 1 and t.rows[0] * t.panels[0] * isa.PANEL_VECTORS <= 12
        assert all(r * p * isa.PANEL_VECTORS <= 12 for r, p in zip(t.rows, t.panels))


def test_forced_tile_is_checked_and_marked():
    with pytest.raises(ValueError, match="STREAMGRU_TILE: expected one of avx512, avx2, vec16"):
        isa.select((X86, "haswell", ""), forced="avx1024")
    t = isa.select((X86, "haswell", ""), forced="avx512")
    assert t.forced and t.vec_bytes == 64 and "forced" in t.describe()


def test_kernels_and_packing_use_the_selected_tile():
    assert K.VEC_BYTES == isa.TILE.vec_bytes
    assert K.panel_width(np.float32) == isa.TILE.panel_width(np.float32)
    # A forced tile is never cached (its code does not follow from Numba's cache key).
    assert K._JIT["cache"] is not isa.TILE.forced


def model_with_uneven_panels(lbr):
    """Gate widths of 72 and 27 outputs: panel counts that are not multiples of the few-row
    tiles' panel groups on any configuration, so the one-panel tiles run too."""
    return GRUModel.random(5, [24, 9], dense_after=[(3, "softmax")], linear_before_reset=lbr,
                           seed=lbr)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("regime", ["serial", "wide"])
def test_every_row_count_against_oracle_and_separate_calls(dtype, lbr, regime, monkeypatch):
    """Batches of 1..14 rows cover every tile height, with and without a shifted last tile;
    each batch matches the oracle and, bit for bit, the same events sent one per call (the
    one-event path)."""
    if regime == "wide":
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    model = model_with_uneven_panels(lbr)
    rng = np.random.default_rng(7)
    batch, single = Engine(model, dtype=dtype), Engine(model, dtype=dtype)
    ref = OracleStreams(model)
    for n in list(range(1, 15)) + [23]:
        keys = list(range(n))
        x = rng.normal(size=(n, 5)).astype(dtype)
        y = batch.step(keys, x)
        y_sep = np.concatenate([single.step([k], x[i:i + 1]) for i, k in enumerate(keys)])
        np.testing.assert_array_equal(y, y_sep)
        np.testing.assert_allclose(y, ref.step(keys, x), atol=TOL[dtype], rtol=0)
    xs = rng.normal(size=(11, 5)).astype(dtype)
    ys_ref, s_ref = oracle.run(model, xs, ref.state(0))
    np.testing.assert_allclose(batch.run(0, xs), ys_ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(batch.state(0), s_ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_products_longer_than_a_panel_block(dtype):
    """An input of 600 values: the many-row tiles take k in blocks (kernels.PANEL_BLOCK_BYTES)
    and resume from the stored outputs; the result equals the oracle and, bit for bit, the
    one-row tiles that run over k in one go (separate calls)."""
    model = GRUModel.random(600, [20], seed=3)
    rng = np.random.default_rng(8)
    batch, single = Engine(model, dtype=dtype), Engine(model, dtype=dtype)
    for n in (4, 5, 6, 7, 13):
        keys = list(range(100 * n, 101 * n))
        x = rng.normal(size=(n, 600)).astype(dtype)
        y = batch.step(keys, x)
        np.testing.assert_array_equal(
            y, np.concatenate([single.step([k], x[i:i + 1]) for i, k in enumerate(keys)]))
        y_ref, _ = oracle.step(model, np.zeros((n, model.state_size)), x.astype(np.float64))
        np.testing.assert_allclose(y, y_ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("weights", ["float16", "int8"])
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("regime", ["serial", "wide"])
def test_compact_weights_every_row_count_and_long_products(weights, lbr, regime, monkeypatch):
    """Compact weights (float16 bits, int8 with per-row scales) through every tile height (the
    few-row ones converting in narrower vectors where isa.TileConfig.compact_vec_bytes says so)
    and, with an input of 1100 values, the many-row tiles' k blocks (int8 blocks store raw sums
    and scale at the last one): against the oracle on the dequantized model and, bit for bit,
    separate calls."""
    if regime == "wide":
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    rng = np.random.default_rng(17)
    # The third model's weights are tiny (float16 subnormals below 6.1e-5) and its inputs
    # large, so the products still matter: the widening of subnormal halves is checked too.
    for model, x_scale in ((model_with_uneven_panels(lbr), 1.0),
                           (GRUModel.random(1100, [20], linear_before_reset=lbr, seed=5), 1.0),
                           (GRUModel.random(6, [8], linear_before_reset=lbr, seed=6, scale=3e-5),
                            3e4)):
        ref = OracleStreams(dequantized(model, weights))
        batch, single = Engine(model, weights=weights), Engine(model, weights=weights)
        for n in list(range(1, 15)) + [23]:
            keys = list(range(n))
            x = (rng.normal(size=(n, model.input_size)) * x_scale).astype(np.float32)
            y = batch.step(keys, x)
            y_sep = np.concatenate([single.step([k], x[i:i + 1]) for i, k in enumerate(keys)])
            np.testing.assert_array_equal(y, y_sep)
            np.testing.assert_allclose(y, ref.step(keys, x), atol=TOL["float32"], rtol=0)


def test_serial_blocks_when_the_weights_outgrow_l2():
    """1.5 MB of weights (H=256) and 300 rows: the serial kernel's taller blocks (if this build
    uses them) against the oracle and, bit for bit, separate calls."""
    model = GRUModel.random(256, [256], seed=4)
    assert (model.layers[0].W.size + model.layers[0].R.size) * 4 > K.L2_BYTES
    n = 300
    rng = np.random.default_rng(9)
    batch, single = Engine(model, threads=1), Engine(model, threads=1)
    x = rng.normal(size=(n, 256)).astype(np.float32)
    y = batch.step(list(range(n)), x)
    np.testing.assert_array_equal(y, np.concatenate([single.step([k], x[k:k + 1])
                                                     for k in range(n)]))
    y_ref, _ = oracle.step(model, np.zeros((n, model.state_size)), x.astype(np.float64))
    np.testing.assert_allclose(y, y_ref, atol=TOL["float32"], rtol=0)


def _host_runs_haswell_code():
    if not ll.get_process_triple().startswith("x86_64"):
        return False
    feats = ll.get_host_cpu_features()
    return all(feats.get(f, False) for f in ("avx2", "fma", "bmi2", "f16c"))


def _other_forced_tile():
    """A configuration the host would not pick, to force."""
    return "avx512" if isa.TILE.name != "avx512" else "avx2"


# (expected configuration, environment) of each subprocess build. Explicit NUMBA_CPU_NAME runs
# use the ordinary on-disk cache (Numba keys it by target CPU name and features); a forced tile
# compiles afresh every time (not cached by design), so only one runs.
BUILDS = {
    "haswell": ("avx2", {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}),
    "x86-64": ("vec16", {"NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": ""}),
    "forced": (None, {"STREAMGRU_TILE": _other_forced_tile()}),
}


def _build_skip_reason(build):
    if build == "haswell" and not _host_runs_haswell_code():
        return "host cannot run AVX2+FMA code"
    if build == "haswell" and isa.TILE.name == "avx2" and not isa.TILE.forced:
        # An AVX2 host's own build is the AVX2 build: every other test of the suite runs it.
        # On an AVX-512 host this is what exercises the AVX2 path (45 s of compiling).
        return "the host's own build is the AVX2 build"
    if build == "x86-64" and not ll.get_process_triple().startswith("x86_64"):
        return "x86-64 only"
    return None


def _other_build(build):
    """Run the row-count tests above in a subprocess for ``build``: (tile name printed there,
    pytest's CompletedProcess), or the reason to skip."""
    reason = _build_skip_reason(build)
    if reason:
        return reason
    env = dict(os.environ, PYTHONPATH=str(ROOT), **BUILDS[build][1])
    env.pop("NUMBA_DISABLE_JIT", None)
    res = background.run(
        [sys.executable, "-c", "from streamgru.isa import TILE; print(TILE.name, TILE.describe())"],
        env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    # The forced build is compiled afresh every run: there only the serial kernels (the
    # panel-parallel one runs the same products, tested in the cached builds).
    select = "(every_row_count or longer_than) and float32 or compact_weights or kernels_and_packing"
    if build == "forced":
        select = ("(every_row_count and serial or longer_than) and float32 or compact_weights and "
                  "serial or kernels_and_packing")
    tests = background.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_tiles.py"), "-k", select],
        env=env, timeout=540, cwd=ROOT)
    return res.stdout.split()[0], tests


for _build in BUILDS:
    background.job(f"tiles-{_build}")(lambda build=_build: _other_build(build))


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="compiles kernels")
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("STREAMGRU_TILE") is not None
                    or os.environ.get("NUMBA_CPU_NAME") is not None,
                    reason="already inside a subprocess build")
@pytest.mark.parametrize("build", [pytest.param(b, marks=pytest.mark.background(f"tiles-{b}"))
                                   for b in sorted(BUILDS)])
def test_other_builds_against_oracle(build):
    """Build the kernels for another target (or with a forced tile) in a subprocess, and run
    the row-count test above there (float32: one compile per kernel). The subprocess starts
    when collection ends and runs beside the suite (tests/background.py)."""
    got = background.result(f"tiles-{build}")
    if isinstance(got, str):
        pytest.skip(got)
    name, res = got
    assert name == (BUILDS[build][0] or BUILDS[build][1]["STREAMGRU_TILE"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    passed = 8 if build == "forced" else 14
    assert re.search(rf"\b{passed} passed", res.stdout), res.stdout[-1000:]
