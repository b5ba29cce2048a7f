"""The streamgru command line, through a real subprocess where it matters."""

import contextlib
import io
import pathlib
import warnings

import numpy as np
import pytest
from helpers import mixed_lstm_model

from streamgru import DenseLayer, GRULayer, GRUModel
from streamgru.cli import main


def test_info_prints_layers(tmp_path, capsys):
    m = GRUModel.random(3, [5], dense_after=[(2, "softmax")], linear_before_reset=0)
    m.save(tmp_path / "m.sgru")
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    out = capsys.readouterr().out
    assert "linear_before_reset=0" in out and "activation=softmax" in out
    assert m.fingerprint in out


def test_info_into_a_reader_that_leaves_early_stops_quietly(tmp_path):
    """`streamgru info FILE | head -1`: the reader closes the pipe after one line; the verb
    ends without a BrokenPipeError traceback (exit 141, as a tool killed by SIGPIPE)."""
    import subprocess
    import sys

    GRUModel.random(3, [5], dense_after=[(2, "softmax")]).save(tmp_path / "m.sgru")
    r, w = __import__("os").pipe()
    __import__("os").close(r)  # nobody reads: the first write fails with EPIPE
    with open(w, "wb", closefd=True) as out:
        res = subprocess.run([sys.executable, "-m", "streamgru.cli", "info",
                              str(tmp_path / "m.sgru")], stdout=out, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    assert res.returncode == 141, res.stderr
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


def test_info_layer_lines_are_unchanged(tmp_path, capsys):
    # The exact per-layer lines streamgru info printed before the layer protocol.
    rng = np.random.default_rng(0)
    g = GRULayer(2, 3, rng.normal(size=(9, 2)), rng.normal(size=(9, 3)), linear_before_reset=0,
                 f=("hardsigmoid", 0.25, 0.4), g="tanh", clip=2.5)
    m = GRUModel([DenseLayer(4, 2, np.ones((2, 4)), activation="relu"), g,
                  DenseLayer(3, 2, np.ones((2, 3)), activation=("leakyrelu", 0.1))])
    m.save(tmp_path / "m.sgru")
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  layer ")]
    assert lines == [
        "  layer 0: dense activation=relu",
        "  layer 1: gru  linear_before_reset=0 f=hardsigmoid(alpha=0.25, beta=0.4) g=tanh clip=2.5",
        "  layer 2: dense activation=leakyrelu(alpha=0.1, beta=0)",
    ]


def test_info_prints_an_lstm_layer(tmp_path, capsys):
    m = mixed_lstm_model(np.float32)
    m.save(tmp_path / "m.sgru")
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  layer ")]
    assert lines[1] == ("  layer 1: lstm proj_size=2 f=sigmoid g=tanh "
                        "h=scaledtanh(alpha=1.5, beta=0.5) clip=2.5 peepholes=yes input_forget=0")
    assert len(lines) == 4


def test_info_shows_the_product_tile(tmp_path, capsys):
    from streamgru.isa import TILE

    assert main(["info"]) == 0  # no file: the tile in use only
    assert capsys.readouterr().out.strip() == f"kernels: {TILE.describe()}"
    m = GRUModel.random(3, [5])
    m.save(tmp_path / "m.sgru")
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    out = capsys.readouterr().out
    assert f"kernels: {TILE.name}" in out and f"{TILE.vec_bytes}-byte vectors" in out


def test_info_on_bad_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "m.sgru").write_bytes(b"garbage!garbage!")
    assert main(["info", str(tmp_path / "m.sgru")]) == 2
    err = capsys.readouterr().err
    assert "streamgru info: error:" in err and "header" in err


# ---------------------------------------------------------------------------- convert --check

FIX = pathlib.Path(__file__).parent / "fixtures"


