"""`benchmarks/ab_step.py` refuses bad arguments before starting any worker (no timing here)."""

import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab_step  # noqa: E402

TREE = str(pathlib.Path(__file__).parents[1])


@pytest.mark.parametrize("argv, message", [
    ([TREE, "--procs", "0"], "--procs: expected a positive int, got '0'"),
    ([TREE, "--reps", "x"], "--reps: expected a positive int, got 'x'"),
    ([TREE, "--hidden", "-8"], "--hidden: expected a positive int, got '-8'"),
    (["/nonexistent-tree"], "expected a directory holding streamgru/, got '/nonexistent-tree'"),
    ([TREE + ":SG_SKIP"], "expected PATH:VAR=VALUE[,VAR=VALUE], got 'SG_SKIP'"),
])
def test_bad_arguments_are_named_before_any_worker_starts(argv, message, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(ab_step.subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit) as exc:
        ab_step.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err and started == []


def test_a_tree_spec_carries_its_environment():
    assert ab_step.parse_tree(f"{TREE}:A=1,B=x=y") == (TREE, {"A": "1", "B": "x=y"})
    assert ab_step.parse_tree(TREE) == (TREE, {})
