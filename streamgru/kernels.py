"""Every Numba kernel of streamgru. Arrays in, arrays out; nothing here validates user input.

The packed model (see :mod:`streamgru.packing`) reaches a kernel as three arrays:

* ``params``: (P,) weights dtype -- every weight matrix as column panels (below): the compute
  dtype, or float16 (as its bits, uint16) / int8 under float32 arithmetic (``Engine(weights=)``);
* ``table``:  (L, NT) int64 -- one row per layer, columns ``T_*`` below; columns ``T_L*`` hold the
  scratch-row layout (the same in every row);
* ``fp``:     (L + E, NF) float, the compute dtype -- rows 0..L-1: activation alpha/beta and
  clip per layer, columns ``F_*`` below; the rest, addressed flat: every bias (padded to NR),
  the int8 weights' scales and the LSTM's peepholes.

Weight panels. A product ``y = W v + b`` with W (M, K) is stored as ``ceil(M / NR)`` panels; panel p
is ``W[p*NR:(p+1)*NR, :].T`` laid out (K, NR) row-major (rows past M are zero); its bias, padded
to a multiple of NR, is in ``fp``. int8 weights hold ``q`` with W ~ q * s, one scale s per row
of W (per column of a panel), padded like the bias, in ``fp`` too (:mod:`streamgru.compact`).
``NR = 2 * VEC_BYTES / itemsize`` (the compute dtype's): two vectors of the
target (:mod:`streamgru.isa` picks ``VEC_BYTES`` and the tile shapes from the CPU Numba compiles
for: 32 float32 columns with AVX-512, 16 with AVX2, 8 with 16-byte vectors). The product kernel
(``_tile*``) keeps an (MR rows x NP panels x NR columns) block of outputs in vector registers
while it streams the panels over k, broadcasting one input value per row: the layout of a BLAS
micro-kernel, written in LLVM IR because Numba cannot keep a vector accumulator in registers
otherwise. Given an int64 ``rows`` array, a tile reads input row r from ``A[rows[r]]`` (a
gather, chosen at compile time by the argument's type): the step kernels' products read the
batch's inputs and the streams' states in place.

The layer loops and the cells (docs/kernels.md, "The layer loop and the cells"): per layer, a
loop runs the layer's products from its table row (``T_W``, ``T_R``, ``T_RN``), then hands each
row to :func:`_cell` (and :func:`_cell_pre`), the only functions that dispatch on ``T_KIND``, to
the kind's cell helper. The loops are written once per family: :func:`_make_step_block` (a block
of rows; serial and panel-parallel variants), :func:`_make_sequence` (one stream over T steps;
both variants) and :func:`step_one` (one row, one-row tiles only: the cold-start path).

Per-call arrays:

* ``state``:  (capacity, state_size) float -- every stream's flat state, the stateful layers'
  states in order (``T_SOFF``, ``T_SW``);
* ``slots``:  (n,) int64 -- the state row of each batch row;
* ``x``:      (n, input_size) float, C-contiguous; ``out``: (n, output_size) float;
* ``scratch``: (n_max, table[0, T_LW]) float -- per-row workspace (layout: ``T_L*`` columns);
* ``iwork``:  (4 * n_max + 1,) int64 -- the duplicate-key plan (order, wave, wstart; once
  planned, the wave segment holds each row's state slot in plan order, ``srows``), then one
  flag per plan-order row (``bad``: 1 when the row produced a NaN/inf state or output);
* ``mark``:   (capacity,) int64, all zero between calls.

Per-row helpers take 2-D arrays and row indices rather than row views (see the note above
``_gates_zr``): Numba counts references to views passed between functions atomically.

A key that appears k times in one batch is stepped k times in batch order: rows are split into
"waves" (wave w holds every key's (w+1)-th occurrence), and waves run one after another. Within a
wave every row has its own state slot, so rows run in parallel without races.

No kernel leaves a NaN/inf in a stream's state. A block kernel copies each row's state into
the row's backup region (``T_LBK``) as the row starts, and checks the row's new state and output
as it ends (a comparison per value: :func:`_nonfinite`). If any row failed, every state row of the
call is restored from the backups in reverse plan order (so a key stepped in several waves ends
with the backup of its first wave, its state before the call) and the kernel returns
``PRODUCED_NONFINITE``; the flags say which rows failed. Return codes: -1 done, ``>= 0`` the
first input row holding NaN/inf (nothing was done), ``PRODUCED_NONFINITE`` (nothing changed).

Kernels pick the float32 fast tanh from the compute dtype (``itemsize == 4`` of the scratch and
state arrays), never from the weights' dtype, so each kernel has one compiled signature per
dtype.
"""

import math
import typing
import warnings

import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils, errors
from numba.core.codegen import JITCodeLibrary, JITCPUCodegen
from numba.core.compiler_lock import global_compiler_lock
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic

from .activations import (
    ACT_AFFINE,
    ACT_ELU,
    ACT_HARDSIGMOID,
    ACT_IDENTITY,
    ACT_LEAKYRELU,
    ACT_RELU,
    ACT_SCALEDTANH,
    ACT_SIGMOID,
    ACT_SOFTMAX,
    ACT_SOFTPLUS,
    ACT_SOFTSIGN,
    ACT_TANH,
    ACT_THRESHOLDEDRELU,
    FASTMATH,
)
from .isa import TILE

# table columns, per layer. Every kind: T_KIND, sizes T_IN -> T_OUT, and up to three products,
# each a group of four columns: the input product W (T_W: offset of its panels in params, T_BW:
# of its bias in fp (flat), T_NPW: panel count, T_QW: of its int8 scales in fp), the recurrent
# product R over the layer's state (T_R, T_BR, T_NPR, T_QR; 0 panels: none), a product of the
# cell's workspace between the two halves of its cell (T_RN, T_BRN, T_NPRN, T_QRN; 0: none);
# the state's offset in a stream's state row and its width (T_SOFF, T_SW; width 0: stateless).
# Per kind: activation ids T_F, T_G and T_LBR (GRU: linear_before_reset; Dense: T_F only).
# T_XOUT: 1 when the input product is the layer's output before its cell (Dense): it lands in
# the layer's output region, where the cell finishes it in place, rather than in GX and then
# copied row by row (that copy cost ~6% of a 100-step sequence at I=16, H=64 with a Dense(4)
# head). T_HID: the width of the cell's own workspace, which is the T_RN product's input (GRU:
# H, r * h; LSTM: hidden_size, o * h(C') ahead of the projection). LSTM: T_H the cell-output
# activation id, T_PEEP the flat offset of the peepholes [P_i; P_o; P_f] in fp (-1: none),
# T_IFG input_forget.
(T_KIND, T_IN, T_OUT, T_W, T_BW, T_NPW, T_QW, T_R, T_BR, T_NPR, T_QR, T_RN, T_BRN, T_NPRN, T_QRN,
 T_F, T_G, T_LBR, T_SOFF, T_SW, T_XOUT, T_HID, T_H, T_PEEP, T_IFG) = range(25)
# table columns: the scratch-row layout, repeated in every row
T_LA, T_LB, T_LGX, T_LGH, T_LHH, T_LT, T_LBK, T_LW = range(25, 33)
# T_PATH: the layer's cell path (PATH_* below) for the table's compute dtype, set by
# packing.pack from :func:`cell_path`
T_PATH = 33
NT = 34
# fp columns: activation parameters (f, g, and the LSTM's h) and clip, one row per layer; the
# rows after the layers' hold every other float the kernels read (biases, int8 scales,
# peepholes), addressed flat (fp.reshape(fp.size)[offset]).
F_FA, F_FB, F_GA, F_GB, F_CLIP, F_HA, F_HB = range(7)
NF = 7
# Layer kinds (T_KIND): each has a cell helper (_gru_cell, _dense_cell, _lstm_cell) reached
# from _cell.
KIND_GRU, KIND_DENSE, KIND_LSTM = 0, 1, 2
# Bytes per vector of the product tiles: the target's registers (streamgru.isa picks the tile).
VEC_BYTES = TILE.vec_bytes
# Compact weights (float16, int8) in the few-row tiles are converted COMPACT_SPLIT vectors of
# TILE.compact_vec_bytes at a time instead of one of VEC_BYTES, where the target's narrower
# conversions are faster per value (isa.TileConfig.compact_vec_bytes), in tiles whose
# accumulators then still number at most COMPACT_MAX_ACC.
COMPACT_SPLIT = VEC_BYTES // TILE.compact_vec_bytes
COMPACT_MAX_ACC = 16
# Rows per block of the row-parallel kernel, and the most rows one block may hold.
ROW_BLOCK = 64
MIN_BLOCKS = 4
# Rows per block of the serial kernel when the weights are larger than L2_BYTES (a typical L2 of
# one core, 512 KiB-2 MiB): see _serial_block. Measured with the fitted tiles; the k-split
# (AVX-512) build keeps the blocks it was tuned with.
SERIAL_BIG_BLOCK = 256 if TILE.k_split == 1 else ROW_BLOCK
L2_BYTES = 1 << 20
# A wave of fewer rows than this runs serially inside the parallel kernel.
SERIAL_WAVE_ROWS = 32
# How the sequence kernel spread over threads (run_sequence_wide) shares a layer's recurrent
# product, which each step needs before its cell and the next step:
# - a *team* (layers whose cell has no product between its halves, with at least
#   RUN_TEAM_MIN_MACS recurrent multiply-adds, padded panels counted: GRU from H~103, LSTM
#   from H~90): one parallel region for all T steps, in which the threads share each step's
#   panels and hand the step over through atomic counters (a few hundred ns a step, against
#   ~1.5 us for a parallel region). LSTM H=128, T=100 on 2 threads: 265 us against 395 us on
#   one (znver4);
# - a parallel region per step and product (the other layers from RUN_WIDE_MIN_MACS: 3H x H,
#   H >= 224 for a GRU): the weights (>= 600 KB float32) outgrow one core's L2, while each
#   core's share stays in its own (~9 us of product at H=256);
# - else the calling thread computes it.
RUN_WIDE_MIN_MACS = 150_000
RUN_TEAM_MIN_MACS = 32_768


def run_split_macs(table, itemsize):
    """Multiply-adds per step, padded panels counted, that :func:`run_sequence_wide` spreads
    over threads: every layer's input side (its input projection, or a Dense layer's product,
    computed for all T steps in one product) and the recurrent products whose steps it shares
    (a team or a parallel region per step, decided as the kernel decides: RUN_TEAM_MIN_MACS,
    RUN_WIDE_MIN_MACS). The rest (recurrent products the calling thread computes, the cells)
    runs one step after another on any number of threads. Plain Python on the packed table,
    for the engine's choice of kernel (``engine.RUN_SPLIT_MIN_MACS``)."""
    nr = 2 * VEC_BYTES // itemsize
    total = 0
    for l in range(table.shape[0]):
        npr, nprn = int(table[l, T_NPR]), int(table[l, T_NPRN])
        total += int(table[l, T_IN]) * int(table[l, T_NPW]) * nr
        rmacs = (int(table[l, T_OUT]) * npr + int(table[l, T_HID]) * nprn) * nr
        team = nprn == 0 and npr > 0 and rmacs >= RUN_TEAM_MIN_MACS
        if team or rmacs >= RUN_WIDE_MIN_MACS:
            total += rmacs
    return total


# Return code of a step/run kernel whose result would have held NaN/inf (state restored).
PRODUCED_NONFINITE = -2


def panel_width(dtype):
    """NR: the number of output columns one weight panel holds for ``dtype``."""
    return TILE.panel_width(dtype)


