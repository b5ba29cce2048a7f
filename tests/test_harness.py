"""The harness (streamgru.harness: bench, demo, cluster_bench) stays out of the runtime, and ships.

* A fresh process that imports ``streamgru`` and builds, steps, runs and snapshots an Engine holds
  no harness or cluster module afterwards (a module-level import anywhere in the runtime would
  put one there).
* No runtime module imports the harness or the cluster at all, even inside a function (a lazy
  import the first check cannot see), except the two documented doors: ``cli.py`` (the ``bench``
  and ``demo`` verbs) and ``metrics.py`` (which serves a ``ShardedEngine`` too).
* The wheel holds every package, the harness and the default model's data, and an install of it
  runs the ``bench`` and ``demo`` verbs' code from the installed copy (slow: builds a wheel).
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "streamgru"
HARNESS = ("streamgru.harness", "streamgru.cluster")
# module -> the harness packages it may import (lazily, inside the verb that needs them)
DOORS = {"streamgru.cli": {"streamgru.harness"}, "streamgru.metrics": {"streamgru.cluster"}}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source, name, is_package=False):
    """Absolute names of every module the source of module ``name`` imports, at any depth
    (``from . import x`` counts as importing ``package.x``)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _inside(mod, packages):
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def test_runtime_modules_import_no_harness_module_even_lazily():
    runtime = [p for p in sorted(PKG.rglob("*.py")) if not _inside(_module_name(p), HARNESS)]
    assert {_module_name(p) for p in runtime} >= {"streamgru.engine", "streamgru.cli"}
    bad = {}
    for path in runtime:
        name = _module_name(path)
        allowed = DOORS.get(name, set())
        imported = _imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
        wrong = sorted(m for m in imported if _inside(m, HARNESS) and not _inside(m, allowed))
        if wrong:
            bad[name] = wrong
    assert not bad, f"runtime modules importing the harness or the cluster: {bad}"


def test_the_import_scan_sees_relative_absolute_and_lazy_imports():
    """The scan above must not pass by missing a form an import can take."""
    source = textwrap.dedent("""
        from .harness import bench
        def f():
            from ..cluster.sharded import ShardedEngine
            import streamgru.harness.demo
    """)
    found = _imports(source, "streamgru.layers.gru")
    assert {"streamgru.layers.harness.bench", "streamgru.cluster.sharded",
            "streamgru.harness.demo"} <= found
    assert "streamgru.harness.bench" in _imports(source, "streamgru.engine")
    assert "streamgru.harness.bench" in _imports(source, "streamgru", is_package=True)


_CHILD = """
import sys, tempfile, numpy as np
import streamgru
from streamgru import Engine, GRUModel, load
model = GRUModel.random(3, [4], dense_after=[(2, "identity")], seed=0)
eng = Engine(model)
eng.step([1], np.ones((1, 3), np.float32))
eng.step(np.arange(5), np.ones((5, 3), np.float32))
eng.run(7, np.ones((4, 3), np.float32))
with tempfile.TemporaryDirectory() as d:
    model.save(d + "/m.sgru")
    eng.save_state(d + "/s.sgst")
    Engine(load(d + "/m.sgru")).load_state(d + "/s.sgst")
print(sorted(m for m in sys.modules if m.startswith(("streamgru", "converters"))))
"""


def test_using_the_engine_loads_no_harness_module():
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    loaded = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert "streamgru.engine" in loaded and "streamgru.formats" in loaded  # the child did run
    assert [m for m in loaded if _inside(m, HARNESS + ("converters",))] == []


@pytest.mark.slow  # builds a wheel and installs it
def test_the_wheel_ships_the_harness_and_the_default_model(tmp_path):
    pytest.importorskip("setuptools")
    # Built from a copy: setuptools builds in the source tree, and a build/ left there by an
    # earlier build would hide a package missing from pyproject's list.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("streamgru-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("streamgru/harness/__init__.py", "streamgru/harness/bench.py",
              "streamgru/harness/demo.py", "streamgru/harness/cluster_bench.py",
              "streamgru/cluster/__init__.py", "streamgru/cluster/placement.py",
              "streamgru/cluster/sharded.py", "converters/__init__.py"):
        assert f in names, f
    shipped = {pathlib.PurePosixPath(n).name for n in names if n.startswith("streamgru/data/")}
    on_disk = {p.name for p in (PKG / "data").iterdir() if p.is_file() and p.name != "__pycache__"}
    assert on_disk <= shipped, on_disk - shipped
    # Every package of the source tree is in the wheel (a new one missing from pyproject's list
    # would be left out silently).
    for init in PKG.rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, init

    # Installed into a directory of its own, put first on the path of this interpreter (which has
    # the dependencies): the checkout is not on the path, so everything below runs the wheel's copy.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, timeout=300, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = textwrap.dedent(f"""
        import streamgru, streamgru.harness.bench as bench, streamgru.harness.demo as demo
        assert streamgru.__file__.startswith({str(site)!r}), streamgru.__file__
        d = demo.load_default()
        assert demo.DEFAULT_MODEL.is_file() and d.model.input_size == 6, d.model
        for name in demo.SHIPPED:  # every shipped model loads from the installed copy
            assert demo.load_default(name).path.is_file(), name
        from streamgru.cli import main
        for verb in ("bench", "demo"):
            try:
                main([verb, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        print("ok", len(bench.standard_workloads(quick=True)))
    """)
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("ok ")
