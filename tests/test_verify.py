"""converters.verify: passes on correct conversions of each kind of source, fails (ok False, a
difference past the tolerance) on a model that is not the source's, labels the Keras/RTNeural/
native check as a consistency check, and names the extra when a framework is missing.
"""

import contextlib
import importlib.util
import io
import pathlib
import sys
import warnings

import numpy as np
import pytest

import converters
import streamgru

FIX = pathlib.Path(__file__).parent / "fixtures"


def _net(torch, seed, hidden_act=False):
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(3, 6)
            self.gru = torch.nn.GRU(6, 5, num_layers=2, batch_first=True)
            self.head = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(),
                                            torch.nn.Linear(4, 2))

        def forward(self, x):
            v = self.inp(x)
            y, _ = self.gru(torch.tanh(v) if hidden_act else v)
            return self.head(y)

    return Net().eval()


def _export_legacy(torch, tmp_path, seed=0):
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(3, 5, num_layers=2)
            self.out = torch.nn.Linear(5, 2)

        def forward(self, x, h):
            y, hn = self.gru(x, h)
            return torch.sigmoid(self.out(y)), hn

    path = tmp_path / f"m{seed}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(4, 2, 3), torch.randn(2, 2, 5)), str(path),
                          dynamo=False, input_names=["x", "h"], output_names=["y", "hn"],
                          dynamic_axes={"x": {0: "time", 1: "batch"}, "h": {1: "batch"},
                                        "y": {0: "time", 1: "batch"}})
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_gru_module(dtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    gru = torch.nn.GRU(3, 8, num_layers=2, batch_first=True)
    r = converters.verify(converters.from_torch(gru), gru, dtype=dtype, streams=3, steps=6)
    assert r.ok and r.framework_check
    assert r.max_abs_diff < (1e-5 if dtype == "float32" else 1e-12)
    assert r.tolerance == (1e-4 if dtype == "float32" else 1e-9)
    assert (r.streams, r.steps) == (3, 6) and "nonzero" in r.initial_state
    text = str(r)
    assert text.startswith("verify OK") and "framework check" in text and "GRU" in text


def test_torch_gru_cell():
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    cell = torch.nn.GRUCell(2, 4, bias=False)
    r = converters.verify(converters.from_torch(cell), cell, steps=5)
    assert r.ok and r.max_abs_diff < 1e-5


def test_torch_module_runs_rebuilt_stack_and_its_own_forward():
    torch = pytest.importorskip("torch")
    net = _net(torch, 2)
    r = converters.verify(converters.from_torch(net), net, steps=6)
    assert r.ok, str(r)
    assert "forward(x)" in r.reference and "per comparison" in str(r)


def test_torch_module_with_an_activation_hidden_in_forward_fails():
    """The converter cannot see torch.tanh inside forward(): verify is how a user finds out."""
    torch = pytest.importorskip("torch")
    net = _net(torch, 2, hidden_act=True)
    r = converters.verify(converters.from_torch(net), net, steps=6)
    assert not r.ok and r.max_abs_diff > 1e-3
    assert "module forward(x)" in str(r) and str(r).startswith("verify FAILED")


@pytest.mark.parametrize("fmt", [".pt", ".safetensors", ".json", "mapping"])
def test_torch_state_dicts(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    net = _net(torch, 3)
    sd = net.state_dict()
    if fmt == ".pt":
        src = tmp_path / "m.pt"
        torch.save(sd, src)
    elif fmt == ".safetensors":
        from safetensors.torch import save_file

        src = tmp_path / "m.safetensors"
        save_file(dict(sd), str(src))
    elif fmt == ".json":
        import json

        src = tmp_path / "m.json"
        src.write_text(json.dumps({k: v.tolist() for k, v in sd.items()}))
    else:
        src = dict(sd)
    model = converters.from_torch(src)
    r = converters.verify(model, src, steps=5)
    assert r.ok and r.framework_check, str(r)
    assert "records no activations" in r.reference
    # The module's model carries the Sequential's ReLU, the state_dict does not: verify says so.
    r = converters.verify(converters.from_torch(net), src, steps=5)
    assert not r.ok and r.max_abs_diff > 1e-4


def test_onnx_file_and_modelproto(tmp_path):
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = _export_legacy(torch, tmp_path)
    model = streamgru.load(path)
    for src in (path, onnx.load(str(path))):
        r = converters.verify(model, src, streams=4, steps=9)
        assert r.ok and r.framework_check, str(r)
        assert (r.streams, r.steps) == (4, 9)  # dynamic axes: ran what was asked
        assert "onnxruntime" in r.reference and "'h'" in r.initial_state
    r = converters.verify(model, path, dtype="float64", steps=5)
    assert r.ok and r.tolerance == 1e-4  # onnxruntime runs float32 only


def test_onnx_fixed_shapes_and_no_state_input(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    gru = torch.nn.GRU(2, 3)
    path = tmp_path / "g.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(gru, (torch.randn(5, 2, 2),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y", "hn"])
    r = converters.verify(streamgru.load(path), path)
    assert r.ok, str(r)
    assert (r.streams, r.steps) == (2, 5) and "fixed" in str(r)
    assert r.initial_state.startswith("zeros")


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_exported_for_one_stream_without_dynamic_axes(tmp_path, dynamo):
    """Exported with a batch of one and fixed shapes: the batch axis keeps no name through the
    exporters' Reshapes, and verify must still find it (it is the output's unit axis)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(1)
    net = torch.nn.GRU(input_size=1, hidden_size=6, num_layers=2)
    path = tmp_path / "g.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(7, 1, 1), torch.zeros(2, 1, 6)), str(path),
                          dynamo=dynamo, input_names=["x", "h0"], output_names=["y", "hn"])
    r = converters.verify(streamgru.load(path), path)
    assert r.ok, str(r)
    assert (r.streams, r.steps) == (1, 7) and "fixed" in str(r)
    assert "'h0'" in r.initial_state


def test_onnx_wrong_model_fails(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    a, b = _export_legacy(torch, tmp_path, 0), _export_legacy(torch, tmp_path, 1)
    r = converters.verify(streamgru.load(a), b, steps=5)
    assert not r.ok and r.max_abs_diff > r.tolerance
    assert str(r).startswith("verify FAILED")


@pytest.mark.parametrize("name", ["keras_seq_reset_after.keras", "keras_legacy_hard_sigmoid.h5",
                                  "rtneural_seq_reset_after.json"])
def test_keras_and_rtneural_are_a_labelled_consistency_check(name):
    if name.endswith((".keras", ".h5")):
        pytest.importorskip("h5py")
    model = streamgru.load(FIX / name)
    r = converters.verify(model, FIX / name, steps=6)
    assert r.ok and not r.framework_check
    assert "CONSISTENCY CHECK" in str(r) and "not a framework check" in r.reference


def test_consistency_check_catches_another_files_model(tmp_path):
    pytest.importorskip("h5py")
    keras_model = streamgru.load(FIX / "keras_seq_reset_after.keras")
    r = converters.verify(keras_model, FIX / "keras_func_reset_before.keras")
    assert not r.ok and r.max_abs_diff == float("inf") and "input_size 3 vs 4" in str(r)
    other = streamgru.GRUModel.random(3, [8, 5], dense_before=[(6, "relu")],
                                      dense_after=[(2, "softmax")], seed=9)
    other.save(tmp_path / "o.sgru")
    r = converters.verify(keras_model, tmp_path / "o.sgru", steps=5)
    assert not r.ok and np.isfinite(r.max_abs_diff) and r.max_abs_diff > r.tolerance


def test_tolerance_argument():
    torch = pytest.importorskip("torch")
    gru = torch.nn.GRU(2, 4)
    r = converters.verify(converters.from_torch(gru), gru, steps=4, tolerance=0.0)
    assert r.tolerance == 0.0 and r.ok == (r.max_abs_diff == 0.0)


def test_bad_arguments(tmp_path):
    m = streamgru.GRUModel.random(2, 3)
    with pytest.raises(TypeError, match="model: expected a GRUModel, got str"):
        converters.verify("m", m)
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'float64', got 'float16'"):
        converters.verify(m, FIX / "rtneural_seq_reset_after.json", dtype="float16")
    with pytest.raises(ValueError, match="streams: expected a positive int, got 0"):
        converters.verify(m, FIX / "rtneural_seq_reset_after.json", streams=0)
    with pytest.raises(ValueError, match="tolerance: expected a non-negative float"):
        converters.verify(m, FIX / "rtneural_seq_reset_after.json", tolerance=-1)
    with pytest.raises(FileNotFoundError, match="source: expected an existing file"):
        converters.verify(m, tmp_path / "nope.onnx")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"source: expected a \.onnx.*got .*m\.bin"):
        converters.verify(m, tmp_path / "m.bin")
    with pytest.raises(TypeError, match="source: expected a model file path.*got int"):
        converters.verify(m, 3)
    with pytest.raises(TypeError, match="node: verify runs the whole ONNX graph"):
        converters.verify(m, FIX / "rtneural_seq_reset_after.json", node="gru")


@pytest.mark.parametrize("module, extra", [("onnxruntime", "onnx"), ("torch", "torch")])
def test_missing_framework_names_the_extra(tmp_path, monkeypatch, module, extra):
    torch = pytest.importorskip("torch")
    if module == "onnxruntime":
        pytest.importorskip("onnxruntime")
        src = _export_legacy(torch, tmp_path)
    else:
        src = tmp_path / "m.pt"
        torch.save(torch.nn.GRU(2, 3).state_dict(), src)
    model = streamgru.load(src)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"{module} is needed.*pip install 'streamgru\[{extra}\]'"):
        converters.verify(model, src)


# ----------------------------------------------------------------------------- missing values

@pytest.mark.parametrize("policy", ["skip", "zero", "last"])
def test_missing_values_against_torch_applying_the_same_rule(policy):
    torch = pytest.importorskip("torch")
    torch.manual_seed(4)
    gru = torch.nn.GRU(3, 6, num_layers=2, batch_first=True)
    r = converters.verify(converters.from_torch(gru), gru, dtype="float64", streams=3, steps=12,
                          missing=policy, missing_rate=0.2)
    assert r.ok and r.max_abs_diff < 1e-12, str(r)
    assert r.missing == policy and 3 < r.dropped < 3 * 11 * 3
    assert f"Engine(missing={policy!r}); {r.dropped} input values dropped" in str(r)
    # The same run without dropping anything is another input: the comparison sees the rule.
    clean = converters.verify(converters.from_torch(gru), gru, dtype="float64", streams=3,
                              steps=12)
    assert clean.dropped == 0 and "missing:" not in str(clean)


def test_missing_values_fail_against_a_reference_applying_another_rule(monkeypatch):
    """verify can fail: with the 'last' reference swapped for the 'zero' one, it does."""
    torch = pytest.importorskip("torch")
    from converters import verify as verify_fn
    from converters.verify import reference_inputs

    verify_module = sys.modules[verify_fn.__module__]
    torch.manual_seed(5)
    gru = torch.nn.GRU(3, 6, batch_first=True)
    model = converters.from_torch(gru)
    assert converters.verify(model, gru, steps=10, missing="last", missing_rate=0.3).ok
    monkeypatch.setattr(verify_module, "reference_inputs",
                        lambda xs, dropped, missing: reference_inputs(xs, dropped, "zero"))
    r = converters.verify(model, gru, steps=10, missing="last", missing_rate=0.3)
    assert not r.ok and r.max_abs_diff > 1e-3


def test_missing_values_through_a_module_an_onnx_graph_and_a_consistency_check(tmp_path):
    """skip needs the layers after the last GRU (the torch module's head, the ONNX graph's
    Linear + sigmoid); the Keras file's check is the float64 engine on the filled inputs."""
    torch = pytest.importorskip("torch")
    net = _net(torch, 6)
    r = converters.verify(converters.from_torch(net), net, steps=8, missing="skip",
                          missing_rate=0.15)
    assert r.ok and r.dropped > 0, str(r)
    assert "forward(x)" in r.reference and "per comparison" in str(r)
    if importlib.util.find_spec("onnxruntime") is not None:
        path = _export_legacy(torch, tmp_path)
        r = converters.verify(streamgru.load(path), path, steps=8, missing="skip")
        assert r.ok and r.dropped > 0 and "onnxruntime" in r.reference, str(r)
    if importlib.util.find_spec("h5py") is not None:
        name = FIX / "keras_seq_reset_after.keras"
        r = converters.verify(streamgru.load(name), name, steps=8, missing="last")
        assert r.ok and r.dropped > 0 and not r.framework_check, str(r)


def test_bad_missing_arguments():
    m = streamgru.GRUModel.random(2, 3)
    src = FIX / "rtneural_seq_reset_after.json"
    with pytest.raises(ValueError, match="missing: expected one of refuse, skip, zero, last, got "
                                         "'drop'"):
        converters.verify(m, src, missing="drop")
    with pytest.raises(ValueError, match=r"missing_rate: expected a probability in \[0, 1\], "
                                         r"got 1.5"):
        converters.verify(m, src, missing="zero", missing_rate=1.5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_to_torch_export_is_a_source(dtype):
    # A module with forward(x, state) -> (y, state_out) runs as the reference, one call per
    # step: one GRU layer torch runs natively (an nn.GRUCell), one it does not (lbr=0, clip).
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    native = streamgru.Model.random(3, [4], dense_after=[(2, "softmax")], dtype=dtype, seed=1)
    lbr0 = streamgru.GRULayer(2, 3, rng.uniform(-1, 1, (9, 2)), rng.uniform(-1, 1, (9, 3)),
                    linear_before_reset=0, clip=0.5)
    model = streamgru.Model(list(native.layers) + [lbr0.astype(dtype)])
    r = converters.verify(model, converters.to_torch(model), dtype=dtype, streams=3, steps=5,
                          missing="last")
    assert r.ok and r.framework_check and r.dropped > 0
    assert "forward(x, state) -> (y, state_out), one call per step" in r.reference
    assert r.max_abs_diff < (1e-5 if dtype == "float32" else 1e-12)
    # Another model's export, same sizes: the comparison must fail.
    other = streamgru.Model(list(model.layers[:-1]) + [
        streamgru.GRULayer(2, 3, rng.uniform(-1, 1, (9, 2)), rng.uniform(-1, 1, (9, 3)),
                 linear_before_reset=0, clip=0.5).astype(dtype)])
    bad = converters.verify(model, converters.to_torch(other), dtype=dtype, streams=3, steps=5)
    assert not bad.ok and bad.max_abs_diff > 1e-3


# ----------------------------------------------------------------------------- LSTM layers
# Every source form checks twice: against the model's own source (ok, a small difference) and
# against another model's source of the same shapes (not ok, a large one), so a reference that
# ignored its weights or its initial state could not pass.

_LSTMS = {
    "lstm": lambda torch: torch.nn.LSTM(3, 5),
    "lstm2_proj_batch_first": lambda torch: torch.nn.LSTM(3, 5, num_layers=2, proj_size=2,
                                                         batch_first=True),
    "lstm2_no_bias": lambda torch: torch.nn.LSTM(3, 4, num_layers=2, bias=False),
    "lstmcell": lambda torch: torch.nn.LSTMCell(3, 4),
    "lstmcell_no_bias": lambda torch: torch.nn.LSTMCell(3, 4, bias=False),
}


def _seeded(torch, make, seed):
    torch.manual_seed(seed)
    return make(torch).eval()


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(_LSTMS))
def test_torch_lstm_module(case, dtype):
    torch = pytest.importorskip("torch")
    lstm = _seeded(torch, _LSTMS[case], 10)
    model = converters.from_torch(lstm)
    r = converters.verify(model, lstm, dtype=dtype, streams=3, steps=8)
    assert r.ok and r.framework_check, str(r)
    assert r.max_abs_diff < (1e-5 if dtype == "float32" else 1e-12)
    assert type(lstm).__name__ in r.reference and "the module itself" in r.reference
    assert r.initial_state == "random nonzero, as h_0 and c_0"
    other = _seeded(torch, _LSTMS[case], 11)
    bad = converters.verify(model, other, dtype=dtype, streams=3, steps=8)
    assert not bad.ok and bad.max_abs_diff > 1e-3, str(bad)


def test_torch_lstm_sizes_that_differ_are_reported():
    torch = pytest.importorskip("torch")
    model = converters.from_torch(torch.nn.LSTM(3, 5, proj_size=2))
    r = converters.verify(model, torch.nn.LSTM(3, 5), steps=4)
    assert not r.ok and r.max_abs_diff == float("inf")
    assert "output_size 2 vs 5" in str(r) and "state_size 7 vs 10" in str(r)


def _mixed(torch, seed):
    """Linear -> GRU -> 2-layer LSTM with a projection -> LSTMCell -> Linear, ReLU, Linear: the
    shapes chain one way only (3 -> 4 -> 5 -> 3 -> 7 -> 6 -> 2), so that a state_dict, whose
    .safetensors file loses the registration order, converts without layers=."""
    torch.manual_seed(seed)
    nn = torch.nn

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.gru = nn.GRU(4, 5, batch_first=True)
            self.lstm = nn.LSTM(5, 6, num_layers=2, proj_size=3, batch_first=True)
            self.cell = nn.LSTMCell(3, 7)
            self.head = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 2))

        def forward(self, x):
            y, _ = self.gru(self.inp(x))
            y, (_, _) = self.lstm(y)
            hc, outs = None, []
            for t in range(y.shape[1]):
                hc = self.cell(y[:, t], hc)
                outs.append(hc[0])
            return self.head(torch.stack(outs, dim=1))

    return Mixed().eval()


