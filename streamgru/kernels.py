"""Every Numba kernel of streamgru. Arrays in, arrays out; nothing here validates user input.

The packed model (see :mod:`streamgru.packing`) reaches a kernel as three arrays:

* ``params``: (P,) float — every weight and bias, each block 64-byte aligned;
* ``table``:  (L, NT) int64 — one row per layer, columns ``T_*`` below;
* ``fp``:     (L, NF) float — activation alpha/beta and clip per layer, columns ``F_*`` below.

Per-call arrays:

* ``state``:  (capacity, state_size) float — every stream's flat state, GRU layers in order;
* ``slots``:  (n,) int64 — the state row of each batch row;
* ``x``:      (n, input_size) float, C-contiguous; ``out``: (n, output_size) float;
* ``scratch``: (n_max, scratch_width) float — per-row workspace (layout in ``scratch_layout``);
* ``order``, ``wave``: (n_max,) int64; ``wstart``: (n_max + 1,) int64 — the duplicate-key plan;
* ``mark``:   (capacity,) int64, all zero between calls.

A key that appears k times in one batch is stepped k times in batch order: rows are split into
"waves" (wave w holds every key's (w+1)-th occurrence), and waves run one after another. Within a
wave every row has its own state slot, so rows run in parallel without races.
"""

import math

import numpy as np
from numba import njit, prange

from .activations import FASTMATH

# table columns
T_KIND, T_IN, T_OUT, T_W, T_R, T_BW, T_BR, T_F, T_G, T_LBR, T_SOFF = range(11)
NT = 11
# fp columns
F_FA, F_FB, F_GA, F_GB, F_CLIP = range(5)
NF = 5
KIND_GRU, KIND_DENSE = 0, 1
# rows per block: weights are streamed once per block of rows, and a block's rows stay in L1.
BLOCK = 8

_JIT = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)


@njit(**_JIT)
def scratch_layout(table):
    """(maxw, hmax, width): widest layer io, largest hidden size, per-row scratch width.

    Row layout: [A: maxw | B: maxw | GX: 3*hmax | GH: 3*hmax | HH: hmax | T: hmax].
    """
    maxw = 1
    hmax = 1
    for l in range(table.shape[0]):
        maxw = max(maxw, table[l, T_IN], table[l, T_OUT])
        if table[l, T_KIND] == KIND_GRU:
            hmax = max(hmax, table[l, T_OUT])
    return maxw, hmax, 2 * maxw + 8 * hmax


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
    if clip > 0:
        for k in range(lo, hi):
            v[k] = min(max(v[k], -clip), clip)
    half = v.dtype.type(0.5)
    one = v.dtype.type(1.0)
    zero = v.dtype.type(0.0)
    if kind == 0:  # identity
        return
    elif kind == 1:  # sigmoid
        if fast:
            for k in range(lo, hi):
                v[k] = half + half * _tanh32(half * v[k])
        else:
            for k in range(lo, hi):
                v[k] = one / (one + math.exp(-v[k]))
    elif kind == 2:  # tanh
        if fast:
            for k in range(lo, hi):
                v[k] = _tanh32(v[k])
        else:
            for k in range(lo, hi):
                v[k] = math.tanh(v[k])
    elif kind == 3:  # relu
        for k in range(lo, hi):
            v[k] = max(v[k], zero)
    elif kind == 4:  # hardsigmoid
        for k in range(lo, hi):
            v[k] = min(max(alpha * v[k] + beta, zero), one)
    elif kind == 5:  # leakyrelu
        for k in range(lo, hi):
            v[k] = v[k] if v[k] >= zero else alpha * v[k]
    elif kind == 6:  # affine
        for k in range(lo, hi):
            v[k] = alpha * v[k] + beta
    elif kind == 7:  # thresholdedrelu
        for k in range(lo, hi):
            v[k] = v[k] if v[k] > alpha else zero
    elif kind == 8:  # scaledtanh
        if fast:
            for k in range(lo, hi):
                v[k] = alpha * _tanh32(beta * v[k])
        else:
            for k in range(lo, hi):
                v[k] = alpha * math.tanh(beta * v[k])
    elif kind == 9:  # elu
        for k in range(lo, hi):
            if v[k] < zero:
                v[k] = alpha * (math.exp(v[k]) - one)
    elif kind == 10:  # softsign
        for k in range(lo, hi):
            v[k] = v[k] / (one + abs(v[k]))
    elif kind == 11:  # softplus: log(1 + e^x) without overflow
        for k in range(lo, hi):
            a = v[k]
            v[k] = max(a, zero) + math.log1p(math.exp(-abs(a)))
    elif kind == 12:  # softmax over the whole range
        m = v[lo]
        for k in range(lo, hi):
            m = max(m, v[k])
        s = zero
        for k in range(lo, hi):
            e = math.exp(v[k] - m)
            v[k] = e
            s += e
        inv = one / s
        for k in range(lo, hi):
            v[k] *= inv


