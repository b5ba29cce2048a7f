"""converters.from_torch against PyTorch itself, step by step, for several interleaved streams.

Every reference output comes from running the torch modules (float32: within 1e-5; modules
built in double: within 1e-9). Our side is the float64 oracle, and ``streamgru.Engine`` in both
dtypes once it exists.
"""

import json

import numpy as np
import oracle
import pytest

from streamgru import Engine
from streamgru.errors import UnsupportedModelError
from streamgru.model import GRUModel

torch = pytest.importorskip("torch")
nn = torch.nn

from converters.from_torch import from_torch  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-9}
DTYPES = [torch.float32, torch.float64]
N_STREAMS, T = 3, 7


def _build(factory, tdtype, seed=0):
    torch.manual_seed(seed)
    return factory().to(tdtype).eval()


# ---------------------------------------------------------------------------------------------
# Reference runs and the interleaved comparison


class Ref:
    """Torch reference for one model: forward(xs (T, I), state (S,)) -> (ys (T, O), state (S,)).

    ``parts`` are the GRU modules (nn.GRU or nn.GRUCell) in order; the flat stream state is the
    concatenation of their ``h[:, 0, :].reshape(-1)``, which is streamgru's layout.
    """

    def __init__(self, parts, forward, input_size, tdtype):
        self.parts, self.forward_fn = parts, forward
        self.input_size, self.tdtype = input_size, tdtype
        self.sizes = [p.hidden_size * getattr(p, "num_layers", 1) for p in parts]

    @property
    def state_size(self):
        return sum(self.sizes)

    def split(self, state):
        out, off = [], 0
        for p, n in zip(self.parts, self.sizes, strict=True):
            h = torch.tensor(state[off:off + n], dtype=self.tdtype)
            out.append(h.reshape(getattr(p, "num_layers", 1), 1, p.hidden_size))
            off += n
        return out

    def run(self, xs, state):
        with torch.no_grad():
            x = torch.tensor(xs, dtype=self.tdtype)
            ys, hs = self.forward_fn(x, self.split(state))
        flat = np.concatenate([h.double().numpy().reshape(-1) for h in hs])
        return ys.double().numpy(), flat


def run_gru(gru, x, h):
    """nn.GRU over x (T, I) from h (L, 1, H), honouring batch_first; -> (T, H), (L, 1, H)."""
    if gru.batch_first:
        y, h = gru(x[None], h)
        return y[0], h
    y, h = gru(x[:, None], h)
    return y[:, 0], h


def run_cell(cell, x, h):
    """nn.GRUCell stepped over x (T, I) from h (1, 1, H)."""
    hc, ys = h[0], []
    for t in range(x.shape[0]):
        hc = cell(x[t:t + 1], hc)
        ys.append(hc[0])
    return torch.stack(ys), hc[None]


def compare(model, ref, *, seed=1):
    """Interleave N_STREAMS streams (random subsets per tick, nonzero initial states) through
    the oracle and the Engine, checking each step against the torch reference of that stream."""
    assert isinstance(model, GRUModel)
    assert model.state_size == ref.state_size
    tol = TOL[ref.tdtype]
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(T, ref.input_size)) for _ in range(N_STREAMS)]
    h0 = [0.5 * rng.normal(size=ref.state_size) for _ in range(N_STREAMS)]
    # Inputs exactly representable in the source dtype, so both sides see the same numbers.
    xs = [torch.tensor(x, dtype=ref.tdtype).double().numpy() for x in xs]
    h0 = [torch.tensor(h, dtype=ref.tdtype).double().numpy() for h in h0]
    refs = [ref.run(xs[i], h0[i]) for i in range(N_STREAMS)]
    schedule = []
    pos = [0] * N_STREAMS
    while any(p < T for p in pos):
        live = [i for i in range(N_STREAMS) if pos[i] < T]
        pick = [i for i in live if rng.random() < 0.7] or live[:1]
        rng.shuffle(pick)
        schedule.append([(i, pos[i]) for i in pick])
        for i in pick:
            pos[i] += 1

    # The float64 oracle.
    state = {i: h0[i][None].copy() for i in range(N_STREAMS)}
    for tick in schedule:
        s = np.concatenate([state[i] for i, _ in tick])
        x = np.stack([xs[i][t] for i, t in tick])
        y, s2 = oracle.step(model, s, x)
        for row, (i, t) in enumerate(tick):
            np.testing.assert_allclose(y[row], refs[i][0][t], rtol=0, atol=tol)
            state[i] = s2[row:row + 1]
    for i in range(N_STREAMS):
        np.testing.assert_allclose(state[i][0], refs[i][1], rtol=0, atol=tol)
        ys, last = oracle.run(model, xs[i], h0[i])
        np.testing.assert_allclose(ys, refs[i][0], rtol=0, atol=tol)

    for edt in ("float32", "float64"):
        etol = tol if edt == "float64" else TOL[torch.float32]
        eng = Engine(model, dtype=edt)
        for i in range(N_STREAMS):
            eng.open(f"s{i}", state=h0[i])
        for tick in schedule:
            x = np.stack([xs[i][t] for i, t in tick]).astype(edt)
            y = eng.step([f"s{i}" for i, _ in tick], x)
            for row, (i, t) in enumerate(tick):
                np.testing.assert_allclose(y[row], refs[i][0][t], rtol=0, atol=etol)
        for i in range(N_STREAMS):
            np.testing.assert_allclose(eng.state(f"s{i}"), refs[i][1], rtol=0, atol=etol)
            eng.open(f"r{i}", state=h0[i])
            ys = eng.run(f"r{i}", xs[i].astype(edt))
            np.testing.assert_allclose(ys, refs[i][0], rtol=0, atol=etol)


