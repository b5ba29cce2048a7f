"""Check a converted model against its source, step by step: ``converters.verify(model, source)``.

What is run as the reference depends on the source:

=========================================  ===================================================
source                                     reference
=========================================  ===================================================
``.onnx`` file or ``onnx.ModelProto``      onnxruntime runs the graph over the whole sequence
                                           (float32: onnxruntime has no float64 GRU or LSTM
                                           kernel)
``nn.GRU``, ``nn.GRUCell``, ``nn.LSTM``,   the module itself, in torch
``nn.LSTMCell``
``nn.Module`` with ``forward(x, state)     the module itself, one call per step from the
-> (y, state_out)`` (what                  random states (``x`` (batch, input_size), ``state``
``converters.to_torch`` exports)           (batch, state_size) in the engine's layout)
other ``nn.Module``                        torch ``nn.GRU``/``nn.GRUCell``/``nn.LSTM``/
                                           ``nn.LSTMCell``/``nn.Linear`` (+ the Sequential's
                                           activation modules) rebuilt from its state_dict in
                                           the converter's layer order, and the module's own
                                           ``forward(x)`` from a zero state when it takes one
                                           argument
state_dict, ``.pt``/``.pth``,              the rebuilt torch stack (a state_dict records no
``.safetensors`` state_dict, ``.json``     activations: its Linear layers run without one)
state_dict
``.keras``, ``.h5``, RTNeural ``.json``,   **no framework at run time**: a consistency check,
native ``.sgru``                           the engine on ``model`` against the engine in float64
                                           on the model converted afresh from the file; it
                                           catches a model that is not the file's, not a wrong
                                           conversion
=========================================  ===================================================

Inputs are seeded random normals for ``streams`` streams over ``steps`` steps; every stream starts
from a random nonzero state, fed to the reference as its initial state wherever the source takes
one (a torch ``h_0``, an LSTM's ``h_0`` and ``c_0``, an ONNX graph's state inputs): the engine's
flat state of a stream is its recurrent layers' states in layer order, a GRU layer's h, an LSTM
layer's h (``output_size``) then C (``hidden_size``), and torch wants each module's layers
stacked, ``h_0`` (num_layers, batch, h width) and ``c_0`` (num_layers, batch, hidden_size). The
engine steps the streams in a shuffled, interleaved order, one step per call, and every step's
output is compared.

Missing values (``missing="skip"|"zero"|"last"``)
-------------------------------------------------
Each input value after a stream's first step is dropped (made NaN) with probability
``missing_rate``, seeded; the engine runs with ``Engine(missing=...)`` on those inputs. No
framework has these policies, so the reference is the source run on the inputs the policy
stands for, in float64 wherever the source runs float64:

``"zero"``   the source on the inputs with each dropped value replaced by 0.
``"last"``   the source on the inputs with each dropped value replaced by the stream's previous
             observed value of that feature (0 if none yet).
``"skip"``   the source on each stream's complete steps only (a step with any dropped value is
             left out and the later steps close up). A skipped step's expected output is the
             source's output at the stream's last complete step: the layers after the last
             recurrent layer applied to that layer's held output (its h), which is what that step
             output.

The first step of every stream is kept whole, so that every expected output is one the source
computed (with ``"skip"``, a stream with no complete step yet would need the layers after the
last recurrent layer alone, which an ONNX graph or a torch module cannot run). A graph that
returns only the last step of a fixed-length sequence cannot be compared under ``"skip"`` (its
sequence cannot close up); the report says so and is not ok.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from streamgru.model import GRUModel

from ._util import require

__all__ = ["verify", "VerifyReport", "reference_inputs"]

# Default tolerances on max |engine - reference|. A float32 reference (onnxruntime, torch float32)
# sums in another order than the engine: ~1e-6 per step for unit-scale models, grown over the
# steps and layers; any mapping error (gate order, bias, linear_before_reset, h and C swapped) is
# ~1e-2 or more.
_TOL = {"float32": 1e-4, "float64": 1e-9}
# Default tolerance of an engine with compact weights against a full-precision reference: the
# weights' rounding, not the arithmetic, decides the difference (measured in README, "Compact
# weights"); pass tolerance= for your model's budget.
_COMPACT_TOL = {"float16": 1e-3, "int8": 1e-2}
MISSING_POLICIES = ("refuse", "skip", "zero", "last")


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes
    ----------
    ok : bool
        ``max_abs_diff <= tolerance`` and the shapes agree.
    max_abs_diff : float
        Largest absolute difference between engine and reference outputs over every stream and
        step (``inf`` when the model and the source do not even agree on sizes).
    tolerance : float
    reference : str
        What was run as the reference.
    framework_check : bool
        False for a consistency check (no framework at run time: Keras, RTNeural, native files).
    source, dtype, streams, steps, seed, initial_state : describing the run.
    notes : list of str
        Anything the reader should know (mismatched sizes, what was not compared).
    missing : str
        The engine's missing-value policy; with any but "refuse", ``dropped`` values were made
        NaN and the reference applied the same rule (see the module docstring).
    dropped : int
        How many input values were dropped.
    weights : str
        How the engine stored the weights (``Engine.weights``): with ``"float16"`` or
        ``"int8"``, ``max_abs_diff`` is the compact weights' error against the source.
    """

    ok: bool
    max_abs_diff: float
    tolerance: float
    reference: str
    framework_check: bool
    source: str
    dtype: str
    streams: int
    steps: int
    seed: int
    initial_state: str
    notes: list = field(default_factory=list)
    missing: str = "refuse"
    dropped: int = 0
    weights: str = "float32"

    def __str__(self):
        verdict = "OK" if self.ok else "FAILED"
        rel = "<=" if self.max_abs_diff <= self.tolerance else ">"
        kind = "framework check" if self.framework_check else \
            "CONSISTENCY CHECK ONLY (no framework at run time)"
        lines = [
            f"verify {verdict}: max |engine - reference| = {self.max_abs_diff:.3g} {rel} "
            f"tolerance {self.tolerance:.3g}  [{kind}]",
            f"  source:        {self.source}",
            f"  reference:     {self.reference}",
            f"  engine:        streamgru.Engine(dtype={self.dtype!r}, weights={self.weights!r}), "
            f"{self.streams} interleaved streams x {self.steps} steps, seed {self.seed}",
            f"  initial state: {self.initial_state}",
        ]
        if self.missing != "refuse":
            lines.append(f"  missing:       Engine(missing={self.missing!r}); {self.dropped} input "
                         f"values dropped (NaN) at random; {_REFERENCE_RULE[self.missing]}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_REFERENCE_RULE = {
    "zero": "the reference ran on the inputs with each dropped value replaced by 0",
    "last": "the reference ran on the inputs with each dropped value replaced by the stream's "
            "previous observed value of that feature (0 before any)",
    "skip": "the reference ran on each stream's complete steps only; a skipped step is expected "
            "to output what the stream's last complete step output",
}


