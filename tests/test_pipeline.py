"""`streamgru run`, end to end through a real subprocess with pipes; references from the oracle."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import oracle
import pytest
from helpers import OracleStreams

from streamgru.formats import load_state
from streamgru.pipeline import parse_line

CMD = [sys.executable, "-m", "streamgru.cli", "run"]



def make_events(n, keys=("a", "b", "c", "d", "e"), seed=0):
    rng = np.random.default_rng(seed)
    return [(keys[int(rng.integers(len(keys)))], rng.normal(size=3).tolist()) for _ in range(n)]


def jsonl(events):
    """JSON lines of the events; a NaN value is written as null (a missing value)."""
    return "".join(json.dumps({"key": k, "x": [None if v != v else v for v in x]}) + "\n"
                   for k, x in events)


def oracle_outputs(model, events, missing="refuse"):
    """Float64 reference: every event stepped in input order, each key from a zero state; with a
    ``missing`` policy, NaN values in ``x`` are missing values (``oracle.MissingStreams``)."""
    if missing != "refuse":
        ref = oracle.MissingStreams(model, missing)
        return np.array([ref.feed(k, x) for k, x in events])
    return OracleStreams(model).step([k for k, _ in events], [x for _, x in events])


def parse_outputs(text):
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["key"] for r in rows], np.array([r["y"] for r in rows])


def checkpoint_meta(model, state):
    """The checkpoint record of a ``--state`` file, read with its states from the same bytes."""
    return load_state(state, model.fingerprint, model.state_size, with_metadata=True)[2]


def run_in_process(args, capsys):
    """``streamgru run ARGS`` in this process; returns (exit status, stderr)."""
    from streamgru.cli import main as cli_main

    status = cli_main(["run", *map(str, args)])
    return status, capsys.readouterr().err


def run_in_two_parts(path, events, cut, tmp_path, capsys, *args):
    """``streamgru run`` over ``events[:cut]`` then, resuming from its checkpoint, over the
    rest, both in this process with ``args``; returns (state file, output file, the second
    run's stderr, the second part's input file)."""
    state, out = tmp_path / "s.sgst", tmp_path / "out.jsonl"
    first, rest = tmp_path / "first.jsonl", tmp_path / "rest.jsonl"
    first.write_text(jsonl(events[:cut]))
    rest.write_text(jsonl(events[cut:]))
    for part in (first, rest):
        status, err = run_in_process([path, "-i", part, "-o", out, "--state", state, *args],
                                     capsys)
        assert status == 0, err
    return state, out, err, rest


def read_outputs(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["key"] for r in rows], np.array([r["y"] for r in rows]).reshape(len(rows), -1)


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


# ----------------------------------------------------------------------------- missing values

def test_parse_line_reads_missing_values_by_policy():
    for policy in ("skip", "zero", "last"):
        for text, fmt in (('{"key": "a", "x": [null, 2, NaN]}', "jsonl"), ("a,,2,nan", "csv"),
                          ("a, ,2,NaN", "csv")):
            key, x = parse_line(text, fmt, 3, missing=policy)
            assert key == "a" and np.isnan(x[0]) and x[1] == 2.0 and np.isnan(x[2])
        # Everything that was malformed stays malformed: infinity is never a missing value.
        for text, fmt, why in (('{"key": "a", "x": [null, Infinity, 1]}', "jsonl",
                                "expected finite numbers, got inf at index 1"),
                               ("a,,-inf,1", "csv", "expected finite numbers, got -inf at index 1"),
                               ('{"key": "a", "x": [null, "two", 1]}', "jsonl",
                                'expected numbers, got "two"'),
                               ("a,,two,1", "csv", "expected numbers, got 'two'"),
                               ('{"key": "a", "x": [null, 1]}', "jsonl", "expected 3 numbers"),
                               ("a,,1", "csv", "expected 4 CSV fields"),
                               ('{"key": "a", "x": null}', "jsonl", "expected a list of 3"),
                               ('{"key": "a", "x": [null, 1e39, 1]}', "jsonl", "float32's range")):
            with pytest.raises(ValueError, match=why):
                parse_line(text, fmt, 3, dtype="float32", missing=policy)
    assert parse_line('{"key": "a", "x": [1, 2, 3]}', "jsonl", 3, missing="skip") == \
        ("a", [1.0, 2.0, 3.0])
    # refuse (the default): a missing value makes the line malformed, as a NaN always did.
    for text, fmt, why in (('{"key": "a", "x": [1, null, 3]}', "jsonl",
                            r"x: expected numbers, got a missing value \(null\) at index 1; "
                            r"--missing skip, zero or last steps it"),
                           ("a,1,2,", "csv", r"got a missing value \(an empty field\) at index 2"),
                           ('{"key": "a", "x": [1, NaN, 3]}', "jsonl",
                            "expected finite numbers, got nan at index 1; --missing skip"),
                           ("a,nan,2,3", "csv", "expected finite numbers, got nan at index 0")):
        with pytest.raises(ValueError, match=why):
            parse_line(text, fmt, 3)
    with pytest.raises(ValueError, match="missing: expected one of refuse, skip, zero, last, got "
                                         "'drop'"):
        parse_line("a,1,2,3", "csv", 3, missing="drop")


def test_an_unknown_missing_policy_is_a_usage_error_naming_the_choices(model_file, capsys):
    from streamgru.cli import main as cli_main

    _, path = model_file
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", str(path), "--missing", "drop"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --missing: invalid choice: 'drop'" in err
    choices = err.split("choose from", 1)[1]  # quoted or not, by Python version
    assert all(policy in choices for policy in ("refuse", "skip", "zero", "last"))


def events_with_gaps(n, seed, rate=0.25):
    """``make_events`` with values dropped (NaN) at random; and how many events hold one."""
    events = make_events(n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for _, x in events:
        for j in np.flatnonzero(rng.random(len(x)) < rate):
            x[j] = float("nan")
    return events, sum(any(v != v for v in x) for _, x in events)


@pytest.mark.parametrize("policy", ["skip", "zero", "last"])
def test_missing_values_are_stepped_by_the_policy(model_file, tmp_path, capsys, policy):
    model, path = model_file
    events, gaps = events_with_gaps(60, seed=21)
    assert 10 < gaps < 50
    src, out = tmp_path / "e.jsonl", tmp_path / "out.jsonl"
    src.write_text(jsonl(events))
    # Batches of 7 hold a key several times: its rows are handled in order.
    status, err = run_in_process([path, "-i", src, "-o", out, "--missing", policy,
                                  "--max-batch", 7], capsys)
    assert status == 0, err
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in events]
    np.testing.assert_allclose(ys, oracle_outputs(model, events, policy), atol=1e-5, rtol=0)
    assert f"{gaps} event(s) with missing values stepped by --missing {policy}" in err
    assert "malformed" not in err
    if policy == "last":  # CSV: an empty field is the missing value
        csv_src, csv_out = tmp_path / "e.csv", tmp_path / "out_csv.jsonl"
        csv_src.write_text("".join(f"{k}," + ",".join("" if v != v else repr(v) for v in x)
                                   + "\n" for k, x in events))
        status, err = run_in_process([path, "-i", csv_src, "-o", csv_out, "--format", "csv",
                                      "--missing", policy, "--dtype", "float64"], capsys)
        assert status == 0, err
        np.testing.assert_allclose(read_outputs(csv_out)[1], oracle_outputs(model, events, policy),
                                   atol=1e-9, rtol=0)


def test_refuse_skips_lines_with_missing_values_as_malformed(model_file, tmp_path, capsys):
    model, path = model_file
    events, gaps = events_with_gaps(40, seed=22)
    complete = [(k, x) for k, x in events if not any(v != v for v in x)]
    src, out = tmp_path / "e.jsonl", tmp_path / "out.jsonl"
    src.write_text(jsonl(events))
    status, err = run_in_process([path, "-i", src, "-o", out, "--max-batch", 5], capsys)
    assert status == 0, err
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in complete]
    np.testing.assert_allclose(ys, oracle_outputs(model, complete), atol=1e-5, rtol=0)
    first = next(i for i, (_, x) in enumerate(events) if any(v != v for v in x)) + 1
    assert f"line {first}: x: expected numbers, got a missing value (null)" in err
    assert f"{gaps} malformed line(s) skipped" in err
    status, err = run_in_process([path, "-i", src, "-o", tmp_path / "o2.jsonl", "--strict"],
                                 capsys)
    assert status == 1 and f"line {first}:" in err and "stopping (--strict)" in err


def test_run_line_metrics_count_missing_values_by_policy(model_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("prometheus_client")
    from streamgru import pipeline

    seen = []

    class Recorded(pipeline._RunStats):
        def __init__(self, checkpointing):
            super().__init__(checkpointing)
            seen.append(self)

    monkeypatch.setattr(pipeline, "_RunStats", Recorded)
    _, path = model_file
    events, gaps = events_with_gaps(30, seed=23)
    src = tmp_path / "e.jsonl"
    src.write_text(jsonl(events) + "\n")
    for policy, ok, malformed in (("refuse", 30 - gaps, gaps), ("zero", 30, 0)):
        status, err = run_in_process([path, "-i", src, "-o", tmp_path / f"{policy}.jsonl",
                                      "--missing", policy, "--metrics-port", 0], capsys)
        assert status == 0, err
        assert seen[-1].lines == {"ok": ok, "malformed": malformed, "refused": 0, "blank": 1}


def test_the_last_memory_is_checkpointed_and_a_resume_keeps_the_policy(model_file, tmp_path,
                                                                        capsys):
    model, path = model_file
    events, _ = events_with_gaps(50, seed=24)
    state, out, err, rest = run_in_two_parts(path, events, 25, tmp_path, capsys,
                                             "--missing", "last")
    assert "continue the input at line 26" in err
    assert checkpoint_meta(model, state)["missing"] == "last"
    # Interrupted or not, every stream carries on from its last observed values.
    np.testing.assert_allclose(read_outputs(out)[1], oracle_outputs(model, events, "last"),
                               atol=1e-5, rtol=0)
    status, err = run_in_process([path, "-i", rest, "-o", out, "--state", state, "--missing",
                                  "zero"], capsys)
    assert status == 2
    assert "--missing: expected 'last', the policy of the run that wrote" in err


def test_an_lstm_model_runs_and_resumes_from_its_checkpoint(tmp_path, capsys):
    """`streamgru run` with a model holding LSTM layers (state h then C): outputs equal the
    oracle's in input order, through a checkpoint written by one run and resumed by the next."""
    from helpers import mixed_lstm_model

    model = mixed_lstm_model(np.float32)
    path = tmp_path / "lstm.sgru"
    model.save(path)
    events = make_events(60, seed=5)
    events = [(k, x[:model.input_size]) for k, x in events]
    _, out, _, _ = run_in_two_parts(path, events, 30, tmp_path, capsys, "--max-batch", 7)
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in events]
    np.testing.assert_allclose(ys, oracle_outputs(model, events), atol=1e-5, rtol=0)
