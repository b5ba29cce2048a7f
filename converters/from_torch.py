"""Convert PyTorch GRU and LSTM models (modules, state_dicts, ``.pt``/``.safetensors``/``.json``).

What is read
------------
Recurrent weights are found by their standard names under any prefix: ``*weight_ih_l{k}``,
``*weight_hh_l{k}``, ``*bias_ih_l{k}``, ``*bias_hh_l{k}`` (and ``*weight_hr_l{k}``, an LSTM's
projection) for ``nn.GRU``/``nn.LSTM`` (one streamgru layer per ``k``) and ``*weight_ih``,
``*weight_hh``, ``*bias_ih``, ``*bias_hh`` for ``nn.GRUCell``/``nn.LSTMCell``. The names are the
same for a GRU and an LSTM: the shapes tell them apart (``weight_hh`` is (3H, H) for a GRU, (4H, H)
for an LSTM, (4H, proj_size) next to a ``weight_hr`` (proj_size, H) for a projected LSTM), and
layers of one module that read as different kinds are refused. Every other ``*.weight (O, I)``
(+ optional ``*.bias (O,)``) is an ``nn.Linear``. Any key that is none of these is refused: a
converter never drops a tensor it does not run.

PyTorch computes (gates r, z, n; ``b_hn`` inside the reset product)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

which is streamgru's canonical GRU with ``linear_before_reset=1``, ``Wb = b_ih``, ``Rb = b_hh``,
once the r and z blocks are swapped (see :mod:`streamgru.layers.gru`). An ``nn.LSTM`` layer is
the canonical LSTM (:mod:`streamgru.layers.lstm`) with its gate blocks (i, f, g, o) reordered to
(i, o, f, c), ``Wb = b_ih``, ``Rb = b_hh``, ``proj = weight_hr``, (sigmoid, tanh, tanh), no
peepholes, no clip; its stream state is h (proj_size or H) then c (H), per layer.

Order of the layers
-------------------
A state_dict does not say in which order its modules run. The converter orders them by shape
chaining (each layer's input size equals the previous one's output size) and refuses when more
than one order fits, listing the candidates; ``layers=[...]`` names the prefixes in order and
settles it. One case is resolved without ``layers=``: when the model's input size equals its
output size (``GRU(1, 8)`` then ``Linear(8, 1)``), the chain closes into a cycle and every
rotation of it fits; shapes then fix everything but where the cycle starts, and the converter
starts it where the state_dict's key order (PyTorch's module registration order) does, provided
that order itself chains (a ``.safetensors`` file stores its keys sorted, so there the
converter asks for ``layers=``; write ``.json`` files without ``sort_keys``). Two different
cycles (e.g. ``GRU(1, 8)``, two ``GRU(8, 8)`` that could swap, ``Linear(8, 1)``), and a cycle
that looks the same from several starts (two ``GRU(8, 8)`` alone), are refused.

An ``nn.Sequential`` fixes the order of its items, and there (only there) activation modules
that follow an ``nn.Linear`` become that Dense layer's activation. Activations applied in
a custom ``forward()`` (``torch.relu(self.fc(h))``) are invisible in a module's structure and in
a state_dict: such a model converts with identity Dense layers, so wrap the head in an
``nn.Sequential`` or check the result with ``converters.verify``. Activation *modules* held by a
custom module outside any ``nn.Sequential`` are refused for the same reason.

Inference-only attributes are not part of the computation: ``batch_first`` (input layout),
``dropout`` and ``nn.Dropout`` (identity at inference).
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np

from streamgru.errors import FormatError, UnsupportedModelError
from streamgru.formats import check_size, content_errors, read_file, read_json
from streamgru.model import DenseLayer, GRULayer, GRUModel, LSTMLayer

from ._util import ifco_to_iofc, require, swap_rz, target_dtype

# ordered_units is the hook converters.verify rebuilds its torch reference from.
__all__ = ["from_torch", "ordered_units"]

# prefix (optional, dotted) + GRU/LSTM tensor name + optional _l{k} + optional _reverse.
_RNN_KEY = re.compile(
    r"^(?:(?P<prefix>.*)\.)?(?P<name>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)"
    r"(?:_l(?P<layer>\d+))?(?P<reverse>_reverse)?$"
)
_LINEAR_KEY = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<name>weight|bias)$")
_MAX_CANDIDATES = 6


def from_torch(obj, *, layers=None, dtype=None) -> GRUModel:
    """Convert a PyTorch GRU/LSTM model into a :class:`streamgru.GRUModel`.

    Parameters
    ----------
    obj : nn.Module, mapping, str or os.PathLike
        One of

        * an ``nn.GRU`` or ``nn.LSTM`` (any ``num_layers``, with or without bias,
          ``batch_first`` either way, an LSTM's ``proj_size``), an ``nn.GRUCell`` or an
          ``nn.LSTMCell``;
        * an ``nn.Module`` holding such modules and ``nn.Linear`` layers (see the module
          docstring for how their order is found and which activations are seen);
        * a state_dict: a mapping of names to torch tensors, numpy arrays or nested lists;
        * a path to a ``.pt``/``.pth`` state_dict (read with ``torch.load(weights_only=True)``;
          a pickled whole module is refused, save ``model.state_dict()`` instead), a
          ``.safetensors`` file (read with ``safetensors.numpy``, torch not needed) or a
          ``.json`` file holding ``{name: nested list}``.
    layers : list of str, optional
        The module prefixes in execution order, e.g. ``["gru", "gru2", "dense"]``. Needed only
        when shapes alone allow several orders; every GRU/LSTM/Linear prefix must appear
        exactly once.
        A prefix of an ``nn.Sequential`` stands for its layers in their order.
    dtype : {None, "float32", "float64"}
        None keeps the source dtype (float16/bfloat16 are widened to float32); otherwise every
        tensor is cast.

    Returns
    -------
    GRUModel
        GRU layers with ``linear_before_reset=1``, LSTM layers; the stream state is the
        concatenation of the layers' states, i.e. PyTorch's ``h_0[:, b, :].reshape(-1)`` for one
        ``nn.GRU``, and per layer k ``h_0[k, b]`` then ``c_0[k, b]`` for an ``nn.LSTM``.

    Raises
    ------
    UnsupportedModelError
        Bidirectional GRUs/LSTMs (streaming cannot see the future), vanilla RNN weights,
        modules or keys streamgru does not run, an ambiguous or impossible layer order.
    ValueError, TypeError
        Missing keys, wrong shapes, non-float or non-finite weights (the message names the torch
        key). From a file these are a FormatError (a ValueError) naming the file, as is a file
        that cannot be read: damaged, a legacy (pre-1.6, non-zip) ``.pt``, or larger than
        ``streamgru.formats.MAX_READ_BYTES``.

    Examples
    --------
    >>> import torch
    >>> from converters.from_torch import from_torch
    >>> _ = torch.manual_seed(0)
    >>> model = from_torch(torch.nn.GRU(3, 8, num_layers=2))
    >>> model.input_size, model.state_size, model.layers[0].linear_before_reset
    (3, 16, 1)
    >>> sd = {"gru.weight_ih_l0": [[0.1]] * 6, "gru.weight_hh_l0": [[0.2, 0.0]] * 6,
    ...       "head.weight": [[1.0, -1.0]] * 3, "head.bias": [0.5] * 3}
    >>> [layer.kind for layer in from_torch(sd).layers]
    ['gru', 'dense']
    """
    target = target_dtype(dtype)
    if isinstance(obj, (str, os.PathLike)):
        _layers_arg(layers)  # an argument error, before the file's contents are judged
        with content_errors(obj):
            return _build(ordered_units(obj, layers), target)
    return _build(ordered_units(obj, layers), target)


def _layers_arg(layers):
    if layers is not None and (isinstance(layers, str)
                               or not all(isinstance(n, str) for n in layers)):
        raise TypeError(f"layers: expected a list of module prefixes (str), got {layers!r}")
    return None if layers is None else list(layers)


def ordered_units(obj, layers):
    """The source's GRU/LSTM/cell/Linear units in execution order, as :func:`from_torch` reads them.

    Public for :func:`converters.verify`, which rebuilds its torch reference from exactly the
    units (and the order) the conversion used. ``obj`` and ``layers`` are from_torch's.
    """
    keyed = True
    layers = _layers_arg(layers)

    if isinstance(obj, (str, os.PathLike)):
        tensors = _load_file(obj)
        # safetensors stores its keys sorted: the registration order is lost.
        keyed = not os.fspath(obj).lower().endswith(".safetensors")
        units = _parse_state_dict(tensors, "state_dict")
        blocks = [[u] for u in units.values()]
    elif isinstance(obj, Mapping):
        tensors = _to_arrays(obj, "state_dict")
        units = _parse_state_dict(tensors, "state_dict")
        blocks = [[u] for u in units.values()]
    else:
        torch = require("torch", "torch")
        if not isinstance(obj, torch.nn.Module):
            raise TypeError(
                "obj: expected an nn.Module, a state_dict mapping or a path to a .pt/.pth/"
                f".safetensors/.json file, got {type(obj).__name__}"
            )
        walker = _ModuleWalker(torch, resolve=layers is None)
        walker.check(obj)  # refuse by module type first: the messages can name the type
        tensors = _to_arrays(obj.state_dict(), "state_dict")
        units = walker.units = _parse_state_dict(tensors, "state_dict")
        blocks = walker.blocks(obj, "")
        placed = {u.prefix for b in blocks for u in b}
        stray = [p for p in units if p not in placed]
        if stray:
            raise UnsupportedModelError(
                f"obj: expected every tensor to belong to a GRU, LSTM, cell or Linear module, got "
                f"tensors under {stray} that do not; streamgru will not drop them"
            )

    if not units:
        raise UnsupportedModelError(
            "obj: expected GRU or LSTM weights (*weight_ih_l0, *weight_hh_l0, ...), got none"
        )
    if layers is not None:
        ordered = _order_by_names(layers, blocks, units)
    else:
        ordered = _order_by_shape(blocks, "obj", keyed=keyed)
    return ordered


# --------------------------------------------------------------------------------------------
# Reading sources into {key: np.ndarray}




# What torch.load raises on a damaged file (found by fuzzing torch 2.x with truncations, bit
# flips and inflated size fields): the zip reader's RuntimeError, the unpickler's EOFError,
# KeyError, IndexError, ValueError (UnicodeDecodeError), AttributeError, struct.error and
# UnpicklingError (torch re-raises the standard library's).
_TORCH_LOAD_ERRORS = (RuntimeError, EOFError, KeyError, IndexError, ValueError, AttributeError,
                      TypeError, struct.error)


def _load_pt(name, torch):
    """torch.load(weights_only=True) of a file read with the size limit, in torch's zip format."""
    data = read_file(name)
    # The legacy (pre-1.6, non-zip) format makes torch allocate each storage at the size its
    # pickle claims before reading it: a small file could ask for gigabytes. The zip format's
    # records have sizes we check here, and torch checks each storage against its record.
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            check_size(name, "the archive's records once decompressed",
                       sum(i.file_size for i in z.infolist()))
    except zipfile.BadZipFile as exc:
        raise FormatError(
            f"path: expected a .pt file in torch's zip format (torch.save since PyTorch 1.6), got "
            f"{name!r} that is not one ({exc}); the legacy format is not read, because its "
            f"storage sizes cannot be checked before torch allocates them: re-save the "
            f"state_dict with a current torch.save"
        ) from exc
    unpickling_error = torch.serialization.pickle.UnpicklingError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (unpickling_error, *_TORCH_LOAD_ERRORS) as exc:
        text = str(exc)
        found = re.search(r"GLOBAL (\S+)", text)
        if found or "TorchScript" in text:
            what = f" (it needs {found.group(1)})" if found else ""
            raise UnsupportedModelError(
                f"path: expected a state_dict saved with torch.save(model.state_dict(), path), "
                f"got a file that only full unpickling could read{what}; streamgru loads .pt "
                f"files with torch.load(weights_only=True) and never runs pickled code: "
                f"re-save it with torch.save(model.state_dict(), {name!r})"
            ) from exc
        raise FormatError(
            f"path: expected a readable torch.save file, got {name!r} that torch cannot read "
            f"({type(exc).__name__}: {text[:200]})"
        ) from exc


def _load_file(path):
    name = os.fspath(path)
    ext = os.path.splitext(name)[1].lower()
    if ext in (".pt", ".pth"):
        torch = require("torch", "torch")
        loaded = _load_pt(name, torch)
        if not isinstance(loaded, Mapping):
            raise UnsupportedModelError(
                f"path: expected a state_dict (a mapping of names to tensors), got "
                f"{type(loaded).__name__}; save model.state_dict()"
            )
        return _to_arrays(loaded, "state_dict")
    if ext == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_bytes

        data = read_file(name)
        try:
            # safetensors checks the header (size, shapes, offsets within the data) before it
            # allocates anything: a header claiming absurd sizes is refused here.
            # Sorted, as safe_open lists them: the file does not keep the registration order.
            loaded = dict(sorted(load_bytes(data).items()))
        except TypeError as exc:  # e.g. bfloat16, which numpy does not have
            raise UnsupportedModelError(
                f"path: expected float32/float64/float16 tensors in {name!r}, got {exc}; "
                f"re-save them as float32"
            ) from exc
        except SafetensorError as exc:
            raise FormatError(
                f"path: expected a valid safetensors file, got {name!r} that is not one ({exc})"
            ) from exc
        return _to_arrays(loaded, "state_dict")
    if ext == ".json":
        loaded = read_json(name)
        if not isinstance(loaded, Mapping):
            raise TypeError(
                f"path: expected a JSON object of {{name: nested list}}, got "
                f"{type(loaded).__name__} in {name!r}"
            )
        return _to_arrays(loaded, "state_dict")
    raise ValueError(
        f"path: expected a file ending in .pt, .pth, .safetensors or .json, got {name!r}"
    )


def _to_arrays(mapping, what):
    """{key: tensor | ndarray | nested list} -> {key: float ndarray}, keeping the key order.

    float16/bfloat16 are widened to float32; integer, bool and complex tensors are refused (the
    message names the key). Nested lists are literals and are read as float64.
    """
    out = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: expected str keys, got {key!r}")
        out[key] = _to_array(value, key)
    return out


def _to_array(value, key):
    if isinstance(value, np.ndarray):
        arr = value
    elif type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()  # float16 / bfloat16: numpy has no bfloat16, widen to float32
        arr = t.numpy()
    elif isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{key}: expected a nested list of numbers, got {exc}") from None
    elif isinstance(value, Mapping):
        raise UnsupportedModelError(
            f"{key}: expected a tensor, got a nested mapping (keys {list(value)[:5]}); if this is "
            f"a training checkpoint, pass the state_dict inside it, e.g. obj[{key!r}]"
        )
    else:
        raise TypeError(
            f"{key}: expected a tensor, numpy array or nested list, got {type(value).__name__}"
            + ("; if this is a training checkpoint, pass only its state_dict"
               if isinstance(value, (int, float, str, bool)) else "")
        )
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"{key}: expected a float32 or float64 tensor, got dtype {arr.dtype}; "
            f"weights must be floating point (cast with .float())"
        )
    return arr


