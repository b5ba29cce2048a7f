"""Train streamgru's default model: a per-step activity classifier on BasicMotions.

What it makes (the files shipped in ``streamgru/data/``)
--------------------------------------------------------
* ``basic_motions_gru.sgru``: GRU(6->64) -> GRU(64->64) -> Dense(64->4, softmax), converted from
  the trained PyTorch model by streamgru's own converter (``converters.from_torch``). At every
  time step (one smart-watch sample, 10 Hz) it outputs the probabilities of the four activities
  Standing, Running, Walking, Badminton, given everything the stream has seen so far.
* ``basic_motions_heldout.npz``: the held-out split (the archive's 40 TEST sequences, never seen
  in training): ``x`` (40, 100, 6) float32 raw sensor values, ``y`` (40,) int64 class index,
  ``classes`` (4,) str.
* ``basic_motions_gru.json``: the training record: the PyTorch model's held-out accuracy at
  sequence end (what ``streamgru demo`` must reproduce), accuracy after k steps, seed, versions,
  hyper-parameters, SHA-256 of the source files, runtime.

The data
--------
BasicMotions (UEA multivariate time series classification archive; Bagnall et al. 2018,
arXiv:1811.00075): 80 recordings of 10 s at 10 Hz from a smart watch's 3-D accelerometer and
3-D gyroscope, four activities, the archive's fixed 40/40 train/test split. It is read from the
files that the ``aeon`` wheel ships (``aeon/datasets/data/BasicMotions/*.ts``), located without
importing aeon, so aeon's own dependencies are not needed: ``pip install --no-deps aeon==1.6.0``.
Licence notes: ``streamgru/data/DATA_LICENSE``.

The input scaling is folded into the first GRU layer's input weights and bias after training
(``W' = W / s``, ``b' = b - W m / s`` with the training set's per-channel mean ``m`` and standard
deviation ``s``), so the shipped model takes raw sensor values.

Run (from the repository root, torch 2.13.0 CPU)::

    pip install --no-deps aeon==1.6.0        # or put it on PYTHONPATH: pip install --target DIR
    python examples/train_default_model.py   # ~1 minute on one core of the 2-core dev machine

Seeded and single-threaded: a rerun with the same versions writes the same weights (the GRU's
on every host tried; the LSTM's only on the same kind of CPU: docs/default-model.md).

The LSTM model (``--cell lstm``)
--------------------------------
The same data, split, augmentation, loss, optimiser, seed and input folding train
LSTM(6->32) -> LSTM(32->32) -> Dense(32->4, softmax) (``LSTM_HIDDEN``, ``LSTM_LAYERS``). It
writes ``basic_motions_lstm.sgru`` (the conversion by ``converters.from_torch``, checked on the
engine as the GRU's is), ``basic_motions_lstm.safetensors`` (the PyTorch ``state_dict``:
``lstm.weight_ih_l{k}``, ``lstm.weight_hh_l{k}``, ``lstm.bias_ih_l{k}``, ``lstm.bias_hh_l{k}``,
``head.0.weight``, ``head.0.bias``, float32, input scaling folded into layer 0) and
``basic_motions_lstm.json`` (the training record: PyTorch's and the engine's held-out accuracy
and the weights' SHA-256). It does not rewrite
the GRU's files or the held-out split. ``tests/test_oracle.py`` checks that the float64 oracle
reproduces PyTorch's held-out accuracy from the shipped weights::

    python examples/train_default_model.py --cell lstm
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CLASSES = ("Standing", "Running", "Walking", "Badminton")  # the .ts files' @classLabel order
# The files this model was trained on (aeon 1.6.0); a different file changes the shipped model.
SHA256 = {
    "BasicMotions_TRAIN.ts": "8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6",
    "BasicMotions_TEST.ts": "79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc",
}
STEM = "basic_motions_gru"
HIDDEN = 64
LAYERS = 2
LSTM_STEM = "basic_motions_lstm"
LSTM_HIDDEN = 32
LSTM_LAYERS = 2


def find_basic_motions():
    """The directory holding aeon's BasicMotions files, found without importing aeon."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("aeon is not installed: pip install --no-deps aeon==1.6.0 (only its data files "
                 "are read)")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "BasicMotions"
    if not d.is_dir():
        sys.exit(f"{d}: expected aeon's BasicMotions data directory; install aeon==1.6.0")
    return d


