"""The README's and docs/'s Python examples run as written (blocks fenced ```python; ```py blocks are
fragments)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL_MODULES = ("open_clip",)
DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]
BLOCKS = [(path.relative_to(README.parent).as_posix(), block) for path in DOCS
          for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("where, block", BLOCKS, ids=[f"{w}[{i}]" for i, (w, _) in enumerate(BLOCKS)])
def test_documented_example_runs(where, block):
    """Recipes for optional integrations run where the integration is installed (open_clip cannot be
    installed beside a CPU torch 2.13 here: no torchvision build)."""
    for optional in OPTIONAL_MODULES:
        if re.search(rf"^\s*(from|import) {optional}\b", block, flags=re.M):
            pytest.importorskip(optional)
    exec(compile(block, f"{where}[python block]", "exec"), {"__name__": "readme"})


def test_readme_commands_are_the_ci_commands():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()
    commands = re.findall(r"```bash\n# \d\..*?\n(.*?)\n```", README.read_text(), flags=re.S)
    install, tests = commands[0], commands[1]
    assert tests == ci                                          # command 2 is CI's, word for word
    assert "DRRHO_KERNELS_BUILD_CPP=1" in tests and "python -m pytest" in tests    # CI requires the extension
    assert "DRRHO_KERNELS_BUILD_CPP" not in install             # the user's install keeps the fallback


def test_readme_documents_the_gpu_and_mutation_commands():
    text = README.read_text()
    assert "python -m pytest -m gpu -rs" in text and "python tools/mutants.py" in text
    assert (README.parent / "tools" / "mutants.py").is_file()
