"""Mutation check of the test suite: plant one meaningful bug at a time and see that a test fails.

    python tools/mutants.py                 # every mutant (~6-9 min on 2 cores; +2.5 min for the first C++ build)
    python tools/mutants.py --list          # the mutants, where they are planted, the tests they run
    python tools/mutants.py --only 'cpp-*' eps-dropped      # a selection (shell-style patterns)

Nothing is planted in the working tree: the tree (``git ls-files -co --exclude-standard``) is copied into a
work directory (default ``<tmp>/drrho_kernels_mutants/<hash of this checkout's path>``, kept between runs for
an incremental C++ build; ``--fresh`` starts over), the extension is built there and every test run imports
the package from there (checked first). A mutant replaces text that must occur exactly once (else STALE).
Python and Triton mutants are written into the copy, their tests run (``pytest -x``), the file is restored.
The C++ mutants are compiled at once as a schema: each replaced line becomes ``drrho_mutant_on("<name>") ?
<mutant> : <original>`` (``{on}`` in the table), and the run of one sets ``DRRHO_MUTANT=<name>``.
KILLED: its tests fail (``every``: all of them); SURVIVED: they pass; ERROR: anything else. The killing tests
then run on the unmutated copy: a kill counts only if they pass there (CONFIRMED). Exit 0 only if every mutant
was killed and confirmed. Not part of CI (``.ci/run``): rerun it after changing the kernels or the tests."""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF, DIST, CPP_TESTS = "tests/test_conformance.py", "tests/test_distributed.py", "tests/test_cpp.py"
CPP_SCHEMA_FILES = ("csrc/cpu/fused_loss.cpp",)
CPP_HELPER = """
// ---- tools/mutants.py: mutant schema (this copy only; inactive unless DRRHO_MUTANT names a mutant) ----
#include <cstdlib>
#include <cstring>
static bool drrho_mutant_on(const char* name) {
  static const char* active = std::getenv("DRRHO_MUTANT");
  return active != nullptr && std::strcmp(active, name) == 0;
}
"""


@dataclasses.dataclass
class Mutant:
    name: str
    area: str
    path: str
    changes: list            # [(old, new)]; C++: new may contain {on} (the schema's condition)
    tests: list              # pytest arguments (files, node ids, -k expressions)
    what: str = ""
    every: bool = False      # killed only if every selected test fails (no -x)

    @property
    def cpp(self) -> bool:
        return self.path.endswith(".cpp")


def k(expr: str, *files: str) -> list:
    return [*(files or (CONF,)), "-k", expr]


