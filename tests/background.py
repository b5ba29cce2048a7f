"""Subprocess jobs that compile for a minute or more, run on the second core while the suite runs.

Most of the suite is one busy core: Numba compiles on one thread, and pytest runs one test at a
time. The few tests that build the kernels from scratch in a subprocess (another target's tile,
a forced tile, ``streamgru warmup`` into an empty cache) spend 40-80 s each waiting on that
subprocess. Such a test registers its subprocess work as a job, marks itself
``@pytest.mark.background("name")``, and asserts on ``result("name")``. When collection ends,
``conftest.py`` starts the jobs of the selected tests, one at a time on a worker thread, so they
overlap with the rest of the suite; the test then only waits for what is left. The job does the
same work the test would, and the test keeps every assertion: only the start moves earlier. A test
run on its own (no job started) runs its job inline.
"""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor

_JOBS: dict = {}
_FUTURES: dict[str, Future] = {}
_PROCS: set = set()
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_STOPPING = threading.Event()


def job(name):
    """Register ``fn()`` as the job ``name`` (a decorator)."""
    def register(fn):
        if name in _JOBS:
            raise ValueError(f"background job {name!r} registered twice")
        _JOBS[name] = fn
        return fn
    return register


def run(args, *, timeout, **kwargs):
    """``subprocess.run(args, capture_output=True, text=True, ...)`` that :func:`shutdown` can kill."""
    if _STOPPING.is_set():
        raise RuntimeError("test session is ending")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)
    with _LOCK:
        _PROCS.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    finally:
        with _LOCK:
            _PROCS.discard(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def start(names):
    """Start the named jobs, in this order, one at a time on a worker thread."""
    global _POOL
    for name in names:
        if name not in _JOBS:
            raise KeyError(f"no background job {name!r}; registered: {sorted(_JOBS)}")
        if name in _FUTURES:
            continue
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-background")
        _FUTURES[name] = _POOL.submit(_JOBS[name])


def result(name):
    """The job's return value (waiting for it if it was started; running it here if not).
    An exception of the job is raised here, in the test."""
    fut = _FUTURES.get(name)
    if fut is None:
        return _JOBS[name]()
    return fut.result()


def shutdown():
    """End of the session: drop jobs not started, kill running subprocesses."""
    _STOPPING.set()
    for fut in _FUTURES.values():
        fut.cancel()
    with _LOCK:
        procs = list(_PROCS)
    for proc in procs:
        proc.kill()
    if _POOL is not None:
        _POOL.shutdown(wait=True)
