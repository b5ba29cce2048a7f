"""A slow, obviously correct float64 numpy reference for a streamgru Model (the ONNX equations).

It reads a model's layers (their tensors, settings and ``state_size``) and nothing else from
streamgru: no kernel, no engine code. Every activation is written straight from the ONNX operator
definitions in float64. Each layer kind has one step function in :data:`STEPS`; the reference
lives here, not in streamgru, so that it stays independent of the code it checks.
"""

import numpy as np


def act(name, alpha, beta, v):
    v = np.asarray(v, dtype=np.float64)
    if name == "identity":
        return v
    if name == "sigmoid":
        return np.exp(-np.logaddexp(0.0, -v))
    if name == "tanh":
        return np.tanh(v)
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "hardsigmoid":
        return np.minimum(np.maximum(alpha * v + beta, 0.0), 1.0)
    if name == "leakyrelu":
        return np.where(v >= 0, v, alpha * v)
    if name == "affine":
        return alpha * v + beta
    if name == "thresholdedrelu":
        return np.where(v > alpha, v, 0.0)
    if name == "scaledtanh":
        return alpha * np.tanh(beta * v)
    if name == "elu":
        return np.where(v >= 0, v, alpha * (np.exp(np.minimum(v, 0.0)) - 1.0))
    if name == "softsign":
        return v / (1.0 + np.abs(v))
    if name == "softplus":
        return np.logaddexp(0.0, v)
    if name == "softmax":
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise ValueError(name)


def gru_cell(layer, x, h):
    """One GRU step for a batch: x (n, I), h (n, H) -> h' (n, H), all float64."""
    H = layer.hidden_size
    W, R = layer.W.astype(np.float64), layer.R.astype(np.float64)
    Wb, Rb = layer.Wb.astype(np.float64), layer.Rb.astype(np.float64)
    Wz, Wr, Wn = W[:H], W[H:2 * H], W[2 * H:]
    Rz, Rr, Rn = R[:H], R[H:2 * H], R[2 * H:]
    bz, br, bn = Wb[:H], Wb[H:2 * H], Wb[2 * H:]
    cz, cr, cn = Rb[:H], Rb[H:2 * H], Rb[2 * H:]

    def clip(v):
        return v if layer.clip is None else np.clip(v, -layer.clip, layer.clip)

    f = lambda v: act(*layer.f, clip(v))  # noqa: E731
    g = lambda v: act(*layer.g, clip(v))  # noqa: E731
    z = f(x @ Wz.T + bz + h @ Rz.T + cz)
    r = f(x @ Wr.T + br + h @ Rr.T + cr)
    if layer.linear_before_reset:
        n = g(x @ Wn.T + bn + r * (h @ Rn.T + cn))
    else:
        n = g(x @ Wn.T + bn + (r * h) @ Rn.T + cn)
    return (1.0 - z) * n + z * h


def dense(layer, x):
    return act(*layer.activation, x @ layer.W.astype(np.float64).T + layer.b.astype(np.float64))


def gru_step(layer, x, s):
    """STEPS entry of a GRU layer: its state is h, its output h'."""
    h = gru_cell(layer, x, s)
    return h, h


def dense_step(layer, x, s):
    """STEPS entry of a Dense layer: no state (``s`` is (n, 0))."""
    return dense(layer, x), s


#: layer kind -> step(layer, x (n, input_size), s (n, state_size)) -> (y, s'), all float64.
STEPS = {"gru": gru_step, "dense": dense_step}


def step(model, state, x):
    """Advance a batch of streams one step.

    state: (n, model.state_size), x: (n, input_size) -> (y (n, output_size), new state), float64.
    Each layer reads and writes its own ``state_size`` columns of the state, in layer order.
    ``model`` may also be a plain list of layers.
    """
    layers = getattr(model, "layers", model)
    v = np.asarray(x, dtype=np.float64)
    state = np.array(state, dtype=np.float64)
    width = sum(layer.state_size for layer in layers)
    if state.shape[1] != width:
        raise ValueError(f"state: expected {width} values per stream, got {state.shape[1]}")
    new_state = state.copy()
    off = 0
    for layer in layers:
        sl = slice(off, off + layer.state_size)
        v, new_state[:, sl] = STEPS[layer.kind](layer, v, state[:, sl])
        off = sl.stop
    return v, new_state


def run(model, xs, state=None):
    """One stream over a sequence: xs (T, input_size) -> (ys (T, output_size), final state)."""
    xs = np.asarray(xs, dtype=np.float64)
    s = np.zeros((1, model.state_size)) if state is None else np.array(state, np.float64).reshape(1, -1)
    ys = []
    for t in range(xs.shape[0]):
        y, s = step(model, s, xs[t:t + 1])
        ys.append(y[0])
    return np.array(ys).reshape(xs.shape[0], model.output_size), s[0]


def max_error_vs_reference(model, ref):
    """Largest |oracle - reference| over a stored reference file's sequences (npz with x, y and,
    from initial states h0, y_h0; the Keras/RTNeural fixtures), from zeros and from h0."""
    err = 0.0
    for b in range(ref["x"].shape[0]):
        y, _ = run(model, ref["x"][b])
        err = max(err, np.abs(y - ref["y"][b]).max())
        y, _ = run(model, ref["x"][b], ref["h0"][b])
        err = max(err, np.abs(y - ref["y_h0"][b]).max())
    return err


