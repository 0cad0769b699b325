// Half-precision tile products of the CPU kernels: bfloat16 / float16 inputs, float32 accumulation and
// float32 output, where the CPU runs such a product faster than the float32 one; elsewhere the kernels
// upcast their inputs to float32 and use at::mm / addmm_ (the "upcast" path, fused_loss.cpp's code for
// float32 inputs). Every sum and exponential stays in float32 on every path (SPEC.md "Numerics").
//
// Paths (HalfPath):
//   upcast   inputs converted to float32 once per step, float32 products (ATen / MKL sgemm).
//   brgemm   oneDNN's batch-reduce GEMM ukernel as libtorch exports it (at::native::cpublas::brgemm,
//            ATen/native/CPUBlas.h, the routine PyTorch's CPU flash attention uses) on operands packed
//            here in the VNNI layout ([K / 2][64 columns][2]). libtorch 2.13 runs it for bfloat16 where
//            oneDNN has a bfloat16 ukernel for the CPU (AMX, and avx512_bf16: seen on an AMD EPYC
//            without AMX, 2026-12-02) and for float16 only with AMX-FP16; elsewhere it throws (as on an
//            AVX2-only CPU), and the path is unusable.
//   mkl      MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (half inputs, float32 accumulation),
//            found at load time among libtorch's exported symbols (x86-64 Linux builds with MKL); MKL
//            dispatches native bf16 dot products (avx512_bf16) or AMX where the CPU has them and
//            converts to float32 elsewhere.
//   emulate  the VNNI packing, blocking and scaling of the brgemm path with a scalar reference product
//            in place of oneDNN: tests that logic on any CPU. Slow; only when asked for.
//
// Choice (half_gemm_choice): once per process and dtype, on first use, never throwing. The environment
// variable DRRHO_KERNELS_CPU_HALF_GEMM (read then) selects:
//   auto (default)  each candidate (brgemm, then mkl) runs a self-test with an exact answer (small
//                   integers through the same packing, blocking and scaling as the kernels); mkl counts
//                   only where the CPU has native half dot products (/proc/cpuinfo: avx512_bf16 or
//                   amx_bf16 for bfloat16, avx512_fp16 or amx_fp16 for float16: elsewhere MKL converts to
//                   float32 inside and is no faster than the float32 products); the usable
//                   ones are timed against the upcast path on a representative chunk (R = 256 rows,
//                   N = 1024 columns, d = 512, all threads at once: scores with a reference, the weights'
//                   rounding, both weighted products); the fastest is chosen if it takes at most 0.9x the
//                   upcast time, else upcast.
//   on              the first candidate that passes its self-test (brgemm, then mkl), whatever the CPU
//                   flags, without timing; none: an error.
//   off             upcast.
//   brgemm | mkl | emulate   that path (its self-test must pass, else an error).
//   timed           auto without the CPU-flag filter: every candidate that passes its self-test is timed
//                   (to test the timing; on a CPU without native half dot products the draw is noise).
// An error is stored, not thrown: kernel calls with that dtype then raise it (half_gemm_path), while
// the choice stays readable (drrho_kernels.backends.cpp.half_gemm()).
//
// Products (one worker's chunk: R rows, N columns, K = d features; all row-major, contiguous rows):
//   scores    out[R, N]  (+)= alpha a[R, K] b[N, K]^T          half_gemm_nt      (b packed once per step)
//   weighted  out[R, d]   = P[R, N] v[N, d]                   half_gemm_pv      (v packed once per step)
//   weighted  outT[:, j0:j1] += alpha x^T P[:, j0:j1]        half_gemm_xtp_acc
// The last one is (P^T x)^T: a column-sum gradient accumulated transposed, outT [d, N], transposed back
// once at the end of the step (N d elements), so that P is the B operand of brgemm (VNNI pairs of rows,
// written by the rounding pass) and is never transposed. P (float32 weights) is rounded to the input
// dtype first (half_round_weights, one pass); float16 weights are scaled by powers of two so that they
// stay in range (per row for P v, per chunk for x^T P), the scaling undone exactly in float32. Scores
// are never rounded: float32 output.
//
// Threads: the products run inside at::parallel_for workers at once. Packed operands are read-only after
// packing; each worker owns its HalfWorker. Call half_gemm_release() at the end of every worker that
// ran a product (it releases brgemm's AMX tile configuration of the thread; a no-op elsewhere).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace drrho::cpu {

enum class HalfPath : int { kUpcast = 0, kBrgemm = 1, kMkl = 2, kEmulate = 3 };
const char* half_path_name(HalfPath path);

struct HalfCandidate {
  std::string name;       // "brgemm", "mkl"
  bool usable = false;    // its self-test ran and was exact
  std::string note;       // why not usable, or what it measured
  double seconds = -1;    // self-test time (auto mode), -1 when not timed
};

