"""GPU readiness without a GPU: each Triton kernel variant compiled ahead of time at its default tile,
and the float32 dot precision of each target.

``python -m benchmarks.aot_report --default-tiles`` (in a subprocess: this session interprets the kernels,
conftest sets ``TRITON_INTERPRET=1``) compiles every variant of ``benchmarks.kernels.VARIANTS`` (the
forward, the one-process forward's margin, tile and merge kernels, the backward rows with and without
fold and columns) on each path of a step: plain, per-sample outputs (the EXTRA forward) and distillation
(EXTRA forward, DISTILL backward); in bfloat16 and float32; for NVIDIA sm_80, sm_90, sm_100
(``GPUTarget("cuda", cc, 32)``) and AMD gfx942 (``GPUTarget("hip", "gfx942", 64)``); each at the first
candidate of ``tiles.candidates``, what runs without autotuning (the float32 EXTRA one-process forward
has none on sm_80 / sm_90: the general forward runs there, ``tiles.transposed_forward_runs``). About 100
compiles: under 3 minutes on 2 cores with a cold Triton cache, seconds with a warm one. Asserted: it
compiles; no spills (NVIDIA: cuobjdump's LOCAL = STACK = 0; AMD: no scratch); shared memory / LDS within
the architecture's limit; the matrix instructions in every kernel with a dot (mma.sync, wgmma, tcgen05,
MFMA of the input dtype); float32 dots at the chosen precision, never plain tf32. The limits are stated
here, not read from the report. The full reports (every candidate, dtype and width) are made by the tool
when the kernels change (docs/RESULTS.md); nothing here reads or hashes them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from benchmarks import aot_report, harness, kernels  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

ARCHS = {"sm_80": 80, "sm_90": 90, "sm_100": 100, "gfx942": "gfx942"}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
WIDTH = (768, 512)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024, "gfx942": 64 * 1024}
MATRIX_INSTR = {"sm_80": "mma.sync", "sm_90": "wgmma.mma_async", "sm_100": "tcgen05.mma", "gfx942": "v_mfma_"}
NO_DOT = {"fwd_t_margin", "fwd_t_merge", "fwd_t_merge_extra", "fwd_merge", "fwd_merge_extra"}   # [B] passes
AMD_VGPRS_PER_LANE = 512          # ArchVGPRs + AGPRs, one unified file on CDNA3
MFMA_INPUT = {"bf16": "bf16", "fp16": "f16"}      # the v_mfma_*_<input> of each half dtype
FP32_MFMA_INPUT = {"bf16x3": "bf16", "bf16x6": "bf16", "ieee": "f32"}
STUDY = REPO / "benchmarks" / "results" / "precision_study.json"
UNAVAILABLE = {label: aot_report.unavailable(arch) for label, arch in ARCHS.items()}


def _study() -> dict:
    return json.loads(STUDY.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    archs = [label for label, why in UNAVAILABLE.items() if why is None]
    if not archs:
        pytest.skip(f"this Triton compiles for none of {list(ARCHS)}: {UNAVAILABLE}")
    out = harness.results_dir(tmp_path_factory.mktemp("aot"), "aot") / "triton_aot_default_tiles.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_report", "--default-tiles", "--archs", *archs,
                           "--dtypes", *DTYPES, "--widths", f"{WIDTH[0]}:{WIDTH[1]}", "--workers", "2",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"aot_report produced no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    data.update(stdout=proc.stdout, stderr=proc.stderr, seconds=time.perf_counter() - t0)
    print(f"{data['compiles']} compiles in {data['seconds']:.0f} s")
    return data


def _rows(report, arch):
    if UNAVAILABLE[arch]:
        pytest.skip(UNAVAILABLE[arch])
    rows = [r for r in report["rows"] if r["arch"] == arch]
    assert rows, f"no kernels compiled for {arch}"
    errors = [f"{_label(r)}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    return rows


def _label(r) -> str:
    return f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']}"


def test_every_variant_of_every_path_compiles_at_its_default_tile(report):
    """One row per (variant, dtype, target): its first candidate; the only variant without one is the
    float32 EXTRA one-process forward on sm_80 / sm_90, where the general forward runs instead."""
    import torch
    from drrho_kernels.backends.triton import tiles
    expected, empty = set(), set()
    for label, arch in ARCHS.items():
        for name, v in kernels.VARIANTS.items():
            for dt, dtype in DTYPES.items():
                cands = v.candidates(*WIDTH, getattr(torch, dtype), arch)
                if cands:
                    expected.add((name, dt, label, cands[0].name))
                else:
                    empty.add((name, dt, label))
    assert empty == {("fwd_t_extra", "fp32", "sm_80"), ("fwd_t_extra", "fp32", "sm_90")}
    assert not any(tiles.transposed_forward_runs(torch.float32, a, True) for a in (80, 90))
    got = {(r["kernel"], r["dtype"], r["arch"], r["config"]) for r in report["rows"]}
    assert got == {e for e in expected if not UNAVAILABLE[e[2]]}
    assert len(report["rows"]) == report["compiles"] == len(got)
    for path, roles in kernels.PATHS.items():            # every path's kernels are among them
        assert set(roles.values()) <= {r["kernel"] for r in report["rows"]}, path
    assert {r["kernel"] for r in report["rows"] if not r["has_dot"]} == NO_DOT
    errors = [f"{_label(r)}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    prov = report["provenance"]
    assert prov["triton"] == triton.__version__ and prov["gpu"] is None and prov["commit"] and prov["date"]
    assert prov["widths"] == [list(WIDTH)]


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(report, arch):
    """NVIDIA: LOCAL = STACK = 0. AMD: no scratch (spilled registers or stack in memory); VGPRs LLVM parked
    in AGPRs (a register move on CDNA3, no memory) need AGPRs to hold them."""
    rows = _rows(report, arch)
    if arch.startswith("gfx"):
        bad = [f"{_label(r)}: scratch {r['spill_bytes']} B, {r['vgpr_spill_count']} VGPRs spilled, {r['agprs']} AGPRs"
               for r in rows if r["spill_bytes"] or r["vgpr_spill_count"] > r["agprs"]]
    else:
        bad = [f"{_label(r)}: {r['registers']} registers, LOCAL {r['local_bytes']} B, STACK {r['stack_bytes']} B"
               for r in rows if r["local_bytes"] or r["stack_bytes"]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_within_limit(report, arch):
    bad = [f"{_label(r)}: {r['shared_bytes']} B" for r in _rows(report, arch) if r["shared_bytes"] > SHARED_LIMIT[arch]]
    assert not bad, "\n".join(bad)


def _mfma_inputs(instrs) -> set:
    """Input types of MFMA instructions: v_mfma_f32_32x32x8_bf16 (gfx942), v_mfma_f32_32x32x2_f32 -> bf16, f32."""
    out = set()
    for i in instrs:
        m = re.fullmatch(r"v_mfma_[a-z0-9]+_\d+x\d+x\d+_?([a-z0-9]+?)(?:_1k)?", i)
        assert m, f"unparsed MFMA instruction {i}"
        out.add(m.group(1))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_matrix_instructions_in_every_kernel_with_a_dot(report, arch):
    """mma.sync (sm_80), wgmma (sm_90), tcgen05 (sm_100), MFMA (gfx942) in every kernel with a dot; on AMD
    those of the input dtype (float32: of the precision the study chose)."""
    rows = [r for r in _rows(report, arch) if r["has_dot"]]
    assert {r["kernel"] for r in rows} == set(kernels.VARIANTS) - NO_DOT
    bad = [f"{_label(r)}: {r['mma_instrs']}" for r in rows
           if not r["mma_count"] or not all(i.startswith(MATRIX_INSTR[arch]) for i in r["mma_instrs"])]
    assert not bad, f"no {MATRIX_INSTR[arch]} instruction in:\n" + "\n".join(bad)
    if arch.startswith("gfx"):
        fp32 = FP32_MFMA_INPUT[_study()["choice"][arch]["chosen"]]
        wrong = [f"{_label(r)}: {r['mma_instrs']}" for r in rows
                 if _mfma_inputs(r["mma_instrs"]) != {MFMA_INPUT.get(r["dtype"], fp32)}]
        assert not wrong, "matrix-core inputs other than the dtype's:\n" + "\n".join(wrong)


def test_float32_dots_at_the_chosen_precision(report):
    """NVIDIA: tf32x3 (three TF32 products, float32-level accuracy); AMD: the precision study's choice;
    never plain tf32."""
    choice = {t: c["chosen"] for t, c in _study()["choice"].items()}
    want = {arch: choice[arch] if arch.startswith("gfx") else "tf32x3" for arch in ARCHS}
    rows = [r for r in report["rows"] if r["dtype"] == "fp32" and r["has_dot"] and "error" not in r]
    assert {r["arch"] for r in rows} == {a for a in ARCHS if not UNAVAILABLE[a]}
    bad = [f"{_label(r)}: {r['fp32_dot_precision']} (want {want[r['arch']]})" for r in rows
           if r["fp32_dot_precision"] != [want[r["arch"]]] or "tf32" in r["fp32_dot_precision"]]
    assert not bad, "\n".join(bad)
    assert {a: p for a, p in report["fp32_precision"].items()} == {a: want[a] for a in report["archs"]}


def test_amd_registers_fit_the_workgroup(report):
    """VGPRs (AGPRs included) per lane times the waves each SIMD holds of one workgroup <= 512, wavefront 64."""
    rows = _rows(report, "gfx942")
    bad = [f"{_label(r)}: {r['registers']} VGPRs x {-(-r['num_warps'] // 4)} waves per SIMD, wave {r['wavefront_size']}"
           for r in rows if r["registers"] * -(-r["num_warps"] // 4) > AMD_VGPRS_PER_LANE or r["wavefront_size"] != 64]
    assert not bad, "\n".join(bad)


def test_the_tool_agrees_and_states_its_fp_contraction(report):
    """The tool's own verdict (``aot_report.problems``) finds nothing either, and every compile states its FMA
    contraction (launch.FP_FUSION): Triton's warning about its default flipping in 3.10 never fires."""
    bad = [f"{_label(r)}: {r['problems']}" for r in report["rows"] if r["problems"]]
    assert not bad, "\n".join(bad)
    assert "TRITON_DEFAULT_FP_FUSION" not in report["stderr"]


