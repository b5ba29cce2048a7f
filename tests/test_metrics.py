"""Engine.stats() counters and their Prometheus exposition (streamgru.metrics).

Expected counts come from what each test did (calls made, rows sent, keys named), never from the
engine's own arithmetic.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from streamgru import Engine, GRUModel
from streamgru.engine import STEP_TIMING_EVERY
from streamgru.errors import NonFiniteError


def model():
    return GRUModel.random(3, [5, 4], dense_after=[(2, "tanh")], seed=3)


def ones(n):
    return np.ones((n, 3), np.float32)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_the_engine_keeps_the_fast_attribute_layout():
    # CPython 3.11 stores up to 29 instance attributes inline (shared keys); from the 30th on,
    # every attribute read of the one-event step path gets slower. The counters therefore live
    # in one attribute; a new attribute must replace an old one or move into a holder.
    assert len(vars(Engine(model()))) <= 29


def test_every_verb_is_counted_once_per_call(tmp_path):
    eng = Engine(model(), idle_timeout=60, missing="last")
    eng.step(["a"], ones(1))
    eng.step(["a"], ones(1))  # the one-event fast path (open key)
    eng.step(["a", "b"], ones(2))
    eng.run("c", ones(4))
    eng.open("d")
    eng.reset("d")
    eng.state("d")
    eng.set_state("e", np.zeros(9))
    eng.close("e")
    eng.set_last_observed("d", ones(1)[0])
    eng.last_observed("d")
    eng.save_state(tmp_path / "s.sgst")
    eng.load_state(tmp_path / "s.sgst")
    eng.evict_idle()
    assert eng.stats()["calls"] == {"step": 3, "run": 1, "open": 1, "reset": 1, "close": 1,
                                    "state": 1, "set_state": 1, "last_observed": 1,
                                    "set_last_observed": 1, "save_state": 1, "load_state": 1,
                                    "evict_idle": 1}


def test_rows_and_rows_per_call_histograms():
    eng = Engine(model())
    eng.step(["a"], ones(1))  # general path (opens a)
    for _ in range(5):
        eng.step(["a"], ones(1))  # fast path
    eng.step(np.array(["a"]), ones(1))  # fast path, array key
    eng.step(["a", "b", "a"], ones(3))  # duplicates: 3 rows
    eng.step([], np.zeros((0, 3)))  # zero rows
    eng.step([f"k{i}" for i in range(100)], ones(100))
    ik = Engine(model())
    ik.step(np.arange(70), ones(70))  # the int-table path
    ik.step(np.arange(70), ones(70))
    eng.run("r", ones(20))
    eng.run("r", ones(0))
    s = eng.stats()
    assert s["rows"] == {"step": 1 + 5 + 1 + 3 + 0 + 100, "run": 20}
    # bounds 1, 4, 16, 64, 256, ...: rows 0 and 1 -> "<= 1"; 3 -> "<= 4"; 100 -> "<= 256"
    assert s["rows_per_call"]["step"]["counts"][:6] == [8, 1, 0, 0, 1, 0]
    assert sum(s["rows_per_call"]["step"]["counts"]) == 10 == s["calls"]["step"]
    assert s["rows_per_call"]["step"]["sum"] == 110
    assert s["rows_per_call"]["run"]["counts"][:5] == [1, 0, 0, 1, 0]  # 0 and 20 steps
    si = ik.stats()
    assert si["rows"]["step"] == 140 and si["rows_per_call"]["step"]["counts"][4] == 2
    assert si["streams"]["opened"] == 70 and si["streams"]["open"] == 70


def test_step_calls_are_timed_in_a_sample_and_run_every_call():
    assert STEP_TIMING_EVERY == 32  # the documented sample (docs/operations.md)
    eng = Engine(model())
    for i in range(64):
        eng.step([i % 2], ones(1))
    eng.run(5, ones(3))
    eng.run(5, ones(3))
    s = eng.stats()["call_seconds"]
    assert s["step"]["sampled_every"] == 32 and sum(s["step"]["counts"]) == 2
    assert sum(s["run"]["counts"]) == 2 and s["run"]["sampled_every"] == 1
    assert s["step"]["sum"] > 0 and s["run"]["sum"] > 0
    assert len(s["step"]["counts"]) == len(s["step"]["bounds"]) + 1


def test_step_calls_are_counted_across_timing_samples_whatever_path_they_take():
    # The step count lives partly in the timing countdown: check it after every call over
    # three samples, with the one-event path, the general path and refused calls (one of them
    # the sampled 64th call, which raised, so it is counted but not timed).
    eng = Engine(model())
    bad = ones(1)
    bad[0, 0] = np.inf
    made = rows = 0
    for i in range(1, 3 * STEP_TIMING_EVERY + 5):
        if i % 7 == 0 or i == 2 * STEP_TIMING_EVERY:
            with pytest.raises(NonFiniteError):
                eng.step(["a"], bad)
        elif i % 5 == 0:
            eng.step(["a", "b"], ones(2))  # general path
            rows += 2
        else:
            eng.step(["a"], ones(1))  # fast path once "a" is open
            rows += 1
        made += 1
        s = eng.stats()
        assert s["calls"]["step"] == made
        assert s["rows"]["step"] == rows == s["rows_per_call"]["step"]["sum"]
        timed = i // STEP_TIMING_EVERY - (i >= 2 * STEP_TIMING_EVERY)
        assert sum(s["call_seconds"]["step"]["counts"]) == timed
    assert made == 100 and s["rows_refused"]["step"] == 15


def test_the_one_event_path_alternates_the_weights_direction_across_timing_samples():
    # The one-event kernel's direction argument is the step countdown's parity: it must still
    # alternate on every call, across the countdown's restarts too.
    eng = Engine(model(), threads=1)
    eng.step(["a"], ones(1))  # opens "a" (general path)
    kernel, seen = eng._run1, []

    def recording(*args):
        seen.append(args[-1])
        return kernel(*args)

    eng._run1 = recording
    for _ in range(2 * STEP_TIMING_EVERY + 3):
        eng.step(["a"], ones(1))
    assert len(seen) == 2 * STEP_TIMING_EVERY + 3 and set(seen) == {0, 1}
    assert all(a != b for a, b in zip(seen, seen[1:]))


def test_refused_rows_are_counted_and_not_stepped():
    eng = Engine(model())
    eng.step(["a", "b"], ones(2))
    bad = ones(1)
    bad[0, 1] = np.nan
    with pytest.raises(NonFiniteError):
        eng.step(["a"], bad)  # fast path: the kernel refuses it
    with pytest.raises(NonFiniteError):
        eng.step(["a", "b", "c"], np.vstack([ones(2), bad]))
    with pytest.raises(NonFiniteError):
        eng.run("a", np.vstack([ones(2), bad]))
    eng.step(["a"], ones(1))
    s = eng.stats()
    assert s["rows_refused"] == {"step": 4, "run": 3}
    assert s["rows"] == {"step": 3, "run": 0}
    assert s["calls"]["step"] == 4 and s["calls"]["run"] == 1
    assert sum(s["rows_per_call"]["step"]["counts"]) == 2
    assert s["streams"]["open"] == 2 and s["streams"]["opened"] == 2


def test_stream_counts_for_every_way_a_stream_comes_and_goes(tmp_path):
    clock = Clock()
    eng = Engine(model(), max_streams=3, idle_timeout=10, clock=clock)
    eng.step(["a", "b", "c"], ones(3))
    eng.step(["d"], ones(1))  # capacity: a goes
    eng.open("e")  # capacity: b goes
    clock.t += 20
    eng.step(["f"], ones(1))  # idle: c, d, e go
    eng.set_state("g", np.zeros(9))
    eng.close("f")
    s = eng.stats()["streams"]
    assert s == {"open": 1, "opened": 7, "closed": 1, "evicted": {"idle": 3, "capacity": 2}}
    eng.save_state(tmp_path / "one.sgst")
    eng.run("h", ones(2))
    eng.load_state(tmp_path / "one.sgst")  # g and h replaced by g
    s = eng.stats()["streams"]
    assert s == {"open": 1, "opened": 9, "closed": 3, "evicted": {"idle": 3, "capacity": 2}}
    assert s["open"] == s["opened"] - s["closed"] - sum(s["evicted"].values())


def test_snapshots_written_bytes_and_seconds(tmp_path):
    eng = Engine(model())
    eng.step(["a", "b"], ones(2))
    eng.save_state(tmp_path / "1.sgst")
    eng.step(["c"], ones(1))
    eng.save_state(tmp_path / "2.sgst", metadata={"note": "x"})
    s = eng.stats()["snapshots"]
    assert s["written"] == 2
    assert s["bytes"] == os.path.getsize(tmp_path / "1.sgst") + os.path.getsize(tmp_path / "2.sgst")
    assert s["seconds"] > 0


def test_counts_are_exact_with_several_threads_stepping():
    eng = Engine(model())
    threads, per_thread = 4, 300

    def work(t):
        for i in range(per_thread):
            if i % 3:
                eng.step([t], ones(1))
            else:
                eng.step([t, 100 + t, t], ones(3))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    s = eng.stats()
    batches = len(range(0, per_thread, 3))
    assert s["calls"]["step"] == threads * per_thread
    assert s["rows"]["step"] == threads * ((per_thread - batches) + 3 * batches)
    assert s["streams"]["open"] == s["streams"]["opened"] == 2 * threads
    assert sum(s["call_seconds"]["step"]["counts"]) == threads * per_thread // 32


# ------------------------------------------------------------------------------------------------
# Prometheus exposition

def _scrape(url):
    """``{(name, frozenset(labels.items())): value}`` of one scrape, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_serve_exposes_the_engine_counts_over_http():
    pytest.importorskip("prometheus_client")
    from streamgru.metrics import serve

    eng = Engine(model(), max_streams=2)
    eng.step(["a", "b", "a"], ones(3))
    eng.step(["c"], ones(1))  # evicts b (capacity)
    with serve(eng, 0) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics" and server.port > 0
        got = _scrape(server.url)
    step = frozenset({("verb", "step")})
    assert got[("streamgru_calls_total", step)] == 2
    assert got[("streamgru_rows_total", step)] == 4
    assert got[("streamgru_rows_per_call_count", step)] == 2
    assert got[("streamgru_rows_per_call_bucket", step | {("le", "4.0")})] == 2
    assert got[("streamgru_rows_per_call_bucket", step | {("le", "1.0")})] == 1
    assert got[("streamgru_open_streams", frozenset())] == 2
    assert got[("streamgru_streams_evicted_total", frozenset({("reason", "capacity")}))] == 1
    assert got[("streamgru_streams_opened_total", frozenset())] == 3