def verify(model, source, *, streams=4, steps=20, seed=0, dtype="float32", tolerance=None,
           missing="refuse", missing_rate=0.1, weights=None, **options) -> VerifyReport:
    """Run ``model`` in the engine and ``source`` in its framework on the same input; compare.

    Parameters
    ----------
    model : GRUModel
        The converted model.
    source : str, os.PathLike, nn.Module, state_dict mapping, onnx.ModelProto or RTNeural dict
        What it was converted from (see the module docstring for what runs as the reference).
    streams, steps : int
        Number of streams stepped side by side and of steps. An ONNX graph exported with a fixed
        batch or sequence length overrides them with its own.
    seed : int
        Seeds the inputs, the initial states and the interleaving order.
    dtype : {"float32", "float64"}
        The engine's dtype; torch references run in it too.
    tolerance : float, optional
        Largest accepted ``max_abs_diff``; default 1e-4 against a float32 reference, 1e-9 when
        engine and reference both run in float64, and with compact weights 1e-3 (float16) or
        1e-2 (int8): there the weights' rounding decides, so set your own budget.
    missing : {"refuse", "skip", "zero", "last"}
        The engine's missing-value policy to check. "refuse" (default) drops nothing; any other
        drops values at random and compares against the source under the same rule (module
        docstring).
    missing_rate : float
        With a policy other than "refuse": the probability, in [0, 1], that each input value
        after a stream's first step is dropped.
    weights : {None, "float32", "float16", "int8"}
        How the engine stores the weights (``Engine(weights=)``); None: the engine's default
        (``model.stored_as`` for a compact model). With a compact form the report measures
        the compact weights' error against the source, over every stream and step.
    **options
        Passed to the converter that reads the source's structure, e.g. ``layers=[...]`` for a
        torch source whose layer order needs it. ``node=`` is refused: one recurrent node taken
        out of a larger ONNX graph has no runnable reference.

    Returns
    -------
    VerifyReport
        ``report.ok``, ``report.max_abs_diff``; ``print(report)`` for a readable summary.

    Raises
    ------
    ImportError
        The framework needed to run the source is missing; the message names the extra.

    Examples
    --------
    >>> import torch, converters
    >>> _ = torch.manual_seed(0)
    >>> gru = torch.nn.GRU(3, 8, num_layers=2)
    >>> report = converters.verify(converters.from_torch(gru), gru, steps=5)
    >>> report.ok, report.max_abs_diff < 1e-4
    (True, True)
    >>> report = converters.verify(converters.from_torch(gru), gru, steps=5, missing="last")
    >>> report.ok, report.dropped > 0
    (True, True)
    >>> lstm = torch.nn.LSTM(3, 8, num_layers=2)
    >>> converters.verify(converters.from_torch(lstm), lstm, steps=5).ok
    True
    """
    if not isinstance(model, GRUModel):
        raise TypeError(f"model: expected a GRUModel, got {type(model).__name__}")
    from streamgru.engine import check_runnable  # numba, as _Run's Engine: only when verifying

    check_runnable(model)  # a kind the engine does not run: say so, not "a mismatch"
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    for name, v in (("streams", streams), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if tolerance is not None:
        tolerance = float(tolerance)
        if not tolerance >= 0:
            raise ValueError(f"tolerance: expected a non-negative float, got {tolerance!r}")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing: expected one of {', '.join(MISSING_POLICIES)}, got "
                         f"{missing!r}")
    if isinstance(missing_rate, bool) or not isinstance(missing_rate, (int, float)) \
            or not 0 <= missing_rate <= 1:
        raise ValueError(f"missing_rate: expected a probability in [0, 1], got {missing_rate!r}")
    if "node" in options:
        raise TypeError("node: verify runs the whole ONNX graph; a single node taken out of a "
                        "larger graph has no reference to compare with")
    from streamgru.packing import weights_form

    form = weights_form(dtype, weights, model.stored_as)  # refuses what the engine would refuse
    run = _Run(model, int(streams), int(steps), int(seed), dtype, missing, float(missing_rate),
               None if form == dtype else form)
    kind = _kind(source)
    if kind == "onnx":
        res = _onnx(run, source)
    elif kind == "torch-module":
        res = _torch_module(run, source, options)
    elif kind == "torch-state":
        res = _torch_state(run, source, options)
    else:
        res = _consistency(run, source, kind, options)
    default = _TOL["float64"] if (dtype == "float64" and res.ref_dtype == "float64") \
        else _COMPACT_TOL.get(form, _TOL["float32"])
    tol = default if tolerance is None else tolerance
    diff = max(res.diffs) if res.diffs else float("inf")
    notes = list(res.notes)
    if len(res.diffs) > 1:
        notes.append("max |difference| per comparison: " + ", ".join(
            f"{label} {d:.3g}" for label, d in zip(res.labels, res.diffs, strict=True)))
    if not res.diffs and not notes:
        notes = ["nothing was compared"]
    return VerifyReport(
        ok=bool(res.diffs) and res.shapes_ok and diff <= tol, max_abs_diff=float(diff),
        tolerance=tol, reference=res.reference, framework_check=res.framework,
        source=_describe(source, kind), dtype=dtype, streams=run.B, steps=run.T, seed=run.seed,
        initial_state=res.initial_state, notes=notes, missing=missing,
        dropped=int(run.dropped.sum()), weights=form,
    )