def gru_ref(gru):
    return Ref([gru], lambda x, hs: _wrap(run_gru(gru, x, hs[0])), gru.input_size,
               gru.weight_ih_l0.dtype)


def _wrap(pair):
    y, h = pair
    return y, [h]


# ---------------------------------------------------------------------------------------------
# nn.GRU / nn.GRUCell


@pytest.mark.parametrize("tdtype", DTYPES)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_gru_layers(num_layers, tdtype):
    gru = _build(lambda: nn.GRU(4, 6, num_layers=num_layers), tdtype)
    model = from_torch(gru)
    assert [layer.kind for layer in model.layers] == ["gru"] * num_layers
    assert all(layer.linear_before_reset == 1 for layer in model.layers)
    assert model.dtype == np.dtype(str(tdtype).removeprefix("torch."))
    assert model.source == "pytorch"
    compare(model, gru_ref(gru))


@pytest.mark.parametrize("tdtype", DTYPES)
def test_gru_without_bias(tdtype):
    gru = _build(lambda: nn.GRU(3, 5, num_layers=2, bias=False), tdtype)
    model = from_torch(gru)
    assert all(not layer.Wb.any() and not layer.Rb.any() for layer in model.layers)
    compare(model, gru_ref(gru))


@pytest.mark.parametrize("tdtype", DTYPES)
def test_gru_batch_first(tdtype):
    gru = _build(lambda: nn.GRU(2, 7, num_layers=2, batch_first=True), tdtype)
    compare(from_torch(gru), gru_ref(gru))


@pytest.mark.parametrize("tdtype", DTYPES)
def test_grucell(tdtype):
    cell = _build(lambda: nn.GRUCell(3, 5), tdtype)
    ref = Ref([cell], lambda x, hs: _wrap(run_cell(cell, x, hs[0])), 3, tdtype)
    model = from_torch(cell)
    assert len(model.layers) == 1
    compare(model, ref)


@pytest.mark.parametrize("tdtype", DTYPES)
def test_grucell_without_bias_from_state_dict(tdtype):
    cell = _build(lambda: nn.GRUCell(2, 4, bias=False), tdtype)
    sd = {f"enc.{k}": v for k, v in cell.state_dict().items()}
    ref = Ref([cell], lambda x, hs: _wrap(run_cell(cell, x, hs[0])), 2, tdtype)
    compare(from_torch(sd), ref)


def test_gate_swap_is_r_z():
    """PyTorch's rows are (r, z, n): the canonical W starts with z, i.e. torch rows H:2H."""
    gru = _build(lambda: nn.GRU(2, 3), torch.float64)
    layer = from_torch(gru).layers[0]
    w = gru.weight_ih_l0.detach().numpy()
    np.testing.assert_array_equal(layer.W[:3], w[3:6])
    np.testing.assert_array_equal(layer.W[3:6], w[:3])
    np.testing.assert_array_equal(layer.W[6:], w[6:])


# ---------------------------------------------------------------------------------------------
# Modules with Linear layers and several GRU modules


class GRUOut(nn.Module):
    """Lets an nn.GRU sit inside an nn.Sequential: returns the output sequence only."""

    def __init__(self, gru):
        super().__init__()
        self.gru = gru

    def forward(self, x):
        return self.gru(x)[0]


@pytest.mark.parametrize("tdtype", DTYPES)
def test_sequential_linear_before_and_after(tdtype):
    net = _build(lambda: nn.Sequential(
        nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.1),
        GRUOut(nn.GRU(8, 6, num_layers=2)),
        nn.Linear(6, 5), nn.LeakyReLU(0.2), nn.Linear(5, 4), nn.Softmax(dim=-1),
    ), tdtype)
    gru = net[3].gru

    def forward(x, hs):
        y, h = run_gru(gru, net[1](net[0](x)), hs[0])
        return net[7](net[6](net[5](net[4](y)))), [h]

    model = from_torch(net)
    assert [(layer.kind, getattr(layer, "activation", (None,))[0]) for layer in model.layers] == [
        ("dense", "tanh"), ("gru", None), ("gru", None), ("dense", "leakyrelu"),
        ("dense", "softmax")]
    assert model.layers[3].activation == ("leakyrelu", 0.2, 0.0)
    compare(model, Ref([gru], forward, 3, tdtype))
    # The whole nn.Sequential runs as one module too (the torch side of the mapping).
    with torch.no_grad():
        x = torch.randn(5, 1, 3, dtype=tdtype)
        y_net = net(x)[:, 0].double().numpy()
    ys, _ = oracle.run(model, x[:, 0].double().numpy())
    np.testing.assert_allclose(ys, y_net, rtol=0, atol=TOL[tdtype])