# ----------------------------------------------------------------------------------------------
# products


@njit(**_JIT)
def _affine_rows(params, woff, boff, M, K, src, s0, dst, d0, r0, r1):
    """dst[i, d0:d0+M] = W @ src[i, s0:s0+K] + b for scratch rows i in [r0, r1).

    W is params[woff:woff+M*K] as (M, K) row-major, b is params[boff:boff+M]. Each weight row is
    loaded once for four rows of ``src`` (register blocking over rows), so the weights are
    streamed once per block of rows rather than once per row.
    """
    # Slices (views) rather than offset arithmetic in the inner loop: with a plain loop index
    # Numba can prove the subscripts non-negative, and the reduction vectorises.
    i = r0
    while i + 4 <= r1:
        x0 = src[i, s0:s0 + K]
        x1 = src[i + 1, s0:s0 + K]
        x2 = src[i + 2, s0:s0 + K]
        x3 = src[i + 3, s0:s0 + K]
        for j in range(M):
            w = params[woff + j * K:woff + (j + 1) * K]
            bj = params[boff + j]
            a0 = bj
            a1 = bj
            a2 = bj
            a3 = bj
            for k in range(K):
                wk = w[k]
                a0 += wk * x0[k]
                a1 += wk * x1[k]
                a2 += wk * x2[k]
                a3 += wk * x3[k]
            dst[i, d0 + j] = a0
            dst[i + 1, d0 + j] = a1
            dst[i + 2, d0 + j] = a2
            dst[i + 3, d0 + j] = a3
        i += 4
    while i < r1:
        x0 = src[i, s0:s0 + K]
        for j in range(M):
            w = params[woff + j * K:woff + (j + 1) * K]
            a0 = params[boff + j]
            for k in range(K):
                a0 += w[k] * x0[k]
            dst[i, d0 + j] = a0
        i += 1


# ----------------------------------------------------------------------------------------------
# one GRU update of a scratch row, once its products are in place


@njit(**_JIT)
def _gru_gates_lbr1(row, GX, GH, H, fk, fa, fb, gk, ga, gb, clip, fast):
    """linear_before_reset=1: GX holds W x + Wb, GH holds R h + Rb. Leaves z, r, n in GX."""
    for k in range(2 * H):
        row[GX + k] += row[GH + k]
    _act(row, GX, GX + 2 * H, fk, fa, fb, clip, fast)
    for k in range(H):
        row[GX + 2 * H + k] += row[GX + H + k] * row[GH + 2 * H + k]
    _act(row, GX + 2 * H, GX + 3 * H, gk, ga, gb, clip, fast)


@njit(**_JIT)
def _gru_zr_lbr0(row, GX, GH, HH, H, fk, fa, fb, clip, fast):
    """linear_before_reset=0, first half: z, r into GX; r * h into GH[2H:3H]."""
    for k in range(2 * H):
        row[GX + k] += row[GH + k]
    _act(row, GX, GX + 2 * H, fk, fa, fb, clip, fast)
    for k in range(H):
        row[GH + 2 * H + k] = row[GX + H + k] * row[HH + k]


# ----------------------------------------------------------------------------------------------
# the step: a block of rows through every layer