# --------------------------------------------------------------------------------------------
# what the source is


def _kind(source):
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source: expected an existing file, got {path!r}")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".onnx":
            return "onnx"
        if ext in (".pt", ".pth"):
            return "torch-state"
        if ext == ".safetensors":
            from streamgru.formats import is_native

            return "native" if is_native(path) else "torch-state"
        if ext == ".sgru":
            return "native"
        if ext in (".keras", ".h5"):
            return "keras"
        if ext == ".json":
            from streamgru.formats import read_json

            from .from_rtneural import is_rtneural_json

            return "rtneural" if is_rtneural_json(read_json(path, "source")) else "torch-state"
        raise ValueError(f"source: expected a .onnx, .pt, .pth, .safetensors, .sgru, .keras, .h5 "
                         f"or .json file, got {path!r}")
    mod = type(source).__module__
    if mod.startswith("onnx") and type(source).__name__ == "ModelProto":
        return "onnx"
    if any(c.__name__ == "Module" and c.__module__.startswith("torch.nn")
           for c in type(source).__mro__):
        return "torch-module"
    if isinstance(source, Mapping):
        from .from_rtneural import is_rtneural_json

        return "rtneural" if is_rtneural_json(source) else "torch-state"
    raise TypeError(f"source: expected a model file path, an nn.Module, a state_dict, an "
                    f"onnx.ModelProto or an RTNeural dict, got {type(source).__name__}")


def _describe(source, kind):
    if isinstance(source, (str, os.PathLike)):
        return f"{os.fspath(source)} ({kind})"
    return f"{type(source).__name__} object ({kind})"


# --------------------------------------------------------------------------------------------
# the engine side