class Encoder(nn.Module):
    """A custom forward: Linear -> GRU -> Linear; with out_features=2 the input size equals the
    output size, so shapes form a cycle and the registration order says where it starts."""

    def __init__(self, out_features=2):
        super().__init__()
        self.inp = nn.Linear(2, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, out_features)

    def forward(self, x, h):
        y, h = self.gru(self.inp(x), h)
        return self.out(y), h


@pytest.mark.parametrize("tdtype", DTYPES)
def test_custom_module_linear_before_and_after(tdtype):
    net = _build(Encoder, tdtype)

    def forward(x, hs):
        y, h = net(x[None], hs[0])
        return y[0], [h]

    model = from_torch(net)
    assert [layer.kind for layer in model.layers] == ["dense", "gru", "dense"]
    assert all(layer.activation[0] == "identity" for layer in model.layers[::2])
    compare(model, Ref([net.gru], forward, 2, tdtype))


class WithHead(nn.Module):
    """A custom forward around a GRU and an nn.Sequential head whose activations are visible."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(2, 6)
        self.head = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Sigmoid())

    def forward(self, x, hs):
        y, h = run_gru(self.gru, x, hs[0])
        return self.head(y), [h]


@pytest.mark.parametrize("tdtype", DTYPES)
def test_custom_module_with_sequential_head(tdtype):
    net = _build(WithHead, tdtype)
    model = from_torch(net)
    assert [getattr(layer, "activation", ("gru",))[0] for layer in model.layers] == [
        "gru", "relu", "sigmoid"]
    compare(model, Ref([net.gru], net.forward, 2, tdtype))
    # A Sequential's prefix stands for its layers in order.
    assert from_torch(net, layers=["gru", "head"]).fingerprint == model.fingerprint


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.GRU(4, 4)
        self.b = nn.GRU(4, 4)

    def forward(self, x):
        return self.b(self.a(x)[0])[0]


def test_ambiguous_inside_sequential_refused_and_layers_fixes_it():
    net = _build(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Inner(), nn.Linear(4, 2)),
                 torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"2: expected one order of the layers by "
                                                    r"shape, got 2 candidates.*naming every "
                                                    r"GRU/LSTM/Linear prefix of the whole model"):
        from_torch(net)
    inner = net[2]

    def forward(x, hs):
        y, h1 = run_gru(inner.a, net[1](net[0](x)), hs[0])
        y, h2 = run_gru(inner.b, y, hs[1])
        return net[3](y), [h1, h2]

    model = from_torch(net, layers=["0", "2.a", "2.b", "3"])
    assert model.layers[0].activation[0] == "relu"
    compare(model, Ref([inner.a, inner.b], forward, 3, torch.float64))
    # The whole nn.Sequential agrees.
    with torch.no_grad():
        x = torch.randn(4, 1, 3, dtype=torch.float64)
        y_net = net(x)[:, 0].numpy()
    np.testing.assert_allclose(oracle.run(model, x[:, 0].numpy())[0], y_net, rtol=0, atol=1e-9)


def test_symmetric_cycle_refused():
    """Two GRU(8, 8) alone: every order looks the same by shape, key order is no evidence."""
    net = nn.Module()
    net.gru = nn.GRU(8, 8)
    net.gru2 = nn.GRU(8, 8)
    with pytest.raises(UnsupportedModelError, match=r"got 2 candidates"):
        from_torch(net.state_dict())
    assert len(from_torch(net.state_dict(), layers=["gru2", "gru"]).layers) == 2


class Chain(nn.Module):
    """GRU(1, 8) then GRU(8, 8, num_layers=3) then Linear(8, 1)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(1, 8)
        self.gru2 = nn.GRU(8, 8, num_layers=3)
        self.dense = nn.Linear(8, 1)

    def forward(self, x, hs):
        y, h1 = run_gru(self.gru, x, hs[0])
        y, h2 = run_gru(self.gru2, y, hs[1])
        return self.dense(y), [h1, h2]


@pytest.mark.parametrize("tdtype", DTYPES)
def test_chained_gru_modules(tdtype):
    net = _build(Chain, tdtype)
    ref = Ref([net.gru, net.gru2], net.forward, 1, tdtype)
    model = from_torch(net)
    assert [layer.kind for layer in model.layers] == ["gru"] * 4 + ["dense"]
    assert model.state_size == 32
    compare(model, ref)
    # The state_dict alone chains the same way, and so does an explicit layers= order.
    sd_model = from_torch(net.state_dict())
    assert sd_model.fingerprint == model.fingerprint
    assert from_torch(net.state_dict(), layers=["gru", "gru2", "dense"]).fingerprint == \
        model.fingerprint


