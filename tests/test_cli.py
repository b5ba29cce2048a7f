"""The streamgru command line, through a real subprocess where it matters."""

import contextlib
import io
import json
import os
import pathlib
import sys
import tempfile
import warnings

import background
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


# ---------------------------------------------------------------------------- warmup

# Routes every kernel of the engine is built with: the fast path and the batch and run kernels
# of both thread settings (the thresholds set to 0 send small calls to the wide kernels), and
# the int-key table. It prints {kernel: (loaded from the cache, compiled)}.
_FIRST_CALLS = """
import json, sys
import numpy as np
import streamgru
from streamgru import engine as engine_mod, kernels
m = streamgru.load(sys.argv[1])
for threads in (1, 2):
    e = streamgru.Engine(m, threads=threads)
    x = np.ones((1, m.input_size), np.float32)
    e.step(["a"], x)  # opens "a" (the general path)
    e.step(["a"], x)  # the one-event path
    e.step([f"k{i}" for i in range(100)], np.ones((100, m.input_size), np.float32))
    e.run("a", np.ones((7, m.input_size), np.float32))
    engine_mod.WIDE_MIN_MACS = engine_mod.RUN_WIDE_MIN_MACS = 0
    e.step(["a", "b", "c"], np.ones((3, m.input_size), np.float32))
    e.run("a", np.ones((7, m.input_size), np.float32))
    engine_mod.WIDE_MIN_MACS, engine_mod.RUN_WIDE_MIN_MACS = 350_000, 150_000
    ints = streamgru.Engine(m, threads=threads)
    keys = np.arange(100, dtype=np.int64)
    ints.step(keys, np.ones((100, m.input_size), np.float32))
    ints.step(keys, np.ones((100, m.input_size), np.float32))
    ints.close(5)
print(json.dumps(kernels.cache_counts()))
"""


@background.job("warmup")
def _warmup_then_first_calls():
    """``streamgru warmup`` into an empty cache directory, then the first calls in a new process:
    (warmup's CompletedProcess, the new process's), or the reason to skip."""
    from streamgru.isa import TILE

    if TILE.forced:
        return "STREAMGRU_TILE is set: kernels are not cached"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.sgru"
        GRUModel.random(3, [5], dense_after=[(2, "softmax")], seed=1).save(path)
        cache = pathlib.Path(tmp) / "cache"
        env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="2")
        warm = background.run([sys.executable, "-m", "streamgru.cli", "warmup", str(path)],
                              env=env, timeout=900)
        first = background.run([sys.executable, "-c", _FIRST_CALLS, str(path)], env=env,
                               timeout=900)
        return warm, first, cache


@pytest.mark.background("warmup")
@pytest.mark.slow
def test_warmup_leaves_nothing_to_compile_for_a_new_process():
    """After ``streamgru warmup`` in a process with an empty cache directory, a new process's
    first step, batch and run, on every route and both thread settings, compile nothing: every
    kernel is loaded from the cache. The one test that compiles every kernel from scratch (tens
    of seconds, run beside the suite: tests/background.py): counting compilations instead of
    timing them makes it exact."""
    got = background.result("warmup")
    if isinstance(got, str):
        pytest.skip(got)
    warm, first, cache = got
    assert warm.returncode == 0, warm.stderr
    assert f"cache: {cache}" in warm.stdout and "compiled: " in warm.stdout
    assert "step_one" in warm.stdout
    assert first.returncode == 0, first.stderr
    counts = json.loads(first.stdout.strip().splitlines()[-1])
    assert {k: c for k, (_, c) in counts.items() if c} == {}  # nothing compiled
    used = ("step_one", "step_serial", "step_parallel", "step_wide", "run_sequence",
            "run_sequence_wide", "table_lookup", "table_insert", "table_delete")
    assert all(counts[k][0] >= 1 for k in used), counts  # each loaded from the cache


def test_warmup_help_and_bad_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["warmup", "--help"])
    assert exc.value.code == 0
    assert "NUMBA_CACHE_DIR" in capsys.readouterr().out
    assert main(["warmup", str(tmp_path / "missing.sgru")]) == 2
    assert "streamgru warmup: error: model:" in capsys.readouterr().err
