// drrho_kernels._C: implements the CPU kernels of the fused DRRho-CLIP op pair.
//
//   drrho::cpp_fwd   CPU kernel: drrho::cpu::fused_fwd
//   drrho::cpp_bwd   CPU kernel: drrho::cpu::fused_bwd
//
// The schemas, fake (meta) implementations and autograd are defined once, on the Python side
// (drrho_kernels/core/ops.py, called by drrho_kernels/backends/cpp.py before this library is imported);
// this file only implements them (a torch::Library of kind IMPL, see register_kernels), so torch.compile
// and torch.library.opcheck see these ops like any other. The dispatcher infers each kernel's schema from
// its C++ signature and refuses to register one that does not match the definition.
//
// The Python module itself only carries build information and the tiling knobs.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/fused_loss.h"
#include "cpu/half_gemm.h"
#include "cpu/vec_loops.h"

namespace {

// The CPU kernels of drrho::cpp_fwd / cpp_bwd, registered when Python asks (drrho_kernels/backends/cpp.py,
// right after defining the ops), not in a static initializer: a build whose signatures do not match
// the schemas defined in Python then raises a RuntimeError at import (and the package falls back to the
// torch backend with a warning) instead of aborting the process.
void register_kernels() {
  static std::unique_ptr<torch::Library> library;
  if (library) return;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "drrho", c10::DispatchKey::CPU, __FILE__,
                                              __LINE__);
  lib->impl("cpp_fwd", &drrho::cpu::fused_fwd);
  lib->impl("cpp_bwd", &drrho::cpu::fused_bwd);
  library = std::move(lib);
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  info["openmp"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = pybind11::none();
#endif
  info["simd"] = drrho::cpu::simd_level();
  info["parallel"] = at::get_parallel_info();
  const auto tiling = drrho::cpu::get_tiling();
  info["chunk_bytes"] = tiling.chunk_bytes;
  info["col_block"] = tiling.col_block;
  info["spread_rows"] = tiling.spread_rows;
  return info;
}

// Which tile products the kernels use for half inputs of `dtype` ("bfloat16" / "float16"), and why
// (decided on first use, once per process: cpu/half_gemm.h).
pybind11::dict choice_dict(const drrho::cpu::HalfGemmChoice& c) {
  pybind11::dict info;
  info["dtype"] = c.dtype;
  info["mode"] = c.mode;
  info["path"] = c.error ? pybind11::object(pybind11::none()) : pybind11::object(pybind11::str(drrho::cpu::half_path_name(c.path)));
  info["error"] = c.error;
  info["reason"] = c.reason;
  pybind11::dict candidates;
  for (const auto& k : c.candidates) {
    pybind11::dict e;
    e["usable"] = k.usable;
    e["note"] = k.note;
    e["self_test_s"] = k.seconds >= 0 ? pybind11::object(pybind11::float_(k.seconds)) : pybind11::object(pybind11::none());
    candidates[k.name.c_str()] = e;
  }
  info["candidates"] = candidates;
  info["cpu_flags"] = c.cpu_flags;
  info["upcast_self_test_s"] =
      c.upcast_seconds >= 0 ? pybind11::object(pybind11::float_(c.upcast_seconds)) : pybind11::object(pybind11::none());
  return info;
}

at::ScalarType half_dtype(const std::string& dtype) {
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "half_gemm_info: dtype: expected 'bfloat16' or 'float16', got '",
              dtype, "'");
  return dtype == "bfloat16" ? at::kBFloat16 : at::kHalf;
}

pybind11::dict half_gemm_info(const std::string& dtype) {
  return choice_dict(drrho::cpu::half_gemm_choice(half_dtype(dtype)));
}

pybind11::dict half_gemm_redecide(const std::string& dtype, const std::string& mode) {
  return choice_dict(drrho::cpu::half_gemm_redecide(half_dtype(dtype), mode));
}

// The kernels' vectorized exponential on a tensor (tests check its accuracy against std::exp).
at::Tensor vexp(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "_vexp: x: expected a CPU float32 or float64 tensor, got ", x.scalar_type(), " on ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (x.scalar_type() == at::kFloat) {
    drrho::cpu::exp_array(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  } else {
    drrho::cpu::exp_array(xc.data_ptr<double>(), y.data_ptr<double>(), xc.numel());
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "DRRho-CLIP fused CPU kernels: register_kernels() implements drrho::cpp_fwd and drrho::cpp_bwd.";
  module.def("register_kernels", &register_kernels,
             "Register the CPU kernels of drrho::cpp_fwd / cpp_bwd (defined on the Python side; once).");
  module.def("tile_scalar_names", &drrho::cpu::tile_scalar_names,
             "The order in which the kernels read the ops' `float[] scalars` (compared with TileInputs at load).");
  module.def("build_info", &build_info,
             "Build and run-time facts: torch version built against, compiler, OpenMP, SIMD level, tiling.");
  module.def(
      "get_tiling",
      []() {
        const auto t = drrho::cpu::get_tiling();
        return pybind11::make_tuple(t.chunk_bytes, t.col_block, t.spread_rows);
      },
      "(chunk_bytes, col_block, spread_rows): bytes of one worker's [R, N] similarity chunk (0: automatic, "
      "4 MiB but at least 128 rows), width of a "
      "column block of the statistics pass, smallest chunk (rows) used to give every thread two chunks.");
  module.def("set_tiling", &drrho::cpu::set_tiling, pybind11::arg("chunk_bytes") = 0,
             pybind11::arg("col_block") = 0, pybind11::arg("spread_rows") = 0,
             "Set the tiling knobs (process-wide; 0 restores a default, spread_rows=-1 turns spreading "
             "off). For tests and tuning.");
  module.def("set_profiling", &drrho::cpu::set_profiling, pybind11::arg("enabled"),
             "Time the kernels' phases (small overhead; for benchmarks).");
  module.def(
      "read_profile",
      [](bool reset) {
        pybind11::dict out;
        for (const auto& [name, seconds] : drrho::cpu::read_profile(reset)) out[name.c_str()] = seconds;
        return out;
      },
      pybind11::arg("reset") = true,
      "Thread seconds per phase since the last reset: similarity_gemm, forward_exp_pass, backward_exp_pass, "
      "weighted_gemm.");
  module.def("_vexp", &vexp, pybind11::arg("x"), "exp as the kernels compute it (for tests).");
  module.def("half_gemm_info", &half_gemm_info, pybind11::arg("dtype"),
             "The tile-product path for half inputs of dtype ('bfloat16' / 'float16'): dict with mode, path "
             "(upcast, brgemm, mkl, emulate; None when the mode asks for one that cannot run), error, reason, "
             "candidates, upcast_self_test_s. Decided once per process on first use "
             "(DRRHO_KERNELS_CPU_HALF_GEMM=auto|on|off|brgemm|mkl|emulate|timed).");
  module.def("_half_gemm_redecide", &half_gemm_redecide, pybind11::arg("dtype"), pybind11::arg("mode") = "",
             "Decide the half-precision path of dtype again with mode in place of DRRHO_KERNELS_CPU_HALF_GEMM "
             "('': the variable again); returns half_gemm_info. For tests and benchmarks, not while kernels run.");
  module.def(
      "default_tiling",
      []() {
        const auto t = drrho::cpu::default_tiling();
        return pybind11::make_tuple(t.chunk_bytes, t.col_block, t.spread_rows);
      },
      "The default (chunk_bytes, col_block, spread_rows).");
}