MATH, VALIDATE, DISTRIBUTED = "drrho_kernels/_math.py", "drrho_kernels/_validate.py", "drrho_kernels/distributed.py"
TORCH, REFERENCE = "drrho_kernels/backends/torch_chunked.py", "drrho_kernels/backends/reference.py"
TRITON, CPP = "drrho_kernels/backends/triton/", "csrc/cpu/fused_loss.cpp"
ORACLE = "test_backend_matches_oracle and "
EPS = ("return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps)))", "return log_mean")
UNSET = "return (u == 0) | ~torch.isfinite(u)"
ONE_PROCESS, ANY_TORCH_REF = k(ORACLE + "torch and single-ref"), k(ORACLE + "torch and ref")
W2 = "W2 and test_mean_loss and "
# (name, area, file, [(old, new), ...], pytest arguments, what the bug is[, every])
MUTANTS = [Mutant(*m) for m in (
    # ---- epilogue (drrho_kernels/_math.py): the per-anchor formulas every fused backend runs -----------
    ("eps-dropped", "epilogue", MATH, [EPS], k(ORACLE + "torch and eps1e"), "log(eps + g) computed as log(g)"),
    ("triton-eps-dropped", "epilogue (Triton path)", MATH, [EPS], k(ORACLE + "triton and eps1e"),
     "eps dropped in the epilogue the Triton backend runs; Triton tests only"),
    ("cpp-eps-dropped", "epilogue (C++ path)", MATH, [EPS], k("cpp and eps1e", CONF, CPP_TESTS),
     "eps dropped in the epilogue the C++ backend runs; C++ tests only"),
    ("unset-only-zero", "moving average", MATH, [(UNSET, "return u == 0")], k(ORACLE + "torch and special-u"),
     "a stored u of NaN or +-inf is not unset"),
    ("cpp-unset-only-zero", "moving average (C++ path)", MATH, [(UNSET, "return u == 0")],
     k("cpp and special", CONF, CPP_TESTS), "the unset rule the C++ backend runs; C++ tests only"),
    ("unset-nan-missed", "moving average", MATH, [(UNSET, "return (u == 0) | torch.isinf(u)")],
     k(ORACLE + "torch and special-u"), "NaN u blended instead of restarted"),
    ("gamma-swapped", "moving average", MATH, [("torch.logaddexp(u_old + math.log1p(-gamma), l_new + math.log(gamma))",
                                                "torch.logaddexp(u_old + math.log(gamma), l_new + math.log1p(-gamma))")],
     ONE_PROCESS, "(1 - gamma) and gamma swapped"),
    ("gamma-schedule-length", "moving average", MATH, [("math.cos(math.pi * epoch / decay_epochs)",
                                                        "math.cos(math.pi * epoch / (decay_epochs + 1))")],
     ["tests/test_spec_math.py"], "cosine schedule one epoch too long"),
    ("weights-unscaled", "epilogue", MATH, [("return u_new, scale * sumexp, scale * sumexp_d",
                                             "return u_new, sumexp, scale * sumexp_d")],
     ONE_PROCESS, "sum_j w_j without its exp(M - u) factor"),
    ("individual-reset-rule", "epilogue (individual)", MATH, [("reset = ~torch.isfinite(u_old) | (u_old < RESET_BELOW)",
                                                               "reset = ~torch.isfinite(u_old)")],
     k("test_individual_temperatures and torch"), "linear u below 1e-35 (and 0) not restarted"),
    ("individual-no-clamp", "epilogue (individual)", MATH,
     [("grad = (-(ed_sum / (n_columns - 1)) / denom + torch.log(denom) + new_bound + rho).clamp(\n"
       "        -options.grad_clamp, options.grad_clamp)",
       "grad = (-(ed_sum / (n_columns - 1)) / denom + torch.log(denom) + new_bound + rho)")],
     k("test_individual_temperatures and torch"), "temperature gradient not clamped"),
    ("distill-h-unscaled", "epilogue (extras)", MATH, [("h=lse_q - s * p_y", "h=lse_q - p_y")],
     k("test_distillation and torch"), "cross-entropy without the student's scale"),
    ("loss-u-not-halved", "loss assembly", MATH, [("+ u_mean.sum() / (2 * s_img))", "+ u_mean.sum() / s_img)")],
     ONE_PROCESS, "(U_I + U_T)/s instead of /(2s)"),
    ("loss-rho-detached", "loss assembly", MATH, [("/ s_img.detach() + rho / s_img\n",
                                                   "/ s_img.detach() + rho / s_img.detach()\n")],
     ONE_PROCESS, "rho / s without its gradient in s"),
    ("loss-pairs-N", "loss assembly", MATH, [("per_pair = 1.0 / (batch * (n_columns - 1))",
                                              "per_pair = 1.0 / (batch * n_columns)")],
     ONE_PROCESS, "1/(B N) instead of 1/(B (N - 1))"),
    ("per-direction-scale-mixed", "loss assembly", MATH,
     [("+ ((contrast[1] * per_pair + distill[1]) / s_txt.detach() + (u_mean[1] + rho) / s_txt))",
       "+ ((contrast[1] * per_pair + distill[1]) / s_txt.detach() + (u_mean[1] + rho) / s_img))")],
     k("test_temperature_form and torch and per_direction"), "text anchors' U and rho over s_img"),
    # ---- positive-column exclusion --------------------------------------------------------------------
    ("torch-positive-offset", "positive exclusion", TORCH, [("cols = rows + (r0 + offset)", "cols = rows + r0")],
     k(ORACLE + "torch and dist"), "positive at column i, not offset + i"),
    ("torch-positive-kept-in-backward", "positive exclusion", TORCH,
     [("            p[positive] = 0.0\n            if distill:\n                q_, p_, g_ = lse\n"
       "                p += _distill_weights(y, z, scale[kk, r]",
       "            if distill:\n                q_, p_, g_ = lse\n                p += _distill_weights(y, z, scale[kk, r]")],
     k(ORACLE + "torch and dist"), "backward weight of the positive not zeroed"),
    ("reference-positive-offset", "positive exclusion", REFERENCE,
     [("negative[torch.arange(B, device=x.device), k.offset + torch.arange(B, device=x.device)] = False",
       "negative[torch.arange(B, device=x.device), torch.arange(B, device=x.device)] = False")],
     k(ORACLE + "reference and dist"), "dense reference: positive ignores offset"),
    ("triton-positive-offset", "positive exclusion", TRITON + "forward.py", [("o_pos = o_m + offset", "o_pos = o_m")],
     k(ORACLE + "triton and dist and f32"), "Triton forward: positive ignores offset"),
    ("triton-positive-kept-in-backward", "positive exclusion", TRITON + "backward.py",
     [("m_w = m_in & (o_n[None, :] != o_pos[:, None])", "m_w = m_in")],
     k(ORACLE + "triton and f32"), "Triton backward: the positive gets a weight"),
    ("triton-transposed-diagonal", "positive exclusion", TRITON + "forward_transposed.py",
     [("m_neg = m_m[:, None] & m_n[None, :] & (o_m[:, None] != o_n[None, :])", "m_neg = m_m[:, None] & m_n[None, :]")],
     k(ORACLE + "triton and single and f32"), "Triton one-process forward: the diagonal counted as a negative"),
    ("cpp-positive-offset", "positive exclusion", CPP,
     [("const int64_t p = offset + r0 + i;", "const int64_t p = {on} ? r0 + i : offset + r0 + i;")],
     k(ORACLE + "cpp and dist"), "C++ forward: positive ignores offset"),
    ("cpp-positive-kept-in-backward", "positive exclusion", CPP,
     [("if (offset + r < N) p[offset + r] = T(0);", "if (!{on} && offset + r < N) p[offset + r] = T(0);")],
     k(ORACLE + "cpp"), "C++ backward: the positive's weight not zeroed"),
    # ---- reference shift ------------------------------------------------------------------------------
    ("torch-ref-sign", "reference shift", TORCH,
     [("            y, z = _similarity(k.img, T, k.ref_img, Tr, r0, r1, acc, split=True)\n"
       "            sim = y if z is None else y - z",
       "            y, z = _similarity(k.img, T, k.ref_img, Tr, r0, r1, acc, split=True)\n"
       "            sim = y if z is None else y + z")],
     ONE_PROCESS, "S = y + z (reference added, one process)"),
    ("torch-margin-unshifted", "reference shift", TORCH, [("    margin = pos[0] - pos[1]\n    split =",
                                                           "    margin = pos[0]\n    split =")],
     ANY_TORCH_REF, "margin without the reference pair's similarity"),
    ("triton-ref-sign", "reference shift", TRITON + "helpers.py", [("b_s = -_panel_dot(b_s, p_or,",
                                                                    "b_s = _panel_dot(b_s, p_or,")],
     k(ORACLE + "triton and dist-ref and f32"), "Triton score tile: reference added"),
    ("cpp-ref-sign", "reference shift", CPP, [("out.addmm_(ref_rows, ref_cols.t(), /*beta=*/1, /*alpha=*/-1);",
                                               "out.addmm_(ref_rows, ref_cols.t(), /*beta=*/1, /*alpha=*/{on} ? 1 : -1);")],
     k(ORACLE + "cpp and ref"), "C++ similarity: reference added"),
    ("cpp-margin-sign", "reference shift", CPP,
     [("at::Tensor margin = positives[0] - positives[1];",
       "at::Tensor margin = {on} ? positives[0] + positives[1] : positives[0] - positives[1];")],
     k(ORACLE + "cpp and ref"), "C++ margin: m = y_i + z_i"),
    # ---- online statistics (Triton helpers) -----------------------------------------------------------
    ("triton-online-no-rescale", "Triton helpers", TRITON + "helpers.py",
     [("b_e = b_e * b_alpha + tl.sum(b_p, axis=AXIS)", "b_e = b_e + tl.sum(b_p, axis=AXIS)")],
     k(ORACLE + "triton and B37 and f32"), "running sum not rescaled by a new max"),
    # ---- half inputs: float32 accumulation ------------------------------------------------------------
    ("torch-similarity-rounded-to-half", "half accumulation", TORCH,
     [("    y = rows[r0:r1].to(acc) @ cols.T\n", "    y = (rows[r0:r1].to(acc) @ cols.T).to(rows.dtype).to(acc)\n"),
      ("ref_rows[r0:r1].to(acc) @ ref_cols.T\n", "(ref_rows[r0:r1].to(acc) @ ref_cols.T).to(rows.dtype).to(acc)\n")],
     k("test_half_tolerance and torch"), "similarity tiles rounded to the input dtype (f16 and bf16)", True),
    # ---- distributed fold and schemes (drrho_kernels/distributed.py) ----------------------------------
    ("dist-offset-zero", "distributed", DISTRIBUTED, [("n_columns, offset = world * batch, rank * batch",
                                                       "n_columns, offset = world * batch, 0")],
     k("W2 and test_mean_loss", DIST), "every rank's positives at columns 0..B-1"),
    ("dist-fold-local-margins", "distributed", DISTRIBUTED, [("col_margin=packed[:, col], **cols)",
                                                              "col_margin=terms.margin.repeat(world), **cols)")],
     k(W2 + "gather_u", DIST), "gather_u fold with this rank's margins for all columns"),
    ("dist-fold-state-misordered", "distributed", DISTRIBUTED, [('col_log_norm = state_all["u"]\n',
                                                                 'col_log_norm = state_all["u"].roll(batch, 1)\n')],
     k(W2 + "gather_u", DIST), "gather_u fold: gathered u in the wrong rank order"),
    ("dist-gather-grad-not-summed", "distributed", DISTRIBUTED,
     [('return _reduce_scatter(grad, ctx.group, ctx.what + "_grad"), None, None',
       'return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)].contiguous(), None, None')],
     k(W2 + "gather_grad", DIST), "gather_grad backward keeps its own slice, no sum"),
    # ---- validation of each backend -------------------------------------------------------------------
    ("validate-offset", "validation", VALIDATE, [("if not 0 <= offset <= n_columns - batch:",
                                                  "if not 0 <= offset <= n_columns:")],
     ["tests/test_validation.py"], "offset up to N accepted"),
    ("validate-finite", "validation", VALIDATE, [("if _data_checks_enabled(x) and not bool(torch.isfinite(x).all()):",
                                                  "if False:")],
     ["tests/test_validation.py"], "non-finite embeddings accepted"),
    ("validate-gamma-zero", "validation", VALIDATE, [('check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)',
                                                      'check_real("gamma", gamma, low=0.0, high=1.0, low_open=False)')],
     ["tests/test_validation.py"], "gamma = 0 accepted"),
    ("cpp-validate-offset", "validation (C++ op)", CPP,
     [("TORCH_CHECK((0 <= offset && offset <= N - B) || offset == N, op,",
       "TORCH_CHECK({on} || (0 <= offset && offset <= N - B) || offset == N, op,")],
     [CPP_TESTS, "-k", "direct_op"], "C++ op: offset not checked"),
    ("triton-validate-device", "validation (Triton op)", TRITON + "__init__.py",
     [('if tiles.img.device.type == "cpu" and not INTERPRETING:', "if False:")],
     ["tests/test_triton_interpreter.py", "-k", "need"], "Triton op: CPU tensors without the interpreter"),
    ("triton-validate-float64", "validation (Triton op)", TRITON + "__init__.py",
     [("if tiles.img.dtype == torch.float64:", "if False:")],
     ["tests/test_triton_interpreter.py", "-k", "need or float64"], "Triton op: float64 tensors accepted"),
)]