def _torch_source(tmp_path, kind):
    """A small torch model saved as .onnx (legacy exporter), .pt or .safetensors state dict."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))  # only to hold weights for the head
    gru = torch.nn.GRU(4, 6, num_layers=2)
    if kind == "pt":
        sd = {"gru." + k: v for k, v in gru.state_dict().items()}
        sd.update({"inp." + k: v for k, v in net[0].state_dict().items()})
        torch.save(sd, tmp_path / "m.pt")
        return tmp_path / "m.pt"
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({"gru." + k: v for k, v in gru.state_dict().items()},
                  str(tmp_path / "m.safetensors"))
        return tmp_path / "m.safetensors"
    pytest.importorskip("onnxruntime")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.out = gru, torch.nn.Linear(6, 2)

        def forward(self, x, h):
            y, hn = self.gru(x, h)
            return self.out(y), hn

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(3, 2, 4), torch.randn(2, 2, 6)),
                          str(tmp_path / "m.onnx"), dynamo=False, input_names=["x", "h"],
                          output_names=["y", "hn"],
                          dynamic_axes={"x": {0: "time", 1: "batch"}, "h": {1: "batch"},
                                        "y": {0: "time", 1: "batch"}})
    return tmp_path / "m.onnx"


@pytest.mark.parametrize("kind", ["onnx", "pt", "safetensors", "keras", "h5", "rtneural"])
def test_convert_check_passes_on_each_kind(tmp_path, capsys, kind):
    if kind in ("keras", "h5"):
        pytest.importorskip("h5py")
    src = {"keras": FIX / "keras_seq_reset_after.keras", "h5": FIX / "keras_legacy_hard_sigmoid.h5",
           "rtneural": FIX / "rtneural_seq_reset_after.json"}.get(kind) or _torch_source(tmp_path, kind)
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--check"]) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert text.startswith("verify OK: max |engine - reference| = ") and "wrote" in text
    framework = kind in ("onnx", "pt", "safetensors")
    assert ("[framework check]" in text) == framework
    assert ("CONSISTENCY CHECK ONLY" in text) == (not framework)
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "linear_before_reset=1" in info and "parameters=" in info and "model source:" in info


def test_convert_check_fails_on_a_wrong_model(tmp_path, capsys, monkeypatch):
    src = _torch_source(tmp_path, "onnx")
    import streamgru.formats

    real = streamgru.formats.load(src)
    # The same shapes with other weights: what a converter bug (e.g. a gate swap) looks like.
    wrong = GRUModel.random(4, [6, 6], dense_after=[(2, "identity")], seed=1)
    assert wrong.state_size == real.state_size
    monkeypatch.setattr(streamgru.formats, "load", lambda path: wrong)
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--check"]) == 1
    cap = capsys.readouterr()
    assert cap.out.startswith("verify FAILED") and "check failed: max difference" in cap.err
    assert "not written" in cap.err and not out.exists()


def test_convert_tolerance_option(tmp_path, capsys):
    src = _torch_source(tmp_path, "pt")
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--check", "--tolerance", "1e-3"]) == 0
    assert "tolerance 0.001" in capsys.readouterr().out
    assert main(["convert", str(src), "-o", str(out), "--check", "--tolerance", "-1"]) == 2
    assert "tolerance: expected a non-negative float" in capsys.readouterr().err


def test_convert_without_check_and_info_on_foreign_file(tmp_path, capsys):
    out = tmp_path / "out.sgru"
    assert main(["convert", str(FIX / "rtneural_func_reset_before.json"), "-o", str(out)]) == 0
    assert "verify" not in capsys.readouterr().out and out.exists()
    assert main(["info", str(FIX / "rtneural_func_reset_before.json")]) == 0
    info = capsys.readouterr().out
    assert "RTNeural JSON" in info and "linear_before_reset=0" in info
    assert "model source: rtneural" in info and "hidden_size=7" in info


def _lstm_source(tmp_path, kind):
    """A small torch LSTM model: a .pt state_dict (Linear -> 2-layer LSTM with a projection ->
    Linear) or a legacy .onnx export (2-layer LSTM -> Linear, initial states as inputs h, c)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(8)
    nn = torch.nn
    if kind == "pt":
        parts = {"inp": nn.Linear(3, 4), "lstm": nn.LSTM(4, 6, num_layers=2, proj_size=3),
                 "out": nn.Linear(3, 2)}
        torch.save({f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()},
                   tmp_path / "m.pt")
        return tmp_path / "m.pt"
    pytest.importorskip("onnxruntime")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.out = nn.LSTM(4, 6, num_layers=2), nn.Linear(6, 2)

        def forward(self, x, h, c):
            y, (h, c) = self.lstm(x, (h, c))
            return self.out(y), h, c

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(3, 2, 4), torch.randn(2, 2, 6),
                                         torch.randn(2, 2, 6)),
                          str(tmp_path / "m.onnx"), dynamo=False, input_names=["x", "h", "c"],
                          output_names=["y", "hn", "cn"],
                          dynamic_axes={"x": {0: "time", 1: "batch"}, "h": {1: "batch"},
                                        "c": {1: "batch"}, "y": {0: "time", 1: "batch"}})
    return tmp_path / "m.onnx"


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_convert_check_on_an_lstm_source(tmp_path, capsys, monkeypatch, kind):
    src = _lstm_source(tmp_path, kind)
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--check"]) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert text.startswith("verify OK: max |engine - reference| = ") and "wrote" in text
    assert "[framework check]" in text
    assert ("an LSTM's c_0" if kind == "pt" else "graph input(s) ['h', 'c']") in text
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "lstm proj_size=" + ("3" if kind == "pt" else "0") in info
    # The same layers with other weights (what a gate or h/C mix-up looks like): refused.
    import streamgru.formats

    real = streamgru.formats.load(src)
    rng = np.random.default_rng(1)
    wrong = GRUModel([type(la).from_config(la.config(), {
        k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in la.tensors().items()})
        for la in real.layers])
    monkeypatch.setattr(streamgru.formats, "load", lambda path: wrong)
    out.unlink()
    assert main(["convert", str(src), "-o", str(out), "--check"]) == 1
    cap = capsys.readouterr()
    assert cap.out.startswith("verify FAILED") and "check failed: max difference" in cap.err
    assert not out.exists()