# ---------------------------------------------------------------------------------------------
# state_dicts and files


def _as(kind, sd):
    if kind == "tensors":
        return dict(sd)
    if kind == "numpy":
        return {k: v.numpy() for k, v in sd.items()}
    return {k: v.tolist() for k, v in sd.items()}


@pytest.mark.parametrize("tdtype", DTYPES)
@pytest.mark.parametrize("kind", ["tensors", "numpy", "lists"])
def test_state_dict_values(kind, tdtype):
    net = _build(Chain, tdtype)
    model = from_torch(_as(kind, net.state_dict()))
    # Nested lists are float64 literals: keep the float32 reference tolerance for them.
    assert model.dtype == (np.float64 if kind == "lists" else
                           np.dtype(str(tdtype).removeprefix("torch.")))
    compare(model, Ref([net.gru, net.gru2], net.forward, 1, tdtype))


@pytest.mark.parametrize("tdtype", DTYPES)
def test_pt_file_weights_only(tmp_path, tdtype, monkeypatch):
    net = _build(Chain, tdtype)
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = from_torch(path)
    assert calls == [True]
    compare(model, Ref([net.gru, net.gru2], net.forward, 1, tdtype))
    assert from_torch(str(path)).fingerprint == model.fingerprint


@pytest.mark.parametrize("tdtype", DTYPES)
@pytest.mark.parametrize("writer", ["torch", "numpy"])
def test_safetensors_file(tmp_path, tdtype, writer):
    net = _build(lambda: Encoder(out_features=3), tdtype)
    path = tmp_path / "model.safetensors"
    _save_safetensors(net.state_dict(), path, writer)

    def forward(x, hs):
        y, h = net(x[None], hs[0])
        return y[0], [h]

    compare(from_torch(path), Ref([net.gru], forward, 2, tdtype))


def _save_safetensors(sd, path, writer):
    sd = {k: v.contiguous() for k, v in sd.items()}
    if writer == "torch":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        from safetensors.numpy import save_file
        save_file({k: v.numpy() for k, v in sd.items()}, str(path))


def test_safetensors_cycle_needs_layers(tmp_path):
    """Chain's input and output sizes are both 1: a state_dict's key order says where the
    cycle starts, but a .safetensors file sorts its keys ('dense' first), so it must ask."""
    net = _build(Chain, torch.float64)
    path = tmp_path / "chain.safetensors"
    _save_safetensors(net.state_dict(), path, "torch")
    with pytest.raises(UnsupportedModelError) as info:
        from_torch(path)
    msg = str(info.value)
    assert "got 3 candidates" in msg and "layers=['gru', 'gru2', 'dense']" in msg
    assert "stores its keys sorted" in msg
    model = from_torch(path, layers=["gru", "gru2", "dense"])
    compare(model, Ref([net.gru, net.gru2], net.forward, 1, torch.float64))


def test_json_file(tmp_path):
    net = _build(Chain, torch.float64)
    path = tmp_path / "model.json"
    path.write_text(json.dumps({k: v.tolist() for k, v in net.state_dict().items()}))
    model = from_torch(path)
    assert model.dtype == np.float64
    compare(model, Ref([net.gru, net.gru2], net.forward, 1, torch.float64))


def test_dtype_cast():
    gru = _build(lambda: nn.GRU(2, 3), torch.float32)
    assert from_torch(gru, dtype="float64").dtype == np.float64
    assert from_torch(gru.double(), dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError, match=r"dtype: expected None, 'float32' or 'float64', got"):
        from_torch(gru, dtype="int32")


def test_half_precision_widened_to_float32():
    gru = _build(lambda: nn.GRU(2, 3), torch.float32)
    sd = {k: v.to(torch.bfloat16) for k, v in gru.state_dict().items()}
    model = from_torch(sd)
    assert model.dtype == np.float32
    np.testing.assert_array_equal(model.layers[0].W[6:],
                                  sd["weight_ih_l0"][6:].float().numpy())


# ---------------------------------------------------------------------------------------------
# Refusals


def test_bidirectional_refused():
    gru = nn.GRU(2, 3, bidirectional=True)
    with pytest.raises(UnsupportedModelError, match="bidirectional.*cannot see the future"):
        from_torch(gru)
    with pytest.raises(UnsupportedModelError, match=r"weight_ih_l0_reverse: bidirectional GRU"):
        from_torch({f"rnn.{k}": v for k, v in gru.state_dict().items()})


