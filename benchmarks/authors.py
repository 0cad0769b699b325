"""The authors' released code, read from local snapshots (a checkout or a bare git directory, its ``HEAD``) named by
``DRRHO_AUTHORS_REPO`` (Optimization-AI/DRRho-CLIP) and ``FASTCLIP_REPO`` (Optimization-AI/fast_clip), never
copied here; unset: every loader returns ``(None, why not)``. The one loader of the benchmarks and of the tests."""

import ast
import functools
import os
import subprocess
import types
from pathlib import Path

DRRHO_ENV, FASTCLIP_ENV = "DRRHO_AUTHORS_REPO", "FASTCLIP_REPO"
LOSS_PATH, TRAIN_PATH, DIST_PATH = "src/fast_clip/loss.py", "src/training/train.py", "src/training/distributed.py"
JEST_FUNCTIONS = ("softmax_neg", "softmax_nll", "jointly_sample_batch_softmax")


def read_source(env: str, relpath: str) -> tuple[str | None, str]:
    """``(text, where)`` of ``relpath`` in the snapshot named by ``$env``, or ``(None, why not)``."""
    if not (value := os.environ.get(env)):
        return None, f"{env} is not set (a checkout or bare git dir of the authors' repository)"
    root = Path(value)
    if (root / relpath).is_file():
        return (root / relpath).read_text(), f"{root}/{relpath}"
    if not root.is_dir():
        return None, f"{env}={root} is not a directory"
    proc = subprocess.run(["git", f"--git-dir={root}", "show", f"HEAD:{relpath}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout, f"{root}:HEAD:{relpath}"
    return None, f"{env}={root} holds no {relpath} ({proc.stderr.strip() or 'git show failed'})"


def exec_module(env: str, relpath: str, name: str) -> tuple[types.ModuleType | None, str]:
    """``relpath`` of the snapshot executed as a fresh module named ``name``: ``(module, where)``."""
    source, where = read_source(env, relpath)
    if source is None:
        return None, where
    module = types.ModuleType(name)
    module.__file__ = where
    exec(compile(source, where, "exec"), module.__dict__)
    return module, where


@functools.lru_cache(maxsize=None)
def load_module() -> tuple[types.ModuleType | None, str]:
    """DRRho-CLIP's ``loss.py`` (``SogCLRLoss``): ``(module, where)`` or ``(None, why not)``."""
    return exec_module(DRRHO_ENV, LOSS_PATH, "drrho_authors_loss")


def _add_probes(fn: ast.FunctionDef, placed: set) -> ast.FunctionDef:
    """``__probe__(name, value)`` calls after ``logits_ii = ...`` and, in each loop, before the ``if topk`` branch."""
    def probe(name):
        placed.add(name)
        return ast.parse(f"__probe__({name!r}, {name})").body[0]
    body = []
    for stmt in fn.body if fn.name == "jointly_sample_batch_softmax" else ():
        body.append(stmt)
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "logits_ii" for t in stmt.targets):
            body.append(probe("logits_ii"))
        if isinstance(stmt, ast.For):
            stmt.body = [x for s in stmt.body for x in ([probe("logits")] if isinstance(s, ast.If) and getattr(
                s.test, "id", None) == "topk" else []) + [s]]
    fn.body = body or fn.body
    return fn


@functools.lru_cache(maxsize=None)
def jest_namespace():
    """``(namespace, where)``: ``JEST_FUNCTIONS`` taken out of train.py by ``ast``, with probes (``__probe__``)."""
    source, where = read_source(DRRHO_ENV, TRAIN_PATH)
    if source is None:
        return None, where
    nodes = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in JEST_FUNCTIONS]
    if missing := set(JEST_FUNCTIONS) - {n.name for n in nodes}:
        return None, f"{where} defines no {sorted(missing)}"
    placed = set()
    module = ast.fix_missing_locations(ast.Module(body=[_add_probes(n, placed) for n in nodes], type_ignores=[]))
    if placed != {"logits_ii", "logits"}:
        return None, f"{where}: jointly_sample_batch_softmax changed shape (probes placed: {sorted(placed)})"
    import torch.distributed.nn  # noqa: F401  (their loss.py imports it; train.py relies on that)
    ns = {"torch": torch, "__probe__": lambda name, value: None}
    exec(compile(module, where, "exec"), ns)
    return ns, where