# ---------------------------------------------------------------------------- compact weights


def _stored_bytes(layer, weights):
    """A layer's weight bytes from streamgru.compact's definition: its matrices (2-D tensors) in
    ``weights``, its vectors in float32."""
    from streamgru import compact

    return sum(compact.stored_bytes(t.shape, weights) if t.ndim == 2 else 4 * t.size
               for t in layer.tensors().values())


def test_info_prints_weight_bytes_in_each_form(tmp_path, capsys):
    m = mixed_lstm_model(np.float32)
    m.save(tmp_path / "m.sgru")
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    lines = capsys.readouterr().out.splitlines()
    top = lines.index("weight bytes by storage form (vectors always float32; int8 includes its "
                      "row scales):")
    assert lines[top + 1].split() == ["float32", "float16", "int8"]
    forms = ("float32", "float16", "int8")
    for i, layer in enumerate(m.layers):
        assert lines[top + 2 + i].split() == [f"[{i}]", layer.kind] + [
            str(_stored_bytes(layer, f)) for f in forms]
    assert lines[top + 2 + len(m.layers)].split() == ["total"] + [
        str(sum(_stored_bytes(layer, f) for layer in m.layers)) for f in forms]
    assert not any("stored as" in ln for ln in lines)  # full precision: no such line


@pytest.mark.parametrize("weights", ["int8", "float16"])
def test_info_says_a_compact_file_holds_approximations(tmp_path, capsys, weights):
    m = mixed_lstm_model(np.float32)
    m.save(tmp_path / "m.sgru", weights=weights)
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    out = capsys.readouterr().out
    assert (f"weights: stored as {weights}: quantized, so they approximate the original model's "
            f"weights; Engine(model) stores them as {weights} by default (its weights= defaults "
            f"to model.stored_as, which this file sets)") in out
    assert m.compacted(weights).fingerprint in out
    total = [ln for ln in out.splitlines() if ln.startswith("  total")]
    assert len(total) == 1  # the table is the same for every file of this model