class TwoSquare(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.GRU(1, 8)
        self.gru = nn.GRU(8, 8)
        self.gru2 = nn.GRU(8, 8)
        self.dense = nn.Linear(8, 1)

    def forward(self, x, hs):
        y, h0 = run_gru(self.inp, x, hs[0])
        y, h1 = run_gru(self.gru, y, hs[1])
        y, h2 = run_gru(self.gru2, y, hs[2])
        return self.dense(y), [h0, h1, h2]


def test_ambiguous_chain_refused_and_layers_fixes_it():
    net = _build(TwoSquare, torch.float64)
    for obj in (net, net.state_dict()):
        with pytest.raises(UnsupportedModelError) as info:
            from_torch(obj)
        msg = str(info.value)
        assert "expected one order of the layers by shape" in msg
        assert "layers=['inp', 'gru', 'gru2', 'dense']" in msg
        assert "layers=['inp', 'gru2', 'gru', 'dense']" in msg
        assert "pass the keyword layers=" in msg
    ref = Ref([net.inp, net.gru, net.gru2], net.forward, 1, torch.float64)
    compare(from_torch(net, layers=["inp", "gru", "gru2", "dense"]), ref)
    # The other order is a different model: torch with gru2 first disagrees.
    swapped = from_torch(net.state_dict(), layers=["inp", "gru2", "gru", "dense"])
    with pytest.raises(AssertionError):
        compare(swapped, ref)


def test_layers_keyword_validated():
    net = _build(Chain, torch.float32)
    with pytest.raises(ValueError, match=r"layers: expected every GRU/LSTM/Linear prefix, got no "
                                         r"place for \['dense'\]"):
        from_torch(net, layers=["gru", "gru2"])
    with pytest.raises(ValueError, match=r"layers: expected prefixes among .*got 'nope'"):
        from_torch(net, layers=["gru", "nope", "dense"])
    with pytest.raises(ValueError, match=r"layers: expected 'gru2' to take the 1 outputs of "
                                         r"'dense', got input size 8"):
        from_torch(net, layers=["gru", "dense", "gru2"])
    with pytest.raises(TypeError, match="layers: expected a list"):
        from_torch(net, layers="gru")


def test_unchainable_refused():
    sd = {**{f"gru.{k}": v for k, v in nn.GRU(2, 4).state_dict().items()},
          "head.weight": torch.zeros(1, 5)}
    with pytest.raises(UnsupportedModelError, match=r"no such order for 'gru' \(GRU x1 2->4\), "
                                                    r"'head' \(Linear 5->1\)"):
        from_torch(sd)


def test_order_search_refuses_almost_chaining_shapes_at_once():
    # A GRU(8, 8), fourteen Linear(8, 8) and one Linear(3, 5) that fits nowhere: the order search
    # used to try all 15! orders of the others before refusing; it now enters only branches that
    # can finish. Any bound far below 15! steps tells the two apart.
    import time

    z = np.zeros
    sd = {"gru.weight_ih_l0": z((24, 8), np.float32), "gru.weight_hh_l0": z((24, 8), np.float32),
          **{f"fc{i}.weight": z((8, 8), np.float32) for i in range(14)},
          "odd.weight": z((5, 3), np.float32)}
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match=r"no such order for 'gru' \(GRU x1 8->8\), "
                                                    r"'fc0' \(Linear 8->8\).*'odd' \(Linear "
                                                    r"3->5\); pass layers="):
        from_torch(sd)
    assert time.perf_counter() - t0 < 30
    # Without the odd one the shapes chain in 15! orders: refused as ambiguous, listing some.
    del sd["odd.weight"]
    with pytest.raises(UnsupportedModelError, match=r"expected one order of the layers by shape, "
                                                    r"got \d+ \(and more\) candidates"):
        from_torch(sd)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_full_module_pt_refused(tmp_path):
    net = Chain()
    path = tmp_path / "full.pt"
    torch.save(net, path)
    with pytest.raises(UnsupportedModelError) as info:
        from_torch(path)
    msg = str(info.value)
    assert "torch.save(model.state_dict()" in msg and "Chain" in msg and "weights_only" in msg
    script = tmp_path / "script.pt"
    torch.jit.script(nn.GRU(2, 3)).save(str(script))
    with pytest.raises(UnsupportedModelError, match=r"torch.save\(model.state_dict\(\)"):
        from_torch(script)