@njit(**_JIT)
def _step_block(params, table, fp, state, slots, x, out, scratch, order, r0, r1, fast):
    """Advance the batch rows order[r0:r1] (distinct state slots) through all layers.

    Scratch row i (for i in [r0, r1)) is the workspace of batch row order[i].
    """
    maxw, hmax, _ = scratch_layout(table)
    A = 0
    B = maxw
    GX = 2 * maxw
    GH = GX + 3 * hmax
    HH = GH + 3 * hmax
    T = HH + hmax  # spare hmax (lbr=0 candidate product)
    n_in = x.shape[1]
    for i in range(r0, r1):
        r = order[i]
        for k in range(n_in):
            scratch[i, A + k] = x[r, k]
    cur = A
    nxt = B
    for l in range(table.shape[0]):
        K = table[l, T_IN]
        M = table[l, T_OUT]
        if table[l, T_KIND] == KIND_DENSE:
            _affine_rows(params, table[l, T_W], table[l, T_BW], M, K, scratch, cur, scratch, nxt,
                         r0, r1)
            for i in range(r0, r1):
                _act(scratch[i], nxt, nxt + M, table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                     fp[l, F_CLIP], fast)
        else:
            H = M
            so = table[l, T_SOFF]
            clip = fp[l, F_CLIP]
            _affine_rows(params, table[l, T_W], table[l, T_BW], 3 * H, K, scratch, cur, scratch,
                         GX, r0, r1)
            for i in range(r0, r1):
                s = slots[order[i]]
                for k in range(H):
                    scratch[i, HH + k] = state[s, so + k]
            if table[l, T_LBR] == 1:
                _affine_rows(params, table[l, T_R], table[l, T_BR], 3 * H, H, scratch, HH,
                             scratch, GH, r0, r1)
                for i in range(r0, r1):
                    _gru_gates_lbr1(scratch[i], GX, GH, H, table[l, T_F], fp[l, F_FA],
                                    fp[l, F_FB], table[l, T_G], fp[l, F_GA], fp[l, F_GB], clip,
                                    fast)
            else:
                _affine_rows(params, table[l, T_R], table[l, T_BR], 2 * H, H, scratch, HH,
                             scratch, GH, r0, r1)
                for i in range(r0, r1):
                    _gru_zr_lbr0(scratch[i], GX, GH, HH, H, table[l, T_F], fp[l, F_FA],
                                 fp[l, F_FB], clip, fast)
                _affine_rows(params, table[l, T_R] + 2 * H * H, table[l, T_BR] + 2 * H, H, H,
                             scratch, GH + 2 * H, scratch, T, r0, r1)
                for i in range(r0, r1):
                    row = scratch[i]
                    for k in range(H):
                        row[GX + 2 * H + k] += row[T + k]
                    _act(row, GX + 2 * H, GX + 3 * H, table[l, T_G], fp[l, F_GA], fp[l, F_GB],
                         clip, fast)
            one = scratch.dtype.type(1.0)
            for i in range(r0, r1):
                s = slots[order[i]]
                row = scratch[i]
                for k in range(H):
                    z = row[GX + k]
                    hn = (one - z) * row[GX + 2 * H + k] + z * row[HH + k]
                    row[nxt + k] = hn
                    state[s, so + k] = hn
        cur, nxt = nxt, cur
    n_out = out.shape[1]
    for i in range(r0, r1):
        r = order[i]
        for k in range(n_out):
            out[r, k] = scratch[i, cur + k]


@njit(**_JIT)
def _plan(slots, x, check_finite, mark, order, wave, wstart):
    """Check x and split the batch into waves of distinct slots.

    Returns (bad_row, n_waves): bad_row >= 0 is the first row of x holding NaN/inf (nothing else
    is done then); otherwise order[wstart[w]:wstart[w+1]] are the rows of wave w, in batch order.
    """
    n = slots.shape[0]
    if check_finite:
        for i in range(n):
            for k in range(x.shape[1]):
                if not math.isfinite(x[i, k]):
                    return i, 0
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
def step_serial(params, table, fp, state, slots, x, out, scratch, order, wave, wstart, mark,
                check_finite, fast):
    """One step for every batch row on the calling thread. Returns the first non-finite row of
    x (state untouched) or -1."""
    bad, nw = _plan(slots, x, check_finite, mark, order, wave, wstart)
    if bad >= 0:
        return bad
    for w in range(nw):
        r = wstart[w]
        e = wstart[w + 1]
        while r < e:
            r1 = min(e, r + 4 * BLOCK)
            _step_block(params, table, fp, state, slots, x, out, scratch, order, r, r1, fast)
            r = r1
    return -1


@njit(parallel=True, **_JIT)
def step_parallel(params, table, fp, state, slots, x, out, scratch, order, wave, wstart, mark,
                  check_finite, fast):
    """As :func:`step_serial`, with the blocks of each wave spread over Numba's threads."""
    bad, nw = _plan(slots, x, check_finite, mark, order, wave, wstart)
    if bad >= 0:
        return bad
    for w in range(nw):
        s = wstart[w]
        e = wstart[w + 1]
        nb = (e - s + BLOCK - 1) // BLOCK
        for b in prange(nb):
            r0 = s + b * BLOCK
            r1 = min(e, r0 + BLOCK)
            _step_block(params, table, fp, state, slots, x, out, scratch, order, r0, r1, fast)
    return -1