class _Run:
    """Seeded inputs and states, the engine's outputs for them, and with a missing-value policy
    the inputs the reference runs on (``xs``) and which of its steps each engine step matches."""

    def __init__(self, model, B, T, seed, dtype, missing="refuse", rate=0.0, weights=None):
        self.model, self.B, self.T, self.seed, self.dtype = model, B, T, seed, dtype
        self.missing, self.rate, self.weights = missing, rate, weights
        self.resize(B, T)

    def resize(self, B, T):
        self.B, self.T = B, T
        rng = np.random.default_rng(self.seed)
        clean = rng.normal(size=(B, T, self.model.input_size))  # (B, T, I) float64
        self.states = rng.uniform(-0.8, 0.8, size=(B, self.model.state_size))  # (B, S)
        self.dropped = np.zeros(clean.shape, bool)  # (B, T, I): values the engine sees as NaN
        if self.missing != "refuse":
            self.dropped[:, 1:] = np.random.default_rng(self.seed + 2).random(
                (B, T - 1, clean.shape[2])) < self.rate
        self.engine_xs = np.where(self.dropped, np.nan, clean)
        self.xs, self.src_step = reference_inputs(clean, self.dropped, self.missing)

    def pick(self, ref):
        """The reference's outputs (B, T, O) at the steps the engine's outputs match."""
        return np.take_along_axis(ref, self.src_step[:, :, None], axis=1)

    def engine(self, states, dtype=None, model=None, reference=False):
        """Outputs (B, T, O) float64 of the engine stepping every stream from ``states``: on the
        inputs with dropped values, under the policy; or, with ``reference``, under "refuse"
        on the reference's inputs, picked at the matching steps (the consistency check's
        reference)."""
        from streamgru.engine import Engine

        model = self.model if model is None else model
        dt = dtype or self.dtype
        # the engine under test stores the weights as asked; a consistency reference, never
        # (full precision; a float64 engine whatever the model says)
        eng = Engine(model, dtype=dt, missing="refuse" if reference else self.missing,
                     weights=dt if reference else self.weights or dt)
        keys = [f"stream-{b}" for b in range(self.B)]
        for b, k in enumerate(keys):
            eng.open(k, state=np.asarray(states[b], dt))
        rng = np.random.default_rng(self.seed + 1)
        ys = np.zeros((self.B, self.T, model.output_size))
        xs = (self.xs if reference else self.engine_xs).astype(dt)
        for t in range(self.T):
            # Shuffled and split in two calls: the streams interleave in every possible way.
            for group in np.array_split(rng.permutation(self.B), 2):
                if len(group):
                    ys[group, t] = eng.step([keys[b] for b in group], xs[group, t])
        return self.pick(ys) if reference else ys


def reference_inputs(xs, dropped, missing):
    """What the source runs on under a missing-value policy, and which of its steps each engine
    step's output is.

    Parameters
    ----------
    xs : numpy.ndarray, (B, T, I) float64
        The inputs before any value was dropped.
    dropped : numpy.ndarray, (B, T, I) bool
        The values the engine sees as missing (NaN).
    missing : {"refuse", "skip", "zero", "last"}

    Returns
    -------
    ref_xs : numpy.ndarray, (B, T, I) float64
        "refuse": ``xs``; "zero": dropped values 0; "last": dropped values replaced by the
        stream's previous observed value of the feature (0 before any); "skip": each stream's
        complete steps moved to the front in order, zeros after them.
    src_step : numpy.ndarray, (B, T) int64
        The reference step whose output the engine's step ``t`` of stream ``b`` must equal: ``t``,
        or for "skip" the stream's last complete step at or before ``t``, in ``ref_xs``'s time;
        -1 before the stream's first complete step (the output for its initial state, which no
        reference step gives: :func:`verify` keeps every first step complete).

    Examples
    --------
    >>> xs = np.arange(1.0, 5.0).reshape(1, 4, 1)
    >>> dropped = np.array([False, True, False, True]).reshape(1, 4, 1)
    >>> [reference_inputs(xs, dropped, m)[0].ravel().tolist() for m in ("zero", "last", "skip")]
    [[1.0, 0.0, 3.0, 0.0], [1.0, 1.0, 3.0, 3.0], [1.0, 3.0, 0.0, 0.0]]
    >>> reference_inputs(xs, dropped, "skip")[1].tolist()
    [[0, 0, 1, 1]]
    >>> reference_inputs(xs, ~dropped, "skip")[1].tolist()
    [[-1, 0, 0, 1]]
    """
    B, T, _ = xs.shape
    steps = np.broadcast_to(np.arange(T), (B, T))
    if missing in ("refuse", "zero"):
        return np.where(dropped, 0.0, xs), steps.copy()
    if missing == "last":
        ref = xs.copy()
        seen = np.zeros((B, xs.shape[2]))  # each stream's last observed value per feature
        for t in range(T):
            ref[:, t] = np.where(dropped[:, t], seen, xs[:, t])
            seen = ref[:, t]
        return ref, steps.copy()
    complete = ~dropped.any(axis=2)  # (B, T)
    ref = np.zeros_like(xs)
    for b in range(B):
        ref[b, :complete[b].sum()] = xs[b, complete[b]]
    return ref, np.cumsum(complete, axis=1) - 1


