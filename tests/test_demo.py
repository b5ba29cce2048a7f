"""The shipped models (the default GRU and the LSTM), the demo workload and the onnxruntime
contender.

References: PyTorch, from the weights it was trained to (the LSTM's safetensors file) or rebuilt
from the shipped GRU's weights, and the accuracies recorded at training.
"""

import hashlib
import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest

from streamgru.harness.demo import (
    DATA_DIR,
    DEFAULT_MODEL,
    SHIPPED,
    load_default,
    make_workload,
    run_demo,
)

torch = pytest.importorskip("torch")
ROOT = DATA_DIR.parents[1]
LSTM_WEIGHTS = DATA_DIR / "basic_motions_lstm.safetensors"


def torch_from_shipped(model):
    """nn.GRU stack + Linear + softmax with the shipped weights (canonical z,r,n -> torch r,z,n)."""
    grus = [ly for ly in model.layers if ly.kind == "gru"]
    (head,) = [ly for ly in model.layers if ly.kind == "dense"]
    assert [ly.kind for ly in model.layers] == ["gru"] * len(grus) + ["dense"]
    assert head.activation[0] == "softmax" and all(g.linear_before_reset == 1 for g in grus)
    H = grus[0].hidden_size
    gru = torch.nn.GRU(model.input_size, H, num_layers=len(grus), batch_first=True)

    def rz(a):  # rows [z; r; n] -> [r; z; n]
        return torch.from_numpy(np.concatenate([a[H:2 * H], a[:H], a[2 * H:]]).astype(np.float32))

    with torch.no_grad():
        for k, g in enumerate(grus):
            getattr(gru, f"weight_ih_l{k}").copy_(rz(g.W))
            getattr(gru, f"weight_hh_l{k}").copy_(rz(g.R))
            getattr(gru, f"bias_ih_l{k}").copy_(rz(g.Wb))
            getattr(gru, f"bias_hh_l{k}").copy_(rz(g.Rb))
    lin = torch.nn.Linear(H, head.output_size)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(head.W.astype(np.float32)))
        lin.bias.copy_(torch.from_numpy(head.b.astype(np.float32)))
    return lambda x: torch.softmax(lin(gru(torch.from_numpy(x))[0]), dim=-1).numpy()


def torch_lstm_as_trained(record):
    """nn.LSTM stack + Linear + softmax loaded from the weights torch trained (the safetensors
    state_dict, PyTorch's own layout): the LSTM's reference owes nothing to our converter."""
    from safetensors.torch import load_file

    weights = load_file(LSTM_WEIGHTS)
    hp = record["hyper_parameters"]
    lstm = torch.nn.LSTM(6, hp["hidden_size"], num_layers=hp["num_layers"], batch_first=True)
    lin = torch.nn.Linear(hp["hidden_size"], 4)
    lstm.load_state_dict({k[len("lstm."):]: v for k, v in weights.items() if k.startswith("lstm.")})
    lin.load_state_dict({k[len("head.0."):]: v for k, v in weights.items()
                         if k.startswith("head.0.")})
    return lambda x: torch.softmax(lin(lstm(torch.from_numpy(x))[0]), dim=-1).numpy()


def torch_reference(d):
    """PyTorch's step-by-step probabilities for a shipped model: x (n, T, 6) -> (n, T, 4)."""
    return torch_lstm_as_trained(d.record) if d.name == "lstm" else torch_from_shipped(d.model)


@pytest.fixture(scope="module", params=list(SHIPPED))
def default(request):
    return load_default(request.param)


@pytest.fixture(scope="module")
def torch_prob(default):
    with torch.no_grad():
        return torch_reference(default)(default.x)  # (40, 100, 4)


def test_shipped_files(default):
    assert default.path.stat().st_size < 1_000_000
    assert (DATA_DIR / "DATA_LICENSE").read_text().count("BSD 3-Clause") >= 1
    assert default.x.shape == (40, 100, 6) and default.x.dtype == np.float32
    assert sorted(np.unique(default.y).tolist()) == [0, 1, 2, 3]
    assert [ly.kind for ly in default.model.layers] == [default.name] * 2 + ["dense"]
    assert default.model.layers[-1].activation[0] == "softmax"
    if default.name == "gru":
        assert default.path == DEFAULT_MODEL
        assert default.record["fingerprint"] == default.model.fingerprint
    else:  # the record names the weights torch trained; the .sgru is converted from them
        assert hashlib.sha256(LSTM_WEIGHTS.read_bytes()).hexdigest() == \
            default.record["weights_sha256"]


