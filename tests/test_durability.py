"""Durability: save_state survives SIGKILL at any moment; damaged or crafted files are refused.

* A writer process saving snapshots in a loop is killed with SIGKILL 50 times: at random moments
  in odd rounds, and in even rounds a random 0-1 ms after a save's temp file appears (so that
  kills land mid-write however fast this machine writes). After each kill the file must load
  and be exactly one complete snapshot, never older than the previous round's (snapshots are
  told apart by a counter stream).
* Truncations (every 3rd/7th length) and a bit flip at every header byte and at sampled data
  bytes of a state file and a model file are refused with a FormatError (checksum, header or
  layout), never loaded as garbage or crashing otherwise.
* Crafted headers claiming absurd sizes are refused before anything is allocated.
"""

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import streamgru
from streamgru import Engine, GRUModel
from streamgru import formats as F
from streamgru.errors import FormatError

KILLS = 50
HIDDEN = 64  # state_size of the writer's model: snapshots of ~0.4-1 MB, so kills land mid-write

# The writer side. One Python process imports streamgru once, then forks a child per round (a fork
# of a single-threaded process costs milliseconds, a fresh interpreter ~1 s); the child saves
# snapshots counter, counter+1, ... until the parent kills it at a random moment.
WRITER = textwrap.dedent(r"""
    import os, random, signal, sys, time
    import numpy as np
    from streamgru import Engine, GRUModel

    path, kills, seed, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def count(c):
        return 800 + (c % 7) * 100

    def run(eng, c):
        while True:
            n = count(c)
            for k in [k for k in eng.keys() if k >= n]:
                eng.close(k)
            for k in range(1, n):
                if k not in eng:
                    eng.set_state(k, np.full(hidden, float(k)))
            eng.set_state(0, np.full(hidden, float(c)))
            eng.save_state(path)
            c += 1

    eng = Engine(GRUModel.random(2, hidden, seed=0), dtype="float64")
    rng = random.Random(seed)
    c = 0
    n = count(c)
    for k in range(n):
        eng.set_state(k, np.full(hidden, float(k if k else c)))
    eng.save_state(path)
    for r in range(1, kills + 1):
        pid = os.fork()
        if pid == 0:
            try:
                run(eng, r * 1_000_000)
            finally:
                os._exit(1)
        if r % 2:
            time.sleep(rng.uniform(0.0, 0.04))  # any moment: between saves or during one
        else:
            # aimed at a save in progress: wait for its temp file, then kill within ~1 ms
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not any(
                    f.endswith(".tmp") for f in os.listdir(os.path.dirname(path))):
                time.sleep(0.0002)
            time.sleep(rng.uniform(0.0, 0.001))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tmp = [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
        with open(path, "rb") as f:
            data = f.read()
        with open(f"{path}.after-{r}", "wb") as f:
            f.write(data)
        for name in tmp:
            os.unlink(os.path.join(os.path.dirname(path), name))
        print(r, len(tmp), flush=True)
""")