def _as_source(torch, net, form, path):
    """``net`` as the source ``form``: the module itself, its state_dict, a .pt or a
    .safetensors file of it."""
    if form == "module":
        return net
    sd = net.state_dict()
    if form == "state_dict":
        return dict(sd)
    if form == ".pt":
        torch.save(sd, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path.with_suffix(".safetensors")))
    return path.with_suffix(".safetensors")


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("form", ["module", "state_dict", ".pt", ".safetensors"])
def test_torch_module_mixing_gru_lstm_and_linear(tmp_path, form):
    torch = pytest.importorskip("torch")
    src = _as_source(torch, _mixed(torch, 20), form, tmp_path / "mine")
    model = converters.from_torch(src)
    assert [la.kind for la in model.layers] == ["dense", "gru", "lstm", "lstm", "lstm", "dense",
                                                "dense"]
    for dtype in ("float32", "float64"):
        r = converters.verify(model, src, dtype=dtype, streams=3, steps=8)
        assert r.ok and r.framework_check, str(r)
        assert r.max_abs_diff < (1e-5 if dtype == "float32" else 1e-12)
        assert "recurrent/Linear stack rebuilt" in r.reference
        assert "c_0" in r.initial_state
        if form == "module":  # its own forward(x) too, from zeros: a second comparison
            assert "forward(x)" in r.reference and "per comparison" in str(r)
        else:
            assert "records no activations" in r.reference
    other = _as_source(torch, _mixed(torch, 21), form, tmp_path / "other")
    bad = converters.verify(model, other, streams=3, steps=8)
    assert not bad.ok and bad.max_abs_diff > 1e-3, str(bad)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("policy", ["skip", "zero", "last"])