def test_shipped_lstm_is_the_documented_conversion_of_the_trained_weights():
    """docs/default-model.md: from_torch of the training script's module holding the safetensors
    weights gives the shipped .sgru (same fingerprint: same tensors, softmax head included)."""
    from safetensors.torch import load_file

    import converters

    spec = importlib.util.spec_from_file_location("train_default_model",
                                                  ROOT / "examples" / "train_default_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    net = script.build_torch(torch, "lstm")
    net.load_state_dict(load_file(LSTM_WEIGHTS))
    assert converters.from_torch(net).fingerprint == load_default("lstm").model.fingerprint


def test_torch_accuracy_equals_the_recorded_one(default, torch_prob):
    acc = (torch_prob[:, -1].argmax(-1) == default.y).mean()
    assert acc == default.reference_accuracy
    for k, recorded in default.record["heldout_accuracy_after_k_steps_torch"].items():
        assert (torch_prob[:, int(k) - 1].argmax(-1) == default.y).mean() == recorded


def test_demo_accuracy_equals_torch_and_every_step_matches(default, torch_prob):
    # The demo's own path: interleaved devices, micro-batches with repeated keys, both contenders.
    r = run_demo(streams=120, batch=64, plot=None, out=io.StringIO(), missing_rate=0,
                 model=default.name)
    torch_acc = float((torch_prob[:, -1].argmax(-1) == default.y).mean())
    assert torch_acc == default.record["heldout_accuracy_at_sequence_end"]["torch"]
    assert r.accuracy == {"streamgru": torch_acc, "onnxruntime": torch_acc}
    assert r.reference_accuracy == torch_acc
    for c in r.contenders:
        assert c.events == 120 * 100 and c.done.all() and not c.note
        # Each device's final output is its recording's last-step probabilities.
        np.testing.assert_allclose(c.final, torch_prob[np.arange(120) % 40, -1], atol=2e-5, rtol=0)


def test_workload_replays_each_recording_in_order():
    x = np.arange(3 * 7 * 2, dtype=np.float32).reshape(3, 7, 2)
    w = make_workload(x, streams=10, seed=1)
    assert w.keys.size == 70 and w.last.sum() == 10
    for d in range(10):
        rows = w.x[w.keys == d]
        np.testing.assert_array_equal(rows, x[d % 3])
        assert w.last[np.flatnonzero(w.keys == d)[-1]]
    # Interleaved: some device's events are not one contiguous run.
    assert any(np.diff(np.flatnonzero(w.keys == d)).max() > 1 for d in range(10))


def test_demo_command_runs_the_lstm_model(capsys):
    """`streamgru demo --model lstm`: the shipped LSTM, its layers and the kernels printed, its
    accuracy found equal to the recorded PyTorch one (the onnxruntime and missing-value runs are
    the same code as the GRU's, covered above and below)."""
    from streamgru.cli import main
    from streamgru.isa import TILE

    assert main(["demo", "--model", "lstm", "--streams", "80", "--batch", "32", "--no-ort",
                 "--plot", "none", "--missing-rate", "0"]) == 0
    out = capsys.readouterr().out
    for word in ("basic_motions_lstm.sgru: LSTM(6->32), LSTM(32->32), Dense(4, softmax)",
                 f"kernels   {TILE.describe()}", "PyTorch (recorded at training) 1.0000: equal"):
        assert word in out
    # The same weights as a file are the same model: the recorded accuracy still applies.
    r = run_demo(streams=40, batch=32, ort=False, plot=None, out=io.StringIO(), missing_rate=0,
                 model=str(DATA_DIR / SHIPPED["lstm"][0]))
    assert r.reference_accuracy == load_default("lstm").reference_accuracy
    assert r.accuracy["streamgru"] == r.reference_accuracy


def test_load_default_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"^name: expected one of 'gru', 'lstm', got 'rnn'$"):
        load_default("rnn")


@pytest.mark.slow
def test_demo_command_prints_the_table_and_writes_the_plot(tmp_path):
    png = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "streamgru.cli", "demo", "--streams", "200",
                        "--batch", "64", "--plot", str(png)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    from streamgru.isa import TILE

    for word in ("events/s", "p50 us", "p99 us", "onnxruntime", "speed-up", ": equal",
                 "missing   10% of the held-out sensor values dropped at random (seed 0)",
                 "accuracy at sequence end by policy: skip ",
                 f"plot      {png}", f"kernels   {TILE.describe()}"):
        assert word in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_with_dropped_values_equals_torch_applying_each_policy(default):
    """The demo's per-policy numbers, against PyTorch on the inputs each policy stands for: the
    outputs at each recording's end, and the accuracies printed."""
    from converters.verify import reference_inputs
    from streamgru.harness.demo import drop_readings, missing_accuracy, replay_with_missing

    got = missing_accuracy(default.model, default.x, default.y, rate=0.1, seed=0, batch=64)
    x = drop_readings(default.x, 0.1, seed=0)
    dropped = np.isnan(x)
    assert 0.09 < dropped.mean() < 0.11
    prob = torch_reference(default)
    want = {}
    for policy in ("skip", "zero", "last"):
        ref, src = reference_inputs(np.where(dropped, 0.0, x).astype(np.float64), dropped, policy)
        assert (src[:, -1] >= 0).all()  # every recording has a complete step to end on
        with torch.no_grad():
            p = prob(ref.astype(np.float32))[np.arange(40), src[:, -1]]  # (40, 4)
        final = replay_with_missing(default.model, default.x, policy, rate=0.1, seed=0, batch=64)
        np.testing.assert_allclose(final, p, atol=2e-5, rtol=0, err_msg=policy)
        want[policy] = float((p.argmax(-1) == default.y).mean())
    assert got == want
