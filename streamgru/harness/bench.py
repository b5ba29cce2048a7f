"""``streamgru bench``: streamgru against onnxruntime and PyTorch on the workloads of a stream server.

Every contender is driven the way a user must drive it. streamgru keeps each stream's state inside
the engine; for onnxruntime and PyTorch the caller keeps a state store (a key -> slot dict and a
``(capacity, state_size)`` array), gathers the states of this batch's streams, runs, and scatters
the new states back. All contenders run the same weights: the torch module and the ONNX graph are
the public exports of one :class:`~streamgru.GRUModel` (``converters.to_torch``,
``converters.to_onnx``: one step for a batch, ``(x, state) -> (y, state_out)``, each GRU layer an
``nn.GRUCell`` or a sequence-length-1 ONNX ``GRU`` node, each LSTM layer an ``nn.LSTMCell`` or an
ONNX ``LSTM`` node, as a user would run them), read back through :mod:`converters` (which must
return the very same weights) before anything is timed.

Every standard workload runs once per recurrent cell of :data:`CELLS` (GRU, LSTM): the same
sizes, batches and contenders, the LSTM's names saying ``lstm`` (``step lstm I=16 H=64 n=1``)
and every result its ``cell``.

The contenders (``name``: what one timed call does):

* ``streamgru``: ``engine.step(keys, x)``;
* ``ort_run``: gather, ``InferenceSession.run``, scatter;
* ``ort_iobinding``: gather into pre-bound buffers, ``run_with_iobinding``, scatter;
* ``torch``: gather, ``nn.GRUCell``/``nn.LSTMCell``/``nn.Linear`` stack under
  ``torch.inference_mode``, scatter;
* on the ``run`` workloads (one stream, T steps in one call), ``ort_sequence``: the whole
  sequence in one ``InferenceSession.run`` of ``to_onnx(model, sequence=True)``, in place of
  ``ort_iobinding``.

Thread counts are set explicitly for every contender (onnxruntime ``intra_op_num_threads``,
``torch.set_num_threads``, ``Engine(threads=...)``) and recorded with each result.

Examples
--------
>>> from streamgru.harness.bench import main_bench  # doctest: +SKIP
>>> main_bench(["--quick", "--json", "bench.json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..engine import Engine
from ..isa import TILE
from ..model import GRUModel

__all__ = [
    "Workload",
    "CELLS",
    "COMPACT_CONTENDERS",
    "workload",
    "cell_of",
    "UserStore",
    "StreamgruContender",
    "UserStoreContender",
    "OrtContender",
    "TorchContender",
    "make_contender",
    "standard_workloads",
    "batches",
    "sgemm_gflops",
    "same_isa_coretype",
    "measure_peaks",
    "peak_report",
    "format_peak_report",
    "machine_info",
    "main_bench",
    "add_arguments",
    "run_bench",
    "start_times",
    "time_calls",
    "format_start_times",
]

CONTENDERS = ("streamgru", "ort_run", "ort_iobinding", "torch")
# The engine with compact weights (Engine(weights=...)): asked for by name with --contenders.
COMPACT_CONTENDERS = ("streamgru_float16", "streamgru_int8")


# ----------------------------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class Workload:
    """One benchmark workload.

    Attributes
    ----------
    name : str
        Also the pytest-benchmark group (:func:`workload` derives it from the other fields).
    input_size, hidden_size : int
        Of the model (ignored when ``model`` is given to :func:`run_workload`).
    n : int
        Events per call (rows of ``x``).
    streams : int
        Open streams; each call draws ``n`` keys among them.
    keys : {"distinct", "duplicates", "zipf"}
        ``distinct``: n different keys per call; ``duplicates``: n//4 keys each 4 times;
        ``zipf``: ragged batches (size uniform in [1, n]) of Zipf-distributed keys (a=1.2).
    layers : {"one", "stack"}
        ``one``: one recurrent layer; ``stack``: Dense(relu) -> 2 recurrent -> Dense(softmax).
    seq : int
        0 for ``step``; T > 0 times ``run(key, xs)`` over T steps of one stream.
    cell : {"gru", "lstm"}
        The kind of every recurrent layer (a model file's own kinds, joined by "+", for
        ``streamgru bench --model``).
    """

    name: str
    input_size: int
    hidden_size: int
    n: int
    streams: int = 0
    keys: str = "distinct"
    layers: str = "one"
    seq: int = 0
    cell: str = "gru"

    @property
    def n_streams(self):
        return self.streams or self.n


#: The recurrent cells of the standard workloads, each a full copy of the list.
CELLS = ("gru", "lstm")


def workload(input_size, hidden_size, n, **fields):
    """A :class:`Workload` named from its fields: ``<what>[ <cell>] I= H= n=``, where ``what`` is
    ``run``, ``stack``, ``duplicates``, ``zipf``, ``many`` (more streams than rows) or ``step``,
    and a GRU workload's name leaves the cell out (the names of the results before LSTM rows).

    Examples
    --------
    >>> workload(128, 128, 1024, streams=10_000, cell="lstm").name
    'many lstm I=128 H=128 n=1024/10000'
    >>> workload(16, 64, 1, seq=100).name
    'run I=16 H=64 T=100'
    """
    wl = Workload("", input_size, hidden_size, n, **fields)
    if wl.seq:
        what, count = "run", f"T={wl.seq}"
    else:
        what = ("stack" if wl.layers == "stack" else wl.keys if wl.keys != "distinct"
                else "many" if wl.streams else "step")
        count = f"n{'<=' if wl.keys == 'zipf' else '='}{wl.n}" + (f"/{wl.streams}" if wl.streams
                                                                 else "")
    cell = "" if wl.cell == "gru" else f" {wl.cell}"
    return replace(wl, name=f"{what}{cell} I={input_size} H={hidden_size} {count}")


def cell_of(model):
    """The kinds of a model's recurrent layers, in order of first use, joined by "+"."""
    return "+".join(dict.fromkeys(layer.kind for layer in model.recurrent_layers)) or "none"