def test_lstm_missing_values_against_torch_applying_the_same_rule(policy):
    torch = pytest.importorskip("torch")
    lstm = _seeded(torch, _LSTMS["lstm2_proj_batch_first"], 12)
    model = converters.from_torch(lstm)
    r = converters.verify(model, lstm, dtype="float64", streams=3, steps=12, missing=policy,
                          missing_rate=0.2)
    assert r.ok and r.max_abs_diff < 1e-12 and r.dropped > 3, str(r)
    # skip: a skipped step outputs what the head makes of the last LSTM's held h.
    net = _mixed(torch, 22)
    r = converters.verify(converters.from_torch(net), net, steps=10, missing=policy,
                          missing_rate=0.15)
    assert r.ok and r.dropped > 0 and "per comparison" in str(r), str(r)
    bad = converters.verify(model, _seeded(torch, _LSTMS["lstm2_proj_batch_first"], 13),
                            dtype="float64", streams=3, steps=12, missing=policy,
                            missing_rate=0.2)
    assert not bad.ok and bad.max_abs_diff > 1e-3


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lstm_model_against_its_to_torch_export(dtype):
    torch = pytest.importorskip("torch")
    lstm = _seeded(torch, _LSTMS["lstm2_proj_batch_first"], 14)
    model = converters.from_torch(lstm).astype(dtype)
    r = converters.verify(model, converters.to_torch(model), dtype=dtype, streams=3, steps=8)
    assert r.ok and r.framework_check and "one call per step" in r.reference
    assert r.max_abs_diff < (1e-5 if dtype == "float32" else 1e-12)
    other = converters.from_torch(_seeded(torch, _LSTMS["lstm2_proj_batch_first"], 15))
    bad = converters.verify(model, converters.to_torch(other.astype(dtype)), dtype=dtype,
                            streams=3, steps=8)
    assert not bad.ok and bad.max_abs_diff > 1e-3


