"""Hostile and broken input.

* Property-based (hypothesis) over the arguments of step/run/open/set_state: every input either
  works as documented or raises TypeError/ValueError/KeyError with an "expected ..." message, and
  a failed call changes no stream (states, key set, evictions).
* Model files are data, never code: no pickle (or any other code-loading deserializer) in
  streamgru/ or converters/; torch.load only with weights_only=True; no Keras/TensorFlow import.
* Crafted foreign files: ONNX external data that escapes the model's directory (symlink) or claims
  more bytes than the file holds; Keras Lambda / lambda-function configs; NaN/inf weights in a
  native, .pt and .onnx file, refused at load with the tensor's name.
"""

import ast
import json
import os
import pathlib
import re
import shutil
import zipfile

import numpy as np
import pytest
from helpers import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import streamgru
from streamgru import Engine, GRUModel
from streamgru import formats as F
from streamgru.errors import FormatError, UnsupportedModelError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
I = 3
MODEL = GRUModel.random(I, [4, 3], dense_after=[(2, "softmax")], seed=5)
S = MODEL.state_size
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- strategies

key_atoms = st.one_of(
    st.integers(-(2**64), 2**64),
    st.text(max_size=4),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
            max_size=2),  # lone surrogates: not UTF-8, could never be saved
    st.booleans(), st.floats(), st.none(), st.binary(max_size=3),
    st.tuples(st.integers(0, 3)),
    st.integers(0, 5).map(np.int32), st.integers(0, 2**64 - 1).map(np.uint64),
    st.floats(width=32).map(np.float32),
    st.sampled_from(["k0", "k1", "k2", 0, 1, 2]),  # keys the engine already holds
)
key_arrays = hnp.arrays(st.sampled_from([np.int64, np.uint64, np.int8, np.float64, np.bool_, "U2",
                                         "S2"]),
                        hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
keys_args = st.one_of(st.lists(key_atoms, max_size=5), st.lists(key_atoms, max_size=5).map(tuple),
                      key_atoms, key_arrays, st.just(range(3)), st.dictionaries(st.text(), st.integers()))
float_arrays = hnp.arrays(
    st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.bool_, np.complex64, "U1"]),
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),  # float elements include NaN and inf
)
inputs = st.one_of(
    float_arrays,
    hnp.arrays(np.float32, st.tuples(st.integers(0, 5), st.sampled_from([I, I + 1])),
               elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    st.integers(0, 5).flatmap(lambda n: st.lists(st.lists(st.floats(-3, 3), min_size=I, max_size=I),
                                                 min_size=n, max_size=n)),
    st.lists(st.lists(st.floats(), max_size=4), max_size=3),  # ragged, NaN
    st.none(), st.text(max_size=3), st.integers(),
)
states = st.one_of(
    hnp.arrays(st.sampled_from([np.float32, np.float64, np.int16, np.uint8, np.bool_, np.complex128,
                                "U1"]),
               st.sampled_from([(S,), (2, S // 2) if S % 2 == 0 else (S, 1), (S - 1,), (S + 1,), ()]),
               elements=None),
    hnp.arrays(np.float64, (S,), elements=st.floats(allow_nan=True, allow_infinity=True)),
    st.lists(st.floats(-1e300, 1e300), min_size=S, max_size=S),
    st.lists(st.integers(-(2**70), 2**70), min_size=S, max_size=S),
    st.none(), st.text(max_size=3),
)


# --------------------------------------------------------------------------- the property


class Evicted(list):
    def __call__(self, key, state):
        self.append(key)


def make_engine(kind, bounded):
    evicted = Evicted()
    kw = {"max_streams": 4, "on_evict": evicted} if bounded else {}
    eng = Engine(MODEL, **kw)
    keys = ["k0", "k1", "k2"] if kind == "str" else [0, 1, 2]
    eng.step(keys, np.random.default_rng(0).normal(size=(3, I)))
    return eng, evicted


def check(eng, evicted, call, on_success):
    before, n_evicted = snapshot(eng), len(evicted)
    try:
        result = call()
    except (TypeError, ValueError, KeyError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        assert re.search(r"^[\w\[\]().=' -]*: expected ", str(text)), f"unclear message: {text!r}"
        after = snapshot(eng)
        assert set(after) == set(before)
        for k, s in before.items():
            np.testing.assert_array_equal(after[k], s)
        assert len(evicted) == n_evicted
        return
    on_success(before, result)


def untouched(eng, before, listed):
    for k, s in before.items():
        if k not in listed and k in eng:
            np.testing.assert_array_equal(eng.state(k), s)


def good_keys(kind):
    pool = ["k0", "k1", "k2", "new1", "new2", "é"] if kind == "str" else [0, 1, 2, 7, 8, -(2**63)]
    return st.sampled_from(pool)


def good_rows(n=None):
    return hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16]),
                      st.tuples(st.integers(0, 6) if n is None else st.just(n), st.just(I)),
                      elements=st.floats(-4, 4, width=16))


@st.composite
def step_args(draw, kind):
    # A coin per argument (st.one_of would flatten the hostile strategies' branches and make
    # valid calls rare): about a quarter of the calls are fully valid.
    keys = draw(st.lists(good_keys(kind), max_size=6) if draw(st.booleans()) else keys_args)
    try:
        n = len(keys)
    except TypeError:
        n = 1
    x = draw(good_rows(n) if draw(st.booleans()) else inputs)
    return keys, x


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int", "str"])
@pytest.mark.parametrize("bounded", [False, True])
@SETTINGS
@given(data=st.data())
def test_step_either_works_or_refuses_cleanly(kind, bounded, data):
    keys, x = data.draw(step_args(kind))
    eng, evicted = make_engine(kind, bounded)

    def ok(before, y):
        ks = list(keys.tolist() if isinstance(keys, np.ndarray) else keys)
        assert y.shape == (len(ks), MODEL.output_size) and y.dtype == np.float32
        assert all(k in eng for k in ks)
        assert np.isfinite(y).all()
        untouched(eng, before, set(ks))
        assert len(eng) <= (4 if bounded else 3 + len(ks))

    check(eng, evicted, lambda: eng.step(keys, x), ok)


@pytest.mark.parametrize("kind", ["int", "str"])
@SETTINGS
@given(data=st.data())
def test_run_either_works_or_refuses_cleanly(kind, data):
    key = data.draw(good_keys(kind) if data.draw(st.booleans()) else key_atoms)
    xs = data.draw(good_rows() if data.draw(st.booleans()) else inputs)
    eng, evicted = make_engine(kind, True)

    def ok(before, y):
        assert y.ndim == 2 and y.shape[1] == MODEL.output_size and y.dtype == np.float32
        if len(y):
            assert key in eng
        untouched(eng, before, {key})

    check(eng, evicted, lambda: eng.run(key, xs), ok)


@pytest.mark.parametrize("verb", ["open", "set_state"])
@pytest.mark.parametrize("kind", ["int", "str"])
@SETTINGS
@given(data=st.data())
def test_open_and_set_state_either_work_or_refuse_cleanly(verb, kind, data):
    key = data.draw(good_keys(kind) if data.draw(st.booleans()) else key_atoms)
    state = data.draw(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int8]),
                                 st.sampled_from([(S,), (1, S), (S, 1)]), elements=st.integers(-3, 3))
                      if data.draw(st.booleans()) else states)
    eng, evicted = make_engine(kind, True)

    def ok(before, _):
        assert key in eng
        got = eng.state(key)
        if state is None:
            assert not got.any()
        else:
            np.testing.assert_array_equal(got, np.asarray(state, np.float32).reshape(-1))
        untouched(eng, before, {key})

    call = (lambda: eng.open(key, state)) if verb == "open" else (lambda: eng.set_state(key, state))
    check(eng, evicted, call, ok)


