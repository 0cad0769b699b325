"""GPU readiness without a GPU: every Triton kernel compiled ahead of time for sm_80, sm_90, sm_100
and for AMD gfx90a, gfx942, gfx950; the float32 dot precision of each target.

``benchmarks/aot_report.py`` compiles each kernel variant (forward; the one-process forward's margin,
tile and merge kernels; backward rows with and without fold; backward columns) at every autotuning
candidate of ``tiles.candidates`` for each architecture and dtype (bf16, fp16, fp32), with
``triton.compile`` on an ``ASTSource`` and a ``GPUTarget``; it runs in a subprocess because this test
session interprets the kernels (conftest sets ``TRITON_INTERPRET=1``). The assertions: it compiles; no
register spills (``cuobjdump --dump-resource-usage`` reports LOCAL = STACK = 0); shared memory within
the architecture's per-block limit; tensor-core instructions present (mma.sync on sm_80, wgmma on
sm_90, tcgen05 on sm_100) in every kernel with a dot (all but the margin and merge kernels, which are
[B]-sized memory passes); float32 dots in tf32x3 (or ieee), never plain tf32.

AMD (``--family amd``, skipped when Triton's AMD backend is unavailable): every candidate of the
cdna2/3/4 tables compiles for its target with wavefront 64; no spills to memory (the assembly's
``.private_segment_fixed_size``, scratch, is 0; VGPRs parked in AGPRs, a register move, are allowed); VGPRs within the
unified 512 per lane for the workgroup's waves; LDS within 64 KiB (160 KiB on gfx950); MFMA
instructions of the input dtype in every kernel with a dot; float32 dots at the precision the
precision study chose for the target, never tf32; every kernel keeps a candidate per dtype family
and AMD generation. The launch wiring on ROCm (gfx names from ``gcnArchName``, the AMD tables, the
AMD precision) and the precision study (committed figures, the emulated dot) are checked without a GPU.

The tables go to temporary files here; ``python -m benchmarks.aot_report --family all`` writes the
committed ``benchmarks/results/triton_aot_<triton version>.json`` and ``triton_aot_amd_<version>.json``.
The session compiles at d = 768, dr = 512 only (217 NVIDIA and 297 AMD compiles; a cold Triton cache
costs minutes per family on 2 cores, a warm one, ``~/.triton/cache``, seconds); the committed reports,
at every width of ``aot_report.WIDTHS``, are checked statically (``test_committed_report``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90", "sm_100")
AMD_ARCHS = ("gfx90a", "gfx942", "gfx950")
VARIANTS = {"fwd", "fwd_extra", "fwd_t_margin", "fwd_t", "fwd_t_extra", "fwd_t_merge", "fwd_t_merge_extra",
            "bwd_row_fold", "bwd_row", "bwd_col", "bwd_row_fold_distill", "bwd_row_distill", "bwd_col_distill"}
NO_DOT = {"fwd_t_margin", "fwd_t_merge", "fwd_t_merge_extra"}


def _toolchain_missing() -> str | None:
    sys.path.insert(0, str(REPO))
    from benchmarks.aot_report import nvidia_unavailable
    return nvidia_unavailable()


def _amd_missing() -> str | None:
    sys.path.insert(0, str(REPO))
    from benchmarks.aot_report import amd_unavailable
    return amd_unavailable()


nvidia = pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))
amd = pytest.mark.skipif(_amd_missing() is not None, reason=str(_amd_missing()))


def _run_report(out: Path, *args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_report", *args, "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"aot_report produced no table (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    data["stdout"], data["stderr"] = proc.stdout, proc.stderr
    return data


# The session compiles at one width (the first of aot_report.WIDTHS, d = 768, dr = 512), stated here so
# that its cost does not grow with WIDTHS; the committed reports cover every width, and
# test_committed_report checks them statically.
SESSION_WIDTH = (768, 512)


def _width_args() -> tuple[str, ...]:
    return ("--widths", f"{SESSION_WIDTH[0]}:{SESSION_WIDTH[1]}")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return _run_report(tmp_path_factory.mktemp("aot") / "triton_aot.json", *_width_args())


@pytest.fixture(scope="module")
def amd_report(tmp_path_factory) -> dict:
    return _run_report(tmp_path_factory.mktemp("aot_amd") / "triton_aot_amd.json", "--family", "amd",
                       *_width_args())


def _rows(report, arch):
    rows = [r for r in report["rows"] if r["arch"] == arch]
    assert rows, f"no kernels compiled for {arch}"
    return rows


def _label(r) -> str:
    return f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']}"


@nvidia
def test_every_candidate_compiled(report):
    sys.path.insert(0, str(REPO))
    from benchmarks.aot_report import jobs
    expected = {(v, dt, f"sm_{cc}", t.name, d, dr) for v, dt, cc, t, d, dr in jobs(widths=(SESSION_WIDTH,))}
    got = {(r["kernel"], r["dtype"], r["arch"], r["config"], r["D"], r["DR"]) for r in report["rows"]}
    assert got == expected
    assert report["widths"] == [list(SESSION_WIDTH)]
    errors = [f"{_label(r)}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    variants = {r["kernel"] for r in report["rows"]}
    assert variants == VARIANTS
    assert {r["kernel"] for r in report["rows"] if not r["has_dot"]} == NO_DOT
    assert {r["dtype"] for r in report["rows"]} == {"bf16", "fp16", "fp32"}


@nvidia
@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(report, arch):
    bad = [f"{_label(r)}: {r['registers']} registers, LOCAL {r['spill_local_bytes']} B, STACK {r['stack_bytes']} B"
           for r in _rows(report, arch) if "error" not in r and (r["spill_local_bytes"] or r["stack_bytes"])]
    assert not bad, "\n".join(bad)


@nvidia
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_within_limit(report, arch):
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024}[arch]
    bad = [f"{_label(r)}: {r['shared_bytes']} B" for r in _rows(report, arch)
           if "error" not in r and r["shared_bytes"] > limit]
    assert not bad, "\n".join(bad)


@nvidia
@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_cores_used(report, arch):
    instr = {"sm_80": "mma_sync_count", "sm_90": "wgmma_count", "sm_100": "tcgen05_count"}[arch]
    bad = [_label(r) for r in _rows(report, arch) if "error" not in r and r["has_dot"] and r[instr] == 0]
    assert not bad, f"no {instr[:-6]} instruction in:\n" + "\n".join(bad)


@nvidia
def test_float32_dots_are_tf32x3_or_ieee(report):
    rows = [r for r in report["rows"] if r["dtype"] == "fp32" and "error" not in r and r["has_dot"]]
    assert rows
    bad = [f"{_label(r)}: {r['fp32_dot_precision']}" for r in rows
           if not r["fp32_dot_precision"] or set(r["fp32_dot_precision"]) - {"tf32x3", "ieee"}]
    assert not bad, "\n".join(bad)


@nvidia
def test_floating_point_contraction_is_stated(report):
    """Every compile states its FMA contraction (launch.FP_FUSION): Triton's warning about its default
    flipping in 3.10 never fires, with TRITON_DEFAULT_FP_FUSION unset."""
    assert "TRITON_DEFAULT_FP_FUSION" not in report["stderr"]


# ----------------------------------------------------------------------------------------------
# The committed reports (benchmarks/results/triton_aot_<version>.json, triton_aot_amd_<version>.json):
# read, not compiled, so they cost nothing here; they cover every width of aot_report.WIDTHS.

def _committed(name: str) -> dict:
    path = REPO / "benchmarks" / "results" / f"{name}_{triton.__version__}.json"
    if not path.exists():
        pytest.skip(f"no committed report {path.name} for the installed triton {triton.__version__} "
                    f"(python -m benchmarks.aot_report --family all writes it)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("family", ["nvidia", "amd"])
def test_committed_report(family):
    """The committed report of the installed Triton: every job of ``aot_report.jobs()`` (each variant,
    dtype, target and candidate of the current tables) at every width of ``WIDTHS``, each compiled
    without errors and meeting every requirement (``aot_report.problems``, recomputed here: no spills,
    shared memory / LDS within limits, tensor-core or matrix-core instructions in every kernel with a
    dot, the float32 dot precision), made by this Triton from the current sources (the provenance's
    SHA-256 of ``aot_report.SOURCES``): a table or kernel change without a new report fails here."""
    sys.path.insert(0, str(REPO))
    from benchmarks import aot_report as ar
    data = _committed({"nvidia": "triton_aot", "amd": "triton_aot_amd"}[family])
    archs = ar.FAMILIES[family]
    assert data["triton"] == triton.__version__
    # The AMD reports were not regenerated with the widths: they are the earlier single-width format
    # (top-level D, DR = 768, 512, no provenance, the merge rows with D = 768); they are accepted at
    # their one width until regenerated (python -m benchmarks.aot_report --family amd).
    legacy = family == "amd" and "widths" not in data
    widths = ((data["D"], data["DR"]),) if legacy else ar.WIDTHS
    assert legacy or data["widths"] == [list(w) for w in ar.WIDTHS]

    def key(v, dt, arch, name, d, dr):
        return (v, dt, arch, name) if legacy else (v, dt, arch, name, d, dr)
    expected = {key(v, dt, ar.arch_label(cc), t.name, d, dr) for v, dt, cc, t, d, dr in ar.jobs(archs, widths=widths)}
    got = [key(r["kernel"], r["dtype"], r["arch"], r["config"], r["D"], r["DR"]) for r in data["rows"]]
    assert len(got) == len(set(got)) == data.get("compiles", len(got))
    assert set(got) == expected, (f"missing {sorted(expected - set(got), key=str)[:10]}, "
                                  f"extra {sorted(set(got) - expected, key=str)[:10]}")
    bad = [f"{_label(r)} D={r['D']}: {'; '.join(ar.problems(r))}" for r in data["rows"] if ar.problems(r)]
    assert not bad, "\n".join(bad)
    assert not any(r["problems"] for r in data["rows"])
    dots = [r for r in data["rows"] if r["has_dot"]]
    assert dots and all(r["mma_count" if family == "nvidia" else "mfma_count"] > 0 for r in dots)
    if legacy:
        pytest.skip(f"{family} report of triton {triton.__version__} is in the single-width format without "
                    "provenance (d = 768 only, no sources_sha256 to check): its rows were checked against the "
                    "current tables; regenerate it with python -m benchmarks.aot_report --family amd")
    prov = data["provenance"]
    assert prov["gpu"] is None and prov["triton"] == triton.__version__
    assert prov["sources_sha256"] == ar.provenance()["sources_sha256"], (
        f"{family} report is stale: {ar.SOURCES} changed since it was made; regenerate it")


# ----------------------------------------------------------------------------------------------
# AMD: gfx90a (MI250X, CDNA2), gfx942 (MI300X, CDNA3), gfx950 (MI355X, CDNA4), wavefront 64

# Stated here, not read from the report, so that a wrong limit in the report fails the test.
AMD_LDS_LIMIT = {"gfx90a": 64 * 1024, "gfx942": 64 * 1024, "gfx950": 160 * 1024}
AMD_VGPRS_PER_LANE = 512          # ArchVGPRs + AGPRs, one unified file on CDNA2-4
AMD_GENERATIONS = {"gfx90a": "cdna2", "gfx942": "cdna3", "gfx950": "cdna4"}
MFMA_INPUT = {"bf16": "bf16", "fp16": "f16"}      # the v_mfma_*_<input> of each half dtype
FP32_MFMA_INPUT = {"bf16x3": "bf16", "bf16x6": "bf16", "ieee": "f32"}


def _mfma_inputs(instrs) -> set:
    """Input types of MFMA instructions: v_mfma_f32_32x32x8bf16_1k (gfx90a), v_mfma_f32_32x32x8_bf16
    (gfx942), v_mfma_f32_32x32x2_f32 -> bf16, bf16, f32."""
    import re
    out = set()
    for i in instrs:
        m = re.fullmatch(r"v_mfma_[a-z0-9]+_\d+x\d+x\d+_?([a-z0-9]+?)(?:_1k)?", i)
        assert m, f"unparsed MFMA instruction {i}"
        out.add(m.group(1))
    return out
STUDY = REPO / "benchmarks" / "results" / "precision_study.json"


def _amd_rows(report, arch):
    rows = [r for r in report["rows"] if r["arch"] == arch]
    assert rows, f"no kernels compiled for {arch}"
    return rows


def _study() -> dict:
    return json.loads(STUDY.read_text())


@amd
def test_amd_every_candidate_compiled(amd_report):
    sys.path.insert(0, str(REPO))
    from benchmarks.aot_report import AMD_ARCHS as REPORT_ARCHS, jobs
    assert tuple(REPORT_ARCHS) == AMD_ARCHS
    expected = {(v, dt, cc, t.name, d, dr) for v, dt, cc, t, d, dr in jobs(AMD_ARCHS, widths=(SESSION_WIDTH,))}
    got = {(r["kernel"], r["dtype"], r["arch"], r["config"], r["D"], r["DR"]) for r in amd_report["rows"]}
    assert got == expected
    errors = [f"{_label(r)}: {r['error']}" for r in amd_report["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert {r["kernel"] for r in amd_report["rows"]} == VARIANTS
    assert {r["dtype"] for r in amd_report["rows"]} == {"bf16", "fp16", "fp32"}
    assert all(r["wavefront_size"] == 64 for r in amd_report["rows"])


@amd
@pytest.mark.parametrize("arch", AMD_ARCHS)
def test_amd_no_spills_to_memory(amd_report, arch):
    """No scratch (the private segment holds spilled registers and stack); VGPRs LLVM parked in AGPRs
    (a register move on CDNA2-4, no memory) need AGPRs to hold them."""
    rows = [r for r in _amd_rows(amd_report, arch) if "error" not in r]
    bad = [f"{_label(r)}: {r['vgprs']} VGPRs, scratch {r['scratch_bytes']} B, {r['vgpr_spill_count']} VGPRs spilled"
           for r in rows if r["scratch_bytes"] or r["vgpr_spill_count"] > r["agprs"]]
    assert not bad, "\n".join(bad)


@amd
@pytest.mark.parametrize("arch", AMD_ARCHS)
def test_amd_registers_fit_the_workgroup(amd_report, arch):
    """VGPRs (AGPRs included) per lane times the waves each SIMD holds of one workgroup <= 512."""
    bad = [f"{_label(r)}: {r['vgprs']} VGPRs x {-(-r['num_warps'] // 4)} waves per SIMD"
           for r in _amd_rows(amd_report, arch)
           if "error" not in r and r["vgprs"] * -(-r["num_warps"] // 4) > AMD_VGPRS_PER_LANE]
    assert not bad, "\n".join(bad)


@amd
@pytest.mark.parametrize("arch", AMD_ARCHS)
def test_amd_lds_within_limit(amd_report, arch):
    bad = [f"{_label(r)}: {r['lds_bytes']} B" for r in _amd_rows(amd_report, arch)
           if "error" not in r and r["lds_bytes"] > AMD_LDS_LIMIT[arch]]
    assert not bad, "\n".join(bad)


@amd
@pytest.mark.parametrize("arch", AMD_ARCHS)
def test_amd_matrix_cores_used(amd_report, arch):
    """Every kernel with a dot has v_mfma instructions; half-precision kernels those of their dtype."""
    rows = [r for r in _amd_rows(amd_report, arch) if "error" not in r and r["has_dot"]]
    assert rows
    bad = [_label(r) for r in rows if r["mfma_count"] == 0]
    assert not bad, "no v_mfma instruction in:\n" + "\n".join(bad)
    wrong = [f"{_label(r)}: {r['mfma_instrs']}" for r in rows if r["dtype"] in MFMA_INPUT
             and _mfma_inputs(r["mfma_instrs"]) != {MFMA_INPUT[r["dtype"]]}]
    assert not wrong, "half-precision kernels on other matrix-core inputs:\n" + "\n".join(wrong)


@amd
def test_amd_float32_dots_at_the_studied_precision(amd_report):
    """Float32 dots run the precision the study chose for the target (never tf32, never tf32x3, which
    the AMD backend rejects), and their MFMA instructions are those of that precision."""
    choice = {t: c["chosen"] for t, c in _study()["choice"].items()}
    rows = [r for r in amd_report["rows"] if r["dtype"] == "fp32" and "error" not in r and r["has_dot"]]
    assert {r["arch"] for r in rows} == set(AMD_ARCHS)
    bad = [f"{_label(r)}: {r['fp32_dot_precision']} (study: {choice[r['arch']]})" for r in rows
           if r["fp32_dot_precision"] != [choice[r["arch"]]] or "tf32" in r["fp32_dot_precision"]]
    assert not bad, "\n".join(bad)
    wrong = [f"{_label(r)}: {r['mfma_instrs']}" for r in rows
             if _mfma_inputs(r["mfma_instrs"]) != {FP32_MFMA_INPUT[choice[r["arch"]]]}]
    assert not wrong, "\n".join(wrong)
    assert amd_report["fp32_precision"] == choice


@amd
def test_amd_report_states_its_fp_contraction(amd_report):
    assert "TRITON_DEFAULT_FP_FUSION" not in amd_report["stderr"]


def test_amd_tables_cover_every_generation():
    """Every kernel keeps a candidate per dtype family and AMD generation; workgroups <= 1024 lanes;
    a gfx name reaches the AMD tables (target features ignored), an unknown one cdna2's."""
    import torch
    from drrho_kernels.backends.triton import tiles
    for kernel in ("fwd", "fwdt", "bwd"):
        for fam in ("half", "fp32"):
            for gen in AMD_GENERATIONS.values():
                table = tiles.TABLES[kernel].get((fam, gen))
                assert table, f"{kernel} {fam} {gen}: no candidate"
                assert all(1 <= t.num_warps <= 16 for t in table)
    assert tiles.generation("gfx942:sramecc+:xnack-") == "cdna3" and tiles.generation("gfx90a") == "cdna2"
    assert tiles.generation("gfx950") == "cdna4" and tiles.generation("gfx1100") == "cdna2"
    assert tiles.candidates("bwd", 768, 512, torch.float32, "gfx942") == \
        [tiles.clamp(t, 768, 512) for t in dict.fromkeys(tiles.TABLES["bwd"]["fp32", "cdna3"])]
    with pytest.raises(ValueError, match="gfx"):
        tiles.generation("sm_90")


