// The fused DRRho-CLIP op pair on CPU tensors: drrho::cpp_fwd and drrho::cpp_bwd.
//
// Signatures follow drrho_kernels/ops.py FWD_SCHEMA and BWD_SCHEMA argument for argument; the
// semantics are docs/DESIGN.md ("The fused op pair").
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include <tuple>

namespace drrho::cpu {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_fwd(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all, const at::Tensor& txt_all,
    const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all,
    const OptTensor& ref_txt_all, const at::Tensor& logit_scale, const at::Tensor& u_img,
    const at::Tensor& u_txt, int64_t offset, double gamma, double eps, bool columns_are_rows);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bwd(
    const at::Tensor& grad_phi, const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all,
    const at::Tensor& txt_all, const OptTensor& ref_img, const OptTensor& ref_txt,
    const OptTensor& ref_img_all, const OptTensor& ref_txt_all, const at::Tensor& logit_scale,
    const at::Tensor& u_img_new, const at::Tensor& u_txt_new, const at::Tensor& margin,
    const at::Tensor& wsum_img, const at::Tensor& wsum_txt, const OptTensor& col_u_img,
    const OptTensor& col_u_txt, const OptTensor& col_margin, int64_t offset, bool columns_are_rows,
    bool column_grads);

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