def test_checkpoint_dict_refused_with_hint(tmp_path):
    gru = nn.GRU(2, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": gru.state_dict(), "epoch": 3}, path)
    with pytest.raises(UnsupportedModelError, match=r"model: expected a tensor, got a nested "
                                                    r"mapping.*obj\['model'\]"):
        from_torch(path)


def test_missing_keys_refused():
    sd = Chain().state_dict()
    for drop, missing in [("gru2.weight_hh_l1", "gru2.weight_hh_l1"),
                          ("gru.bias_hh_l0", "gru.bias_hh_l0"),
                          ("gru.weight_ih_l0", "gru.weight_ih_l0")]:
        broken = {k: v for k, v in sd.items() if k != drop}
        with pytest.raises(ValueError, match=rf"expected key '{missing}'.*got no such key"):
            from_torch(broken)
    # A gap in the layer numbering names the missing layer.
    gap = {k: v for k, v in sd.items() if "gru2" not in k or "_l1" not in k}
    with pytest.raises(ValueError, match=r"expected GRU/LSTM layers 0\.\.2 under 'gru2', got no keys "
                                         r"for layer\(s\) \[1\]"):
        from_torch(gap)
    with pytest.raises(ValueError, match=r"expected key 'dense.weight' next to 'dense.bias'"):
        from_torch({k: v for k, v in sd.items() if k != "dense.weight"})


def test_wrong_shapes_refused():
    sd = Chain().state_dict()
    cases = {
        "gru2.bias_ih_l2": (torch.zeros(23),
                            r"gru2.bias_ih_l2: expected shape \(24,\), got \(23,\)"),
        "gru2.weight_ih_l1": (torch.zeros(24, 3),
                              r"gru2.weight_ih_l1: expected shape \(24, 8\), got \(24, 3\)"),
        "gru.weight_hh_l0": (torch.zeros(24, 7), r"gru.weight_hh_l0: expected shape "
                                                 r"\(3\*hidden_size, hidden_size\) \(GRU\) or "
                                                 r"\(4\*hidden_size, hidden_size or proj_size\) "
                                                 r"\(LSTM\), got \(24, 7\)"),
        "dense.bias": (torch.zeros(2), r"dense.bias: expected shape \(1,\), got \(2,\)"),
    }
    for key, (value, pattern) in cases.items():
        with pytest.raises(ValueError, match=pattern):
            from_torch({**sd, key: value})


def test_proj_size_attribute_refused():
    gru = nn.GRU(2, 3)
    gru.proj_size = 2  # nn.GRU refuses it in __init__; a subclass or a patched module may not
    with pytest.raises(UnsupportedModelError, match=r"<root> \(GRU\): proj_size=2 is not "
                                                    r"supported"):
        from_torch(gru)


def test_vanilla_rnn_refused():
    with pytest.raises(UnsupportedModelError, match=r"\(RNN\): expected GRU, GRUCell, LSTM or "
                                                    r"LSTMCell, got RNN"):
        from_torch(nn.Sequential(nn.RNN(2, 3)))
    with pytest.raises(UnsupportedModelError, match=r"weight_hh_l0: expected GRU \(3 gates\) or "
                                                    r"LSTM \(4 gates\) weights, got shape "
                                                    r"\(3, 3\), which is a vanilla RNN"):
        from_torch(nn.RNN(2, 3).state_dict())


def test_non_float_and_non_finite_refused():
    sd = nn.GRU(2, 3).state_dict()
    with pytest.raises(TypeError, match=r"weight_hh_l0: expected a float32 or float64 tensor, "
                                        r"got dtype int64"):
        from_torch({**sd, "weight_hh_l0": torch.ones(9, 3, dtype=torch.int64)})
    bad = sd["bias_hh_l0"].clone()
    bad[4] = float("nan")
    with pytest.raises(ValueError, match=r"bias_hh_l0: expected finite values, got nan at "
                                         r"index \(4,\)"):
        from_torch({**sd, "bias_hh_l0": bad})
    bad = sd["weight_ih_l0"].clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"net.weight_ih_l0: expected finite values, got inf"):
        from_torch({**{f"net.{k}": v for k, v in sd.items()}, "net.weight_ih_l0": bad})


def test_unknown_tensors_and_modules_refused():
    sd = {**Chain().state_dict(), "norm.weight": torch.ones(8), "norm.bias": torch.zeros(8)}
    with pytest.raises(UnsupportedModelError, match=r"norm.weight: expected a 2-D nn.Linear"):
        from_torch(sd)
    sd = {**Chain().state_dict(), "bn.running_mean": torch.zeros(8)}
    with pytest.raises(UnsupportedModelError, match=r"expected only GRU, GRUCell, LSTM, LSTMCell "
                                                    r"and Linear tensors, got \['bn.running_mean'\]"):
        from_torch(sd)
    with pytest.raises(UnsupportedModelError, match=r"1 \(LayerNorm\): expected GRU, GRUCell, "
                                                    r"LSTM, LSTMCell, Linear"):
        from_torch(nn.Sequential(GRUOut(nn.GRU(2, 4)), nn.LayerNorm(4)))


def test_activations_refused_where_order_is_invisible():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(2, 4)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 3)

    with pytest.raises(UnsupportedModelError, match=r"act \(ReLU\): an activation outside an "
                                                    r"nn.Sequential"):
        from_torch(Custom())
    with pytest.raises(UnsupportedModelError, match=r"1 \(Tanh\): expected an activation "
                                                    r"right after an nn.Linear, got one after "
                                                    r"'0' \(gru\)"):
        from_torch(nn.Sequential(nn.GRU(2, 4), nn.Tanh(), nn.Linear(4, 1)))
    with pytest.raises(UnsupportedModelError, match=r"Softmax\): expected dim=-1"):
        from_torch(nn.Sequential(nn.GRU(2, 4), nn.Linear(4, 3), nn.Softmax(dim=1)))
    with pytest.raises(UnsupportedModelError, match=r"\(GELU\): activation not supported"):
        from_torch(nn.Sequential(nn.GRU(2, 4), nn.Linear(4, 3), nn.GELU()))


