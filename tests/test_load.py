"""streamgru.load, the one front door: one small model of each file type, each run through the
engine step by step (several interleaved streams, nonzero initial states) against its source:
torch, onnxruntime, the Keras outputs stored next to the fixtures, or the float64 oracle for
native files. Also: an unknown extension, a missing optional dependency, and that loading and
running a native model imports none of torch / onnx / h5py.
"""

import contextlib
import io
import json
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import oracle
import pytest

import streamgru

FIX = pathlib.Path(__file__).parent / "fixtures"
B, T = 3, 7


def engine_outputs(model, xs, states, dtype):
    """xs (B, T, I), states (B, S) -> (B, T, O): every stream stepped one step per call, in a
    shuffled order split over two calls per step."""
    eng = streamgru.Engine(model, dtype=dtype)
    n, steps = xs.shape[:2]
    for s in range(n):
        eng.open(s, state=states[s].astype(dtype))
    rng = np.random.default_rng(0)
    ys = np.zeros((n, steps, model.output_size))
    for t in range(steps):
        for group in np.array_split(rng.permutation(n), 2):
            if len(group):
                ys[group, t] = eng.step(group, xs[group, t].astype(dtype))
    return ys


def check(model, xs, states, ref, tol32=1e-5, tol64=1e-5):
    """Engine in both dtypes within tolerance of ``ref`` (B, T, O); tol64 is 1e-9 only against a
    float64 reference."""
    for dtype, tol in (("float32", tol32), ("float64", tol64)):
        np.testing.assert_allclose(engine_outputs(model, xs, states, dtype), ref, rtol=tol,
                                   atol=tol, err_msg=dtype)


def torch_net(torch, seed):
    """Linear(3, 6) -> GRU(6, 5, num_layers=2) -> Linear(5, 2), no activations (a state_dict
    records none), forward(x (B, T, 3), h (2, B, 5))."""
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(3, 6)
            self.gru = torch.nn.GRU(6, 5, num_layers=2, batch_first=True)
            self.out = torch.nn.Linear(5, 2)

        def forward(self, x, h):
            y, hn = self.gru(self.inp(x), h)
            return self.out(y), hn

    return Net().eval()


def torch_case(torch, net, dtype=np.float32):
    rng = np.random.default_rng(5)
    xs = rng.normal(size=(B, T, 3))
    h = rng.uniform(-0.8, 0.8, size=(2, B, 5))
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    with torch.no_grad():
        y, _ = net.to(tdt)(torch.tensor(xs, dtype=tdt), torch.tensor(h, dtype=tdt))
    net.float()
    # streamgru's state: the GRU layers' hidden vectors concatenated, h (L, B, H) -> (B, L*H).
    return xs, h.transpose(1, 0, 2).reshape(B, -1), y.numpy().astype(np.float64)


def test_native_sgru_and_native_safetensors(tmp_path):
    m = streamgru.GRUModel.random(3, [6, 4], dense_after=[(2, "softmax")], seed=3)
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(B, T, 3))
    states = rng.uniform(-0.8, 0.8, size=(B, m.state_size))
    ref = np.stack([oracle.run(m, xs[b], states[b])[0] for b in range(B)])
    for name in ("m.sgru", "m.safetensors"):
        m.save(tmp_path / name)
        loaded = streamgru.load(tmp_path / name)
        assert loaded.fingerprint == m.fingerprint
        check(loaded, xs, states, ref, tol64=1e-9)


@pytest.mark.parametrize("ext", [".pt", ".pth"])
def test_torch_state_dict_files(tmp_path, ext):
    torch = pytest.importorskip("torch")
    net = torch_net(torch, seed=1)
    torch.save(net.state_dict(), tmp_path / f"m{ext}")
    model = streamgru.load(tmp_path / f"m{ext}")
    assert model.source == "pytorch" and [x.kind for x in model.layers] == \
        ["dense", "gru", "gru", "dense"]
    xs, states, ref = torch_case(torch, net)
    check(model, xs, states, ref)
    xs, states, ref64 = torch_case(torch, net, np.float64)
    np.testing.assert_allclose(engine_outputs(model, xs, states, "float64"), ref64, rtol=1e-9,
                               atol=1e-9)


