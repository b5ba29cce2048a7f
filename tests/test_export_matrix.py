"""What loads, from which exporter: the conformance matrix of the README's table.

Every row is a real exporter's output, made here (torch's legacy and dynamo ONNX exporters run in
the test) or by a real Keras (fixtures written by tests/fixtures/make_export_fixtures.py, with
Keras's own outputs beside them). A row either matches the framework's own run -- three streams
started from nonzero states, stepped interleaved one step per call, float32 within 1e-5 (the
engine is also checked against the float64 oracle by ``stream_outputs``) -- or is refused with a
reason.

Sampling the torch matrix: the legacy exporter takes ~0.1 s per model, so it runs the full
product (module kind x dynamic shapes x h0 input x T = 1 or 5). The dynamo exporter takes seconds
per model, so it runs a covering subset: every module kind once, and every value of each other
factor (dynamic or fixed shapes, with or without h0, T = 1 or 5) at least twice, including the
issue's case (a bare nn.GRU, fixed T and batch, no h0). What the converter does with a graph
depends on the ops the exporter emits for each factor, not on their combination, so the subset
covers the code paths the product would.
"""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_from_onnx import ort_run, stream_outputs  # noqa: E402

import converters  # noqa: E402
from converters import from_keras, from_onnx  # noqa: E402
from streamgru.cli import main as cli_main  # noqa: E402
from streamgru.errors import UnsupportedModelError  # noqa: E402

nn = torch.nn
FIX = pathlib.Path(__file__).parent / "fixtures"
I, H, B, STEPS = 3, 5, 3, 6


# --------------------------------------------------------------------------- torch modules

class Head(nn.Module):
    """Linear -> tanh -> GRU -> Linear: the GRU with Linear heads."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.inp = nn.Linear(I, 4)
        self.gru = nn.GRU(4, H, num_layers=2, batch_first=batch_first)
        self.out = nn.Linear(H, 2)

    def forward(self, x, h=None):
        y, hn = self.gru(torch.tanh(self.inp(x)), h)
        return self.out(y), hn


class Wrapped(nn.Module):
    """A module holding an nn.GRU and returning its sequence output only."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(I, H, batch_first=True)

    def forward(self, x, h=None):
        return self.gru(x, h)[0]


KINDS = {
    "gru1": lambda: nn.GRU(I, H),
    "gru3": lambda: nn.GRU(I, H, num_layers=3),
    "gru2_batch_first": lambda: nn.GRU(I, H, num_layers=2, batch_first=True),
    "gru_nobias": lambda: nn.GRU(I, H, bias=False),
    "gru_linear_heads": lambda: Head(),
    "wrapped": Wrapped,
}


def _build(kind):
    torch.manual_seed(sorted(KINDS).index(kind))
    return KINDS[kind]().eval()


def _rnn(module):
    """The module's nn.GRU or nn.LSTM (the module itself, or the first one it holds)."""
    return next(m for m in module.modules() if isinstance(m, (nn.GRU, nn.LSTM)))


def _export(module, exporter, dynamic, with_h0, T, path):
    """Export ``module`` (an nn.GRU or nn.LSTM, or a module holding one, called as
    ``module(x, state)``) with a (T, B) input; ``with_h0``: with the state input, named "h"
    (an LSTM's (h0, c0): "h" and "c")."""
    rnn = _rnn(module)
    bf = rnn.batch_first
    lstm = isinstance(rnn, nn.LSTM)
    x = torch.randn(B, T, I) if bf else torch.randn(T, B, I)
    h0 = torch.zeros(rnn.num_layers, B, rnn.hidden_size)
    state = (h0, torch.zeros_like(h0)) if lstm else h0
    args = (x, state) if with_h0 else (x,)
    names = ["x", "h", "c"][:1 + (1 + lstm) * with_h0]
    kw = {}
    if dynamic:
        t_ax, b_ax = (1, 0) if bf else (0, 1)
        if exporter == "legacy":
            axes = {"x": {t_ax: "t", b_ax: "b"}}
            axes.update({name: {1: "b"} for name in names[1:]})
            kw["dynamic_axes"] = axes
        else:
            # torch.export specialises a dimension of size 1: time is dynamic only when T > 1.
            b = torch.export.Dim("b")
            xs = {b_ax: b, **({t_ax: torch.export.Dim("t")} if T > 1 else {})}
            states = ({1: b}, {1: b}) if lstm else {1: b}
            kw["dynamic_shapes"] = (xs, states) if with_h0 else (xs,)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=exporter == "dynamo", input_names=names,
                          **kw)


def _torch_reference(module, xs, h0):
    """The module's own run: xs (B, T, I), h0 (B, L*H) -> outputs (B, T, O) float64."""
    gru = _rnn(module)
    L = gru.num_layers
    x = torch.tensor(xs, dtype=torch.float32)
    if not gru.batch_first:
        x = x.transpose(0, 1)
    h = torch.tensor(h0.reshape(len(h0), L, H).transpose(1, 0, 2), dtype=torch.float32)
    with torch.no_grad():
        y = module(x, h.contiguous())
    y = y[0] if isinstance(y, tuple) else y
    if not gru.batch_first:
        y = y.transpose(0, 1)
    return y.numpy().astype(np.float64)


