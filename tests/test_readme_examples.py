"""The README's examples run as written. "Bring your model": every ```python block of the section,
in order, in one namespace, inside a temporary directory holding the Keras and RTNeural files the
text refers to; then every `streamgru ...` line of its shell block through the CLI's main().
"Missing values": every ```python block, and what it prints is what its comments say.
"""

import pathlib
import re
import shlex
import shutil

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"
FIX = pathlib.Path(__file__).parent / "fixtures"
SECTION = "## Bring your model"


def section_blocks(path, section=SECTION):
    """(python blocks, shell command lines) of the section, or None if it is absent."""
    text = path.read_text(encoding="utf-8")
    start = text.find(section)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(section))
    body = text[start:end if end >= 0 else len(text)]
    python, shell = [], []
    for lang, code in re.findall(r"^```(\w*)\n(.*?)^```$", body, flags=re.S | re.M):
        if lang == "python":
            python.append(code)
        else:
            shell += [line for line in code.splitlines() if line.startswith("streamgru ")]
    return python, shell


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # torch's exporter deprecation/tracer warnings
def test_bring_your_model_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("h5py")
    blocks = section_blocks(README)
    assert blocks is not None, f"README.md has no {SECTION!r} section"
    python, shell = blocks
    assert len(python) >= 6 and shell, "expected one example per format and the shell commands"
    shutil.copy(FIX / "keras_seq_reset_after.keras", tmp_path / "model.keras")
    shutil.copy(FIX / "keras_legacy_hard_sigmoid.h5", tmp_path / "model.h5")
    shutil.copy(FIX / "rtneural_seq_reset_after.json", tmp_path / "rtneural_model.json")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, code in enumerate(python):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
    from streamgru.cli import main

    for line in shell:
        assert main(shlex.split(line)[1:]) == 0, (line, capsys.readouterr())
    assert (tmp_path / "gru.sgru").exists()


def test_missing_values_example_runs_and_prints_what_it_says(capsys):
    blocks = section_blocks(README, "## Missing values")
    assert blocks is not None and blocks[0], "README.md has no 'Missing values' python example"
    for i, code in enumerate(blocks[0]):
        exec(compile(code, f"README.md missing values block {i}", "exec"), {})  # noqa: S102
        printed = capsys.readouterr().out.splitlines()
        said = [line.split("# ", 1)[1] for line in code.splitlines()
                if line.startswith("print(") and "# " in line]
        assert printed == said
