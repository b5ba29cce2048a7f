"""Native model files and state snapshots: round trips, versioning, corruption, atomicity."""

import json
import os
import pathlib
import struct

import numpy as np
import pytest
from helpers import mixed_lstm_model

import streamgru
from streamgru import Engine, GRUModel, compact
from streamgru import formats as F
from streamgru.errors import FormatError
from streamgru.formats import load_model, write_atomic


def model(dtype=np.float32, seed=0):
    return GRUModel.random(3, [6, 4], dense_before=[(5, "relu")], dense_after=[(2, "softmax")],
                           linear_before_reset=0, seed=seed, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_round_trip_is_bit_exact(tmp_path, dtype):
    m = model(dtype)
    m.save(tmp_path / "m.sgru")
    m2 = streamgru.load(tmp_path / "m.sgru")
    assert m2.fingerprint == m.fingerprint
    assert m2.config() == m.config()
    for (k, a), (k2, b) in zip(m.named_tensors().items(), m2.named_tensors().items()):
        assert k == k2 and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_with_an_lstm_layer_round_trips_bit_exact(tmp_path, dtype):
    m = mixed_lstm_model(dtype)
    m.save(tmp_path / "m.sgru")
    m2 = streamgru.load(tmp_path / "m.sgru")
    assert type(m2.layers[1]) is streamgru.LSTMLayer
    assert m2.fingerprint == m.fingerprint and m2.config() == m.config()
    assert m2.state_slices == m.state_slices == (slice(0, 6), slice(6, 9))
    assert list(m2.named_tensors()) == list(m.named_tensors())
    assert "layers.1.P" in m2.named_tensors() and "layers.1.proj" in m2.named_tensors()
    for (k, a), (k2, b) in zip(m.named_tensors().items(), m2.named_tensors().items()):
        assert k == k2 and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_clip_and_activation_params_survive(tmp_path):
    rng = np.random.default_rng(0)
    g = streamgru.GRULayer(2, 3, rng.normal(size=(9, 2)), rng.normal(size=(9, 3)),
                           linear_before_reset=0, f=("hardsigmoid", 0.25, 0.4),
                           g=("scaledtanh", 1.5, 0.5), clip=2.5)
    m = GRUModel([g], source="test")
    m.save(tmp_path / "m.sgru")
    m2 = streamgru.load(tmp_path / "m.sgru")
    assert m2.layers[0].f == ("hardsigmoid", 0.25, 0.4) and m2.layers[0].clip == 2.5
    assert m2.source == "test"


def test_native_file_is_plain_safetensors(tmp_path):
    from safetensors.numpy import load_file

    m = model()
    m.save(tmp_path / "m.sgru")
    t = load_file(str(tmp_path / "m.sgru"))
    np.testing.assert_array_equal(t["layers.1.W"], m.layers[1].W)


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8:8 + n])


def _rewrite(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_unknown_version_is_refused(tmp_path):
    p = tmp_path / "m.sgru"
    model().save(p)
    raw, n, header = _header(p)
    header["__metadata__"]["format_version"] = "99"
    _rewrite(p, header, raw[8 + n:])
    with pytest.raises(FormatError, match="expected streamgru-model format_version '1' or '2', got "
                                          "'99'; this streamgru cannot read it"):
        streamgru.load(p)


def test_truncated_and_bitflipped_files_are_refused(tmp_path):
    p = tmp_path / "m.sgru"
    model().save(p)
    raw = p.read_bytes()
    for cut in (0, 5, 100, len(raw) - 1):
        p.write_bytes(raw[:cut])
        with pytest.raises(FormatError):
            load_model(p)
    flipped = bytearray(raw)
    flipped[-20] ^= 0x01
    p.write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="checksum"):
        load_model(p)


def test_absurd_header_length_refused_before_allocating(tmp_path):
    p = tmp_path / "m.sgru"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FormatError, match="header length"):
        load_model(p)


def test_state_file_is_not_a_model(tmp_path):
    e = Engine(model())
    e.step([1], np.ones((1, 3)))
    e.save_state(tmp_path / "s.sgru")
    with pytest.raises(FormatError, match="expected a streamgru-model file, got format "
                                          "'streamgru-state'"):
        load_model(tmp_path / "s.sgru")