struct HalfGemmChoice {
  std::string dtype;      // "bfloat16" / "float16"
  std::string mode;       // the environment variable's value (auto when unset)
  HalfPath path = HalfPath::kUpcast;
  bool error = false;     // the mode asks for a path that cannot run here: kernel calls raise `reason`
  std::string reason;
  std::vector<HalfCandidate> candidates;
  double upcast_seconds = -1;   // the upcast path's self-test time (auto mode, when a candidate was timed)
  std::vector<std::string> cpu_flags;   // the CPU's half-precision flags found (avx2, avx512*, amx*)
};

// The choice for inputs of `dtype` (kBFloat16 or kHalf), decided once per process (thread-safe).
HalfGemmChoice half_gemm_choice(at::ScalarType dtype);

// Decide again with `mode` in place of the environment variable ("" : the variable again). For tests and
// benchmarks (drrho_kernels.backends.cpp._redecide_half_gemm); not while kernels run on other threads.
HalfGemmChoice half_gemm_redecide(at::ScalarType dtype, const std::string& mode);

// The path for a kernel call with inputs of `dtype`: kUpcast for any other dtype; raises the choice's
// error when it has one. brgemm falls back to upcast while torch.backends.mkldnn is disabled.
HalfPath half_gemm_path(at::ScalarType dtype);

// Columns per VNNI block of a packed B (brgemm's N per call): brgemm's packed ld_b is 16/32/48/64.
constexpr int64_t kHalfBlockN = 64;

// A B operand prepared once per step (outside the workers), then shared read-only.
struct PackedHalf {
  // Scores: out[R, N] (+)= alpha a b^T, b [N, K]. On the brgemm / emulate paths alpha must be a power
  // of two (+-1, ...), folded exactly into the packed copy.
  static PackedHalf for_nt(HalfPath path, const at::Tensor& b, double alpha = 1.0);
  // Weighted products: out[R, d] = P v, v [N, d] (N is the reduction here).
  static PackedHalf for_nn(HalfPath path, const at::Tensor& v);

  HalfPath path = HalfPath::kUpcast;
  at::ScalarType dtype = at::kFloat;   // of the inputs
  int64_t n = 0;                       // output columns: N (nt) or d (nn)
  int64_t k = 0;                       // reduction length: K (nt) or N (nn)
  int64_t k_pad = 0;                   // k rounded up to even (VNNI pairs)
  float alpha = 1.f;                   // mkl: applied by the product (brgemm: folded into `data`)
  // upcast: [n, k] (nt, alpha applied) or [k, n] (nn), float32.
  // mkl: [n, k] (nt) or [k, n] (nn) in the input dtype, contiguous.
  // brgemm / emulate: [ceil(n / 64), k_pad / 2, 64, 2] in the input dtype (zero padded).
  at::Tensor data;
};

// One worker's chunk of weights P [R, N] in the forms the weighted products need, and its scratch;
// reused across chunks (buffers kept).
struct HalfWorker {
  HalfPath path = HalfPath::kUpcast;
  at::ScalarType dtype = at::kFloat;
  int64_t rows = 0, cols = 0;
  at::Tensor p32;            // upcast: P itself (no copy)
  at::Tensor plain;          // brgemm / mkl: [R, N_pad] half, row i scaled by 2^row_exp[i]
  at::Tensor colform;        // brgemm: [ceil(N / 64), R_pad / 2, 64, 2]; mkl: [R, N_pad]; scaled by 2^chunk_exp
  bool col_is_plain = false; // mkl bfloat16: colform is `plain` (no scaling either way)
  std::vector<int> row_exp;  // float16 only (bfloat16: empty)
  int chunk_exp = 0;
  at::Tensor xT;             // the chunk's rows for half_gemm_xtp_acc (brgemm: [d, R_pad] transposed)
  at::Tensor xbuf, pad, tmp; // scratch: brgemm's transposed rows, odd-K rows, x^T P before scaling
};

// Weights of one chunk: keep (upcast) or round (`plain` for half_gemm_pv, `col` for half_gemm_xtp_acc),
// one pass over P. P: float32 [R, N], contiguous.
void half_round_weights(const at::Tensor& P, bool plain, bool col, HalfWorker& w);

// out[R, N] (float32, rows of stride out.stride(0)) (+)= alpha a b^T. a [R, K] in the input dtype with
// contiguous rows (upcast path: float32).
void half_gemm_nt(at::Tensor& out, const at::Tensor& a, const PackedHalf& b, bool accumulate, HalfWorker& w);

// out[R, d] (float32, contiguous rows) = P v.
void half_gemm_pv(at::Tensor& out, HalfWorker& w, const PackedHalf& v);

// The chunk's rows x [R, d] in the form half_gemm_xtp_acc reads (into w.xT), once per chunk, after the
// chunk's half_round_weights.
void half_prepare_rows(const at::Tensor& x, HalfWorker& w);

// Columns j0..j1 of the transposed float32 accumulator outT [d, N] += alpha x^T P[:, j0:j1]. j0 must be a
// multiple of kHalfBlockN (64) on the brgemm / emulate paths.
void half_gemm_xtp_acc(at::Tensor& outT, HalfWorker& w, int64_t j0, int64_t j1, double alpha);

// End of a worker's products on this thread (releases brgemm's hardware context).
void half_gemm_release();

}  // namespace drrho::cpu
