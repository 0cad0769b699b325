"""Mutation check: plant one bug of ``TABLE`` at a time in a copy of the tree (kept between runs; the C++ mutants
compiled in, switched on by ``DRRHO_MUTANT``) and run its tests (docs/TESTING.md, "Mutation check"). KILLED: they
fail (``every``: all of them) and pass unmutated; SURVIVED: they pass; STALE: its text is not found exactly once."""

import argparse
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPP_HELPER = ("// tools/mutants.py: the mutant schema (this copy only)\n#include <cstdlib>\n#include <cstring>\n"
              'static bool drrho_mutant_on(const char* name) { static const char* on = std::getenv("DRRHO_MUTANT");\n'
              "  return on != nullptr && std::strcmp(on, name) == 0;\n}\n")
FILES = {"epilogue": "drrho_kernels/core/epilogue.py", "schedule": "drrho_kernels/loss/schedule.py",
         "torch": "drrho_kernels/backends/torch_chunked.py", "reference": "drrho_kernels/backends/reference.py",
         "schemes": "drrho_kernels/parallel/schemes.py", "collectives": "drrho_kernels/parallel/collectives.py",
         "validate": "drrho_kernels/loss/validate.py", "cpp": "csrc/cpu/fused_loss.cpp",
         **{f"triton/{m}": f"drrho_kernels/backends/triton/{m}.py" for m in (
             "forward", "backward", "forward_transposed", "helpers", "__init__")}}
TESTS = dict(C="tests/test_conformance.py", D="tests/test_distributed.py", X="tests/test_cpp.py",
             V="tests/test_validation.py", I="tests/test_triton_interpreter.py", O="test_backend_matches_oracle and")