def make_model(wl: Workload, seed=0) -> GRUModel:
    """The seeded model of a workload (torch's default initialisation scale)."""
    I, H = wl.input_size, wl.hidden_size
    if wl.layers == "stack":
        return GRUModel.random(I, [H, H], dense_before=[(H, "relu")], dense_after=[(16, "softmax")],
                               cell=wl.cell, seed=seed)
    return GRUModel.random(I, [H], cell=wl.cell, seed=seed)


GRID_N = (1, 4, 16, 64, 256, 1024, 4096)
GRID_H = (64, 128, 256, 512)


def standard_workloads(quick=False, cells=CELLS):
    """The standard list, once per cell of ``cells``: the (n, H) grid (I = H, except I=16 at
    H=64), many streams, a stack, duplicate keys, Zipf batches and sequences. ``quick`` keeps a
    representative few."""
    specs = []  # (I, H, n, fields)
    if quick:
        grid = [(16, 64, 1), (128, 128, 1), (128, 128, 16), (128, 128, 256), (256, 256, 16)]
    else:
        grid = [(16 if H == 64 else H, H, n) for H in GRID_H for n in GRID_N]
    specs += [(I, H, n, {}) for I, H, n in grid]
    if quick:
        specs.append((128, 128, 1024, {"streams": 10_000}))
    else:
        specs += [(H, H, 4096, {"streams": 100_000}) for H in (128, 256)]
    specs.append((32, 128, 64, {"layers": "stack"}))
    specs.append((64, 128, 256, {"keys": "duplicates"}))
    if not quick:
        specs.append((64, 128, 512, {"streams": 100_000, "keys": "zipf"}))
    for I, H in ((16, 64), (128, 128)) if quick else ((16, 64), (128, 128), (256, 256)):
        specs.append((I, H, 1, {"seq": 100}))
    return [workload(I, H, n, cell=cell, **fields) for cell in cells for I, H, n, fields in specs]