def sync_copy(work: Path) -> None:
    """Make ``work`` hold the current tree: changed files copied (with a new mtime, so that the C++ build sees
    them), files gone from the tree removed; build outputs kept."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    files = sorted(p for p in out.decode().split("\0") if p and (ROOT / p).is_file())
    keep = set(files)
    work.mkdir(parents=True, exist_ok=True)
    for rel in files:
        src, dst = ROOT / rel, work / rel
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            shutil.copymode(src, dst)
    for path in work.rglob("*"):
        rel = path.relative_to(work).as_posix()
        if path.is_file() and rel not in keep and not (
                rel.startswith(("build/", ".git/")) or "__pycache__" in rel or rel.endswith(".so")):
            path.unlink()


def _env(work: Path, mutant: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("DRRHO_MUTANT", None)
    return {**env, "DRRHO_MUTANT": mutant} if mutant else env


def apply(work: Path, m: Mutant, schema: bool = False) -> tuple[str, str] | None:
    """Write ``m`` into the copy; returns ``(path, original text)`` for the restore, or None if stale."""
    text = original = (work / m.path).read_text()
    for old, new in m.changes:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new.replace("{on}", f'drrho_mutant_on("{m.name}")') if schema else new)
    (work / m.path).write_text(text)
    return m.path, original


def stale(m: Mutant) -> bool:
    return any((ROOT / m.path).read_text().count(old) != 1 for old, _ in m.changes)


def build_cpp(work: Path, cpp_mutants: list[Mutant], log) -> str | None:
    """Build the extension in the copy with the C++ mutants' schema; None on success, else the reason."""
    originals = {rel: (work / rel).read_text() for rel in CPP_SCHEMA_FILES}
    try:
        for rel, text in originals.items():
            marker = "namespace drrho::cpu {"
            (work / rel).write_text(text.replace(marker, CPP_HELPER + "\n" + marker, 1) if cpp_mutants else text)
        for m in cpp_mutants:
            if apply(work, m, schema=True) is None:
                log(f"  {m.name}: anchor not found in the copy (stale)")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work,
                              env=dict(_env(work), DRRHO_KERNELS_BUILD_CPP="1"), capture_output=True, text=True)
        log(f"  C++ build in the copy: {time.monotonic() - start:.0f} s, exit {proc.returncode}")
        if proc.returncode != 0:
            return "the C++ build failed:\n" + (proc.stdout + proc.stderr)[-3000:]
    finally:
        for rel, text in originals.items():    # the schema stays only in the compiled library
            (work / rel).write_text(text)
    return None


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)
_COUNTS = re.compile(r"(\d+) (passed|failed|error|errors|skipped)")
_MARGIN = re.compile(r"relative error ([0-9.eE+-]+) > ([0-9.eE+-]+)")