# name (the bug) | file (FILES) | pytest arguments ({C}: TESTS) [| every: killed only if all fail], then each change
# "~ old => new", the first on that line if it fits (\n: a newline; C++: {on}, the schema's switch; none: the previous
# mutant's). The epilogue's mutants plant a bug every backend runs; their tests pick the path.
TABLE = r"""
eps-dropped | epilogue | {C} -k "{O} torch and eps1e"
~ return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps))) => return log_mean
triton-eps-dropped | epilogue | {C} -k "{O} triton and eps1e"
cpp-eps-dropped | epilogue | {C} {X} -k "cpp and eps1e"
unset-only-zero | epilogue | {C} -k "{O} torch and special-u" ~ return u / u != 1 => return u == 0
cpp-unset-only-zero | epilogue | {C} {X} -k "cpp and special"
unset-nan-missed | epilogue | {C} -k "{O} torch and special-u" ~ return u / u != 1 => return (u == 0) | torch.isinf(u)
gamma-swapped | epilogue | {C} -k "{O} torch and single-ref"
~ (u_old + math.log1p(-gamma), l_new + math.log(gamma)) => (u_old + math.log(gamma), l_new + math.log1p(-gamma))
gamma-schedule-length | schedule | tests/test_spec_math.py
~ math.cos(math.pi * epoch / decay_epochs) => math.cos(math.pi * epoch / (decay_epochs + 1))
weights-unscaled | epilogue | {C} -k "{O} torch and single-ref"
~ return u_new, scale * sumexp, scale * sumexp_d => return u_new, sumexp, scale * sumexp_d
individual-reset-rule | epilogue | {C} -k "test_individual_temperatures and torch"
~ reset = ~torch.isfinite(u_old) | (u_old < RESET_BELOW) => reset = ~torch.isfinite(u_old)
individual-no-clamp | epilogue | {C} -k "test_individual_temperatures and torch"
~ .clamp(\n        -options.grad_clamp, options.grad_clamp) =>
distill-h-unscaled | epilogue | {C} -k "test_distillation and torch" ~ h=lse_q - s * p_y => h=lse_q - p_y
loss-u-not-halved | epilogue | {C} -k "{O} torch and single-ref"
~ u_new.sum().mul_(0.5 / batch) => u_new.sum().mul_(1.0 / batch)
loss-rho-detached | epilogue | {C} -k "{O} torch and single-ref"
~ else 0.0, rest.mul_(inv).mul_(inv).neg_()\n => else 0.0, (rest - rho).mul_(inv).mul_(inv).neg_()\n
loss-pairs-N | epilogue | {C} -k "{O} torch and single-ref"
~ per_pair = 1.0 / (batch * (n_columns - 1)) => per_pair = 1.0 / (batch * n_columns)
per-direction-scale-mixed | epilogue | {C} -k "test_temperature_form and torch and per_direction"
~ return (((terms + rest) * inv).sum(), => return ((terms * inv).sum() + rest.sum() * inv[0],
~ rest.mul_(inv).mul_(inv).neg_()) => torch.stack([rest.sum(), 0 * rest[1]]).mul_(inv[0] ** 2).neg_())
torch-positive-offset | torch | {C} -k "{O} torch and dist"
~ return rows, rows + (r0 + offset) => return rows, rows + r0
torch-positive-kept-in-backward | torch | {C} -k "{O} torch and dist"
~ gain[kk, r], True)\n            p[positive] = 0.0\n => gain[kk, r], True)\n
reference-positive-offset | reference | {C} -k "{O} reference and dist"
~ device=x.device), k.offset + torch.arange(B, => device=x.device), torch.arange(B,
triton-positive-offset | triton/forward | {C} -k "{O} triton and dist and f32" ~ o_pos = o_m + offset => o_pos = o_m
triton-positive-kept-in-backward | triton/backward | {C} -k "{O} triton and f32"
~ m_w = m_in & (o_n[None, :] != o_pos[:, None]) => m_w = m_in
triton-transposed-diagonal | triton/forward_transposed | {C} -k "{O} triton and single and f32"
~ m_neg = m_m[:, None] & m_n[None, :] & (o_m[:, None] != o_n[None, :]) => m_neg = m_m[:, None] & m_n[None, :]
cpp-positive-offset | cpp | {C} -k "{O} cpp and dist"
~ const int64_t p = offset + r0 + i; => const int64_t p = {on} ? r0 + i : offset + r0 + i;
cpp-positive-kept-in-backward | cpp | {C} -k "{O} cpp"
~ if (offset + r < N) p[offset + r] = T(0); => if (!{on} && offset + r < N) p[offset + r] = T(0);
torch-ref-sign | torch | {C} -k "{O} torch and single-ref"
~ y.addmm_(ref_rows[r0:r1].to(acc), ref_cols.T, alpha=-1.0) => y.addmm_(ref_rows[r0:r1].to(acc), ref_cols.T, alpha=1.0)
torch-margin-unshifted | torch | {C} -k "{O} torch and ref" ~     margin = pos[0] - pos[1]\n =>     margin = pos[0]\n
triton-ref-sign | triton/helpers | {C} -k "{O} triton and dist-ref and f32"
~ b_s = -_panel_dot(b_s, p_or, => b_s = _panel_dot(b_s, p_or,
cpp-ref-sign | cpp | {C} -k "{O} cpp and ref" ~ /*beta=*/1, /*alpha=*/-1); => /*beta=*/1, /*alpha=*/{on} ? 1 : -1);
cpp-margin-sign | cpp | {C} -k "{O} cpp and ref"
~ at::Tensor margin = positives[0] - positives[1]; => at::Tensor margin = positives[0] + ({on} ? 1 : -1) * positives[1];
triton-online-no-rescale | triton/helpers | {C} -k "{O} triton and B37 and f32"
~ b_e = b_e * b_alpha + tl.sum(b_p, axis=AXIS) => b_e = b_e + tl.sum(b_p, axis=AXIS)
torch-similarity-rounded-to-half | torch | {C} -k "test_half_tolerance and torch" | every
~     y = rows[r0:r1].to(acc) @ cols.T\n =>     y = (rows[r0:r1].to(acc) @ cols.T).to(rows.dtype).to(acc)\n
~ ref_rows[r0:r1].to(acc) @ ref_cols.T\n => (ref_rows[r0:r1].to(acc) @ ref_cols.T).to(rows.dtype).to(acc)\n
dist-offset-zero | schemes | {D} -k "W2 and test_mean_loss"
~ n_columns, offset = world * batch, rank * batch => n_columns, offset = world * batch, 0
dist-fold-local-margins | schemes | {D} -k "W2 and test_mean_loss and gather_u"
~ col_margin=packed[:, col - 1]) => col_margin=terms.margin.repeat(n_columns // terms.margin.numel()))
dist-fold-state-misordered | schemes | {D} -k "W2 and test_mean_loss and gather_u"
~ columns["col_log_norm"] = state_all["u"]\n => columns["col_log_norm"] = state_all["u"].roll(terms.margin.numel(), 1)\n
dist-gather-grad-not-summed | collectives | {D} -k "W2 and test_mean_loss and gather_grad"
~ reduce_scatter(grad, ctx.group, ctx.what + "_grad") => grad.chunk(dist.get_world_size())[dist.get_rank()]
validate-offset | validate | {V} ~ if not 0 <= offset <= n_columns - batch: => if not 0 <= offset <= n_columns:
validate-finite | validate | {V} ~ if _data_checks_enabled(x) and not bool(torch.isfinite(x).all()): => if False:
validate-gamma-zero | validate | {V}
~ "gamma", gamma, low=0.0, high=1.0, low_open=True) => "gamma", gamma, low=0.0, high=1.0, low_open=False)
cpp-validate-offset | cpp | {X} -k direct_op
~ TORCH_CHECK((0 <= offset && offset <= N - B) || => TORCH_CHECK({on} || (0 <= offset && offset <= N - B) ||
triton-validate-device | triton/__init__ | {I} -k need
~ if tiles.img.device.type == "cpu" and not INTERPRETING: => if False:
triton-validate-float64 | triton/__init__ | {I} -k "need or float64" ~ if tiles.img.dtype == torch.float64: => if False:
"""


