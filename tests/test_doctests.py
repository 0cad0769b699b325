"""The examples in the package's docstrings run as written and print what they say (``doctest``).

Every module of ``drrho_kernels`` is searched (a module whose import needs something missing here, e.g.
triton, is skipped with the reason); the public API's main entry points must carry an example.
"""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import drrho_kernels as dk

PACKAGE = Path(dk.__file__).resolve().parent
# The modules whose source holds an example (found without importing them).
MODULES = sorted(".".join(("drrho_kernels", *f.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                 for f in PACKAGE.rglob("*.py") if ">>>" in f.read_text())

# Public names whose docstring must hold an example (the doctests below run it).
WITH_EXAMPLES = ("drrho_clip_loss", "DRRhoCLIPLoss", "available_backends", "LossOutput", "ReferenceFeatures",
                 "drrho_risk", "DRRhoRisk", "jest_select", "rho_select")


def _examples(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} cannot be imported here ({exc})")
    tests = _examples(module)
    assert tests, f"{name}: '>>>' in its source but no docstring example found"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    failed = runner.summarize(verbose=False).failed
    assert failed == 0, f"{name}: {failed} docstring example(s) failed:\n" + "".join(report)


def test_public_api_has_examples():
    missing = [n for n in WITH_EXAMPLES if ">>>" not in (getattr(dk, n).__doc__ or "")]
    assert not missing, f"public docstrings without an example: {missing}"
    assert set(WITH_EXAMPLES) <= set(dk.__all__)