# --------------------------------------------------------------------------------------------
# Grouping keys into units: one nn.GRU/nn.LSTM (1..L layers), one cell or one nn.Linear


#: unit kind -> the torch module it stands for.
_KIND_NAMES = {"gru": "GRU", "cell": "GRUCell", "lstm": "LSTM", "lstmcell": "LSTMCell",
               "linear": "Linear"}


class _Unit:
    """One torch module's tensors. ``kind`` is a key of :data:`_KIND_NAMES`.

    For the recurrent kinds: ``layers`` is a list of dicts {role: (key, array)} with roles
    weight_ih (G*H, I), weight_hh (G*H, H_out) and optionally bias_ih, bias_hh (G*H,), G = 3 for
    a GRU, 4 for an LSTM, whose layers may also hold weight_hr (H_out, H) (then H_out is
    proj_size, else H). For "linear": ``linear`` is {role: (key, array)} with weight (O, I) and
    optionally bias (O,).
    """

    def __init__(self, prefix, kind):
        self.prefix = prefix
        self.kind = kind
        self.layers = []
        self.linear = {}
        self.activation = "identity"
        self.activation_from = None

    @property
    def label(self):
        return self.prefix or "<root>"

    @property
    def input_size(self):
        if self.kind == "linear":
            return self.linear["weight"][1].shape[1]
        return self.layers[0]["weight_ih"][1].shape[1]

    @property
    def output_size(self):
        if self.kind == "linear":
            return self.linear["weight"][1].shape[0]
        return self.layers[-1]["weight_hh"][1].shape[1]

    def describe(self):
        what = _KIND_NAMES[self.kind]
        if self.kind in ("gru", "lstm"):
            what += f" x{len(self.layers)}"
        return f"{self.label!r} ({what} {self.input_size}->{self.output_size})"


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _parse_state_dict(tensors, what):
    """Group a {key: array} mapping into units keyed by prefix, in first-appearance order."""
    rnn = {}  # prefix -> {layer index or None: {role: key}}
    linear = {}  # prefix -> {role: key}
    leftover = []
    for key in tensors:
        m = _RNN_KEY.match(key)
        if m:
            prefix = m.group("prefix") or ""
            if m.group("reverse"):
                raise UnsupportedModelError(
                    f"{key}: bidirectional GRU/LSTM {prefix or '<root>'!r} is not supported: "
                    f"streaming cannot see the future (the reverse direction reads later inputs "
                    f"first)"
                )
            layer = None if m.group("layer") is None else int(m.group("layer"))
            rnn.setdefault(prefix, {}).setdefault(layer, {})[m.group("name")] = key
            continue
        m = _LINEAR_KEY.match(key)
        if m:
            linear.setdefault(m.group("prefix") or "", {})[m.group("name")] = key
            continue
        leftover.append(key)

    clash = sorted(set(rnn) & set(linear))
    if clash:
        p = clash[0]
        raise UnsupportedModelError(
            f"{what}: expected either GRU/LSTM or Linear tensors under prefix {p or '<root>'!r}, "
            f"got both ({sorted(linear[p].values()) + sorted(_flat(rnn[p]))})"
        )
    if leftover:
        raise UnsupportedModelError(
            f"{what}: expected only GRU, GRUCell, LSTM, LSTMCell and Linear tensors, got "
            f"{leftover[:8]}"
            + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
            + "; streamgru does not run the modules they belong to and will not drop them"
        )

    order = []
    for key in tensors:  # first-appearance order of prefixes, used only to rank candidates
        m = _RNN_KEY.match(key) or _LINEAR_KEY.match(key)
        p = m.group("prefix") or ""
        if p not in order:
            order.append(p)
    units = {}
    for prefix in order:
        if prefix in rnn:
            units[prefix] = _rnn_unit(prefix, rnn[prefix], tensors, what)
        else:
            units[prefix] = _linear_unit(prefix, linear[prefix], tensors, what)
    return units