def _export_lstm(torch, tmp_path, seed, mixed=False):
    """A legacy ONNX export taking each recurrent module's initial states as graph inputs:
    Linear -> 2-layer LSTM -> Linear + sigmoid (inputs h, c), or with ``mixed`` Linear, ReLU ->
    LSTM -> GRU -> 2-layer LSTM without bias -> Linear (inputs ha, ca, hg, hb, cb)."""
    torch.manual_seed(seed)
    nn = torch.nn

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.lstm, self.out = nn.Linear(3, 4), nn.LSTM(4, 5, 2), nn.Linear(5, 2)

        def forward(self, x, h, c):
            y, (h, c) = self.lstm(self.inp(x), (h, c))
            return torch.sigmoid(self.out(y)), h, c

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.g = nn.Linear(3, 4), nn.LSTM(4, 5), nn.GRU(5, 6)
            self.b, self.out = nn.LSTM(6, 4, num_layers=2, bias=False), nn.Linear(4, 2)

        def forward(self, x, ha, ca, hg, hb, cb):
            y, (ha, ca) = self.a(torch.relu(self.inp(x)), (ha, ca))
            y, hg = self.g(y, hg)
            y, (hb, cb) = self.b(y, (hb, cb))
            return self.out(y), ha, ca, hg, hb, cb

    states = {"ha": (1, 5), "ca": (1, 5), "hg": (1, 6), "hb": (2, 4), "cb": (2, 4)} if mixed \
        else {"h": (2, 5), "c": (2, 5)}
    net = (Mixed if mixed else One)().eval()
    path = tmp_path / f"lstm{seed}{'_mixed' if mixed else ''}.onnx"
    args = (torch.randn(4, 2, 3), *(torch.randn(L, 2, w) for L, w in states.values()))
    axes = {"x": {0: "time", 1: "batch"}, "y": {0: "time", 1: "batch"},
            **{k: {1: "batch"} for k in states}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, str(path), dynamo=False, input_names=["x", *states],
                          output_names=["y", *(f"{k}_n" for k in states)], dynamic_axes=axes)
    return path