def test_surrogate_key_refused_before_it_could_break_save_state(tmp_path):
    eng = Engine(MODEL)
    with pytest.raises(ValueError, match=r"keys\[0\]|key: expected a str encodable as UTF-8"):
        eng.step(["\ud800", "fine"], np.ones((2, I)))
    assert len(eng) == 0
    eng.step(["fine"], np.ones((1, I)))
    eng.save_state(tmp_path / "s")


# --------------------------------------------------------------------------- data, never code

CODE_LOADERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve",
                "keras", "tensorflow", "tf_keras"}


def _offences(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in CODE_LOADERS]
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in CODE_LOADERS:
            found.append(node.module)
        elif isinstance(node, ast.Name) and node.id in CODE_LOADERS:
            found.append(node.id)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            kw = {k.arg: k.value for k in node.keywords}
            owner = getattr(getattr(f, "value", None), "id", "")
            if name == "load" and owner == "torch":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"torch.load without weights_only=True (line {node.lineno})")
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                              and kw["allow_pickle"].value is False):
                found.append(f"allow_pickle (line {node.lineno})")
            if name in ("eval", "exec") and isinstance(f, ast.Name):
                found.append(f"{name}() (line {node.lineno})")
            if name in ("load_model", "model_from_json") and owner in ("keras", "models"):
                found.append(f"{owner}.{name} (line {node.lineno})")
    return found