class _Result:
    def __init__(self, reference, framework, ref_dtype, initial_state):
        self.reference, self.framework, self.ref_dtype = reference, framework, ref_dtype
        self.initial_state = initial_state
        self.diffs, self.labels, self.notes, self.shapes_ok = [], [], [], True

    def compare(self, ys, ref, what=""):
        if ys.shape != ref.shape:
            self.shapes_ok = False
            self.notes.append(f"{what}output shapes differ: engine {ys.shape}, reference "
                              f"{ref.shape}")
            return
        self.diffs.append(float(np.max(np.abs(ys - ref))) if ys.size else 0.0)
        self.labels.append(what.rstrip(": ") or "engine vs reference")

    def mismatch(self, text):
        self.shapes_ok = False
        self.notes.append(text)
        return self


def _sizes_mismatch(res, model, input_size, output_size, state_size, what):
    """Record a size disagreement between the model and the source; True if there is one."""
    bad = []
    for name, a, b in (("input_size", model.input_size, input_size),
                       ("output_size", model.output_size, output_size),
                       ("state_size", model.state_size, state_size)):
        if b is not None and a != b:
            bad.append(f"{name} {a} vs {b}")
    if bad:
        res.mismatch(f"the model is not this {what}: " + ", ".join(bad))
    return bool(bad)


# --------------------------------------------------------------------------------------------
# ONNX: onnxruntime