def test_collector_plugs_into_an_existing_registry():
    prom = pytest.importorskip("prometheus_client")
    from streamgru.metrics import collector

    eng = Engine(model())
    registry = prom.CollectorRegistry()
    registry.register(collector(eng))
    eng.run("a", ones(5))
    assert registry.get_sample_value("streamgru_rows_total", {"verb": "run"}) == 5
    assert registry.get_sample_value("streamgru_call_duration_seconds_count", {"verb": "run"}) == 1


def test_missing_values_are_counted_by_policy():
    prom = pytest.importorskip("prometheus_client")
    from streamgru.metrics import collector

    eng = Engine(model(), missing="skip")
    registry = prom.CollectorRegistry()
    registry.register(collector(eng))
    x = ones(3)
    x[0, 0] = x[2, :] = np.nan
    eng.step(["a", "b", "a"], x)
    eng.run("a", x)
    skip = {"policy": "skip"}
    assert registry.get_sample_value("streamgru_missing_values_total", skip) == 2 * (1 + x.shape[1])
    assert registry.get_sample_value("streamgru_missing_rows_total", skip) == 4
    assert registry.get_sample_value("streamgru_rows_total", {"verb": "step"}) == 3


def test_serve_and_collector_refuse_bad_arguments():
    pytest.importorskip("prometheus_client")
    from streamgru.metrics import collector, serve

    eng = Engine(model())
    with pytest.raises(TypeError, match="engine: expected a streamgru.Engine"):
        collector(object())
    with pytest.raises(TypeError, match="engine: expected a streamgru.Engine"):
        serve("engine", 0)
    with pytest.raises(TypeError, match="port: expected an int from 0 to 65535, got str"):
        serve(eng, "9464")
    with pytest.raises(TypeError, match="port: expected an int from 0 to 65535, got bool"):
        serve(eng, True)
    with pytest.raises(ValueError, match="port: expected an int from 0 to 65535, got 70000"):
        serve(eng, 70000)
    with pytest.raises(TypeError, match="host: expected"):
        serve(eng, 0, host=None)
    with serve(eng, 0) as first:  # a port in use: an OSError naming the port
        with pytest.raises(OSError, match=f"port: expected a port free to bind on 127.0.0.1, got "
                                          f"{first.port}"):
            serve(eng, first.port)