def batches(wl: Workload, count, seed=0):
    """``count`` (keys, x) pairs for a workload: keys an int64 array, x float32 (len(keys), I)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if wl.keys == "duplicates":
            k = rng.choice(wl.n_streams, size=max(wl.n // 4, 1), replace=False)
            keys = np.repeat(k, 4)[: wl.n]
            rng.shuffle(keys)
        elif wl.keys == "zipf":
            m = int(rng.integers(1, wl.n + 1))
            keys = (rng.zipf(1.2, size=m) - 1) % wl.n_streams
        elif wl.n_streams == wl.n:
            keys = np.arange(wl.n)
        else:
            keys = rng.choice(wl.n_streams, size=wl.n, replace=False)
        x = rng.normal(size=(len(keys), wl.input_size)).astype(np.float32)
        out.append((keys.astype(np.int64), x))
    return out


# ----------------------------------------------------------------------------------------------
# the user-side state store of the baselines


class UserStore:
    """What a user keeps around onnxruntime or torch: key -> slot, and every stream's state.

    ``states``: (capacity, state_size) float32. ``waves(keys)`` splits a batch with repeated keys
    into runs of distinct keys, in order, so each key's steps happen one after another.
    """

    def __init__(self, state_size, n_streams):
        self.states = np.zeros((max(n_streams, 1), state_size), np.float32)
        self.slot_of = {}

    def slots(self, keys):
        slot_of = self.slot_of
        out = np.empty(len(keys), np.int64)
        for i, k in enumerate(keys.tolist()):
            s = slot_of.get(k)
            if s is None:
                s = slot_of[k] = len(slot_of)
                if s >= self.states.shape[0]:
                    grown = np.zeros((2 * s, self.states.shape[1]), np.float32)
                    grown[:s] = self.states
                    self.states = grown
            out[i] = s
        return out

    @staticmethod
    def waves(slots):
        """None if the slots are distinct, else a list of index arrays (one per wave)."""
        if len(np.unique(slots)) == len(slots):
            return None
        seen, wave_of = {}, np.empty(len(slots), np.int64)
        for i, s in enumerate(slots.tolist()):
            wave_of[i] = seen.get(s, 0)
            seen[s] = wave_of[i] + 1
        return [np.flatnonzero(wave_of == w) for w in range(int(wave_of.max()) + 1)]


# ----------------------------------------------------------------------------------------------
# contenders


class StreamgruContender:
    name = "streamgru"

    def __init__(self, model, threads, weights=None):
        self.engine = Engine(model, threads=threads, weights=weights)
        self.threads = threads
        if weights is not None:
            self.name = f"streamgru_{weights}"

    def open(self, keys):
        state = np.zeros(self.engine.model.state_size, np.float32)
        for k in keys.tolist():
            if k not in self.engine:
                self.engine.open(k, state)

    def step(self, keys, x):
        return self.engine.step(keys, x)

    def run(self, key, xs):
        return self.engine.run(key, xs)

    def info(self):
        return {"threads": self.threads, "weights": self.engine.weights}


class UserStoreContender:
    """A contender that keeps the streams' states in a :class:`UserStore`: the gather / run /
    scatter of the framework contenders. A subclass sets ``name`` and implements
    ``_forward(x, states) -> (y, new_states)`` (or overrides ``_step_rows``)."""

    def __init__(self, model, threads):
        self.model = model
        self.threads = threads
        self.store = UserStore(model.state_size, 1)

    def open(self, keys):
        self.store.slots(np.asarray(keys))

    def step(self, keys, x):
        slots = self.store.slots(keys)
        waves = UserStore.waves(slots)
        if waves is None:
            return self._step_rows(slots, x)
        y = np.empty((len(slots), self.model.output_size), np.float32)
        for rows in waves:
            y[rows] = self._step_rows(slots[rows], x[rows])
        return y

    def _step_rows(self, slots, x):
        states = self.store.states
        y, new = self._forward(x, states[slots])  # fancy indexing: a gathered copy
        states[slots] = new
        return y

    def run(self, key, xs):
        ys = np.empty((len(xs), self.model.output_size), np.float32)
        keys = np.array([key])
        for t in range(len(xs)):
            ys[t] = self.step(keys, xs[t:t + 1])[0]
        return ys


def _check_same_weights(model, other, who):
    """Refuse to benchmark a contender whose weights (read back by our converter) differ: the
    same kinds of layer in the same order, each with the same tensors (``Layer.tensors()``)."""
    kinds = [layer.kind for layer in model.layers]
    if [layer.kind for layer in other.layers] != kinds:
        raise RuntimeError(f"{who}: converter read layers {[ly.kind for ly in other.layers]}, "
                           f"expected {kinds}")
    for a, b in zip(model.layers, other.layers):
        mine, theirs = a.tensors(), b.tensors()
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"{who}: converter read tensors {sorted(theirs)} for a {a.kind} "
                               f"layer, expected {sorted(mine)}")
        for nm, t in mine.items():
            if not np.array_equal(np.asarray(t, np.float32), np.asarray(theirs[nm], np.float32)):
                raise RuntimeError(f"{who}: converter read different {nm} for a {a.kind} layer")


class OrtContender(UserStoreContender):
    """onnxruntime, ``run`` or (``iobinding=True``) ``run_with_iobinding`` on pre-bound buffers."""

    def __init__(self, model, threads, iobinding=False):
        import onnxruntime as ort

        from converters import from_onnx, to_onnx

        super().__init__(model, threads)
        self.name = "ort_iobinding" if iobinding else "ort_run"
        onnx_model = to_onnx(model)  # one step for a batch: (x, state) -> (y, state_out)
        _check_same_weights(model, from_onnx(onnx_model), "onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(onnx_model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
        self.iobinding = iobinding
        self._bound = {}
        self.ort_version = ort.__version__

    def _forward(self, x, state):
        return self.sess.run(["y", "state_out"], {"x": x, "state": state})

    def _step_rows(self, slots, x):
        if not self.iobinding:
            return super()._step_rows(slots, x)
        # The savvy user: gather straight into the bound input buffers, scatter from the outputs.
        io, bufs = self._binding(len(slots))
        states = self.store.states
        bufs["x"][:] = x
        np.take(states, slots, axis=0, out=bufs["state"])
        self.sess.run_with_iobinding(io)
        states[slots] = bufs["state_out"]
        return bufs["y"].copy()

    def _binding(self, n):
        got = self._bound.get(n)
        if got is not None:
            return got
        io = self.sess.io_binding()
        S = self.model.state_size
        bufs = {"x": np.zeros((n, self.model.input_size), np.float32),
                "state": np.zeros((n, S), np.float32), "state_out": np.zeros((n, S), np.float32),
                "y": np.zeros((n, self.model.output_size), np.float32)}
        for name, arr in bufs.items():
            if name in ("y", "state_out"):
                io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            else:
                io.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        self._bound[n] = (io, bufs)
        return io, bufs

    def info(self):
        return {"threads": self.threads, "intra_op_num_threads": self.threads,
                "onnxruntime": self.ort_version}


class OrtSequence:
    """onnxruntime running a whole T-step sequence of one stream in one call (the ``run`` peer)."""

    name = "ort_sequence"

    def __init__(self, model, threads):
        import onnxruntime as ort

        from converters import to_onnx

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.threads = threads
        # x (time, batch, input_size): the whole sequence in one call
        self.sess = ort.InferenceSession(to_onnx(model, sequence=True).SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
        self.state = np.zeros((1, model.state_size), np.float32)

    def open(self, keys):
        pass

    def run(self, key, xs):
        y, self.state = self.sess.run(["y", "state_out"], {"x": xs[:, None, :], "state": self.state})
        return y[:, 0]

    def info(self):
        return {"threads": self.threads, "intra_op_num_threads": self.threads}


class TorchContender(UserStoreContender):
    """PyTorch: ``converters.to_torch`` (``nn.GRUCell`` per GRU layer, ``nn.LSTMCell`` per LSTM
    layer, ``nn.Linear`` + activation per Dense layer) under ``torch.inference_mode``.

    A model with a recurrent layer torch has no module for (a GRU with other activations,
    ``clip`` or ``linear_before_reset=0``; an LSTM with peepholes, ``clip``, ``input_forget`` or
    other activations) is refused with ``ValueError``: ``to_torch`` would run it as torch
    operations written by us, which is not torch's kernel."""

    name = "torch"

    def __init__(self, model, threads):
        import torch

        from converters import from_torch, to_torch

        super().__init__(model, threads)
        nn = torch.nn
        torch.set_num_threads(threads)
        self.torch = torch
        self.net = to_torch(model)
        # Read torch's own modules back with the importer: the same weights as the engine's.
        native = [m for m in self.net.modules()
                  if isinstance(m, (nn.GRUCell, nn.LSTMCell, nn.LSTM, nn.Linear))]
        cells = [type(m).__name__ for m in native if not isinstance(m, nn.Linear)]
        if len(cells) != len(model.recurrent_layers):
            raise ValueError(f"torch: expected recurrent layers torch runs natively (nn.GRUCell: "
                             f"sigmoid/tanh, linear_before_reset=1, no clip; nn.LSTMCell: "
                             f"sigmoid/tanh/tanh, no peepholes, clip or input_forget), got "
                             f"{len(model.recurrent_layers)} recurrent layers of which torch "
                             f"runs {len(cells)} ({', '.join(cells) or 'none'})")
        _check_same_weights(model, from_torch(nn.Sequential(*native)), "torch")
        self.torch_version = torch.__version__

    def _forward(self, x, state):
        torch = self.torch
        with torch.inference_mode():
            y, new = self.net(torch.from_numpy(x), torch.from_numpy(state))
            return y.numpy(), new.numpy()

    def info(self):
        return {"threads": self.threads, "torch_num_threads": self.threads,
                "torch": self.torch_version}


