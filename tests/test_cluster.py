"""streamgru.cluster: placement (no Ray needed) and ShardedEngine on a local, loopback-only Ray.

Ray starts once for the module (``start_local_ray(num_cpus=2)``) and stops at the end; the Ray
tests skip with a message when the ``ray`` extra is not installed. References: a single ``Engine``
fed the same events (the issue's contract) and the float64 oracle.
"""

import asyncio
import hashlib
import json
import os
import signal
import threading

import numpy as np
import oracle
import pytest
from helpers import OracleStreams, mixed_lstm_model

from streamgru import Engine, GRUModel
from streamgru.cluster import shard_of
from streamgru.errors import FormatError
from streamgru.formats import model_from_bytes, model_to_bytes
from streamgru.metrics import engine_families

M64 = (1 << 64) - 1
# Engine vs sharded Engine: the same kernels, but a batch split over shards may round differently
# (a few float32 ulps); the float64 oracle bounds both at 1e-5.
ATOL = 1e-6


# ----------------------------------------------------------------------------------------------
# placement: the documented formula, re-implemented here in plain Python integers


def _mix(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _spec_shard(key, n):
    if isinstance(key, str):
        d = int.from_bytes(hashlib.blake2b(b"s" + key.encode("utf-8"), digest_size=8).digest(), "little")
    else:
        d = _mix((key & M64) ^ 0x5354524541474955)
    scores = [_mix(d ^ _mix((s + 0x9E3779B97F4A7C15) & M64)) for s in range(n)]
    return scores.index(max(scores))


def test_placement_follows_the_documented_formula():
    rng = np.random.default_rng(0)
    ints = [0, 1, -1, 2**63 - 1, -(2**63)] + rng.integers(-(2**62), 2**62, 300).tolist()
    strs = ["", "a", "sensor-17", "ü-é", "x" * 100] + [f"k{i}" for i in range(300)]
    for n in (1, 2, 3, 7):
        assert shard_of(ints, n).tolist() == [_spec_shard(k, n) for k in ints]
        assert shard_of(np.array(ints, np.int64), n).tolist() == [_spec_shard(k, n) for k in ints]
        assert shard_of(strs, n).tolist() == [_spec_shard(k, n) for k in strs]
        assert shard_of(np.array(strs), n).tolist() == [_spec_shard(k, n) for k in strs]
    assert shard_of(42, 7) == _spec_shard(42, 7) and shard_of("sensor-17", 7) == _spec_shard("sensor-17", 7)
    assert shard_of(np.int32(5), 3) == shard_of(5, 3)
    # pinned: a change here moves every deployed stream
    assert shard_of([0, 1, 2, 3, 42, -7, 2**62], 7).tolist() == [6, 1, 1, 6, 1, 1, 0]
    assert shard_of(["a", "sensor-17", "", "ü"], 7).tolist() == [2, 6, 1, 6]


def test_resizing_moves_only_the_keys_whose_shard_changes():
    keys = np.arange(40_000, dtype=np.int64) * 7919 - 123_456
    strs = [f"user-{i}" for i in range(10_000)]
    for ks in (keys, strs):
        m = len(ks)
        for n in (1, 2, 3, 7):
            a, b = shard_of(ks, n), shard_of(ks, n + 1)
            moved = a != b
            assert (b[moved] == n).all()  # growing: keys only move to the new shard
            assert abs(moved.mean() - 1 / (n + 1)) < 0.02, (n, moved.mean())
            counts = np.bincount(b, minlength=n + 1)
            assert counts.min() > 0.9 * m / (n + 1) and counts.max() < 1.1 * m / (n + 1)
            # shrinking back moves exactly the removed shard's keys
            assert (shard_of(ks, n)[b != n] == b[b != n]).all()


def test_shard_of_refuses_bad_input():
    with pytest.raises(ValueError, match="shards: expected a positive int, got 0"):
        shard_of([1], 0)
    with pytest.raises(ValueError, match="shards: expected a positive int"):
        shard_of([1], True)
    with pytest.raises(TypeError, match=r"keys\[1\]: expected an int or str stream key, got float"):
        shard_of([1, 1.5], 2)
    with pytest.raises(TypeError, match=r"keys\[0\]: expected an int or str stream key, got bool"):
        shard_of([True], 2)
    with pytest.raises(TypeError, match=r"keys: expected all keys to be ints \(an engine holds one kind of "
                       r"key\), got str 'a'"):
        shard_of([1, "a"], 2)
    with pytest.raises(TypeError, match="keys: expected integer or str keys, got an array of dtype float64"):
        shard_of(np.zeros(3), 2)


def test_model_bytes_round_trip_is_bit_exact():
    m = GRUModel.random(3, [5, 4], dense_after=[(2, "softmax")], seed=3)
    buf = model_to_bytes(m)
    assert isinstance(buf, bytes)
    m2 = model_from_bytes(buf)
    assert m2.fingerprint == m.fingerprint and m2.config() == m.config()
    for a, b in zip(m.named_tensors().values(), m2.named_tensors().values()):
        np.testing.assert_array_equal(a, b)
    assert model_from_bytes(memoryview(buf)).fingerprint == m.fingerprint
    with pytest.raises(FormatError, match="checksum"):
        model_from_bytes(buf[:-1] + bytes([buf[-1] ^ 1]))
    with pytest.raises(TypeError, match="buf: expected bytes, got str"):
        model_from_bytes("m.sgru")
    with pytest.raises(TypeError, match="model: expected a GRUModel, got int"):
        model_to_bytes(3)


def test_sharded_engine_refuses_a_bad_weights_form_before_starting_ray(monkeypatch):
    """Refused in the driver, naming the argument, not inside an actor; Ray is never asked for."""
    from streamgru.cluster import sharded

    def no_ray():
        raise AssertionError("Ray was reached before the arguments were checked")

    monkeypatch.setattr(sharded, "_ray", no_ray)
    model = GRUModel.random(3, 4)
    with pytest.raises(ValueError, match=r"weights: expected one of 'float32', 'float16', "
                                         r"'int8', got 'int4'"):
        sharded.ShardedEngine(model, shards=2, weights="int4")
    with pytest.raises(ValueError, match=r'weights: expected "float64" \(or None\) for a '
                                         r"float64 engine, got 'int8'"):
        sharded.ShardedEngine(model, shards=2, dtype="float64", weights="int8")


# ----------------------------------------------------------------------------------------------
# ShardedEngine on a local Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'streamgru[ray]'")
    from streamgru.cluster import start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


# shards on 2 CPUs: ask Ray for no CPU so 3 shards + restarts fit
PACK = {"num_cpus": 0}


def _sharded(model, shards, **kw):
    from streamgru.cluster import ShardedEngine

    return ShardedEngine(model, shards=shards, actor_options=PACK, **kw)


def _events(seed, n_batches, n_keys, rows, input_size, strs=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        k = rng.integers(0, n_keys, rows)
        keys = [f"s{v}" for v in k] if strs else k
        out.append((keys, rng.normal(size=(rows, input_size)).astype(np.float32)))
    return out


def _assert_same_streams(sharded, local):
    keys = sharded.keys()
    assert len(keys) == len(set(keys)) == len(sharded)
    assert sorted(keys) == sorted(local.keys())
    for s in range(sharded.shards):  # every stream lives on the shard its key hashes to
        ks = sharded.keys(shard=s)
        assert (shard_of(ks, sharded.shards) == s).all() if ks else True
    for k in keys:
        np.testing.assert_allclose(sharded.state(k), local.state(k), rtol=0, atol=ATOL)


@pytest.mark.slow  # starts Ray actors
def test_sharded_engine_matches_one_engine_and_the_oracle(ray_local):
    model = GRUModel.random(3, [8, 6], dense_after=[(2, "softmax")], seed=1)
    local = Engine(model, threads=1)
    ref = OracleStreams(model)
    with _sharded(model, 2) as eng:
        assert eng.shards == 2 and len(set(eng.pids())) == 2
        for keys, x in _events(0, 12, 30, 16, 3):  # duplicates in most batches
            y = eng.step(keys, x)
            np.testing.assert_allclose(y, local.step(keys, x), rtol=0, atol=ATOL)
            # oracle: one event at a time, in order
            np.testing.assert_allclose(y, ref.step(keys.tolist(), x), atol=1e-5)
        assert {s["streams"] for s in eng.stats()} != {0}  # both shards hold streams
        # one metrics endpoint for the cluster: each shard's engine counts, labelled by shard
        fams = {f.name: f for f in engine_families(eng)}
        rows = {s.labels["shard"]: s.value for s in fams["streamgru_rows"].samples
                if s.labels["verb"] == "step"}
        sent = sum(len(keys) for keys, _ in _events(0, 12, 30, 16, 3))
        assert set(rows) == {"0", "1"} and sum(rows.values()) == sent
        _assert_same_streams(eng, local)
        for k, st in ref.states.items():
            np.testing.assert_allclose(eng.state(k), st, atol=1e-5)

        # async: several batches in flight keep per-key order
        batches = _events(1, 4, 10, 8, 3)
        futs = [eng.step_async(k, x) for k, x in batches]
        for f, (k, x) in zip(futs, batches):
            np.testing.assert_allclose(f.result(), local.step(k, x), rtol=0, atol=ATOL)

        async def pipeline():
            return [await eng.step_async(k, x) for k, x in _events(2, 3, 10, 8, 3)]

        for y, (k, x) in zip(asyncio.run(pipeline()), _events(2, 3, 10, 8, 3)):
            np.testing.assert_allclose(y, local.step(k, x), rtol=0, atol=ATOL)

        # the other verbs
        xs = np.random.default_rng(5).normal(size=(7, 3)).astype(np.float32)
        np.testing.assert_allclose(eng.run(3, xs), local.run(3, xs), rtol=0, atol=ATOL)
        st = np.linspace(-0.5, 0.5, 14)
        eng.open(1000, st), local.open(1000, st)
        eng.set_state(4, st), local.set_state(4, st)
        eng.reset(5), local.reset(5)
        eng.close(6), local.close(6)
        assert 1000 in eng and 6 not in eng and "x" not in eng
        _assert_same_streams(eng, local)

        # bad input changes nothing (checked before any shard is touched)
        before = {k: eng.state(k) for k in eng.keys()}
        x = np.ones((3, 3), np.float32)
        x[2, 1] = np.nan
        with pytest.raises(ValueError, match="x: expected finite values, got NaN/inf .*in the rows of key"):
            eng.step([1, 2, 777], x)
        with pytest.raises(ValueError, match=r"x: expected shape \(2, 3\) \(len\(keys\) = 2\), got \(3, 3\)"):
            eng.step([1, 2], np.ones((3, 3)))
        with pytest.raises(TypeError, match="keys: expected all keys to be ints"):
            eng.step(["a"], np.ones((1, 3)))
        with pytest.raises(TypeError, match="key: expected all keys to be ints"):  # as Engine
            eng.state("a")
        with pytest.raises(TypeError, match="x: expected a float32 or float64 array, got dtype int64"):
            eng.step([1], np.ones((1, 3), np.int64))
        with pytest.raises(KeyError, match="unknown key 999"):
            eng.state(999)
        with pytest.raises(KeyError, match="already open"):
            eng.open(1000)
        with pytest.raises(ValueError, match="state: expected 14 values"):
            eng.set_state(1, np.zeros(3))
        assert {k: eng.state(k) for k in eng.keys()}.keys() == before.keys()
        for k, v in before.items():
            np.testing.assert_array_equal(eng.state(k), v)
    with pytest.raises(RuntimeError, match="shut down"):
        eng.step([1], np.ones((1, 3)))


@pytest.mark.slow  # starts Ray actors
def test_sharded_engine_runs_lstm_layers_through_resize_and_snapshots(ray_local, tmp_path):
    """A model with an LSTM layer (projection, peepholes, clip) and a GRU: the shards step it as
    one Engine and the oracle do, resize moves whole states (h and C), and a snapshot restores
    with another shard count; with int8 weights, as one int8 Engine does."""
    model = mixed_lstm_model(np.float32)
    local = Engine(model, threads=1)
    ref = OracleStreams(model)
    with _sharded(model, 2) as eng:
        for i, (keys, x) in enumerate(_events(3, 8, 20, 12, model.input_size)):
            y = eng.step(keys, x)
            np.testing.assert_allclose(y, local.step(keys, x), rtol=0, atol=ATOL)
            np.testing.assert_allclose(y, ref.step(keys.tolist(), x), atol=1e-5)
            if i == 3:
                eng.resize(3)
        _assert_same_streams(eng, local)
        xs = np.random.default_rng(4).normal(size=(5, model.input_size)).astype(np.float32)
        np.testing.assert_allclose(eng.run(7, xs), local.run(7, xs), rtol=0, atol=ATOL)
        eng.save_state(tmp_path / "snap")
    with _sharded(model, 2) as other:
        other.load_state(tmp_path / "snap")
        _assert_same_streams(other, local)
    # Compact weights in every shard: the shards step as one int8 Engine does.
    small = Engine(model, threads=1, weights="int8")
    with _sharded(model, 2, weights="int8") as eng:
        assert eng.weights == "int8" and "weights='int8'" in repr(eng)
        for keys, x in _events(5, 4, 20, 12, model.input_size):
            np.testing.assert_allclose(eng.step(keys, x), small.step(keys, x), rtol=0, atol=ATOL)


@pytest.mark.slow  # starts Ray actors
def test_resize_under_load_loses_and_duplicates_nothing(ray_local):
    model = GRUModel.random(4, [8], seed=2)
    eng = _sharded(model, 2)
    done, stop, errors = [], threading.Event(), []
    progress = threading.Condition()
    rng = np.random.default_rng(7)

    def load():  # a steady stream of steps from another thread, recorded in order
        try:
            while not stop.is_set():
                k = rng.integers(0, 300, 32)
                x = rng.normal(size=(32, 4)).astype(np.float32)
                y = eng.step(k, x)
                with progress:
                    done.append((k, x, y))
                    progress.notify_all()
        except BaseException as exc:
            errors.append(exc)

    def wait_for_steps(n):
        with progress:
            target = len(done) + n
            assert progress.wait_for(lambda: len(done) >= target or errors, timeout=120)

    t = threading.Thread(target=load)
    t.start()
    moved = []
    try:
        for n in (3, 1, 2, 3):
            wait_for_steps(3)  # steps happen before and between the resizes
            moved.append(eng.resize(n))
            assert eng.shards == n
        wait_for_steps(3)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert all(m > 0 for m in moved)
    local = Engine(model, threads=1)
    for k, x, y in done:
        np.testing.assert_allclose(y, local.step(k, x), rtol=0, atol=ATOL)
    _assert_same_streams(eng, local)

    # without load: exactly the keys whose placement changes move
    keys = np.array(eng.keys(), np.int64)
    assert eng.resize(2) == int((shard_of(keys, 3) != shard_of(keys, 2)).sum())
    assert eng.resize(2) == 0
    _assert_same_streams(eng, local)
    with pytest.raises(ValueError, match="shards: expected a positive int, got 0"):
        eng.resize(0)
    eng.shutdown()


@pytest.mark.slow  # starts Ray actors
def test_save_and_restore_with_another_shard_count(ray_local, tmp_path):
    model = GRUModel.random(3, [6, 5], seed=4)
    local = Engine(model, threads=1)
    a = _sharded(model, 2)
    b = _sharded(model, 3)
    try:
        for keys, x in _events(3, 10, 40, 12, 3, strs=True):
            a.step(keys, x)
            local.step(keys, x)
        snap = tmp_path / "snap"
        m = a.save_state(snap)
        files = sorted(p.name for p in snap.iterdir())
        assert m["shards"] == 2 and m["count"] == len(local) and m["key_kind"] == "str"
        assert files == sorted(["manifest.json"] + [e["file"] for e in m["files"]])
        assert json.loads((snap / "manifest.json").read_text()) == m

        b.step(["other"], np.ones((1, 3), np.float32))  # replaced by the load
        b.load_state(snap)
        _assert_same_streams(b, local)  # re-placed over 3 shards

        a.step(["s1", "new"], np.ones((2, 3), np.float32))
        a.load_state(snap)  # same count: each shard reads its own file
        _assert_same_streams(a, local)

        m2 = a.save_state(snap)  # replaces the old files
        assert sorted(p.name for p in snap.iterdir()) == sorted(
            ["manifest.json"] + [e["file"] for e in m2["files"]])

        # refused snapshots change nothing
        other = _sharded(GRUModel.random(3, [6, 5], seed=5), 1)
        other.step(["z"], np.ones((1, 3), np.float32))
        other.save_state(tmp_path / "other")
        other.shutdown()
        with pytest.raises(FormatError, match="expected a snapshot of model"):
            b.load_state(tmp_path / "other")
        with pytest.raises(FileNotFoundError, match="directory: expected a snapshot with manifest.json"):
            b.load_state(tmp_path / "nothing")
        broken = tmp_path / "broken"
        broken.mkdir()
        for e in m2["files"]:
            (broken / e["file"]).write_bytes((snap / e["file"]).read_bytes())
        man = dict(m2, count=m2["count"] + 1)
        (broken / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(FormatError, match="streams \\(manifest\\)"):
            b.load_state(broken)
        _assert_same_streams(b, local)
    finally:
        a.shutdown()
        b.shutdown()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_dead(pid):
    for _ in range(1200):
        if not _alive(pid):
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"pid {pid} still alive after 60 s")


def _kill(pid):
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)


@pytest.mark.slow  # starts Ray actors
def test_a_killed_shard_restores_its_checkpoint_and_names_the_lost_keys(ray_local, tmp_path):
    from streamgru.cluster import ShardLostError

    model = GRUModel.random(3, [6], seed=6)
    local = Engine(model, threads=1)
    eng = _sharded(model, 2, checkpoint_dir=tmp_path / "ckpt", max_restarts=2)
    try:
        keys = np.arange(40)
        for _, x in _events(4, 3, 1, 40, 3):
            eng.step(keys, x)
            local.step(keys, x)
        assert eng.checkpoint()["count"] == 40
        at_checkpoint = {k: local.state(k) for k in range(40)}
        assert eng.checkpoint() is None  # nothing changed since

        # after the checkpoint: keys 0..9 step, key 500 opens, key 39 closes
        x = np.full((10, 3), 0.5, np.float32)
        eng.step(np.arange(10), x)
        eng.open(500)
        eng.close(39)
        owner = shard_of(list(range(40)) + [500], 2)
        victim = int(owner[0])
        # lost: what changed since the checkpoint, plus the rows of the failing call itself
        lost = sorted(k for k in list(range(20)) + [500, 39] if shard_of(k, 2) == victim)
        old_pid = eng.pids()[victim]
        _kill(old_pid)  # mid-stream: the process dies between two steps

        x2 = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
        with pytest.raises(ShardLostError, match=f"shard {victim}: {len(lost)} stream") as info:
            eng.step(np.arange(20), x2)
        err = info.value
        assert err.shards == [victim] and sorted(err.keys) == lost and not err.permanent
        assert err.restore_time[victim] is not None
        applied = shard_of(np.arange(20), 2) != victim
        np.testing.assert_array_equal(err.applied, applied)
        assert np.isnan(err.outputs[~applied]).all() and np.isfinite(err.outputs[applied]).all()
        assert eng.pids()[victim] != old_pid

        # the victim's streams are those of the checkpoint; the other shard kept everything
        for k in range(40):
            if owner[k] == victim:
                np.testing.assert_allclose(eng.state(k), at_checkpoint[k], rtol=0, atol=ATOL)
        assert (500 in eng) == (owner[40] != victim) and (39 in eng) == (owner[39] == victim)
        survivors = [k for k in range(20) if owner[k] != victim]
        local.step(np.arange(10), x)
        for k in survivors:
            want = local.step([k], x2[k:k + 1])
            np.testing.assert_allclose(err.outputs[k], want[0], rtol=0, atol=ATOL)
            np.testing.assert_allclose(eng.state(k), local.state(k), rtol=0, atol=ATOL)

        # the engine goes on; a second loss (ray.kill with restart) is found by check()
        eng.step([0, 1], np.ones((2, 3), np.float32))
        other = 1 - victim
        gone = eng.pids()[other]
        ray_local.kill(eng.actors()[other], no_restart=False)
        _wait_dead(gone)  # ray.kill is asynchronous
        with pytest.raises(ShardLostError) as info2:
            eng.check()
        assert info2.value.shards == [other]
        changed = [k for k in list(range(20)) + [39, 500] if shard_of(k, 2) == other]
        assert sorted(info2.value.keys) == sorted(changed)  # everything since the checkpoint
        assert len(eng.losses()) == 2
        eng.step([0, 1], np.ones((2, 3), np.float32))
    finally:
        eng.shutdown()


@pytest.mark.slow  # starts Ray actors
def test_without_checkpoints_a_lost_shard_names_all_its_keys(ray_local):
    from streamgru.cluster import ShardLostError

    model = GRUModel.random(2, [4], seed=8)
    eng = _sharded(model, 2, max_restarts=0)
    try:
        eng.step(np.arange(12), np.ones((12, 2), np.float32))
        victim = 1
        mine = sorted(eng.keys(shard=victim))
        _kill(eng.pids()[victim])
        with pytest.raises(ShardLostError, match="could not be restarted") as info:
            len(eng)
        assert info.value.permanent and sorted(info.value.keys) == mine
    finally:
        eng.shutdown()


@pytest.mark.slow  # starts Ray actors
def test_background_checkpoints(ray_local, tmp_path):
    from streamgru.cluster import ShardedEngine

    model = GRUModel.random(2, [4], seed=9)
    with pytest.raises(ValueError, match="checkpoint_every: expected checkpoint_dir to be set"):
        ShardedEngine(model, shards=1, checkpoint_every=1.0)
    eng = _sharded(model, 1, checkpoint_dir=tmp_path, checkpoint_every=0.2)
    try:
        eng.step(np.arange(5), np.ones((5, 2), np.float32))
        manifest = tmp_path / "manifest.json"
        for _ in range(600):
            if manifest.exists() and json.loads(manifest.read_text())["count"] == 5:
                break
            threading.Event().wait(0.05)
        assert json.loads(manifest.read_text())["count"] == 5
    finally:
        eng.shutdown()


@pytest.mark.slow  # starts Ray actors
def test_benchmark_smoke(ray_local):
    from streamgru.harness.cluster_bench import run_cluster_benchmark

    lines = []
    r = run_cluster_benchmark(keys=500, batch=32, batches=3, warmup=1, hidden=8, input_size=3,
                              fill=True, actor_options=PACK, out=lines.append)
    assert set(r["sharded"]) == {1, 2} and set(r["local"]) == {"1t", "2t"}
    for s in r["sharded"].values():
        assert s["sync"]["events_per_s"] > 0 and s["streams"] == 500 and s["checkpoint_bytes"] > 0
        t = s["sync"]["per_batch_ms"]  # measured around step_async / result(), per batch
        assert t["driver"] > 0 and t["wait"] > 0 and t["engine_sum"] > 0
    assert 0 < r["derived"]["scaling_efficiency_pipelined"] and "events/s" in lines[0]


@pytest.mark.slow  # starts Ray actors
def test_a_step_refused_by_one_shard_says_which_rows_other_shards_applied(ray_local):
    # One GRU whose candidate overflows when input column 0 is large (as in test_faults): the
    # shard holding the poisoned key refuses its rows and changes nothing; the other shard's rows
    # were applied, and the error says exactly which.
    from streamgru.errors import NonFiniteError
    from streamgru.model import GRULayer

    base = GRUModel.random(3, 8, seed=3, dtype=np.float64)
    gru = base.layers[0]
    W = gru.W.copy()
    W[16:, 0] = 1e20
    model = GRUModel([GRULayer(3, 8, W, gru.R, gru.Wb, gru.Rb, linear_before_reset=1, g="identity")])
    eng = _sharded(model, 2)
    local = Engine(model, threads=1)
    try:
        keys = list(range(40))
        owners = shard_of(keys, 2)
        assert set(owners.tolist()) == {0, 1}
        x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
        x[:, 0] = 0.0
        eng.step(keys, x)
        local.step(keys, x)
        poison = keys[int(np.flatnonzero(owners == 0)[0])]
        x2 = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
        x2[:, 0] = 0.0
        x2[poison, 0] = 1e19
        with pytest.raises(NonFiniteError, match="applied") as info:
            eng.step(keys, x2)
        err = info.value
        assert err.keys == [poison]
        np.testing.assert_array_equal(err.applied, owners == 1)
        ok = owners == 1
        ref = local.step([k for k, a in zip(keys, ok) if a], x2[ok])
        np.testing.assert_allclose(err.outputs[ok], ref, rtol=0, atol=ATOL)
        assert np.isnan(err.outputs[~ok]).all()
        for k in keys:  # shard 0 changed nothing; shard 1 advanced exactly like the local engine
            np.testing.assert_allclose(eng.state(k), local.state(k), rtol=0, atol=ATOL)
    finally:
        eng.shutdown()


def test_missing_values_across_shards_resize_and_snapshots(ray_local, tmp_path):
    # missing="last" on 2 shards against the float64 oracle of the policy: the memory is applied
    # per stream on its shard, moves with the stream on resize, and survives a snapshot loaded
    # with another shard count; inf is still refused in the driver, naming only its key.
    from streamgru.errors import NonFiniteError

    model = GRUModel.random(3, [6, 5], dense_after=[(2, "tanh")], seed=4)
    ref = oracle.MissingStreams(model, "last")
    a = _sharded(model, 2, missing="last")
    b = _sharded(model, 3, missing="last")
    try:
        for i, (keys, x) in enumerate(_events(5, 6, 12, 10, 3, strs=True)):
            x[i % 10, i % 3] = x[(i + 3) % 10] = np.nan
            np.testing.assert_allclose(a.step(keys, x), ref.feed_rows(keys, x), atol=2e-5)
        xs = np.ones((4, 3), np.float32)
        xs[1:3, 0] = np.nan
        np.testing.assert_allclose(a.run("s1", xs), ref.feed_rows(["s1"] * 4, xs), atol=2e-5)
        x = np.ones((2, 3), np.float32)
        x[0, 1], x[1, 2] = np.nan, np.inf
        with pytest.raises(NonFiniteError, match="'s2'") as info:
            a.step(["s1", "s2"], x)
        assert info.value.keys == ["s2"]

        def check(eng):
            for k in eng.keys():
                np.testing.assert_allclose(eng.state(k), ref.state(k), atol=2e-5)
                np.testing.assert_allclose(eng.last_observed(k), ref.memory(k), atol=2e-5)

        check(a)
        missing = [s["engine"]["missing"] for s in a.stats()]
        assert {m["policy"] for m in missing} == {"last"}
        assert sum(m["values"] for m in missing) == 6 * 4 + 2  # the refused call counts nothing
        assert a.resize(3) > 0  # the moved streams take their memory along
        check(a)
        a.save_state(tmp_path / "snap")
        b.load_state(tmp_path / "snap")  # same count: each shard reads its own file
        check(b)
        a.resize(2)
        a.load_state(tmp_path / "snap")  # another count: keys re-placed with their memory
        check(a)
        with pytest.raises(ValueError, match="missing: expected one of"):
            _sharded(model, 1, missing="fill")
    finally:
        a.shutdown()
        b.shutdown()


def test_a_manifest_too_large_to_be_one_is_refused_unread(tmp_path):
    """A snapshot directory whose manifest.json is far larger than any manifest (a corrupted or
    foreign file) is refused naming the file and its size, before it is read into memory."""
    from streamgru.cluster import sharded

    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate(sharded.MANIFEST_MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(FormatError, match=r"manifest.json: expected a manifest of at most \d+ "
                                          r"bytes, got \d+"):
        sharded._read_manifest(tmp_path)