def _flat(by_layer):
    return [k for roles in by_layer.values() for k in roles.values()]


def _rnn_unit(prefix, by_layer, tensors, what):
    """One nn.GRU/nn.LSTM (keys ``*_l{k}``) or GRUCell/LSTMCell (no suffix) unit.

    GRU and LSTM keys have the same names; the shapes tell them apart: ``weight_hh`` is
    (3H, H) for a GRU, (4H, H) for an LSTM, and (4H, proj_size) next to a ``weight_hr`` (proj_size,
    H) for an LSTM with a projection. Every layer of one module must read as the same kind.
    """
    label = prefix or "<root>"
    cell = None in by_layer
    if cell and len(by_layer) > 1:
        raise UnsupportedModelError(
            f"{what}: expected either cell keys (weight_ih) or GRU/LSTM keys (weight_ih_l0) under "
            f"{label!r}, got both ({sorted(_flat(by_layer))})"
        )
    indices = [None] if cell else sorted(by_layer)
    if not cell and indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise ValueError(
            f"{what}: expected GRU/LSTM layers 0..{max(indices)} under {label!r}, got no "
            f"keys for layer(s) {missing} (e.g. {_join(prefix, f'weight_ih_l{missing[0]}')!r})"
        )
    unit, in_size = None, None
    for k in indices:
        roles = by_layer[k]
        sfx = "" if k is None else f"_l{k}"

        def name(role, sfx=sfx):
            return _join(prefix, role + sfx)

        for role in ("weight_ih", "weight_hh"):
            if role not in roles:
                raise ValueError(
                    f"{what}: expected key {name(role)!r} ({label!r} has "
                    f"{sorted(roles.values())}), got no such key"
                )
        if ("bias_ih" in roles) != ("bias_hh" in roles):
            have, lack = ("bias_ih", "bias_hh") if "bias_ih" in roles else ("bias_hh", "bias_ih")
            raise ValueError(
                f"{what}: expected key {name(lack)!r} next to {name(have)!r} (biases come in "
                f"pairs), got no such key"
            )
        whh = tensors[roles["weight_hh"]]
        if whh.ndim != 2 or whh.shape[1] == 0:
            raise ValueError(
                f"{roles['weight_hh']}: expected shape (3*hidden_size, hidden_size) (GRU) or "
                f"(4*hidden_size, hidden_size or proj_size) (LSTM), got {whh.shape}"
            )
        layer = {}
        if "weight_hr" in roles:
            if cell:
                raise UnsupportedModelError(
                    f"{roles['weight_hr']}: expected no projection in a cell (nn.LSTMCell has "
                    f"no proj_size), got one under {label!r}"
                )
            whr = tensors[roles["weight_hr"]]
            if whr.ndim != 2 or whh.shape != (4 * whr.shape[1], whr.shape[0]):
                raise ValueError(
                    f"{roles['weight_hr']}: expected shape (proj_size, hidden_size) with "
                    f"{roles['weight_hh']} (4*hidden_size, proj_size), got {whr.shape} next to "
                    f"{whh.shape}"
                )
            kind, G, H = "lstm", 4, whr.shape[1]
            layer["weight_hr"] = (roles["weight_hr"], whr)
        elif whh.shape[0] == 3 * whh.shape[1]:
            kind, G, H = "gru", 3, whh.shape[1]
        elif whh.shape[0] == 4 * whh.shape[1]:
            kind, G, H = "lstm", 4, whh.shape[1]
        elif whh.shape[0] == whh.shape[1]:
            raise UnsupportedModelError(
                f"{roles['weight_hh']}: expected GRU (3 gates) or LSTM (4 gates) weights, got "
                f"shape {whh.shape}, which is a vanilla RNN; streamgru runs GRUs and LSTMs"
            )
        else:
            raise ValueError(
                f"{roles['weight_hh']}: expected shape (3*hidden_size, hidden_size) (GRU) or "
                f"(4*hidden_size, hidden_size or proj_size) (LSTM), got {whh.shape}"
                + ("; an LSTM with a projection also needs its weight_hr"
                   if whh.shape[0] % 4 == 0 else "")
            )
        if cell:
            kind = {"gru": "cell", "lstm": "lstmcell"}[kind]
        if unit is None:
            unit = _Unit(prefix, kind)
        elif unit.kind != kind:
            # A GRU's (3H, H) and a projected LSTM's (4H', P) with 4H' = 3P and its weight_hr
            # missing look alike: layers of one module that disagree are refused, not guessed.
            raise UnsupportedModelError(
                f"{roles['weight_hh']}: expected {_KIND_NAMES[unit.kind]} weights like those of "
                f"layer 0 under {label!r}, got {_KIND_NAMES[kind]} weights (shape {whh.shape}"
                f"{', with ' + roles['weight_hr'] if 'weight_hr' in roles else ', no weight_hr'}); "
                f"one module's layers are all GRU or all LSTM"
            )
        wih = tensors[roles["weight_ih"]]
        if wih.ndim != 2 or wih.shape[0] != G * H or (in_size is not None and
                                                      wih.shape[1] != in_size):
            want = f"({G * H}, {'input_size' if in_size is None else in_size})"
            raise ValueError(f"{roles['weight_ih']}: expected shape {want}, got {wih.shape}")
        layer.update({"weight_ih": (roles["weight_ih"], wih),
                      "weight_hh": (roles["weight_hh"], whh)})
        for role in ("bias_ih", "bias_hh"):
            if role in roles:
                b = tensors[roles[role]]
                if b.shape != (G * H,):
                    raise ValueError(f"{roles[role]}: expected shape ({G * H},), got {b.shape}")
                layer[role] = (roles[role], b)
        if kind == "lstm" and unit.layers and \
                ("weight_hr" in layer) != ("weight_hr" in unit.layers[0]):
            raise ValueError(
                f"{what}: expected {'a' if 'weight_hr' in unit.layers[0] else 'no'} "
                f"{name('weight_hr')!r} as layer 0 of {label!r} has (proj_size is one setting of "
                f"the module), got {'none' if 'weight_hr' in unit.layers[0] else 'one'}"
            )
        unit.layers.append(layer)
        in_size = whh.shape[1]  # the width of h: hidden_size, or proj_size with a projection
    return unit


