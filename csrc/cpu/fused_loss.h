// The fused DRRho-CLIP op pair on CPU tensors: drrho::cpp_fwd and drrho::cpp_bwd.
//
// The schemas are defined on the Python side only (drrho_kernels/core/ops.py derives them from the fields of
// drrho_kernels/core/inputs.py TileInputs and Weights); these signatures follow them argument for argument,
// and the dispatcher checks that they match when the extension registers its kernels. The tiles' scalar
// options travel as one list (`float[] scalars`, read by TileScalars::parse): a new scalar option changes no
// signature, only TileScalars (whose names the Python side compares with its own at load).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include <tuple>

namespace drrho::cpu {

using OptTensor = std::optional<at::Tensor>;

// The scalar fields of TileInputs, in their order there (tile_scalar_names() lists them for that check).
struct TileScalars {
  int64_t offset;          // row i is column offset + i; N: no row is a column
  bool columns_are_rows;   // one process: img_all is img, N = B
  double distill_scale;    // t_d, the teacher's scale
  bool with_distill;       // also the student's and the teacher's statistics
  bool with_alone;         // also the target-alone and reference-alone statistics
  static TileScalars parse(const char* op, c10::ArrayRef<double> scalars);
};
std::vector<std::string> tile_scalar_names();

// drrho::cpp_fwd(<TileInputs>) -> (stats [2, K, B], margin [B], positives [2, B])
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_fwd(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all, const at::Tensor& txt_all,
    const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all, const OptTensor& ref_txt_all,
    const at::Tensor& scale, c10::ArrayRef<double> scalars);

// drrho::cpp_bwd(gain, col_gain, dgain, col_dgain, <TileInputs>, <Weights>, column_grads)
//   -> (d_img, d_txt, d_img_all, d_txt_all)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bwd(
    const at::Tensor& gain, const OptTensor& col_gain, const OptTensor& dgain, const OptTensor& col_dgain,
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all, const at::Tensor& txt_all,
    const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all, const OptTensor& ref_txt_all,
    const at::Tensor& scale, c10::ArrayRef<double> scalars, const at::Tensor& log_norm, const at::Tensor& wsum, const at::Tensor& margin,
    const OptTensor& col_scale, const OptTensor& col_log_norm, const OptTensor& col_margin, const OptTensor& lse_q,
    const OptTensor& lse_p, const OptTensor& col_lse_q, const OptTensor& col_lse_p, bool column_grads);

// Tiling knobs (process-wide): the bytes of one worker's [R, N] similarity chunk (R = rows per
// chunk), the width of the column blocks of the forward's statistics pass, and the smallest chunk
// (in rows) that the chunking goes down to in order to give every thread two chunks. In
// set_tiling, 0 restores a default; spread_rows = -1 turns the spreading off. chunk_bytes = 0 (the
// default) is automatic: 4 MiB, but at least 128 rows per chunk.
struct Tiling {
  int64_t chunk_bytes;
  int64_t col_block;
  int64_t spread_rows;
};
Tiling get_tiling();
void set_tiling(int64_t chunk_bytes, int64_t col_block, int64_t spread_rows);
Tiling default_tiling();

// Phase timing for profiling: thread CPU seconds spent in the similarity GEMMs, the forward and backward
// exp passes and the weighted GEMMs (summed over workers), since the last reset.
void set_profiling(bool enabled);
std::vector<std::pair<std::string, double>> read_profile(bool reset);

}  // namespace drrho::cpu
