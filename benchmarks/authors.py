"""The authors' released code, read from local snapshots named by environment variables, never copied here nor a
dependency (a checkout or a bare git directory, whose ``HEAD`` is read; unset: every loader returns ``(None, why
not)``): ``DRRHO_AUTHORS_REPO``, Optimization-AI/DRRho-CLIP (``SogCLRLoss``, ``jointly_sample_batch_softmax``,
``all_gather_tuple_tensor``); ``FASTCLIP_REPO``, Optimization-AI/fast_clip (``FastCLIPLossIndividual``). The one
loader of ``tests/authors_harness.py`` (parity tests) and of the benchmarks."""
from __future__ import annotations

import ast
import functools
import os
import subprocess
import types
from pathlib import Path

ENV = DRRHO_ENV = "DRRHO_AUTHORS_REPO"
FASTCLIP_ENV = "FASTCLIP_REPO"
LOSS_PATH = "src/fast_clip/loss.py"
TRAIN_PATH = "src/training/train.py"
DIST_PATH = "src/training/distributed.py"
JEST_FUNCTIONS = ("softmax_neg", "softmax_nll", "jointly_sample_batch_softmax")


def read_source(env: str, relpath: str) -> tuple[str | None, str]:
    """``(text, where)`` of ``relpath`` in the snapshot named by ``$env``, or ``(None, why not)``."""
    value = os.environ.get(env)
    if not value:
        return None, f"{env} is not set (a checkout or bare git dir of the authors' repository)"
    root = Path(value)
    if (root / relpath).is_file():
        return (root / relpath).read_text(), f"{root}/{relpath}"
    if root.is_dir():
        proc = subprocess.run(["git", f"--git-dir={root}", "show", f"HEAD:{relpath}"], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout, f"{root}:HEAD:{relpath}"
        return None, f"{env}={root} holds no {relpath} ({proc.stderr.strip() or 'git show failed'})"
    return None, f"{env}={root} is not a directory"


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


class _Probe(ast.NodeTransformer):
    """Record ``logits_ii`` after it is computed and the conditional ``logits`` of every later chunk just
    before the top-k / sampling branch, through a ``__probe__(name, value)`` call (nothing else changes)."""

    def __init__(self):
        self.placed = set()

    def _probe(self, name):
        self.placed.add(name)
        return ast.parse(f"__probe__({name!r}, {name})").body[0]

    def visit_FunctionDef(self, node):
        if node.name != "jointly_sample_batch_softmax":
            return node
        body = []
        for stmt in node.body:
            body.append(stmt)
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "logits_ii" for t in stmt.targets):
                body.append(self._probe("logits_ii"))
            if isinstance(stmt, ast.For):
                inner = []
                for s in stmt.body:
                    if isinstance(s, ast.If) and getattr(s.test, "id", None) == "topk":
                        inner.append(self._probe("logits"))
                    inner.append(s)
                stmt.body = inner
        node.body = body
        return node


@functools.lru_cache(maxsize=None)
def jest_namespace():
    """``(namespace, where)``: ``softmax_neg``, ``softmax_nll`` and ``jointly_sample_batch_softmax`` taken
    out of DRRho-CLIP's train.py with ``ast`` (train.py itself imports the whole training stack) and
    executed with what they use (``torch``, and ``torch.distributed.nn``, which their process has imported
    through ``fast_clip/loss.py``), with probes on the scores (set ``ns["__probe__"]`` to record them)."""
    source, where = read_source(DRRHO_ENV, TRAIN_PATH)
    if source is None:
        return None, where
    tree = ast.parse(source)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in JEST_FUNCTIONS]
    missing = set(JEST_FUNCTIONS) - {n.name for n in nodes}
    if missing:
        return None, f"{where} defines no {sorted(missing)}"
    probe = _Probe()
    nodes = [probe.visit(n) for n in nodes]
    if probe.placed != {"logits_ii", "logits"}:
        return None, f"{where}: jointly_sample_batch_softmax changed shape (probes placed: {sorted(probe.placed)})"
    module = ast.Module(body=nodes, type_ignores=[])
    ast.fix_missing_locations(module)
    import torch.distributed.nn  # noqa: F401  (their loss.py imports it; train.py relies on that)
    ns = {"torch": torch, "__probe__": lambda name, value: None}
    exec(compile(module, where, "exec"), ns)
    return ns, where
