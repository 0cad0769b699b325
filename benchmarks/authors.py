"""The authors' released loss (Optimization-AI/DRRho-CLIP, ``src/fast_clip/loss.py``), loaded from a
local snapshot: never copied into this repository, never a dependency.

``DRRHO_AUTHORS_REPO`` names a checkout or a bare git directory (whose ``HEAD`` is read); without it
the snapshot path of our development machines is tried. Used by ``tests/test_authors_parity.py``
(value and gradient parity) and by the ``authors`` benchmark step (``benchmarks.steps``), which
times and measures their ``SogCLRLoss`` beside our re-statement of it (``baselines.unfused_drrho_loss``).
"""
from __future__ import annotations

import functools
import os
import subprocess
import types
from pathlib import Path

SNAPSHOT = "/work/.mirror/Optimization-AI+DRRho-CLIP/repo"
LOSS_PATH = "src/fast_clip/loss.py"


@functools.lru_cache(maxsize=None)
def load_module() -> tuple[types.ModuleType | None, str]:
    """``(module, where)``, or ``(None, why not)`` when no snapshot is readable."""
    root = Path(os.environ.get("DRRHO_AUTHORS_REPO", SNAPSHOT))
    if (root / LOSS_PATH).is_file():
        source = (root / LOSS_PATH).read_text()
    elif root.is_dir():
        proc = subprocess.run(["git", f"--git-dir={root}", "show", f"HEAD:{LOSS_PATH}"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return None, f"{root} holds no {LOSS_PATH} ({proc.stderr.strip() or 'git show failed'})"
        source = proc.stdout
    else:
        return None, (f"no snapshot of Optimization-AI/DRRho-CLIP at {root} "
                      "(set DRRHO_AUTHORS_REPO to a checkout or bare git dir)")
    module = types.ModuleType("authors_fast_clip_loss")
    exec(compile(source, f"{root}/{LOSS_PATH}", "exec"), module.__dict__)
    return module, str(root)
