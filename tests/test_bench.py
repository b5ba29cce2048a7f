"""`streamgru bench --quick` end to end in a subprocess (tiny settings), and what it writes.

No timing is asserted: only that the command runs, prints the table, and writes a JSON with one
result per contender and workload and a PNG plot. The contenders' agreement with each other is
checked by the benchmark itself before timing (weights read back through our converters).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_bench_quick_writes_table_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    cmd = [sys.executable, "-m", "streamgru.cli", "bench", "--quick", "--threads", "1",
           "--seconds", "0.01", "--only", "H=64", "--no-sgemm", "--json", str(out_json),
           "--plot", str(out_png)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "median us" in res.stdout and "streamgru" in res.stdout
    data = json.loads(out_json.read_text())
    got = {(r["workload"], r["contender"]) for r in data["results"]}
    for cell, tag in (("gru", ""), ("lstm", " lstm")):  # every workload once per cell
        for wl, contender in ((f"step{tag} I=16 H=64 n=1", "streamgru"),
                              (f"step{tag} I=16 H=64 n=1", "ort_run"),
                              (f"step{tag} I=16 H=64 n=1", "ort_iobinding"),
                              (f"step{tag} I=16 H=64 n=1", "torch"),
                              (f"run{tag} I=16 H=64 T=100", "ort_sequence")):
            assert (wl, contender) in got
            assert {r["cell"] for r in data["results"] if r["workload"] == wl} == {cell}
    assert "step lstm I=16 H=64 n=1              lstm" in res.stdout  # the table's cell column
    assert all(r["median_us"] > 0 and r["threads"] == 1 for r in data["results"])
    assert data["machine"]["cores"] >= 1
    from streamgru.isa import TILE

    assert data["machine"]["tile"] == TILE.as_dict()  # the tile the kernels were built with
    assert f"kernels: {TILE.describe()}" in res.stdout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_baselines_agree_with_oracle_including_duplicate_keys(cell):
    """The fair baselines (user-side store, waves for repeated keys) compute the same steps."""
    import oracle

    from streamgru.harness.bench import CONTENDERS, UserStore, batches, make_contender, make_model, workload

    wl = workload(8, 16, 12, streams=10, keys="duplicates", layers="stack", cell=cell)
    model = make_model(wl)
    assert [ly.kind for ly in model.recurrent_layers] == [cell, cell]
    contenders = {}
    for name in CONTENDERS:
        try:
            contenders[name] = make_contender(name, model, 1)
        except ImportError:
            continue
    ref = np.zeros((wl.n_streams, model.state_size))
    for keys, x in batches(wl, 3):
        y_ref = np.zeros((len(keys), model.output_size))
        for rows in UserStore.waves(keys) or [np.arange(len(keys))]:
            y, ref[keys[rows]] = oracle.step(model, ref[keys[rows]], x[rows])
            y_ref[rows] = y
        for name, c in contenders.items():
            np.testing.assert_allclose(c.step(keys, x), y_ref, atol=1e-5, rtol=0, err_msg=name)


def test_bench_rejects_bad_threads():
    from streamgru.cli import main

    assert main(["bench", "--threads", "0", "--no-sgemm", "--json", "", "--plot", ""]) == 2


def test_bench_rejects_a_bad_only_pattern(capsys):
    from streamgru.cli import main

    assert main(["bench", "--only", "n=(1", "--no-sgemm", "--json", "", "--plot", ""]) == 2
    assert "--only: expected a regular expression, got 'n=(1'" in capsys.readouterr().err


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_baseline_agrees_with_oracle_and_keeps_the_state(cell):
    """ort_sequence runs a whole sequence per call and carries the stream's state to the next
    (to_onnx(sequence=True) with LSTM nodes too)."""
    pytest.importorskip("onnxruntime")
    import oracle

    from streamgru.harness.bench import make_contender
    from streamgru.model import GRUModel

    model = GRUModel.random(3, [5, 4], dense_after=[(2, "tanh")], cell=cell, seed=1)
    c = make_contender("ort_sequence", model, 1)
    xs = np.random.default_rng(0).normal(size=(2, 6, 3)).astype(np.float32)
    y1, y2 = c.run(0, xs[0]), c.run(0, xs[1])
    ref, state = oracle.run(model, xs[0])
    np.testing.assert_allclose(y1, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(y2, oracle.run(model, xs[1], state)[0], atol=1e-5, rtol=0)


def test_onnx_baseline_runs_every_gru_attribute():
    """The ONNX peers run what the model says: hardsigmoid with its alpha/beta, clip and
    linear_before_reset=0 (the bench's former exporter raised KeyError on hardsigmoid and
    dropped alpha, beta and clip)."""
    pytest.importorskip("onnxruntime")
    from helpers import OracleStreams

    from streamgru.harness.bench import make_contender
    from streamgru.model import DenseLayer, GRULayer, GRUModel

    rng = np.random.default_rng(3)
    H, I = 5, 3
    gru = GRULayer(I, H, rng.uniform(-1, 1, (3 * H, I)), rng.uniform(-1, 1, (3 * H, H)),
                   rng.uniform(-1, 1, 3 * H), rng.uniform(-1, 1, 3 * H), linear_before_reset=0,
                   f=("hardsigmoid", 0.3, 0.4), g=("scaledtanh", 0.8, 1.2), clip=0.9)
    model = GRUModel([gru, DenseLayer(H, 2, rng.uniform(-1, 1, (2, H)), activation="relu")])
    for name in ("ort_run", "ort_iobinding"):
        c, ref = make_contender(name, model, 1), OracleStreams(model)
        for _ in range(3):
            keys = np.array([0, 1, 0])
            x = rng.normal(size=(3, I)).astype(np.float32)
            np.testing.assert_allclose(c.step(keys, x), ref.step(keys.tolist(), x), atol=1e-5,
                                       rtol=0, err_msg=name)


def test_standard_workloads_run_once_per_cell_under_names_that_say_the_cell():
    """The LSTM list is the GRU list with the cell changed; the GRU names are the ones of the
    results recorded before LSTM rows existed."""
    from dataclasses import replace

    from streamgru.harness.bench import CELLS, cell_of, make_model, standard_workloads

    assert CELLS == ("gru", "lstm")
    for quick in (True, False):
        gru, lstm = (standard_workloads(quick, cells=[c]) for c in CELLS)
        assert standard_workloads(quick) == gru + lstm
        assert len({w.name for w in gru + lstm}) == 2 * len(gru)
        assert [replace(w, name="", cell="gru") for w in lstm] == [replace(w, name="") for w in gru]
        assert all("lstm" not in w.name for w in gru)
        assert [w.name for w in lstm] == [w.name.replace(" ", " lstm ", 1) for w in gru]
    names = {w.name for w in standard_workloads(quick=False, cells=["gru"])}
    assert {"step I=16 H=64 n=1", "many I=128 H=128 n=4096/100000", "stack I=32 H=128 n=64",
            "duplicates I=64 H=128 n=256", "zipf I=64 H=128 n<=512/100000",
            "run I=256 H=256 T=100"} <= names
    stack = [w for w in standard_workloads(True, cells=["lstm"]) if w.layers == "stack"]
    assert cell_of(make_model(stack[0])) == "lstm"


def test_torch_baseline_refuses_a_layer_torch_does_not_run_natively():
    """to_torch writes such a layer as our own torch operations: that is not torch's kernel, so
    the torch contender is refused (and `run_workload` reports it as skipped)."""
    pytest.importorskip("torch")
    from streamgru.harness.bench import make_contender
    from streamgru.model import GRUModel, LSTMLayer

    rng = np.random.default_rng(0)
    H, I = 4, 3
    peep = LSTMLayer(I, H, rng.uniform(-1, 1, (4 * H, I)), rng.uniform(-1, 1, (4 * H, H)),
                     np.zeros(4 * H), np.zeros(4 * H), P=rng.uniform(-1, 1, 3 * H))
    with pytest.raises(ValueError, match=r"^torch: expected recurrent layers torch runs natively .*"
                                         r"got 1 recurrent layers of which torch runs 0 \(none\)"):
        make_contender("torch", GRUModel([peep]), 1)
    make_contender("torch", GRUModel.random(I, [H], cell="lstm"), 1)


def test_bench_rejects_an_unknown_cell(capsys):
    from streamgru.cli import main

    assert main(["bench", "--cell", "gru,rnn", "--no-sgemm", "--json", "", "--plot", ""]) == 2
    assert "--cell: expected names from gru,lstm, got 'gru,rnn'" in capsys.readouterr().err


def test_peak_report_is_the_measured_share_of_the_peak_and_the_bound_per_peer():
    """The peak lines are arithmetic on the results: synthetic rows, hand-computed values."""
    from streamgru.harness.bench import Result, format_peak_report, peak_report

    def row(wl, contender, t, med, n, gflops):
        return Result(wl, contender, t, med, med, 0.0, n, 128, 10, gflops)

    many = "many lstm I=128 H=128 n=4096/100000"
    results = [row(many, "streamgru", 1, 13000.0, 4096, 80.0),
               row(many, "ort_run", 1, 19500.0, 4096, 55.0),
               row(many, "torch", 1, 26000.0, 4096, 40.0),
               row(many, "streamgru", 2, 6500.0, 4096, 160.0),  # no peak for 2 threads: no line
               row("step I=128 H=128 n=16", "streamgru", 1, 30.0, 16, 20.0),  # too few rows
               row("run I=16 H=64 T=100", "streamgru", 1, 80.0, 4096, 5.0),  # a sequence
               row("step I=128 H=128 n=1024", "ort_run", 1, 900.0, 1024, 50.0)]  # no engine row
    report = peak_report(results, {1: 100.0})
    assert [(e["workload"], e["threads"]) for e in report] == [(many, 1)]
    e = report[0]
    assert e["fraction"] == pytest.approx(0.80) and e["peak"] == 100.0
    assert e["peers"]["ort_run"] == {"speedup": pytest.approx(1.5),
                                     "bound": pytest.approx(100.0 / 55.0)}
    assert e["peers"]["torch"]["speedup"] == pytest.approx(2.0)
    assert e["peers"]["torch"]["bound"] == pytest.approx(2.5)
    assert format_peak_report(report) == (
        f"{many}, 1t: 80.0 GFLOP/s, 80% of the sgemm peak (100); ort_run 1.50x (bound 1.82x), "
        "torch 2.00x (bound 2.50x)")


def test_same_isa_peak_follows_the_tile_not_the_host():
    """The AVX2 build is judged against OpenBLAS's AVX2 kernel on any x86 host, SSE builds
    against its SSE kernel; AVX-512 builds and other machines take OpenBLAS's own pick."""
    from streamgru.harness.bench import same_isa_coretype
    from streamgru.isa import make_config

    assert same_isa_coretype(make_config("avx2", "haswell", 16, True), "x86_64") == "Haswell"
    assert same_isa_coretype(make_config("avx2", "znver3", 16, True), "x86_64") == "Haswell"
    assert same_isa_coretype(make_config("vec16", "x86-64", 16, False), "x86_64") == "Nehalem"
    assert same_isa_coretype(make_config("vec16", "generic", 32, True), "aarch64") is None
    assert same_isa_coretype(make_config("avx512", "znver4", 32, True), "x86_64") is None