def test_rocm_launch_wiring(monkeypatch):
    """On a ROCm build (torch.version.hip) the device is named by its gfx architecture (gcnArchName,
    features removed), the float32 dots get the AMD precision and autotuning the AMD candidates."""
    import types

    import torch
    from drrho_kernels.backends.triton import backward, launch, tiles
    monkeypatch.setattr(torch.version, "hip", "6.3.42131", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: pytest.fail("CUDA-only query"))
    assert launch.device_arch() == "gfx942" and launch.is_amd("gfx942") and not launch.is_amd(90)
    monkeypatch.setattr(launch, "INTERPRETING", False)
    assert launch.dot_flags(torch.float32)["PREC"] == launch.FP32_PRECISION_AMD["gfx942"] != "tf32"
    assert launch.dot_flags(torch.bfloat16)["PREC"] is None
    assert launch.dot_flags(torch.float32, 90)["PREC"] == "tf32x3"
    assert launch.fp32_precision("gfx1100") == launch.FP32_PRECISION_AMD_OTHER == "ieee"
    tuned = launch._tuned(backward._bwd_kernel, "bwd")
    configs = launch._prune("bwd")(tuned.configs, {"p_x": torch.empty(3, 768, dtype=torch.float32)}, D=768, DR=512)
    assert [c.kwargs for c in configs] == [t.meta() for t in tiles.candidates("bwd", 768, 512, torch.float32, "gfx942")]
    assert [c.num_warps for c in configs] == [t.num_warps for t in tiles.candidates("bwd", 768, 512, torch.float32,
                                                                                      "gfx942")]