def test_convert_with_weights_writes_the_compact_model(tmp_path, capsys):
    from streamgru import compact, load

    src = FIX / "rtneural_func_reset_before.json"
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--weights", "int8"]) == 0
    text = capsys.readouterr().out
    assert "stored_as='int8'" in text
    assert f"weights stored as int8: quantized, an approximation of {src}'s" in text
    full, small = load(src), load(out)
    assert small.stored_as == "int8" and small.config() == full.config()
    for name, t in full.named_tensors().items():
        want = compact.dequantize(*compact.quantize(t, "int8")) if t.ndim == 2 else t
        np.testing.assert_array_equal(small.named_tensors()[name], want)
    # A compact .sgru converted again keeps its form unless told otherwise.
    again = tmp_path / "again.sgru"
    assert main(["convert", str(out), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert main(["convert", str(out), "-o", str(again), "--weights", "float16"]) == 0
    assert load(again).stored_as == "float16"


def test_convert_check_with_weights_checks_the_full_precision_conversion(tmp_path, capsys,
                                                                         monkeypatch):
    import converters
    from streamgru import load

    src = FIX / "rtneural_seq_reset_after.json"
    checked, real = [], converters.verify

    def spy(model, source, **kw):
        checked.append((model, kw.get("weights")))
        return real(model, source, **kw)

    monkeypatch.setattr(converters, "verify", spy)
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--check", "--weights", "float16"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("verify OK") and "weights='float32'" in text
    assert "weights='float16'" in text  # then the compact weights' own report
    (full, none), (small, form) = checked
    assert full.stored_as is None and full.fingerprint == load(src).fingerprint and none is None
    assert (small.stored_as, form) == ("float16", "float16")
    assert load(out).fingerprint == load(src).compacted("float16").fingerprint
    # A budget the int8 weights cannot meet: the full-precision check passes, theirs fails.
    out.unlink()
    assert main(["convert", str(src), "-o", str(out), "--check", "--weights", "int8",
                 "--weights-tolerance", "1e-9"]) == 1
    cap = capsys.readouterr()
    assert cap.out.startswith("verify OK") and "verify FAILED" in cap.out
    assert "check of the int8 weights failed" in cap.err and not out.exists()


def test_convert_check_failure_writes_nothing_with_weights(tmp_path, capsys, monkeypatch):
    import converters

    src = FIX / "rtneural_seq_reset_after.json"

    class Failed:
        ok, max_abs_diff, tolerance = False, 1.0, 1e-4

        def __str__(self):
            return "verify FAILED"

    monkeypatch.setattr(converters, "verify", lambda *a, **kw: Failed())
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--check", "--weights", "int8"]) == 1
    assert "not written" in capsys.readouterr().err and not out.exists()


def test_convert_weights_refusals(tmp_path, capsys):
    src = tmp_path / "big.sgru"
    GRUModel([GRULayer(1, 2, np.full((6, 1), 7e4, np.float32), np.ones((6, 2), np.float32),
                       linear_before_reset=1)]).save(src)
    out = tmp_path / "out.sgru"
    assert main(["convert", str(src), "-o", str(out), "--weights", "float16"]) == 2
    assert ("streamgru convert: error: layers[0].W: expected values within float16's range"
            in capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), "-o", str(out), "--weights", "int4"])
    assert exc.value.code == 2
    assert "argument --weights: invalid choice: 'int4'" in capsys.readouterr().err


def test_convert_help_says_a_compact_file_is_an_approximation(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--weights {int8,float16}" in text
    assert "The file is then an approximation of SRC (its weights are quantized)" in text
    assert "--check still compares the conversion in full precision with SRC" in text