def _check_torch_row(tmp_path, kind, exporter, dynamic, with_h0, T):
    module = _build(kind)
    path = tmp_path / f"{kind}.onnx"
    _export(module, exporter, dynamic, with_h0, T, path)
    model = from_onnx(path)
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(B, STEPS, I))
    h0 = rng.uniform(-0.8, 0.8, size=(B, model.state_size))
    ys = stream_outputs(model, xs, h0)
    np.testing.assert_allclose(ys, _torch_reference(module, xs, h0), rtol=1e-5, atol=1e-5)
    return path, model


LEGACY = [(k, d, h, t) for k in KINDS for d in (False, True) for h in (False, True)
          for t in (1, 5)]
DYNAMO = [
    ("gru1", False, False, 5),              # bare nn.GRU, fixed T and batch
    ("gru1", True, False, 5),
    ("gru3", True, True, 5),
    ("gru2_batch_first", False, True, 1),
    ("gru_nobias", True, False, 1),
    ("gru_linear_heads", False, True, 5),
    ("wrapped", True, False, 5),
]


def _ids(rows):
    return ["-".join([k, "dynamic" if d else "fixed", "h0" if h else "no_h0", f"T{t}"])
            for k, d, h, t in rows]


@pytest.mark.parametrize("kind, dynamic, with_h0, T", LEGACY, ids=_ids(LEGACY))
def test_torch_legacy_exporter(tmp_path, kind, dynamic, with_h0, T):
    _check_torch_row(tmp_path, kind, "legacy", dynamic, with_h0, T)


@pytest.mark.slow
@pytest.mark.parametrize("kind, dynamic, with_h0, T", DYNAMO, ids=_ids(DYNAMO))
def test_torch_dynamo_exporter(tmp_path, kind, dynamic, with_h0, T):
    pytest.importorskip("onnxscript")
    _check_torch_row(tmp_path, kind, "dynamo", dynamic, with_h0, T)


@pytest.mark.slow
def test_dynamo_time_declared_dynamic_then_specialised(tmp_path):
    """The dynamo exporter, in a fresh process, keeps a dynamic time axis symbolic at the input
    but writes its length into a Reshape ([5, -1, 5]: time, batch, features): the Reshape keeps
    time and batch, so it is plumbing and the graph runs at that length. (In a process that has
    already exported the module with fixed shapes, torch reuses the specialisation and the input
    is static too, which is why this row needs its own process.)"""
    pytest.importorskip("onnxscript")
    path = tmp_path / "gru1.onnx"
    code = ("import pathlib, sys; sys.path.insert(0, sys.argv[1]); import test_export_matrix as m; "
            "m._export(m._build('gru1'), 'dynamo', True, False, 5, pathlib.Path(sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code, str(pathlib.Path(__file__).parent), str(path)],
                   check=True, env=env, timeout=300, capture_output=True)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # time is symbolic at the input
    model = from_onnx(path)
    assert any("fixes axis 0 of graph input 'x', declared dynamic, to 5" in n for n in model.notes)
    rng = np.random.default_rng(7)
    xs, h0 = rng.normal(size=(B, STEPS, I)), rng.uniform(-0.8, 0.8, size=(B, H))
    ys = stream_outputs(model, xs, h0)
    np.testing.assert_allclose(ys, _torch_reference(_build("gru1"), xs, h0), rtol=1e-5, atol=1e-5)
    report = converters.verify(model, path)
    assert report.ok and report.steps == 5, str(report)


# --------------------------------------------------------------------------- convert --check

@pytest.mark.slow
@pytest.mark.parametrize("row", [("gru_linear_heads", "legacy", True, True, 5),
                                 ("gru2_batch_first", "legacy", False, False, 1),
                                 ("gru1", "dynamo", True, False, 5)],
                         ids=["legacy-heads-dynamic", "legacy-fixed-T1", "dynamo-specialised-T"])