def _linear_unit(prefix, roles, tensors, what):
    unit = _Unit(prefix, "linear")
    if "weight" not in roles:
        raise ValueError(
            f"{what}: expected key {_join(prefix, 'weight')!r} next to {roles['bias']!r}, got no "
            f"such key"
        )
    w = tensors[roles["weight"]]
    if w.ndim != 2:
        raise UnsupportedModelError(
            f"{roles['weight']}: expected a 2-D nn.Linear weight (out_features, in_features), "
            f"got shape {w.shape}; streamgru runs only GRU, LSTM, their cells and Linear layers"
        )
    unit.linear["weight"] = (roles["weight"], w)
    if "bias" in roles:
        b = tensors[roles["bias"]]
        if b.shape != (w.shape[0],):
            raise ValueError(f"{roles['bias']}: expected shape ({w.shape[0]},), got {b.shape}")
        unit.linear["bias"] = (roles["bias"], b)
    return unit


# --------------------------------------------------------------------------------------------
# Modules: nn.Sequential fixes an order (and shows activations); anything else is a bag of blocks


class _ModuleWalker:
    """Turn a module tree into blocks: each block is a list of units in a known order.

    Blocks of a custom module are returned unordered (its forward() is not visible); an
    nn.Sequential returns one block. With ``resolve=False`` (``layers=`` given) nested custom
    modules inside a Sequential are not chained by shape: the user's order wins.
    """

    def __init__(self, torch, *, resolve):
        nn = torch.nn
        self.nn = nn
        self.units = {}
        self.resolve = resolve
        self.simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                       nn.Softsign: "softsign"}
        self.skip = (nn.Identity, nn.Dropout)
        self.refused_rnn = (nn.RNN, nn.RNNCell)
        self.rnn_kinds = {nn.GRU: "gru", nn.GRUCell: "cell", nn.LSTM: "lstm",
                          nn.LSTMCell: "lstmcell"}

    def check(self, root):
        """Refuse recurrent layers other than GRU and LSTM, options we do not run, and modules
        that hold tensors of their own but are none of GRU, GRUCell, LSTM, LSTMCell, Linear."""
        nn = self.nn
        for name, module in root.named_modules():
            label = name or "<root>"
            if isinstance(module, self.refused_rnn):
                raise UnsupportedModelError(
                    f"{label} ({type(module).__name__}): expected GRU, GRUCell, LSTM or "
                    f"LSTMCell, got {type(module).__name__}; streamgru does not run vanilla RNNs"
                )
            if isinstance(module, tuple(self.rnn_kinds)):
                self._check_rnn(module, label)
            elif not isinstance(module, nn.Linear) and (module._parameters or module._buffers):
                raise UnsupportedModelError(
                    f"{label} ({type(module).__name__}): expected GRU, GRUCell, LSTM, "
                    f"LSTMCell, Linear, an activation or a container, got a module with its own tensors "
                    f"{sorted(list(module._parameters) + list(module._buffers))}; streamgru "
                    f"does not run it"
                )

    def blocks(self, module, name):
        nn = self.nn
        label = name or "<root>"
        for cls, kind in self.rnn_kinds.items():
            if isinstance(module, cls):
                return [[self._unit(name, kind, module)]]
        if isinstance(module, nn.Linear):
            return [[self._unit(name, "linear", module)]]
        if isinstance(module, nn.Sequential):
            return [self._sequential(module, name)]
        if self._activation(module, label) is not None:
            raise UnsupportedModelError(
                f"{label} ({type(module).__name__}): an activation outside an nn.Sequential; its "
                f"place in forward() is not visible, so streamgru will not guess it: wrap the "
                f"Linear layers and their activations in an nn.Sequential"
            )
        if isinstance(module, self.skip):
            return []
        out = []
        for child_name, child in module.named_children():
            out += self.blocks(child, _join(name, child_name))
        return out

    def _sequential(self, module, name):
        block = []
        pending = None  # the Linear unit an activation may still attach to
        for child_name, child in module.named_children():
            full = _join(name, child_name)
            if isinstance(child, self.skip):
                continue
            act = self._activation(child, full)
            if act is not None:
                if pending is None:
                    after = (f"after {block[-1].label!r} ({block[-1].kind})" if block
                             else "before any Linear layer")
                    raise UnsupportedModelError(
                        f"{full} ({type(child).__name__}): expected an activation right after an "
                        f"nn.Linear, got one {after}; streamgru applies activations only to "
                        f"Dense layers"
                    )
                pending.activation, pending.activation_from = act, full
                pending = None
                continue
            sub = self.blocks(child, full)
            if len(sub) > 1:
                sub = [self._chain(sub, full)]
            if not sub:
                raise UnsupportedModelError(
                    f"{full} ({type(child).__name__}): a step of an nn.Sequential with no GRU, LSTM or "
                    f"Linear layer inside and a forward() streamgru cannot see; it will not be "
                    f"dropped silently"
                )
            block += sub[0]
            last = block[-1]
            # An activation module may follow a Linear directly or a Sequential ending in one; a
            # custom module's forward() may already apply something after its last Linear.
            follows_linear = isinstance(child, (self.nn.Linear, self.nn.Sequential))
            pending = last if (last.kind == "linear" and last.activation_from is None
                               and follows_linear) else None
        if not block:
            raise UnsupportedModelError(
                f"{name or '<root>'} (Sequential): expected at least one GRU, LSTM or Linear layer, "
                f"got none"
            )
        return block

    def _chain(self, blocks, name):
        if len(blocks) <= 1 or not self.resolve:
            return [u for b in blocks for u in b]
        return _order_by_shape(blocks, name or "<root>", top=False)

    def _unit(self, name, kind, module):
        unit = self.units.get(name)
        if unit is None or unit.kind != kind:
            raise UnsupportedModelError(
                f"{name or '<root>'} ({type(module).__name__}): expected its tensors under "
                f"prefix {name!r} in the state_dict, got "
                f"{'none' if unit is None else 'a ' + unit.kind}"
            )
        return unit

    def _check_rnn(self, module, label):
        if getattr(module, "bidirectional", False):
            raise UnsupportedModelError(
                f"{label} ({type(module).__name__}): bidirectional=True is not supported: "
                f"streaming cannot see the future"
            )
        if getattr(module, "proj_size", 0) and not isinstance(module, self.nn.LSTM):
            raise UnsupportedModelError(
                f"{label} ({type(module).__name__}): proj_size={module.proj_size} is not supported"
            )

    def _activation(self, module, label):
        """(name, alpha, beta) spec for a supported activation module, None for non-activations."""
        nn = self.nn
        for cls, act in self.simple.items():
            if type(module) is cls:
                return act
        if type(module) is nn.LeakyReLU:
            return ("leakyrelu", float(module.negative_slope))
        if type(module) is nn.ELU:
            return ("elu", float(module.alpha))
        if type(module) is nn.Hardsigmoid:
            return ("hardsigmoid", 1.0 / 6.0, 0.5)  # relu6(x + 3) / 6
        if type(module) is nn.Softplus:
            if module.beta != 1 or module.threshold < 20:
                raise UnsupportedModelError(
                    f"{label} (Softplus): expected beta=1 and threshold>=20, got "
                    f"beta={module.beta}, threshold={module.threshold}"
                )
            return "softplus"
        if type(module) is nn.Softmax:
            if module.dim != -1:
                raise UnsupportedModelError(
                    f"{label} (Softmax): expected dim=-1 (over the features), got dim="
                    f"{module.dim}; streamgru's softmax normalises each step's feature vector"
                )
            return "softmax"
        activation_types = (nn.GELU, nn.SiLU, nn.Mish, nn.ReLU6, nn.Hardtanh, nn.Hardswish,
                            nn.LogSoftmax, nn.LogSigmoid, nn.PReLU, nn.SELU, nn.CELU, nn.Softmin,
                            nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.GLU)
        if isinstance(module, activation_types):
            raise UnsupportedModelError(
                f"{label} ({type(module).__name__}): activation not supported; streamgru runs "
                f"ReLU, Tanh, Sigmoid, LeakyReLU, ELU, Hardsigmoid, Softsign, Softplus, "
                f"Softmax(dim=-1)"
            )
        return None


