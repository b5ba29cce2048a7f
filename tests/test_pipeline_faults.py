"""`streamgru run` under faults: broken or full output, full or unwritable state directory,
signals, refused events, hostile lines, unloadable models.

The central property (``test_resume_as_told_equals_an_uninterrupted_run``): whatever stops a
run (SIGKILL, SIGTERM, the reader of stdout going away, the state directory filling up), feeding
the input again from the line the restarted command names gives exactly, bit for bit, the states
and outputs of an uninterrupted run over the same input. Everything else here runs the command
in-process (``streamgru.cli.main``) on files, to keep the file fast.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import OracleStreams
from test_pipeline import (
    CMD,
    checkpoint_meta,
    jsonl,
    make_events,
    oracle_outputs,
    read_outputs,
    run_in_process,
)

import streamgru
from streamgru import Engine, GRUModel
from streamgru.cli import main as cli_main
from streamgru.errors import NonFiniteError
from streamgru.formats import load_state, save_state
from streamgru.pipeline import parse_line


def oracle_states(model, events):
    """Float64 reference: each key's state after stepping ``events`` in order."""
    ref = OracleStreams(model)
    ref.step([k for k, _ in events], [x for _, x in events])
    return ref.states


def checkpoint_states(model, state):
    keys, states = load_state(state, model.fingerprint, model.state_size)
    return dict(zip(keys, states))


def assert_states_match(model, state, events, atol=1e-5):
    got, want = checkpoint_states(model, state), oracle_states(model, events)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=repr(k))


# ----------------------------------------------------------------------------- the checkpoint record

def test_snapshot_metadata_round_trips_and_is_validated(tmp_path):
    p = tmp_path / "s.sgst"
    meta = {"input_lines": 7, "events": 5, "note": ["a", 1.5, None]}
    save_state(p, ["a"], np.ones((1, 3), np.float32), "f" * 64, metadata=meta)
    keys, states, got = load_state(p, "f" * 64, 3, with_metadata=True)
    assert (keys, got) == (["a"], meta)
    assert load_state(p, "f" * 64, 3)[0] == ["a"]  # the two-value form is unchanged
    save_state(p, ["a"], np.ones((1, 3), np.float32), "f" * 64)
    assert load_state(p, "f" * 64, 3, with_metadata=True)[2] is None
    with pytest.raises(ValueError, match="metadata: expected JSON values"):
        save_state(p, ["a"], np.ones((1, 3)), "f" * 64, metadata={"x": float("nan")})
    with pytest.raises(TypeError, match="metadata: expected a dict"):
        save_state(p, ["a"], np.ones((1, 3)), "f" * 64, metadata=[1])
    eng = Engine(GRUModel.random(3, 4, seed=0))
    eng.step(["k"], np.ones((1, 3)))
    eng.save_state(p, metadata={"input_lines": 3})
    assert Engine(eng.model).load_state(p).metadata == {"input_lines": 3}


def test_an_old_checkpoint_copied_back_stays_exact_and_a_stray_sidecar_is_ignored(
        model_file, tmp_path, capsys):
    """Issue item 2: the line count lives in the snapshot itself, so no restart can say
    "unknown", and a second restart cannot fall back to line 1."""
    model, path = model_file
    events = make_events(80, seed=11)
    state, out = tmp_path / "s.sgst", tmp_path / "out.jsonl"
    (tmp_path / "a.jsonl").write_text(jsonl(events[:40]))
    (tmp_path / "b.jsonl").write_text(jsonl(events[40:]))
    assert run_in_process([path, "-i", tmp_path / "a.jsonl", "-o", out, "--state", state],
                          capsys)[0] == 0
    old = state.read_bytes()
    assert run_in_process([path, "-i", tmp_path / "b.jsonl", "-o", out, "--state", state],
                          capsys)[0] == 0
    state.write_bytes(old)  # an older checkpoint put back (a backup, a copy gone wrong)
    (tmp_path / "s.sgst.json").write_text(json.dumps({"input_lines": 3, "events": 3}))
    for _ in range(2):
        status, err = run_in_process([path, "-i", os.devnull, "-o", out, "--state", state],
                                     capsys)
        assert status == 0
        assert "covers input lines 1-40 (40 events); continue the input at line 41" in err
        assert "unknown" not in err
    assert run_in_process([path, "-i", tmp_path / "b.jsonl", "-o", out, "--state", state],
                          capsys)[0] == 0
    assert_states_match(model, state, events)
    assert checkpoint_meta(model, state)["input_lines"] == 80