@pytest.mark.parametrize("mixed", [False, True], ids=["lstm", "gru_and_lstm"])
def test_onnx_lstm_export(tmp_path, mixed):
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = _export_lstm(torch, tmp_path, 30, mixed)
    model = streamgru.load(path)
    assert "lstm" in [la.kind for la in model.layers]
    inputs = ["'ha', 'ca', 'hg', 'hb', 'cb'"] if mixed else ["'h', 'c'"]
    for dtype in ("float32", "float64"):
        for src in (path, onnx.load(str(path))):
            r = converters.verify(model, src, dtype=dtype, streams=4, steps=9)
            assert r.ok and r.framework_check and r.max_abs_diff < 1e-5, str(r)
            assert r.tolerance == 1e-4  # onnxruntime runs float32 only
            assert r.initial_state == f"random nonzero, fed through graph input(s) [{inputs[0]}]"
    bad = converters.verify(model, _export_lstm(torch, tmp_path, 31, mixed), streams=4, steps=9)
    assert not bad.ok and bad.max_abs_diff > 1e-3, str(bad)


@pytest.mark.parametrize("policy", ["skip", "zero", "last"])
def test_onnx_lstm_missing_values(tmp_path, policy):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    path = _export_lstm(torch, tmp_path, 32)
    model = streamgru.load(path)
    r = converters.verify(model, path, streams=4, steps=10, missing=policy, missing_rate=0.2)
    assert r.ok and r.dropped > 0 and r.max_abs_diff < 1e-5, str(r)
    bad = converters.verify(model, _export_lstm(torch, tmp_path, 33), streams=4, steps=10,
                            missing=policy, missing_rate=0.2)
    assert not bad.ok and bad.max_abs_diff > 1e-3