def test_bad_inputs():
    with pytest.raises(TypeError, match="obj: expected an nn.Module, a state_dict mapping"):
        from_torch(42)
    with pytest.raises(ValueError, match=r"path: expected a file ending in .pt, .pth"):
        from_torch("model.onnx")
    with pytest.raises(UnsupportedModelError, match="expected GRU or LSTM weights"):
        from_torch({})
    with pytest.raises(UnsupportedModelError, match="expected at least one GRU, GRUCell, LSTM or LSTMCell"):
        from_torch(nn.Linear(3, 3).state_dict())
    with pytest.raises(TypeError, match="expected a nested list of numbers"):
        from_torch({"weight_ih_l0": [[1.0, 2.0], [3.0]]})


# ---------------------------------------------------------------------------------------------
# nn.LSTM / nn.LSTMCell. The engine does not run LSTM layers yet, so the converted model is
# stepped by the float64 oracle (itself checked against torch in test_oracle.py) against the
# torch module, over LSTM_T steps from a nonzero state.

LSTM_T = 24


def lstm_flat(h, c):
    """torch h (L, 1, H_out), c (L, 1, H) -> the stream state: per layer h then c."""
    return np.concatenate([np.concatenate([h[k, 0].numpy(), c[k, 0].numpy()])
                           for k in range(h.shape[0])])


def lstm_split(s, L, H_out, H):
    """The inverse of :func:`lstm_flat`: float64 tensors h (L, 1, H_out), c (L, 1, H)."""
    per = np.asarray(s, np.float64).reshape(L, 1, H_out + H)
    return torch.from_numpy(per[..., :H_out].copy()), torch.from_numpy(per[..., H_out:].copy())


def check_oracle_against_torch(model, torch_run, seed=3):
    """``oracle.run(model)`` vs ``torch_run(xs (T, I) tensor, s0 (S,)) -> (ys (T, O), s_T (S,))``
    from the same random nonzero state, outputs and final state."""
    assert isinstance(model, GRUModel)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(LSTM_T, model.input_size))
    s0 = rng.normal(scale=0.7, size=model.state_size)
    with torch.no_grad():
        ys_ref, s_ref = torch_run(torch.from_numpy(xs), s0)
    ys, s = oracle.run(model, xs, s0)
    tol = TOL[torch.float64]
    np.testing.assert_allclose(ys, ys_ref.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=tol)
    assert np.abs(ys - ys[0]).max() > 0.05  # the outputs move: a frozen stream would fail


def lstm_run(lstm, P):
    """``torch_run`` of one nn.LSTM (``P``: the width of its h)."""
    def run(x, s0):
        h, c = lstm_split(s0, lstm.num_layers, P, lstm.hidden_size)
        y, (h, c) = lstm(x[None] if lstm.batch_first else x[:, None], (h, c))
        return (y[0] if lstm.batch_first else y[:, 0]), lstm_flat(h, c)
    return run


@pytest.mark.parametrize("num_layers, proj_size, bias, batch_first", [
    (1, 0, True, False), (2, 3, True, True), (2, 0, False, False), (1, 2, False, True)])
def test_lstm_layers(num_layers, proj_size, bias, batch_first):
    lstm = _build(lambda: nn.LSTM(4, 5, num_layers=num_layers, bias=bias, proj_size=proj_size,
                                  batch_first=batch_first), torch.float64)
    model = from_torch(lstm)
    P = proj_size or 5
    assert [layer.kind for layer in model.layers] == ["lstm"] * num_layers
    assert all(layer.proj_size == proj_size and layer.hidden_size == 5 and layer.P is None
               and layer.clip is None and layer.input_forget == 0 for layer in model.layers)
    assert model.state_size == num_layers * (P + 5) and model.output_size == P
    assert model.dtype == np.float64 and model.source == "pytorch"
    check_oracle_against_torch(model, lstm_run(lstm, P))
    # The state_dict alone converts to the same model.
    assert from_torch(lstm.state_dict()).fingerprint == model.fingerprint


def test_lstm_gate_reorder_is_ifgo_to_iofg():
    lstm = _build(lambda: nn.LSTM(2, 3), torch.float64)
    layer = from_torch(lstm).layers[0]
    for ours, theirs in [(layer.W, lstm.weight_ih_l0), (layer.R, lstm.weight_hh_l0),
                         (layer.Wb, lstm.bias_ih_l0), (layer.Rb, lstm.bias_hh_l0)]:
        i, f, g, o = np.split(theirs.detach().numpy(), 4)
        np.testing.assert_array_equal(ours, np.concatenate([i, o, f, g]))


@pytest.mark.parametrize("bias", [True, False])
def test_lstmcell(bias):
    cell = _build(lambda: nn.LSTMCell(3, 4, bias=bias), torch.float64)

    def run(x, s0):
        h, c = (t[0] for t in lstm_split(s0, 1, 4, 4))
        ys = []
        for t in range(x.shape[0]):
            h, c = cell(x[t:t + 1], (h, c))
            ys.append(h[0])
        return torch.stack(ys), np.concatenate([h[0].numpy(), c[0].numpy()])

    model = from_torch(cell)
    assert [layer.kind for layer in model.layers] == ["lstm"] and model.state_size == 8
    check_oracle_against_torch(model, run)