def _cacheable():
    """Whether Numba has a writable cache directory for this file (see :func:`cache_dir`).

    Without one, ``cache=True`` makes Numba raise at import ("no locator available"): a
    read-only install whose user has no writable home, say. The kernels then compile in every
    process instead, and a warning says how to give them a cache.
    """
    from numba.core.caching import FunctionCache

    try:
        FunctionCache(panel_width)
    except RuntimeError:
        warnings.warn("streamgru: Numba finds no writable cache directory for its kernels (not "
                      "NUMBA_CACHE_DIR, not __pycache__ next to streamgru/kernels.py, not the "
                      "user's cache directory), so every process compiles them on first use; "
                      "set NUMBA_CACHE_DIR to a writable directory (docs/operations.md)",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


# Numba keys its on-disk cache by the target CPU, not by the tile chosen at import: the tile
# follows from the target unless STREAMGRU_TILE forces one, and then nothing is cached (a forced
# build must neither load another tile's kernels nor leave its own for a normal process).
# No kernel is passed around as a first-class function, so none gets the C wrapper that needs.
_JIT = dict(cache=not TILE.forced and not config.DISABLE_JIT and _cacheable(),
            fastmath=FASTMATH, error_model="numpy", nogil=True, no_cfunc_wrapper=True)


class _NoEnv:
    """A helper library's view of its codegen: Numba points each compiled function's environment
    global at its environment object (``set_env``), which needs the function in the JIT; a
    helper's own module never goes there (:class:`_HelperLibrary`), and its code, linked into
    the kernels that call it, holds no Python object, raises only static exceptions and so
    never reads that environment."""

    def __init__(self, codegen):
        self._codegen = codegen

    def set_env(self, env_name, env):
        pass

    def __getattr__(self, name):
        return getattr(self._codegen, name)


class _HelperLibrary(JITCodeLibrary):
    """The code library of a helper only kernels call (:func:`_inner`).

    Numba links a callee's optimised LLVM module into each caller's library and makes machine
    code of the whole; on its own the callee's library would be made machine code too, which
    nothing runs (no wrapper makes it callable from Python) and nothing reads (the helpers are
    not cached: every kernel's cache entry holds its callees' code). This library is optimised
    as usual, so that its callers link the same optimised code (the same bits in every kernel),
    but never goes to the JIT: on an empty cache, a first step compiles ~0.2 s sooner (Zen 4).
    """

    @property
    def codegen(self):
        return _NoEnv(self._codegen)

    def _loaded(self):
        # A library read back from a cache entry holds a cached function's own machine code:
        # it goes to the JIT as usual. (Only helpers are compiled while this class is Numba's
        # library class, and helpers are not cached; this is for safety.)
        return getattr(self, "_compiled_object", None) is not None

    def _finalize_final_module(self):
        if self._loaded():
            return super()._finalize_final_module()
        self._finalize_dynamic_globals()
        self._verify_declare_only_symbols()
        self._finalized = True

    def get_pointer_to_function(self, name):
        if self._loaded():
            return super().get_pointer_to_function(name)
        self._ensure_finalized()
        return 0


def _helper_libraries_supported():
    """Whether this Numba has the code-library internals :class:`_HelperLibrary` overrides and
    :meth:`_KernelOnly.compile` swaps (Numba does not promise them). Without them the helpers
    are compiled and cached as any function: a slower cold start, the same results."""
    methods = ("_finalize_final_module", "_finalize_dynamic_globals",
               "_verify_declare_only_symbols", "_ensure_finalized", "get_pointer_to_function")
    return (all(callable(getattr(JITCodeLibrary, m, None)) for m in methods)
            and isinstance(getattr(JITCodeLibrary, "codegen", None), property)
            and getattr(JITCPUCodegen, "_library_class", None) is JITCodeLibrary)


_HELPER_LIBRARIES = _helper_libraries_supported()


class _KernelOnly(CPUDispatcher):
    """The dispatcher of a helper that only compiled kernels call (:func:`_inner`)."""

    def __call__(self, *args, **kwargs):
        raise TypeError(f"streamgru.kernels.{self.py_func.__name__} is called only from compiled "
                        f"kernels (it has no entry point from Python); call it from an njit "
                        f"function")

    def compile(self, sig):
        # Numba's codegen makes the libraries of every function compiled while this helper
        # is: the helper's own and those of its callees (Numba's overloads and other helpers),
        # which only it links. The global compiler lock is held throughout (Numba's).
        if not _HELPER_LIBRARIES:
            return super().compile(sig)
        with global_compiler_lock:
            codegen = self.targetctx.codegen()
            before = codegen.__dict__.get("_library_class")
            codegen._library_class = _HelperLibrary
            try:
                return super().compile(sig)
            finally:
                if before is None:
                    del codegen._library_class
                else:
                    codegen._library_class = before


def _inner(func, parallel=False):
    """``njit(**_JIT)`` for a helper that only kernels call: compiled without the CPython wrapper
    (argument unboxing and result boxing) and without machine code of its own
    (:class:`_HelperLibrary`), and not cached. On an empty cache every wrapper and every
    helper's machine code is work for nothing: without them the first step of a new process
    compiles ~20% faster (benchmarks/RESULTS.md, "Cold start"). Without a wrapper Numba's
    dispatcher would jump to no code when called from Python; this one raises."""
    if config.DISABLE_JIT:
        return func
    opts = {k: v for k, v in _JIT.items() if k != "cache"}
    disp = _KernelOnly(py_func=func, locals={},
                       targetoptions=dict(opts, nopython=True, boundscheck=None,
                                          parallel=parallel, no_cpython_wrapper=True))
    if _JIT["cache"] and not _HELPER_LIBRARIES:  # the fallback: helpers cached as before
        disp.enable_caching()
    return disp


# ----------------------------------------------------------------------------------------------
# the product micro-kernel


def _check_array(who, name, ty, ndim, dtype=None):
    """At typing time: refuse an argument an intrinsic's codegen cannot read.

    The intrinsics address elements as ``data + i * shape[1] + j`` (2-D) or ``data + i`` (1-D),
    which is right only for a C-contiguous array of that many dimensions; anything else would
    read the wrong memory silently, so it is a TypingError naming the intrinsic and argument.
    """
    if not isinstance(ty, types.Array) or ty.ndim != ndim or ty.layout != "C" \
            or (dtype is not None and ty.dtype != dtype):
        want = f"{dtype} " if dtype is not None else ""
        raise errors.TypingError(
            f"{who}: {name}: expected a C-contiguous {ndim}-D {want}array (rows are addressed "
            f"with shape[1] as the stride), got {ty}")


def _load_weights(builder, ptr, vty, wdt):
    """Load one vector of weights from ``ptr`` (elements of Numba type ``wdt``, how ``params``
    stores them) as ``vty`` (the compute dtype's vector): the one place a weight enters the
    arithmetic.

    Weights stored in the compute dtype are a plain load. float16 weights reach the kernels as
    their bits in a uint16 array (Numba's CPU target has no float16 arrays): loaded as halves
    and widened (``fpext``: F16C's vcvtph2ps on x86). int8 weights are loaded as bytes and
    converted (``sitofp``; the tile applies the row's scale to the finished sum, see
    :func:`_make_tile`).
    """
    if wdt == types.uint16 and TILE.half:
        half = ir.VectorType(ir.HalfType(), vty.count)
        return builder.fpext(builder.load(builder.bitcast(ptr, half.as_pointer()), align=2), vty)
    if wdt == types.uint16:
        # No hardware conversion (x86 before F16C): LLVM would call a runtime helper that
        # Numba's JIT cannot resolve. Widen the bits instead: exponent and mantissa shifted
        # into place and rescaled by 2**112 (the exponent biases' difference; exact for normal
        # and subnormal halves alike), then the sign. Weights are finite (compact.to_float16).
        i32 = ir.VectorType(ir.IntType(32), vty.count)

        def splat(v):
            return ir.Constant(i32, [v] * vty.count)

        h = builder.zext(builder.load(builder.bitcast(
            ptr, ir.VectorType(ir.IntType(16), vty.count).as_pointer()), align=2), i32)
        mag = builder.bitcast(builder.shl(builder.and_(h, splat(0x7FFF)), splat(13)), vty)
        mag = builder.fmul(mag, ir.Constant(vty, [2.0 ** 112] * vty.count))
        sign = builder.shl(builder.and_(h, splat(0x8000)), splat(16))
        return builder.bitcast(builder.or_(builder.bitcast(mag, i32), sign), vty)
    if wdt == types.int8:
        i8 = ir.VectorType(ir.IntType(8), vty.count)
        return builder.sitofp(builder.load(builder.bitcast(ptr, i8.as_pointer()), align=1), vty)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4)


def _make_tile(MR, KU, NP=1, fused=True, resume=False):
    """An intrinsic computing ``C[ci+r, cj:cj+NP*NR] = A[ai+r, ak:ak+K] @ panels + bias`` for
    r < MR.

    Panel j (j < NP) is P[woff+j*K*NR : woff+(j+1)*K*NR] as (K, NR), its bias
    F[boff+j*NR : boff+(j+1)*NR] (consecutive panels of one product; ``F`` is the float side
    table ``fp``, addressed flat). Accumulators live in MR*KU*NP*NV vector registers (NV = 2
    per panel row, or 2 * COMPACT_SPLIT narrower ones for compact weights in the few-row
    tiles); KU > 1 splits k over independent accumulators, NP > 1 takes several panels at
    once: either hides the FMA latency when few rows share each weight load. ``fused`` uses
    LLVM's fma (one rounding); without it a multiply then an add (targets that have no fused
    multiply-add would otherwise call libm's fmaf for every lane). With ``resume`` the
    accumulators start from C's block instead of the bias: the product over k continues where a
    tile over the previous k range stopped (``woff`` and ``ak`` then point at that k). C is
    stored and reloaded in its own dtype, exactly, so the sums are the same bits as in one pass.

    The weights' dtype (``P``'s) picks the load (:func:`_load_weights`). int8 weights: the
    accumulators start from zero (or C's block, resuming) and sum ``A * q``; when ``fin`` is
    nonzero (the block that ends the product over k) the tile stores ``sum * scale + bias``
    with the panel's per-column scales F[soff+j*NR ...], otherwise the raw sum for the next
    block to resume. Other weights ignore ``soff`` and ``fin``.

    ``rows`` (the argument after A) is an int64 array or None, which decides at compile time:
    an array gathers, reading input row r from A[rows[ai+r], ak:ak+K], so that products read
    the batch's inputs and the streams' states where they are, with no copy into a workspace
    first; None reads A[ai+r]. The arithmetic is the same either way.
    """

    def codegen(context, builder, signature, args):
        A_, R_, ai_, ak_, K_, P_, woff_, F_, boff_, soff_, fin_, C_, ci_, cj_ = args
        gather = not isinstance(signature.args[1], types.NoneType)
        pty, fty, cty = signature.args[5], signature.args[7], signature.args[11]
        # The compute dtype (A, C, F and the accumulators); weights go through _load_weights.
        dt = cty.dtype
        lty = context.get_value_type(dt)
        quant = pty.dtype == types.int8
        NR = 2 * VEC_BYTES // (dt.bitwidth // 8)
        # Vectors per panel row: 2 of VEC_BYTES, or COMPACT_SPLIT times more of a narrower
        # width for compact weights in the few-row tiles (see COMPACT_SPLIT). Each output
        # lane has its own accumulator either way, so the sums are the same bits.
        NV = 2
        if pty.dtype != dt and MR * KU * NP * 2 * COMPACT_SPLIT <= COMPACT_MAX_ACC:
            NV = 2 * COMPACT_SPLIT
        VW = NR // NV
        vty = ir.VectorType(lty, VW)
        vptr = vty.as_pointer()
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)

        def c64(v):
            return ir.Constant(i64, v)

        a = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=A_)
        p = cgutils.create_struct_proxy(pty)(context, builder, value=P_)
        f = cgutils.create_struct_proxy(fty)(context, builder, value=F_)
        c = cgutils.create_struct_proxy(cty)(context, builder, value=C_)
        lda = cgutils.unpack_tuple(builder, a.shape, 2)[1]
        ldc = cgutils.unpack_tuple(builder, c.shape, 2)[1]
        if gather:
            rw = cgutils.create_struct_proxy(signature.args[1])(context, builder, value=R_)
            arow = [builder.gep(a.data, [builder.add(builder.mul(
                builder.load(builder.gep(rw.data, [builder.add(ai_, c64(r))])), lda), ak_)])
                for r in range(MR)]
        else:
            abase = builder.gep(a.data, [builder.add(builder.mul(ai_, lda), ak_)])
            arow = [builder.gep(abase, [builder.mul(c64(r), lda)]) for r in range(MR)]
        cbase = builder.gep(c.data, [builder.add(builder.mul(ci_, ldc), cj_)])
        wbase = builder.gep(p.data, [woff_])
        bbase = builder.gep(f.data, [boff_])
        sbase = builder.gep(f.data, [soff_])
        wpan = [wbase]
        if NP > 1:
            kstride = builder.mul(K_, c64(NR))
            wpan += [builder.gep(wbase, [builder.mul(kstride, c64(j))]) for j in range(1, NP)]
        if fused:
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                f"llvm.fma.v{VW}f{dt.bitwidth}")

            def madd(x, y, z):
                return builder.call(fma, [x, y, z])
        else:
            def madd(x, y, z):
                return builder.fadd(builder.fmul(x, y), z)

        def fvec(base, j, v):  # one vector of the float side table (bias or scale)
            return builder.load(builder.bitcast(builder.gep(base, [c64(j * NR + v * VW)]), vptr),
                                align=4)

        zero = ir.Constant(vty, None)
        if resume:
            init = [[[builder.load(builder.bitcast(builder.gep(
                cbase, [builder.add(builder.mul(c64(r), ldc), c64(j * NR + v * VW))]), vptr),
                align=4) for v in range(NV)] for j in range(NP)] for r in range(MR)]
        elif quant:
            init = [[[zero] * NV] * NP] * MR
        else:
            init = [[[fvec(bbase, j, v) for v in range(NV)] for j in range(NP)]] * MR
        acc = [[[[cgutils.alloca_once_value(builder, init[r][j][v] if u == 0 else zero)
                  for v in range(NV)] for j in range(NP)] for u in range(KU)] for r in range(MR)]
        und = ir.Constant(vty, ir.Undefined)
        bmask = ir.Constant(ir.VectorType(i32, VW), [0] * VW)

        def body(k, u):
            koff = builder.mul(k, c64(NR))
            wv = []
            for j in range(NP):
                wk = builder.gep(wpan[j], [koff])
                wv.append([_load_weights(builder, builder.gep(wk, [c64(v * VW)]), vty, pty.dtype)
                           for v in range(NV)])
            for r in range(MR):
                s = builder.load(builder.gep(arow[r], [k]))
                bv = builder.shuffle_vector(builder.insert_element(und, s, ir.Constant(i32, 0)),
                                            und, bmask)
                for j in range(NP):
                    for v in range(NV):
                        slot = acc[r][u][j][v]
                        builder.store(madd(bv, wv[j][v], builder.load(slot)), slot)

        if KU == 1:
            with cgutils.for_range(builder, K_) as loop:
                body(loop.index, 0)
        else:
            kq = builder.sdiv(K_, c64(KU))
            with cgutils.for_range(builder, kq) as loop:
                k0 = builder.mul(loop.index, c64(KU))
                for u in range(KU):
                    body(builder.add(k0, c64(u)), u)
            with cgutils.for_range(builder, builder.sub(K_, builder.mul(kq, c64(KU)))) as loop:
                body(builder.add(builder.mul(kq, c64(KU)), loop.index), 0)
        if quant:  # the end of the product: scale and bias, else the raw sum for the next block
            fin = builder.icmp_signed("!=", fin_, c64(0))
            scale = [[fvec(sbase, j, v) for v in range(NV)] for j in range(NP)]
            bias = [[fvec(bbase, j, v) for v in range(NV)] for j in range(NP)]
        for r in range(MR):
            crow = builder.gep(cbase, [builder.mul(c64(r), ldc)])
            for j in range(NP):
                for v in range(NV):
                    tot = builder.load(acc[r][0][j][v])
                    for u in range(1, KU):
                        tot = builder.fadd(tot, builder.load(acc[r][u][j][v]))
                    if quant:
                        tot = builder.select(fin, madd(tot, scale[j][v], bias[j][v]), tot)
                    builder.store(tot, builder.bitcast(builder.gep(crow, [c64(j * NR + v * VW)]),
                                                       vptr), align=4)
        return context.get_dummy_value()

    @intrinsic
    def tile(typingctx, A, rows, ai, ak, K, P, woff, F, boff, soff, fin, C, ci, cj):
        _check_array("tile", "A", A, 2)
        if not isinstance(rows, types.NoneType):
            _check_array("tile", "rows", rows, 1, types.int64)
        _check_array("tile", "C", C, 2, A.dtype)  # the compute dtype
        _check_array("tile", "F", F, 2, A.dtype)  # biases and scales, in the compute dtype
        # Weights in the compute dtype, or compact (float16 as uint16 bits, int8) under float32
        # arithmetic.
        compact = A.dtype == types.float32 and isinstance(P, types.Array) \
            and P.dtype in (types.uint16, types.int8)
        _check_array("tile", "params", P, 1, P.dtype if compact else A.dtype)
        return types.void(A, rows, ai, ak, K, P, woff, F, boff, soff, fin, C, ci, cj), codegen

    return tile