def _count(c):
    return 800 + (c % 7) * 100


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_save_state_survives_sigkill_at_random_moments(tmp_path):
    path = tmp_path / "snap.sgru"
    proc = subprocess.run([sys.executable, "-c", WRITER, str(path), str(KILLS), "12345", str(HIDDEN)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rounds = [tuple(map(int, line.split())) for line in proc.stdout.strip().splitlines()]
    assert [r for r, _ in rounds] == list(range(1, KILLS + 1))
    mid_write = sum(1 for _, tmp in rounds if tmp)
    fp = GRUModel.random(2, HIDDEN, seed=0).fingerprint
    previous = 0
    for r in range(1, KILLS + 1):
        keys, states = F.load_state(f"{path}.after-{r}", fp, HIDDEN)
        state_of = dict(zip(keys, states))
        c = int(state_of[0][0])
        # Exactly the complete snapshot c: its key set and every state.
        assert sorted(keys) == list(range(_count(c)))
        np.testing.assert_array_equal(state_of[0], np.full(HIDDEN, float(c)))
        for k in range(1, _count(c)):
            np.testing.assert_array_equal(state_of[k], np.full(HIDDEN, float(k)))
        # This round's snapshot, or the last one that had completed before it (never older).
        assert c == previous or r * 1_000_000 <= c < (r + 1) * 1_000_000, (r, c, previous)
        previous = c
    # The kills must have hit saves in progress (a temp file left behind) in a good share of rounds.
    assert mid_write >= KILLS // 5, f"only {mid_write} of {KILLS} kills landed mid-write"


# --------------------------------------------------------------------------- damaged files

def _positions(raw, rng, n_data=80):
    """Every byte of the length prefix and the JSON header (where a flip changes structure), and a
    sample of the data section (where every byte is alike: the checksum covers it)."""
    (hlen,) = struct.unpack("<Q", raw[:8])
    data = rng.choice(np.arange(8 + hlen, len(raw)), min(n_data, len(raw) - 8 - hlen), replace=False)
    return list(range(8 + hlen)) + sorted(data.tolist())


def _small_model():
    return GRUModel.random(3, [4, 3], dense_after=[(2, "softmax")], seed=1)


def _state_file(tmp_path, kind):
    eng = Engine(_small_model())
    keys = [f"k{i}" for i in range(5)] if kind == "str" else list(range(5))
    eng.step(keys, np.random.default_rng(0).normal(size=(5, 3)))
    p = tmp_path / f"s-{kind}.sgru"
    eng.save_state(p)
    return eng, p


@pytest.mark.parametrize("kind", ["int", "str"])
def test_every_truncation_and_bit_flip_of_a_state_file_is_refused(tmp_path, kind):
    eng, p = _state_file(tmp_path, kind)
    raw = p.read_bytes()
    fresh = Engine(_small_model())
    fresh.step(["other"] if kind == "str" else [99], np.ones((1, 3)))
    before = fresh.state("other" if kind == "str" else 99)
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad"
    for cut in range(0, len(raw), 3):
        bad.write_bytes(raw[:cut])
        with pytest.raises(FormatError):
            fresh.load_state(bad)
    for i in _positions(raw, rng):
        flipped = bytearray(raw)
        flipped[i] ^= 1 << int(rng.integers(8))
        bad.write_bytes(bytes(flipped))
        with pytest.raises(FormatError):
            fresh.load_state(bad)
    assert len(fresh) == 1
    np.testing.assert_array_equal(fresh.state("other" if kind == "str" else 99), before)
    fresh.load_state(p)  # the intact file still loads
    assert sorted(fresh.keys()) == sorted(eng.keys())


def test_every_truncation_and_bit_flip_of_a_model_file_is_refused(tmp_path):
    p = tmp_path / "m.sgru"
    _small_model().save(p)
    raw = p.read_bytes()
    rng = np.random.default_rng(2)
    # In memory (the same parser as streamgru.load; writing ~1,500 files is slow on a busy disk).
    for cut in range(len(raw)):
        with pytest.raises(FormatError):
            F.model_from_bytes(raw[:cut])
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(FormatError):
            F.model_from_bytes(bytes(flipped))
    bad = tmp_path / "bad.sgru"
    bad.write_bytes(raw[:-1])
    with pytest.raises(FormatError, match="bad.sgru"):
        streamgru.load(bad)


# --------------------------------------------------------------------------- crafted files

def _craft(path, tensors, meta, data):
    """A native file with a valid checksum over whatever header we claim (a checksum is not a
    signature: anyone can compute it, so the parser must not trust the header's claims)."""
    meta = dict(meta)
    meta["checksum"] = F._checksum({**tensors, "__metadata__": meta}, data)
    header = json.dumps({**tensors, "__metadata__": meta}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _state_meta(fp, **kw):
    return {"format": "streamgru-state", "format_version": "1", "model_fingerprint": fp,
            "key_kind": "int", "count": "1", "state_size": "9", "dtype": "float32", **kw}


def test_crafted_state_headers_are_refused_before_allocating(tmp_path):
    m = _small_model()
    fp, S = m.fingerprint, m.state_size
    eng = Engine(m)
    cases = {
        # 2**32 * 2**32 wraps to 0 in int64: the extent check must use exact integers.
        "overflowing shape": ({"states": {"dtype": "F32", "shape": [2**32, 2**32],
                                          "data_offsets": [0, 0]},
                               "keys": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
                              _state_meta(fp), b"\0" * 8),
        "huge shape": ({"states": {"dtype": "F32", "shape": [2**40, S], "data_offsets": [0, 36]},
                        "keys": {"dtype": "I64", "shape": [1], "data_offsets": [36, 44]}},
                       _state_meta(fp), b"\0" * 44),
        "huge count": ({"states": {"dtype": "F32", "shape": [1, S], "data_offsets": [0, 36]},
                        "keys": {"dtype": "I64", "shape": [1], "data_offsets": [36, 44]}},
                       _state_meta(fp, count=str(10**15)), b"\0" * 44),
        "float shape": ({"states": {"dtype": "F32", "shape": [1.0, S], "data_offsets": [0, 36]},
                         "keys": {"dtype": "I64", "shape": [1], "data_offsets": [36, 44]}},
                        _state_meta(fp), b"\0" * 44),
        "offsets outside key bytes": (
            {"states": {"dtype": "F32", "shape": [2, S], "data_offsets": [0, 72]},
             "key_bytes": {"dtype": "U8", "shape": [4], "data_offsets": [72, 76]},
             "key_offsets": {"dtype": "I64", "shape": [3], "data_offsets": [76, 100]}},
            _state_meta(fp, key_kind="str", count="2"),
            b"\0" * 72 + b"abcd" + np.array([0, 100, -5], np.int64).tobytes()),
        "integer states": ({"states": {"dtype": "I64", "shape": [1, S], "data_offsets": [0, 72]},
                            "keys": {"dtype": "I64", "shape": [1], "data_offsets": [72, 80]}},
                           _state_meta(fp), b"\0" * 80),
    }
    for name, (tensors, meta, data) in cases.items():
        p = _craft(tmp_path / f"{name}.sgru", tensors, meta, data)
        with pytest.raises(FormatError, match=str(p)):
            eng.load_state(p)
        assert len(eng) == 0, name


def test_deeply_nested_json_header_is_refused(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    for name in ("deep.sgru", "deep.safetensors"):
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(deep)) + deep)
        with pytest.raises(FormatError):
            streamgru.load(p)
    with pytest.raises(FormatError, match="expected a JSON header"):
        Engine(_small_model()).load_state(tmp_path / "deep.sgru")


def test_crafted_model_config_is_refused(tmp_path):
    m = _small_model()
    meta = {"format": "streamgru-model", "format_version": "1", "fingerprint": m.fingerprint,
            "source": ""}
    for config in ([1, 2], {"layers": "gru"}, {"layers": [{"kind": "gru", "input_size": 3,
                                                           "hidden_size": 2**40}]},
                   "[" * 100_000):
        raw = F._encode(m.named_tensors(), {**meta, "config": config if isinstance(config, str)
                                            else json.dumps(config)})
        p = tmp_path / "c.sgru"
        p.write_bytes(raw)
        with pytest.raises(FormatError, match="expected a valid streamgru model description"):
            streamgru.load(p)


@pytest.mark.parametrize("header, pattern", [
    ({"weight_ih_l0": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}},
     "overflow"),
    ({"weight_ih_l0": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}},
     "invalid shape"),
    (None, "header too large"),
])
def test_crafted_safetensors_state_dict_is_refused_before_allocating(tmp_path, header, pattern):
    p = tmp_path / "sd.safetensors"
    if header is None:
        p.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    else:
        h = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 16)
    with pytest.raises(FormatError, match=f"path: expected a valid safetensors file.*{pattern}"):
        streamgru.load(p)


def test_leftover_temp_files_do_not_matter(tmp_path):
    """A writer killed mid-save leaves a .<name>.*.tmp file; it is never read, and the next save
    still replaces the snapshot atomically."""
    eng, p = _state_file(tmp_path, "int")
    (tmp_path / f".{p.name}.abc123.tmp").write_bytes(b"partial")
    eng.step([7], np.ones((1, 3)))
    eng.save_state(p)
    fresh = Engine(_small_model())
    fresh.load_state(p)
    assert sorted(fresh.keys()) == sorted(eng.keys())