def test_convert_check_on_torch_rows(tmp_path, capsys, row):
    kind, exporter, dynamic, with_h0, T = row
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    path, _ = _check_torch_row(tmp_path, kind, exporter, dynamic, with_h0, T)
    assert cli_main(["convert", str(path), "-o", str(tmp_path / "m.sgru"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "verify OK" in out and "[framework check]" in out
    assert (tmp_path / "m.sgru").exists()


# --------------------------------------------------------------------------- Keras fixtures

KERAS = [f"keras{v}_{name}{ext}" for v, ext in ((3, ".keras"), (2, ".h5"))
         for name in ("state_input", "state_inputs2", "stateful")]


@pytest.mark.parametrize("name", KERAS)
def test_keras_streaming_exports_match_keras(name):
    model = from_keras(FIX / name)
    ref = np.load(FIX / (name.rsplit(".", 1)[0] + ".npz"))
    ys = stream_outputs(model, ref["x"].astype(np.float64), ref["h0"].astype(np.float64))
    np.testing.assert_allclose(ys, ref["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("v, ext", [(3, ".keras"), (2, ".h5")])
def test_keras_state_inputs_and_outputs_are_reported(v, ext, capsys):
    notes = from_keras(FIX / f"keras{v}_state_inputs2{ext}").notes
    assert any(re.search(r"model input 'h_b' is the initial state of layer 'gru_b'.*per-stream "
                         r"state", n) for n in notes)
    assert any(re.search(r"model output 'gru_a' \(output 1\) returns the state.*ignored", n)
               for n in notes)
    assert any("'gru_b' (GRU): its state is elements 4:7" in n for n in notes)
    assert cli_main(["info", str(FIX / f"keras{v}_state_inputs2{ext}")]) == 0
    out = capsys.readouterr().out
    assert "note: model input 'h_a' is the initial state of layer 'gru_a'" in out
    assert "note: model output 'gru_b' (output 1) returns the state" in out


@pytest.mark.parametrize("v, ext", [(3, ".keras"), (2, ".h5")])
def test_keras_stateful_is_reported(v, ext):
    notes = from_keras(FIX / f"keras{v}_stateful{ext}").notes
    assert any("stateful=True (batch 3 in the file)" in n for n in notes)


@pytest.mark.parametrize("v, ext", [(3, ".keras"), (2, ".h5")])
def test_keras_computed_initial_state_is_refused(v, ext):
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 'gru' \(GRU\): expected initial_state to be a model input of "
                             r"its own \(the per-stream state\), got 'proj'"):
        from_keras(FIX / f"keras{v}_state_computed{ext}")


def test_convert_check_on_keras_row(tmp_path, capsys):
    src = FIX / "keras3_state_inputs2.keras"
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "m.sgru"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "verify OK" in out
    assert "note: model input 'h_b' is the initial state of layer 'gru_b'" in out


# --------------------------------------------------------------------------- one node of a graph

class CacheStream(nn.Module):
    """A GTCRN-style stream model: both GRUs' states live in one cache tensor (1, B, 5 + 6); the
    first GRU's state is sliced out of it, written back with an index assignment (ScatterND),
    and the second GRU's state is sliced out of the updated cache."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(I, 4)
        self.g1 = nn.GRU(4, 5)
        self.g2 = nn.GRU(5, 6)

    def forward(self, x, cache):
        y1, h1 = self.g1(torch.relu(self.enc(x)), cache[:, :, :5].contiguous())
        cache = cache.clone()
        cache[:, :, :5] = h1
        y2, h2 = self.g2(y1 * 0.5 + torch.sigmoid(y1), cache[:, :, 5:].contiguous())
        return y2, torch.cat([h1, h2], dim=-1)


def test_one_node_of_a_streaming_graph(tmp_path, capsys):
    torch.manual_seed(3)
    module = CacheStream().eval()
    path = tmp_path / "stream.onnx"
    x, cache = torch.randn(STEPS, B, I), torch.randn(1, B, 11) * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, cache), str(path), dynamo=False,
                          input_names=["x", "cache"], output_names=["y", "new_cache"])
    proto = onnx.load(str(path))
    grus = [n for n in proto.graph.node if n.op_type == "GRU"]
    second = grus[1]
    h_src = {n.output[0]: n for n in proto.graph.node}
    assert second.input[5] not in {i.name for i in proto.graph.input}  # computed from the cache
    # Without node=: refused, with the recurrent nodes to pick from.
    with pytest.raises(UnsupportedModelError, match=r"recurrent nodes: .*pass node="):
        from_onnx(proto)
    model = from_onnx(path, node=second.name)
    assert [layer.hidden_size for layer in model.layers] == [6]
    assert any(f"node {second.name!r}: its initial_h" in n and "per-stream state" in n
               for n in model.notes), model.notes
    assert any("its input X" in n and "engine's input" in n for n in model.notes)
    assert second.input[5] in h_src
    # The reference: onnxruntime's values of the node's X, initial_h and Y in the whole graph.
    probe = onnx.load(str(path))
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in
                              (second.input[0], second.input[5], second.output[0]))
    X, h0, Y = ort_run(probe, {"x": x.numpy(), "cache": cache.numpy()})
    ys = stream_outputs(model, X.transpose(1, 0, 2).astype(np.float64),
                        h0[0].astype(np.float64))
    np.testing.assert_allclose(ys, Y[:, 0].transpose(1, 0, 2), rtol=1e-5, atol=1e-5)
    # verify needs the whole graph: a node taken out of it is refused there, with the reason.
    with pytest.raises(TypeError, match="node: verify runs the whole ONNX graph"):
        converters.verify(model, path, node=second.name)