# --------------------------------------------------------------------------------------------
# Ordering


def _order_by_names(names, blocks, units):
    """The units in the order ``layers=`` gives; every unit exactly once."""
    seq_blocks = {}
    for b in blocks:
        if len(b) > 1:
            common = os.path.commonprefix([u.prefix.split(".") for u in b])
            seq_blocks[".".join(common)] = b
    out = []
    for n in names:
        if n in units:
            out.append(units[n])
        elif n in seq_blocks:
            out += seq_blocks[n]
        else:
            known = list(units) + [p for p in seq_blocks if p not in units]
            raise ValueError(f"layers: expected prefixes among {known}, got {n!r}")
    seen = [u.prefix for u in out]
    dup = sorted({p for p in seen if seen.count(p) > 1})
    if dup:
        raise ValueError(f"layers: expected each prefix once, got {dup} more than once")
    missing = [p for p in units if p not in seen]
    if missing:
        raise ValueError(
            f"layers: expected every GRU/LSTM/Linear prefix, got no place for {missing}; streamgru "
            f"will not drop a layer"
        )
    for a, b in zip(out[:-1], out[1:], strict=True):
        if a.output_size != b.input_size:
            raise ValueError(
                f"layers: expected {b.label!r} to take the {a.output_size} outputs of "
                f"{a.label!r}, got input size {b.input_size}"
            )
    return out


