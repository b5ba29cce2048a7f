"""The ``streamgru`` command: one small function per verb.

``streamgru info [FILE]``     describe a model file of any supported type, and the compiled
                             product tile (vector width, tile shape) of this machine
``streamgru convert SRC -o OUT.sgru [--check] [--weights int8|float16]``  import a foreign model
                             into the native format, optionally with compact weight matrices
``streamgru demo``            many simulated streams through one engine, with latency figures
``streamgru run MODEL``       the engine in a shell pipeline: events in, one output line per event
``streamgru bench [--quick]`` streamgru against onnxruntime and PyTorch: table, JSON, plot
``streamgru warmup MODEL``    compile every kernel into Numba's cache, so a new process starts at once
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "load_model_arg", "weight_table"]


def load_model_arg(path, what="model"):
    """``streamgru.load(path)``, with every failure (a foreign library's exception, an unreadable
    file) turned into one ``ValueError`` naming the file, which the command reports with exit 2."""
    from .formats import load

    try:
        return load(path)
    except Exception as exc:  # noqa: BLE001 - converters raise whatever their libraries raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not str(exc).startswith(str(path)) and not reason.startswith("path:"):
            reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise ValueError(f"{what}: expected a model file streamgru can load, got {path} "
                         f"({reason})") from None


def _info(args):
    from .isa import TILE

    if args.timing:
        from .harness.bench import format_start_times, start_times
        from .harness.demo import DEFAULT_MODEL

        path = args.file if args.file is not None else DEFAULT_MODEL
        load_model_arg(path, "file")
        print(f"kernels: {TILE.describe()}")
        print(f"start of a new process serving {path} (wall clock; one run each):")
        print(format_start_times(start_times(path)))
        return 0
    if args.file is None:
        print(f"kernels: {TILE.describe()}")
        return 0
    from .formats import _FOREIGN

    model = load_model_arg(args.file, "file")
    ext = os.path.splitext(args.file)[1].lower()
    kind = _FOREIGN.get(ext, "streamgru native") if ext != ".sgru" else "streamgru native"
    print(f"file: {args.file} ({kind}); model source: {model.source or 'unknown'}")
    print(model.summary())
    for i, layer in enumerate(model.layers):
        print(f"  layer {i}: {layer.describe()}")
    for note in model.notes:
        print(f"  note: {note}")
    print(weight_table(model))
    if model.stored_as:
        print(f"weights: stored as {model.stored_as}: quantized, so they approximate the original "
              f"model's weights; Engine(model) stores them as {model.stored_as} by default (its "
              f"weights= defaults to model.stored_as, which this file sets)")
    print(f"fingerprint: {model.fingerprint}")
    print(f"kernels: {TILE.describe()}")
    return 0


def weight_table(model):
    """The bytes of each layer's weights and the model's total, with the matrices in each storage
    form (``Model.weight_bytes``): what ``streamgru info`` prints.

    Examples
    --------
    >>> from streamgru import Model
    >>> print(weight_table(Model.random(3, 4, dense_after=[(2, "identity")])))
    weight bytes by storage form (vectors always float32; int8 includes its row scales):
                        float32    float16       int8
      [0] gru               432        264        276
      [1] dense              40         24         24
      total                 472        288        300
    """
    forms = ("float32", "float16", "int8")
    sizes = [model.weight_bytes(form) for form in forms]
    lines = ["weight bytes by storage form (vectors always float32; int8 includes its row scales):",
             f"{'':16}" + "".join(f"{form:>11}" for form in forms)]
    for i, layer in enumerate(model.layers):
        lines.append(f"  {f'[{i}] {layer.kind}':14}" + "".join(f"{s[i]:>11}" for s in sizes))
    lines.append(f"  {'total':14}" + "".join(f"{sum(s):>11}" for s in sizes))
    return "\n".join(lines)


def _convert(args):
    model = load_model_arg(args.src, "src")
    if args.check:
        import converters

        # Always the full-precision conversion against the source, with --weights too: a
        # failure here is the converter's, never the rounding's.
        report = converters.verify(model, args.src, tolerance=args.tolerance)
        print(report)
        if not report.ok:
            print(f"streamgru convert: check failed: max difference {report.max_abs_diff:.3g} "
                  f"> tolerance {report.tolerance:.3g}; {args.output} not written",
                  file=sys.stderr)
            return 1
    if args.weights is not None:
        model = model.compacted(args.weights)
        if args.check:
            import converters

            # Then how far the compact weights take the engine from the source: the weights'
            # rounding, judged against the compact default (or --weights-tolerance).
            report = converters.verify(model, args.src, weights=args.weights,
                                       tolerance=args.weights_tolerance)
            print(report)
            if not report.ok:
                print(f"streamgru convert: check of the {args.weights} weights failed: max "
                      f"difference {report.max_abs_diff:.3g} > tolerance "
                      f"{report.tolerance:.3g}; {args.output} not written", file=sys.stderr)
                return 1
    model.save(args.output)
    print(f"wrote {args.output}: {model!r}")
    if model.stored_as:
        print(f"weights stored as {model.stored_as}: quantized, an approximation of {args.src}'s "
              f"(Engine(model) uses weights={model.stored_as!r} by default)")
    return 0


def _demo(args):
    from .harness.demo import SHIPPED
    from .harness.demo import main as demo_main

    # A bad model file is a usage error (exit 2), like in every verb; a shipped model's name is
    # not a file.
    if args.model is not None and args.model not in SHIPPED:
        load_model_arg(args.model, "--model")
    return demo_main(args)


def _run(args):
    from .pipeline import main as run_main

    return run_main(args)


def _bench(args):
    from .harness.bench import run_bench

    return run_bench(args)


def _warmup(args):
    import time

    from . import kernels
    from .engine import Engine
    from .isa import TILE

    model = load_model_arg(args.model)
    where = kernels.cache_dir()
    print(f"kernels: {TILE.describe()}")
    print(f"cache: {where}" if where else
          "cache: none (NUMBA_DISABLE_JIT or STREAMGRU_TILE is set: every process compiles)")
    configs = [(dtype, None) for dtype in dict.fromkeys(args.dtype)]
    configs += [("float32", w) for w in dict.fromkeys(args.weights or ()) if w != "float32"]
    for dtype, weights in configs:
        t0 = time.perf_counter()
        eng = Engine(model, dtype=dtype, threads=args.threads, weights=weights)
        done = eng.warmup()
        seconds = time.perf_counter() - t0
        compiled = sorted(k for k, (_, c) in done.items() if c)
        loaded = sorted(k for k, (h, c) in done.items() if h and not c)
        label = dtype if eng.weights == dtype else f"{dtype} ({eng.weights} weights)"
        print(f"{label}: {seconds:.1f} s; compiled: {', '.join(compiled) or 'nothing'}; "
              f"loaded from the cache: {', '.join(loaded) or 'nothing'}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="streamgru", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a model file and the kernels' product tile")
    p.add_argument("file", nargs="?", default=None,
                   help="model file (omit it to show only the product tile in use)")
    p.add_argument("--timing", action="store_true",
                   help="time a new process's start with an empty and with a filled kernel "
                        "cache: import and load, first step, first batch, first run (FILE, or "
                        "the shipped default model; about a minute)")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="import a foreign model into the native .sgru format")
    p.add_argument("src")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--check", action="store_true",
                   help="compare against the source framework on random input; write OUT only "
                        "if the max difference is within --tolerance")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted max |engine - reference| (default 1e-4, float32)")
    p.add_argument("--weights-tolerance", type=float, default=None,
                   help="with --weights and --check: largest accepted max |engine - reference| "
                        "of the compact weights (default 1e-3 float16, 1e-2 int8)")
    p.add_argument("--weights", choices=("int8", "float16"), default=None,
                   help="write the weight matrices compactly: int8 (one float32 scale per "
                        "output row; about 4x smaller) or float16 (about 2x smaller); vectors "
                        "stay float32. The file is then an approximation of SRC (its weights "
                        "are quantized), and an Engine of it stores its weights in this form "
                        "by default. --check still compares the conversion in full precision "
                        "with SRC, before quantizing (default: full precision, or the form of "
                        "a compact .sgru SRC)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("demo", help="replay the held-out BasicMotions recordings as thousands of "
                                     "live streams, against onnxruntime")
    p.add_argument("--streams", type=int, default=4096, help="simulated devices (default 4096)")
    p.add_argument("--batch", type=int, default=256, help="events per micro-batch (default 256)")
    p.add_argument("--events", type=int, default=None,
                   help="stop after this many events (default: every recording to its end)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="wall-clock cap per contender (default 20)")
    p.add_argument("--threads", type=int, default=None,
                   help="engine (Numba) and onnxruntime intra-op threads (default: one per core)")
    p.add_argument("--model", default=None,
                   help="'gru' (default) or 'lstm': the shipped BasicMotions classifier with that "
                        "cell; or a model file")
    p.add_argument("--plot", default="default",
                   help="PNG path for the latency plot, or 'none' (default: "
                        "streamgru-demo.png in the temp directory)")
    p.add_argument("--no-ort", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--missing-rate", type=float, default=0.1,
                   help="fraction of the held-out sensor values dropped at random for the "
                        "accuracy under each missing-value policy (default 0.1; 0: skip it)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="step a model over events from stdin or a file (JSON lines or "
                                    "CSV), one output line per event")
    from .pipeline import add_arguments

    add_arguments(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("bench", help="time streamgru against onnxruntime and PyTorch on the "
                                      "standard workloads; print a table, write JSON and a plot")
    from .harness.bench import add_arguments as bench_arguments

    bench_arguments(p)
    p.set_defaults(func=_bench)

    help_ = ("compile every kernel a model's engines can call into Numba's on-disk cache, so "
             "that a new process on this kind of CPU compiles nothing (run it at image build or "
             "first start; the cache is $NUMBA_CACHE_DIR if set, else __pycache__ next to "
             "streamgru/kernels.py if writable, else the user's cache directory: see "
             "docs/operations.md, Cold start)")
    p = sub.add_parser("warmup", help=help_, description=help_)
    p.add_argument("model", help="model file (the kernels depend on the dtype and the weights "
                                 "form, not on the model's sizes)")
    p.add_argument("--dtype", nargs="+", choices=("float32", "float64"), default=["float32"],
                   help="engine dtype(s) to prepare (default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="Numba threads of the engine (default: Numba's own setting); the "
                        "kernels of every thread count are prepared either way")
    p.add_argument("--weights", nargs="+", choices=("float32", "float16", "int8"), default=None,
                   help="also prepare float32 engines storing their weights in these forms "
                        "(each form has kernels of its own; a compact model file's form is "
                        "prepared by --dtype float32 already)")
    p.set_defaults(func=_warmup)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as exc:
        print(f"streamgru {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output left (`streamgru info FILE | head`): stop without a
        # traceback, as other command-line tools do. Python flushes stdout again at exit, so
        # point it at devnull first (the Python docs' "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