_LSTM_FILES = [
    ("keras_lstm_seq.keras", "skip"), ("keras_lstm_state.keras", "zero"),
    ("keras_lstm_mixed.keras", "last"), ("keras_lstm_legacy_hard_sigmoid.h5", "refuse"),
    ("keras2_lstm_state.h5", "skip"), ("rtneural_lstm_seq.json", "refuse"),
    ("rtneural_lstm_mixed.json", "last"),
]


@pytest.mark.parametrize("name, policy", _LSTM_FILES, ids=[n for n, _ in _LSTM_FILES])
def test_keras_and_rtneural_lstm_files_are_a_consistency_check(name, policy):
    if name.endswith((".keras", ".h5")):
        pytest.importorskip("h5py")
    model = streamgru.load(FIX / name)
    assert "lstm" in [la.kind for la in model.layers]
    r = converters.verify(model, FIX / name, steps=8, missing=policy, missing_rate=0.2)
    assert r.ok and not r.framework_check and r.max_abs_diff < 1e-5, str(r)
    assert "CONSISTENCY CHECK" in str(r) and (r.dropped > 0) == (policy != "refuse")
    # Another model of the same sizes (the file's layers, their weights moved) is caught.
    rng = np.random.default_rng(1)
    other = streamgru.Model([
        type(la).from_config(la.config(), {k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype)
                                           for k, v in la.tensors().items()})
        for la in model.layers])
    bad = converters.verify(other, FIX / name, steps=8, missing=policy, missing_rate=0.2)
    assert not bad.ok and bad.max_abs_diff > 1e-3, str(bad)


