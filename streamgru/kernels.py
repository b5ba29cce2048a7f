"""Every Numba kernel of streamgru. Arrays in, arrays out; nothing here validates user input.

The packed model (see :mod:`streamgru.packing`) reaches a kernel as three arrays:

* ``params``: (P,) float -- every weight matrix as column panels (below) and every bias, padded;
* ``table``:  (L, NT) int64 -- one row per layer, columns ``T_*`` below; columns ``T_L*`` hold the
  scratch-row layout (the same in every row);
* ``fp``:     (L, NF) float -- activation alpha/beta and clip per layer, columns ``F_*`` below.

Weight panels. A product ``y = W v + b`` with W (M, K) is stored as ``ceil(M / NR)`` panels; panel p
is ``W[p*NR:(p+1)*NR, :].T`` laid out (K, NR) row-major (rows past M are zero), followed elsewhere
by the bias padded to a multiple of NR. ``NR = 128 / itemsize`` (two 64-byte vectors: 32 float32
or 16 float64). The product kernel (``_tile*``) keeps an (MR rows x NR columns) block of outputs in
vector registers while it streams one panel over k, broadcasting one input value per row: the
layout of a BLAS micro-kernel, written in LLVM IR because Numba cannot keep a vector accumulator
in registers otherwise.

Per-call arrays:

* ``state``:  (capacity, state_size) float -- every stream's flat state, GRU layers in order;
* ``slots``:  (n,) int64 -- the state row of each batch row;
* ``x``:      (n, input_size) float, C-contiguous; ``out``: (n, output_size) float;
* ``scratch``: (n_max, table[0, T_LW]) float -- per-row workspace (layout: ``T_L*`` columns);
* ``iwork``:  (3 * n_max + 1,) int64 -- the duplicate-key plan (order, wave, wstart);
* ``mark``:   (capacity,) int64, all zero between calls.

A key that appears k times in one batch is stepped k times in batch order: rows are split into
"waves" (wave w holds every key's (w+1)-th occurrence), and waves run one after another. Within a
wave every row has its own state slot, so rows run in parallel without races.

Kernels pick the float32 fast tanh from the dtype (``itemsize == 4``), so each kernel has one
compiled signature per dtype.
"""

import math

import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .activations import FASTMATH

# table columns: per layer
(T_KIND, T_IN, T_OUT, T_W, T_BW, T_NPW, T_R, T_BR, T_NPR, T_RN, T_BRN, T_NPRN, T_F, T_G, T_LBR,
 T_SOFF) = range(16)
# table columns: the scratch-row layout, repeated in every row
T_LA, T_LB, T_LGX, T_LGH, T_LHH, T_LT, T_LW = range(16, 23)
NT = 23
# fp columns
F_FA, F_FB, F_GA, F_GB, F_CLIP = range(5)
NF = 5
KIND_GRU, KIND_DENSE = 0, 1
VEC_BYTES = 64  # one AVX-512 register; on narrower CPUs LLVM splits each vector op in two
# Rows per block of the row-parallel kernel, and the most rows one block may hold.
ROW_BLOCK = 64
MIN_BLOCKS = 4
# A wave of fewer rows than this runs serially inside the parallel kernel.
SERIAL_WAVE_ROWS = 32

_JIT = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)


def panel_width(dtype):
    """NR: the number of output columns one weight panel holds for ``dtype``."""
    return 2 * VEC_BYTES // np.dtype(dtype).itemsize


# ----------------------------------------------------------------------------------------------
# the product micro-kernel


