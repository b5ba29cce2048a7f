"""The generic half of the ONNX importer: reading a graph and tracking shapes along its data path.

:mod:`converters.from_onnx` maps layers (``GRU`` and ``LSTM`` nodes, Dense-like ops) onto a
:class:`GraphWalker`, which knows nothing of layers. It reads the file (bounded, external data
only from inside the model's directory), evaluates constant subgraphs, reads attributes
(refusing any it is not told to accept), and follows the data path from the graph input to an
output, describing each tensor on it by a :class:`Desc`: the labels of its leading axes (which
graph-input axis each one is, or a unit axis) and its feature width. Value-preserving plumbing
(``Identity``, ``Dropout``, ``Cast``, ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Reshape``,
``Flatten``, no-op ``Slice``, ``Gather`` of the last time step) is checked here to keep the
features last and never mix time with batch.
"""

from __future__ import annotations

import math
import os

import numpy as np

from streamgru.errors import FormatError, UnsupportedModelError
from streamgru.formats import check_size, read_file

__all__ = ["GraphWalker", "Desc", "read_onnx", "load_external", "has_external", "node_name",
           "PLUMBING"]

PLUMBING = {"Identity", "Dropout", "Cast", "Transpose", "Squeeze", "Unsqueeze", "Reshape",
             "Flatten", "Slice", "Gather"}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}
_BIG = 2**62


def read_onnx(path, what="path"):
    """The ``onnx.ModelProto`` in the file ``path``, external data not loaded.

    Read with :func:`streamgru.formats.read_file` (regular files within the size limit only);
    bytes protobuf cannot parse, or a file without a graph, raise FormatError naming the file.
    """
    from google.protobuf.message import DecodeError
    from onnx import ModelProto

    data = read_file(path, what)
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        raise FormatError(f"{what}: expected an ONNX model, got {os.fspath(path)!r} that protobuf "
                          f"cannot parse ({exc}); the file is truncated, corrupted or not ONNX"
                          ) from exc
    if not model.HasField("graph"):
        raise FormatError(f"{what}: expected an ONNX model with a graph, got {os.fspath(path)!r} "
                          f"without one ({len(data)} bytes); the file is truncated or not ONNX")
    return model


# --------------------------------------------------------------------------- external data