def test_no_code_loading_deserializer_in_the_package_or_converters():
    files = sorted((ROOT / "streamgru").rglob("*.py")) + sorted((ROOT / "converters").rglob("*.py"))
    assert len(files) > 8
    offences = {str(p.relative_to(ROOT)): o for p in files if (o := _offences(p))}
    assert offences == {}


def test_the_code_loader_check_catches_what_it_should(tmp_path):
    p = tmp_path / "bad.py"
    p.write_text("import pickle\nfrom joblib import load\nimport torch\n"
                 "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
                 "np.load('x.npy', allow_pickle=True)\neval('1')\n"
                 "torch.load('ok.pt', weights_only=True)\n'pickle in a string is fine'\n")
    got = _offences(p)
    assert got[:2] == ["pickle", "joblib"] and sum("torch.load" in g for g in got) == 2
    assert any("allow_pickle" in g for g in got) and any("eval" in g for g in got)
    assert len(got) == 6


# --------------------------------------------------------------------------- NaN/inf weights

def test_native_model_with_nan_is_refused_naming_the_tensor(tmp_path):
    tensors = dict(MODEL.named_tensors())
    tensors["layers.1.R"] = tensors["layers.1.R"].copy()
    tensors["layers.1.R"][2, 1] = np.nan
    meta = {"format": "streamgru-model", "format_version": "1", "fingerprint": MODEL.fingerprint,
            "source": "", "config": json.dumps(MODEL.config(), sort_keys=True)}
    (tmp_path / "m.sgru").write_bytes(F._encode(tensors, meta))  # a valid checksum: crafted
    with pytest.raises(FormatError, match=r"layers\.1\.R: expected finite values, got nan at index "
                                          r"\(2, 1\)"):
        streamgru.load(tmp_path / "m.sgru")


def test_pt_with_inf_is_refused_naming_the_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torch.nn.GRU(3, 4).state_dict()
    sd["weight_hh_l0"][1, 2] = float("-inf")
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected finite values, got -inf at index "
                                         r"\(1, 2\)"):
        streamgru.load(tmp_path / "m.pt")


def _onnx_gru(W, R, tmp_path, name="m.onnx"):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    H = R.shape[-1]
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y", "Y_h"], hidden_size=H, name="gru")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", W.shape[-1]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    model = helper.make_model(graph)
    onnx.save(model, str(tmp_path / name))
    return model


def test_onnx_with_nan_is_refused_naming_the_tensor(tmp_path):
    W = np.zeros((1, 12, 3), np.float32)
    W[0, 7, 2] = np.nan
    _onnx_gru(W, np.zeros((1, 12, 4), np.float32), tmp_path)
    with pytest.raises(FormatError, match=r"m\.onnx: initializer 'W' \(node 'gru' \(GRU\) input W\): "
                                          r"expected finite values, got nan at index \(0, 7, 2\)"):
        streamgru.load(tmp_path / "m.onnx")


# --------------------------------------------------------------------------- ONNX external data