class Mixed(nn.Module):
    """Linear -> GRU -> 2-layer LSTM with a projection -> LSTMCell -> Linear, with a forward
    that steps a flat stream state in streamgru's layout (GRU h; per LSTM layer h, c; cell h, c)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.gru = nn.GRU(4, 5)
        self.lstm = nn.LSTM(5, 6, num_layers=2, proj_size=2)
        self.cell = nn.LSTMCell(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x, s0):
        """x (T, 3), s0 (27,) -> (ys (T, 1), s_T (27,))."""
        h_g = torch.from_numpy(s0[None, None, :5].copy())
        h_l, c_l = lstm_split(s0[5:21], 2, 2, 6)
        h_c, c_c = (torch.from_numpy(s0[None, a:b].copy()) for a, b in [(21, 24), (24, 27)])
        y, h_g = self.gru(self.inp(x)[:, None], h_g)
        y, (h_l, c_l) = self.lstm(y, (h_l, c_l))
        ys = []
        for t in range(x.shape[0]):
            h_c, c_c = self.cell(y[t], (h_c, c_c))
            ys.append(self.head(h_c)[0])
        return torch.stack(ys), np.concatenate([h_g[0, 0].numpy(), lstm_flat(h_l, c_l),
                                                h_c[0].numpy(), c_c[0].numpy()])


@pytest.mark.parametrize("source", ["module", "state_dict", "pt", "safetensors"])
def test_module_mixing_gru_lstm_and_linear(source, tmp_path):
    net = _build(Mixed, torch.float64)
    if source == "module":
        obj = net
    elif source == "state_dict":
        obj = net.state_dict()
    elif source == "pt":
        obj = tmp_path / "mixed.pt"
        torch.save(net.state_dict(), obj)
    else:  # keys sorted in the file: the order comes from the shapes alone
        obj = tmp_path / "mixed.safetensors"
        _save_safetensors(net.state_dict(), obj, "torch")
    model = from_torch(obj)
    assert [layer.kind for layer in model.layers] == ["dense", "gru", "lstm", "lstm", "lstm",
                                                      "dense"]
    assert model.state_slices == (slice(0, 5), slice(5, 13), slice(13, 21), slice(21, 27))
    check_oracle_against_torch(model, net.forward)


def test_lstm_refusals():
    with pytest.raises(UnsupportedModelError, match=r"<root> \(LSTM\): bidirectional=True is not "
                                                    r"supported"):
        from_torch(nn.LSTM(2, 3, bidirectional=True))
    with pytest.raises(UnsupportedModelError, match=r"weight_ih_l0_reverse: bidirectional "
                                                    r"GRU/LSTM 'rnn' is not supported"):
        from_torch({f"rnn.{k}": v for k, v in nn.LSTM(2, 3, bidirectional=True)
                    .state_dict().items()})
    sd = nn.LSTM(2, 4, num_layers=2, proj_size=3).state_dict()
    # Without its weight_hr, layer 1's weight_hh (16, 3) is neither a GRU's nor an LSTM's.
    with pytest.raises(ValueError, match=r"weight_hh_l1: expected shape \(3\*hidden_size, "
                                         r"hidden_size\) \(GRU\) or .* got \(16, 3\); an LSTM "
                                         r"with a projection also needs its weight_hr"):
        from_torch({k: v for k, v in sd.items() if k != "weight_hr_l1"})
    with pytest.raises(ValueError, match=r"weight_hr_l0: expected shape \(proj_size, hidden_size\) "
                                         r"with weight_hh_l0 \(4\*hidden_size, proj_size\), got "
                                         r"\(3, 5\) next to \(16, 3\)"):
        from_torch({**sd, "weight_hr_l0": torch.zeros(3, 5)})
    # Layer 0 a GRU (12, 4) with no weight_hr, layer 1 an LSTM: one module is one kind.
    mixed = {**nn.GRU(2, 4).state_dict(),
             **{k.replace("_l0", "_l1"): v for k, v in nn.LSTM(4, 4).state_dict().items()}}
    with pytest.raises(UnsupportedModelError, match=r"weight_hh_l1: expected GRU weights like "
                                                    r"those of layer 0 under '<root>', got LSTM "
                                                    r"weights \(shape \(16, 4\), no weight_hr\)"):
        from_torch(mixed)
    cell = {f"c.{k}": v for k, v in nn.LSTMCell(2, 4).state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"c.weight_hr: expected no projection in a "
                                                    r"cell"):
        from_torch({**cell, "c.weight_hr": torch.zeros(3, 4)})
    bad = sd["bias_hh_l1"].clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match=r"bias_hh_l1: expected finite values, got nan"):
        from_torch({**sd, "bias_hh_l1": bad})
    with pytest.raises(ValueError, match=r"bias_ih_l0: expected shape \(16,\), got \(12,\)"):
        from_torch({**sd, "bias_ih_l0": torch.zeros(12)})
