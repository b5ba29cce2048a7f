import pathlib
import sys

import pytest

# tests/ is not a package: make the float64 oracle importable as `import oracle`.
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small GRU stack saved as .sgru (the pipeline tests' model): (model, path)."""
    from streamgru import GRUModel

    model = GRUModel.random(3, [5, 4], dense_after=[(2, "tanh")], seed=3)
    path = tmp_path_factory.mktemp("model") / "m.sgru"
    model.save(path)
    return model, path


def pytest_collection_finish(session):
    """Start the subprocess jobs of the selected tests that will run (see tests/background.py)."""
    import background

    names = []
    for item in session.items:
        if any(m.args and m.args[0] is True for m in item.iter_markers("skipif")):
            continue
        names += [m.args[0] for m in item.iter_markers("background")]
    background.start(names)


def pytest_sessionfinish(session):
    import background

    background.shutdown()