def _external(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _onnx_gru(np.zeros((1, 12, 3), np.float32), np.zeros((1, 12, 4), np.float32), tmp_path)
    d = tmp_path / "model"
    d.mkdir()
    onnx.save_model(model, str(d / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert streamgru.load(d / "m.onnx").layers[0].hidden_size == 4
    return onnx, d


def _set_external(onnx, src, dst, **values):
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key in values:
                e.value = values[e.key]
    onnx.save_model(m, str(dst))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_onnx_external_data_through_a_symlink_out_of_the_directory_is_refused(tmp_path):
    onnx, d = _external(tmp_path)
    secret = tmp_path / "secret.bin"
    shutil.copy(d / "weights.bin", secret)
    os.symlink(secret, d / "link.bin")
    _set_external(onnx, d / "m.onnx", d / "evil.onnx", location="link.bin")
    with pytest.raises(UnsupportedModelError, match="expected an external data file inside"):
        streamgru.load(d / "evil.onnx")


@pytest.mark.parametrize("values", [{"length": str(2**41)}, {"offset": "-8"},
                                    {"offset": "400", "length": "144"}, {"length": "lots"}])
def test_onnx_external_data_claiming_more_than_the_file_is_refused_before_reading(tmp_path, values):
    onnx, d = _external(tmp_path)
    _set_external(onnx, d / "m.onnx", d / "evil.onnx", **values)
    with pytest.raises(UnsupportedModelError, match=r"expected external data within 'weights.bin' "
                                                    r"\(\d+ bytes\)"):
        streamgru.load(d / "evil.onnx")


# --------------------------------------------------------------------------- Keras: no code runs

def test_keras_lambda_activation_function_is_refused(tmp_path):
    """Keras 3 serializes a Python lambda as {"class_name": "__lambda__", "config": {"code": ...}}
    (marshalled byte code). It must be refused, never unmarshalled."""
    from converters import from_keras

    def edit(cfg):
        gru = [lay for lay in cfg["config"]["layers"] if lay["class_name"] == "GRU"][0]
        gru["config"]["activation"] = {"module": "builtins", "class_name": "__lambda__",
                                       "config": {"code": "4wAAAAAAAAAA", "defaults": None,
                                                  "closure": None}, "registered_name": None}

    src, dst = FIX / "keras_seq_reset_after.keras", tmp_path / "m.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                cfg = json.loads(data)
                edit(cfg)
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    with pytest.raises(UnsupportedModelError, match=r"layer 'gru' \(GRU\): activation"):
        from_keras(dst)


def test_keras_legacy_h5_lambda_layer_is_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    from converters import from_keras

    dst = tmp_path / "m.h5"
    shutil.copy(FIX / "keras_legacy_hard_sigmoid.h5", dst)
    with h5py.File(dst, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        cfg["config"]["layers"].insert(1, {"class_name": "Lambda", "config": {
            "name": "evil", "function": ["4wAAAAAAAAAA", None, None], "function_type": "lambda",
            "module": "__main__"}})
        f.attrs["model_config"] = json.dumps(cfg)
    with pytest.raises(UnsupportedModelError, match=r"layer 'evil' \(Lambda\): a Lambda layer is "
                                                    r"Python code"):
        from_keras(dst)


# --------------------------------------------------------------------------- bounded reads

LOADERS = {  # every file type streamgru.load takes, plus state snapshots
    "sgru": lambda p: streamgru.load(p),
    "sgst": lambda p: F.load_state(p, MODEL.fingerprint, S),
    "engine-sgst": lambda p: Engine(MODEL).load_state(p),  # what `--state` calls
    "onnx": lambda p: streamgru.load(p),
    "pt": lambda p: streamgru.load(p),
    "safetensors": lambda p: streamgru.load(p),
    "keras": lambda p: streamgru.load(p),
    "h5": lambda p: streamgru.load(p),
    "json": lambda p: streamgru.load(p),
}


def _suffix(kind):
    return "." + kind.split("-")[-1]


def _needs(kind):
    for module, kinds in (("onnx", ("onnx",)), ("torch", ("pt",)), ("h5py", ("keras", "h5"))):
        if kind in kinds:
            pytest.importorskip(module)


def _refused_within(call, seconds, unblock):
    """Run ``call`` in a thread; return what it raised. If it is still running after
    ``seconds`` (a read blocked on a FIFO), ``unblock()`` frees it and the test fails, so that a
    regression cannot hang the suite."""
    import threading

    box = {}

    def run():
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: B036 -- handed to the test thread
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        unblock()
        t.join(seconds)
        pytest.fail(f"the load blocked for {seconds} s")
    return box.get("exc")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_fifo_is_refused_without_blocking(tmp_path, kind):
    _needs(kind)
    fifo = tmp_path / f"m{_suffix(kind)}"
    os.mkfifo(fifo)

    def unblock():  # a writer that opens and closes at once ends any blocked open or read
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    exc = _refused_within(lambda: LOADERS[kind](fifo), 20, unblock)
    assert isinstance(exc, FormatError), repr(exc)
    assert re.search(r"expected a regular file, got '.*m\.\w+', a FIFO", str(exc)), str(exc)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("kind", ["sgst", "sgru", "onnx", "keras"])
def test_a_device_is_refused_without_reading(tmp_path, kind):
    """/dev/zero never ends: it was read until MemoryError."""
    _needs(kind)
    link = tmp_path / f"m{_suffix(kind)}"
    os.symlink("/dev/zero", link)
    exc = _refused_within(lambda: LOADERS[kind](link), 20, lambda: None)
    assert isinstance(exc, FormatError), repr(exc)
    assert "a character device" in str(exc)
    with pytest.raises(FormatError, match="expected a regular file, got '/dev/zero', a character"):
        F.load_state("/dev/zero", MODEL.fingerprint, S)


@pytest.mark.parametrize("kind", sorted(set(LOADERS) - {"engine-sgst"}))
def test_a_file_larger_than_the_limit_is_refused_before_reading(tmp_path, kind):
    """A 2 GiB sparse file (no disk space used) was read whole."""
    _needs(kind)
    p = tmp_path / f"m{_suffix(kind)}"
    with open(p, "wb") as f:
        f.truncate(2**31)
    exc = _refused_within(lambda: LOADERS[kind](p), 20, lambda: None)
    assert isinstance(exc, FormatError), repr(exc)
    if kind == "sgst":  # a snapshot's size is checked against its header, read first
        assert "expected a JSON header" in str(exc), str(exc)
        return
    assert re.search(rf"expected a file of at most {F.MAX_READ_BYTES} bytes "
                     rf"\(streamgru\.formats\.MAX_READ_BYTES\), got '.*m\.\w+' of 2147483648 "
                     rf"bytes", str(exc)), str(exc)


def test_a_snapshot_is_bounded_by_its_header_not_by_the_model_file_limit(tmp_path, monkeypatch):
    """A large engine's snapshot may exceed MAX_READ_BYTES: it must still load (a pipeline
    restart would otherwise fail on its own checkpoint), bounded by MAX_STATE_BYTES instead, and
    a file padded or cut relative to its header is refused before its body is read."""
    eng = Engine(MODEL)
    eng.set_state("a", np.arange(S, dtype=np.float32))
    eng.save_state(tmp_path / "s.sgst")
    size = (tmp_path / "s.sgst").stat().st_size
    monkeypatch.setattr(F, "MAX_READ_BYTES", 64)
    keys, states = F.load_state(tmp_path / "s.sgst", MODEL.fingerprint, S)
    assert keys == ["a"] and states[0].tolist() == list(range(S))
    with open(tmp_path / "s.sgst", "ab") as f:  # padded past what the header declares
        f.truncate(2**31)
    with pytest.raises(FormatError, match=rf"expected {size} bytes \(as its header declares\), "
                                          rf"got {2**31}"):
        F.load_state(tmp_path / "s.sgst", MODEL.fingerprint, S)
    eng.save_state(tmp_path / "s.sgst")
    monkeypatch.setattr(F, "MAX_STATE_BYTES", size - 1)
    with pytest.raises(FormatError, match=r"at most \d+ bytes \(streamgru\.formats\.MAX_STATE_"):
        F.load_state(tmp_path / "s.sgst", MODEL.fingerprint, S)
    with pytest.raises(FormatError, match=r"MAX_STATE_BYTES.*nothing was written"):
        eng.save_state(tmp_path / "t.sgst")
    assert not (tmp_path / "t.sgst").exists()


def test_the_limit_is_a_module_setting_read_at_each_load(tmp_path, monkeypatch):
    MODEL.save(tmp_path / "m.sgru")
    size = (tmp_path / "m.sgru").stat().st_size
    monkeypatch.setattr(F, "MAX_READ_BYTES", size - 1)
    with pytest.raises(FormatError, match=rf"at most {size - 1} bytes .* of {size} bytes"):
        streamgru.load(tmp_path / "m.sgru")
    monkeypatch.setattr(F, "MAX_READ_BYTES", size)
    assert streamgru.load(tmp_path / "m.sgru").fingerprint == MODEL.fingerprint


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "d.sgru").mkdir()
    with pytest.raises(FormatError, match="expected a regular file, got '.*d.sgru', a directory"):
        streamgru.load(tmp_path / "d.sgru")


def _bomb(tmp_path, size):
    """The Keras fixture with model.weights.h5 replaced by ``size`` zero bytes, deflated
    (about 1000:1), written in chunks so that the test itself stays small."""
    src, dst = FIX / "keras_seq_reset_after.keras", tmp_path / "bomb.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.namelist():
            if item != "model.weights.h5":
                zout.writestr(item, zin.read(item))
        with zout.open("model.weights.h5", "w", force_zip64=True) as w:
            chunk = bytes(2**20)
            for _ in range(size // len(chunk)):
                w.write(chunk)
    return dst


def test_keras_zip_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    """A 412 KB .keras archive decompressing to ~425 MB loaded with 846 MB peak RSS. The
    default limit (256 MiB) refuses one of 300 MiB from the archive's directory; a lowered
    limit refuses a smaller one the same way."""
    pytest.importorskip("h5py")
    bomb = _bomb(tmp_path, 300 * 2**20)
    assert bomb.stat().st_size < 2**20
    with pytest.raises(FormatError, match=r"bomb\.keras: archive members .* once decompressed: "
                                          r"expected at most 268435456 bytes \(streamgru\.formats"
                                          r"\.MAX_READ_BYTES\), got a claim of 3145\d+ bytes"):
        streamgru.load(bomb)
    small = _bomb(tmp_path, 4 * 2**20)
    monkeypatch.setattr(F, "MAX_READ_BYTES", 2**20)
    with pytest.raises(FormatError, match=r"got a claim of 41\d+ bytes"):
        streamgru.load(small)


def test_h5_dataset_claiming_gigabytes_is_refused_before_reading(tmp_path):
    """A 36 KB .h5 whose dataset claims (50000, 50000) tried to allocate 9.3 GiB."""
    h5py = pytest.importorskip("h5py")
    dst = tmp_path / "m.h5"
    shutil.copy(FIX / "keras_legacy_hard_sigmoid.h5", dst)
    with h5py.File(dst, "r+") as f:
        found = []
        f["model_weights"].visititems(
            lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
        name = "model_weights/" + found[0]
        del f[name]
        f.create_dataset(name, shape=(50000, 50000), dtype="float32")  # no data written
    assert dst.stat().st_size < 100_000
    with pytest.raises(FormatError, match=r"m\.h5: dataset .* of shape \(50000, 50000\): expected "
                                          r"at most \d+ bytes \(streamgru\.formats\.MAX_READ_BYTES"
                                          r"\), got a claim of 10000000000 bytes"):
        streamgru.load(dst)


# --------------------------------------------------------------------------- foreign errors

def _refused_for(path, cause, pattern=""):
    """streamgru.load(path) raises FormatError naming the file, chained to a ``cause``."""
    with pytest.raises(FormatError) as info:
        streamgru.load(path)
    assert path.name in str(info.value)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    return info.value


def test_onnx_garbage_and_truncation_are_format_errors(tmp_path):
    pytest.importorskip("onnx")
    from google.protobuf.message import DecodeError

    _onnx_gru(np.zeros((1, 12, 3), np.float32), np.zeros((1, 12, 4), np.float32), tmp_path)
    good = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "garbage.onnx").write_bytes(b"\xff" * 64)
    _refused_for(tmp_path / "garbage.onnx", DecodeError, "protobuf cannot parse")
    (tmp_path / "cut.onnx").write_bytes(good[:len(good) // 2])
    _refused_for(tmp_path / "cut.onnx", DecodeError, "truncated, corrupted or not ONNX")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(FormatError, match="expected an ONNX model with a graph"):
        streamgru.load(tmp_path / "empty.onnx")


@pytest.mark.parametrize("dims, pattern", [
    ([1, 12, 3000], r"tensor 'W': expected data for 36000 elements \(dims \[1, 12, 3000\]\), got "
                    r"data for 36"),
    ([1, 2**20, 2**20], r"tensor 'W' of dims \[1, 1048576, 1048576\]: expected at most \d+ bytes "
                        r"\(streamgru\.formats\.MAX_READ_BYTES\)"),
])
def test_onnx_initializer_claiming_more_than_it_holds(tmp_path, dims, pattern):
    """numpy said "cannot reshape array of size 36 into shape (1,12,3000)"."""
    onnx = pytest.importorskip("onnx")
    model = _onnx_gru(np.zeros((1, 12, 3), np.float32), np.zeros((1, 12, 4), np.float32), tmp_path)
    w = next(t for t in model.graph.initializer if t.name == "W")
    del w.dims[:]
    w.dims.extend(dims)
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(FormatError, match=pattern):
        streamgru.load(tmp_path / "m.onnx")


def _pt_with_pickle(tmp_path, torch, edit):
    """A torch.save zip archive of a GRU state_dict with data.pkl replaced by edit(data.pkl)."""
    import io

    buf = io.BytesIO()
    torch.save(torch.nn.GRU(3, 4).state_dict(), buf)
    p = tmp_path / "m.pt"
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(p, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            zout.writestr(item, edit(data) if item.endswith("data.pkl") else data)
    return p


@pytest.mark.parametrize("edit, cause", [
    (lambda pkl: b"", EOFError),
    (lambda pkl: b"\x80\x02h\xff.", KeyError),  # BINGET of a memo entry that does not exist
    (lambda pkl: pkl[:len(pkl) // 2], IndexError),
], ids=["EOFError", "KeyError", "IndexError"])
def test_pt_damaged_pickle_is_a_format_error(tmp_path, edit, cause):
    torch = pytest.importorskip("torch")
    _refused_for(_pt_with_pickle(tmp_path, torch, edit), cause, "that torch cannot read")


def test_pt_not_laid_out_as_torch_writes_is_a_format_error(tmp_path):
    pytest.importorskip("torch")
    p = tmp_path / "m.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x", b"y")
    _refused_for(p, RuntimeError, "that torch cannot read")


def test_pt_legacy_format_is_refused_it_would_allocate_what_it_claims(tmp_path):
    """The pre-1.6 format makes torch allocate each storage at its claimed size first."""
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.GRU(3, 4).state_dict(), tmp_path / "m.pt",
               _use_new_zipfile_serialization=False)
    _refused_for(tmp_path / "m.pt", zipfile.BadZipFile, "the legacy format is not read")


def test_keras_damaged_archive_is_a_format_error(tmp_path):
    """It raised zipfile.BadZipFile although the docstring promises ValueError."""
    pytest.importorskip("h5py")
    data = bytearray((FIX / "keras_seq_reset_after.keras").read_bytes())
    data[0:4] = b"PK\x00\x00"  # the first local header's signature; the directory still finds it
    (tmp_path / "m.keras").write_bytes(bytes(data))
    _refused_for(tmp_path / "m.keras", zipfile.BadZipFile, "expected a readable Keras model file")


def test_h5_damaged_file_is_a_format_error(tmp_path):
    """h5py raised KeyError / OSError / RuntimeError for a damaged file."""
    h5py = pytest.importorskip("h5py")
    dst = tmp_path / "m.h5"
    shutil.copy(FIX / "keras_legacy_hard_sigmoid.h5", dst)
    with h5py.File(dst, "r+") as f:  # a weight name pointing at nothing
        g = next(g for g in f["model_weights"].values() if len(g.attrs.get("weight_names", [])))
        names = [n.encode() if isinstance(n, str) else n for n in g.attrs["weight_names"]]
        g.attrs["weight_names"] = np.array([b"nowhere/kernel:0"] + names[1:])
    _refused_for(dst, KeyError, "KeyError: Unable to .*open object")
    data = dst.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:len(data) // 3])
    _refused_for(tmp_path / "cut.h5", OSError, "truncated file")


@pytest.mark.parametrize("where", ["rtneural", "state-dict", "keras"])
def test_deeply_nested_json_is_a_format_error(tmp_path, where):
    """A deeply nested .json or .keras config raised RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    if where == "keras":
        pytest.importorskip("h5py")
        p = tmp_path / "m.keras"
        with zipfile.ZipFile(FIX / "keras_seq_reset_after.keras") as zin, \
                zipfile.ZipFile(p, "w") as zout:
            for item in zin.namelist():
                zout.writestr(item, deep if item == "config.json" else zin.read(item))
    else:
        p = tmp_path / "m.json"
        doc = {"in_shape": [None, 1], "layers": deep} if where == "rtneural" else {"w": deep}
        p.write_text(json.dumps(doc).replace(json.dumps(deep), deep))
    _refused_for(p, RecursionError)