def _make_tile_python(MR, KU, NP=1, fused=True, resume=False):
    """The same product in numpy, for NUMBA_DISABLE_JIT=1 runs (intrinsics need the compiler)."""

    def tile(A, rows, ai, ak, K, P, woff, F, boff, soff, fin, C, ci, cj):
        src = A[ai:ai + MR, ak:ak + K] if rows is None else A[rows[ai:ai + MR], ak:ak + K]
        nr = 2 * VEC_BYTES // C.itemsize
        W = P[woff:woff + NP * K * nr].reshape(NP, K, nr).transpose(1, 0, 2).reshape(K, NP * nr)
        if W.dtype == np.uint16:  # float16 weights travel as their bits (see _load_weights)
            W = W.view(np.float16)
        flat = F.reshape(F.size)
        quant = P.dtype == np.int8
        if resume:
            start = C[ci:ci + MR, cj:cj + NP * nr]
        else:
            start = 0 if quant else flat[boff:boff + NP * nr]
        out = src @ W.astype(C.dtype) + start
        if quant and fin:
            out = out * flat[soff:soff + NP * nr] + flat[boff:boff + NP * nr]
        C[ci:ci + MR, cj:cj + NP * nr] = out

    return tile


_make = _make_tile_python if config.DISABLE_JIT else _make_tile
# The tile shapes of TILE (see streamgru.isa): rows of the tiles, largest first, and the panels
# each computes at once. _gemm* below are written for four shapes.
_MR_A, _MR_B, _MR_C, _MR_D = TILE.rows
_NP_A, _NP_B, _NP_C, _NP_D = TILE.panels
_KU = TILE.k_split
# Panels a one-row product takes at once (1 with the k-split tile): parallel kernels hand out
# panel groups of this size so that every thread uses the widest one-row tile.
PANEL_GROUP = TILE.panel_group

# Every tile reads its input rows in place (rows=None) or gathered (rows an int64 array); the
# argument's type picks the code at compile time, so one tile of each shape serves both.
if _KU > 1:
    # Every tile splits k over the same two accumulator sets (KU=2), so a row's result has the
    # same rounding whichever tile computes it: a batch gives bit-identical results to separate
    # calls.
    _tile6 = _make(6, 2)
    _tile4 = _make(4, 2)
    _tile2 = _make(2, 2)
    _tile1 = _make(1, 2)
else:
    # No tile splits k (KU=1): every output is the bias plus its products in k order whichever
    # tile computes it, so a batch gives bit-identical results to separate calls. The few-row
    # tiles take several panels instead (and one panel for a product's last panels).
    _tile_a = _make(_MR_A, 1, _NP_A, TILE.fma)
    _tile_ar = _make(_MR_A, 1, _NP_A, TILE.fma, True)
    _tile_b = _make(_MR_B, 1, _NP_B, TILE.fma)
    _tile_br = _make(_MR_B, 1, _NP_B, TILE.fma, True)
    _tile_c = _make(_MR_C, 1, _NP_C, TILE.fma)
    _tile_c1 = _make(_MR_C, 1, 1, TILE.fma)
    _tile_d = _make(_MR_D, 1, _NP_D, TILE.fma)
    _tile_d1 = _make(_MR_D, 1, 1, TILE.fma)


@_inner
def _gemm_ksplit(params, fp, woff, boff, soff, K, p0, p1, src, rows, s0, dst, d0, r0, r1):
    """dst[i, d0 + p*NR ...] = src[i, s0:s0+K] @ panels p0..p1-1 + bias, for rows i in [r0, r1)
    (input row i is src[rows[i]] when ``rows`` is an array: a gather; None reads src[i]). The
    product's panels start at params[woff], its bias at flat offset ``boff`` of ``fp`` and its
    int8 scales at ``soff`` (a layer's table column group ``T_W``, ``T_R`` or ``T_RN``). The
    offsets travel as ints, not as the table and a column: every array argument of a compiled
    call is passed as its struct's fields, and the sequence kernel calls this every step.

    Each panel (K x NR) stays in L1 while every row block of the range passes over it.
    """
    nr = 2 * VEC_BYTES // dst.itemsize
    one = np.int64(1)
    for p in range(p0, p1):
        w = woff + p * K * nr
        b = boff + p * nr
        q = soff + p * nr
        c = d0 + p * nr
        i = r0
        while i + 6 <= r1:
            _tile6(src, rows, i, s0, K, params, w, fp, b, q, one, dst, i, c)
            i += 6
        if i + 4 <= r1:
            _tile4(src, rows, i, s0, K, params, w, fp, b, q, one, dst, i, c)
            i += 4
        if i + 2 <= r1:
            _tile2(src, rows, i, s0, K, params, w, fp, b, q, one, dst, i, c)
            i += 2
        if i < r1:
            _tile1(src, rows, i, s0, K, params, w, fp, b, q, one, dst, i, c)


# The fitted product covers a row range with tiles of one height, the last one shifted back to
# end at r1 when the height does not divide the range: it recomputes a few rows, to the same
# values (every tile sums in the same order; no product writes columns it reads), rather than
# finishing with short tiles whose few accumulators wait on the FMA latency. The full tiles
# take the panel in blocks of PANEL_BLOCK_BYTES of k (resuming from the outputs stored after
# the previous block, which is exact; int8 weights store raw sums until the block that ends k,
# which applies the scales and bias), so that the block stays in L1 while every tile of the
# range passes over it; the shifted last tile runs over all of k in one go (from the bias, so
# that rows it shares with the tile before it get the same values again, not twice the sum).
# Half of a 32 KiB L1d, the other half for the rows' inputs.
PANEL_BLOCK_BYTES = 16384


@_inner
def _gemm_fit(params, fp, woff, boff, soff, K, p0, p1, src, rows, s0, dst, d0, r0, r1):
    """dst[i, d0 + p*NR ...] = src[i, s0:s0+K] @ panels p0..p1-1 + bias, for rows i in [r0, r1)
    (input row i is src[rows[i]] when ``rows`` is an array: a gather; None reads src[i]); the
    offsets as in :func:`_gemm_ksplit`.

    From _MR_B rows on, each panel (K x NR) stays in L1 while the tiles pass over it; fewer
    rows take _NP_C or _NP_D panels at once (then one at a time for the last ones).
    """
    nr = 2 * VEC_BYTES // dst.itemsize
    one = np.int64(1)
    m = r1 - r0
    if m >= _MR_B:
        kc = PANEL_BLOCK_BYTES // (nr * params.itemsize)
        for p in range(p0, p1):
            w = woff + p * K * nr
            b = boff + p * nr
            q = soff + p * nr
            c = d0 + p * nr
            if m >= _MR_A:
                e = r1 - m % _MR_A
                for k0 in range(0, K, kc):
                    kn = min(kc, K - k0)
                    fin = np.int64(k0 + kn == K)
                    for i in range(r0, e, _MR_A):
                        if k0 == 0:
                            _tile_a(src, rows, i, s0, kn, params, w, fp, b, q, fin, dst, i, c)
                        else:
                            _tile_ar(src, rows, i, s0 + k0, kn, params, w + k0 * nr, fp, b, q,
                                     fin, dst, i, c)
                if e < r1:
                    _tile_a(src, rows, r1 - _MR_A, s0, K, params, w, fp, b, q, one, dst,
                            r1 - _MR_A, c)
            else:
                e = r1 - m % _MR_B
                for k0 in range(0, K, kc):
                    kn = min(kc, K - k0)
                    fin = np.int64(k0 + kn == K)
                    for i in range(r0, e, _MR_B):
                        if k0 == 0:
                            _tile_b(src, rows, i, s0, kn, params, w, fp, b, q, fin, dst, i, c)
                        else:
                            _tile_br(src, rows, i, s0 + k0, kn, params, w + k0 * nr, fp, b, q,
                                     fin, dst, i, c)
                if e < r1:
                    _tile_b(src, rows, r1 - _MR_B, s0, K, params, w, fp, b, q, one, dst,
                            r1 - _MR_B, c)
    elif m >= _MR_C:
        p = p0
        while p < p1:
            np_ = _NP_C if p + _NP_C <= p1 else 1
            w = woff + p * K * nr
            b = boff + p * nr
            q = soff + p * nr
            c = d0 + p * nr
            i = r0
            while i < r1:
                j = min(i, r1 - _MR_C)
                if np_ == _NP_C:
                    _tile_c(src, rows, j, s0, K, params, w, fp, b, q, one, dst, j, c)
                else:
                    _tile_c1(src, rows, j, s0, K, params, w, fp, b, q, one, dst, j, c)
                i += _MR_C
            p += np_
    elif m >= 1:
        p = p0
        while p < p1:
            np_ = _NP_D if p + _NP_D <= p1 else 1
            w = woff + p * K * nr
            b = boff + p * nr
            q = soff + p * nr
            c = d0 + p * nr
            for i in range(r0, r1, _MR_D):
                if np_ == _NP_D:
                    _tile_d(src, rows, i, s0, K, params, w, fp, b, q, one, dst, i, c)
                else:
                    _tile_d1(src, rows, i, s0, K, params, w, fp, b, q, one, dst, i, c)
            p += np_


# The product every kernel calls: the tile's own (the target decides; see streamgru.isa).
_gemm = _gemm_ksplit if _KU > 1 else _gemm_fit
# The one-row tiles, all that step_one compiles: _NP_D panels at once, and one panel.
_row_tile, _row_tile1 = (_tile1, _tile1) if _KU > 1 else (_tile_d, _tile_d1)


@njit(inline="always", **_JIT)
def _product(table, l, col):
    """(panels' offset, bias offset, scales offset) of layer ``l``'s product at table column
    ``col``: what :func:`_gemm` takes, as ints (see there why not the table)."""
    return table[l, col], table[l, col + 1], table[l, col + 3]


@njit(inline="always", **_JIT)
def _groups(npan, size):
    """Number of ``size``-panel groups covering npan panels (the last may be short)."""
    return (npan + size - 1) // size


@njit(inline="always", **_JIT)
def _group(g, npan, size):
    """(p0, p1): the panels of group g of npan panels in groups of ``size``."""
    return g * size, min(npan, (g + 1) * size)


@njit(inline="always", **_JIT)
def _nth(q, ng, rev):
    """Group q of ng, counted from the last one when ``rev``. An int64 whatever q's type: a
    parallel loop's index may be unsigned, and unsigned minus signed is a float in Numba."""
    g = np.int64(q)
    return ng - 1 - g if rev else g


@_inner
def _gemv(params, fp, table, l, col, K, src, si, s0, dst, di, d0, rev):
    """dst[di, d0:d0 + npan*NR] = src[si, s0:s0+K] @ panels 0..npan-1 + bias: one row of
    layer ``l``'s product at table column ``col`` (T_W, T_R or T_RN: its panels' offset, bias
    offset, panel count npan and scales offset, as :func:`_gemm` takes them), last group of
    PANEL_GROUP panels first when ``rev`` (the order changes which weights are read last,
    never a result: see :func:`run_sequence`).

    The same tiles as :func:`_gemm` takes for one row, panel for panel, so the same bits; the
    one-event kernel calls this instead so that it does not compile the many-row tiles (a
    first step on an empty cache then costs a fraction of the compile time). The offsets are
    read here rather than by the caller: compiled once, not in every call site.
    """
    woff, boff, soff = _product(table, l, col)
    npan = table[l, col + 2]
    nr = 2 * VEC_BYTES // dst.itemsize
    one = np.int64(1)
    ng = _groups(npan, PANEL_GROUP)
    for q in range(ng):
        g = ng - 1 - q if rev else q
        p0, p1 = _group(g, npan, PANEL_GROUP)
        if p1 - p0 == _NP_D:
            _row_tile(src, None, si, s0, K, params, woff + p0 * K * nr, fp, boff + p0 * nr,
                      soff + p0 * nr, one, dst, di, d0 + p0 * nr)
        else:
            for p in range(p0, p1):
                _row_tile1(src, None, si, s0, K, params, woff + p * K * nr, fp, boff + p * nr,
                           soff + p * nr, one, dst, di, d0 + p * nr)


def _elem_ptr2(context, builder, aty, A_, i_, j_):
    """Pointer to A[i, j] of a 2-D C array (``data + i * shape[1] + j``; see _check_array)."""
    a = cgutils.create_struct_proxy(aty)(context, builder, value=A_)
    ld = cgutils.unpack_tuple(builder, a.shape, 2)[1]
    return builder.gep(a.data, [builder.add(builder.mul(i_, ld), j_)])