def test_state_for_another_model_is_refused_and_engine_unchanged(tmp_path):
    a = Engine(model(seed=1))
    a.step(["x"], np.ones((1, 3)))
    a.save_state(tmp_path / "s")
    b = Engine(model(seed=2))
    b.step(["y"], np.ones((1, 3)))
    before = b.state("y")
    with pytest.raises(FormatError, match="expected states saved for model"):
        b.load_state(tmp_path / "s")
    assert b.keys() == ["y"]
    np.testing.assert_array_equal(b.state("y"), before)


def test_corrupt_state_file_refused(tmp_path):
    a = Engine(model())
    a.step(list(range(20)), np.ones((20, 3)))
    a.save_state(tmp_path / "s")
    raw = bytearray((tmp_path / "s").read_bytes())
    raw[-3] ^= 0x10
    (tmp_path / "s").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum"):
        Engine(model()).load_state(tmp_path / "s")


def test_empty_engine_snapshot(tmp_path):
    a = Engine(model())
    a.save_state(tmp_path / "s")
    b = Engine(model())
    b.step([1], np.ones((1, 3)))
    b.load_state(tmp_path / "s")
    assert len(b) == 0


def test_write_atomic_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "f"
    write_atomic(p, b"old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["f"]  # no temp file left behind


def test_load_dispatch_errors(tmp_path):
    p = tmp_path / "m.xyz"
    p.write_text("hi")
    with pytest.raises(ValueError, match=r"path: expected one of these file types: \.sgru"):
        streamgru.load(p)
    with pytest.raises(FileNotFoundError, match="path: expected an existing file"):
        streamgru.load(tmp_path / "missing.sgru")
    with pytest.raises(TypeError, match="path: expected a file path, got int"):
        streamgru.load(3)


def test_native_model_in_safetensors_suffix_loads_natively(tmp_path):
    m = model()
    m.save(tmp_path / "m.safetensors")
    assert streamgru.load(tmp_path / "m.safetensors").fingerprint == m.fingerprint


def test_write_atomic_gives_files_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------
# compact model files (format_version 2): references from streamgru.compact's definitions


def matrices(m):
    return {k for k, t in m.named_tensors().items() if t.ndim == 2}


@pytest.mark.parametrize("weights", ["int8", "float16"])
@pytest.mark.parametrize("make", [model, lambda: mixed_lstm_model(np.float32)])
def test_compact_file_loads_as_the_compacted_model_bit_for_bit(tmp_path, weights, make):
    m = make()
    p = tmp_path / "m.sgru"
    m.save(p, weights=weights)
    back = streamgru.load(p)
    assert back.stored_as == weights and back.config() == m.config() and back.source == m.source
    for name, t in m.named_tensors().items():
        u = back.named_tensors()[name]
        assert u.dtype == np.float32
        want = compact.dequantize(*compact.quantize(t, weights)) if t.ndim == 2 else t
        np.testing.assert_array_equal(u, want)
    assert back.fingerprint == m.compacted(weights).fingerprint
    # Saved again without weights=, it keeps its form: the same bytes.
    back.save(tmp_path / "again.sgru")
    assert (tmp_path / "again.sgru").read_bytes() == p.read_bytes()
    m.compacted(weights).save(tmp_path / "c.sgru")
    assert (tmp_path / "c.sgru").read_bytes() == p.read_bytes()


@pytest.mark.parametrize("weights", ["int8", "float16"])
def test_compact_file_layout(tmp_path, weights):
    """Plain safetensors: each matrix in its stored form, int8 with its .scale, vectors float32."""
    from safetensors.numpy import load_file

    m = mixed_lstm_model(np.float32)
    p = tmp_path / "m.sgru"
    m.save(p, weights=weights)
    _, _, header = _header(p)
    meta = header["__metadata__"]
    assert meta["format_version"] == "2" and meta["weights"] == weights
    t = load_file(str(p))
    names = set(m.named_tensors())
    scales = {f"{n}.scale" for n in matrices(m)} if weights == "int8" else set()
    assert set(t) == names | scales
    for name, w in m.named_tensors().items():
        if w.ndim == 1:
            assert t[name].dtype == np.float32
            np.testing.assert_array_equal(t[name], w)
            continue
        stored, s = compact.quantize(w, weights)
        assert t[name].dtype == compact.WEIGHT_FORMATS[weights]
        np.testing.assert_array_equal(t[name], stored)
        if weights == "int8":
            assert t[name + ".scale"].dtype == np.float32
            np.testing.assert_array_equal(t[name + ".scale"], s)


def test_compact_files_shrink_the_matrices_4x_and_2x(tmp_path):
    m = GRUModel.random(16, [128, 128], dense_after=[(4, "identity")])
    sizes = {}
    for weights in ("float32", "float16", "int8"):
        m.save(tmp_path / weights, weights=weights)
        raw, n, header = _header(tmp_path / weights)
        stored = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                  if k != "__metadata__"}
        sizes[weights] = (len(raw), stored)
    full = sizes["float32"][1]
    for name in matrices(m):
        rows, cols = m.named_tensors()[name].shape
        assert full[name] == 4 * rows * cols
        assert sizes["float16"][1][name] == 2 * rows * cols
        assert sizes["int8"][1][name] == rows * cols
        assert sizes["int8"][1][name + ".scale"] == 4 * rows
    assert 1.9 < sizes["float32"][0] / sizes["float16"][0] < 2.0
    assert 3.4 < sizes["float32"][0] / sizes["int8"][0] < 4.0