def tail(model, h):
    """The layers after the last recurrent layer applied to that layer's output h (n, H),
    float64: the model's output for a held state."""
    last = max(i for i, layer in enumerate(model.layers) if layer.state_size > 0)
    v = np.asarray(h, dtype=np.float64)
    for layer in model.layers[last + 1:]:
        v, _ = STEPS[layer.kind](layer, v, np.zeros((v.shape[0], 0)))
    return v


# The LSTM (streamgru/layers/lstm.py, docs/lstm.md): the ONNX LSTM equations plus PyTorch's
# projection, for a streamgru.LSTMLayer or a tests/helpers.LSTMSpec (the same attributes);
# checked against torch and onnxruntime in tests/test_oracle.py.

def lstm_cell(layer, x, h, c):
    """One LSTM step for a batch, from the ONNX LSTM equations (docs/lstm.md), all float64.

    x (n, I), h (n, H_out), c (n, H) -> (h' (n, H_out), c' (n, H)), with H_out = proj_size if
    ``layer.proj`` is set, else H. ``layer`` has ``W`` (4H, I), ``R`` (4H, H_out), ``Wb``,
    ``Rb`` (4H,) in gate order i, o, f, c; ``P`` (3H,) peepholes i, o, f or None; ``proj``
    (proj_size, H) or None; ``clip`` (float or None); ``input_forget`` (0/1); ``f``, ``g``, ``h``
    (name, alpha, beta) triples.
    """
    W, R = layer.W.astype(np.float64), layer.R.astype(np.float64)
    Wb, Rb = layer.Wb.astype(np.float64), layer.Rb.astype(np.float64)
    H = W.shape[0] // 4
    Wi, Wo, Wf, Wc = np.split(W, 4)
    Ri, Ro, Rf, Rc = np.split(R, 4)
    bi, bo, bf, bc = np.split(Wb, 4)
    ri, ro, rf, rc = np.split(Rb, 4)
    if layer.P is None:
        pi = po = pf = np.zeros(H)
    else:
        pi, po, pf = np.split(layer.P.astype(np.float64), 3)

    def clip(v):
        return v if layer.clip is None else np.clip(v, -layer.clip, layer.clip)

    x, h, c = (np.asarray(v, dtype=np.float64) for v in (x, h, c))
    i = act(*layer.f, clip(x @ Wi.T + bi + h @ Ri.T + ri + pi * c))
    if layer.input_forget:
        f = 1.0 - i
    else:
        f = act(*layer.f, clip(x @ Wf.T + bf + h @ Rf.T + rf + pf * c))
    cand = act(*layer.g, clip(x @ Wc.T + bc + h @ Rc.T + rc))
    c_new = f * c + i * cand
    o = act(*layer.f, clip(x @ Wo.T + bo + h @ Ro.T + ro + po * c_new))
    h_new = o * act(*layer.h, c_new)
    if layer.proj is not None:
        h_new = h_new @ layer.proj.astype(np.float64).T
    return h_new, c_new


def lstm_layer_step(layer, x, s):
    """STEPS entry of an LSTM layer: its state is h (H_out wide) then c (H wide), its output h'."""
    hw = layer.R.shape[1]
    h, c = lstm_cell(layer, x, s[:, :hw], s[:, hw:])
    return h, np.concatenate([h, c], axis=1)


STEPS["lstm"] = lstm_layer_step


def lstm_step(layers, state, x):
    """Advance a batch of streams one step through a list of LSTM and Dense layers (LSTMLayer
    or tests/helpers.LSTMSpec): :func:`step` over a list of layers, each LSTM layer's state h
    then c, layers in order."""
    return step(layers, state, x)


class MissingStreams:
    """Streams under a missing-value policy ("skip", "zero", "last"), fed one row at a time:
    per-key float64 states and last observed values, written from the policy's definition.

    skip: a row with any NaN keeps the state and outputs tail(held h of the last recurrent
    layer);
    zero: NaN -> 0; last: NaN -> the key's last observed value of that feature (0 if never),
    and every observed value becomes the new last observed one.
    """

    def __init__(self, model, policy):
        self.model, self.policy = model, policy
        self.states, self.last = {}, {}

    def state(self, key):
        return self.states.get(key, np.zeros(self.model.state_size))

    def memory(self, key):
        return self.last.get(key, np.zeros(self.model.input_size))

    def feed(self, key, row):
        """One row for ``key``; returns its output (output_size,)."""
        row = np.asarray(row, dtype=np.float64)
        s = self.state(key)
        nan = np.isnan(row)
        if self.policy == "skip" and nan.any():
            # the last recurrent layer's h: its state's first output_size values (GRU: all
            # of it; LSTM: h, then C)
            last = [layer for layer in self.model.layers if layer.state_size > 0][-1]
            start = sum(layer.state_size for layer in self.model.layers[
                :self.model.layers.index(last)])
            h = s[start:start + last.output_size]
            self.states[key] = s
            return tail(self.model, h[None, :])[0]
        if self.policy == "zero":
            row = np.where(nan, 0.0, row)
        elif self.policy == "last":
            row = np.where(nan, self.memory(key), row)
            self.last[key] = row
        y, s2 = step(self.model, s[None, :], row[None, :])
        self.states[key] = s2[0]
        return y[0]

    def feed_rows(self, keys, x):
        return np.array([self.feed(k, r) for k, r in zip(keys, x)])
