"""The ``streamgru`` command: one small function per verb.

``streamgru info FILE``       describe a model file of any supported type
``streamgru convert SRC -o OUT.sgru [--check]``  import a foreign model into the native format
``streamgru demo``            many simulated streams through one engine, with latency figures
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

__all__ = ["main"]


def _info(args):
    from .formats import load

    model = load(args.file)
    print(model.summary())
    for i, layer in enumerate(model.layers):
        if layer.kind == "gru":
            clip = "off" if layer.clip is None else layer.clip
            print(f"  layer {i}: gru  linear_before_reset={layer.linear_before_reset} "
                  f"f={_act(layer.f)} g={_act(layer.g)} clip={clip}")
        else:
            print(f"  layer {i}: dense activation={_act(layer.activation)}")
    print(f"fingerprint: {model.fingerprint}")
    return 0


def _act(a):
    name, alpha, beta = a
    return name if (alpha, beta) == (0.0, 0.0) else f"{name}(alpha={alpha:g}, beta={beta:g})"


def _convert(args):
    from .formats import load

    model = load(args.src)
    model.save(args.output)
    print(f"wrote {args.output}: {model!r}")
    if args.check:
        import converters

        verify = getattr(converters, "verify", None)
        if verify is None:
            print("--check: not available in this version", file=sys.stderr)
            return 2
        report = verify(model, args.src)
        print(report)
        return 0 if report.ok else 1
    return 0


def _demo(args):
    from . import Engine, GRUModel

    model = GRUModel.random(args.input_size, [args.hidden_size] * args.layers,
                            dense_after=[(4, "softmax")], seed=0)
    engine = Engine(model, threads=args.threads)
    rng = np.random.default_rng(0)
    keys = np.arange(args.streams)
    x = rng.normal(size=(args.batch, args.input_size)).astype(np.float32)
    engine.step(keys[:args.batch], x)  # compile / warm up outside the timing
    lat, events, t_end = [], 0, time.perf_counter() + args.seconds
    while time.perf_counter() < t_end:
        batch = rng.choice(keys, size=args.batch)  # bursts: a stream may appear twice
        t0 = time.perf_counter()
        engine.step(batch, x)
        lat.append(time.perf_counter() - t0)
        events += args.batch
    lat_us = np.array(lat) * 1e6
    print(f"model: {model!r}")
    print(f"{'streams':>10} {'events':>10} {'events/s':>12} {'p50 us':>10} {'p99 us':>10}")
    print(f"{len(engine):>10} {events:>10} {events / lat_us.sum() * 1e6:>12.0f} "
          f"{np.percentile(lat_us, 50):>10.1f} {np.percentile(lat_us, 99):>10.1f}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="streamgru", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a model file")
    p.add_argument("file")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="import a foreign model into the native .sgru format")
    p.add_argument("src")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--check", action="store_true",
                   help="compare against the source framework on random input")
    p.set_defaults(func=_convert)

    p = sub.add_parser("demo", help="step many simulated streams and report latency")
    p.add_argument("--streams", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--input-size", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as exc:
        print(f"streamgru {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