def has_external(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return any(uses_external_data(t) for t in _get_all_tensors(model))


def load_external(model, base):
    """Read external tensors, only from regular files inside ``base`` (no absolute paths, no
    ``..``, no symlink escaping the directory)."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if base is None:
            raise UnsupportedModelError(
                f"tensor {t.name!r}: expected its data inside the model, got external data "
                f"{loc!r}; pass the .onnx path instead of a ModelProto so the data can be read "
                f"from the model's directory"
            )
        parts = loc.replace("\\", "/").split("/")
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in parts or (
                len(loc) > 1 and loc[1] == ":"):
            raise UnsupportedModelError(
                f"tensor {t.name!r}: expected an external data location relative to the model's "
                f"directory without '..', got {loc!r}; refusing to read outside the model's folder"
            )
        real_base = os.path.realpath(base)
        full = os.path.realpath(os.path.join(real_base, loc))
        if os.path.commonpath([real_base, full]) != real_base or not os.path.exists(full):
            raise UnsupportedModelError(
                f"tensor {t.name!r}: expected an external data file inside {base!r}, got {loc!r}"
            )
        size = os.path.getsize(full)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = None if info.get("length") is None else int(info["length"])
        except ValueError:
            offset = length = -1
        # Checked against the file's real size before reading: a crafted length must not make
        # us allocate it.
        if offset < 0 or (length is not None and (length < 0 or offset + length > size)):
            raise UnsupportedModelError(
                f"tensor {t.name!r}: expected external data within {loc!r} ({size} bytes), got "
                f"offset {info.get('offset')!r} and length {info.get('length')!r}"
            )
        t.raw_data = read_file(full, f"tensor {t.name!r} external data", offset=offset,
                               length=size - offset if length is None else length)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


class Desc:
    """What is known about a tensor on the data path.

    ``axes``: labels of the leading axes (everything but the last): a str names an axis of the
    graph input (``"a0"``...) or int 1 for a unit axis; the last axis is always the features,
    ``width`` wide (None while unknown). ``last_only``: time was reduced to the final step.
    """

    __slots__ = ("axes", "width", "last_only")

    def __init__(self, axes, width, last_only=False):
        self.axes = tuple(axes)
        self.width = width
        self.last_only = last_only

    @property
    def rank(self):
        return len(self.axes) + 1

    def replace(self, **kw):
        d = Desc(self.axes, self.width, self.last_only)
        for k, v in kw.items():
            setattr(d, k, v)
        return d


def node_name(node):
    """How error messages name a node: its name, or its op and outputs when it has none."""
    return node.name or f"<unnamed {node.op_type} -> {list(node.output)}>"


_name = node_name  # the short name the messages below use


class GraphWalker:
    """An ONNX graph indexed for walking: producers, consumers, constants, shapes.

    Subclasses supply ``data_input(node)`` (which input of a node on the data path carries the
    data) and map the value-changing ops; ``apply_plumbing`` maps the value-preserving ones.
    """

    def __init__(self, model, source):
        import onnx
        from onnx import numpy_helper

        self.source = source  # the file (or argument) named in errors about its tensors
        self.onnx = onnx
        self.numpy_helper = numpy_helper
        self.model = model
        g = model.graph
        self.graph = g
        self.opset = 1
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = imp.version
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.consumers = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.inputs = [i for i in g.input if i.name not in self.inits]
        self.input_names = {i.name for i in self.inputs}
        self.outputs = [o.name for o in g.output]
        self._const_cache = {}
        self._is_const_cache = {}
        self.used = set()  # ids of nodes accounted for
        self.labels_size = {}
        self.value_desc = {}
        self.notes = []  # what was taken as state or left to the engine, for Model.notes

    # ---------------------------------------------------------------- constants
    def is_const(self, name):
        if name in self._is_const_cache:
            return self._is_const_cache[name]
        self._is_const_cache[name] = False  # cycle guard
        if name in self.inits:
            res = True
        elif name in self.input_names or name not in self.producer:
            res = False
        else:
            n = self.producer[name]
            if n.op_type == "Shape" and n.domain in ("", "ai.onnx"):
                res = self._static_shape_value(n) is not None
            elif n.domain not in ("", "ai.onnx") or n.op_type in _NONDETERMINISTIC or any(
                    a.g.ByteSize() or len(a.graphs) for a in n.attribute):
                res = False
            else:
                res = all(self.is_const(i) for i in n.input if i)
        self._is_const_cache[name] = res
        return res

    def _static_shape_value(self, n):
        """The value of a Shape node whose selected dims are declared static, else None."""
        from onnx import helper

        shape = self.static_shape(n.input[0])
        if shape is None:
            return None
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        dims = shape[slice(a.get("start", 0), a.get("end", None))]
        if any(d is None for d in dims):
            return None
        return np.array(dims, dtype=np.int64)

    def ancestors(self, name, const_only=False):
        """Nodes that ``name`` depends on, in graph order (``const_only``: stop at Shape nodes
        that read declared static dims)."""
        seen, stack = set(), [name]
        while stack:
            v = stack.pop()
            if not v:
                continue
            n = self.producer.get(v)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if const_only and n.op_type == "Shape":
                continue
            stack.extend(n.input)
        return [n for n in self.nodes if id(n) in seen]

    def const(self, name, what):
        """The value of a constant tensor (initializer, Constant node or constant subgraph)."""
        if name in self._const_cache:
            return self._const_cache[name]
        if not self.is_const(name):
            raise UnsupportedModelError(f"{what}: expected a constant tensor, got {name!r} "
                                        f"which depends on a graph input")
        nodes = self.ancestors(name, const_only=True)
        for n in nodes:
            self.used.add(id(n))
        if name in self.inits:
            val = self.tensor_array(self.inits[name])
            if val.dtype.kind == "f" and not np.isfinite(val).all():
                bad = tuple(int(i) for i in np.argwhere(~np.isfinite(val))[0])
                raise FormatError(f"{self.source}: initializer {name!r} ({what}): expected "
                                  f"finite values, got {val[bad]} at index {bad}")
        elif len(nodes) == 1 and nodes[0].op_type == "Constant":
            val = self._constant_node(nodes[0])
        else:
            from onnx import helper
            from onnx.reference import ReferenceEvaluator

            need = {i for n in nodes for i in n.input if i in self.inits}
            for i in need:
                self.tensor_array(self.inits[i])  # sizes checked before the evaluator reads them
            nodes = [helper.make_node("Constant", [], list(n.output), value=self.numpy_helper
                                      .from_array(self._static_shape_value(n)))
                     if n.op_type == "Shape" else n for n in nodes]
            graph = helper.make_graph(
                nodes, "const", [], [helper.make_empty_tensor_value_info(name)],
                [self.inits[i] for i in sorted(need)])
            m = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                  ir_version=self.model.ir_version or 8)
            try:
                val = ReferenceEvaluator(m).run(None, {})[0]
            except Exception as exc:
                raise UnsupportedModelError(
                    f"{what}: could not evaluate the constant subgraph producing {name!r}: {exc}"
                ) from None
        val = np.asarray(val)
        self._const_cache[name] = val
        return val

    def tensor_array(self, t):
        """``numpy_helper.to_array(t)`` once the dims ``t`` claims are checked against the data
        it holds and against the read limit (numpy would try to allocate, or fail to reshape)."""
        from onnx import TensorProto, helper

        dims = list(t.dims)
        where = f"tensor {t.name!r}"
        if any(d < 0 for d in dims):
            raise FormatError(f"{self.source}: {where}: expected non-negative dims, got {dims}")
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{self.source}: {where}: expected a known data_type, got "
                              f"{t.data_type}") from exc
        n = math.prod(dims)
        check_size(self.source, f"{where} of dims {dims}", n * itemsize)
        if t.data_type == TensorProto.STRING:
            held = len(t.string_data)
        elif t.raw_data:
            packed = t.data_type in {getattr(TensorProto, k, None)
                                     for k in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")}
            held = len(t.raw_data) * 2 if packed else len(t.raw_data) // itemsize
            held = min(held, n) if packed else held  # the last byte may hold one 4-bit value
        else:
            values = (len(t.float_data) + len(t.int32_data) + len(t.int64_data)
                      + len(t.double_data) + len(t.uint64_data))
            complex_ = t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128)
            held = values // 2 if complex_ else values
        if held != n:
            raise FormatError(f"{self.source}: {where}: expected data for {n} elements "
                              f"(dims {dims}), got data for {held}; the file is corrupted")
        return self.numpy_helper.to_array(t)

    def _constant_node(self, n):
        from onnx import helper

        for a in n.attribute:
            if a.name == "value":
                return self.tensor_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.array(helper.get_attribute_value(a))
            if a.name in ("value_floats", "value_ints"):
                return np.array(list(helper.get_attribute_value(a)))
        raise UnsupportedModelError(f"node {_name(n)!r}: unsupported Constant attribute")

    def attrs(self, node, allowed):
        from onnx import helper

        out = {}
        for a in node.attribute:
            if a.name not in allowed:
                raise UnsupportedModelError(
                    f"node {_name(node)!r} ({node.op_type}): attribute {a.name!r} is not "
                    f"implemented by streamgru; refusing rather than ignoring it"
                )
            v = helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def static_shape(self, name):
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if vi.name == name and vi.type.HasField("tensor_type") and \
                    vi.type.tensor_type.HasField("shape"):
                return [d.dim_value if d.HasField("dim_value") else None
                        for d in vi.type.tensor_type.shape.dim]
        return None

    # ---------------------------------------------------------------- symbolic shape tensors
    def shape_items(self, name, what):
        """A 1-D int tensor as a list of items: int, or an axis label of a data-path tensor."""
        items, _ = self._shape_items(name, what)
        return items

    def _shape_items(self, name, what):
        if self.is_const(name):
            v = self.const(name, what)
            if v.dtype.kind not in "iu":
                raise UnsupportedModelError(f"{what}: expected an integer tensor, got {v.dtype}")
            return [int(x) for x in v.reshape(-1)], v.ndim == 0
        n = self.producer.get(name)
        if n is None:
            raise UnsupportedModelError(f"{what}: expected a constant or a Shape computation, got "
                                        f"graph input {name!r}")
        self.used.add(id(n))
        op = n.op_type
        ins = list(n.input)
        for i in ins[1:]:
            if i and self.is_const(i):
                self.const(i, what)  # evaluates and marks its subgraph as accounted for
        if op == "Shape":
            d = self.value_desc.get(ins[0])
            if d is None:
                raise UnsupportedModelError(
                    f"node {_name(n)!r}: Shape of {ins[0]!r}, which is not on the data path")
            a = self.attrs(n, {"start", "end"})
            full = list(d.axes) + [d.width if d.width is not None else "F?"]
            full = full[slice(a.get("start", 0), a.get("end", None))]
            if "F?" in full:
                raise UnsupportedModelError(f"node {_name(n)!r}: the feature width is unknown")
            return full, False
        if op in ("Identity", "Cast"):
            self.attrs(n, {"to"})
            return self._shape_items(ins[0], what)
        if op == "Gather":
            a = self.attrs(n, {"axis"})
            items, _ = self._shape_items(ins[0], what)
            idx = self.const(ins[1], what)
            if a.get("axis", 0) != 0:
                raise UnsupportedModelError(f"node {_name(n)!r}: Gather on a shape with axis != 0")
            picked = [items[int(i)] for i in idx.reshape(-1)]
            return picked, idx.ndim == 0
        if op == "Slice":
            items, _ = self._shape_items(ins[0], what)
            if self.opset < 10:
                a = self.attrs(n, {"starts", "ends", "axes"})
                st, en, steps = a["starts"], a["ends"], [1]
            else:
                st = self.const(ins[1], what).tolist()
                en = self.const(ins[2], what).tolist()
                if len(ins) > 3 and ins[3] and self.const(ins[3], what).tolist() not in ([0], [-1]):
                    raise UnsupportedModelError(f"node {_name(n)!r}: Slice of a shape, axis != 0")
                steps = self.const(ins[4], what).tolist() if len(ins) > 4 and ins[4] else [1]
            return items[slice(st[0], min(en[0], _BIG), steps[0])], False
        if op == "Concat":
            out = []
            for i in ins:
                out += self._shape_items(i, what)[0]
            return out, False
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            items, _ = self._shape_items(ins[0], what)
            if len(items) != 1 and op != "Reshape":
                raise UnsupportedModelError(f"node {_name(n)!r}: {op} of a shape tensor")
            return items, op == "Squeeze"
        if op == "Mul":
            a, sa = self._shape_items(ins[0], what)
            b, sb = self._shape_items(ins[1], what)
            if len(a) == 1 and len(b) > 1:
                a = a * len(b)
            if len(b) == 1 and len(a) > 1:
                b = b * len(a)
            out = []
            for x, y in zip(a, b, strict=True):
                if isinstance(x, int) and isinstance(y, int):
                    out.append(x * y)
                elif x == 1:
                    out.append(y)
                elif y == 1:
                    out.append(x)
                else:
                    raise UnsupportedModelError(
                        f"node {_name(n)!r}: a shape computation merges two axes ({x} * {y})")
            return out, sa and sb
        raise UnsupportedModelError(
            f"node {_name(n)!r} ({op}): not supported in a shape computation feeding {what}")

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)

    def source_inputs(self, name):
        """The graph inputs a tensor is computed from."""
        found = {i for n in self.ancestors(name) for i in n.input if i in self.input_names}
        return sorted(found | ({name} if name in self.input_names else set()))

    def _mark_ancestors(self, name):
        for n in self.ancestors(name):
            self.used.add(id(n))

    def path_to(self, out):
        """Walk back from a graph output to the graph's data input."""
        path, v, seen = [], out, set()
        while v not in self.input_names:
            n = self.producer.get(v)
            if n is None or self.is_const(v):
                raise UnsupportedModelError(f"graph output {out!r}: expected it to be computed "
                                            f"from a graph input, got constant {v!r}")
            if id(n) in seen:
                raise UnsupportedModelError(f"node {_name(n)!r}: graph has a cycle")
            seen.add(id(n))
            if n.domain not in ("", "ai.onnx"):
                raise UnsupportedModelError(f"node {_name(n)!r}: custom domain {n.domain!r} "
                                            f"op {n.op_type} cannot be mapped")
            path.append((n, v))
            v = self.data_input(n)
        return v, path[::-1]

    def _unit(self, item):
        return item == 1 or (isinstance(item, str) and self.labels_size.get(item) == 1)

    def apply_plumbing(self, n, desc):
        op = n.op_type
        where = f"node {_name(n)!r} ({op})"
        rank = desc.rank
        if op == "Identity":
            return desc
        if op == "Dropout":
            self.attrs(n, {"seed", "ratio", "is_test"})
            if len(n.output) > 1 and n.output[1] and self.consumers.get(n.output[1]):
                raise UnsupportedModelError(f"{where}: its mask output is used")
            if len(n.input) > 2 and n.input[2]:
                mode = self.const(n.input[2], where)
                if bool(np.any(mode)):
                    raise UnsupportedModelError(f"{where}: training_mode is true")
            if len(n.input) > 1 and n.input[1]:
                self.const(n.input[1], where)
            return desc
        if op == "Cast":
            a = self.attrs(n, {"to", "saturate", "round_mode"})
            from onnx import TensorProto as TP

            if a["to"] not in (TP.FLOAT, TP.DOUBLE, TP.FLOAT16, TP.BFLOAT16):
                raise UnsupportedModelError(f"{where}: casts the data to a non-float type")
            return desc
        if op == "Transpose":
            a = self.attrs(n, {"perm"})
            perm = list(a.get("perm", range(rank - 1, -1, -1)))
            if perm[-1] != rank - 1:
                raise UnsupportedModelError(
                    f"{where}: perm {perm} moves the feature (last) axis; streamgru applies every "
                    f"layer to the last axis")
            return desc.replace(axes=tuple(desc.axes[p] for p in perm[:-1]))
        if op == "Squeeze":
            if self.opset < 13:
                axes = self.attrs(n, {"axes"}).get("axes")
            else:
                self.attrs(n, set())
                axes = self.const(n.input[1], where).tolist() if len(n.input) > 1 and \
                    n.input[1] else None
            if axes is None:
                axes = [i for i, x in enumerate(desc.axes) if self._unit(x)]
                if any(isinstance(x, str) and self.labels_size.get(x) is None
                       for x in desc.axes):
                    raise UnsupportedModelError(f"{where}: Squeeze without axes on a tensor of "
                                                f"dynamic shape")
            axes = [int(x) % rank for x in np.atleast_1d(axes)]
            for ax in axes:
                if ax == rank - 1 or not self._unit(desc.axes[ax]):
                    raise UnsupportedModelError(f"{where}: squeezes axis {ax}, which is not a "
                                                f"unit axis")
            return desc.replace(axes=tuple(x for i, x in enumerate(desc.axes) if i not in axes))
        if op == "Unsqueeze":
            if self.opset < 13:
                axes = self.attrs(n, {"axes"})["axes"]
            else:
                self.attrs(n, set())
                axes = self.const(n.input[1], where).tolist()
            axes = sorted(int(x) % (rank + len(np.atleast_1d(axes)))
                          for x in np.atleast_1d(axes))
            full = list(desc.axes) + ["F"]
            for ax in axes:
                full.insert(ax, 1)
            if full[-1] != "F":
                raise UnsupportedModelError(f"{where}: inserts an axis after the features")
            return desc.replace(axes=tuple(full[:-1]))
        if op == "Flatten":
            a = self.attrs(n, {"axis"})
            axis = a.get("axis", 1) % rank
            if axis != rank - 1:
                raise UnsupportedModelError(f"{where}: Flatten(axis={a.get('axis', 1)}) merges "
                                            f"the features with other axes")
            nonunit = [x for x in desc.axes if not self._unit(x)]
            if len(nonunit) > 1:
                raise UnsupportedModelError(f"{where}: merges axes {nonunit} into one")
            return desc.replace(axes=(nonunit[0] if nonunit else 1,))
        if op == "Reshape":
            return self._reshape(n, desc)
        if op == "Slice":
            return self._slice(n, desc)
        if op == "Gather":
            a = self.attrs(n, {"axis"})
            axis = a.get("axis", 0) % rank
            idx = self.const(n.input[1], where)
            if axis == rank - 1 or idx.size != 1:
                raise UnsupportedModelError(f"{where}: selects along axis {axis}; only picking "
                                            f"the last time step (or a unit axis) is mappable")
            k = int(idx.reshape(-1)[0])
            lab = desc.axes[axis]
            if self._unit(lab) and k in (0, -1):
                pass
            elif lab == self.time and self.time is not None and (
                    k == -1 or (self.labels_size.get(lab) is not None
                                and k == self.labels_size[lab] - 1)):
                desc = desc.replace(last_only=True)
            else:
                raise UnsupportedModelError(
                    f"{where}: Gather index {k} on axis {axis}; only the last time step after the "
                    f"recurrent chain (index -1) or a unit axis can be selected")
            axes = list(desc.axes)
            if idx.ndim == 0:
                del axes[axis]
            else:
                axes[axis] = 1
            return desc.replace(axes=tuple(axes))
        raise UnsupportedModelError(f"{where}: not mappable")

    def _slice(self, n, desc):
        where = f"node {_name(n)!r} (Slice)"
        rank = desc.rank
        if self.opset < 10:
            a = self.attrs(n, {"starts", "ends", "axes"})
            starts, ends = list(a["starts"]), list(a["ends"])
            axes = list(a.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            self.attrs(n, set())
            ins = list(n.input) + [""] * 5
            starts = self.const(ins[1], where).tolist()
            ends = self.const(ins[2], where).tolist()
            axes = self.const(ins[3], where).tolist() if ins[3] else list(range(len(starts)))
            steps = self.const(ins[4], where).tolist() if ins[4] else [1] * len(starts)
        axes_l = list(desc.axes)
        last_only = desc.last_only
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=False):
            ax = int(ax) % rank
            if ax == rank - 1:
                size = desc.width
            else:
                lab = axes_l[ax]
                size = 1 if lab == 1 else self.labels_size.get(lab)
            full = st == 1 and s in (0, -_BIG) or (s < 0 and size is not None and s <= -size)
            full = full and (e >= _BIG // 2 or (size is not None and e >= size))
            if st == 1 and full:
                continue
            if ax != rank - 1 and self._unit(axes_l[ax]) and st == 1 and s in (0, -1):
                continue
            if ax != rank - 1 and self.time is not None and axes_l[ax] == self.time and \
                    st == 1 and s == -1 and e >= _BIG // 2:
                axes_l[ax] = 1
                last_only = True
                continue
            raise UnsupportedModelError(
                f"{where}: slices axis {ax} [{s}:{e}:{st}]; only no-op slices and the last time "
                f"step after the recurrent chain are mappable")
        return desc.replace(axes=tuple(axes_l), last_only=last_only)

    def _reshape(self, n, desc):
        where = f"node {_name(n)!r} (Reshape)"
        a = self.attrs(n, {"allowzero"})
        if self.opset < 5:
            raise UnsupportedModelError(f"{where}: Reshape-1 is not supported")
        items = self.shape_items(n.input[1], where)
        full = list(desc.axes) + [desc.width]
        res = []
        for i, it in enumerate(items):
            if it == 0 and not a.get("allowzero", 0):
                if i >= len(full):
                    raise UnsupportedModelError(f"{where}: copies a missing dimension")
                it = full[i]
            res.append(it)
        last = res[-1]
        if not (last == -1 or (desc.width is not None and last == desc.width)):
            raise UnsupportedModelError(f"{where}: the target shape {items} changes the feature "
                                        f"axis (width {desc.width})")
        lead = res[:-1]
        in_nonunit = [x for x in desc.axes if not self._unit(x)]
        out = []
        k = 0
        for it in lead:
            if it == 1 or (isinstance(it, str) and self._unit(it)):
                out.append(1)
                continue
            if k >= len(in_nonunit):
                raise UnsupportedModelError(f"{where}: target shape {items} adds a non-unit axis")
            lab = in_nonunit[k]
            if it == -1 and last != -1:
                out.append(lab)
            elif it == lab or (isinstance(it, int) and it > 1 and
                               self.labels_size.get(lab) == it):
                out.append(lab)
            elif isinstance(it, int) and it > 1 and isinstance(lab, str) and \
                    self.labels_size.get(lab) is None:
                # The dynamo exporter specialises a dimension declared dynamic (the recurrent
                # node's time axis) and writes its length as a constant: the axis is kept, and the
                # graph runs at that length only.
                self.labels_size[lab] = it
                self.note(f"{where}: fixes axis {lab[1:]} of graph input {self.start!r}, declared "
                          f"dynamic, to {it}; the graph runs at that length only (the engine "
                          f"streams any number of steps)")
                out.append(lab)
            else:
                raise UnsupportedModelError(f"{where}: target shape {items} reorders or merges "
                                            f"the time/batch axes")
            k += 1
        if k != len(in_nonunit):
            raise UnsupportedModelError(f"{where}: target shape {items} merges axes")
        return desc.replace(axes=tuple(out))