def test_full_precision_files_are_written_as_before(tmp_path):
    """The shipped .sgru was written by an earlier release: it loads, and saving its model
    (without weights=, or with "float32") gives back the same bytes, version 1."""
    from streamgru.harness.demo import DEFAULT_MODEL

    raw = pathlib.Path(DEFAULT_MODEL).read_bytes()
    m = streamgru.load(DEFAULT_MODEL)
    assert m.stored_as is None
    assert F.model_to_bytes(m) == raw and F.model_to_bytes(m, "float32") == raw
    m.save(tmp_path / "m.sgru", weights="float32")
    assert (tmp_path / "m.sgru").read_bytes() == raw
    assert _header(tmp_path / "m.sgru")[2]["__metadata__"]["format_version"] == "1"


def test_compact_model_saved_in_full_precision_is_a_version_1_file(tmp_path):
    c = model().compacted("int8")
    c.save(tmp_path / "m.sgru", weights="float32")
    meta = _header(tmp_path / "m.sgru")[2]["__metadata__"]
    assert meta["format_version"] == "1" and "weights" not in meta
    back = streamgru.load(tmp_path / "m.sgru")
    assert back.stored_as is None and back.fingerprint == c.fingerprint


def test_float64_model_round_trips_in_full_precision_and_is_refused_compact(tmp_path):
    m64 = model(np.float64)
    with pytest.raises(ValueError, match=r"^weights: expected a float32 model for "
                                         r"weights='int8' \(a compact file keeps the vectors in "
                                         r"float32\), got a float64 model; save "
                                         r"model\.astype\('float32'\)"):
        m64.save(tmp_path / "m.sgru", weights="int8")
    with pytest.raises(ValueError, match="expected a float32 model for weights='int8'"):
        m64.compacted("int8").save(tmp_path / "m.sgru")  # its default form
    assert not (tmp_path / "m.sgru").exists()
    m64.compacted("int8").save(tmp_path / "m.sgru", weights="float32")
    assert streamgru.load(tmp_path / "m.sgru").dtype == np.float64


@pytest.mark.parametrize("weights, exc, msg", [
    ("int4", ValueError, r"^weights: expected one of 'float32', 'float16', 'int8', got 'int4'$"),
    (8, TypeError, r"^weights: expected one of 'float32', 'float16', 'int8', got int 8$"),
])
def test_save_refuses_an_unknown_form(tmp_path, weights, exc, msg):
    with pytest.raises(exc, match=msg):
        model().save(tmp_path / "m.sgru", weights=weights)
    assert not (tmp_path / "m.sgru").exists()


def test_save_to_float16_refuses_a_weight_beyond_its_range_naming_it(tmp_path):
    m = GRUModel([streamgru.GRULayer(1, 2, np.full((6, 1), 7e4, np.float32),
                                     np.ones((6, 2), np.float32), linear_before_reset=1)])
    with pytest.raises(ValueError, match=r"^layers\[0\]\.W: expected values within float16's "
                                         r"range"):
        m.save(tmp_path / "m.sgru", weights="float16")
    assert not (tmp_path / "m.sgru").exists()


# The refusals: each a file with a valid checksum whose contents are wrong.

def _crafted(tmp_path, weights, change):
    """Save ``model()`` compactly, let ``change(meta, tensors)`` edit it, re-checksum it."""
    buf = F.model_to_bytes(model(), weights)
    meta, tensors = F._decode(buf, "x", F.MODEL_FORMAT, ("2",))
    change(meta, tensors)
    p = tmp_path / "bad.sgru"
    p.write_bytes(F._encode(tensors, meta))
    return p