# ------------------------------------------------------------------------------------------------
# streamgru run --metrics-port, a real process fed through a pipe

def test_run_serves_metrics_while_it_runs_and_exits_cleanly(tmp_path):
    pytest.importorskip("prometheus_client")
    path = tmp_path / "m.sgru"
    model().save(path)
    state = tmp_path / "state.sgst"
    p = subprocess.Popen([sys.executable, "-m", "streamgru.cli", "run", str(path), "--state",
                          str(state), "--metrics-port", "0", "--max-wait-ms", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    try:
        announce = p.stderr.readline()  # the restore line, then the endpoint
        while "metrics on " not in announce:
            assert announce, "the process ended before serving metrics"
            announce = p.stderr.readline()
        url = announce.split("metrics on ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        keys = ["a", "b", "c", "a", "d", "a", "b"]
        now = time.time()
        lines = [json.dumps({"key": k, "x": [0.1, 0.2, 0.3], "t": now - 2.0}) for k in keys]
        lines.insert(2, "not json")
        lines.insert(5, '{"key": "e", "x": [1]}')
        lines.insert(6, "")
        p.stdin.write("".join(line + "\n" for line in lines))
        p.stdin.flush()
        outputs = [p.stdout.readline() for _ in keys]  # every event processed
        assert all(o.startswith('{"key"') for o in outputs)
        deadline = time.monotonic() + 30
        while True:  # the run loop publishes its line counts after each batch
            got = _scrape(url)
            if got.get(("streamgru_run_lines_total", frozenset({("result", "blank")}))) == 1 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        res = {r: got.get(("streamgru_run_lines_total", frozenset({("result", r)})))
               for r in ("ok", "malformed", "refused", "blank")}
        assert res == {"ok": len(keys), "malformed": 2, "refused": 0, "blank": 1}
        assert got[("streamgru_rows_total", frozenset({("verb", "step")}))] == len(keys)
        assert got[("streamgru_open_streams", frozenset())] == len(set(keys))
        assert got[("streamgru_streams_opened_total", frozenset())] == len(set(keys))
        assert 2.0 <= got[("streamgru_run_input_lag_seconds", frozenset())] < 60
        assert 0 <= got[("streamgru_run_checkpoint_age_seconds", frozenset())] < 60
        p.stdin.close()
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            f.close()
    with pytest.raises(urllib.error.URLError):  # the endpoint is gone with the process
        urllib.request.urlopen(url, timeout=5)


def test_run_refuses_a_bad_metrics_port_before_any_event(tmp_path):
    path = tmp_path / "m.sgru"
    model().save(path)
    r = subprocess.run([sys.executable, "-m", "streamgru.cli", "run", str(path), "--metrics-port",
                        "70000"], input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--metrics-port: expected a port from 0 to 65535, got 70000" \
        in r.stderr