def test_kernels_import_without_a_device_query():
    """Importing the Triton backend (compiled mode) asks no device anything, and the kernel sources
    carry no NVIDIA-only code (inline PTX, triton.language.extra.cuda)."""
    code = ("import torch, triton\n"
            "def boom(*a, **k):\n    raise AssertionError('device queried at import')\n"
            "for n in ('get_device_capability', 'get_device_properties', 'current_device', 'device_count',"
            " 'set_device', 'synchronize', 'init'):\n    setattr(torch.cuda, n, boom)\n"
            "import drrho_kernels.backends.triton.launch as launch\n"
            "import drrho_kernels.backends.triton.forward, drrho_kernels.backends.triton.backward\n"
            "import drrho_kernels.backends.triton.forward_transposed\n"
            "assert not launch.INTERPRETING\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re
    for path in (REPO / "drrho_kernels" / "backends" / "triton").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"inline_asm|extra\.cuda|extra import cuda|\bnvvm\b", text), path.name


# ----------------------------------------------------------------------------------------------
# The float32 precision study (benchmarks/precision_study.py)

def test_precision_study_figures_and_choice():
    """The committed figures: every precision at every case and scale, and on the float32 conformance
    suite; plain tf32 fails SPEC's 1e-4, tf32x3 (NVIDIA) and the AMD choices meet it with the study's
    margin and pass the whole suite; the choice recomputed from the figures is the committed one, and
    launch.py implements it."""
    sys.path.insert(0, str(REPO))
    from benchmarks import precision_study as ps
    from drrho_kernels.backends.triton import launch
    data = _study()
    rows = data["rows"]
    assert {(r["case"], r["scale"]) for r in rows} == {(c, round(s, 4)) for c in ps.CASES for s in ps.SCALES}
    for prec in ps.PRECISIONS:
        assert len([r for r in rows if r["precision"] == prec]) == len(ps.CASES) * len(ps.SCALES), prec
    assert all(r["emulated_dots"] > 0 for r in rows)
    worst = {p: max(r["worst"] for r in rows if r["precision"] == p) for p in ps.PRECISIONS}
    assert worst["tf32"] > ps.TOLERANCE
    assert worst["tf32x3"] <= ps.TOLERANCE / ps.MARGIN and worst["ieee"] <= ps.TOLERANCE / ps.MARGIN
    assert data["tolerance"] == ps.TOLERANCE and data["margin"] == ps.MARGIN
    suite = data["conformance"]
    assert set(suite) == set(ps.PRECISIONS) and all(c["emulated_dots"] > 0 for c in suite.values())
    assert suite["tf32"]["failures"] and not suite["tf32x3"]["failures"] and not suite["ieee"]["failures"]
    assert {t: c["chosen"] for t, c in ps.choose(rows, suite).items()} == \
        {t: c["chosen"] for t, c in data["choice"].items()}
    for target in AMD_ARCHS:
        chosen = data["choice"][target]["chosen"]
        assert chosen == launch.FP32_PRECISION_AMD[target] == launch.fp32_precision(target)
        assert worst[chosen] <= ps.TOLERANCE / ps.MARGIN and not suite[chosen]["failures"]
        if _amd_missing() is None:
            assert chosen in ps.allowed_precisions(target)
    assert launch.fp32_precision(90) == launch.FP32_PRECISION_NVIDIA == "tf32x3"


