import pathlib
import sys

# Share the float64 oracle and helpers with the test suite.
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