def _onnx(run, source):
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    from onnx import helper

    from .from_onnx import io_signature, load_external, read_onnx

    if isinstance(source, onnx.ModelProto):
        proto = source
    else:
        proto = read_onnx(source, "source")
        load_external(proto, os.path.dirname(os.path.abspath(os.fspath(source))))
    sig = io_signature(proto)
    res = _Result(f"onnxruntime {ort.__version__} running the ONNX graph over the whole sequence "
                  f"(float32)", True, "float32", "not run")
    res.notes.extend(sig["notes"])
    inputs = {i.name: i for i in proto.graph.input}
    dims = inputs[sig["input"]].type.tensor_type.shape.dim

    def static(d):
        return int(d.dim_value) if d.HasField("dim_value") else None

    # A graph exported without dynamic axes runs only its own batch and sequence length.
    B = sig["sizes"][sig["batch_axis"]] or run.B
    T = sig["sizes"][sig["time_axis"]] or run.T
    if (B, T) != (run.B, run.T):
        res.notes.append(f"the graph has a fixed batch and/or sequence length: ran {B} streams x "
                         f"{T} steps")
        run.resize(B, T)
    if _sizes_mismatch(res, run.model, static(dims[-1]), None, sig["state_size"], "graph"):
        return res

    def np_type(name):
        return helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type)

    def feed(x_bti, states):
        # x (B, T, I) -> the graph's order of time and batch, features last.
        perm = [1 if p == sig["time_axis"] else 0 for p in range(2)] + [2]
        out = {sig["input"]: np.ascontiguousarray(x_bti.transpose(perm), np_type(sig["input"]))}
        out.update({k: v.astype(np_type(k)) for k, v in states.items()})
        return out

    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def session(p):
        return ort.InferenceSession(p.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    # Which element of which state input becomes which recurrent node's initial_h[b, j] (or
    # initial_c[b, j]): feed the state inputs their element numbers (+1) and read the initial
    # states back. Exact: the converter accepts only value-preserving plumbing between a graph
    # input and an initial state.
    others = sig["other_inputs"]
    shapes = {k: [static(d) or B for d in inputs[k].type.tensor_type.shape.dim] for k in others}
    probe, owner, start = {}, {}, 1
    for k in others:
        size = int(np.prod(shapes[k]))
        probe[k] = np.arange(start, start + size, dtype=np.float64).reshape(shapes[k])
        owner[k] = start
        start += size
    inner = list(dict.fromkeys(h for h, _, _, _ in sig["states"] if h and h not in inputs))
    got = {}
    if others and inner:
        p = copy.deepcopy(proto)
        del p.graph.output[:]
        p.graph.output.extend(helper.make_empty_tensor_value_info(h) for h in inner)
        got = dict(zip(inner, session(p).run(None, feed(run.xs, probe)), strict=True))
    targets = {}  # probe id -> (stream, state column)
    one_to_one = True
    for h, layout, first, width in sig["states"]:
        if not h or not others:
            continue
        v = np.asarray(probe[h] if h in inputs else got[h], np.float64)
        ids = np.rint(v[0] if layout == 0 else v[:, 0]).astype(np.int64)  # (B, width)
        for b in range(B):
            for j in range(width):
                if ids[b, j]:
                    one_to_one &= int(ids[b, j]) not in targets
                    targets[int(ids[b, j])] = (b, first + j)
    states = np.zeros_like(run.states)
    feeds = {k: np.zeros(shapes[k]) for k in others}
    if targets and one_to_one:
        for pid, (b, col) in targets.items():
            k = max((k for k in others if owner[k] <= pid), key=lambda k: owner[k])
            feeds[k].reshape(-1)[pid - owner[k]] = states[b, col] = run.states[b, col]
        res.initial_state = f"random nonzero, fed through graph input(s) {others}"
        if not np.array_equal(states, run.states):
            res.initial_state += " (the layers the graph gives no state input start at zero)"
    elif others:
        res.initial_state = (f"zeros: the graph's inputs {others} could not be mapped one-to-one "
                             f"onto the recurrent nodes' initial states")
    else:
        res.initial_state = "zeros (the graph takes no initial state)"
    sess = session(proto)

    def outputs(x_bti):
        y = np.asarray(sess.run([sig["output"]], feed(x_bti, feeds))[0], np.float64)
        # Back to (B, T, O), or (B, O) for a graph returning the last step only.
        lead = [sig["out_batch_axis"]]
        if sig["out_time_axis"] is not None:
            lead.append(sig["out_time_axis"])
        rest = [a for a in range(y.ndim - 1) if a not in lead]
        return y.transpose(lead + rest + [y.ndim - 1]).reshape([y.shape[a] for a in lead] + [-1])

    ys = run.engine(states)
    if sig["out_time_axis"] is not None:
        res.compare(ys, run.pick(outputs(run.xs)))
    elif sig["sizes"][sig["time_axis"]] is None:
        # One output per sequence: the engine's output at step t is the graph's for x[:, :t+1].
        res.compare(ys, run.pick(np.stack([outputs(run.xs[:, :t + 1]) for t in range(T)],
                                          axis=1)))
        res.notes.append("the graph returns the last step only: ran it on every prefix of the "
                         "sequence")
    elif run.missing == "skip":
        res.notes.append("the graph returns the last step only and has a fixed sequence length: "
                         "under missing='skip' a stream's complete steps cannot close up to "
                         "another length, so nothing was compared")
    else:
        res.compare(ys[:, -1], outputs(run.xs))
        res.notes.append("the graph returns the last step only and has a fixed sequence length: "
                         "compared the final step")
    return res


# --------------------------------------------------------------------------------------------
# torch


def _torch_module(run, module, options):
    torch = require("torch", "torch")
    nn = torch.nn
    tdt = torch.float64 if run.dtype == "float64" else torch.float32
    if isinstance(module, (nn.GRU, nn.GRUCell, nn.LSTM, nn.LSTMCell)):
        init = "random nonzero, as h_0 and c_0" if isinstance(module, (nn.LSTM, nn.LSTMCell)) \
            else "random nonzero, as h_0"
        res = _Result(f"torch {torch.__version__} {type(module).__name__} (the module itself, "
                      f"{run.dtype})", True, run.dtype, init)
        if _sizes_mismatch(res, run.model, module.input_size, _output_width(module),
                           _state_width(module, nn), "module"):
            return res
        m = copy.deepcopy(module).to(tdt).eval()
        x = torch.tensor(run.xs, dtype=tdt).transpose(0, 1)  # (T, B, I)
        with torch.no_grad():
            y = _run_recurrent(m, x, run.states, torch)
        res.compare(run.engine(run.states), run.pick(y.transpose(0, 1).numpy().astype(np.float64)))
        return res
    res = _step_module(run, module, torch, tdt)
    if res is not None:
        return res
    from .from_torch import ordered_units

    units = ordered_units(module, options.get("layers"))
    res = _stack(run, units, torch, module=module,
                 label=f"torch {torch.__version__} recurrent/Linear stack rebuilt from the "
                       f"module's state_dict in the converter's order, with the Sequential's "
                       f"activation modules ({run.dtype})")
    if res.shapes_ok:
        _module_forward(run, module, res, torch, tdt)
    return res


def _output_width(m):
    """The width of a torch recurrent module's output h: ``proj_size`` or ``hidden_size``."""
    return getattr(m, "proj_size", 0) or m.hidden_size


def _state_width(m, nn):
    """Values of a stream's engine state that a torch recurrent module holds: per layer h, and
    an LSTM's C after it."""
    lstm = isinstance(m, (nn.LSTM, nn.LSTMCell))
    per_layer = _output_width(m) + (m.hidden_size if lstm else 0)
    return getattr(m, "num_layers", 1) * per_layer


def _run_recurrent(m, x, states, torch):
    """Run the torch GRU/GRUCell/LSTM/LSTMCell ``m`` over ``x`` (T, B, I), time-major whatever
    its ``batch_first``, from ``states`` (B, _state_width(m)) float64, the engine's layout: its
    layers in order, each a GRU's h or an LSTM's h then C. Returns the outputs (T, B, O)."""
    nn = torch.nn
    B = states.shape[0]
    H_out = _output_width(m)
    lstm = isinstance(m, (nn.LSTM, nn.LSTMCell))
    # The engine's (B, layers, h [+ C]) becomes torch's layers-first h_0 (L, B, H_out) and, for
    # an LSTM, c_0 (L, B, H): each layer's first H_out values are its h, the next H its C.
    per_layer = states.reshape(B, getattr(m, "num_layers", 1), -1).transpose(1, 0, 2)
    h0 = torch.tensor(np.ascontiguousarray(per_layer[:, :, :H_out]), dtype=x.dtype)
    c0 = torch.tensor(np.ascontiguousarray(per_layer[:, :, H_out:]), dtype=x.dtype)
    if isinstance(m, (nn.GRUCell, nn.LSTMCell)):
        hx, outs = ((h0[0], c0[0]) if lstm else h0[0]), []
        for step in range(x.shape[0]):
            hx = m(x[step], hx)
            outs.append(hx[0] if lstm else hx)
        return torch.stack(outs)
    y, _ = m(x.transpose(0, 1) if m.batch_first else x, (h0, c0) if lstm else h0)
    return y.transpose(0, 1) if m.batch_first else y


def _step_module(run, module, torch, tdt):
    """The reference of a module stepping a batch of streams, ``forward(x, state) -> (y,
    state_out)`` with ``state`` in the engine's layout (``converters.to_torch``'s export): run
    one call per step. None when ``module`` is not one: its forward does not take exactly two
    required arguments, or a first call on (batch, input_size) and (batch, state_size) does not
    return a (batch, output) and a (batch, state_size) tensor."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    if len(params) != 2:
        return None
    m = copy.deepcopy(module).to(tdt).eval()
    B, S = run.B, run.model.state_size

    def step(x, state):
        with torch.no_grad():
            return m(torch.tensor(x, dtype=tdt), state)

    state = torch.tensor(run.states, dtype=tdt)
    try:
        first = step(run.xs[:, 0], state)
    except Exception:  # noqa: BLE001 - not a step module (a sequence model's forward(x, h0))
        return None
    if not (isinstance(first, (tuple, list)) and len(first) == 2
            and all(isinstance(t, torch.Tensor) for t in first)
            and first[0].ndim == 2 and first[0].shape[0] == B and tuple(first[1].shape) == (B, S)):
        return None
    res = _Result(f"torch {torch.__version__} {type(module).__name__}: the module's own "
                  f"forward(x, state) -> (y, state_out), one call per step ({run.dtype})", True,
                  run.dtype, "random nonzero, as the module's state input")
    outs = []
    for t in range(run.T):
        y, state = first if t == 0 else step(run.xs[:, t], state)
        outs.append(y.numpy().astype(np.float64))
    res.compare(run.engine(run.states), run.pick(np.stack(outs, axis=1)))
    return res


def _torch_state(run, source, options):
    torch = require("torch", "torch")
    from .from_torch import ordered_units

    units = ordered_units(source, options.get("layers"))
    return _stack(run, units, torch, module=None,
                  label=f"torch {torch.__version__} recurrent/Linear stack rebuilt from the "
                        f"state_dict in the converter's order ({run.dtype}); a state_dict records "
                        f"no activations, so its Linear layers run without one")


def _rebuild(u, torch, tdt):
    """The torch module (in ``tdt``) of one unit of ``ordered_units``, holding its tensors."""
    nn = torch.nn
    if u.kind == "linear":
        w = u.linear["weight"][1]
        m = nn.Linear(w.shape[1], w.shape[0], bias="bias" in u.linear)
        tensors = [u.linear]
    else:
        whh = u.layers[0]["weight_hh"][1]  # (G*H, H_out), G = 4 for an LSTM, 3 for a GRU
        G = 4 if u.kind in ("lstm", "lstmcell") else 3
        I, H, L = u.input_size, whh.shape[0] // G, len(u.layers)
        bias = "bias_ih" in u.layers[0]
        if u.kind == "cell":
            m = nn.GRUCell(I, H, bias=bias)
        elif u.kind == "lstmcell":
            m = nn.LSTMCell(I, H, bias=bias)
        elif u.kind == "gru":
            m = nn.GRU(I, H, num_layers=L, bias=bias)
        else:
            proj = whh.shape[1] if "weight_hr" in u.layers[0] else 0
            m = nn.LSTM(I, H, num_layers=L, bias=bias, proj_size=proj)
        tensors = u.layers
    m = m.to(tdt).eval()
    per_layer = u.kind in ("gru", "lstm")  # weight_ih_l0, ...; a cell's and a Linear's: weight_ih
    with torch.no_grad():
        for k, roles in enumerate(tensors):
            for role, (_, arr) in roles.items():
                getattr(m, f"{role}_l{k}" if per_layer else role).copy_(
                    torch.tensor(np.asarray(arr), dtype=tdt))
    return m


def _stack(run, units, torch, *, module, label):
    """Run the units as torch modules, time-major, from the states; compare with the engine."""
    tdt = torch.float64 if run.dtype == "float64" else torch.float32
    res = _Result(label, True, run.dtype, "random nonzero, as each recurrent module's h_0 (and "
                                          "an LSTM's c_0)")
    mods = [_rebuild(u, torch, tdt) for u in units]
    widths = [0 if u.kind == "linear" else _state_width(m, torch.nn)
              for u, m in zip(units, mods, strict=True)]
    if _sizes_mismatch(res, run.model, units[0].input_size, units[-1].output_size, sum(widths),
                       "source"):
        return res
    x = torch.tensor(run.xs, dtype=tdt).transpose(0, 1)  # (T, B, I)
    off = 0
    with torch.no_grad():
        for u, m, width in zip(units, mods, widths, strict=True):
            if u.kind != "linear":
                x = _run_recurrent(m, x, run.states[:, off:off + width], torch)
                off += width
                continue
            x = m(x)
            if u.activation_from is not None and module is not None:
                x = module.get_submodule(u.activation_from)(x)
    res.compare(run.engine(run.states), run.pick(x.transpose(0, 1).numpy().astype(np.float64)),
                "rebuilt torch stack: ")
    return res


def _module_forward(run, module, res, torch, tdt):
    """Also run the module's own forward(x), from zeros, when that is possible: it takes one
    argument, and its first nn.GRU or nn.LSTM says whether x is batch first. Its output is
    ``y`` or a tuple whose first item is ``y`` (an LSTM's ``(y, (h, c))``, a GRU's ``(y, h)``)."""
    nn = torch.nn
    seqs = [m for m in module.modules() if isinstance(m, (nn.GRU, nn.LSTM))]
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = None
    if params is None or len(params) != 1:
        res.notes.append("the module's own forward() was not run (it does not take a single "
                         "(batch, time, features) tensor); the rebuilt stack is the reference")
        return
    if not seqs:
        res.notes.append("the module's own forward() was not run (it holds no nn.GRU or nn.LSTM "
                         "to say whether its input is batch first); the rebuilt stack is the "
                         "reference")
        return
    batch_first = seqs[0].batch_first
    m = copy.deepcopy(module).to(tdt).eval()
    x = torch.tensor(run.xs, dtype=tdt)
    if not batch_first:
        x = x.transpose(0, 1)
    try:
        with torch.no_grad():
            y = m(x)
    except Exception as exc:  # a forward we cannot call this way: say so, do not fail
        res.notes.append(f"the module's own forward(x) raised {type(exc).__name__}: {exc}; "
                         f"the rebuilt stack is the reference")
        return
    if isinstance(y, (tuple, list)):
        y = y[0]
    y = y.detach().numpy().astype(np.float64)
    ys = run.engine(np.zeros_like(run.states))
    O = run.model.output_size
    if y.shape == (run.B, O):
        # One output per sequence: the engine's output at step t is forward(x[:, :t+1]).
        with torch.no_grad():
            prefixes = [m(x[:, :t + 1] if batch_first else x[:t + 1]) for t in range(run.T)]
        y = np.stack([(p[0] if isinstance(p, (tuple, list)) else p).numpy() for p in prefixes],
                     axis=1).astype(np.float64)
        res.compare(ys, run.pick(y), "module forward(x): ")
        res.reference += ("; and the module's own forward(x) from a zero state, on every prefix "
                          "of the sequence (it returns one output per sequence)")
    elif y.ndim == 3 and y.shape[-1] == O:
        if not batch_first:
            y = y.transpose(1, 0, 2)
        res.compare(ys, run.pick(y), "module forward(x): ")
        res.reference += "; and the module's own forward(x) from a zero state"
    else:
        res.notes.append(f"the module's own forward(x) returned shape {y.shape}, not one output "
                         f"per step: not compared")


# --------------------------------------------------------------------------------------------
# no framework at run time


def _consistency(run, source, kind, options):
    from streamgru.formats import load_model

    if kind == "native":
        fresh = load_model(source)
        what = "the native file's model"
    elif kind == "keras":
        from .from_keras import from_keras

        fresh = from_keras(source, dtype="float64", **options)
        what = "the model converted afresh from the Keras file (Keras itself is not run)"
    else:
        from .from_rtneural import from_rtneural

        fresh = from_rtneural(source, dtype="float64", **options)
        what = "the model converted afresh from the RTNeural JSON (RTNeural itself is not run)"
    res = _Result(f"streamgru engine in float64 on {what}: a consistency check, not a framework "
                  f"check", False, "float64", "random nonzero")
    res.notes.extend(fresh.notes)
    if _sizes_mismatch(res, run.model, fresh.input_size, fresh.output_size, fresh.state_size,
                       "source"):
        return res
    ref = run.engine(run.states, dtype="float64", model=fresh, reference=True)
    res.compare(run.engine(run.states), ref)
    if run.dtype == "float64":
        res.notes.append("both sides ran in float64: this checks the model is the file's, "
                         "not float32 rounding")
    return res