def test_torch_state_dict_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    net = torch_net(torch, seed=2)
    save_file({k: v.numpy() for k, v in net.state_dict().items()}, str(tmp_path / "m.safetensors"))
    model = streamgru.load(tmp_path / "m.safetensors")
    assert model.source == "pytorch"
    xs, states, ref = torch_case(torch, net)
    check(model, xs, states, ref)


def test_torch_state_dict_json(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch_net(torch, seed=3)
    doc = {k: v.tolist() for k, v in net.state_dict().items()}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    model = streamgru.load(tmp_path / "m.json")
    assert model.source == "pytorch"
    xs, states, ref = torch_case(torch, net)
    check(model, xs, states, ref)


def test_onnx_from_torch_legacy_exporter(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = torch_net(torch, seed=4)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 4, 3), torch.randn(2, 2, 5)),
                          str(tmp_path / "m.onnx"), dynamo=False, input_names=["x", "h"],
                          output_names=["y", "hn"],
                          dynamic_axes={"x": {0: "batch", 1: "time"}, "h": {1: "batch"},
                                        "y": {0: "batch", 1: "time"}})
    model = streamgru.load(tmp_path / "m.onnx")
    assert model.source == "onnx"
    xs, states, ref = torch_case(torch, net)
    h = states.reshape(B, 2, 5).transpose(1, 0, 2)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    y_ort = sess.run(["y"], {"x": xs.astype(np.float32), "h": h.astype(np.float32)})[0]
    check(model, xs, states, y_ort)
    check(model, xs, states, ref)


@pytest.mark.parametrize("name", ["keras_seq_reset_after.keras", "keras_legacy_hard_sigmoid.h5",
                                  "keras2_legacy_hard_sigmoid.h5"])
def test_keras_files_match_stored_keras_outputs(name):
    pytest.importorskip("h5py")
    model = streamgru.load(FIX / name)
    assert model.source.startswith("keras")
    ref = np.load(FIX / (name.rsplit(".", 1)[0] + ".npz"))
    check(model, ref["x"], ref["h0"], ref["y_h0"])


@pytest.mark.parametrize("name", ["rtneural_seq_reset_after", "rtneural_func_reset_before"])
def test_rtneural_json_matches_stored_keras_outputs(name):
    model = streamgru.load(FIX / f"{name}.json")
    assert model.source == "rtneural"
    ref = np.load(FIX / (name.replace("rtneural", "keras") + ".npz"))
    check(model, ref["x"], ref["h0"], ref["y_h0"])


def test_unknown_extension_lists_the_supported_types(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"path: expected one of these file types: .*\.onnx.*"
                                         r"\.keras.*got '\.bin'"):
        streamgru.load(tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError, match="path: expected an existing file"):
        streamgru.load(tmp_path / "missing.onnx")


@pytest.mark.parametrize("module, extra, name", [
    ("h5py", "keras", "keras_seq_reset_after.keras"),
    ("onnx", "onnx", None),
    ("torch", "torch", None),
])
def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch, module, extra, name):
    if name is None:
        name = "m.onnx" if module == "onnx" else "m.pt"
        (tmp_path / name).write_bytes(b"not read: the import fails first")
        path = tmp_path / name
    else:
        path = FIX / name
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install 'streamgru\[{extra}\]'"):
        streamgru.load(path)


def test_native_model_needs_no_framework(tmp_path):
    m = streamgru.GRUModel.random(2, [4], dense_after=[(1, "identity")])
    m.save(tmp_path / "m.sgru")
    code = (
        "import sys, numpy as np, streamgru, converters\n"
        f"model = streamgru.load({str(tmp_path / 'm.sgru')!r})\n"
        "y = streamgru.Engine(model).step(['a', 'b'], np.ones((2, 2), np.float32))\n"
        "assert y.shape == (2, 1), y.shape\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'h5py', 'keras', "
        "'tensorflow') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
