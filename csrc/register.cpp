// drrho_kernels._C: registers the CPU kernels of the fused DRRho-CLIP op pair with the dispatcher.
//
//   drrho::cpp_fwd  (schema: drrho_kernels/ops.py FWD_SCHEMA)   CPU kernel: drrho::cpu::fused_fwd
//   drrho::cpp_bwd  (schema: drrho_kernels/ops.py BWD_SCHEMA)   CPU kernel: drrho::cpu::fused_bwd
//
// The fake (meta) implementations and the autograd formula are registered from Python, once for
// every backend, by drrho_kernels.ops.define_fused_ops (called by drrho_kernels/backends/cpp.py),
// so torch.compile and torch.library.opcheck see these ops like any other. The Python side of the
// namespace is a torch.library.Library("drrho", "FRAGMENT"); this file holds the one TORCH_LIBRARY
// (DEF) block of the namespace, which may load before or after it.
//
// The Python module itself only carries build information and the tiling knobs.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/fused_loss.h"
#include "cpu/vec_loops.h"

// Keep these two strings identical to FWD_SCHEMA / BWD_SCHEMA in drrho_kernels/ops.py
// (tests/test_cpp.py checks that the registered schemas parse to the same thing).
TORCH_LIBRARY(drrho, m) {
  m.def(
      "cpp_fwd(Tensor img, Tensor txt, Tensor img_all, Tensor txt_all, Tensor? ref_img, Tensor? ref_txt, "
      "Tensor? ref_img_all, Tensor? ref_txt_all, Tensor logit_scale, Tensor u_img, Tensor u_txt, "
      "int offset, float gamma, float eps, bool columns_are_rows) "
      "-> (Tensor phi, Tensor u_img_new, Tensor u_txt_new, Tensor margin, Tensor wsum_img, Tensor wsum_txt)");
  m.def(
      "cpp_bwd(Tensor grad_phi, Tensor img, Tensor txt, Tensor img_all, Tensor txt_all, Tensor? ref_img, "
      "Tensor? ref_txt, Tensor? ref_img_all, Tensor? ref_txt_all, Tensor logit_scale, Tensor u_img_new, "
      "Tensor u_txt_new, Tensor margin, Tensor wsum_img, Tensor wsum_txt, Tensor? col_u_img, "
      "Tensor? col_u_txt, Tensor? col_margin, int offset, bool columns_are_rows, bool column_grads) "
      "-> (Tensor d_img, Tensor d_txt, Tensor d_img_all, Tensor d_txt_all)");
}

TORCH_LIBRARY_IMPL(drrho, CPU, m) {
  m.impl("cpp_fwd", &drrho::cpu::fused_fwd);
  m.impl("cpp_bwd", &drrho::cpu::fused_bwd);
}

namespace {

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
  module.doc() = "DRRho-CLIP fused CPU kernels; importing registers drrho::cpp_fwd and drrho::cpp_bwd.";
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
  module.def(
      "default_tiling",
      []() {
        const auto t = drrho::cpu::default_tiling();
        return pybind11::make_tuple(t.chunk_bytes, t.col_block, t.spread_rows);
      },
      "The default (chunk_bytes, col_block, spread_rows).");
}