def _order_by_shape(blocks, what, *, keyed=True, top=True):
    """The unique order of ``blocks`` in which every output size feeds the next input size.

    ``blocks`` come in key (registration) order; ``keyed=False`` when that order is not evidence
    (a .safetensors file sorts its keys). ``top=False`` for the inside of a module nested in
    an nn.Sequential (``layers=`` must still name every layer of the model).
    """
    if len(blocks) == 1:
        return blocks[0]
    found = []
    n = len(blocks)
    cap = n + _MAX_CANDIDATES  # room for every rotation of one cycle, plus a few more
    edges = [(b[0].input_size, b[-1].output_size) for b in blocks]

    def extend(path, used):
        if len(found) > cap:
            return
        if len(path) == n:
            found.append(list(path))
            return
        for i in range(n):
            if i in used:
                continue
            if path and blocks[path[-1]][-1].output_size != blocks[i][0].input_size:
                continue
            used.add(i)
            # Enter only a branch that some complete order finishes: without this, shapes that
            # almost chain (twelve Linear(8, 8) and one that fits nowhere) make the search try
            # every permutation, 12! of them, before it can refuse.
            if _chainable([edges[j] for j in range(n) if j not in used], edges[i][1]):
                path.append(i)
                extend(path, used)
                path.pop()
            used.discard(i)

    if _chainable(edges, None):
        extend([], set())
    shapes = ", ".join(
        u.describe() for b in blocks for u in b
    )
    if not found:
        raise UnsupportedModelError(
            f"{what}: expected the layers to chain by shape (each input size equal to the "
            f"previous output size), got no such order for {shapes}; pass layers=[...] with the "
            f"prefixes in execution order"
        )
    key_order = list(range(n))
    rotations = [key_order[i:] + key_order[:i] for i in range(n)]
    cycle = len(found) == n and all(order in rotations for order in found)
    shapes_seq = [(b[0].input_size, b[-1].output_size) for b in blocks]
    symmetric = any(shapes_seq[r:] + shapes_seq[:r] == shapes_seq for r in range(1, n))
    if cycle and keyed and not symmetric:
        # Input size == output size: the shapes form one cycle and cannot say where it starts;
        # the registration (key) order can, and it chains (it is among the rotations).
        return [u for b in blocks for u in b]
    if len(found) > 1:
        found.sort(key=lambda order: order != key_order)
        cands = [[u.prefix for i in order for u in blocks[i]] for order in found]
        shown = "; ".join(f"layers={c!r}" for c in cands[:_MAX_CANDIDATES])
        more = " (and more)" if len(found) > cap else ""
        fix = (f"e.g. from_torch(obj, layers={cands[0]!r})" if top else
               "naming every GRU/LSTM/Linear prefix of the whole model")
        raise UnsupportedModelError(
            f"{what}: expected one order of the layers by shape, got {len(cands)}{more} "
            f"candidates for {shapes}: {shown}{more}; pass the keyword layers=[...] with the "
            f"prefixes in execution order, {fix}"
            + ("; the input and output sizes are equal, so the shapes form a cycle, and a "
               ".safetensors file stores its keys sorted, losing the registration order that "
               "would say where it starts" if cycle and not keyed and not symmetric else "")
        )
    return [u for i in found[0] for u in blocks[i]]