def test_emulated_dot():
    """The emulation of each precision: exact on inputs that are bfloat16 numbers (bf16x3, bf16x6),
    TF32 rounding errors of ~2^-11 (tf32), near-float32 errors for the split precisions."""
    import numpy as np
    sys.path.insert(0, str(REPO))
    from benchmarks.precision_study import bf16, emulated_dot, tf32
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 256)) / 16).astype(np.float32)
    b = (rng.standard_normal((256, 48)) / 16).astype(np.float32)
    acc = np.zeros((32, 48), np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)

    def err(p, x=a, y=b, want=exact):
        got = emulated_dot(x, y, acc, p)
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    assert err("ieee") < 1e-6 and err("tf32x3") < 1e-6 and err("bf16x6") < 1e-6
    assert 1e-6 < err("bf16x3") < 2e-5 < 1e-4 < err("tf32") < 2e-3
    ab, bb = bf16(a), bf16(b)
    for p in ("bf16x3", "bf16x6"):
        assert np.array_equal(emulated_dot(ab, bb, acc, p), emulated_dot(ab, bb, acc, "ieee"))
    assert np.array_equal(bf16(np.float32([1 + 2 ** -8, 1 + 3 * 2 ** -8])), np.float32([1, 1 + 2 ** -6]))
    assert tf32(np.float32([1 + 2 ** -11]))[0] == 1.0 and tf32(np.float32([1 + 3 * 2 ** -11]))[0] == 1 + 2 ** -9