def test_a_snapshot_without_a_line_count_is_refused_not_guessed(model_file, tmp_path, capsys):
    model, path = model_file
    eng = Engine(model)
    eng.step(["a"], np.ones((1, 3)))
    state = tmp_path / "plain.sgst"
    eng.save_state(state)
    before = state.read_bytes()
    (tmp_path / "e.jsonl").write_text(jsonl(make_events(5)))
    out = tmp_path / "out.jsonl"
    status, err = run_in_process([path, "-i", tmp_path / "e.jsonl", "-o", out, "--state", state],
                                 capsys)
    assert status == 2
    assert "--state: expected a checkpoint written by streamgru run" in err
    assert "without a line count" in err
    assert not out.exists() and state.read_bytes() == before


def test_a_checkpoint_is_refused_for_input_of_another_format(model_file, tmp_path, capsys):
    model, path = model_file
    state, out = tmp_path / "s.sgst", tmp_path / "out.jsonl"
    (tmp_path / "e.jsonl").write_text(jsonl(make_events(5)))
    assert run_in_process([path, "-i", tmp_path / "e.jsonl", "-o", out, "--state", state],
                          capsys)[0] == 0
    status, err = run_in_process([path, "-i", os.devnull, "-o", out, "--state", state,
                                  "--format", "csv"], capsys)
    assert status == 2 and "--format: expected 'jsonl'" in err


# ----------------------------------------------------------------------------- output failures

