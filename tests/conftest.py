import pathlib
import sys

# tests/ is not a package: make the float64 oracle importable as `import oracle`.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
