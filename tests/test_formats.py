"""Native model files and state snapshots: round trips, versioning, corruption, atomicity."""

import json
import os
import struct

import numpy as np
import pytest
from helpers import mixed_lstm_model

import streamgru
from streamgru import Engine, GRUModel
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
    with pytest.raises(FormatError, match="expected streamgru-model format_version '1', got '99'"):
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