Mutant = namedtuple("Mutant", "name path tests every changes")      # changes: [(old, new)]


def parse(table: str = TABLE) -> list:
    out = []
    for line in table.strip().splitlines():
        head, _, change = ("", "", line[2:]) if line.startswith("~ ") else line.partition(" ~ ")
        if head:
            name, path, tests, *every = (f.strip() for f in head.split(" | "))
            if out and not out[-1].changes:
                out[-1].changes.extend(out[-2].changes)
            out.append(Mutant(name, FILES[path], shlex.split(tests.format(**TESTS)), every == ["every"], []))
        if change:
            old, _, new = change.partition(" =>")
            out[-1].changes.append((old.replace("\\n", "\n"), new[1:].replace("\\n", "\n")))
    return out


MUTANTS = parse()


def sync_copy(work: Path) -> None:
    """Copy the tree's changed files into ``work`` (a new mtime: rebuilt), remove those gone; build outputs stay."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    files = {p for p in out.decode().split("\0") if p and (ROOT / p).is_file()}
    for rel in files:
        if not (work / rel).exists() or (work / rel).read_bytes() != (ROOT / rel).read_bytes():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, work / rel)
    for path in work.rglob("*"):
        rel = path.relative_to(work).as_posix()
        if path.is_file() and rel not in files and not (rel.startswith(("build/", ".git/")) or "__pycache__" in rel
                                                        or rel.endswith(".so")):
            path.unlink()


def _env(work: Path, mutant: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DRRHO_MUTANT"}
    return dict(env, PYTHONPATH=str(work) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONDONTWRITEBYTECODE="1",
                **({"DRRHO_MUTANT": mutant} if mutant else {}))


def apply(root: Path, m: Mutant, schema: bool = False, write: bool = True) -> str | None:
    """The original text of ``m``'s file under ``root``, after writing ``m`` into it (``write``); None if stale."""
    text = original = (root / m.path).read_text()
    for old, new in m.changes:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new.replace("{on}", f'drrho_mutant_on("{m.name}")') if schema else new)
    if write:
        (root / m.path).write_text(text)
    return original


def build_cpp(work: Path, cpp_mutants: list, log) -> str | None:
    """Build the extension in the copy with the C++ mutants' schema (the next sync restores the source); None on
    success, else the reason."""
    path = work / FILES["cpp"]
    path.write_text(path.read_text().replace("namespace drrho::cpu {", CPP_HELPER + "namespace drrho::cpu {", 1))
    if any(apply(work, m, schema=True) is None for m in cpp_mutants):
        return "a C++ mutant is stale in the copy"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work,
                          env=dict(_env(work), DRRHO_KERNELS_BUILD_CPP="1"), capture_output=True, text=True)
    log(f"  C++ build in the copy: {time.monotonic() - start:.0f} s, exit {proc.returncode}")
    return None if proc.returncode == 0 else "the C++ build failed:\n" + (proc.stdout + proc.stderr)[-3000:]