def test_broken_stdout_leaves_the_checkpoint_at_the_delivered_events(model_file, tmp_path):
    """Issue item 1 (`... | head -1`): the batch whose write failed is taken back, the checkpoint
    covers exactly the lines before it, and the exit status says input was left unprocessed."""
    model, path = model_file
    events = make_events(3000, seed=12)
    state = tmp_path / "s.sgst"
    p = subprocess.Popen(CMD + [str(path), "--state", str(state), "--max-batch", "64"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(jsonl(events).encode())
    p.stdin.close()
    assert p.stdout.readline()
    p.stdout.close()  # like `head -1` exiting
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 3, err
    assert "stopped: the reader of the output is gone" in err
    meta = checkpoint_meta(model, state)
    lines = meta["input_lines"]
    assert lines < 3000 and meta["events"] == lines  # batches may be short on a busy machine
    assert f"continue it at line {lines + 1}" in err
    assert_states_match(model, state, events[:lines])


def test_a_failed_write_to_an_output_file_is_truncated_and_resumes_exactly_once(
        model_file, tmp_path, capsys):
    """The output file fills up mid-batch (a file-size limit): the partial batch is cut off the
    file and taken back from the states, so resuming into the same file writes every output
    exactly once."""
    model, path = model_file
    events = make_events(400, seed=13)
    src, out, state = tmp_path / "e.jsonl", tmp_path / "out.jsonl", tmp_path / "s.sgst"
    src.write_text(jsonl(events))
    limit = 9000  # bytes: in the middle of a 50-event batch of ~45-byte lines

    def limit_files():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past it fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(CMD + [str(path), "-i", str(src), "-o", str(out), "--state", str(state),
                              "--max-batch", "50"], preexec_fn=limit_files,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "the output could not be written (File too large)" in r.stderr
    lines = checkpoint_meta(model, state)["input_lines"]
    assert 0 < lines < 400
    keys, ys = read_outputs(out)
    assert len(keys) == lines and out.stat().st_size < limit
    assert_states_match(model, state, events[:lines])
    (tmp_path / "rest.jsonl").write_text(jsonl(events[lines:]))
    status, err = run_in_process([path, "-i", tmp_path / "rest.jsonl", "-o", out, "--state",
                                  state], capsys)
    assert status == 0, err
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in events]
    np.testing.assert_allclose(ys, oracle_outputs(model, events), atol=1e-5, rtol=0)


def test_output_to_a_full_device_exits_3_with_no_stream_advanced(model_file, tmp_path, capsys):
    model, path = model_file
    state = tmp_path / "s.sgst"
    (tmp_path / "e.jsonl").write_text(jsonl(make_events(20)))
    status, err = run_in_process([path, "-i", tmp_path / "e.jsonl", "-o", "/dev/full",
                                  "--state", state], capsys)
    assert status == 3 and "No space left on device" in err
    assert checkpoint_meta(model, state)["input_lines"] == 0
    assert checkpoint_states(model, state) == {}


def test_a_batch_taken_back_under_missing_last_leaves_the_last_memory_as_it_was(
        model_file, tmp_path, capsys):
    model, path = model_file
    state = tmp_path / "s.sgst"
    before = [("a", [1.0, 2.0, 3.0]), ("b", [4.0, 5.0, 6.0])]
    (tmp_path / "e1.jsonl").write_text(jsonl(before))
    status, err = run_in_process([path, "-i", tmp_path / "e1.jsonl", "-o", tmp_path / "o.jsonl",
                                  "--state", state, "--missing", "last"], capsys)
    assert status == 0, err
    (tmp_path / "e2.jsonl").write_text(jsonl([("a", [7.0, float("nan"), 8.0]),
                                              ("b", [float("nan"), 9.0, 10.0])]))
    status, err = run_in_process([path, "-i", tmp_path / "e2.jsonl", "-o", "/dev/full",
                                  "--state", state, "--missing", "last"], capsys)
    assert status == 3 and "No space left on device" in err
    engine = Engine(model, missing="last")
    assert engine.load_state(state).metadata["input_lines"] == 2
    for k, x in before:  # the states and the memory of the delivered events only
        np.testing.assert_allclose(engine.state(k), oracle_states(model, before)[k], atol=1e-5)
        assert engine.last_observed(k).tolist() == x


def test_a_non_finite_output_is_refused_never_printed(model_file, tmp_path, capsys, monkeypatch):
    model, path = model_file
    real_step = Engine.step

    def step(self, keys, x):
        y = real_step(self, keys, x)
        y[-1, 0] = np.inf  # what an engine bug would hand the writer
        return y

    monkeypatch.setattr(Engine, "step", step)
    out, state = tmp_path / "out.jsonl", tmp_path / "s.sgst"
    (tmp_path / "e.jsonl").write_text(jsonl(make_events(20)))
    status, err = run_in_process([path, "-i", tmp_path / "e.jsonl", "-o", out, "--state",
                                  state], capsys)
    assert status == 70 and "internal error: the engine returned a non-finite output" in err
    assert out.read_text() == ""
    assert checkpoint_states(model, state) == {}


# ----------------------------------------------------------------------------- the state directory

@pytest.mark.parametrize("where", ["missing-dir/s.sgst", "a-file/s.sgst"])
def test_an_unwritable_state_directory_is_refused_before_the_first_event(
        model_file, tmp_path, capsys, where):
    _, path = model_file
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "out.jsonl"
    (tmp_path / "e.jsonl").write_text(jsonl(make_events(5)))
    status, err = run_in_process([path, "-i", tmp_path / "e.jsonl", "-o", out, "--state",
                                  tmp_path / where], capsys)
    assert status == 2 and "--state: expected a file in a writable directory" in err
    assert not out.exists() or out.read_text() == ""


# ----------------------------------------------------------------------------- hostile lines

def test_keys_that_are_not_valid_utf8_are_malformed_not_merged(model_file, tmp_path, capsys):
    """Issue item 5a: b"capteur-\\xe9" and b"capteur-\\xe8" must not both become one stream."""
    model, path = model_file
    good = make_events(6, keys=("a", "b"), seed=14)
    x = "[0.5, -1, 2]"
    bad_json = [b'{"key": "capteur-\xe9", "x": ' + x.encode() + b"}",
                b'{"key": "capteur-\xe8", "x": ' + x.encode() + b"}",
                b'{"key": "half-\\ud800", "x": ' + x.encode() + b"}",  # a lone surrogate
                b'{"key": "nul-\\u0000", "x": ' + x.encode() + b"}"]
    lines = [json.dumps({"key": k, "x": v}).encode() for k, v in good[:3]] + bad_json \
        + [json.dumps({"key": k, "x": v}).encode() for k, v in good[3:]]
    src, out = tmp_path / "e.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    status, err = run_in_process([path, "-i", src, "-o", out], capsys)
    assert status == 0, err
    assert "line 4: expected UTF-8 text, got byte 0xe9 at byte 18; skipped" in err
    assert "line 5: expected UTF-8 text, got byte 0xe8 at byte 18; skipped" in err
    assert "line 6: key: expected a string encodable as UTF-8" in err
    assert "line 7: key: expected a string without NUL characters" in err
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in good]
    np.testing.assert_allclose(ys, oracle_outputs(model, good), atol=1e-5, rtol=0)

    csv_src = tmp_path / "e.csv"
    csv_src.write_bytes(b"key,x1,x2,x3\na,1,2,3\ncapteur-\xe9,1,2,3\ncapteur-\xe8,1,2,3\n"
                        b"b,1,2,3\n")
    status, err = run_in_process([path, "-i", csv_src, "-o", tmp_path / "o.csv.jsonl",
                                  "--format", "csv"], capsys)
    assert status == 0
    assert "line 3: expected UTF-8 text" in err and "line 4: expected UTF-8 text" in err
    assert read_outputs(tmp_path / "o.csv.jsonl")[0] == ["a", "b"]


def test_a_value_beyond_float32_is_malformed_and_its_batch_still_runs(model_file, tmp_path,
                                                                      capsys):
    """Issue item 6: 1e39 is a finite double but infinite as float32."""
    model, path = model_file
    events = make_events(9, seed=15)
    lines = jsonl(events[:4]) + '{"key": "a", "x": [1e39, 0, 0]}\n' + jsonl(events[4:])
    src, out, state = tmp_path / "e.jsonl", tmp_path / "out.jsonl", tmp_path / "s.sgst"
    src.write_text(lines)
    status, err = run_in_process([path, "-i", src, "-o", out, "--state", state], capsys)
    assert status == 0, err
    assert "line 5: x: expected numbers within float32's range" in err and "skipped" in err
    keys, ys = read_outputs(out)
    np.testing.assert_allclose(ys, oracle_outputs(model, events), atol=1e-5, rtol=0)
    assert checkpoint_meta(model, state)["input_lines"] == 10
    status, err = run_in_process([path, "-i", src, "-o", tmp_path / "o64.jsonl", "--dtype",
                                  "float64"], capsys)
    assert status == 0 and "line 5" not in err  # float64 holds 1e39
    assert len(read_outputs(tmp_path / "o64.jsonl")[0]) == 10


def test_the_float32_limit_is_numpys_rounding_boundary():
    import warnings

    limit = float.fromhex("0x1.ffffffp127")
    below = float(np.nextafter(limit, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isfinite(np.float32(below)) and not np.isfinite(np.float32(limit))
    assert parse_line(f"k,{below!r},1", "csv", 2, dtype="float32")[1][0] == below
    for v in (limit, -limit, 1e39):
        with pytest.raises(ValueError, match="within float32's range"):
            parse_line(f"k,{v!r},1", "csv", 2, dtype="float32")


POISON = 100.0  # the fake engine refuses rows of key "p" with x[0] above this


def _refusing_step(monkeypatch, calls):
    """Engine.step that refuses, all or nothing as the engine does, a batch in which key "p" has
    a row with x[0] > POISON, with a NonFiniteError naming "p"."""
    real_step = Engine.step

    def step(self, keys, x):
        calls.append(len(keys))
        x = np.asarray(x)
        if any(k == "p" and row[0] > POISON for k, row in zip(keys, x)):
            raise NonFiniteError("x: expected a finite state for key 'p' (test)", keys=["p"])
        return real_step(self, keys, x)

    monkeypatch.setattr(Engine, "step", step)


def test_events_the_engine_refuses_are_skipped_and_the_others_stepped(
        model_file, tmp_path, capsys, monkeypatch):
    model, path = model_file
    events = make_events(12, keys=("a", "b", "p"), seed=16)
    poisoned = {3, 8}  # indices of events turned into refused ones
    for i in poisoned:
        events[i] = ("p", [POISON * 2, 0.0, 0.0])
    calls = []
    _refusing_step(monkeypatch, calls)
    src, out, state = tmp_path / "e.jsonl", tmp_path / "out.jsonl", tmp_path / "s.sgst"
    src.write_text(jsonl(events))
    status, err = run_in_process([path, "-i", src, "-o", out, "--state", state,
                                  "--max-batch", "12", "--max-wait-ms", "1000"], capsys)
    assert status == 0, err
    for i in poisoned:
        assert f"line {i + 1}: refused by the engine: x: expected a finite state" in err
    assert "2 line(s) refused by the engine skipped" in err
    kept = [e for i, e in enumerate(events) if i not in poisoned]
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in kept]
    np.testing.assert_allclose(ys, oracle_outputs(model, kept), atol=1e-5, rtol=0)
    assert_states_match(model, state, kept)
    assert calls[0] == 12 and max(calls[1:]) < 12  # one refused call, then the retries


def test_strict_stops_at_the_first_refused_event(model_file, tmp_path, capsys, monkeypatch):
    model, path = model_file
    events = make_events(10, keys=("a", "p"), seed=17)
    events[6] = ("p", [POISON * 2, 0.0, 0.0])
    _refusing_step(monkeypatch, [])
    src, out, state = tmp_path / "e.jsonl", tmp_path / "out.jsonl", tmp_path / "s.sgst"
    src.write_text(jsonl(events))
    status, err = run_in_process([path, "-i", src, "-o", out, "--state", state, "--strict",
                                  "--max-batch", "10", "--max-wait-ms", "1000"], capsys)
    assert status == 1
    assert "line 7: refused by the engine" in err and "stopping (--strict)" in err
    keys, ys = read_outputs(out)
    assert keys == [k for k, _ in events[:6]]
    assert checkpoint_meta(model, state)["input_lines"] == 6
    assert_states_match(model, state, events[:6])


# ----------------------------------------------------------------------------- model loading

def _garbage(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"garbage!garbage!garbage!")
    return p


@pytest.mark.parametrize("verb", ["info", "convert", "run", "demo"])
def test_every_verb_reports_a_model_that_cannot_be_loaded_with_exit_2(
        tmp_path, capsys, monkeypatch, verb):
    """Issue item 9: foreign exceptions (onnx's DecodeError) and an unreadable file
    (PermissionError; as root no file is unreadable, so the read is made to fail) give one line
    naming the file and exit 2, never a traceback."""
    good = tmp_path / "m.sgru"
    GRUModel.random(3, 4, seed=0).save(good)

    def argv(model):
        return {"info": ["info", model], "convert": ["convert", model, "-o", tmp_path / "o.sgru"],
                "run": ["run", model, "-i", os.devnull, "-o", tmp_path / "o.jsonl"],
                "demo": ["demo", "--model", model, "--seconds", "0.1", "--no-ort"]}[verb]

    for model in (_garbage(tmp_path, "m.onnx"), tmp_path / "missing.sgru"):
        assert cli_main([str(a) for a in argv(model)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"got {model}" in err, err
        assert err.startswith(f"streamgru {verb}: error: ")

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(streamgru.formats, "read_file", unreadable)
    assert cli_main([str(a) for a in argv(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"got {good}" in err and "PermissionError" in err, err


# ----------------------------------------------------------------------------- the property

N_EVENTS = 600
KEYS = 120  # streams keep appearing all run long, so the state file keeps growing
SEEDS = 3

# One process imports streamgru once and forks a child per run (a fresh interpreter costs
# seconds, a fork milliseconds). A child is `streamgru.cli.main(argv)` on the fds it is given;
# nothing in the parent runs parallel kernels, so forking is safe.
HARNESS = textwrap.dedent(r"""
    import fcntl, json, os, random, re, resource, signal, sys, threading, time, traceback
    import numpy as np
    import streamgru.cli
    from streamgru import Engine, load

    model_path, src, work, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    lines = open(src, "rb").read().splitlines(keepends=True)
    Engine(load(model_path)).warmup()  # every kernel the children may call, loaded once
    COMMON = ["run", model_path, "--max-batch", "8", "--max-wait-ms", "1",
              "--checkpoint-every", "0.01"]

    def child(argv, stdin=None, stdout=None, stderr=None, fsize=None):
        pid = os.fork()
        if pid:
            return pid
        try:
            for fd, target in ((0, stdin), (1, stdout), (2, stderr)):
                if target is not None:
                    os.dup2(target, fd)
            os.closerange(3, 1024)  # no other pipe end: the child's stdin must reach EOF
            if fsize is not None:  # a full disk: writes past fsize bytes fail with EFBIG
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            os._exit(streamgru.cli.main(argv))
        except BaseException:
            traceback.print_exc()
        os._exit(99)

    def wait(pid):
        status = os.waitpid(pid, 0)[1]
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    DEVNULL = os.open(os.devnull, os.O_RDWR)

    def interrupted(kind, seed, state):
        rng = random.Random(seed)
        with open(state + ".err1", "wb") as f:
            return run_interrupted(kind, rng, state, f.fileno(), state + ".err1")

    def started(path):
        # The run's first stderr line comes after its signal handlers are in place.
        deadline = time.monotonic() + 60
        while os.path.getsize(path) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)

    def run_interrupted(kind, rng, state, err, err_path):
        if kind in ("sigkill", "sigterm"):
            r, w = os.pipe()
            pid = child(COMMON + ["--state", state], stdin=r, stdout=DEVNULL, stderr=err)
            os.close(r)
            started(err_path)
            k = rng.randrange(1, len(lines))
            os.write(w, b"".join(lines[:k]))  # then keep the pipe open: the run is mid-input
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(pid, signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
            status = wait(pid)
            os.close(w)
            return status
        if kind == "stdout":
            r, w = os.pipe()
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # fills after ~90 output lines
            pid = child(COMMON + ["--state", state, "--input", src], stdout=w, stderr=err)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                for _ in range(rng.randrange(0, 60)):
                    f.readline()
            return wait(pid)
        size = os.path.getsize(os.path.join(work, "reference.sgst"))
        # RLIMIT_FSIZE limits every regular file the run writes, its stderr file too: the run's
        # messages go through a pipe (no size limit), copied to the err file by this process.
        r, w = os.pipe()
        pid = child(COMMON + ["--state", state, "--input", src, "--output", os.devnull],
                    stderr=w, fsize=rng.randrange(size // 3, size))
        os.close(w)
        with os.fdopen(r, "rb") as f:
            os.write(err, f.read())
        return wait(pid)

    def resume(state):
        (ri, wi), (ro, wo), (re_, we) = os.pipe(), os.pipe(), os.pipe()
        pid = child(COMMON + ["--state", state], stdin=ri, stdout=wo, stderr=we)
        for fd in (ri, wo, we):
            os.close(fd)
        err = os.fdopen(re_, "r")
        told = err.readline()
        m = re.search(r"continue the input at line (\d+)|the input starts at line (1)$",
                      told.strip())
        if m is None:
            os.close(wi)
            return {"told": told + err.read(), "status": wait(pid)}
        start = int(m.group(1) or m.group(2))

        def feed():
            with os.fdopen(wi, "wb") as f:
                f.write(b"".join(lines[start - 1:]))

        t = threading.Thread(target=feed)
        t.start()
        with os.fdopen(ro, "r") as f:
            out = f.read()
        t.join()
        rest = err.read()
        return {"told": told, "start": start, "out": out, "err": rest, "status": wait(pid)}

    ref = os.path.join(work, "reference.sgst")
    pid = child(COMMON + ["--state", ref, "--input", src, "--output", ref + ".out"],
                stderr=DEVNULL)
    results = {"reference": wait(pid)}
    for kind, seed in cases:
        state = os.path.join(work, f"{kind}-{seed}.sgst")
        first = interrupted(kind, seed, state)
        results[f"{kind}-{seed}"] = {"first": first, **resume(state)}
    print(json.dumps(results))
""")


def _property_input(seed=21):
    """Events over KEYS streams with a malformed or blank line now and then; returns the text
    and, per good event, (line number, key, x)."""
    rng = random.Random(seed)
    lines, good = [], []
    for _ in range(N_EVENTS):
        r = rng.random()
        if r < 0.03:
            lines.append('{"key": "broken", "x": [1, 2')
        elif r < 0.05:
            lines.append("")
        else:
            k, x = f"s{rng.randrange(KEYS)}", [rng.gauss(0, 1) for _ in range(3)]
            lines.append(json.dumps({"key": k, "x": x}))
            good.append((len(lines), k, x))
    return "".join(line + "\n" for line in lines), good


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                    reason="forks children, uses Linux pipe sizes and RLIMIT_FSIZE")
def test_resume_as_told_equals_an_uninterrupted_run(model_file, tmp_path):
    model, path = model_file
    text, good = _property_input()
    src = tmp_path / "events.jsonl"
    src.write_text(text)
    kinds = ["sigkill", "sigterm", "stdout", "fsize"]
    cases = [(kind, seed) for kind in kinds for seed in range(SEEDS)]
    r = subprocess.run([sys.executable, "-c", HARNESS, str(path), str(src), str(tmp_path),
                        json.dumps(cases)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert results["reference"] == 0

    # The reference run itself, against the float64 oracle.
    ref = tmp_path / "reference.sgst"
    events = [(k, x) for _, k, x in good]
    assert_states_match(model, ref, events)
    ref_out = (tmp_path / "reference.sgst.out").read_text().splitlines()
    np.testing.assert_allclose(np.array([json.loads(s)["y"] for s in ref_out]),
                               oracle_outputs(model, events), atol=1e-5, rtol=0)
    assert checkpoint_meta(model, ref) == {**checkpoint_meta(model, ref),
                                           "input_lines": N_EVENTS, "events": len(good)}
    ref_states = checkpoint_states(model, ref)

    expected_first = {"sigkill": {-signal.SIGKILL}, "sigterm": {128 + signal.SIGTERM},
                      "stdout": {3}, "fsize": {4}}
    for kind, seed in cases:
        res = results[f"{kind}-{seed}"]
        assert res["first"] in expected_first[kind], (kind, seed, res)
        assert res.get("status") == 0, (kind, seed, res)
        state = tmp_path / f"{kind}-{seed}.sgst"
        got = checkpoint_states(model, state)
        assert sorted(got) == sorted(ref_states), (kind, seed)
        for k, s in ref_states.items():
            assert np.array_equal(got[k], s), (kind, seed, k)  # bit for bit
        meta = checkpoint_meta(model, state)
        assert (meta["input_lines"], meta["events"]) == (N_EVENTS, len(good)), (kind, seed)
        # The resumed run writes exactly the reference's outputs of the lines it was fed.
        later = [i for i, (line, _, _) in enumerate(good) if line >= res["start"]]
        assert res["out"].splitlines() == [ref_out[i] for i in later], (kind, seed)
    # The runs stopped at different points (not all before the first checkpoint).
    starts = {results[f"{kind}-{seed}"]["start"] for kind, seed in cases}
    assert len(starts) > SEEDS and max(starts) > 1, starts