def run_pytest(work: Path, args: list, mutant: str | None, stop_first: bool, timeout: float):
    """``(exit code or "timeout", output, {outcome: count}, seconds)`` of one pytest run in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", "-W",
           "ignore::pytest.PytestUnraisableExceptionWarning", *(["-x"] if stop_first else []), *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=work, env=_env(work, mutant), capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout or "")
    last = out.splitlines()[-1] if out.strip() else ""
    counts = {what.rstrip("s") if what.startswith("error") else what: int(n) for n, what in _COUNTS.findall(last)}
    return rc, out, counts, time.monotonic() - start


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str = "?"
    killer: str = ""
    detail: str = ""
    margin: str = ""          # the largest error / bound a failing assertion printed (the conformance format)
    seconds: float = 0.0
    confirmed: bool | None = None


def run_mutant(work: Path, m: Mutant, timeout: float, cpp_ready: bool) -> Result:
    r = Result(m)
    if stale(m):
        r.status, r.detail = "STALE", "anchor not found exactly once in the working tree"
        return r
    if m.cpp and not cpp_ready:
        r.status, r.detail = "ERROR", "the C++ extension did not build in the copy"
        return r
    restore = None if m.cpp else apply(work, m)
    try:
        rc, out, counts, r.seconds = run_pytest(work, m.tests, m.name if m.cpp else None, not m.every, timeout)
    finally:
        if restore is not None:
            (work / restore[0]).write_text(restore[1])
    failed = [name for _, name in _FAILED.findall(out)]
    ratios = [float(a) / float(b) for a, b in _MARGIN.findall(out) if float(b) > 0]
    r.margin = f"{max(ratios):.3g}x" if ratios else ""
    if rc == "timeout":
        r.status, r.detail = "ERROR", f"timeout after {timeout:.0f} s"
    elif rc == 1 and failed and m.every and counts.get("passed", 0):
        r.status, r.detail = "SURVIVED", f"{counts.get('passed')} of the selected tests passed"
    elif rc == 1 and failed:
        r.status, r.killer = "KILLED", " ".join(failed) if m.every else failed[0]
    elif rc == 0 and counts.get("passed", 0):
        r.status, r.detail = "SURVIVED", f"{counts.get('passed')} passed, {counts.get('skipped', 0)} skipped"
    else:
        r.status, r.detail = "ERROR", f"pytest exit {rc} ({counts}):\n" + "\n".join(out.strip().splitlines()[-15:])
    return r


def confirm(work: Path, results: list[Result], timeout: float, log) -> None:
    """The killing tests pass on the unmutated copy (one pytest run)."""
    ids = sorted({name for r in results if r.status == "KILLED" for name in r.killer.split()})
    if not ids:
        return
    rc, out, counts, seconds = run_pytest(work, ids, None, False, timeout)
    failing = {name for _, name in _FAILED.findall(out)}
    log(f"  confirmation: {len(ids)} killing tests on the unmutated copy in {seconds:.0f} s: {counts}")
    if rc not in (0, 1):
        log("\n".join(out.strip().splitlines()[-15:]))
    for r in (r for r in results if r.status == "KILLED"):
        r.confirmed = rc in (0, 1) and not (set(r.killer.split()) & failing)


def table(results: list[Result]) -> str:
    rows = [("#", "mutant", "area", "result", "killed by (first failing test)", "margin", "s")] + [
        (str(i), r.mutant.name, r.mutant.area, r.status + ("" if r.confirmed in (None, True) else " (UNCONFIRMED)"),
         r.killer or r.detail.split("\n")[0], r.margin, f"{r.seconds:.0f}") for i, r in enumerate(results, 1)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", nargs="+", metavar="PATTERN", help="mutants whose name matches (fnmatch)")
    ap.add_argument("--workdir", type=Path, help="the copy (default: a fixed directory under the system temp)")
    ap.add_argument("--fresh", action="store_true", help="delete the copy first (full C++ rebuild)")
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per test run (default 400)")
    ap.add_argument("--verbose", action="store_true", help="print the details of every survivor and error")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or any(fnmatch.fnmatch(m.name, p) for p in a.only)]
    if a.list:
        for m in chosen:
            print(f"{m.name:34s} {m.area:28s} {m.path}\n    {m.what}\n    pytest {' '.join(m.tests)}")
        return 0
    if not chosen:
        print("no mutant matches", a.only, file=sys.stderr)
        return 2
    start, log = time.monotonic(), lambda s: print(s, flush=True)
    work = a.workdir or Path(tempfile.gettempdir()) / "drrho_kernels_mutants" / hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    if a.fresh and work.exists():
        shutil.rmtree(work)
    log(f"mutants: {len(chosen)}; copy of {ROOT} in {work}")
    sync_copy(work)
    probe = subprocess.run([sys.executable, "-c", "import drrho_kernels; print(drrho_kernels.__file__)"], cwd=work,
                           env=_env(work), capture_output=True, text=True)
    if not probe.stdout.strip().startswith(str(work)):
        print(f"the copy's package is not the one imported: {probe.stdout}{probe.stderr}", file=sys.stderr)
        return 2
    failure = build_cpp(work, [m for m in chosen if m.cpp and not stale(m)], log)
    if failure:
        log(failure)
    results = []
    for m in chosen:
        results.append(r := run_mutant(work, m, a.timeout, failure is None))
        log(f"  {m.name:34s} {r.status:8s} {r.seconds:5.0f} s  {r.killer or (r.detail.splitlines() or [''])[0]}")
    confirm(work, results, a.timeout, log)
    log("\n" + table(results))
    bad = [r for r in results if r.status != "KILLED" or r.confirmed is False]
    for r in bad:
        log(f"\n--- {r.mutant.name}: {r.status}\n{r.detail}")
    log(f"\n{len(results) - len(bad)} of {len(results)} mutants killed (and confirmed); "
        f"{sum(r.status == 'SURVIVED' for r in results)} survived; {time.monotonic() - start:.0f} s in all")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