def run_pytest(work: Path, args: list, mutant: str | None = None, stop_first: bool = False, timeout: float = 400):
    """``(exit code or "timeout", output, failed test ids, {outcome: count}, seconds)`` of pytest in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", "-W",
           "ignore::pytest.PytestUnraisableExceptionWarning", *(["-x"] if stop_first else []), *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=work, env=_env(work, mutant), capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout)
    last = out.strip().splitlines()[-1:] or [""]
    counts = {w.rstrip("s"): int(n) for n, w in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last[0])}
    return rc, out, re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M), counts, time.monotonic() - start


def run_mutant(work: Path, m: Mutant, cpp_ready: bool) -> dict:
    """``{status, killer (the first failing test), detail, seconds}``."""
    if apply(ROOT, m, write=False) is None:
        return dict(status="STALE", detail="anchor not found exactly once in the working tree")
    if m.path.endswith(".cpp") and not cpp_ready:
        return dict(status="ERROR", detail="the C++ extension did not build in the copy")
    original = None if m.path.endswith(".cpp") else apply(work, m)
    try:
        rc, out, failed, counts, seconds = run_pytest(work, m.tests, original is None and m.name, not m.every)
    finally:
        if original is not None:
            (work / m.path).write_text(original)
    r = dict(seconds=seconds)
    if rc == 1 and failed and not (m.every and counts.get("passed")):
        return dict(r, status="KILLED", killer=" ".join(failed) if m.every else failed[0])
    if (rc == 1 and failed) or (rc == 0 and counts.get("passed")):
        return dict(r, status="SURVIVED", detail=f"{counts.get('passed')} passed, {counts.get('skipped', 0)} skipped")
    return dict(r, status="ERROR", detail=f"pytest exit {rc} ({counts}):\n" + "\n".join(out.strip().splitlines()[-15:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", nargs="+", metavar="PATTERN", help="mutants whose name matches (fnmatch)")
    ap.add_argument("--fresh", action="store_true", help="delete the copy first (full C++ rebuild)")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or any(fnmatch.fnmatch(m.name, p) for p in a.only)]
    for m in chosen if a.list else ():
        stale = " (STALE)" if apply(ROOT, m, write=False) is None else ""
        print(f"{m.name:34s} {m.path}{stale}\n    pytest {shlex.join(m.tests)}")
    if a.list or not chosen:
        return 0 if chosen else 2
    start, log = time.monotonic(), lambda s: print(s, flush=True)
    work = Path(tempfile.gettempdir()) / "drrho_kernels_mutants" / hashlib.sha1(bytes(ROOT)).hexdigest()[:10]
    if a.fresh and work.exists():
        shutil.rmtree(work)
    log(f"mutants: {len(chosen)}; copy of {ROOT} in {work}")
    sync_copy(work)
    probe = subprocess.run([sys.executable, "-c", "import drrho_kernels; print(drrho_kernels.__file__)"], cwd=work,
                           env=_env(work), capture_output=True, text=True)
    if not probe.stdout.strip().startswith(str(work)):
        log(f"the copy's package is not the one imported: {probe.stdout}{probe.stderr}")
        return 2
    failure = build_cpp(work, [m for m in chosen if m.path.endswith(".cpp") and apply(ROOT, m, write=False)], log)
    log(failure or "")
    results = []
    for i, m in enumerate(chosen, 1):
        results.append((m, r := run_mutant(work, m, failure is None)))
        log(f"{i:3d} {m.name}: {r['status']} in {r.get('seconds', 0):.0f} s, "
            f"{r.get('killer') or r.get('detail', '').splitlines()[0]}")
    kills = [r for _, r in results if r["status"] == "KILLED"]      # the killing tests on the unmutated copy
    ids = sorted({t for r in kills for t in r["killer"].split()})
    rc, out, failing, counts, seconds = run_pytest(work, ids) if ids else (0, "", [], {}, 0)
    log(f"confirmation: {len(ids)} killing tests on the unmutated copy in {seconds:.0f} s: {counts}")
    for r in kills:
        r["confirmed"] = rc in (0, 1) and not set(r["killer"].split()) & set(failing)
    bad = [(m, r) for m, r in results if r["status"] != "KILLED" or not r["confirmed"]]
    for m, r in bad:
        log(f"\n--- {m.name}: {r['status']}{' (UNCONFIRMED: the test fails unmutated)' * (r['status'] == 'KILLED')}"
            f"\n{r.get('detail', '')}")
    log(f"\n{len(results) - len(bad)} of {len(results)} mutants killed (and confirmed); "
        f"{sum(r['status'] == 'SURVIVED' for _, r in results)} survived; {time.monotonic() - start:.0f} s in all")
    return int(bool(bad))


if __name__ == "__main__":
    sys.exit(main())