def read_ts(path):
    """Parse an equal-length multivariate ``.ts`` file -> x (n, T, C) float32, y (n,) int64.

    Format: ``#`` comments, ``@`` header lines, then after ``@data`` one case per line: the C
    channels separated by ``:``, each a comma-separated series, then ``:label``.
    """
    xs, ys, in_data = [], [], False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.lower().startswith("@classlabel"):
                labels = tuple(line.split()[2:])
                if labels != CLASSES:
                    sys.exit(f"{path}: expected classes {CLASSES}, got {labels}")
            in_data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        xs.append([[float(v) for v in ch.split(",")] for ch in channels])
        ys.append(CLASSES.index(label))
    x = np.asarray(xs, dtype=np.float32).transpose(0, 2, 1)  # (n, C, T) -> (n, T, C)
    return np.ascontiguousarray(x), np.asarray(ys, dtype=np.int64)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_torch(torch, cell="gru"):
    """The untrained network for ``cell`` ("gru" or "lstm"); ``net.rnn`` is its recurrent stack."""
    nn = torch.nn

    class ActivityGRU(nn.Module):
        """GRU stack + per-step softmax head. ``forward`` returns logits (n, T, 4)."""

        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(6, HIDDEN, num_layers=LAYERS, batch_first=True)
            # An nn.Sequential so that from_torch sees the softmax (see converters.from_torch).
            self.head = nn.Sequential(nn.Linear(HIDDEN, len(CLASSES)), nn.Softmax(dim=-1))

        @property
        def rnn(self):
            return self.gru

        def forward(self, x):
            return self.head[0](self.gru(x)[0])

    class ActivityLSTM(nn.Module):
        """LSTM stack + per-step softmax head. ``forward`` returns logits (n, T, 4)."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, LSTM_HIDDEN, num_layers=LSTM_LAYERS, batch_first=True)
            self.head = nn.Sequential(nn.Linear(LSTM_HIDDEN, len(CLASSES)), nn.Softmax(dim=-1))

        @property
        def rnn(self):
            return self.lstm

        def forward(self, x):
            return self.head[0](self.lstm(x)[0])

    return ActivityGRU() if cell == "gru" else ActivityLSTM()


def step_weights(T, torch):
    # Early steps have seen too little to be judged: ramp the per-step loss weight up over 2 s.
    return torch.clamp(torch.arange(1, T + 1, dtype=torch.float32) / 20.0, max=1.0)


def train(net, x, y, torch, epochs, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n, T, _ = x.shape
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        net.train()
        # Augmentation: a random contiguous crop (a device may be switched on mid-activity),
        # per-sequence gain and additive noise (in normalised units).
        length = int(torch.randint(40, T + 1, (1,), generator=g))
        start = torch.randint(0, T - length + 1, (n,), generator=g)
        idx = start[:, None] + torch.arange(length)[None, :]
        xb = xt[torch.arange(n)[:, None], idx]
        xb = xb * (1 + 0.1 * torch.randn(n, 1, x.shape[2], generator=g)) \
            + 0.05 * torch.randn(xb.shape, generator=g)
        logits = net(xb)
        w = step_weights(length, torch)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), yt.repeat_interleave(length), reduction="none"
        ).reshape(n, length)
        loss = (loss * w).sum() / (w.sum() * n)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if (epoch + 1) % 100 == 0:
            print(f"  epoch {epoch + 1:4d}  loss {loss.item():.4f}", flush=True)


def fold_scaling(net, mean, std, torch):
    """Make the network take raw inputs: fold ``(x - mean) / std`` into layer 0's W_ih, b_ih
    (every gate block alike, so it holds for the GRU's and the LSTM's layouts)."""
    with torch.no_grad():
        W = net.rnn.weight_ih_l0.double()
        b = net.rnn.bias_ih_l0.double()
        m = torch.from_numpy(mean.astype(np.float64))
        s = torch.from_numpy(std.astype(np.float64))
        net.rnn.weight_ih_l0.copy_((W / s).float())
        net.rnn.bias_ih_l0.copy_((b - (W / s) @ m).float())


def save_lstm(net, model, out, *, evaluation, data, training, versions, t_start):
    """Write the LSTM's weights (safetensors, the PyTorch ``state_dict``), its conversion
    ``model`` (.sgru) and the training record; ``evaluation``, ``data``, ``training``,
    ``versions`` are the record's sections shared with the GRU's. tests/test_oracle.py checks the
    shipped weights against the float64 oracle, tests/test_demo.py the .sgru."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v.detach().numpy(), dtype=np.float32)
               for k, v in net.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{LSTM_STEM}.safetensors"
    save_file(tensors, path, metadata={"script": "examples/train_default_model.py --cell lstm"})
    model.save(out / f"{LSTM_STEM}.sgru")
    runtime = time.perf_counter() - t_start
    record = {
        "model_file": path.name,
        "weights_sha256": sha256(path),
        "format": "PyTorch state_dict (nn.LSTM 'lstm.*' batch_first, nn.Linear 'head.0.*'), "
                  f"float32; {LSTM_STEM}.sgru is its conversion by converters.from_torch",
        "sgru_fingerprint": model.fingerprint,
        "task": "per-step activity classification (probabilities of the 4 classes at every step)",
        "classes": list(CLASSES),
        "architecture": f"LSTM(6->{LSTM_HIDDEN}) x{LSTM_LAYERS}, Dense({LSTM_HIDDEN}->4, softmax); "
                        f"raw inputs",
        "hyper_parameters": {"hidden_size": LSTM_HIDDEN, "num_layers": LSTM_LAYERS},
        "data": data,
        **evaluation,
        "training": {**training, "runtime_s": round(runtime, 1)},
        "versions": versions,
        "script": "examples/train_default_model.py --cell lstm",
    }
    (out / f"{LSTM_STEM}.json").write_text(json.dumps(record, indent=2) + "\n")
    acc = evaluation["heldout_accuracy_at_sequence_end"]
    print(f"held-out accuracy at sequence end: torch {acc['torch']:.4f}, streamgru "
          f"{acc['streamgru']:.4f}; after k steps (torch): "
          f"{evaluation['heldout_accuracy_after_k_steps_torch']}; max |streamgru - torch|: "
          f"{evaluation['max_abs_diff_torch_vs_streamgru_float32']:.2e}; smallest top-2 margin "
          f"at the end: {evaluation['min_top2_margin_at_end']:.3f}")
    print(f"wrote {path} ({path.stat().st_size} bytes), {LSTM_STEM}.sgru, {LSTM_STEM}.json in "
          f"{runtime:.0f} s")
    if acc["streamgru"] != acc["torch"]:
        print("error: streamgru's accuracy differs from torch's", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "streamgru" / "data")
    ap.add_argument("--cell", choices=("gru", "lstm"), default="gru",
                    help="gru: the default model; lstm: the LSTM model (.sgru and safetensors)")
    args = ap.parse_args(argv)

    import torch

    import converters
    import streamgru

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    src = find_basic_motions()
    files = {name: src / name for name in SHA256}
    digests = {name: sha256(p) for name, p in files.items()}
    for name, d in digests.items():
        if d != SHA256[name]:
            print(f"warning: {files[name]}: SHA-256 {d} differs from the pinned {SHA256[name]}; "
                  f"the model will differ from the shipped one", file=sys.stderr)
    x_train, y_train = read_ts(files["BasicMotions_TRAIN.ts"])
    x_test, y_test = read_ts(files["BasicMotions_TEST.ts"])
    print(f"data: train {x_train.shape}, held-out {x_test.shape}, from {src}")

    mean = x_train.reshape(-1, 6).mean(axis=0)
    std = x_train.reshape(-1, 6).std(axis=0) + 1e-3
    net = build_torch(torch, args.cell)
    train(net, (x_train - mean) / std, y_train, torch, args.epochs, args.seed)
    net.eval()
    fold_scaling(net, mean, std, torch)

    # The reference: PyTorch on raw inputs, probability at every step.
    with torch.no_grad():
        prob = net.head(net.rnn(torch.from_numpy(x_test))[0]).numpy()
    pred = prob.argmax(axis=-1)  # (40, 100)
    torch_acc = float((pred[:, -1] == y_test).mean())
    top2 = np.sort(prob[:, -1], axis=-1)[:, -2:]
    min_margin = float((top2[:, 1] - top2[:, 0]).min())
    acc_after = {str(k): float((pred[:, k - 1] == y_test).mean()) for k in (10, 20, 50, 100)}
    data = {
        "name": "BasicMotions (UEA multivariate TSC archive, Bagnall et al. 2018)",
        "source": "aeon 1.6.0 wheel: aeon/datasets/data/BasicMotions/",
        "sha256": digests,
        "train": list(x_train.shape), "heldout": list(x_test.shape),
        "heldout_file": "basic_motions_heldout.npz",
    }
    training = {"seed": args.seed, "epochs": args.epochs, "optimizer": "Adam lr 3e-3, cosine",
                "augmentation": "random crops of 40..100 steps, gain 10%, noise 0.05",
                "threads": 1}
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "streamgru": streamgru.__version__}
    # The engine on the converted model, float32, over the same held-out sequences.
    model = converters.from_torch(net)
    engine = streamgru.Engine(model)
    out = np.stack([engine.run(i, x_test[i]) for i in range(len(x_test))])
    engine_acc = float((out[:, -1].argmax(axis=-1) == y_test).mean())
    max_diff = float(np.abs(out - prob).max())
    if args.cell == "lstm":
        evaluation = {"heldout_accuracy_at_sequence_end": {"torch": torch_acc,
                                                           "streamgru": engine_acc,
                                                           "n": len(y_test)},
                      "heldout_accuracy_after_k_steps_torch": acc_after,
                      "min_top2_margin_at_end": min_margin,
                      "max_abs_diff_torch_vs_streamgru_float32": max_diff}
        return save_lstm(net, model, args.out, evaluation=evaluation, data=data,
                         training=training, versions=versions, t_start=t_start)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / f"{STEM}.sgru")
    np.savez_compressed(args.out / "basic_motions_heldout.npz", x=x_test, y=y_test,
                        classes=np.array(CLASSES))
    runtime = time.perf_counter() - t_start
    record = {
        "model_file": f"{STEM}.sgru",
        "fingerprint": model.fingerprint,
        "task": "per-step activity classification (probabilities of the 4 classes at every step)",
        "classes": list(CLASSES),
        "architecture": f"GRU(6->{HIDDEN}) x{LAYERS}, Dense({HIDDEN}->4, softmax); raw inputs",
        "data": data,
        "heldout_accuracy_at_sequence_end": {"torch": torch_acc, "streamgru": engine_acc,
                                             "n": len(y_test)},
        "heldout_accuracy_after_k_steps_torch": acc_after,
        "min_top2_margin_at_end": min_margin,
        "max_abs_diff_torch_vs_streamgru_float32": max_diff,
        "training": {**training, "runtime_s": round(runtime, 1)},
        "versions": versions,
        "script": "examples/train_default_model.py",
    }
    (args.out / f"{STEM}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"held-out accuracy at sequence end: torch {torch_acc:.4f}, streamgru {engine_acc:.4f} "
          f"(n={len(y_test)}); after k steps (torch): {acc_after}")
    print(f"max |streamgru - torch| over all held-out steps: {max_diff:.2e}; smallest top-2 "
          f"margin at the end: {min_margin:.3f}")
    print(f"wrote {args.out / (STEM + '.sgru')} ({(args.out / (STEM + '.sgru')).stat().st_size} "
          f"bytes), basic_motions_heldout.npz, {STEM}.json in {runtime:.0f} s")
    if engine_acc != torch_acc:
        print("error: streamgru's accuracy differs from torch's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
