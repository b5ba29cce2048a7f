"""The streamgru command line, through a real subprocess where it matters."""

import subprocess
import sys

from streamgru import GRUModel
from streamgru.cli import main


def test_info_prints_layers(tmp_path, capsys):
    m = GRUModel.random(3, [5], dense_after=[(2, "softmax")], linear_before_reset=0)
    m.save(tmp_path / "m.sgru")
    assert main(["info", str(tmp_path / "m.sgru")]) == 0
    out = capsys.readouterr().out
    assert "linear_before_reset=0" in out and "activation=softmax" in out
    assert m.fingerprint in out


def test_info_on_bad_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "m.sgru").write_bytes(b"garbage!garbage!")
    assert main(["info", str(tmp_path / "m.sgru")]) == 2
    err = capsys.readouterr().err
    assert "streamgru info: error:" in err and "header" in err


def test_console_script_demo_runs():
    r = subprocess.run([sys.executable, "-m", "streamgru.cli", "demo", "--seconds", "0.3",
                        "--streams", "300", "--batch", "64"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "events/s" in r.stdout and "p99" in r.stdout