@pytest.mark.slow
def test_same_isa_sgemm_runs_the_named_openblas_kernel():
    """The judge of an AVX2 build is really OpenBLAS's Haswell kernel (threadpoolctl says which
    kernel ran), whatever OPENBLAS_CORETYPE the caller's environment holds."""
    pytest.importorskip("threadpoolctl")
    from streamgru.harness.bench import sgemm_gflops

    got = sgemm_gflops(1, size=128, coretype="Haswell")
    if got["openblas_architecture"] is None:
        pytest.skip("numpy is not linked to OpenBLAS")
    assert got["openblas_architecture"] == "Haswell" and got["gflops"] > 0


def test_measure_peaks_reports_failures_and_never_judges_by_another_kernel():
    """A failed measurement is recorded, not raised; a same-ISA figure from a kernel other than
    the one named (another BLAS, an OpenBLAS without it) is no judge."""
    from streamgru.harness.bench import measure_peaks

    def sgemm(t, size, coretype=None):
        if t == 2 and coretype:
            raise RuntimeError("boom")
        arch = "SkylakeX" if coretype is None or t == 4 else coretype
        return {"gflops": 100.0 * t + (5 if coretype else 0), "openblas_architecture": arch}

    got = measure_peaks([1, 2, 4], 64, "Haswell", sgemm=sgemm)
    assert got["peaks"] == {1: 105.0}
    assert got["sgemm"][2] == {"gflops": 200.0, "openblas_architecture": "SkylakeX"}
    assert got["sgemm_same_isa"][2] == {"error": "boom"}
    assert "gflops" not in got["sgemm_same_isa"][4]
    assert "'SkylakeX', not 'Haswell'" in got["sgemm_same_isa"][4]["error"]
    plain = measure_peaks([1, 2], 64, None, sgemm=sgemm)
    assert plain["peaks"] == {1: 100.0, 2: 200.0} and "sgemm_same_isa" not in plain
