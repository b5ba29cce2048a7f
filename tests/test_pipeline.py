"""`streamgru run`, end to end through a real subprocess with pipes; references from the oracle."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import OracleStreams

from streamgru.formats import load_state
from streamgru.pipeline import parse_line

CMD = [sys.executable, "-m", "streamgru.cli", "run"]



def make_events(n, keys=("a", "b", "c", "d", "e"), seed=0):
    rng = np.random.default_rng(seed)
    return [(keys[int(rng.integers(len(keys)))], rng.normal(size=3).tolist()) for _ in range(n)]


def jsonl(events):
    return "".join(json.dumps({"key": k, "x": x}) + "\n" for k, x in events)


def oracle_outputs(model, events):
    """Float64 reference: every event stepped in input order, each key from a zero state."""
    return OracleStreams(model).step([k for k, _ in events], [x for _, x in events])


def parse_outputs(text):
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["key"] for r in rows], np.array([r["y"] for r in rows])


def checkpoint_meta(model, state):
    """The checkpoint record of a ``--state`` file, read with its states from the same bytes."""
    return load_state(state, model.fingerprint, model.state_size, with_metadata=True)[2]


def run(args, stdin, timeout=120):
    return subprocess.run(CMD + [str(a) for a in args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_outputs_equal_the_oracle_in_input_order(model_file):
    model, path = model_file
    events = make_events(200)  # batches of 7 hold the same key several times
    r = run([path, "--max-batch", 7], jsonl(events))
    assert r.returncode == 0, r.stderr
    keys, ys = parse_outputs(r.stdout)
    assert keys == [k for k, _ in events]
    np.testing.assert_allclose(ys, oracle_outputs(model, events), atol=1e-5, rtol=0)


def test_csv_input_float64_and_an_input_file(model_file, tmp_path):
    model, path = model_file
    events = make_events(50, seed=1)
    src = tmp_path / "events.csv"
    src.write_text("key,x1,x2,x3\n" + "".join(f"{k},{x[0]!r},{x[1]!r},{x[2]!r}\n"
                                              for k, x in events))
    r = run([path, "--format", "csv", "--input", src, "--dtype", "float64"], "")
    assert r.returncode == 0, r.stderr
    keys, ys = parse_outputs(r.stdout)
    assert keys == [k for k, _ in events]
    np.testing.assert_allclose(ys, oracle_outputs(model, events), atol=1e-9, rtol=0)


BAD = [
    ('{"key": "a", "x": [1, 2', "invalid JSON"),
    ('{"key": "a", "x": [1, 2]}', "expected 3 numbers"),
    ('{"key": "a", "x": [1, "two", 3]}', 'expected numbers, got "two"'),
    ('{"key": "a", "x": [1, NaN, 3]}', "expected finite numbers"),
    ('{"key": true, "x": [1, 2, 3]}', "key: expected a string or an integer"),
    ('{"key": 7, "x": [1, 2, 3]}', "expected a str key"),
    ('{"x": [1, 2, 3]}', 'expected a JSON object {"key"'),
]


def test_malformed_lines_are_reported_with_their_number_and_skipped(model_file):
    model, path = model_file
    good = make_events(30, seed=2)
    lines, kept, bad_at = [], [], {}
    for i, (k, x) in enumerate(good):
        lines.append(json.dumps({"key": k, "x": x}))
        kept.append((k, x))
        if i % 4 == 1 and len(bad_at) < len(BAD):
            text, why = BAD[len(bad_at)]
            lines.append(text)
            bad_at[len(lines)] = why
    r = run([path, "--max-batch", 5], "\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    keys, ys = parse_outputs(r.stdout)
    assert keys == [k for k, _ in kept]
    np.testing.assert_allclose(ys, oracle_outputs(model, kept), atol=1e-5, rtol=0)
    for n, why in bad_at.items():
        line = next(ln for ln in r.stderr.splitlines() if f"line {n}:" in ln)
        assert why in line and line.endswith("skipped")
    assert f"{len(BAD)} malformed line(s) skipped" in r.stderr


def test_strict_stops_at_the_first_malformed_line_after_the_events_before_it(model_file, tmp_path):
    model, path = model_file
    events = make_events(12, seed=4)
    text = jsonl(events[:8]) + "not json\n" + jsonl(events[8:])
    state = tmp_path / "s.sgst"
    r = run([path, "--strict", "--state", state, "--max-batch", 3], text)
    assert r.returncode == 1
    assert "line 9:" in r.stderr and "stopping (--strict)" in r.stderr
    keys, ys = parse_outputs(r.stdout)
    assert keys == [k for k, _ in events[:8]]
    np.testing.assert_allclose(ys, oracle_outputs(model, events[:8]), atol=1e-5, rtol=0)
    meta = checkpoint_meta(model, state)
    assert (meta["input_lines"], meta["events"]) == (8, 8)


def _start(path, state):
    return subprocess.Popen(CMD + [str(path), "--state", str(state), "--checkpoint-every", "0.2",
                                   "--max-wait-ms", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)


def _feed(p, events):
    p.stdin.write(jsonl(events))
    p.stdin.flush()
    return [p.stdout.readline() for _ in events]  # blocks until each event was processed


def _wait_for_checkpoint(model, state, lines, timeout=30.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            if checkpoint_meta(model, state)["input_lines"] >= lines:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint covering {lines} lines within {timeout} s")


@pytest.mark.slow
def test_kill_9_sigterm_and_restart_continue_every_stream_from_the_checkpoint(model_file, tmp_path):
    model, path = model_file
    events = make_events(150, seed=5)
    expect = oracle_outputs(model, events)
    state = tmp_path / "s.sgst"

    # 1. 100 events, wait for a checkpoint that covers them, 30 more, then kill -9.
    p = _start(path, state)
    out = _feed(p, events[:100])
    _wait_for_checkpoint(model, state, 100)
    out += _feed(p, events[100:130])
    p.kill()
    p.wait(timeout=30)
    p.stdin.close()
    p.stdout.close()
    p.stderr.close()
    _, ys = parse_outputs("".join(out))
    np.testing.assert_allclose(ys, expect[:130], atol=1e-5, rtol=0)
    L = checkpoint_meta(model, state)["input_lines"]
    assert 100 <= L <= 130  # events L+1..130 were processed but are not in the checkpoint

    # 2. Restart: the checkpoint says where to continue; feed from there, then SIGTERM.
    p = _start(path, state)
    out = _feed(p, events[L:140])
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert f"covers input lines 1-{L} ({L} events); continue the input at line {L + 1}" in err
    assert checkpoint_meta(model, state)["input_lines"] == 140
    _, ys = parse_outputs("".join(out))
    np.testing.assert_allclose(ys, expect[L:140], atol=1e-5, rtol=0)

    # 3. Restart again and run the rest of the input to its end.
    p = _start(path, state)
    rest, err = p.communicate(jsonl(events[140:]), timeout=60)
    assert p.returncode == 0, err
    assert "continue the input at line 141" in err
    _, ys = parse_outputs(rest)
    np.testing.assert_allclose(ys, expect[140:], atol=1e-5, rtol=0)
    assert checkpoint_meta(model, state)["input_lines"] == 150


def test_usage_errors_exit_2(model_file, tmp_path):
    _, path = model_file
    r = run([path, "--max-batch", 0], "")
    assert r.returncode == 2 and "--max-batch: expected a positive int, got 0" in r.stderr
    r = run([tmp_path / "missing.sgru"], "")
    assert r.returncode == 2 and "streamgru run: error:" in r.stderr


def test_parse_line_in_process():
    assert parse_line('{"key": 5, "x": [1, 2], "ts": 9}', "jsonl", 2) == (5, [1.0, 2.0])
    assert parse_line('"k,1",1,2', "csv", 2) == ("k,1", [1.0, 2.0])
    with pytest.raises(ValueError, match="expected 3 CSV fields"):
        parse_line("k,1", "csv", 2)
    with pytest.raises(ValueError, match="x: expected finite numbers, got inf at index 1"):
        parse_line("k,1,inf", "csv", 2)
    with pytest.raises(ValueError, match="expected an int key"):
        parse_line('{"key": "s", "x": [1, 2]}', "jsonl", 2, key_kind=int)