def _emit_prefetch(builder, ptr, rw, locality):
    """Call ``llvm.prefetch(ptr, rw, locality, data)``: a hint on every target (a no-op where the
    CPU has none) that never faults, so the address need not be checked."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, rw), ir.Constant(i32, locality),
                      ir.Constant(i32, 1)])


@intrinsic
def _prefetch_w(typingctx, A, i, j):
    """Hint the CPU to fetch the cache line of A[i, j] (2-D C array) into L2 with write intent
    (state rows are read, then written; the inputs fetched this way are only read, which costs
    nothing extra for lines no other core writes). L2 keeps L1 for the weight panel."""
    _check_array("_prefetch_w", "A", A, 2)
    sig = types.void(A, i, j)

    def codegen(context, builder, signature, args):
        A_, i_, j_ = args
        _emit_prefetch(builder, _elem_ptr2(context, builder, signature.args[0], A_, i_, j_), 1, 2)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch_r(typingctx, A, i):
    """Hint the CPU to fetch the cache line of A[i] (1-D array) into L1 for reading."""
    _check_array("_prefetch_r", "A", A, 1)
    sig = types.void(A, i)

    def codegen(context, builder, signature, args):
        A_, i_ = args
        a = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=A_)
        _emit_prefetch(builder, builder.gep(a.data, [i_]), 0, 3)
        return context.get_dummy_value()

    return sig, codegen


def _span(context, builder, signature, args):
    """For an intrinsic over A[i, lo:hi] (arguments A, i, lo, hi): the pointer to A[i, 0], and lo,
    hi and the intp type as LLVM values."""
    ty = signature.args
    i_, lo_, hi_ = (_index(context, builder, ty[k], args[k]) for k in (1, 2, 3))
    intp = context.get_value_type(types.intp)
    return _elem_ptr2(context, builder, ty[0], args[0], i_, ir.Constant(intp, 0)), lo_, hi_, intp


@intrinsic
def _prefetch_span(typingctx, A, i, lo, hi):
    """Hint the CPU to fetch the cache lines of A[i, lo:hi] (2-D C array) into L1 for reading.

    The cells read each row's product outputs (the gates' pre-activations) from the workspace,
    where the products wrote them one panel at a time over every row of the block: by then they
    are in L2, a dozen lines per row at different offsets, which the hardware prefetchers did
    not bring into L1 ahead of the cell. Fetching the next row's lines while the cell computes
    this one took up to 3% off a 4096-row LSTM step at H=128 (docs/kernels.md)."""
    _check_array("_prefetch_span", "A", A, 2)
    _check_ints("_prefetch_span", i=i, lo=lo, hi=hi)
    sig = types.void(A, i, lo, hi)

    def codegen(context, builder, signature, args):
        row, lo_, hi_, intp = _span(context, builder, signature, args)
        step = ir.Constant(intp, max(1, 64 // (signature.args[0].dtype.bitwidth // 8)))
        with cgutils.for_range_slice(builder, lo_, hi_, step, intp) as (k, _):
            _emit_prefetch(builder, builder.gep(row, [k]), 0, 3)
        return context.get_dummy_value()

    return sig, codegen


def _prefetch_python(*args):
    """NUMBA_DISABLE_JIT=1 stand-in: a hint, so doing nothing is correct."""


if config.DISABLE_JIT:
    _prefetch_w = _prefetch_r = _prefetch_span = _prefetch_python  # noqa: F811


# ----------------------------------------------------------------------------------------------
# atomics: the sequence kernel's team shares each step's recurrent product (RUN_TEAM_MIN_MACS)


def _elem_ptr(context, builder, aty, A_, i_):
    a = cgutils.create_struct_proxy(aty)(context, builder, value=A_)
    return builder.gep(a.data, [i_])


@intrinsic
def _atomic_add(typingctx, A, i, v):
    """A[i] += v, atomically (sequentially consistent); returns the value before. A: 1-D int64."""
    _check_array("_atomic_add", "A", A, 1, types.int64)
    sig = types.int64(A, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_cas(typingctx, A, i, old, new):
    """If A[i] == old, A[i] = new, atomically (sequentially consistent); returns whether it
    did. A: 1-D int64."""
    _check_array("_atomic_cas", "A", A, 1, types.int64)
    sig = types.boolean(A, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        res = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, A, i):
    """A[i], read atomically (sequentially consistent): every write made before another
    thread's atomic write of it is visible after. A: 1-D int64."""
    _check_array("_atomic_load", "A", A, 1, types.int64)
    sig = types.int64(A, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return sig, codegen


@intrinsic
def _spin_pause(typingctx):
    """One turn of a spin-wait: x86's ``pause`` (it lets the core's other thread run and
    spares the memory pipeline), nothing elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if context.codegen().magic_tuple()[0].startswith(("x86_64", "i386", "i686")):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


def _atomic_add_python(A, i, v):
    old = int(A[i])
    A[i] = old + v
    return old


def _atomic_cas_python(A, i, old, new):
    if A[i] != old:
        return False
    A[i] = new
    return True


if config.DISABLE_JIT:
    _atomic_add = _atomic_add_python  # noqa: F811
    _atomic_cas = _atomic_cas_python  # noqa: F811
    _atomic_load = lambda A, i: int(A[i])  # noqa: E731, F811
    _spin_pause = lambda: None  # noqa: E731, F811


@_inner
def _prefetch_rows(A, rows, r0, r1):
    """Prefetch rows A[rows[r0:r1]] (a later block's inputs or states), one hint per line.

    The products read the batch's inputs and the streams' states in place, a few rows at a
    time; with many open streams those rows are scattered over arrays far larger than the
    caches. Fetching them while the previous block computes hides the memory latency (measured
    ~5% of the step at I=H=128, n=4096).
    """
    step = 64 // A.itemsize
    for i in range(r0, r1):
        s = rows[i]
        for j in range(0, A.shape[1], step):
            _prefetch_w(A, s, j)


# ----------------------------------------------------------------------------------------------
# activations


@_inner
def _tanh32(x):
    # Rational approximation of tanh (the 13/6 minimax form used by Eigen's float path); constants
    # are float32 so the arithmetic stays in float32 and vectorises. Max abs error ~1e-7.
    c = np.float32(7.90531110763549805)
    x = min(max(x, -c), c)  # branch-free, so loops over it vectorise
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    p = x * p
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    return p / q


def _variant(body, name, parallel):
    """Compile ``body`` (a closure made by a kernel factory) as kernel ``name``.

    Numba keys its on-disk cache index by the function's qualified name and first line, and
    within it by the signature and the closure's values, not by ``parallel=``: each variant
    gets a name of its own so that its cache entries can never be taken for another's
    (tests/test_kernels.py checks that the variants' cache files differ). A name with a
    leading "_" marks a helper only kernels call (:func:`_inner`).
    """
    body.__name__ = body.__qualname__ = name
    if name.startswith("_"):
        return _inner(body, parallel)
    return njit(parallel=parallel, **_JIT)(body)


# Activation ids run 0..N_ACTS-1 (streamgru.activations).
N_ACTS = ACT_SOFTMAX + 1
# The Dense activations of the cell sets with CELL_DENSE (below): a Dense head mostly has one.
DENSE_COMMON = (ACT_IDENTITY, ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_SOFTMAX)
# The message of a kernel variant asked for a cell or activation it was not built with (a
# variant is built from the packed model's table, so this means a table it was not built for).
_NOT_BUILT = "streamgru kernel variant without this layer's cell or activation"


def _make_act(kinds, f32=False):
    """The activation function for activation ids ``kinds`` only (see :func:`kernels_for`):
    the branches of the others are cut before Numba types them, so it compiles only their
    loops; an id outside ``kinds`` raises (identity is always in). ``f32``: for float32 arrays
    only (others raise), so the libm loops of the float64 path are cut too."""
    (A_SIG, A_TANH, A_RELU, A_HSIG, A_LRELU, A_AFF, A_TRELU, A_STANH, A_ELU, A_SSIGN,
     A_SPLUS, A_SMAX) = (a in kinds for a in range(1, N_ACTS))
    F32 = f32

    def act(A, i, lo, hi, kind, alpha, beta, clip, fast):
        """Apply activation ``kind`` in place to A[i, lo:hi], after clipping to [-clip, clip]
        if clip > 0.

        ``fast`` selects the float32 tanh approximation (float32 engines); otherwise libm is
        used. Each branch is its own loop so that the common ones vectorise.
        """
        if F32 and A.itemsize != 4:
            raise RuntimeError(_NOT_BUILT)
        # A view indexed from 0: with offset indices Numba cannot prove them non-negative,
        # keeps a wraparound branch per element and the loops do not vectorise (14x slower).
        v = A[i, lo:hi]
        m = v.shape[0]
        if clip > 0:
            for k in range(m):
                v[k] = min(max(v[k], -clip), clip)
        half = v.dtype.type(0.5)
        one = v.dtype.type(1.0)
        zero = v.dtype.type(0.0)
        if kind == ACT_IDENTITY:
            return
        elif kind == ACT_SIGMOID:
            if A_SIG:
                if F32 or fast:
                    for k in range(m):
                        v[k] = half + half * _tanh32(half * v[k])
                else:
                    for k in range(m):
                        v[k] = one / (one + math.exp(-v[k]))
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_TANH:
            if A_TANH:
                if F32 or fast:
                    for k in range(m):
                        v[k] = _tanh32(v[k])
                else:
                    for k in range(m):
                        v[k] = math.tanh(v[k])
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_RELU:
            if A_RELU:
                for k in range(m):
                    v[k] = max(v[k], zero)
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_HARDSIGMOID:
            if A_HSIG:
                for k in range(m):
                    v[k] = min(max(alpha * v[k] + beta, zero), one)
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_LEAKYRELU:
            if A_LRELU:
                for k in range(m):
                    v[k] = v[k] if v[k] >= zero else alpha * v[k]
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_AFFINE:
            if A_AFF:
                for k in range(m):
                    v[k] = alpha * v[k] + beta
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_THRESHOLDEDRELU:
            if A_TRELU:
                for k in range(m):
                    v[k] = v[k] if v[k] > alpha else zero
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_SCALEDTANH:
            if A_STANH:
                if F32 or fast:
                    for k in range(m):
                        v[k] = alpha * _tanh32(beta * v[k])
                else:
                    for k in range(m):
                        v[k] = alpha * math.tanh(beta * v[k])
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_ELU:
            if A_ELU:
                for k in range(m):
                    if v[k] < zero:
                        v[k] = alpha * (math.exp(v[k]) - one)
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_SOFTSIGN:
            if A_SSIGN:
                for k in range(m):
                    v[k] = v[k] / (one + abs(v[k]))
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_SOFTPLUS:  # log(1 + e^x) without overflow
            if A_SPLUS:
                for k in range(m):
                    a = v[k]
                    v[k] = max(a, zero) + math.log1p(math.exp(-abs(a)))
            else:
                raise RuntimeError(_NOT_BUILT)
        elif kind == ACT_SOFTMAX:  # over the whole range
            if A_SMAX:
                mx = v[0]
                for k in range(m):
                    mx = max(mx, v[k])
                s = zero
                for k in range(m):
                    e = math.exp(v[k] - mx)
                    v[k] = e
                    s += e
                inv = one / s
                for k in range(m):
                    v[k] *= inv
            else:
                raise RuntimeError(_NOT_BUILT)

    return act


_act = _variant(_make_act(range(N_ACTS)), "_act", False)
# CELL_DENSE's (see _cell): only the one-event kernels of ONE_EVENT_SETS call it, whose cells
# are all float32 ones (a float64 model takes the general paths, CELL_GENERAL), so it holds the
# float32 activations alone (on an empty cache, ~0.06 s less to a first event).
_act_common = _variant(_make_act(DENSE_COMMON, f32=True), "_act", False)


# ----------------------------------------------------------------------------------------------
# the cells: one helper per layer kind, reading its own columns of the layer table


# Helpers without floating-point arithmetic (copies, checks, index arithmetic) are inlined into
# their callers at Numba's IR level (inline="always"): on an empty cache every separately
# compiled function costs a compile and machine code of its own. The arithmetic helpers stay
# separate functions: each is optimised on its own before LLVM inlines it, so the fast-math
# rewrites (reassociation, fused multiply-add) come out the same in every caller, and the fused
# cell and the general path, or a batch and separate calls, give the same bits (test_kernels).
#
# A cell helper receives the layer's record as ``table, fp, l`` and reads its own columns
# (sizes, activations, clip) and the scratch layout (row 0 of the table): adding a column for a
# new kind changes no signature. The float32 tanh is picked by the compute dtype (``S``'s), a
# compile-time constant, never by the weights' dtype.
#
# Per-row helpers take 2-D arrays and row indices and slice them themselves: a view made in the
# caller's row loop and passed to a call costs an atomic reference-count increment and decrement
# (Numba's runtime), ~10% of a step at H=128 with a dozen views per row; views made and used
# inside one function are pruned. The rows and columns every cell helper sees:
#
# * ``S[gi, GX:]``: the input product (W x + Wb) of the row, where the gates are computed (a
#   T_XOUT layer's product is in ``D[di, d0:]`` instead);
# * ``S[wi, GH:]``: the recurrent products; ``S[wi, T:]`` the input of a product between the
#   two halves of a cell (``T_NPRN`` panels: GRU with linear_before_reset=0 only);
# * ``st[si, so:so + table[l, T_SW]]``: the layer's state, overwritten by the new state;
# * ``D[di, d0:d0 + table[l, T_OUT]]``: the layer's output (the next layer's input in the
#   workspace, or the caller's output row for the last layer).
#
# The block kernels pass gi = wi = the scratch row and the stream's state row; the sequence
# kernels pass the step's row and the workspace row, which also holds the state; the one-event
# kernel scratch rows 0 and 1 and the stream's state row.


@_inner
def _gates_zr(table, fp, l, S, gi, wi):
    """GRU: z, r = f(GX + GH) into S[gi, GX:GX+2H]."""
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    H = table[l, T_OUT]
    a = S[gi, GX:GX + 2 * H]
    b = S[wi, GH:GH + 2 * H]
    for k in range(2 * H):
        a[k] += b[k]
    _act(S, gi, GX, GX + 2 * H, table[l, T_F], fp[l, F_FA], fp[l, F_FB], fp[l, F_CLIP],
         S.itemsize == 4)


@_inner
def _gates_n_lbr1(table, fp, l, S, gi, wi):
    """GRU, linear_before_reset=1: n = g(W_n x + Wb_n + r * (R_n h + Rb_n)) into
    S[gi, GX+2H:GX+3H]."""
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    H = table[l, T_OUT]
    n = S[gi, GX + 2 * H:GX + 3 * H]
    r = S[gi, GX + H:GX + 2 * H]
    rh = S[wi, GH + 2 * H:GH + 3 * H]
    for k in range(H):
        n[k] += r[k] * rh[k]
    _act(S, gi, GX + 2 * H, GX + 3 * H, table[l, T_G], fp[l, F_GA], fp[l, F_GB], fp[l, F_CLIP],
         S.itemsize == 4)


@_inner
def _gates_n_lbr0(table, fp, l, S, gi, wi):
    """GRU, linear_before_reset=0, after the R_n product (in S[wi, GH:GH+H]):
    n = g(W_n x + Wb_n + R_n (r * h) + Rb_n) into S[gi, GX+2H:GX+3H]."""
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    H = table[l, T_OUT]
    n = S[gi, GX + 2 * H:GX + 3 * H]
    p = S[wi, GH:GH + H]
    for k in range(H):
        n[k] += p[k]
    _act(S, gi, GX + 2 * H, GX + 3 * H, table[l, T_G], fp[l, F_GA], fp[l, F_GB], fp[l, F_CLIP],
         S.itemsize == 4)


@_inner
def _update(table, l, S, gi, st, si, so, D, di, d0):
    """GRU: h' = (1 - z) * n + z * h, written to D[di, d0:d0+H] and over h.

    The new h overwrites h in place: a separate destination that is h itself would make LLVM's
    runtime overlap check fail and run the loop unvectorised."""
    GX = table[0, T_LGX]
    H = table[l, T_OUT]
    one = S.dtype.type(1.0)
    z = S[gi, GX:GX + H]
    n = S[gi, GX + 2 * H:GX + 3 * H]
    h = st[si, so:so + H]
    o = D[di, d0:d0 + H]
    for k in range(H):
        hn = (one - z[k]) * n[k] + z[k] * h[k]
        o[k] = hn
        h[k] = hn


def _std32(fast, fk, gk, clip):
    """Whether a linear_before_reset=1 layer is the standard float32 cell (sigmoid gates, tanh
    candidate, no clip), which :func:`_cell_std32` computes."""
    return fast and fk == ACT_SIGMOID and gk == ACT_TANH and clip <= 0


@_inner
def _cell_std32(table, l, S, gi, wi, st, si, so, D, di, d0):
    """The linear_before_reset=1 GRU cell for the standard float32 cell, as two fused loops: per
    row, a call per phase costs more than its arithmetic at H ~ 128. It performs exactly the
    operations of the general path, so both give the same bits. A function without calls, so
    that Numba prunes the reference counts of its views."""
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    H = table[l, T_OUT]
    half = S.dtype.type(0.5)
    one = S.dtype.type(1.0)
    zr = S[gi, GX:GX + 2 * H]
    ghzr = S[wi, GH:GH + 2 * H]
    for k in range(2 * H):
        zr[k] = half + half * _tanh32(half * (zr[k] + ghzr[k]))
    z = S[gi, GX:GX + H]
    r = S[gi, GX + H:GX + 2 * H]
    n = S[gi, GX + 2 * H:GX + 3 * H]
    rh = S[wi, GH + 2 * H:GH + 3 * H]
    h = st[si, so:so + H]
    o = D[di, d0:d0 + H]
    for k in range(H):
        nk = _tanh32(n[k] + r[k] * rh[k])
        hn = (one - z[k]) * nk + z[k] * h[k]
        o[k] = hn
        h[k] = hn


@_inner
def _gru_pre(table, fp, l, S, gi, wi, st, si, so):
    """GRU, linear_before_reset=0, before the R_n product: z, r = f(GX + GH), and r * h into
    S[wi, T:T+H], that product's input."""
    _gates_zr(table, fp, l, S, gi, wi)
    GX = table[0, T_LGX]
    T = table[0, T_LT]
    H = table[l, T_OUT]
    r = S[gi, GX + H:GX + 2 * H]
    h = st[si, so:so + H]
    t = S[wi, T:T + H]
    for k in range(H):
        t[k] = r[k] * h[k]


def _check_ints(who, **args):
    """At typing time: refuse an intrinsic's index argument that is not an integer."""
    for name, ty in args.items():
        if not isinstance(ty, types.Integer):
            raise errors.TypingError(f"{who}: {name}: expected an integer, got {ty}")


def _index(context, builder, ty, v):
    """An integer argument of an intrinsic as an intp value (a literal, a signed or an unsigned
    int alike)."""
    return context.cast(builder, v, ty, types.intp)


@intrinsic
def _copy_row(typingctx, src, si, s0, dst, di, d0, m):
    """dst[di, d0:d0+m] = src[si, s0:s0+m] (2-D C arrays of one dtype), as one ``llvm.memmove``.

    The kernels copy rows in a dozen places (state backups, outputs, a layer's state in and
    out of the sequence workspace). As a Numba loop each copy was ~60 statements of IR (two
    views and a range loop) that every kernel compiles on an empty cache: as this intrinsic
    the one-event kernel compiles ~20% faster. A copy, so the bits cannot change; memmove is
    right for overlapping ranges too."""
    for name, ty in (("src", src), ("dst", dst)):
        _check_array("_copy_row", name, ty, 2)
    if src.dtype != dst.dtype:
        raise errors.TypingError(f"_copy_row: dst: expected the dtype of src ({src.dtype}), got "
                                 f"{dst.dtype}")
    _check_ints("_copy_row", si=si, s0=s0, di=di, d0=d0, m=m)
    sig = types.void(src, si, s0, dst, di, d0, m)

    def codegen(context, builder, signature, args):
        ty = signature.args
        idx = [_index(context, builder, ty[k], args[k]) for k in (1, 2, 4, 5, 6)]
        si_, s0_, di_, d0_, m_ = idx
        src_ = _elem_ptr2(context, builder, ty[0], args[0], si_, s0_)
        dst_ = _elem_ptr2(context, builder, ty[3], args[3], di_, d0_)
        itemsize = context.get_abi_sizeof(context.get_data_type(ty[0].dtype))
        cgutils.raw_memmove(builder, dst_, src_, m_, itemsize)
        return context.get_dummy_value()

    return sig, codegen


def _copy_row_python(src, si, s0, dst, di, d0, m):
    """NUMBA_DISABLE_JIT=1 stand-in of :func:`_copy_row`."""
    dst[di, d0:d0 + m] = src[si, s0:s0 + m]


if config.DISABLE_JIT:
    _copy_row = _copy_row_python  # noqa: F811


@_inner
def _lstm_gates(table, fp, l, S, gi, wi, st, si, so, U, ui, u0):
    """LSTM, one row once its products are in (S[gi, GX:GX+4H] = W x + Wb, S[wi, GH:GH+4H] =
    R h + Rb, gate blocks i, o, f, c): the gates, the new cell state C' over C in the state
    (st[si, so+H_out:so+H_out+H]) and u = o * h(C') into U[ui, u0:u0+H].

    The equations of streamgru/layers/lstm.py, in their order: the peepholes of i and f read
    C, the output gate's reads C'; clip applies to the gate and candidate pre-activations,
    never to C' under h. h(C') is computed in the candidate's block, free once C' is in.
    """
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    H = table[l, T_HID]
    ho = table[l, T_OUT]
    fast = S.itemsize == 4
    a = S[gi, GX:GX + 4 * H]
    b = S[wi, GH:GH + 4 * H]
    for k in range(4 * H):
        a[k] += b[k]
    c = st[si, so + ho:so + ho + H]
    pp = table[l, T_PEEP]
    flat = fp.reshape(fp.size)
    if pp >= 0:  # i and f read the previous cell state
        pi = flat[pp:pp + H]
        pf = flat[pp + 2 * H:pp + 3 * H]
        ai = S[gi, GX:GX + H]
        af = S[gi, GX + 2 * H:GX + 3 * H]
        for k in range(H):
            ai[k] += pi[k] * c[k]
            af[k] += pf[k] * c[k]
    fk, fa, fb, clip = table[l, T_F], fp[l, F_FA], fp[l, F_FB], fp[l, F_CLIP]
    _act(S, gi, GX, GX + H, fk, fa, fb, clip, fast)  # i
    _act(S, gi, GX + 3 * H, GX + 4 * H, table[l, T_G], fp[l, F_GA], fp[l, F_GB], clip, fast)
    i = S[gi, GX:GX + H]
    cc = S[gi, GX + 3 * H:GX + 4 * H]
    one = S.dtype.type(1.0)
    if table[l, T_IFG] == 1:  # f_ = 1 - i
        for k in range(H):
            c[k] = (one - i[k]) * c[k] + i[k] * cc[k]
    else:
        _act(S, gi, GX + 2 * H, GX + 3 * H, fk, fa, fb, clip, fast)
        f = S[gi, GX + 2 * H:GX + 3 * H]
        for k in range(H):
            c[k] = f[k] * c[k] + i[k] * cc[k]
    if pp >= 0:  # the output gate reads the new cell state
        po = flat[pp + H:pp + 2 * H]
        ao = S[gi, GX + H:GX + 2 * H]
        for k in range(H):
            ao[k] += po[k] * c[k]
    _act(S, gi, GX + H, GX + 2 * H, fk, fa, fb, clip, fast)  # o
    for k in range(H):
        cc[k] = c[k]
    # no clip under h: a zero of fp's dtype, as the other calls' clip (a float literal would
    # compile _act a second time, for a float64 clip)
    _act(S, gi, GX + 3 * H, GX + 4 * H, table[l, T_H], fp[l, F_HA], fp[l, F_HB],
         fp.dtype.type(0.0), fast)
    o = S[gi, GX + H:GX + 2 * H]
    u = U[ui, u0:u0 + H]
    for k in range(H):
        u[k] = o[k] * cc[k]


def _lstm_std(fast, table, fp, l):
    """Whether LSTM layer ``l`` is the standard float32 cell (sigmoid gates, tanh candidate and
    output, no clip, no peepholes, input_forget 0), which :func:`_lstm_std32` computes."""
    return (fast and table[l, T_F] == ACT_SIGMOID and table[l, T_G] == ACT_TANH
            and table[l, T_H] == ACT_TANH and fp[l, F_CLIP] <= 0 and table[l, T_PEEP] < 0
            and table[l, T_IFG] == 0)


@_inner
def _lstm_std32(table, l, S, gi, wi, st, si, so, U, ui, u0, D, di, d0):
    """The standard float32 LSTM cell in one loop (the general path's operations, fused as
    :func:`_cell_std32` fuses the GRU's): C' over C in the state and h' = o * tanh(C') into
    U[ui, u0:u0+H], and into the state's h and D[di, d0:] too when ``D``'s row is given
    (di >= 0: no projection follows). A function without calls, so that Numba prunes the
    reference counts of its views.

    Unlike the GRU's, this fused cell is not bit-identical to the general path: with the
    kernels' reassociation and contraction LLVM fuses the operations of one loop differently
    from those of several (they agree within float32 rounding; tests/test_lstm_engine.py).
    A layer takes the same path in every kernel, so a batch still gives the same bits as
    separate calls."""
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    H = table[l, T_HID]
    ho = table[l, T_OUT]
    half = S.dtype.type(0.5)
    a = S[gi, GX:GX + 4 * H]
    b = S[wi, GH:GH + 4 * H]
    c = st[si, so + ho:so + ho + H]
    # Two loops rather than one with a branch on di: LLVM did not unswitch that branch, and the
    # loop that kept it ran 36% slower (a stack of two LSTM layers, n=64, H=128, znver4).
    if di >= 0:
        h = st[si, so:so + H]
        o = D[di, d0:d0 + H]
        for k in range(H):
            ig = half + half * _tanh32(half * (a[k] + b[k]))
            og = half + half * _tanh32(half * (a[H + k] + b[H + k]))
            fg = half + half * _tanh32(half * (a[2 * H + k] + b[2 * H + k]))
            cn = fg * c[k] + ig * _tanh32(a[3 * H + k] + b[3 * H + k])
            c[k] = cn
            hn = og * _tanh32(cn)
            h[k] = hn
            o[k] = hn
    else:
        u = U[ui, u0:u0 + H]
        for k in range(H):
            ig = half + half * _tanh32(half * (a[k] + b[k]))
            og = half + half * _tanh32(half * (a[H + k] + b[H + k]))
            fg = half + half * _tanh32(half * (a[2 * H + k] + b[2 * H + k]))
            cn = fg * c[k] + ig * _tanh32(a[3 * H + k] + b[3 * H + k])
            c[k] = cn
            u[k] = og * _tanh32(cn)


# Cell sets: which cell code a kernel variant holds (kernels_for). A model's set follows from
# its packed table and compute dtype (cells_of); a variant compiles only the cells in its set,
# so a process with an empty cache compiles a standard GRU's cell and not the LSTM's, the
# general paths and all thirteen activations. The sets are coarse on purpose: every set a
# process meets compiles every kernel it calls once more.
CELL_GRU_STD32 = 1  # GRU, linear_before_reset=1, the standard float32 cell (_cell_std32)
CELL_LSTM_STD32 = 2  # LSTM, the standard float32 cell (_lstm_std32)
CELL_GENERAL = 4  # every other GRU and LSTM cell (any activation, clip, linear_before_reset=0,
#                   peepholes, input_forget, float64)
CELL_DENSE = 8  # Dense with one of DENSE_COMMON's activations
CELL_DENSE_ALL = 16  # Dense with any activation
CELLS_ALL = 31


def _flags(cells):
    """Cell set ``cells`` as the constants the kernel factories hold and pass to :func:`_cell`
    and :func:`_cell_pre`: (G_STD, L_STD, GEN, DENSE, DENSE_ALL, PRE), PRE being whether a
    layer of the set can have a product between its cell's two halves (T_NPRN: a GRU with
    linear_before_reset=0, an LSTM with a projection)."""
    g_std, l_std, gen, dense, dense_all = (
        bool(cells & bit) for bit in (CELL_GRU_STD32, CELL_LSTM_STD32, CELL_GENERAL, CELL_DENSE,
                                      CELL_DENSE_ALL))
    return g_std, l_std, gen, dense, dense_all, l_std or gen


# _cell and _cell_pre are the only kernel code that dispatches on a layer's kind (its T_PATH,
# from cell_path): the layer loops below know no kind. The kernels pass their cell set's flags
# as constants (their closures' values): once these helpers are inlined, Numba cuts the
# branches of the cells outside the set before it types them, so a kernel compiles only its
# set's cells (a row that would take another raises). A new kind adds its cell helper, its
# path(s) in cell_path and its branch here under a CELL_* bit of its own (and, if its cell
# needs a product of its own workspace between two halves, its part in _cell_pre and T_NPRN
# panels), its bit in cells_of, and its row in packing.pack.


# A layer's cell path: what _cell (and _cell_pre) run for its rows, decided once per model by
# cell_path when packing.pack stores it in the table (T_PATH): a kernel reads it once per layer
# and call, not per row or time step. Decided in Python rather than in each kernel, the
# predicates cost no compile time (on an empty cache they were ~9% of the one-event kernel's
# IR).
(PATH_GRU_STD32, PATH_GRU, PATH_GRU_LBR0, PATH_DENSE, PATH_LSTM_STD32, PATH_LSTM,
 PATH_LSTM_PROJ_STD32, PATH_LSTM_PROJ) = range(8)


def cell_path(table, fp, l, fast):
    """Layer ``l``'s cell path (PATH_*) in a packed table (its columns up to T_IFG and fp's
    rows); ``fast``: a float32 compute dtype. -1 for a kind no cell handles."""
    kind = table[l, T_KIND]
    if kind == KIND_GRU:
        if table[l, T_LBR] != 1:
            return PATH_GRU_LBR0
        if _std32(fast, table[l, T_F], table[l, T_G], fp[l, F_CLIP]):
            return PATH_GRU_STD32
        return PATH_GRU
    if kind == KIND_DENSE:
        return PATH_DENSE
    if kind == KIND_LSTM:
        std = _lstm_std(fast, table, fp, l)
        if table[l, T_NPRN] > 0:
            return PATH_LSTM_PROJ_STD32 if std else PATH_LSTM_PROJ
        return PATH_LSTM_STD32 if std else PATH_LSTM
    return -1


@njit(inline="always", **_JIT)
def _cell(g_std, l_std, gen, dense, dense_all, path, table, fp, l, S, gi, wi, st, si, so, D, di,
          d0):
    """Layer ``l``'s cell (``path``: its :func:`cell_path`) for one row once its products are
    in: its new state to st[si, so:], its output to D[di, d0:] (where a T_XOUT layer's input
    product already is).

    GRU, linear_before_reset=1: z, r, n and h' (:func:`_cell_std32` for the standard float32
    cell). linear_before_reset=0: after :func:`_gru_pre` and the R_n product (in
    S[wi, GH:GH+H]), n = g(W_n x + Wb_n + R_n (r * h) + Rb_n), then h'.
    LSTM: without a projection the whole cell runs here (u = o * h(C') is h'); with one,
    :func:`_cell_pre` ran it and the projection product put h' = proj u in S[wi, GH:GH+H_out],
    which goes to the state and the output.
    Dense: the activation, in place.
    """
    if path == PATH_GRU_STD32:
        if g_std:
            _cell_std32(table, l, S, gi, wi, st, si, so, D, di, d0)
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_DENSE:
        if dense_all:
            _act(D, di, d0, d0 + table[l, T_OUT], table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                 fp[l, F_CLIP], D.itemsize == 4)
        elif dense:
            _act_common(D, di, d0, d0 + table[l, T_OUT], table[l, T_F], fp[l, F_FA],
                        fp[l, F_FB], fp[l, F_CLIP], D.itemsize == 4)
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_LSTM_STD32:
        if l_std:
            # int64 values, not literals: a literal argument compiles a specialization of its
            # own (here and in _cell_pre, one compilation serves both)
            _lstm_std32(table, l, S, gi, wi, st, si, so, S, wi, np.int64(0), D, di, d0)
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_GRU:
        if gen:
            _gates_zr(table, fp, l, S, gi, wi)
            _gates_n_lbr1(table, fp, l, S, gi, wi)
            _update(table, l, S, gi, st, si, so, D, di, d0)
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_GRU_LBR0:
        if gen:
            _gates_n_lbr0(table, fp, l, S, gi, wi)
            _update(table, l, S, gi, st, si, so, D, di, d0)
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_LSTM:
        if gen:
            _lstm_gates(table, fp, l, S, gi, wi, st, si, so, st, si, so)
            _copy_row(st, si, so, D, di, d0, table[l, T_OUT])
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_LSTM_PROJ_STD32 or path == PATH_LSTM_PROJ:
        ho = table[l, T_OUT]
        GH = table[0, T_LGH]
        _copy_row(S, wi, GH, st, si, so, ho)
        _copy_row(S, wi, GH, D, di, d0, ho)
    else:
        raise RuntimeError(_NOT_BUILT)


def _make_cell_called(cells):
    """:func:`_cell` of cell set ``cells`` as a call rather than inlined: a parallel loop whose
    body raises (the cell's refusals) has more than one exit, and Numba then runs it serially.
    The set's flags are constants here, as in the kernels: passed as arguments they would be
    values, and every branch of _cell would compile (the one-event kernels' activations and,
    for float64, the float32 cells)."""
    G_STD, L_STD, GEN, DENSE, DENSE_ALL, _ = _flags(cells)

    def cell_called(path, table, fp, l, S, gi, wi, st, si, so, D, di, d0):
        _cell(G_STD, L_STD, GEN, DENSE, DENSE_ALL, path, table, fp, l, S, gi, wi, st, si, so, D,
              di, d0)

    return _variant(cell_called, "_cell_called", False)


# The sequence kernels' (run_sequence_wide's teams), which hold every cell.
_cell_called = _make_cell_called(CELLS_ALL)


@njit(inline="always", **_JIT)
def _cell_pre(l_std, gen, path, table, fp, l, S, gi, wi, st, si, so):
    """The part of layer ``l``'s cell (``path``: its :func:`cell_path`) before its T_NPRN
    product (run only when it has one): GRU, linear_before_reset=0: z, r and r * h
    (:func:`_gru_pre`); LSTM with a projection: C' into the state and u = o * h(C') into
    S[wi, T:T+H], that product's input."""
    if path == PATH_GRU_LBR0:
        if gen:
            _gru_pre(table, fp, l, S, gi, wi, st, si, so)
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_LSTM_PROJ_STD32:
        if l_std:
            _lstm_std32(table, l, S, gi, wi, st, si, so, S, wi, table[0, T_LT], S,
                        np.int64(-1), np.int64(0))
        else:
            raise RuntimeError(_NOT_BUILT)
    elif path == PATH_LSTM_PROJ:
        if gen:
            _lstm_gates(table, fp, l, S, gi, wi, st, si, so, S, wi, table[0, T_LT])
        else:
            raise RuntimeError(_NOT_BUILT)
    else:
        raise RuntimeError(_NOT_BUILT)


# The cell set bit of each path but Dense's (whose bit follows its activation).
_PATH_CELLS = {PATH_GRU_STD32: CELL_GRU_STD32, PATH_GRU: CELL_GENERAL,
               PATH_GRU_LBR0: CELL_GENERAL, PATH_LSTM_STD32: CELL_LSTM_STD32,
               PATH_LSTM: CELL_GENERAL, PATH_LSTM_PROJ_STD32: CELL_LSTM_STD32,
               PATH_LSTM_PROJ: CELL_GENERAL}


def cells_of(table, fp, dtype):
    """The cell set (CELL_* bits) of a packed model: the cells its layers take in the kernels,
    by :func:`cell_path`, so a kernel variant built for it holds every path its rows take."""
    fast = np.dtype(dtype).itemsize == 4
    cells = 0
    for l in range(table.shape[0]):
        path = cell_path(table, fp, l, fast)
        if path == PATH_DENSE:
            cells |= CELL_DENSE if table[l, T_F] in DENSE_COMMON else CELL_DENSE_ALL
        elif path in _PATH_CELLS:
            cells |= _PATH_CELLS[path]
        else:
            raise ValueError(f"table: layer {l} has kind {table[l, T_KIND]}, which no cell "
                             f"handles")
    return cells


@intrinsic
def _nonfinite(typingctx, A, i, lo, hi):
    """How many of A[i, lo:hi] (a 2-D C float array) are NaN or +-inf.

    A comparison per value, not ``|v| < inf`` (True for NaN and inf alike), counted in an
    integer: a float sum (``v * 0`` accumulated) could be reassociated into
    ``(sum v) * 0`` and overflow on large finite values (1e308 + 1e308). The loop is written
    here in LLVM IR, without fast-math flags, so that no flag can assume NaN or inf away
    (tests/test_faults.py proves that the check fires in compiled code); branch-free, so LLVM
    vectorises it. As an intrinsic rather than a Numba loop (a view and a range loop, ~90
    statements of IR in each of the kernels' several checks) it compiles in a fraction of
    the time on an empty cache.
    """
    _check_array("_nonfinite", "A", A, 2)
    if not isinstance(A.dtype, types.Float):
        raise errors.TypingError(f"_nonfinite: A: expected a float array, got {A}")
    _check_ints("_nonfinite", i=i, lo=lo, hi=hi)
    sig = types.intp(A, i, lo, hi)

    def codegen(context, builder, signature, args):
        row, lo_, hi_, intp = _span(context, builder, signature, args)
        fty = context.get_value_type(signature.args[0].dtype)
        fabs = builder.module.declare_intrinsic("llvm.fabs", [fty])
        count = cgutils.alloca_once_value(builder, ir.Constant(intp, 0))
        with cgutils.for_range_slice(builder, lo_, hi_, ir.Constant(intp, 1), intp) as (k, _):
            v = builder.call(fabs, [builder.load(builder.gep(row, [k]))])
            # not (|v| < inf): "unordered or >=", True for NaN and inf
            bad = builder.zext(builder.fcmp_unordered(">=", v, ir.Constant(fty, np.inf)), intp)
            builder.store(builder.add(builder.load(count), bad), count)
        return builder.load(count)

    return sig, codegen


def _nonfinite_python(A, i, lo, hi):
    """NUMBA_DISABLE_JIT=1 stand-in of :func:`_nonfinite`."""
    return int(np.count_nonzero(~np.isfinite(A[i, lo:hi])))


if config.DISABLE_JIT:
    _nonfinite = _nonfinite_python  # noqa: F811


@_inner
def _backup_rows(state, srows, scratch, BK, r0, r1):
    """scratch[i, BK:BK+S] = state[srows[i]] for i in [r0, r1): each row's state before it steps."""
    for i in range(r0, r1):
        _copy_row(state, srows[i], 0, scratch, i, BK, state.shape[1])


@_inner
def _check_rows(state, srows, out, order, bad, r0, r1):
    """bad[i] = 1 if row i's new state or its output holds NaN/inf, else 0. Returns the count."""
    nbad = 0
    for i in range(r0, r1):
        c = _nonfinite(state, srows[i], 0, state.shape[1]) + \
            _nonfinite(out, order[i], 0, out.shape[1])
        bad[i] = 1 if c > 0 else 0
        nbad += bad[i]
    return nbad


@_inner
def _restore_all(state, srows, scratch, BK, bad, n):
    """If any of bad[:n] is set, put every row's backup back, in reverse plan order (a key
    stepped in several waves gets its first wave's backup last: its state before the call), and
    return PRODUCED_NONFINITE; otherwise return -1."""
    nbad = 0
    for i in range(n):
        nbad += bad[i]
    if nbad == 0:
        return -1
    for i in range(n - 1, -1, -1):
        _copy_row(scratch, i, BK, state, srows[i], 0, state.shape[1])
    return PRODUCED_NONFINITE


# A group size no layer reaches: one group holds every panel of a product (the serial variants).
_ALL_PANELS = 1 << 40


def _make_step_block(name, parallel, cells):
    """The layer loop of the step kernels over a block of rows, written once.

    ``parallel=False``: every product runs on the calling thread, over all its panels in one
    call (:func:`step_serial` and :func:`step_parallel`, which spreads row blocks over threads
    itself). ``parallel=True``: each product is spread over Numba's threads by groups of
    PANEL_GROUP panels, the layer's input and recurrent products in one parallel loop, while
    the cheap per-row cell arithmetic stays on the calling thread (:func:`step_wide`). The
    loop, ``prange`` or ``range``, the group size and the cell set's flags (:func:`_flags`) are
    the closure's values.
    """
    loop = prange if parallel else range
    group = PANEL_GROUP if parallel else _ALL_PANELS
    G_STD, L_STD, GEN, DENSE, DENSE_ALL, PRE = _flags(cells)

    def body(params, table, fp, state, srows, x, out, scratch, order, bad, r0, r1):
        """Advance the batch rows order[r0:r1] (distinct state rows srows[r0:r1]) through all
        layers.

        Scratch row i (for i in [r0, r1)) is the workspace of batch row order[i]. The first
        layer's products read x[order[i]] and every recurrent product reads state[srows[i]] in
        place (gathering tiles), so neither is copied into the workspace first. Each row's state
        is backed up first (scratch columns T_LBK) and its result checked last (``bad``, see the
        module docstring); the caller restores the backups if any row failed.
        """
        _backup_rows(state, srows, scratch, table[0, T_LBK], r0, r1)
        # 0 as an int64 value where a product starts at 0: a literal argument would compile
        # a specialization of its own of the product (the largest function of a kernel)
        zero = np.int64(0)
        nr = 2 * VEC_BYTES // scratch.itemsize  # outputs per panel
        GX = table[0, T_LGX]
        GH = table[0, T_LGH]
        T = table[0, T_LT]
        cur = table[0, T_LA]
        nxt = table[0, T_LB]
        nl = table.shape[0]
        for l in range(nl):
            K = table[l, T_IN]
            H = table[l, T_OUT]
            so = table[l, T_SOFF]
            path = table[l, T_PATH]
            npw = table[l, T_NPW]
            npr = table[l, T_NPR]
            w_w, b_w, s_w = _product(table, l, T_W)  # each product's offsets (see _gemm)
            w_r, b_r, s_r = _product(table, l, T_R)
            w_n, b_n, s_n = _product(table, l, T_RN)
            px = nxt if table[l, T_XOUT] else GX  # where the input product lands
            gw = _groups(npw, group)
            for q in loop(gw + _groups(npr, group)):
                if q >= gw:
                    p0, p1 = _group(np.int64(q) - gw, npr, group)  # int64: see _nth
                    _gemm(params, fp, w_r, b_r, s_r, H, p0, p1, state, srows, so,
                          scratch, GH, r0, r1)
                elif l == 0:
                    p0, p1 = _group(q, npw, group)
                    _gemm(params, fp, w_w, b_w, s_w, K, p0, p1, x, order, zero,
                          scratch, px, r0, r1)
                else:
                    p0, p1 = _group(q, npw, group)
                    _gemm(params, fp, w_w, b_w, s_w, K, p0, p1, scratch, None, cur,
                          scratch, px, r0, r1)
            last = l == nl - 1  # then the cells write the caller's rows directly
            D = out if last else scratch
            d0 = 0 if last else nxt
            if last and table[l, T_XOUT]:  # the product goes to the caller's rows first
                for i in range(r0, r1):
                    _copy_row(scratch, i, nxt, out, order[i], 0, out.shape[1])
            nprn = table[l, T_NPRN]
            if PRE:  # a constant: the set has a cell with a product between its halves
                if nprn > 0:
                    for i in range(r0, r1):
                        _cell_pre(L_STD, GEN, path, table, fp, l, scratch, i, i, state,
                                  srows[i], so)
                    for g in loop(_groups(nprn, group)):
                        p0, p1 = _group(g, nprn, group)
                        _gemm(params, fp, w_n, b_n, s_n, table[l, T_HID], p0, p1,
                              scratch, None, T, scratch, GH, r0, r1)
            gxw = npw * nr  # the widths of the products' outputs, which the cell reads
            ghw = npr * nr
            for i in range(r0, r1):
                if i + 1 < r1:  # the next row's, into L1 while this row's cell computes
                    _prefetch_span(scratch, i + 1, px, px + gxw)
                    _prefetch_span(scratch, i + 1, GH, GH + ghw)
                _cell(G_STD, L_STD, GEN, DENSE, DENSE_ALL, path, table, fp, l, scratch, i,
                      i, state, srows[i], so, D, order[i] if last else i, d0)
            cur, nxt = nxt, cur
        _check_rows(state, srows, out, order, bad, r0, r1)

    return _variant(body, name, parallel)



@_inner
def _serial_block(params):
    """Rows per block of :func:`step_serial`: ROW_BLOCK, or SERIAL_BIG_BLOCK when the weights
    (the whole params buffer) outgrow L2_BYTES. Every block streams all the weights; once they
    no longer fit L2 they come from L3 each time, so fewer, taller blocks stream them fewer
    times (4x fewer at 1024 rows), while the products' tiles keep their panels in L1 anyway."""
    if params.shape[0] * params.itemsize > L2_BYTES:
        return SERIAL_BIG_BLOCK
    return ROW_BLOCK


@njit(**_JIT)
def _plan(slots, x, check_finite, mark, iwork):
    """Check x and split the batch into waves of distinct slots.

    ``iwork`` holds order (n_max), wave (n_max), wstart (n_max + 1) and bad (n_max). Returns (bad_row,
    n_waves): bad_row >= 0 is the first row of x holding NaN/inf (nothing else is done then);
    otherwise order[wstart[w]:wstart[w+1]] are the rows of wave w, in batch order, and the
    wave segment is reused for srows: srows[i] = slots[order[i]], the state row of row i.
    """
    n = slots.shape[0]
    nm = (iwork.shape[0] - 1) // 4
    order = iwork[:nm]
    wave = iwork[nm:2 * nm]
    wstart = iwork[2 * nm:]
    if check_finite:
        bad = _first_nonfinite_row(x)
        if bad >= 0:
            return bad, 0
    nw = 0
    for i in range(n):
        s = slots[i]
        w = mark[s]
        mark[s] = w + 1
        wave[i] = w
        if w + 1 > nw:
            nw = w + 1
    for i in range(n):
        mark[slots[i]] = 0
    if nw == 1:
        for i in range(n):
            order[i] = i
            wave[i] = slots[i]
        wstart[0] = 0
        wstart[1] = n
        return -1, 1
    # Counting sort of rows by wave, stable, so each wave keeps batch order.
    for w in range(nw + 1):
        wstart[w] = 0
    for i in range(n):
        wstart[wave[i] + 1] += 1
    for w in range(nw):
        wstart[w + 1] += wstart[w]
    for i in range(n):
        w = wave[i]
        order[wstart[w]] = i
        wstart[w] += 1
    for w in range(nw, 0, -1):
        wstart[w] = wstart[w - 1]
    wstart[0] = 0
    for i in range(n):
        wave[i] = slots[order[i]]
    return -1, nw


# The batch and sequence kernels hold every cell (CELLS_ALL): one compilation of each serves
# every model (see kernels_for for why only the one-event kernel is made per cell set).
_step_block = _make_step_block("_step_block", False, CELLS_ALL)
_step_block_wide = _make_step_block("_step_block_wide", True, CELLS_ALL)


@njit(**_JIT)
def step_serial(params, table, fp, state, slots, x, out, scratch, iwork, mark, check_finite):
    """One step for every batch row on the calling thread. Returns the first non-finite row of
    x (state untouched) or -1."""
    bad, nw = _plan(slots, x, check_finite, mark, iwork)
    if bad >= 0:
        return bad
    nm = (iwork.shape[0] - 1) // 4
    order = iwork[:nm]
    srows = iwork[nm:2 * nm]
    wstart = iwork[2 * nm:3 * nm + 1]
    bad = iwork[3 * nm + 1:]
    rb = _serial_block(params)
    for w in range(nw):
        r = wstart[w]
        e = wstart[w + 1]
        while r < e:
            r1 = min(e, r + rb)
            _prefetch_rows(state, srows, r1, min(e, r1 + rb))
            _prefetch_rows(x, order, r1, min(e, r1 + rb))
            _step_block(params, table, fp, state, srows, x, out, scratch, order, bad, r, r1)
            r = r1
    return _restore_all(state, srows, scratch, table[0, T_LBK], bad, slots.shape[0])


@njit(parallel=True, **_JIT)
def step_parallel(params, table, fp, state, slots, x, out, scratch, iwork, mark, check_finite):
    """As :func:`step_serial`, with the row blocks of each wave spread over Numba's threads."""
    bad, nw = _plan(slots, x, check_finite, mark, iwork)
    if bad >= 0:
        return bad
    nm = (iwork.shape[0] - 1) // 4
    order = iwork[:nm]
    srows = iwork[nm:2 * nm]
    wstart = iwork[2 * nm:3 * nm + 1]
    bad = iwork[3 * nm + 1:]
    for w in range(nw):
        s = wstart[w]
        e = wstart[w + 1]
        if e - s < SERIAL_WAVE_ROWS:
            # Bursty batches (a hot key repeated) end in many small waves: a parallel region
            # per small wave costs more than the wave, so those run on the calling thread.
            _step_block(params, table, fp, state, srows, x, out, scratch, order, bad, s, e)
            continue
        # At least MIN_BLOCKS blocks (calling get_num_threads here would make the kernel
        # uncacheable), at most ROW_BLOCK rows each, in multiples of 8 rows.
        nb = max(MIN_BLOCKS, (e - s + ROW_BLOCK - 1) // ROW_BLOCK)
        size = ((e - s + nb - 1) // nb + 7) // 8 * 8
        nb = (e - s + size - 1) // size
        for b in prange(nb):
            r0 = s + b * size
            r1 = min(e, r0 + size)
            _prefetch_rows(state, srows, r1, min(e, r1 + size))
            _prefetch_rows(x, order, r1, min(e, r1 + size))
            _step_block(params, table, fp, state, srows, x, out, scratch, order, bad, r0, r1)
    return _restore_all(state, srows, scratch, table[0, T_LBK], bad, slots.shape[0])


@njit(**_JIT)
def step_wide(params, table, fp, state, slots, x, out, scratch, iwork, mark, check_finite):
    """As :func:`step_serial` for few rows and large layers: each product is spread over Numba's
    threads by weight panels (every thread streams its share of the weights once for all rows),
    the cheap per-row cell arithmetic stays on the calling thread (:func:`_step_block_wide`,
    one wave at a time)."""
    bad, nw = _plan(slots, x, check_finite, mark, iwork)
    if bad >= 0:
        return bad
    nm = (iwork.shape[0] - 1) // 4
    order = iwork[:nm]
    srows = iwork[nm:2 * nm]
    wstart = iwork[2 * nm:3 * nm + 1]
    bad = iwork[3 * nm + 1:]
    for w in range(nw):
        _step_block_wide(params, table, fp, state, srows, x, out, scratch, order, bad, wstart[w],
                         wstart[w + 1])
    return _restore_all(state, srows, scratch, table[0, T_LBK], bad, slots.shape[0])


# ----------------------------------------------------------------------------------------------
# a sequence for one stream


@njit(inline="always", **_JIT)
def _first_nonfinite_row(xs):
    """Index of the first row of xs holding NaN/inf, or -1 (one branch per row; the scan of a
    row vectorises, see :func:`_nonfinite`)."""
    for t in range(xs.shape[0]):
        if _nonfinite(xs, t, 0, xs.shape[1]) > 0:
            return t
    return -1


@njit(inline="always", **_JIT)
def _rows_in(xs, scratch, A):
    """scratch[t, A:A+I] = xs[t] for every step t."""
    n_in = xs.shape[1]
    for t in range(xs.shape[0]):
        row = scratch[t, A:A + n_in]
        xr = xs[t]
        for k in range(n_in):
            row[k] = xr[k]


@njit(inline="always", **_JIT)
def _rows_out(scratch, cur, out):
    """out[t] = scratch[t, cur:cur+O] for every step t."""
    n_out = out.shape[1]
    for t in range(out.shape[0]):
        o = out[t]
        src = scratch[t, cur:cur + n_out]
        for k in range(n_out):
            o[k] = src[k]


@njit(inline="always", **_JIT)
def _check_run(state, slot, out, scratch, n, BK):
    """The end of a sequence kernel: -1 if the stream's new state and every output row are
    finite; otherwise put the state backed up in scratch[n, BK:] back and return
    PRODUCED_NONFINITE."""
    c = _nonfinite(state, slot, 0, state.shape[1])
    for t in range(out.shape[0]):
        c += _nonfinite(out, t, 0, out.shape[1])
    if c == 0:
        return -1
    _copy_row(scratch, n, BK, state, slot, 0, state.shape[1])
    return PRODUCED_NONFINITE


def _make_step_one(cells):
    """The one-event kernel of cell set ``cells``."""
    G_STD, L_STD, GEN, DENSE, DENSE_ALL, PRE = _flags(cells)

    def step_one(params, table, fp, state, slot, x, out, scratch, check_finite, flip):
        """One step of one stream (state row ``slot``): x (1, input_size) -> out (1, output_size).

        The one-event path: the arithmetic of :func:`run_sequence` for T = 1, bit for bit, with
        every product over one row (:func:`_gemv`), so that a process with an empty cache compiles
        only the one-row tiles before its first step. Products read x and the state row in place.
        ``scratch``: (2, table[0, T_LW]) or more; row 0 holds the layer inputs/outputs and input
        projections, row 1 the recurrent workspace and the state's backup. ``flip``: as in
        :func:`run_sequence`. Returns 0 if x holds NaN/inf (state untouched),
        PRODUCED_NONFINITE (state restored) or -1.
        """
        rev = flip != 0
        if check_finite and _first_nonfinite_row(x) >= 0:
            return 0
        # Row indices as int64 variables, not literals: a literal argument compiles its own
        # specialization of every helper it reaches.
        r0 = np.int64(0)
        w1 = np.int64(1)
        cw, cr, cn = np.int64(T_W), np.int64(T_R), np.int64(T_RN)  # _gemv's table columns
        GX = table[0, T_LGX]
        GH = table[0, T_LGH]
        T = table[0, T_LT]
        _copy_row(state, slot, r0, scratch, w1, table[0, T_LBK], state.shape[1])  # backup
        src = x  # the first layer reads x[0, 0:K], the others their input in scratch row 0
        s0 = r0
        cur = table[0, T_LA]
        nxt = table[0, T_LB]
        for l in range(table.shape[0]):
            K = table[l, T_IN]
            path = table[l, T_PATH]
            H = table[l, T_OUT]
            so = table[l, T_SOFF]
            if rev:  # the recurrent product first (see run_sequence)
                _gemv(params, fp, table, l, cr, H, state, slot, so, scratch, w1, GH, rev)
            _gemv(params, fp, table, l, cw, K, src, r0, s0, scratch, r0,
                  nxt if table[l, T_XOUT] else GX, rev)
            if not rev:
                _gemv(params, fp, table, l, cr, H, state, slot, so, scratch, w1, GH, rev)
            if PRE:  # a constant (see _make_step_block)
                if table[l, T_NPRN] > 0:
                    _cell_pre(L_STD, GEN, path, table, fp, l, scratch, r0, w1, state, slot,
                              so)
                    _gemv(params, fp, table, l, cn, table[l, T_HID], scratch, w1, T, scratch,
                          w1, GH, rev)
            # the new state goes to the state row, the output to this layer's output
            _cell(G_STD, L_STD, GEN, DENSE, DENSE_ALL, path, table, fp, l, scratch, r0, w1,
                  state, slot, so, scratch, r0, nxt)
            cur, nxt = nxt, cur
            src = scratch
            s0 = cur
        _copy_row(scratch, r0, cur, out, r0, r0, out.shape[1])
        return _check_run(state, slot, out, scratch, w1, table[0, T_LBK])

    return _variant(step_one, "step_one", False)


step_one = _make_step_one(CELLS_ALL)


def _make_sequence(name, parallel, cells):
    """The layer loop of the sequence kernels, written once: :func:`run_sequence`
    (``parallel=False``) and the body of :func:`run_sequence_wide` (every product spread over
    Numba's threads by groups of PANEL_GROUP panels; the cell arithmetic stays on the calling
    thread). The closure's values are the loop, ``prange`` or ``range``, and the cell set's
    flags (:func:`_flags`)."""
    if parallel and cells != CELLS_ALL:
        raise ValueError(f"cells: the parallel variant's teams call _cell_called, made for "
                         f"every cell (CELLS_ALL = {CELLS_ALL}); got {cells}")
    loop = prange if parallel else range
    G_STD, L_STD, GEN, DENSE, DENSE_ALL, PRE = _flags(cells)

    def body(params, table, fp, state, slot, xs, out, scratch, check_finite, flip):
        """Advance one stream (state row ``slot``) over xs (T, input_size) -> out
        (T, output_size).

        Layer by layer over the whole sequence: a layer's input projection (W x + Wb) is
        computed for all T steps in one product, then only the recurrent half runs step by
        step. ``scratch``: (T + 1, table[0, T_LW]); rows 0..T-1 hold each step's layer
        input/output and input projection, row T the recurrent workspace, the layer's state
        (columns T_LHH) and the state's backup. Returns the first non-finite row of xs (state
        untouched), PRODUCED_NONFINITE (state restored) or -1.

        ``flip`` (only for T = 1): read each layer's weights backwards, recurrent product
        first. A single step reads every weight once; when a layer's weights outgrow the
        core's L2, a cache keeps the part read last, so a caller alternating ``flip`` from
        call to call starts each step on weights still in L2 (the engine does, here and in
        :func:`step_one`). Results are bit-identical either way. The parallel variant never
        flips: there the argument is the number of workers of its teams
        (:func:`run_sequence_wide`).
        """
        n = xs.shape[0]
        rev = not parallel and flip != 0 and n == 1
        workers = flip if parallel else 1  # the parallel variant's last argument (see there)
        if check_finite:
            bad = _first_nonfinite_row(xs)
            if bad >= 0:
                return bad
        # Panel groups: threads take one each; a flipped step walks them backwards; otherwise
        # a serial product takes all its panels in one call.
        group = PANEL_GROUP if parallel or rev else _ALL_PANELS
        nr = 2 * VEC_BYTES // scratch.itemsize
        GX = table[0, T_LGX]
        GH = table[0, T_LGH]
        HH = table[0, T_LHH]
        T = table[0, T_LT]
        _copy_row(state, slot, 0, scratch, n, table[0, T_LBK], state.shape[1])  # backup
        _rows_in(xs, scratch, table[0, T_LA])
        zero = np.int64(0)  # not a literal 0 for the products (see _make_step_block)
        cur = table[0, T_LA]
        nxt = table[0, T_LB]
        for l in range(table.shape[0]):
            K = table[l, T_IN]
            H = table[l, T_OUT]
            npw = table[l, T_NPW]
            npr = table[l, T_NPR]
            nprn = table[l, T_NPRN]
            sw = table[l, T_SW]
            path = table[l, T_PATH]
            w_w, b_w, s_w = _product(table, l, T_W)  # each product's offsets (see _gemm)
            w_r, b_r, s_r = _product(table, l, T_R)
            w_n, b_n, s_n = _product(table, l, T_RN)

            # the layer's state, kept in the workspace row for the whole sequence
            _copy_row(state, slot, table[l, T_SOFF], scratch, n, HH, sw)
            gw = _groups(npw, group)
            # Each step's recurrent products (parallel variant): a team, a parallel region per
            # step, or the calling thread (see RUN_TEAM_MIN_MACS); the input projection over
            # all T steps is spread over threads either way. run_split_macs decides alike.
            rgroup = group
            rmacs = (H * npr + table[l, T_HID] * nprn) * nr
            if parallel and rmacs < RUN_WIDE_MIN_MACS:
                rgroup = _ALL_PANELS
            gr = _groups(npr, rgroup)
            team = parallel and workers > 1 and nprn == 0 and npr > 0 \
                and rmacs >= RUN_TEAM_MIN_MACS
            if rev:  # the one step's recurrent product first (see the docstring)
                for q in loop(gr):
                    p0, p1 = _group(_nth(q, gr, True), npr, rgroup)
                    _gemm(params, fp, w_r, b_r, s_r, H, p0, p1, scratch, None, HH,
                          scratch, GH, n, n + 1)
            px = nxt if table[l, T_XOUT] else GX  # where the input product lands
            for q in loop(gw):
                p0, p1 = _group(_nth(q, gw, rev), npw, group)
                _gemm(params, fp, w_w, b_w, s_w, K, p0, p1, scratch, None, cur,
                      scratch, px, zero, n)
            if team:
                # Worker w of ``workers`` (one parallel region) walks the T steps. Per step it
                # claims its own share of the panel groups, then any share no one has claimed
                # yet, and computes the claimed products; the worker whose groups complete the
                # step runs its cell; every worker waits for that cell before the next step.
                # Nothing waits on work that no running thread holds: a worker only waits for
                # groups another has claimed (a claim is a compare-and-swap by a running
                # worker, which then finishes it), so a worker that starts late, or never
                # shares a core with the others, finds the steps done and leaves. The products
                # are the serial kernel's, panel for panel: the same bits.
                # Sync words, a cache line apart: per share v (groups v*gt/workers ..
                # (v+1)*gt/workers), the number of steps it was claimed for; the groups done
                # over all steps; the steps whose cell is done.
                gt = _groups(npr, PANEL_GROUP)
                line = 64 // 8
                sync = np.zeros((workers + 2) * line, np.int64)
                for w in loop(workers):
                    for t in range(n):
                        mine = np.int64(0)
                        for j in range(workers):  # its own share first, then the others'
                            v = (np.int64(w) + j) % workers
                            if _atomic_cas(sync, v * line, t, t + 1):
                                g0 = v * gt // workers
                                g1 = (v + 1) * gt // workers
                                if g1 > g0:
                                    _gemm(params, fp, w_r, b_r, s_r, H, g0 * PANEL_GROUP,
                                          min(npr, g1 * PANEL_GROUP), scratch, None, HH,
                                          scratch, GH, n, n + 1)
                                    mine += g1 - g0
                        # The thread whose groups complete the step runs its cell.
                        if mine > 0 and _atomic_add(sync, workers * line,
                                                    mine) + mine == (t + 1) * gt:
                            _cell_called(path, table, fp, l, scratch, t, n, scratch, n, HH,
                                         scratch, t, nxt)
                            _atomic_add(sync, (workers + 1) * line, 1)
                        while _atomic_load(sync, (workers + 1) * line) <= t:
                            _spin_pause()
            for t in range(0 if team else n):
                if not rev:
                    if rgroup == _ALL_PANELS:  # one call, no parallel region
                        # A literal 0 on purpose: the specialization it compiles runs a
                        # 100-step sequence at H=64 3-4% faster than the int64 one.
                        _gemm(params, fp, w_r, b_r, s_r, H, 0, npr, scratch, None,
                              HH, scratch, GH, n, n + 1)
                    else:
                        for q in loop(gr):
                            p0, p1 = _group(q, npr, rgroup)
                            _gemm(params, fp, w_r, b_r, s_r, H, p0, p1, scratch, None,
                                  HH, scratch, GH, n, n + 1)
                if PRE:  # a constant (see _make_step_block)
                    if nprn > 0:
                        _cell_pre(L_STD, GEN, path, table, fp, l, scratch, t, n, scratch, n,
                                  HH)
                        if rgroup == _ALL_PANELS and not rev:
                            _gemm(params, fp, w_n, b_n, s_n, table[l, T_HID], zero, nprn,
                                  scratch, None, T, scratch, GH, n, n + 1)
                        else:
                            gn = _groups(nprn, rgroup)
                            for q in loop(gn):
                                p0, p1 = _group(_nth(q, gn, rev), nprn, rgroup)
                                _gemm(params, fp, w_n, b_n, s_n, table[l, T_HID], p0,
                                      p1, scratch, None, T, scratch, GH, n, n + 1)
                # the new state stays in the workspace row, the output goes to step t's row
                _cell(G_STD, L_STD, GEN, DENSE, DENSE_ALL, path, table, fp, l, scratch, t,
                      n, scratch, n, HH, scratch, t, nxt)
            _copy_row(scratch, n, HH, state, slot, table[l, T_SOFF], sw)
            cur, nxt = nxt, cur
        _rows_out(scratch, cur, out)
        return _check_run(state, slot, out, scratch, n, table[0, T_LBK])

    return _variant(body, name, parallel)


run_sequence = _make_sequence("run_sequence", False, CELLS_ALL)
_run_sequence_wide = _make_sequence("_run_sequence_wide", True, CELLS_ALL)


@njit(**_JIT)
def run_sequence_wide(params, table, fp, state, slot, xs, out, scratch, check_finite, workers):
    """As :func:`run_sequence`, with the products spread over Numba's threads by weight panels:
    each layer's input projection for all T steps, and each step's recurrent product as the
    layer's size makes worth it (a team of ``workers`` threads, a parallel region per step, or
    the calling thread: see RUN_TEAM_MIN_MACS). ``workers``: the threads the engine runs it on
    (more is correct too, only slower). (The engine never flips a sequence spread over threads:
    each thread's share stays in its core's cache anyway.)"""
    return _run_sequence_wide(params, table, fp, state, slot, xs, out, scratch, check_finite,
                              workers)


class KernelSet(typing.NamedTuple):
    """The kernels an engine of one cell set calls (:func:`kernels_for`)."""

    cells: int  # the set its one-event kernel holds
    step_one: object
    step_serial: object
    step_parallel: object
    step_wide: object
    run_sequence: object
    run_sequence_wide: object


# The cell sets that get a one-event kernel of their own: a model all of whose recurrent layers
# are standard float32 GRU cells, or all standard float32 LSTM cells, with no Dense layer or
# Dense layers of the common activations. Every other model takes the kernel of every cell. Few
# sets on purpose: each set a process meets compiles its kernel once more (the test suite meets
# them all), while these four cover the models people export from PyTorch and Keras. A model
# without a Dense layer gets a kernel without the activations (~0.4 s less to its first
# event on an empty cache).
ONE_EVENT_SETS = (CELL_GRU_STD32, CELL_LSTM_STD32, CELL_GRU_STD32 | CELL_DENSE,
                  CELL_LSTM_STD32 | CELL_DENSE)
_SETS = {}


def kernels_for(cells):
    """The kernels for a model of cell set ``cells`` (:func:`cells_of`), made once per process.

    The one-event kernel is the first thing a new process compiles (its first event), so it is
    made for the smallest of ONE_EVENT_SETS that holds ``cells``, or for every cell: a standard
    GRU model's first event compiles neither the LSTM's cell, nor the general paths, nor the
    rarer activations. The batch and sequence kernels hold every cell (CELLS_ALL): one
    compilation serves every model. Each one-event variant is a Numba dispatcher of its own,
    with its own cache entries (keyed by its set).
    """
    if not isinstance(cells, (int, np.integer)) or cells & ~CELLS_ALL or not cells:
        raise ValueError(f"cells: expected a cell set of CELL_* bits, got {cells!r}")
    chosen = next((c for c in ONE_EVENT_SETS if cells & ~c == 0), CELLS_ALL)
    ks = _SETS.get(chosen)
    if ks is None:
        one = step_one if chosen == CELLS_ALL else _make_step_one(chosen)
        ks = _SETS[chosen] = KernelSet(chosen, one, step_serial, step_parallel, step_wide,
                                       run_sequence, run_sequence_wide)
    return ks


# Every cell's kernels: what tests and tools that hold no model call.
ALL = kernels_for(CELLS_ALL)


# ----------------------------------------------------------------------------------------------
# state store helpers (gather/scatter by slot, so the engine never loops in Python)


@njit(**_JIT)
def gather_rows(state, slots, out):
    """out[i] = state[slots[i]]."""
    for i in range(slots.shape[0]):
        s = slots[i]
        for k in range(state.shape[1]):
            out[i, k] = state[s, k]


@njit(**_JIT)
def scatter_rows(state, slots, src):
    """state[slots[i]] = src[i], in order: a slot listed twice ends with its last row (numpy's
    fancy assignment does not promise which one; the "last" missing-value memory relies on it)."""
    for i in range(slots.shape[0]):
        s = slots[i]
        for k in range(state.shape[1]):
            state[s, k] = src[i, k]


_SET_KERNELS = ("step_one", "step_serial", "step_parallel", "step_wide", "run_sequence",
                "run_sequence_wide")


def _public_kernels():
    """(name, dispatcher) of every public kernel made so far, once each: each cell set's (under
    the kernel's name), then the others."""
    seen = set()
    for ks in list(_SETS.values()):
        for name in _SET_KERNELS:
            f = getattr(ks, name)
            if id(f) not in seen:
                seen.add(id(f))
                yield name, f
    for name, f in list(globals().items()):
        if (not name.startswith("_") and name not in _SET_KERNELS and hasattr(f, "stats")
                and hasattr(f, "py_func")):
            yield name, f


def compiled_signatures():
    """{kernel name: number of compiled signatures, over every cell set}: lets tests prove
    nothing recompiles."""
    out = {}
    for name, f in _public_kernels():
        out[name] = out.get(name, 0) + len(getattr(f, "signatures", ()))
    return out


def compile_for(kernel, args):
    """Make ``kernel`` ready for the types of ``args`` without running it: load it from Numba's
    on-disk cache, or compile it (and save it there).

    Returns "compiled", "loaded" (from the cache), "ready" (already in this process) or
    "nojit" (NUMBA_DISABLE_JIT: kernels are plain Python).
    """
    if config.DISABLE_JIT:
        return "nojit"
    from numba import typeof

    sig = tuple(typeof(a) for a in args)
    if sig in kernel.overloads:
        return "ready"
    hits = sum(kernel.stats.cache_hits.values())
    kernel.compile(sig)
    return "loaded" if sum(kernel.stats.cache_hits.values()) > hits else "compiled"


def cache_counts():
    """{public kernel name: (signatures loaded from the on-disk cache, signatures compiled)} in
    this process so far, over every cell set (a signature counts as compiled when the cache did
    not have it). Tests use it to prove that a process after ``streamgru warmup`` compiles
    nothing."""
    if config.DISABLE_JIT:
        return {}
    out = {}
    for name, f in _public_kernels():
        hits, misses = out.get(name, (0, 0))
        out[name] = (hits + sum(f.stats.cache_hits.values()),
                     misses + sum(f.stats.cache_misses.values()))
    return out


def cache_dir():
    """The directory where Numba keeps these kernels' compiled code, or None when they are not
    cached (NUMBA_DISABLE_JIT, or a tile forced by STREAMGRU_TILE).

    Numba picks it per source file when the module is imported: ``$NUMBA_CACHE_DIR`` if set;
    else ``__pycache__`` next to this file if writable; else a user-wide directory
    (``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba`` on Linux) if it can create it
    (docs/operations.md, "Cold start").
    """
    if not _JIT["cache"]:
        return None
    return step_one.stats.cache_path


# ----------------------------------------------------------------------------------------------
# int key -> slot table (open addressing, linear probing; see state.IntSlotTable)
# tab: (2 * size,) int64, size a prime below 2**31; cell j is tab[2j] (key), tab[2j + 1] (slot,
# TAB_EMPTY or TAB_TOMB): a probe reads one cache line. A key's probe starts at its home cell,
# (key mod size) * mult mod size with mult < size (no int64 overflow; the table picks mult).
# Python computes the same home as key * mult % size (exact integers), so a single key is found
# without a kernel call.

TAB_EMPTY = -1
TAB_TOMB = -2


# How many keys ahead table_lookup prefetches the cells it will probe: a large table is far
# bigger than the caches and each probe would otherwise wait for memory (~2x faster at 100,000
# keys, 4,096 lookups).
TAB_PREFETCH = 16


@njit(**_JIT)
def table_lookup(tab, mult, keys, out):
    """out[i] = slot of keys[i], or -1 when absent. Returns the number of absent keys."""
    size = tab.shape[0] // 2
    n = keys.shape[0]
    for i in range(n):  # homes first (into out), so that probes can be prefetched ahead
        out[i] = 2 * ((keys[i] % size) * mult % size)
    for i in range(min(n, TAB_PREFETCH)):
        _prefetch_r(tab, out[i])
    missing = 0
    for i in range(n):
        if i + TAB_PREFETCH < n:
            _prefetch_r(tab, out[i + TAB_PREFETCH])
        k = keys[i]
        j = out[i]
        s = -1
        while True:
            v = tab[j + 1]
            if v == TAB_EMPTY:
                break
            if v >= 0 and tab[j] == k:
                s = v
                break
            j += 2
            if j == tab.shape[0]:
                j = 0
        out[i] = s
        if s < 0:
            missing += 1
    return missing


@njit(**_JIT)
def table_insert(tab, mult, keys, slots):
    """Add keys[i] -> slots[i] for keys not in the table (the caller checks, and keeps the table
    at most half full counting tombstones)."""
    size = tab.shape[0] // 2
    for i in range(keys.shape[0]):
        j = 2 * ((keys[i] % size) * mult % size)
        while tab[j + 1] >= 0:  # the first empty or deleted cell
            j += 2
            if j == tab.shape[0]:
                j = 0
        tab[j] = keys[i]
        tab[j + 1] = slots[i]


# ----------------------------------------------------------------------------------------------
# missing input values (Engine(missing=...)): helpers of the engine's missing-value path


@njit(**_JIT)
def activate_rows(A, table, fp, layer):
    """Apply dense layer ``layer``'s activation (with the step kernels' own definitions and
    float32 approximations) to every row of ``A`` (n, out_features), in place."""
    fast = A.itemsize == 4
    for i in range(A.shape[0]):
        _act(A, i, 0, A.shape[1], table[layer, T_F], fp[layer, F_FA], fp[layer, F_FB],
             fp[layer, F_CLIP], fast)