def _chainable(edges, start):
    """True when the blocks of ``edges`` ((input size, output size) each) can all be put in one
    order in which each output size is the next input size, the first taking ``start`` (None:
    any). Each block is an edge from its input size to its output size, and such an order is an
    Eulerian trail of that multigraph: one exists when the edges are connected and every size is
    entered as often as it is left, except that the trail's first size may be left once more
    and its last entered once more."""
    if not edges:
        return True
    balance, links = {}, {}
    for a, b in edges:
        balance[a] = balance.get(a, 0) + 1
        balance[b] = balance.get(b, 0) - 1
        links.setdefault(a, set()).add(b)
        links.setdefault(b, set()).add(a)
    heads = [v for v, d in balance.items() if d == 1]
    if any(abs(d) > 1 for d in balance.values()) or len(heads) > 1:
        return False
    if start is not None and (heads[0] != start if heads else start not in links):
        return False
    root = heads[0] if heads else next(iter(links))
    seen, todo = {root}, [root]
    while todo:
        for w in links[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return len(seen) == len(links)


# --------------------------------------------------------------------------------------------
# Building the canonical model


def _build(units, target):
    if not any(u.kind != "linear" for u in units):
        raise UnsupportedModelError(
            f"obj: expected at least one GRU, GRUCell, LSTM or LSTMCell, got only Linear layers "
            f"{[u.label for u in units]}"
        )
    out = []
    for u in units:
        if u.kind == "linear":
            key, w = u.linear["weight"]
            b = u.linear.get("bias")
            tensors = {"W": (key, w), **({"b": b} if b else {})}
            arrs = _finite(tensors, target)
            out.append(_construct(
                u, lambda a=arrs, w=w, u=u: DenseLayer(w.shape[1], w.shape[0], a["W"],
                                                       a.get("b"), activation=u.activation),
                tensors))
            continue
        for layer in u.layers:
            tensors = {"W": layer["weight_ih"], "R": layer["weight_hh"]}
            if "bias_ih" in layer:
                tensors["Wb"], tensors["Rb"] = layer["bias_ih"], layer["bias_hh"]
            if u.kind in ("lstm", "lstmcell"):
                out.append(_lstm_layer(u, layer, tensors, target))
                continue
            arrs = _finite(tensors, target)
            # PyTorch stacks the gates as (r, z, n); the canonical order is (z, r, n).
            arrs = {k: swap_rz(a) for k, a in arrs.items()}
            H = tensors["R"][1].shape[1]
            I = tensors["W"][1].shape[1]
            out.append(_construct(
                u, lambda a=arrs, H=H, I=I: GRULayer(I, H, a["W"], a["R"], a.get("Wb"),
                                                     a.get("Rb"), linear_before_reset=1),
                tensors))
    return GRUModel(out, source="pytorch")


def _lstm_layer(unit, layer, tensors, target):
    """An LSTMLayer from one torch LSTM layer's tensors (``tensors``: W, R, Wb, Rb by role)."""
    if "weight_hr" in layer:
        tensors = {**tensors, "proj": layer["weight_hr"]}
    arrs = _finite(tensors, target)
    # PyTorch stacks the gates as (i, f, g, o); the canonical order is ONNX's (i, o, f, c).
    # weight_hr is the projection as it stands.
    arrs = {k: a if k == "proj" else ifco_to_iofc(a) for k, a in arrs.items()}
    R = tensors["R"][1]
    H, I = R.shape[0] // 4, tensors["W"][1].shape[1]
    P = tensors["proj"][1].shape[0] if "proj" in tensors else 0
    return _construct(unit, lambda: LSTMLayer(I, H, arrs["W"], arrs["R"], arrs.get("Wb"),
                                              arrs.get("Rb"), proj=arrs.get("proj"),
                                              proj_size=P), tensors)


def _finite(tensors, target):
    """Cast to ``target`` and refuse NaN/inf, naming the torch key."""
    out = {}
    for role, (key, arr) in tensors.items():
        a = arr if target is None else arr.astype(target)
        bad = ~np.isfinite(a)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{key}: expected finite values, got {a[idx]} at index {idx}")
        out[role] = a
    return out


def _construct(unit, make, tensors):
    try:
        return make()
    except (TypeError, ValueError) as exc:
        keys = {role: key for role, (key, _) in tensors.items()}
        raise type(exc)(f"{unit.label} (torch keys {keys}): {exc}") from exc