def _set(name, value):
    def change(meta, tensors):
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return change


def _edit(name, fn):
    def change(meta, tensors):
        tensors[name] = fn(tensors[name].copy())
    return change


def _scale_at(i, v):
    def fn(s):
        s[i] = v
        return s
    return fn


def _meta(key, value):
    def change(meta, tensors):
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return change


W1 = "layers.1.W"  # the first GRU layer's input weights, (18, 5)


def _unsettled_scale(s):
    """A float32 scale near ``s`` that is not a fixed point of compact.int8_scales: the scale a
    row reaching 127 gives back differs from it."""
    for _ in range(1000):
        s = np.nextafter(s, np.float32(1))
        if compact.int8_scales(np.array([[127 * s]], np.float32))[0] != s:
            return s
    raise AssertionError("every scale tried is a fixed point")


def _row_zero(q, i):
    q[i] = 0
    return q


@pytest.mark.parametrize("weights, change, msg", [
    ("int8", _set(W1 + ".scale", None),
     r"tensor 'layers\.1\.W': expected its row scales 'layers\.1\.W\.scale' in an int8 file, "
     r"got none"),
    ("int8", _set("layers.1.Wb.scale", np.ones(18, np.float32)),
     r"tensor 'layers\.1\.Wb\.scale': expected the row scales of an int8 weight matrix "
     r"'layers\.1\.Wb', got no such matrix"),
    ("int8", _set("layers.9.W.scale", np.ones(18, np.float32)),
     r"tensor 'layers\.9\.W\.scale': expected the row scales of an int8 weight matrix"),
    ("float16", _set(W1 + ".scale", np.ones(18, np.float32)),
     r"tensor 'layers\.1\.W\.scale': expected no row scales in a weights='float16' file \(only "
     r"int8 matrices have them\), got one"),
    ("int8", _edit(W1 + ".scale", lambda s: s[:-1]),
     r"tensor 'layers\.1\.W\.scale': expected \(18,\) float32, one scale per row of "
     r"'layers\.1\.W', got \(17,\) float32"),
    ("int8", _edit(W1 + ".scale", lambda s: s.reshape(2, 9)),
     r"tensor 'layers\.1\.W\.scale': expected \(18,\) float32.*got \(2, 9\) float32"),
    ("int8", _edit(W1 + ".scale", lambda s: s.astype(np.float16)),
     r"tensor 'layers\.1\.W\.scale': expected \(18,\) float32.*got \(18,\) float16"),
    ("int8", _edit(W1 + ".scale", _scale_at(3, np.inf)),
     r"tensor 'layers\.1\.W\.scale': expected finite positive scales, got inf at row 3"),
    ("int8", _edit(W1 + ".scale", _scale_at(4, np.nan)),
     r"tensor 'layers\.1\.W\.scale': expected finite positive scales, got nan at row 4"),
    ("int8", _edit(W1 + ".scale", _scale_at(0, 0.0)),
     r"expected finite positive scales, got 0\.0 at row 0"),
    ("int8", _edit(W1 + ".scale", _scale_at(1, -0.01)),
     r"expected finite positive scales, got -0\.01 at row 1"),
    ("int8", _edit(W1, lambda q: np.where(q == -127, np.int8(-128), q)),
     r"tensor 'layers\.1\.W': expected int8 values in \[-127, 127\] \(symmetric\), got -128 "
     r"at index"),
    ("int8", _edit(W1, lambda q: q // 2),
     r"tensor 'layers\.1\.W': expected the int8 form streamgru\.compact\.quantize_int8 writes "
     r".*got row 0 in another form; re-save the model with streamgru"),
    ("int8", _edit(W1 + ".scale", lambda s: _scale_at(2, _unsettled_scale(s[2]))(s)),
     r"expected the int8 form .* got row 2 in another form"),
    ("int8", _edit(W1, lambda q: _row_zero(q, 5)),
     r"expected the int8 form .* got row 5 in another form"),  # a zero row's scale is 1
    ("int8", _edit(W1, lambda q: q.astype(np.float32)),
     r"tensor 'layers\.1\.W': expected the weight matrix in int8 in a weights='int8' file, got "
     r"float32"),
    ("float16", _edit(W1, lambda h: h.astype(np.float32)),
     r"tensor 'layers\.1\.W': expected the weight matrix in float16 in a weights='float16' file, got "
     r"float32"),
    ("float16", _edit(W1, lambda h: np.zeros(h.shape, np.int8)),
     r"expected the weight matrix in float16 in a weights='float16' file, got int8"),
    ("float16", _edit("layers.1.Wb", lambda b: b.astype(np.float16)),
     r"tensor 'layers\.1\.Wb': expected a float32 vector in a compact file, got float16"),
    ("float16", _edit(W1, lambda h: h.reshape(1, 18, 5)),
     r"tensor 'layers\.1\.W': expected a vector or a weight matrix, got shape \(1, 18, 5\)"),
    ("float16", _edit(W1, lambda h: _scale_at(0, np.inf)(h)),
     r"layers\.1\.W: expected finite values, got inf at index \(0, 0\)"),
    ("int8", _set("layers.1.X", np.ones(3, np.float32)),
     r"tensor 'layers\.1\.X': expected only the tensors of the model's layers \(and int8 row "
     r"scales\), got this one too"),
    ("int8", _set("layers.1.W.extra", np.ones(3, np.float32)),
     r"tensor 'layers\.1\.W\.extra': expected only the tensors"),
    ("int8", _set("layers.1.Wb", np.ones(18, np.float64)),
     r"tensor 'layers\.1\.Wb': expected dtype F32, F16, I8 \(format_version 2\), got 'F64'"),
    ("int8", _meta("weights", "int4"),
     r"weights: expected 'float16' or 'int8' in a format_version '2' file, got 'int4'"),
    ("int8", _meta("weights", "float32"),
     r"weights: expected 'float16' or 'int8' in a format_version '2' file, got 'float32'"),
    ("int8", _meta("weights", None),
     r"weights: expected 'float16' or 'int8' in a format_version '2' file, got None"),
    ("float16", _meta("weights", "int8"),
     r"tensor 'layers\.0\.W': expected the weight matrix in int8 in a weights='int8' file, got "
     r"float16"),
])
def test_malformed_compact_file_is_refused_naming_file_and_tensor(tmp_path, weights, change, msg):
    p = _crafted(tmp_path, weights, change)
    with pytest.raises(FormatError, match=msg) as info:
        streamgru.load(p)
    assert str(info.value).startswith(str(p))


def test_version_1_file_with_compact_contents_is_refused(tmp_path):
    """What a version-1 reader sees of a compact file, and a version-1 file claiming a form."""
    p = _crafted(tmp_path, "int8", _meta("format_version", "1"))
    with pytest.raises(FormatError, match=r"tensor 'layers\.0\.W': expected dtype F32, F64, I64, "
                                          r"U8 \(format_version 1\), got 'I8'"):
        streamgru.load(p)
    m = model()
    meta = {"format": F.MODEL_FORMAT, "format_version": "1", "weights": "int8",
            "config": json.dumps(m.config(), sort_keys=True), "fingerprint": m.fingerprint,
            "source": ""}
    p.write_bytes(F._encode(m.named_tensors(), meta))
    with pytest.raises(FormatError, match=r"weights: expected none in a format_version '1' file "
                                          r"\(full precision\), got 'int8'"):
        streamgru.load(p)


def test_state_snapshot_refuses_compact_dtypes(tmp_path):
    """Only model files have a version 2: a snapshot holding float16 states is refused, not
    read as states of another precision."""
    m = model()
    meta = {"format": F.STATE_FORMAT, "format_version": "1", "model_fingerprint": m.fingerprint,
            "key_kind": "int", "count": 1, "state_size": m.state_size, "dtype": "float16"}
    p = tmp_path / "s.sgst"
    p.write_bytes(F._encode({"states": np.zeros((1, m.state_size), np.float16),
                             "keys": np.zeros(1, np.int64)}, meta))
    with pytest.raises(FormatError, match=r"tensor 'states': expected dtype F32, F64, I64, U8 "
                                          r"\(format_version 1\), got 'F16'"):
        F.load_state(p, m.fingerprint, m.state_size)
    with pytest.raises(FormatError, match=r"expected streamgru-state format_version '1', got '2'"):
        p.write_bytes(F._encode({"states": np.zeros((1, m.state_size), np.float32),
                                 "keys": np.zeros(1, np.int64)}, {**meta, "format_version": "2"}))
        F.load_state(p, m.fingerprint, m.state_size)
