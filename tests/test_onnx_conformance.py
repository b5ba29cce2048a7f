"""ONNX's own GRU node test cases (shipped as code in ``onnx.backend.test.case.node.gru``).

Each ``GRU.export_*`` function calls ``expect(node, inputs, outputs, name)``; we capture those
calls, turn every case into a model (X a graph input, the other inputs initializers), convert it
and check that streamgru reproduces ``Y_h`` (and ``Y`` where given) from X through the float64
oracle, the Engine when it exists, and onnxruntime. ONNX's expected outputs come from its python
reference, which ignores ``clip`` and ``activations``: every case is therefore also checked
against onnxruntime. Reverse and bidirectional cases must be refused.
"""

import importlib.util

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import oracle  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from converters.from_onnx import from_onnx  # noqa: E402
from streamgru.errors import UnsupportedModelError  # noqa: E402


def _cases():
    from onnx.backend.test.case.node import gru as gru_cases

    captured = []

    def capture(node, inputs, outputs, name, **kwargs):
        captured.append((node, inputs, outputs, name))

    orig = gru_cases.expect
    gru_cases.expect = capture
    try:
        np.random.seed(0)  # test_gru_seq_length draws its weights from np.random
        for attr in sorted(dir(gru_cases.GRU)):
            if attr.startswith("export"):
                getattr(gru_cases.GRU, attr)()
    finally:
        gru_cases.expect = orig
    return captured


CASES = _cases()


def _model(node, inputs):
    names = list(node.input)
    x = inputs[0]
    pairs = zip(names[1:], inputs[1:], strict=True)
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in pairs if n]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output
            if o]
    graph = helper.make_graph(
        [node], "case", [helper.make_tensor_value_info(names[0], onnx.TensorProto.FLOAT,
                                                       list(x.shape))], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_cases_were_found():
    names = {c[3] for c in CASES}
    assert {"test_gru_defaults", "test_gru_batchwise", "test_gru_reverse",
            "test_gru_bidirectional"} <= names


@pytest.mark.parametrize("case", CASES, ids=[c[3] for c in CASES])
def test_onnx_gru_case(case):
    node, inputs, outputs, name = case
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    proto = _model(node, inputs)
    if direction != "forward":
        with pytest.raises(UnsupportedModelError, match=f"direction={direction!r}"):
            from_onnx(proto)
        return
    model = from_onnx(proto)
    layout = attrs.get("layout", 0)
    X = np.asarray(inputs[0], np.float64)
    xs = X if layout == 1 else X.transpose(1, 0, 2)  # (batch, T, I)
    n_b, T = xs.shape[0], xs.shape[1]
    ys = np.zeros((n_b, T, model.output_size))
    hs = np.zeros((n_b, model.state_size))
    for b in range(n_b):
        ys[b], hs[b] = oracle.run(model, xs[b])
    present = [o for o in node.output if o]
    expected = dict(zip(present, outputs, strict=True))
    # Y_h: (1, B, H) for layout 0, (B, 1, H) for layout 1; Y: (T, 1, B, H) / (B, T, 1, H).
    y_h = expected[node.output[1]] if len(node.output) > 1 and node.output[1] else None
    if y_h is not None:
        want = y_h[0] if layout == 0 else y_h[:, 0]
        np.testing.assert_allclose(hs, want, rtol=1e-5, atol=1e-6)
    if node.output[0]:
        Y = expected[node.output[0]]
        want = Y[:, 0].transpose(1, 0, 2) if layout == 0 else Y[:, :, 0]
        np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-6)
    # onnxruntime applies clip/activations, which ONNX's python reference ignores. It refuses
    # layout=1 (test_from_onnx.py checks layout=1 against a transposed layout-0 twin).
    if layout == 1:
        assert "clip" not in attrs and "activations" not in attrs
    else:
        _check_ort(proto, node, inputs, present, y_h, hs)
    _check_engine(model, xs, ys)


def _check_ort(proto, node, inputs, present, y_h, hs):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(present, sess.run(None, {node.input[0]: inputs[0]}), strict=True))
    if y_h is not None:
        np.testing.assert_allclose(hs, got[node.output[1]][0], rtol=1e-5, atol=1e-5)


def _check_engine(model, xs, ys):
    import streamgru

    n_b, T = xs.shape[0], xs.shape[1]
    for dt, tol in (("float32", 1e-5), ("float64", 1e-9)):
        eng = streamgru.Engine(model, dtype=dt)
        for b in range(n_b):
            eng.open(b)
        for t in range(T):
            out = eng.step(list(range(n_b)), xs[:, t].astype(dt))
            np.testing.assert_allclose(out, ys[:, t], rtol=tol, atol=tol)


def test_seq_length_case_has_no_sequence_lens_input():
    # The case named "seq_length" feeds a batch of 2 sequences without a sequence_lens input;
    # a GRU that does pass sequence_lens is refused (tested in test_from_onnx.py).
    case = next(c for c in CASES if c[3] == "test_gru_seq_length")
    assert len([i for i in case[0].input if i]) == 4


def test_module_is_importable_without_engine():
    assert importlib.util.find_spec("converters.from_onnx") is not None