def _make_tile(MR, KU):
    """An intrinsic computing ``C[ci+r, cj:cj+NR] = A[ai+r, ak:ak+K] @ panel + bias`` for r < MR.

    ``panel`` is params[woff:woff+K*NR] as (K, NR), the bias params[boff:boff+NR]. Accumulators
    live in MR*KU*2 vector registers; KU > 1 splits k over independent accumulators to hide the
    FMA latency when few rows share each weight load.
    """

    @intrinsic
    def tile(typingctx, A, ai, ak, K, P, woff, boff, C, ci, cj):
        sig = types.void(A, ai, ak, K, P, woff, boff, C, ci, cj)

        def codegen(context, builder, signature, args):
            A_, ai_, ak_, K_, P_, woff_, boff_, C_, ci_, cj_ = args
            dt = signature.args[4].dtype
            lty = context.get_value_type(dt)
            VW = VEC_BYTES // (dt.bitwidth // 8)
            NR = 2 * VW
            vty = ir.VectorType(lty, VW)
            vptr = vty.as_pointer()
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)

            def c64(v):
                return ir.Constant(i64, v)

            a = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=A_)
            p = cgutils.create_struct_proxy(signature.args[4])(context, builder, value=P_)
            c = cgutils.create_struct_proxy(signature.args[7])(context, builder, value=C_)
            lda = cgutils.unpack_tuple(builder, a.shape, 2)[1]
            ldc = cgutils.unpack_tuple(builder, c.shape, 2)[1]
            abase = builder.gep(a.data, [builder.add(builder.mul(ai_, lda), ak_)])
            cbase = builder.gep(c.data, [builder.add(builder.mul(ci_, ldc), cj_)])
            wbase = builder.gep(p.data, [woff_])
            bbase = builder.gep(p.data, [boff_])
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                f"llvm.fma.v{VW}f{dt.bitwidth}")
            zero = ir.Constant(vty, None)
            bias = [builder.load(builder.bitcast(builder.gep(bbase, [c64(v * VW)]), vptr), align=4)
                    for v in range(2)]
            acc = [[[cgutils.alloca_once_value(builder, bias[v] if u == 0 else zero)
                     for v in range(2)] for u in range(KU)] for _ in range(MR)]
            und = ir.Constant(vty, ir.Undefined)
            bmask = ir.Constant(ir.VectorType(i32, VW), [0] * VW)

            def body(k, u):
                wk = builder.gep(wbase, [builder.mul(k, c64(NR))])
                wv = [builder.load(builder.bitcast(builder.gep(wk, [c64(v * VW)]), vptr),
                                   align=4) for v in range(2)]
                for r in range(MR):
                    s = builder.load(builder.gep(abase, [builder.add(builder.mul(c64(r), lda), k)]))
                    bv = builder.shuffle_vector(builder.insert_element(und, s, ir.Constant(i32, 0)),
                                                und, bmask)
                    for v in range(2):
                        slot = acc[r][u][v]
                        builder.store(builder.call(fma, [bv, wv[v], builder.load(slot)]), slot)

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
            for r in range(MR):
                crow = builder.gep(cbase, [builder.mul(c64(r), ldc)])
                for v in range(2):
                    tot = builder.load(acc[r][0][v])
                    for u in range(1, KU):
                        tot = builder.fadd(tot, builder.load(acc[r][u][v]))
                    builder.store(tot, builder.bitcast(builder.gep(crow, [c64(v * VW)]), vptr),
                                  align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _make_tile_python(MR, KU):
    """The same product in numpy, for NUMBA_DISABLE_JIT=1 runs (intrinsics need the compiler)."""

    def tile(A, ai, ak, K, P, woff, boff, C, ci, cj):
        nr = 2 * VEC_BYTES // P.itemsize
        W = P[woff:woff + K * nr].reshape(K, nr)
        C[ci:ci + MR, cj:cj + nr] = A[ai:ai + MR, ak:ak + K] @ W + P[boff:boff + nr]

    return tile


# Every tile splits k over the same two accumulator sets (KU=2), so a row's result has the same
# rounding whichever tile computes it: a batch gives bit-identical results to separate calls.
_make = _make_tile_python if config.DISABLE_JIT else _make_tile
_tile6 = _make(6, 2)
_tile4 = _make(4, 2)
_tile2 = _make(2, 2)
_tile1 = _make(1, 2)


@njit(**_JIT)
def _gemm(params, woff, boff, K, p0, p1, src, s0, dst, d0, r0, r1):
    """dst[i, d0 + p*NR ...] = src[i, s0:s0+K] @ panels p0..p1-1 + bias, for rows i in [r0, r1).

    Each panel (K x NR) stays in L1 while every row block of the range passes over it.
    """
    nr = 2 * VEC_BYTES // params.itemsize
    for p in range(p0, p1):
        w = woff + p * K * nr
        b = boff + p * nr
        c = d0 + p * nr
        i = r0
        while i + 6 <= r1:
            _tile6(src, i, s0, K, params, w, b, dst, i, c)
            i += 6
        if i + 4 <= r1:
            _tile4(src, i, s0, K, params, w, b, dst, i, c)
            i += 4
        if i + 2 <= r1:
            _tile2(src, i, s0, K, params, w, b, dst, i, c)
            i += 2
        if i < r1:
            _tile1(src, i, s0, K, params, w, b, dst, i, c)


# ----------------------------------------------------------------------------------------------
# activations


@njit(**_JIT)
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


@njit(**_JIT)
def _act(v, lo, hi, kind, alpha, beta, clip, fast):
    """Apply activation ``kind`` in place to v[lo:hi], after clipping to [-clip, clip] if clip > 0.

    ``fast`` selects the float32 tanh approximation (float32 engines); otherwise libm is used.
    Each branch is its own loop so that the common ones vectorise.
    """
    # A view indexed from 0: with offset indices Numba cannot prove them non-negative, keeps a
    # wraparound branch per element and the loops do not vectorise (14x slower).
    v = v[lo:hi]
    m = v.shape[0]
    if clip > 0:
        for k in range(m):
            v[k] = min(max(v[k], -clip), clip)
    half = v.dtype.type(0.5)
    one = v.dtype.type(1.0)
    zero = v.dtype.type(0.0)
    if kind == 0:  # identity
        return
    elif kind == 1:  # sigmoid
        if fast:
            for k in range(m):
                v[k] = half + half * _tanh32(half * v[k])
        else:
            for k in range(m):
                v[k] = one / (one + math.exp(-v[k]))
    elif kind == 2:  # tanh
        if fast:
            for k in range(m):
                v[k] = _tanh32(v[k])
        else:
            for k in range(m):
                v[k] = math.tanh(v[k])
    elif kind == 3:  # relu
        for k in range(m):
            v[k] = max(v[k], zero)
    elif kind == 4:  # hardsigmoid
        for k in range(m):
            v[k] = min(max(alpha * v[k] + beta, zero), one)
    elif kind == 5:  # leakyrelu
        for k in range(m):
            v[k] = v[k] if v[k] >= zero else alpha * v[k]
    elif kind == 6:  # affine
        for k in range(m):
            v[k] = alpha * v[k] + beta
    elif kind == 7:  # thresholdedrelu
        for k in range(m):
            v[k] = v[k] if v[k] > alpha else zero
    elif kind == 8:  # scaledtanh
        if fast:
            for k in range(m):
                v[k] = alpha * _tanh32(beta * v[k])
        else:
            for k in range(m):
                v[k] = alpha * math.tanh(beta * v[k])
    elif kind == 9:  # elu
        for k in range(m):
            if v[k] < zero:
                v[k] = alpha * (math.exp(v[k]) - one)
    elif kind == 10:  # softsign
        for k in range(m):
            v[k] = v[k] / (one + abs(v[k]))
    elif kind == 11:  # softplus: log(1 + e^x) without overflow
        for k in range(m):
            a = v[k]
            v[k] = max(a, zero) + math.log1p(math.exp(-abs(a)))
    elif kind == 12:  # softmax over the whole range
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


# ----------------------------------------------------------------------------------------------
# the step: a block of rows through every layer


@njit(**_JIT)
def _gates_zr(gx, GX, w, GH, H, fk, fa, fb, clip, fast):
    """z, r = f(GX + GH) into gx[GX:GX+2H]."""
    a = gx[GX:GX + 2 * H]
    b = w[GH:GH + 2 * H]
    for k in range(2 * H):
        a[k] += b[k]
    _act(gx, GX, GX + 2 * H, fk, fa, fb, clip, fast)


@njit(**_JIT)
def _gates_n_lbr1(gx, GX, w, GH, H, gk, ga, gb, clip, fast):
    """linear_before_reset=1: n = g(W_n x + Wb_n + r * (R_n h + Rb_n)) into gx[GX+2H:GX+3H]."""
    n = gx[GX + 2 * H:GX + 3 * H]
    r = gx[GX + H:GX + 2 * H]
    rh = w[GH + 2 * H:GH + 3 * H]
    for k in range(H):
        n[k] += r[k] * rh[k]
    _act(gx, GX + 2 * H, GX + 3 * H, gk, ga, gb, clip, fast)


@njit(**_JIT)
def _rh(gx, GX, w, HH, T, H):
    """linear_before_reset=0: r * h into w[T:T+H], the input of the R_n product."""
    r = gx[GX + H:GX + 2 * H]
    h = w[HH:HH + H]
    t = w[T:T + H]
    for k in range(H):
        t[k] = r[k] * h[k]


@njit(**_JIT)
def _gates_n_lbr0(gx, GX, w, GH, H, gk, ga, gb, clip, fast):
    """linear_before_reset=0: n = g(W_n x + Wb_n + R_n (r * h) + Rb_n); the product is in GH."""
    n = gx[GX + 2 * H:GX + 3 * H]
    p = w[GH:GH + H]
    for k in range(H):
        n[k] += p[k]
    _act(gx, GX + 2 * H, GX + 3 * H, gk, ga, gb, clip, fast)


@njit(**_JIT)
def _update(gx, GX, w, HH, H, dst, d0, srow):
    """h' = (1 - z) * n + z * h, written to dst[d0:d0+H] and to the state row."""
    one = gx.dtype.type(1.0)
    z = gx[GX:GX + H]
    n = gx[GX + 2 * H:GX + 3 * H]
    h = w[HH:HH + H]
    o = dst[d0:d0 + H]
    for k in range(H):
        hn = (one - z[k]) * n[k] + z[k] * h[k]
        o[k] = hn
        srow[k] = hn


@njit(**_JIT)
def _step_block(params, table, fp, state, slots, x, out, scratch, order, r0, r1, p0, p1):
    """Advance the batch rows order[r0:r1] (distinct state slots) through all layers.

    Scratch row i (for i in [r0, r1)) is the workspace of batch row order[i]. Only panels p0..p1-1
    of each product are computed when ``p1 >= 0`` (the panel-parallel kernel's share); ``p1 < 0``
    means every panel and the whole step.
    """
    fast = params.itemsize == 4
    A = table[0, T_LA]
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    HH = table[0, T_LHH]
    T = table[0, T_LT]
    n_in = x.shape[1]
    for i in range(r0, r1):
        xr = x[order[i]]
        row = scratch[i, A:A + n_in]
        for k in range(n_in):
            row[k] = xr[k]
    cur = A
    nxt = table[0, T_LB]
    for l in range(table.shape[0]):
        K = table[l, T_IN]
        M = table[l, T_OUT]
        if table[l, T_KIND] == KIND_DENSE:
            _gemm(params, table[l, T_W], table[l, T_BW], K, 0, table[l, T_NPW], scratch, cur,
                  scratch, nxt, r0, r1)
            for i in range(r0, r1):
                _act(scratch[i], nxt, nxt + M, table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                     fp[l, F_CLIP], fast)
        else:
            H = M
            so = table[l, T_SOFF]
            clip = fp[l, F_CLIP]
            fk, fa, fb = table[l, T_F], fp[l, F_FA], fp[l, F_FB]
            gk, ga, gb = table[l, T_G], fp[l, F_GA], fp[l, F_GB]
            for i in range(r0, r1):
                src = state[slots[order[i]], so:so + H]
                h = scratch[i, HH:HH + H]
                for k in range(H):
                    h[k] = src[k]
            _gemm(params, table[l, T_W], table[l, T_BW], K, 0, table[l, T_NPW], scratch, cur,
                  scratch, GX, r0, r1)
            _gemm(params, table[l, T_R], table[l, T_BR], H, 0, table[l, T_NPR], scratch, HH,
                  scratch, GH, r0, r1)
            for i in range(r0, r1):
                _gates_zr(scratch[i], GX, scratch[i], GH, H, fk, fa, fb, clip, fast)
            if table[l, T_LBR] == 1:
                for i in range(r0, r1):
                    _gates_n_lbr1(scratch[i], GX, scratch[i], GH, H, gk, ga, gb, clip, fast)
            else:
                for i in range(r0, r1):
                    _rh(scratch[i], GX, scratch[i], HH, T, H)
                _gemm(params, table[l, T_RN], table[l, T_BRN], H, 0, table[l, T_NPRN], scratch, T,
                      scratch, GH, r0, r1)
                for i in range(r0, r1):
                    _gates_n_lbr0(scratch[i], GX, scratch[i], GH, H, gk, ga, gb, clip, fast)
            for i in range(r0, r1):
                _update(scratch[i], GX, scratch[i], HH, H, scratch[i], nxt,
                        state[slots[order[i]], so:so + H])
        cur, nxt = nxt, cur
    n_out = out.shape[1]
    for i in range(r0, r1):
        o = out[order[i]]
        src = scratch[i, cur:cur + n_out]
        for k in range(n_out):
            o[k] = src[k]


@njit(**_JIT)
def _plan(slots, x, check_finite, mark, iwork):
    """Check x and split the batch into waves of distinct slots.

    ``iwork`` holds order (n_max), wave (n_max) and wstart (n_max + 1). Returns (bad_row,
    n_waves): bad_row >= 0 is the first row of x holding NaN/inf (nothing else is done then);
    otherwise order[wstart[w]:wstart[w+1]] are the rows of wave w, in batch order.
    """
    n = slots.shape[0]
    nm = (iwork.shape[0] - 1) // 3
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
    return -1, nw


@njit(**_JIT)
def step_serial(params, table, fp, state, slots, x, out, scratch, iwork, mark, check_finite):
    """One step for every batch row on the calling thread. Returns the first non-finite row of
    x (state untouched) or -1."""
    bad, nw = _plan(slots, x, check_finite, mark, iwork)
    if bad >= 0:
        return bad
    nm = (iwork.shape[0] - 1) // 3
    order = iwork[:nm]
    wstart = iwork[2 * nm:]
    for w in range(nw):
        r = wstart[w]
        e = wstart[w + 1]
        while r < e:
            r1 = min(e, r + ROW_BLOCK)
            _step_block(params, table, fp, state, slots, x, out, scratch, order, r, r1, 0, -1)
            r = r1
    return -1


@njit(parallel=True, **_JIT)
def step_parallel(params, table, fp, state, slots, x, out, scratch, iwork, mark, check_finite):
    """As :func:`step_serial`, with the row blocks of each wave spread over Numba's threads."""
    bad, nw = _plan(slots, x, check_finite, mark, iwork)
    if bad >= 0:
        return bad
    nm = (iwork.shape[0] - 1) // 3
    order = iwork[:nm]
    wstart = iwork[2 * nm:]
    for w in range(nw):
        s = wstart[w]
        e = wstart[w + 1]
        if e - s < SERIAL_WAVE_ROWS:
            # Bursty batches (a hot key repeated) end in many small waves: a parallel region
            # per small wave costs more than the wave, so those run on the calling thread.
            _step_block(params, table, fp, state, slots, x, out, scratch, order, s, e, 0, -1)
            continue
        # At least MIN_BLOCKS blocks (calling get_num_threads here would make the kernel
        # uncacheable), at most ROW_BLOCK rows each, in multiples of 8 rows.
        nb = max(MIN_BLOCKS, (e - s + ROW_BLOCK - 1) // ROW_BLOCK)
        size = ((e - s + nb - 1) // nb + 7) // 8 * 8
        nb = (e - s + size - 1) // size
        for b in prange(nb):
            r0 = s + b * size
            r1 = min(e, r0 + size)
            _step_block(params, table, fp, state, slots, x, out, scratch, order, r0, r1, 0, -1)
    return -1


@njit(parallel=True, **_JIT)
def step_wide(params, table, fp, state, slots, x, out, scratch, iwork, mark, check_finite):
    """As :func:`step_serial` for few rows and large layers: each product is spread over Numba's
    threads by weight panels (every thread streams its share of the weights once for all rows),
    the cheap per-row gate arithmetic stays on the calling thread."""
    bad, nw = _plan(slots, x, check_finite, mark, iwork)
    if bad >= 0:
        return bad
    nm = (iwork.shape[0] - 1) // 3
    order = iwork[:nm]
    wstart = iwork[2 * nm:]
    fast = params.itemsize == 4
    A = table[0, T_LA]
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    HH = table[0, T_LHH]
    T = table[0, T_LT]
    n_in = x.shape[1]
    n_out = out.shape[1]
    for w in range(nw):
        r0 = wstart[w]
        r1 = wstart[w + 1]
        for i in range(r0, r1):
            xr = x[order[i]]
            row = scratch[i, A:A + n_in]
            for k in range(n_in):
                row[k] = xr[k]
        cur = A
        nxt = table[0, T_LB]
        for l in range(table.shape[0]):
            K = table[l, T_IN]
            M = table[l, T_OUT]
            npw = table[l, T_NPW]
            if table[l, T_KIND] == KIND_DENSE:
                for p in prange(npw):
                    _gemm(params, table[l, T_W], table[l, T_BW], K, p, p + 1, scratch, cur,
                          scratch, nxt, r0, r1)
                for i in range(r0, r1):
                    _act(scratch[i], nxt, nxt + M, table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                         fp[l, F_CLIP], fast)
            else:
                H = M
                so = table[l, T_SOFF]
                clip = fp[l, F_CLIP]
                fk, fa, fb = table[l, T_F], fp[l, F_FA], fp[l, F_FB]
                gk, ga, gb = table[l, T_G], fp[l, F_GA], fp[l, F_GB]
                for i in range(r0, r1):
                    src = state[slots[order[i]], so:so + H]
                    h = scratch[i, HH:HH + H]
                    for k in range(H):
                        h[k] = src[k]
                npr = table[l, T_NPR]
                for q in prange(npw + npr):
                    if q < npw:
                        _gemm(params, table[l, T_W], table[l, T_BW], K, q, q + 1, scratch, cur,
                              scratch, GX, r0, r1)
                    else:
                        _gemm(params, table[l, T_R], table[l, T_BR], H, q - npw, q - npw + 1,
                              scratch, HH, scratch, GH, r0, r1)
                for i in range(r0, r1):
                    _gates_zr(scratch[i], GX, scratch[i], GH, H, fk, fa, fb, clip, fast)
                if table[l, T_LBR] == 1:
                    for i in range(r0, r1):
                        _gates_n_lbr1(scratch[i], GX, scratch[i], GH, H, gk, ga, gb, clip, fast)
                else:
                    for i in range(r0, r1):
                        _rh(scratch[i], GX, scratch[i], HH, T, H)
                    for p in prange(table[l, T_NPRN]):
                        _gemm(params, table[l, T_RN], table[l, T_BRN], H, p, p + 1, scratch, T,
                              scratch, GH, r0, r1)
                    for i in range(r0, r1):
                        _gates_n_lbr0(scratch[i], GX, scratch[i], GH, H, gk, ga, gb, clip, fast)
                for i in range(r0, r1):
                    _update(scratch[i], GX, scratch[i], HH, H, scratch[i], nxt,
                            state[slots[order[i]], so:so + H])
            cur, nxt = nxt, cur
        for i in range(r0, r1):
            o = out[order[i]]
            src = scratch[i, cur:cur + n_out]
            for k in range(n_out):
                o[k] = src[k]
    return -1


# ----------------------------------------------------------------------------------------------
# a sequence for one stream


@njit(**_JIT)
def _first_nonfinite_row(xs):
    """Index of the first row of xs holding NaN/inf, or -1 (one branch per row: vectorises)."""
    for t in range(xs.shape[0]):
        xr = xs[t]
        acc = xr[0] * 0
        for k in range(xs.shape[1]):
            acc += xr[k] * 0  # NaN or inf anywhere makes acc NaN
        if acc != acc:
            return t
    return -1


@njit(**_JIT)
def _rows_in(xs, scratch, A):
    """scratch[t, A:A+I] = xs[t] for every step t."""
    n_in = xs.shape[1]
    for t in range(xs.shape[0]):
        row = scratch[t, A:A + n_in]
        xr = xs[t]
        for k in range(n_in):
            row[k] = xr[k]


@njit(**_JIT)
def _rows_out(scratch, cur, out):
    """out[t] = scratch[t, cur:cur+O] for every step t."""
    n_out = out.shape[1]
    for t in range(out.shape[0]):
        o = out[t]
        src = scratch[t, cur:cur + n_out]
        for k in range(n_out):
            o[k] = src[k]


@njit(**_JIT)
def run_sequence(params, table, fp, state, slot, xs, out, scratch, check_finite):
    """Advance one stream (state row ``slot``) over xs (T, input_size) -> out (T, output_size).

    Layer by layer over the whole sequence: a layer's input projection (W x + Wb) is computed for
    all T steps in one product, then only the recurrent half runs step by step.
    ``scratch``: (T + 1, table[0, T_LW]); rows 0..T-1 hold each step's layer input/output and
    input projection, row T the recurrent workspace. Returns the first non-finite row of xs
    (state untouched) or -1.
    """
    fast = params.itemsize == 4
    n = xs.shape[0]
    if check_finite:
        bad = _first_nonfinite_row(xs)
        if bad >= 0:
            return bad
    A = table[0, T_LA]
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    HH = table[0, T_LHH]
    T = table[0, T_LT]
    _rows_in(xs, scratch, A)
    cur = A
    nxt = table[0, T_LB]
    w = scratch[n]
    for l in range(table.shape[0]):
        K = table[l, T_IN]
        M = table[l, T_OUT]
        if table[l, T_KIND] == KIND_DENSE:
            _gemm(params, table[l, T_W], table[l, T_BW], K, 0, table[l, T_NPW], scratch, cur,
                  scratch, nxt, 0, n)
            for t in range(n):
                _act(scratch[t], nxt, nxt + M, table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                     fp[l, F_CLIP], fast)
        else:
            H = M
            so = table[l, T_SOFF]
            clip = fp[l, F_CLIP]
            fk, fa, fb = table[l, T_F], fp[l, F_FA], fp[l, F_FB]
            gk, ga, gb = table[l, T_G], fp[l, F_GA], fp[l, F_GB]
            lbr = table[l, T_LBR]
            _gemm(params, table[l, T_W], table[l, T_BW], K, 0, table[l, T_NPW], scratch, cur,
                  scratch, GX, 0, n)
            h = w[HH:HH + H]
            src = state[slot, so:so + H]
            for k in range(H):
                h[k] = src[k]
            for t in range(n):
                gx = scratch[t]
                _gemm(params, table[l, T_R], table[l, T_BR], H, 0, table[l, T_NPR], scratch, HH,
                      scratch, GH, n, n + 1)
                _gates_zr(gx, GX, w, GH, H, fk, fa, fb, clip, fast)
                if lbr == 1:
                    _gates_n_lbr1(gx, GX, w, GH, H, gk, ga, gb, clip, fast)
                else:
                    _rh(gx, GX, w, HH, T, H)
                    _gemm(params, table[l, T_RN], table[l, T_BRN], H, 0, table[l, T_NPRN],
                          scratch, T, scratch, GH, n, n + 1)
                    _gates_n_lbr0(gx, GX, w, GH, H, gk, ga, gb, clip, fast)
                # the new h goes to this step's output and becomes the next step's h (in place)
                _update(gx, GX, w, HH, H, gx, nxt, h)
            for k in range(H):
                src[k] = h[k]
        cur, nxt = nxt, cur
    _rows_out(scratch, cur, out)
    return -1


@njit(parallel=True, **_JIT)
def run_sequence_wide(params, table, fp, state, slot, xs, out, scratch, check_finite):
    """As :func:`run_sequence`, with every product spread over Numba's threads by weight panels:
    each layer's input projection for all T steps, and each step's recurrent product. For
    layers whose recurrent weights outgrow one core's L2 (each core then keeps its share of the
    panels in its own L2 from step to step); the gate arithmetic stays on the calling thread."""
    fast = params.itemsize == 4
    n = xs.shape[0]
    if check_finite:
        bad = _first_nonfinite_row(xs)
        if bad >= 0:
            return bad
    A = table[0, T_LA]
    GX = table[0, T_LGX]
    GH = table[0, T_LGH]
    HH = table[0, T_LHH]
    T = table[0, T_LT]
    _rows_in(xs, scratch, A)
    cur = A
    nxt = table[0, T_LB]
    w = scratch[n]
    for l in range(table.shape[0]):
        K = table[l, T_IN]
        M = table[l, T_OUT]
        npw = table[l, T_NPW]
        if table[l, T_KIND] == KIND_DENSE:
            for p in prange(npw):
                _gemm(params, table[l, T_W], table[l, T_BW], K, p, p + 1, scratch, cur, scratch,
                      nxt, 0, n)
            for t in range(n):
                _act(scratch[t], nxt, nxt + M, table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                     fp[l, F_CLIP], fast)
        else:
            H = M
            so = table[l, T_SOFF]
            clip = fp[l, F_CLIP]
            fk, fa, fb = table[l, T_F], fp[l, F_FA], fp[l, F_FB]
            gk, ga, gb = table[l, T_G], fp[l, F_GA], fp[l, F_GB]
            lbr = table[l, T_LBR]
            npr = table[l, T_NPR]
            nprn = table[l, T_NPRN]
            for p in prange(npw):
                _gemm(params, table[l, T_W], table[l, T_BW], K, p, p + 1, scratch, cur, scratch,
                      GX, 0, n)
            h = w[HH:HH + H]
            src = state[slot, so:so + H]
            for k in range(H):
                h[k] = src[k]
            for t in range(n):
                gx = scratch[t]
                for p in prange(npr):
                    _gemm(params, table[l, T_R], table[l, T_BR], H, p, p + 1, scratch, HH,
                          scratch, GH, n, n + 1)
                _gates_zr(gx, GX, w, GH, H, fk, fa, fb, clip, fast)
                if lbr == 1:
                    _gates_n_lbr1(gx, GX, w, GH, H, gk, ga, gb, clip, fast)
                else:
                    _rh(gx, GX, w, HH, T, H)
                    for p in prange(nprn):
                        _gemm(params, table[l, T_RN], table[l, T_BRN], H, p, p + 1, scratch, T,
                              scratch, GH, n, n + 1)
                    _gates_n_lbr0(gx, GX, w, GH, H, gk, ga, gb, clip, fast)
                _update(gx, GX, w, HH, H, gx, nxt, h)
            for k in range(H):
                src[k] = h[k]
        cur, nxt = nxt, cur
    _rows_out(scratch, cur, out)
    return -1


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
    """state[slots[i]] = src[i]."""
    for i in range(slots.shape[0]):
        s = slots[i]
        for k in range(state.shape[1]):
            state[s, k] = src[i, k]


def compiled_signatures():
    """{kernel name: number of compiled signatures}: lets tests prove nothing recompiles."""
    return {f.__name__: len(f.signatures)
            for f in (step_serial, step_parallel, step_wide, run_sequence, run_sequence_wide,
                      table_lookup, table_insert, table_delete, gather_rows,
                      scatter_rows)}


# ----------------------------------------------------------------------------------------------
# int key -> slot table (open addressing, linear probing; see state.IntSlotTable)
# tkeys, tvals: (cap,) int64, cap a power of two; tvals[i] is a slot, TAB_EMPTY or TAB_TOMB.
# hashes are computed by the caller (numpy, vectorised): the probe starts at hashes[i].

TAB_EMPTY = -1
TAB_TOMB = -2


@njit(**_JIT)
def table_lookup(tkeys, tvals, keys, hashes, out):
    """out[i] = slot of keys[i], or -1 when absent. Returns the number of absent keys."""
    mask = tkeys.shape[0] - 1
    missing = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        j = hashes[i]
        s = -1
        while True:
            v = tvals[j]
            if v == TAB_EMPTY:
                break
            if v >= 0 and tkeys[j] == k:
                s = v
                break
            j = (j + 1) & mask
        out[i] = s
        if s < 0:
            missing += 1
    return missing


@njit(**_JIT)
def table_insert(tkeys, tvals, keys, slots, hashes):
    """Insert (or update) keys[i] -> slots[i]; the caller keeps the table at most half full."""
    mask = tkeys.shape[0] - 1
    for i in range(keys.shape[0]):
        k = keys[i]
        j = hashes[i]
        free = -1
        while True:
            v = tvals[j]
            if v == TAB_EMPTY:
                if free < 0:
                    free = j
                break
            if v == TAB_TOMB:
                if free < 0:
                    free = j
            elif tkeys[j] == k:
                free = j
                break
            j = (j + 1) & mask
        tkeys[free] = k
        tvals[free] = slots[i]


@njit(**_JIT)
def table_delete(tkeys, tvals, key, h):
    """Remove ``key`` (leaving a tombstone). Returns 1 if it was present, else 0."""
    mask = tkeys.shape[0] - 1
    j = h
    while True:
        v = tvals[j]
        if v == TAB_EMPTY:
            return 0
        if v >= 0 and tkeys[j] == key:
            tvals[j] = TAB_TOMB
            return 1
        j = (j + 1) & mask