def make_contender(name, model, threads):
    """A contender by name (see :data:`CONTENDERS`), weights checked, ready to time."""
    if name == "streamgru":
        return StreamgruContender(model, threads)
    if name in COMPACT_CONTENDERS:
        return StreamgruContender(model, threads, weights=name.split("_", 1)[1])
    if name == "ort_run":
        return OrtContender(model, threads)
    if name == "ort_iobinding":
        return OrtContender(model, threads, iobinding=True)
    if name == "ort_sequence":
        return OrtSequence(model, threads)
    if name == "torch":
        return TorchContender(model, threads)
    raise ValueError(f"contender: expected one of "
                     f"{CONTENDERS + COMPACT_CONTENDERS + ('ort_sequence',)}, got {name!r}")


# ----------------------------------------------------------------------------------------------
# timing


def time_calls(fn, args_list, min_seconds, min_calls=5, max_calls=100_000):
    """Call ``fn(*args)`` cycling over ``args_list`` for about ``min_seconds``; seconds per call."""
    out = []
    t_end = time.perf_counter() + min_seconds
    i = 0
    m = len(args_list)
    perf = time.perf_counter
    while (perf() < t_end or len(out) < min_calls) and len(out) < max_calls:
        a = args_list[i % m]
        i += 1
        t0 = perf()
        fn(*a)
        out.append(perf() - t0)
    return out


_SGEMM = """
import json, sys, time, numpy as np
out = {}
try:
    import threadpoolctl
    info = [i for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
    out["openblas_architecture"] = info[0].get("architecture") if info else None
except ImportError:
    out["openblas_architecture"] = None
n = int(sys.argv[1])
a = np.random.default_rng(0).random((n, n), dtype=np.float32)
c = np.empty_like(a)
np.matmul(a, a, out=c)
best = 1e9
for _ in range(5):
    t0 = time.perf_counter(); np.matmul(a, a, out=c); best = min(best, time.perf_counter() - t0)
out["gflops"] = 2 * n ** 3 / best / 1e9
print(json.dumps(out))
"""