def test_rtneural_lstm_export_is_the_keras_models():
    """The RTNeural JSON written from a Keras model checks out against the Keras file."""
    pytest.importorskip("h5py")
    for keras_name, rt_name in (("keras_lstm_seq.keras", "rtneural_lstm_seq.json"),
                                ("keras_lstm_mixed.keras", "rtneural_lstm_mixed.json")):
        r = converters.verify(streamgru.load(FIX / keras_name), FIX / rt_name, steps=8)
        assert r.ok, str(r)


# ---------------------------------------------------------------------------- compact weights


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_verify_reports_the_compact_weights_error_against_the_source(cell):
    """weights= measures the compact engine against the framework: a small error that grows
    from float32 to float16 to int8, within the compact defaults; a compact model verifies in
    its own form by default; float64 and an unknown form are refused by name."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    net = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(4, 24, num_layers=2)
    model = converters.from_torch(net)
    reports = {w: converters.verify(model, net, weights=w, steps=30) for w in
               ("float32", "float16", "int8")}
    assert all(r.ok for r in reports.values())
    d = {w: r.max_abs_diff for w, r in reports.items()}
    assert d["float32"] < 1e-5 < d["float16"] < d["int8"] < 1e-2
    assert reports["int8"].tolerance == 1e-2 and reports["float16"].tolerance == 1e-3
    assert "weights='int8'" in str(reports["int8"])
    compact = model.compacted("int8")
    again = converters.verify(compact, net, steps=30)
    assert again.weights == "int8" and again.max_abs_diff == d["int8"]
    assert converters.verify(model, net, weights="int8", steps=30, tolerance=1e-6).ok is False
    with pytest.raises(ValueError, match=r'weights: expected "float64" \(or None\) for a float64 '
                                         r"engine, got 'int8'"):
        converters.verify(model, net, weights="int8", dtype="float64")
    with pytest.raises(ValueError, match="weights: expected one of"):
        converters.verify(model, net, weights="bf16")
