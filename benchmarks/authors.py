"""The authors' released loss (Optimization-AI/DRRho-CLIP, ``src/fast_clip/loss.py``), loaded from a
local snapshot: never copied into this repository, never a dependency.

The snapshot is named by the environment variable ``DRRHO_AUTHORS_REPO`` only: a checkout, or a bare
git directory whose ``HEAD`` is read. Used by ``tests/test_authors_parity.py`` and by the ``authors``
benchmark step (``benchmarks.steps``).
"""
from __future__ import annotations

import functools
import os
import subprocess
import types
from pathlib import Path

ENV = "DRRHO_AUTHORS_REPO"
LOSS_PATH = "src/fast_clip/loss.py"


@functools.lru_cache(maxsize=None)
def load_module() -> tuple[types.ModuleType | None, str]:
    """``(module, where)``, or ``(None, why not)`` when ``DRRHO_AUTHORS_REPO`` names no readable snapshot."""
    if not os.environ.get(ENV):
        return None, f"{ENV} is not set (a checkout or bare git dir of Optimization-AI/DRRho-CLIP)"
    root = Path(os.environ[ENV])
    if (root / LOSS_PATH).is_file():
        source = (root / LOSS_PATH).read_text()
    else:
        proc = subprocess.run(["git", f"--git-dir={root}", "show", f"HEAD:{LOSS_PATH}"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return None, f"{ENV}={root} holds no {LOSS_PATH} ({proc.stderr.strip() or 'git show failed'})"
        source = proc.stdout
    module = types.ModuleType("authors_fast_clip_loss")
    exec(compile(source, f"{root}/{LOSS_PATH}", "exec"), module.__dict__)
    return module, str(root)
