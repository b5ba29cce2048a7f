"""Every docstring example in streamgru (and converters) runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import converters
import streamgru


def _modules():
    names = []
    for pkg in (streamgru, converters):
        names.append(pkg.__name__)
        # subpackages too (streamgru.cluster, streamgru.harness, streamgru.layers)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.",
                                                        onerror=lambda name: None)]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # a module of an optional extra whose dependency is missing
        pytest.skip(f"{name}: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