def test_emulation_reaches_the_kernels(monkeypatch):
    """A small study in this (interpreter) session: every dot of the kernels goes through the
    emulation, and the errors order as the precisions do."""
    sys.path.insert(0, str(REPO))
    from benchmarks import precision_study as ps
    from drrho_kernels.backends.triton import launch, tiles
    if not launch.interpreting():
        pytest.skip("the study runs the kernels in Triton's interpreter")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("Triton 3.6's interpreter cannot run _fwd_t_kernel (a tensor step in range(): 'only "
                    "0-dimensional arrays can be converted to Python scalars'), with or without the study")
    before = dict(tiles.INTERPRETER_TILES)
    monkeypatch.setitem(ps.CASES, "tiny", (24, None, 64, 1.0))
    rows = ps.study(("tiny",), scales=(100.0,), precisions=("ieee", "tf32", "bf16x3", "bf16x6"),
                    log=lambda *a: None)["rows"]
    assert tiles.INTERPRETER_TILES == before          # the study's tiles are restored
    err = {r["precision"]: r["worst"] for r in rows}
    assert all(r["emulated_dots"] > 0 for r in rows)
    assert max(err["ieee"], err["bf16x6"]) < ps.TOLERANCE / ps.MARGIN
    assert max(err["ieee"], err["bf16x6"]) < err["bf16x3"] < ps.TOLERANCE < err["tf32"]