def test_amd_tables_cover_every_generation():
    """Every kernel keeps a candidate per dtype family and AMD generation; workgroups <= 1024 lanes;
    a gfx name reaches the AMD tables (target features ignored), an unknown one cdna2's."""
    import torch
    from drrho_kernels.backends.triton import tiles
    for kernel in ("fwd", "fwdt", "bwd"):
        for fam in ("half", "fp32"):
            for gen in ("cdna2", "cdna3", "cdna4"):
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
# The float32 precision study: retired (git show 82830af:benchmarks/precision_study.py restores it); its
# figures stay in benchmarks/results/precision_study.json, its choice in launch.FP32_PRECISION_AMD.

def test_precision_study_figures_and_choice():
    """The committed figures: every precision at every case and scale, and on the float32 conformance
    suite; plain tf32 fails SPEC's 1e-4, tf32x3 (NVIDIA) and the AMD choices meet it with the study's
    margin and pass the whole suite; the choice recomputed from the figures (of the precisions the target's
    Triton backend accepted, those within tolerance / margin that fail no conformance case, the fastest by
    kernels.fp32_dot_flops) is the committed one, and launch.py implements it."""
    from drrho_kernels.backends.triton import launch
    data = _study()
    rows, tol = data["rows"], data["tolerance"] / data["margin"]
    precisions = ("ieee", "tf32", "tf32x3", "bf16x3", "bf16x6")
    assert (data["tolerance"], data["margin"]) == (1e-4, 4.0)
    cases = {(r["case"], r["scale"]) for r in rows}
    assert len(cases) == 6 and {r["case"] for r in rows} == {"single-B256", "dist-B128-N512", "single-B128-distill"}
    for prec in precisions:
        assert {(r["case"], r["scale"]) for r in rows if r["precision"] == prec} == cases, prec
    assert all(r["emulated_dots"] > 0 for r in rows)
    worst = {p: max(r["worst"] for r in rows if r["precision"] == p) for p in precisions}
    assert worst["tf32"] > data["tolerance"] and worst["tf32x3"] <= tol and worst["ieee"] <= tol
    suite = data["conformance"]
    assert set(suite) == set(precisions) and all(c["emulated_dots"] > 0 for c in suite.values())
    assert suite["tf32"]["failures"] and not suite["tf32x3"]["failures"] and not suite["ieee"]["failures"]
    for target in kernels.FAMILIES["amd"]:
        options = data["choice"][target]["options"]          # the precisions its Triton backend accepted
        ok = [p for p in options if worst[p] <= tol and not suite[p]["failures"]
              and kernels.fp32_dot_flops(target, p) is not None]
        chosen = max(ok, key=lambda p: (kernels.fp32_dot_flops(target, p), -worst[p]))
        assert chosen == data["choice"][target]["chosen"] == launch.FP32_PRECISION_AMD[target]
        assert chosen == launch.fp32_precision(target)
    assert launch.fp32_precision(90) == launch.FP32_PRECISION_NVIDIA == "tf32x3"
