"""How far compact weights (float16, int8) take the engine from float32: measured, not assumed.

Two measurements, each printed as a table (the README's "Compact weights" section quotes them):

1. The shipped models (BasicMotions GRU and LSTM): held-out accuracy at sequence end for each
   weights form, every recording replayed through ``Engine.run``, and the largest difference of
   any output (class probabilities, every step of every recording) from the float32 engine's.
2. Random models (PyTorch's initialisation, ``Model.random``), one or two layers of GRU or LSTM
   at H = 64..512 with a Dense head: 8 streams from zero state, 1,000 steps of N(0, 1) input,
   the largest |output - float32 engine's output| over all steps, and at the last step, so the
   growth of the error through the recurrence shows.

Everything here is the engine against itself in float32 (the float32 engine is checked against
the float64 oracle and the frameworks in tests/); the compact engines are checked against the
oracle on their dequantized weights in tests/test_compact.py and tests/test_tiles.py.

Run::

    .venv/bin/python benchmarks/compact_accuracy.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from streamgru import Engine, Model  # noqa: E402
from streamgru.harness.demo import SHIPPED, load_default  # noqa: E402

FORMS = ("float32", "float16", "int8")


def shipped(forms=FORMS):
    """{model name: {form: (held-out accuracy, max |output - float32 output|)}}."""
    out = {}
    for name in SHIPPED:
        d = load_default(name)
        ys = {}
        for form in forms:
            eng = Engine(d.model, weights=form)
            ys[form] = np.stack([eng.run(i, d.x[i]) for i in range(len(d.x))])  # (R, T, O)
        out[name] = {form: (float(np.mean(ys[form][:, -1].argmax(axis=1) == d.y)),
                            float(np.abs(ys[form] - ys["float32"]).max())) for form in forms}
    return out


def random_models(sizes=(64, 128, 256, 512), steps=1000, streams=8, forms=FORMS):
    """{(cell, H, layers): {form: (max error over all steps, max error at the last step)}}."""
    out = {}
    for cell in ("gru", "lstm"):
        for H in sizes:
            layers = 2 if H <= 128 else 1
            model = Model.random(16, [H] * layers, cell=cell, dense_after=[(8, "identity")],
                                 seed=H)
            xs = np.random.default_rng(H).normal(size=(steps, streams, 16)).astype(np.float32)
            keys = list(range(streams))
            ys = {}
            for form in forms:
                eng = Engine(model, weights=form)
                ys[form] = np.stack([eng.step(keys, xs[t]) for t in range(steps)])
            out[(cell, H, layers)] = {
                form: (float(np.abs(ys[form] - ys["float32"]).max()),
                       float(np.abs(ys[form][-1] - ys["float32"][-1]).max())) for form in forms}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args(argv)
    print("shipped models: held-out accuracy at sequence end | max |output - float32| over the "
          "replay")
    for name, res in shipped().items():
        print(f"  {name:5} " + "  ".join(f"{f}: {a:.4f} | {e:.2g}" for f, (a, e) in res.items()))
    print(f"random models, 8 streams x {args.steps} steps from zero state: max |output - "
          f"float32| over all steps / at the last step")
    for (cell, H, layers), res in random_models(steps=args.steps).items():
        print(f"  {cell:4} H={H:<4} x{layers} " + "  ".join(
            f"{f}: {a:.2g} / {b:.2g}" for f, (a, b) in res.items() if f != "float32"))


if __name__ == "__main__":
    main()
