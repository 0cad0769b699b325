"""The README's, docs/'s and examples/README.md's Python examples run as written (blocks fenced ```python;
```py blocks are fragments), and every relative link in them points at a file that exists."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = README.parent
TESTING = ROOT / "docs" / "TESTING.md"
OPTIONAL_MODULES = ("open_clip",)
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
BLOCKS = [(path.relative_to(ROOT).as_posix(), block) for path in DOCS
          for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]


def test_readme_has_examples():
    assert BLOCKS
    assert all(path.is_file() for path in DOCS)


@pytest.mark.parametrize("where, block", BLOCKS, ids=[f"{w}[{i}]" for i, (w, _) in enumerate(BLOCKS)])
def test_documented_example_runs(where, block):
    """Recipes for optional integrations run where the integration is installed (open_clip cannot be
    installed beside a CPU torch 2.13 here: no torchvision build)."""
    for optional in OPTIONAL_MODULES:
        if re.search(rf"^\s*(from|import) {optional}\b", block, flags=re.M):
            pytest.importorskip(optional)
    exec(compile(block, f"{where}[python block]", "exec"), {"__name__": "readme"})


def test_readme_commands_are_the_ci_commands():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()
    commands = re.findall(r"```bash\n# \d\..*?\n(.*?)\n```", README.read_text(), flags=re.S)
    install, tests = commands[0], commands[1]
    assert tests == ci                                          # command 2 is CI's, word for word
    assert "DRRHO_KERNELS_BUILD_CPP=1" in tests and "python -m pytest" in tests    # CI requires the extension
    assert "DRRHO_KERNELS_BUILD_CPP" not in install             # the user's install keeps the fallback


def test_testing_doc_documents_the_gpu_and_mutation_commands():
    """The GPU command and the mutation tool are documented in docs/TESTING.md (linked from the README)."""
    text = TESTING.read_text()
    assert "\npython -m pytest -m gpu -rs" in text and "python tools/mutants.py" in text
    assert "docs/TESTING.md" in README.read_text()
    assert (ROOT / "tools" / "mutants.py").is_file()


def _without_fences(text: str) -> str:
    """The text without fenced code blocks (a '# comment' in a block is not a heading, x[i](j) not a link)."""
    return re.sub(r"^(`{3,}).*?^\1[ \t]*$", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links are not read from code)."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", _without_fences(text), flags=re.S)


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return (re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)          # [text](target), ![alt](target)
            + re.findall(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", prose))     # <img src=...>, <a href=...>


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _without_fences(path.read_text()), flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)           # a link: its text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


LINKS = [(path, target) for path in DOCS for target in _links(path.read_text())
         if not re.match(r"[a-z][a-z0-9+.-]*:", target)]                       # not http:, https:, mailto:


def test_docs_have_relative_links():
    assert LINKS and any(path == README for path, _ in LINKS)


@pytest.mark.parametrize("path, target", LINKS, ids=[f"{p.relative_to(ROOT).as_posix()}->{t}" for p, t in LINKS])
def test_relative_link_resolves(path, target):
    """Every relative link (and image) of README.md, docs/*.md and examples/README.md points at an existing
    file of this repository, from the file's own directory; a #fragment into a Markdown file names one of
    its headings."""
    file_part, _, fragment = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    where = path.relative_to(ROOT).as_posix()
    assert dest.exists(), f"{where}: link {target!r} -> {dest} does not exist"
    assert dest == ROOT or ROOT in dest.parents, f"{where}: link {target!r} leaves the repository"
    if fragment and dest.suffix == ".md":
        assert fragment in _anchors(dest), f"{where}: link {target!r}: no heading #{fragment} in {dest.name}"