def sgemm_gflops(threads, size=2048, clean_env=True, coretype=None):
    """numpy float32 matmul (size^3) GFLOP/s on ``threads`` BLAS threads, in a subprocess.

    ``clean_env`` drops OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE there, so OpenBLAS picks its best
    kernel for this CPU; ``coretype`` then names the kernel instead (``OPENBLAS_CORETYPE``, e.g.
    ``"Haswell"``: see :func:`same_isa_coretype`). Returns a dict with ``gflops`` and
    ``openblas_architecture`` (from threadpoolctl, if installed: check it, OpenBLAS falls back
    to its own pick for a name it does not know).
    """
    import subprocess

    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    if clean_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    res = subprocess.run([sys.executable, "-c", _SGEMM, str(size)], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_isa_coretype(tile=TILE, machine=None):
    """The OpenBLAS kernel (``OPENBLAS_CORETYPE``) whose sgemm uses the vector registers the
    kernels were built for, or None when OpenBLAS's own pick for the host does.

    The engine's many-stream products are judged against the sgemm peak of the same ISA: an
    AVX2 build (``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=""``) on an AVX-512 host against
    OpenBLAS's Haswell kernel, not the SkylakeX kernel the host would pick. On an AVX2 host
    Haswell is OpenBLAS's own kernel for it (its Zen kernel is the same code). A 16-byte
    (``vec16``) build on x86 gets the SSE kernel (Nehalem); on other machines (aarch64 NEON)
    OpenBLAS's own pick is the same-ISA one.

    >>> from streamgru.isa import make_config
    >>> same_isa_coretype(make_config("avx2", "haswell", 16, True), "x86_64")
    'Haswell'
    >>> same_isa_coretype(make_config("avx512", "znver4", 32, True), "x86_64") is None
    True
    """
    machine = machine or platform.machine()
    if tile.name == "avx2":
        return "Haswell"
    if tile.name == "vec16" and machine in ("x86_64", "AMD64"):
        return "Nehalem"
    return None


def measure_peaks(threads, size, coretype, sgemm=sgemm_gflops):
    """The sgemm peaks of a bench run: ``{"sgemm": {t: ...}, "peaks": {t: GFLOP/s}}``, and
    ``"sgemm_same_isa"`` too when ``coretype`` names the kernel of the build's ISA
    (:func:`same_isa_coretype`). Each entry is :func:`sgemm_gflops`'s dict, or ``{"error": ...}``
    when the measurement failed (a missing peak must not lose the run's results). ``peaks``
    holds the judge per thread count: the same-ISA figure when there is one, and only if
    OpenBLAS ran that kernel (threadpoolctl's name for it; another BLAS, or an OpenBLAS without
    it, gives no same-ISA peak rather than a wrong one)."""
    out = {"sgemm": {}, "peaks": {}}
    if coretype:
        out["sgemm_same_isa"] = {}
    for t in threads:
        for key, kw in (("sgemm", {}), ("sgemm_same_isa", {"coretype": coretype})):
            if key not in out:
                continue
            try:
                out[key][t] = sgemm(t, size, **kw)
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                out[key][t] = {"error": str(exc)}
        judge = out["sgemm_same_isa"][t] if coretype else out["sgemm"][t]
        if coretype and "gflops" in judge and judge.get("openblas_architecture") != coretype:
            judge["error"] = (f"OpenBLAS ran {judge.get('openblas_architecture')!r}, not "
                              f"{coretype!r}: no same-ISA peak")
            del judge["gflops"]
        if "gflops" in judge:
            out["peaks"][t] = judge["gflops"]
    return out


#: Rows from this many events per call on get a peak line (:func:`peak_report`): their products
#: are long enough to be bound by the multiply-adds, which the sgemm peak measures. Fewer rows are
#: bound by reading the weights (or by call overheads), for which that peak says nothing.
PEAK_MIN_ROWS = 1024


def peak_report(results, peaks):
    """The engine's share of the sgemm peak, and what the peak allows against each peer.

    ``peaks``: {threads: GFLOP/s} (the same-ISA sgemm peak per thread count). For every
    streamgru row with at least :data:`PEAK_MIN_ROWS` events per call (not ``run`` rows) and a
    peak for its thread count: ``fraction`` = its GFLOP/s over the peak, and for each peer
    ``speedup`` (measured, peer median over streamgru's) and ``bound``: peak over the peer's
    GFLOP/s, the speed-up of a step that did nothing but its products, at the sgemm peak. An aim
    above ``bound`` needs products faster than OpenBLAS's at its best size (2048^3), with the
    cells, gathers and checks free. Counted GFLOP are the products' (every contender runs the
    same ones), so a row can reach slightly past 1.0 when the engine's products beat that sgemm.

    Returns a list of dicts: ``workload``, ``threads``, ``gflops``, ``peak``, ``fraction`` and
    ``peers`` ({peer: {"speedup", "bound"}}).
    """
    by = {}
    for r in results:
        by.setdefault((r.workload, r.threads), {})[r.contender] = r
    out = []
    for (wl, t), rows in by.items():
        me = rows.get("streamgru")
        peak = peaks.get(t)
        if me is None or not peak or me.n < PEAK_MIN_ROWS or wl.startswith("run"):
            continue
        peers = {name: {"speedup": r.median_us / me.median_us, "bound": peak / r.gflops}
                 for name, r in rows.items() if name != "streamgru" and r.gflops > 0}
        out.append({"workload": wl, "threads": t, "gflops": me.gflops, "peak": peak,
                    "fraction": me.gflops / peak, "peers": peers})
    return out


def format_peak_report(report):
    """:func:`peak_report` as lines for people."""
    lines = []
    for e in report:
        peers = ", ".join(f"{name} {p['speedup']:.2f}x (bound {p['bound']:.2f}x)"
                          for name, p in e["peers"].items())
        lines.append(f"{e['workload']}, {e['threads']}t: {e['gflops']:.1f} GFLOP/s, "
                     f"{100 * e['fraction']:.0f}% of the sgemm peak ({e['peak']:.0f})"
                     + (f"; {peers}" if peers else ""))
    return "\n".join(lines)


# A new process's start, in phases (seconds of wall clock): import and load the model and build
# the engine; the first one-event step (of a new stream); the first batch; the first run. A batch
# size of 0 stops after the first step. The script uses the public API alone, so it times any
# tree put first on PYTHONPATH.
_START_PHASES = ("import+load", "first step", "first batch", "first run")
_START_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import streamgru
model = streamgru.load(sys.argv[1])
engine = streamgru.Engine(model)
t1 = time.perf_counter()
engine.step(["first"], np.zeros((1, model.input_size), np.float32))
t2 = time.perf_counter()
n = int(sys.argv[2])
if n == 0:  # the first step alone (benchmarks/cold_start.py)
    print(json.dumps([t1 - t0, t2 - t1]))
    sys.exit(0)
engine.step([f"s{i}" for i in range(n)], np.zeros((n, model.input_size), np.float32))
t3 = time.perf_counter()
engine.run("first", np.zeros((100, model.input_size), np.float32))
t4 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2, t4 - t3]))
"""


def start_times(path, batch=256, timeout=1800):
    """Cold and warm start of a new process serving the model file ``path``.

    Two fresh processes share an empty Numba cache directory (``NUMBA_CACHE_DIR``, a temporary
    directory removed afterwards): the first compiles every kernel it calls (cold: a new
    machine, or a container without a warmed cache), the second loads them (warm). Each times
    the phases of ``_START_PHASES``. Wall-clock seconds: on a busy machine, repeat and compare
    medians.

    Returns
    -------
    dict
        ``{"cold": {phase: seconds}, "warm": {phase: seconds}}``.
    """
    import subprocess
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory(prefix="streamgru-start-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", _START_CHILD, str(path), str(batch)],
                                 env=env, capture_output=True, text=True, timeout=timeout)
            if res.returncode != 0:
                raise RuntimeError(f"start timing: the {label} process failed: "
                                   f"{res.stderr.strip().splitlines()[-1:]}")
            out[label] = dict(zip(_START_PHASES, json.loads(res.stdout.strip().splitlines()[-1])))
    return out


def format_start_times(times):
    """The table of :func:`start_times`, with the cold/warm ratio of the time to a first step.

    Examples
    --------
    >>> t = {"cold": dict(zip(_START_PHASES, (0.5, 3.0, 9.0, 4.0))),
    ...      "warm": dict(zip(_START_PHASES, (0.5, 0.3, 0.1, 0.1)))}
    >>> print(format_start_times(t))  # doctest: +NORMALIZE_WHITESPACE
    start (s)  import+load  first step  first batch  first run  total
    cold               0.5         3.0          9.0        4.0   16.5
    warm               0.5         0.3          0.1        0.1    1.0
    to a first step (import and load included): cold 3.5 s, warm 0.8 s, 4.4x
    """
    lines = ["start (s)  " + "  ".join(_START_PHASES) + "  total"]
    for label, t in times.items():
        cells = [f"{t[p]:{len(p)}.1f}" for p in _START_PHASES]
        lines.append(f"{label:9s}  " + "  ".join(cells) + f"  {sum(t.values()):5.1f}")
    cold, warm = (times[k]["import+load"] + times[k]["first step"] for k in ("cold", "warm"))
    lines.append(f"to a first step (import and load included): cold {cold:.1f} s, "
                 f"warm {warm:.1f} s, {cold / warm:.1f}x")
    return "\n".join(lines)


def machine_info():
    """CPU model, core count, library versions and BLAS environment, for the results."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "numba_threading_layer_env": os.environ.get("NUMBA_THREADING_LAYER"),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        info["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    for mod in ("onnxruntime", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    from .. import __version__

    info["streamgru"] = __version__
    info["tile"] = TILE.as_dict()
    return info


@dataclass
class Result:
    """One contender on one workload at one thread count. ``cell``: the kinds of the model's
    recurrent layers (:func:`cell_of`), ``threads``: every contender's thread setting (the
    framework's own names for it are in ``extra``)."""

    workload: str
    contender: str
    threads: int
    median_us: float
    p99_us: float
    events_per_s: float
    n: int
    hidden_size: int
    calls: int
    gflops: float
    cell: str = "gru"
    extra: dict = field(default_factory=dict)


def _flops_per_event(model):
    return sum(2 * (layer.W.size + getattr(layer, "R", layer.W[:0]).size) for layer in model.layers)


# A pause before each contender's turn. The contenders share the process, and a thread pool
# keeps its workers spinning for a while after a parallel call (onnxruntime's by default): on a
# machine with as many cores as threads, the next contender's threads then wait for cores. Run
# back to back after onnxruntime, a two-thread engine `run` (LSTM, H=256, T=100) measured 1.6-2.2
# ms instead of its 1.1 ms alone; a 1 ms pause removed it. A user runs one of them, not both.
SETTLE_SECONDS = 0.02


def run_workload(wl, contenders, threads, seconds, rounds=3, model=None, progress=None):
    """Time every contender on one workload, interleaved in ``rounds`` so that drifting machine
    load hits all of them alike. Returns a list of :class:`Result`."""
    model = model if model is not None else make_model(wl)
    if wl.seq:
        rng = np.random.default_rng(1)
        argsets = [(0, rng.normal(size=(wl.seq, model.input_size)).astype(np.float32))
                   for _ in range(4)]
        names = [c for c in contenders if c != "ort_iobinding"]
        if "ort_run" in names:
            names.insert(names.index("ort_run"), "ort_sequence")
    else:
        argsets = batches(wl, 16)
        names = list(contenders)
    built = {}
    for name in names:
        try:
            c = make_contender(name, model, threads)
        except (ImportError, ValueError, KeyError) as exc:  # framework missing or cannot run it
            if progress:
                progress(f"  {name}: skipped ({exc})")
            continue
        if wl.seq:
            c.open(np.array([0]))
            c.run(*argsets[0])
        else:
            c.open(np.arange(wl.n_streams))
            c.step(*argsets[0])
        built[name] = c
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, c in built.items():
            fn = c.run if wl.seq else c.step
            time.sleep(SETTLE_SECONDS)  # the previous contender's threads stop spinning
            times[name] += time_calls(fn, argsets, seconds / rounds)
    results = []
    events = np.mean([wl.seq if wl.seq else len(a[0]) for a in argsets])
    flops = _flops_per_event(model)
    for name, ts in times.items():
        ts = np.asarray(ts) * 1e6
        med = float(np.median(ts))
        mean = float(ts.mean())
        res = Result(wl.name, name, threads, med, float(np.percentile(ts, 99)),
                     events / mean * 1e6, wl.n if not wl.seq else wl.seq, wl.hidden_size, len(ts),
                     flops * events / med / 1e3, cell=cell_of(model), extra=built[name].info())
        if wl.seq:
            res.extra["us_per_step"] = med / wl.seq
        results.append(res)
        if progress:
            progress(f"  {name:14s} {threads}t  median {med:10.1f} us  p99 {res.p99_us:10.1f} us")
    return results


def speedups(results):
    """{(workload, threads): {peer: peer median / streamgru median}}."""
    by = {}
    for r in results:
        by.setdefault((r.workload, r.threads), {})[r.contender] = r.median_us
    out = {}
    for key, meds in by.items():
        if "streamgru" in meds:
            out[key] = {c: m / meds["streamgru"] for c, m in meds.items() if c != "streamgru"}
    return out


def format_table(results):
    sp = speedups(results)
    lines = [f"{'workload':36s} {'cell':5s} {'thr':>3s} {'contender':14s} {'median us':>11s} "
             f"{'p99 us':>11s} {'events/s':>12s} {'GFLOP/s':>8s} {'sg speed-up':>11s}"]
    for r in results:
        ratio = sp.get((r.workload, r.threads), {}).get(r.contender)
        lines.append(f"{r.workload:36s} {r.cell:5s} {r.threads:3d} {r.contender:14s} {r.median_us:11.1f} "
                     f"{r.p99_us:11.1f} {r.events_per_s:12.0f} {r.gflops:8.1f} "
                     f"{'' if ratio is None else f'{ratio:10.2f}x':>11s}")
    return "\n".join(lines)


def plot(results, path):
    """Latency vs number of streams, one line per contender and thread count, one panel per H
    and one row of panels per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [r for r in results if r.workload.startswith("step ")]
    hs = sorted({r.hidden_size for r in step}) or [0]
    cells = list(dict.fromkeys(r.cell for r in step)) or ["gru"]
    fig, axes = plt.subplots(len(cells), len(hs), figsize=(4.5 * len(hs), 4 * len(cells)),
                             squeeze=False)
    for (cell, H), ax in zip([(c, H) for c in cells for H in hs], axes.flat):
        lines = {}
        for r in step:
            if r.hidden_size == H and r.cell == cell:
                lines.setdefault((r.contender, r.threads), []).append((r.n, r.median_us))
        for (name, t), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{name} {t}t", linestyle="-" if name == "streamgru" else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("streams per call (n)")
        ax.set_ylabel("median us per step call")
        ax.set_title(f"{cell.upper()} H={H}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(p):
    """The options of ``streamgru bench`` (shared by the CLI and :func:`main_bench`)."""
    p.add_argument("--model", help="a model file (any format streamgru.load reads); default: "
                   "the seeded one-layer models of the standard workloads")
    p.add_argument("--threads", type=int, action="append",
                   help="thread count for every contender (repeatable; default: 1 and all cores)")
    p.add_argument("--quick", action="store_true",
                   help="a representative few workloads per cell (about a minute per cell on 2 cores)")
    p.add_argument("--cell", default=",".join(CELLS),
                   help=f"recurrent cells of the standard workloads, comma-separated (default "
                        f"{','.join(CELLS)}; ignored with --model, whose own layers run)")
    p.add_argument("--seconds", type=float, default=None, help="timing per contender/workload")
    p.add_argument("--only", default=None,
                   help="run workloads whose name matches this regular expression (re.search), "
                        "e.g. 'many' or 'n=1$'")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated: " + ", ".join(CONTENDERS) + " (default), and the engine "
                        "with compact weights: " + ", ".join(COMPACT_CONTENDERS))
    p.add_argument("--json", default="bench.json", help="write results here (default bench.json)")
    p.add_argument("--plot", default="bench.png",
                   help="write the latency plot here ('none': no plot)")
    p.add_argument("--no-sgemm", action="store_true", help="skip the sgemm peak measurement")
    p.add_argument("--cluster", action="store_true",
                   help="instead: ShardedEngine on local Ray, Zipf events through 1 and 2 shards "
                        "against a local Engine (needs the ray extra)")
    p.add_argument("--keys", type=int, default=1_000_000, help="--cluster: number of stream keys")


def main_bench(argv=None):
    """``streamgru bench`` as a function: parse ``argv`` and run; returns the exit status."""
    p = argparse.ArgumentParser(prog="streamgru bench",
                                description="streamgru vs onnxruntime vs PyTorch")
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return run_bench(args)


def run_bench(args):
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`)."""
    if getattr(args, "cluster", False):
        return _run_cluster(args)
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    for t in threads:
        if t < 1:
            raise ValueError(f"--threads: expected a positive int, got {t}")
    seconds = args.seconds if args.seconds is not None else (0.25 if args.quick else 1.5)
    if args.only:
        try:
            only = re.compile(args.only)
        except re.error as exc:
            raise ValueError(f"--only: expected a regular expression, got {args.only!r} ({exc})") from None
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if c not in CONTENDERS + COMPACT_CONTENDERS:
            raise ValueError(f"--contenders: expected names from "
                             f"{','.join(CONTENDERS + COMPACT_CONTENDERS)}, got {c!r}")
    cells = [c.strip() for c in getattr(args, "cell", ",".join(CELLS)).split(",") if c.strip()]
    if not cells or not set(cells) <= set(CELLS):
        raise ValueError(f"--cell: expected names from {','.join(CELLS)}, got {args.cell!r}")
    model = None
    if args.model:
        from ..formats import load

        model = load(args.model)
        wls = [Workload(f"step n={n} ({os.path.basename(args.model)})", model.input_size,
                        getattr(model.layers[-1], "hidden_size", model.output_size), n,
                        layers="file", cell=cell_of(model))
               for n in ((1, 16, 256) if args.quick else GRID_N)]
    else:
        wls = standard_workloads(quick=args.quick, cells=list(dict.fromkeys(cells)))
    if args.only:
        wls = [w for w in wls if only.search(w.name)]
    info = machine_info()
    info["command"] = " ".join(["streamgru", "bench"] + getattr(args, "argv", sys.argv[2:]))
    print(f"streamgru bench: {len(wls)} workloads x {len(contenders)} contenders x threads "
          f"{threads}; {info['cpu']}, {info['cores']} cores", flush=True)
    print(f"kernels: {TILE.describe()}", flush=True)
    results = []
    t0 = time.perf_counter()
    for i, wl in enumerate(wls):
        for t in threads:
            print(f"[{i + 1}/{len(wls)}] {wl.name}, {t} thread(s)", flush=True)
            results += run_workload(wl, contenders, t, seconds, model=model,
                                    progress=lambda s: print(s, flush=True))
    peaks = {}
    if not args.no_sgemm:
        coretype = same_isa_coretype()
        info.update(measure_peaks(threads, 1024 if args.quick else 2048, coretype))
        peaks = info.pop("peaks")
    print()
    print(format_table(results))
    for key, what in (("sgemm", "sgemm peak (numpy"),
                      ("sgemm_same_isa", f"same-ISA sgemm peak (the {TILE.name} build")):
        for t, s in info.get(key, {}).items():
            if "gflops" in s:
                print(f"{what}, {t} thread(s), OpenBLAS kernel "
                      f"{s.get('openblas_architecture')}): {s['gflops']:.0f} GFLOP/s")
            else:
                print(f"{what}, {t} thread(s)): not measured ({s['error']})")
    report = peak_report(results, peaks)
    if report:
        info["peak_report"] = report
        print("\nrows of many events against the same-ISA sgemm peak (bound: a step of nothing "
              "but its products at that peak, against the peer):")
        print(format_peak_report(report))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": [asdict(r) for r in results],
                       "speedups": {f"{w} | {t}t": v for (w, t), v in speedups(results).items()}},
                      f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot and args.plot.lower() != "none":
        try:
            plot(results, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot: matplotlib is not installed (pip install streamgru[bench])",
                  file=sys.stderr)
    return 0


def _run_cluster(args):
    """``streamgru bench --cluster``: see :func:`streamgru.harness.cluster_bench.run_cluster_benchmark`."""
    if args.keys < 1:
        raise ValueError(f"--keys: expected a positive int, got {args.keys}")
    from .cluster_bench import run_cluster_benchmark

    res = run_cluster_benchmark(keys=args.keys, batches=40 if args.quick else 200,
                                fill=not args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0