# ----------------------------------------------------------------------------------------------
# a sequence for one stream


@njit(**_JIT)
def run_sequence(params, table, fp, state, slot, xs, out, scratch, check_finite, fast):
    """Advance one stream (state row ``slot``) over xs (T, input_size) -> out (T, output_size).

    Layer by layer over the whole sequence: a layer's input projection (W x + Wb) is computed for
    all T steps at once, then only the recurrent half runs step by step.
    ``scratch``: (T + 1, scratch_layout(table)[2]); row T is the
    per-step workspace (see scratch_layout). Returns the first non-finite row of xs (state untouched) or -1.
    """
    T = xs.shape[0]
    if check_finite:
        for t in range(T):
            for k in range(xs.shape[1]):
                if not math.isfinite(xs[t, k]):
                    return t
    maxw, hmax, _ = scratch_layout(table)
    A = 0
    B = maxw
    GX = 2 * maxw
    # per-step workspace in row T
    GH = 0
    HH = 3 * hmax
    TMP = 4 * hmax
    Z = 5 * hmax
    for t in range(T):
        for k in range(xs.shape[1]):
            scratch[t, A + k] = xs[t, k]
    cur = A
    nxt = B
    w = scratch[T]
    one = scratch.dtype.type(1.0)
    for l in range(table.shape[0]):
        K = table[l, T_IN]
        M = table[l, T_OUT]
        if table[l, T_KIND] == KIND_DENSE:
            _affine_rows(params, table[l, T_W], table[l, T_BW], M, K, scratch, cur, scratch, nxt,
                         0, T)
            for t in range(T):
                _act(scratch[t], nxt, nxt + M, table[l, T_F], fp[l, F_FA], fp[l, F_FB],
                     fp[l, F_CLIP], fast)
        else:
            H = M
            so = table[l, T_SOFF]
            clip = fp[l, F_CLIP]
            lbr = table[l, T_LBR]
            _affine_rows(params, table[l, T_W], table[l, T_BW], 3 * H, K, scratch, cur, scratch,
                         GX, 0, T)
            for k in range(H):
                w[HH + k] = state[slot, so + k]
            for t in range(T):
                row = scratch[t]
                # recurrent products for this step, one row at a time (T is the only row: T..T+1)
                if lbr == 1:
                    _affine_rows(params, table[l, T_R], table[l, T_BR], 3 * H, H, scratch, HH,
                                 scratch, GH, T, T + 1)
                    for k in range(2 * H):
                        row[GX + k] += w[GH + k]
                    _act(row, GX, GX + 2 * H, table[l, T_F], fp[l, F_FA], fp[l, F_FB], clip,
                         fast)
                    for k in range(H):
                        row[GX + 2 * H + k] += row[GX + H + k] * w[GH + 2 * H + k]
                else:
                    _affine_rows(params, table[l, T_R], table[l, T_BR], 2 * H, H, scratch, HH,
                                 scratch, GH, T, T + 1)
                    for k in range(2 * H):
                        row[GX + k] += w[GH + k]
                    _act(row, GX, GX + 2 * H, table[l, T_F], fp[l, F_FA], fp[l, F_FB], clip,
                         fast)
                    for k in range(H):
                        w[Z + k] = row[GX + H + k] * w[HH + k]
                    _affine_rows(params, table[l, T_R] + 2 * H * H, table[l, T_BR] + 2 * H, H, H,
                                 scratch, Z, scratch, TMP, T, T + 1)
                    for k in range(H):
                        row[GX + 2 * H + k] += w[TMP + k]
                _act(row, GX + 2 * H, GX + 3 * H, table[l, T_G], fp[l, F_GA], fp[l, F_GB], clip,
                     fast)
                for k in range(H):
                    z = row[GX + k]
                    hn = (one - z) * row[GX + 2 * H + k] + z * w[HH + k]
                    w[HH + k] = hn
                    row[nxt + k] = hn
            for k in range(H):
                state[slot, so + k] = w[HH + k]
        cur, nxt = nxt, cur
    for t in range(T):
        for k in range(out.shape[1]):
            out[t, k] = scratch[t, cur + k]
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
            for f in (step_serial, step_parallel, run_sequence, gather_rows, scatter_rows)}
