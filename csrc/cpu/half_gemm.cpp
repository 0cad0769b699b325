// Half-precision tile products (half_gemm.h): oneDNN brgemm through libtorch, MKL's half GEMMs, or the
// upcast path, chosen once per process and dtype.
#include "half_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <type_traits>

#include "vec_loops.h"

// brgemm: ATen/native/CPUBlas.h names the brgemm flavours it has with these macros (libtorch >= 2.6);
// an older libtorch (or a header-only/stable-ABI build) has no brgemm path. DRRHO_NO_BRGEMM /
// DRRHO_NO_MKL_HALF build without either (to check that the code builds and falls back without them).
#if __has_include(<ATen/native/CPUBlas.h>) && !defined(TORCH_STABLE_ONLY) && !defined(TORCH_TARGET_VERSION) && \
    !defined(DRRHO_NO_BRGEMM)
#include <ATen/native/CPUBlas.h>
#endif
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define DRRHO_BRGEMM_BF16 1
#else
#define DRRHO_BRGEMM_BF16 0
#endif
#if defined(CPUBLAS_BRGEMM_F16F16F32)
#define DRRHO_BRGEMM_F16 1
#else
#define DRRHO_BRGEMM_F16 0
#endif

// MKL's half GEMMs, when libtorch exports them (x86-64 Linux builds link MKL statically and export its
// cblas symbols): weak references, null when absent. LP64 interface (int dimensions), as torch uses.
#if AT_MKL_ENABLED() && defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DRRHO_NO_MKL_HALF)
#define DRRHO_MKL_HALF 1
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
#else
#define DRRHO_MKL_HALF 0
#endif

namespace drrho::cpu {
namespace {

constexpr const char* kEnv = "DRRHO_KERNELS_CPU_HALF_GEMM";
constexpr double kFasterBy = 0.9;   // auto: a candidate must take at most this fraction of the upcast time

bool is_half(at::ScalarType dt) { return dt == at::kBFloat16 || dt == at::kHalf; }
const char* dtype_name(at::ScalarType dt) { return dt == at::kBFloat16 ? "bfloat16" : "float16"; }

// ---------------------------------------------------------------------------------------------
// MKL

#if DRRHO_MKL_HALF
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
#endif

bool mkl_has(at::ScalarType dt) {
#if DRRHO_MKL_HALF
  return dt == at::kBFloat16 ? cblas_gemm_bf16bf16f32 != nullptr : cblas_gemm_f16f16f32 != nullptr;
#else
  (void)dt;
  return false;
#endif
}

int as_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "half_gemm: dimension ", v, " exceeds MKL's 32-bit interface");
  return static_cast<int>(v);
}

// C[M, N] = alpha op(A) op(B) + beta C, row-major; A, B in `dt`.
void mkl_gemm(at::ScalarType dt, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#if DRRHO_MKL_HALF
  TORCH_CHECK(mkl_has(dt), "half_gemm: MKL's ", dtype_name(dt), " GEMM is not available");
  auto* f = dt == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  f(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, as_int(M), as_int(N), as_int(K), alpha,
    static_cast<const uint16_t*>(A), as_int(lda), static_cast<const uint16_t*>(B), as_int(ldb), beta, C, as_int(ldc));
#else
  (void)dt, (void)trans_a, (void)trans_b, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda, (void)B;
  (void)ldb, (void)beta, (void)C, (void)ldc;
  TORCH_CHECK(false, "half_gemm: built without MKL's half GEMMs");
#endif
}

// ---------------------------------------------------------------------------------------------
// brgemm (VNNI B: [k_pad / 2][ldb][2]) or its scalar emulation.

thread_local bool t_brgemm_used = false;
constexpr int64_t kMaxM = 256;   // rows per brgemm call (as PyTorch's flash attention at most)

template <typename H>
void emulated_brgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const H* A,
                     const H* B, float* C) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float acc = add ? C[m * ldc + n] : 0.f;
      for (int64_t k = 0; k < K; ++k) {
        acc += static_cast<float>(A[m * lda + k]) * static_cast<float>(B[((k / 2) * ldb + n) * 2 + (k & 1)]);
      }
      C[m * ldc + n] = acc;
    }
  }
}

template <typename H>
void brg(HalfPath path, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const H* A,
         const H* B, float* C) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t mb = std::min(kMaxM, M - m0);
    if (path == HalfPath::kEmulate) {
      emulated_brgemm<H>(mb, N, K, lda, ldb, ldc, add, A + m0 * lda, B, C + m0 * ldc);
      continue;
    }
    t_brgemm_used = true;
    if constexpr (std::is_same_v<H, at::BFloat16>) {
#if DRRHO_BRGEMM_BF16
      at::native::cpublas::brgemm(mb, N, K, lda, ldb, ldc, add, A + m0 * lda, B, C + m0 * ldc);
#else
      TORCH_CHECK(false, "half_gemm: this libtorch has no bfloat16 brgemm");
#endif
    } else {
#if DRRHO_BRGEMM_F16
      at::native::cpublas::brgemm(mb, N, K, lda, ldb, ldc, add, A + m0 * lda, B, C + m0 * ldc);
#else
      TORCH_CHECK(false, "half_gemm: this libtorch has no float16 brgemm");
#endif
    }
  }
}

// C[M, n] (+)= A[M, k_pad] B for all column blocks of a VNNI-packed B (blocks of kHalfBlockN columns).
template <typename H>
void brg_blocks(const PackedHalf& b, int64_t M, const H* A, int64_t lda, float* C, int64_t ldc, bool add) {
  const H* pb = reinterpret_cast<const H*>(b.data.const_data_ptr());
  const int64_t block_elems = b.k_pad * kHalfBlockN;
  for (int64_t n0 = 0, blk = 0; n0 < b.n; n0 += kHalfBlockN, ++blk) {
    const int64_t nb = std::min(kHalfBlockN, b.n - n0);
    brg<H>(b.path, M, nb, b.k_pad, lda, kHalfBlockN, ldc, add, A, pb + blk * block_elems, C + n0);
  }
}

template <typename F>
void with_half_type(at::ScalarType dtype, const F& f) {
  if (dtype == at::kBFloat16) {
    f(at::BFloat16());
  } else if (dtype == at::kHalf) {
    f(at::Half());
  } else {
    TORCH_CHECK(false, "half_gemm: expected bfloat16 or float16, got ", dtype);
  }
}

bool is_power_of_two(double a) {
  int e;
  return a != 0.0 && std::isfinite(a) && std::fabs(std::frexp(a, &e)) == 0.5;
}

// Power-of-two exponent e with |max| * 2^e in [2^14, 2^15), or 0 when max is already in [2^-10, 2^15)
// (float16's comfortable range) or is 0 / not finite.
int f16_exp_for(float max) {
  if (!(max > 0.f) || !std::isfinite(max)) return 0;
  if (max >= 0x1.0p-10f && max < 0x1.0p15f) return 0;
  return std::clamp(14 - std::ilogb(max), -100, 100);
}

// A flat buffer of at least n elements of `dtype` in `t` (storage reused when big enough).
at::Tensor& ensure(at::Tensor& t, int64_t n, at::ScalarType dtype) {
  if (!t.defined() || t.scalar_type() != dtype || t.numel() < n) {
    t = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(dtype));
  }
  return t;
}
at::Tensor view2(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

uint16_t* u16(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); }

}  // namespace

const char* half_path_name(HalfPath path) {
  switch (path) {
    case HalfPath::kBrgemm: return "brgemm";
    case HalfPath::kMkl: return "mkl";
    case HalfPath::kEmulate: return "emulate";
    default: return "upcast";
  }
}

// ---------------------------------------------------------------------------------------------
// Packing.

PackedHalf PackedHalf::for_nt(HalfPath path, const at::Tensor& b, double alpha) {
  TORCH_CHECK(b.dim() == 2, "PackedHalf::for_nt: expected a 2-D tensor");
  PackedHalf p;
  p.path = path;
  p.dtype = b.scalar_type();
  p.n = b.size(0);
  p.k = b.size(1);
  p.k_pad = p.k;
  if (path == HalfPath::kUpcast) {
    at::Tensor b32 = b.detach().to(at::kFloat);
    p.data = (alpha == 1.0 ? b32 : b32 * alpha).contiguous();
    return p;
  }
  TORCH_CHECK(is_half(p.dtype), "PackedHalf::for_nt: expected bfloat16 or float16, got ", p.dtype);
  if (path == HalfPath::kMkl) {
    p.data = b.detach().contiguous();
    p.alpha = static_cast<float>(alpha);
    return p;
  }
  TORCH_CHECK(is_power_of_two(alpha), "PackedHalf::for_nt: alpha must be a power of two on the brgemm path, got ",
              alpha);
  p.k_pad = p.k + (p.k & 1);
  // alpha = 2^e: exact in the half dtype (barring overflow); -1 is a sign flip.
  const at::Tensor src_t = alpha == 1.0 || alpha == -1.0 ? b.detach().contiguous()
                                                         : (b.detach().to(at::kFloat) * alpha).to(p.dtype).contiguous();
  const uint16_t sign = alpha == -1.0 ? 0x8000 : 0;
  const int64_t nblk = (p.n + kHalfBlockN - 1) / kHalfBlockN, half_k = p.k_pad / 2, K = p.k, n_rows = p.n;
  p.data = at::empty({nblk, half_k, kHalfBlockN, 2}, b.options().dtype(p.dtype));
  const uint16_t* src = u16(src_t);
  uint16_t* dst = u16(p.data);
  // Block c: element (k, n) of B^T (= b[c * 64 + n][k]) at ((k / 2) * 64 + n) * 2 + k % 2: a transpose of
  // [64, K / 2] pairs to [K / 2, 64] pairs; rows past N and the pad of an odd K are zero.
  at::parallel_for(0, nblk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint16_t* blk = dst + c * half_k * kHalfBlockN * 2;
      for (int64_t nl = 0; nl < kHalfBlockN; ++nl) {
        const int64_t n = c * kHalfBlockN + nl;
        if (n >= n_rows) {
          for (int64_t q = 0; q < half_k; ++q) blk[(q * kHalfBlockN + nl) * 2] = blk[(q * kHalfBlockN + nl) * 2 + 1] = 0;
          continue;
        }
        const uint16_t* row = src + n * K;
        for (int64_t q = 0; q < half_k; ++q) {
          const int64_t k = 2 * q;
          blk[(q * kHalfBlockN + nl) * 2] = row[k] ^ sign;
          blk[(q * kHalfBlockN + nl) * 2 + 1] = k + 1 < K ? static_cast<uint16_t>(row[k + 1] ^ sign) : uint16_t(0);
        }
      }
    }
  });
  return p;
}

PackedHalf PackedHalf::for_nn(HalfPath path, const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 2, "PackedHalf::for_nn: expected a 2-D tensor");
  PackedHalf p;
  p.path = path;
  p.dtype = v.scalar_type();
  p.k = v.size(0);
  p.n = v.size(1);
  p.k_pad = p.k;
  if (path == HalfPath::kUpcast) {
    p.data = v.detach().to(at::kFloat).contiguous();
    return p;
  }
  TORCH_CHECK(is_half(p.dtype), "PackedHalf::for_nn: expected bfloat16 or float16, got ", p.dtype);
  if (path == HalfPath::kMkl) {
    p.data = v.detach().contiguous();
    return p;
  }
  p.k_pad = p.k + (p.k & 1);
  const at::Tensor src_t = v.detach().contiguous();
  const int64_t nblk = (p.n + kHalfBlockN - 1) / kHalfBlockN, half_k = p.k_pad / 2, D = p.n, K = p.k;
  p.data = at::zeros({nblk, half_k, kHalfBlockN, 2}, v.options().dtype(p.dtype));
  const uint16_t* src = u16(src_t);
  uint16_t* dst = u16(p.data);
  // Row pair q (rows 2q, 2q + 1 of v) interleaved: block c holds (k, n) at ((k / 2) * 64 + n % 64) * 2 + k % 2.
  at::parallel_for(0, half_k, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const uint16_t* r0 = src + 2 * q * D;
      const uint16_t* r1 = 2 * q + 1 < K ? r0 + D : nullptr;
      for (int64_t c = 0; c < nblk; ++c) {
        uint16_t* out = dst + (c * half_k + q) * kHalfBlockN * 2;
        const int64_t n0 = c * kHalfBlockN, nb = std::min(kHalfBlockN, D - n0);
        for (int64_t j = 0; j < nb; ++j) {
          out[2 * j] = r0[n0 + j];
          out[2 * j + 1] = r1 != nullptr ? r1[n0 + j] : uint16_t(0);
        }
      }
    }
  });
  return p;
}

// ---------------------------------------------------------------------------------------------
// Products.

void half_gemm_nt(at::Tensor& out, const at::Tensor& a, const PackedHalf& b, bool accumulate, HalfWorker& w) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.stride(1) == 1, "half_gemm_nt: out");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == b.k && out.size(0) == a.size(0) && out.size(1) == b.n,
              "half_gemm_nt: shapes");
  if (b.path == HalfPath::kUpcast) {
    const at::Tensor a32 = a.scalar_type() == at::kFloat ? a : a.to(at::kFloat);
    if (accumulate) {
      out.addmm_(a32, b.data.t());
    } else {
      at::mm_out(out, a32, b.data.t());
    }
    return;
  }
  TORCH_CHECK(a.scalar_type() == b.dtype && a.stride(1) == 1, "half_gemm_nt: a: expected ", b.dtype,
              " with contiguous rows");
  const int64_t M = a.size(0);
  if (b.path == HalfPath::kMkl) {
    mkl_gemm(b.dtype, false, true, M, b.n, b.k, b.alpha, a.const_data_ptr(), a.stride(0), b.data.const_data_ptr(),
             b.k, accumulate ? 1.f : 0.f, out.data_ptr<float>(), out.stride(0));
    return;
  }
  at::Tensor a_use = a;
  if (b.k_pad != b.k) {   // odd K: a zero column (the packed B has a zero row there)
    a_use = view2(ensure(w.pad, M * b.k_pad, b.dtype), M, b.k_pad);
    a_use.narrow(1, 0, b.k).copy_(a);
    a_use.narrow(1, b.k, 1).zero_();
  }
  with_half_type(b.dtype, [&](auto tag) {
    using H = decltype(tag);
    brg_blocks<H>(b, M, a_use.const_data_ptr<H>(), a_use.stride(0), out.data_ptr<float>(), out.stride(0), accumulate);
  });
}

void half_round_weights(const at::Tensor& P, bool plain, bool col, HalfWorker& w) {
  TORCH_CHECK(P.scalar_type() == at::kFloat && P.dim() == 2 && P.is_contiguous(), "half_round_weights: P");
  w.rows = P.size(0);
  w.cols = P.size(1);
  w.chunk_exp = 0;
  w.row_exp.clear();
  w.col_is_plain = false;
  if (w.path == HalfPath::kUpcast) {
    w.p32 = P;
    return;
  }
  const int64_t R = w.rows, N = w.cols;
  const float* src = P.const_data_ptr<float>();
  const bool bf16 = w.dtype == at::kBFloat16;
  const bool mkl = w.path == HalfPath::kMkl;
  // mkl, bfloat16: no scaling either way, one rounded copy serves both products.
  const bool shared = mkl && bf16 && col;
  plain = plain || shared;
  if (plain) {
    const int64_t ld = mkl ? N : N + (N & 1);
    uint16_t* dst = u16(ensure(w.plain, R * ld, w.dtype));
    if (!bf16) w.row_exp.assign(static_cast<size_t>(R), 0);
    for (int64_t i = 0; i < R; ++i) {
      const float* s = src + i * N;
      uint16_t* d = dst + i * ld;
      int e = 0;
      if (!bf16) {
        e = f16_exp_for(abs_max(s, N));
        w.row_exp[static_cast<size_t>(i)] = e;
      }
      round_half_row(bf16, s, d, N, std::ldexp(1.f, e));
      if (ld != N) d[N] = 0;
    }
  }
  if (!col) return;
  if (shared) {
    w.col_is_plain = true;
    return;
  }
  if (!bf16) {
    float m = 0.f;
    for (int64_t i = 0; i < R; ++i) m = std::max(m, abs_max(src + i * N, N));
    w.chunk_exp = f16_exp_for(m);
  }
  const float scale = std::ldexp(1.f, w.chunk_exp);
  if (mkl) {   // float16: a chunk-scaled copy [R, N]
    uint16_t* dst = u16(ensure(w.colform, R * N, w.dtype));
    for (int64_t i = 0; i < R; ++i) round_half_row(false, src + i * N, dst + i * N, N, scale);
    return;
  }
  // brgemm: the B operand of x^T P (reduction over the R rows): block c of 64 columns holds (r, j) at
  // ((r / 2) * 64 + j % 64) * 2 + r % 2; written row pair by row pair, contiguous per block; the unused
  // columns of the last block are zero.
  const int64_t r_pad = R + (R & 1), nblk = (N + kHalfBlockN - 1) / kHalfBlockN;
  const int64_t block_elems = r_pad * kHalfBlockN;
  uint16_t* dst = u16(ensure(w.colform, nblk * block_elems, w.dtype));
  for (int64_t r = 0; r < R; r += 2) {
    const float* a = src + r * N;
    const float* b = r + 1 < R ? a + N : nullptr;
    for (int64_t c = 0; c < nblk; ++c) {
      const int64_t j0 = c * kHalfBlockN, nb = std::min(kHalfBlockN, N - j0);
      uint16_t* out = dst + c * block_elems + (r / 2) * 2 * kHalfBlockN;
      round_half_pair(bf16, a + j0, b == nullptr ? nullptr : b + j0, out, nb, scale);
      if (nb < kHalfBlockN) std::memset(out + 2 * nb, 0, sizeof(uint16_t) * 2 * (kHalfBlockN - nb));
    }
  }
}

void half_gemm_pv(at::Tensor& out, HalfWorker& w, const PackedHalf& v) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.stride(1) == 1, "half_gemm_pv: out");
  TORCH_CHECK(out.size(0) == w.rows && out.size(1) == v.n && v.k == w.cols, "half_gemm_pv: shapes");
  TORCH_CHECK(v.path == w.path, "half_gemm_pv: weights and v prepared for different paths");
  if (w.path == HalfPath::kUpcast) {
    at::mm_out(out, w.p32, v.data);
    return;
  }
  TORCH_CHECK(w.plain.defined(), "half_gemm_pv: weights rounded without `plain`");
  if (w.path == HalfPath::kMkl) {
    mkl_gemm(v.dtype, false, false, w.rows, v.n, w.cols, 1.f, w.plain.const_data_ptr(), w.cols,
             v.data.const_data_ptr(), v.n, 0.f, out.data_ptr<float>(), out.stride(0));
  } else {
    const int64_t ld = w.cols + (w.cols & 1);
    with_half_type(v.dtype, [&](auto tag) {
      using H = decltype(tag);
      brg_blocks<H>(v, w.rows, w.plain.const_data_ptr<H>(), ld, out.data_ptr<float>(), out.stride(0), false);
    });
  }
  if (!w.row_exp.empty()) {   // float16: undo the row scales (exact)
    float* po = out.data_ptr<float>();
    for (int64_t i = 0; i < w.rows; ++i) {
      const int e = w.row_exp[static_cast<size_t>(i)];
      if (e == 0) continue;
      const float s = std::ldexp(1.f, -e);
      float* row = po + i * out.stride(0);
      for (int64_t c = 0; c < v.n; ++c) row[c] *= s;
    }
  }
}

void half_prepare_rows(const at::Tensor& x, HalfWorker& w) {
  TORCH_CHECK(x.dim() == 2, "half_prepare_rows: x: expected a 2-D tensor");
  if (w.path == HalfPath::kUpcast) {
    w.xT = (x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).t();
    return;
  }
  TORCH_CHECK(x.scalar_type() == w.dtype && x.stride(1) == 1, "half_prepare_rows: x: expected ", w.dtype,
              " with contiguous rows");
  if (w.path == HalfPath::kMkl) {   // MKL reads x^T from x itself
    w.xT = x;
    return;
  }
  const int64_t R = x.size(0), d = x.size(1), r_pad = R + (R & 1);
  uint16_t* dst = u16(ensure(w.xbuf, d * r_pad, w.dtype));
  w.xT = view2(w.xbuf, d, r_pad);
  const uint16_t* src = u16(x);
  const int64_t ld = x.stride(0);
  constexpr int64_t T = 32;   // tiles: R d is small next to R N, plain loops suffice
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    for (int64_t c0 = 0; c0 < d; c0 += T) {
      for (int64_t c = c0; c < std::min(d, c0 + T); ++c) {
        for (int64_t r = r0; r < std::min(R, r0 + T); ++r) dst[c * r_pad + r] = src[r * ld + c];
      }
    }
  }
  if (r_pad != R) {
    for (int64_t c = 0; c < d; ++c) dst[c * r_pad + R] = 0;
  }
}

void half_gemm_xtp_acc(at::Tensor& outT, HalfWorker& w, int64_t j0, int64_t j1, double alpha) {
  TORCH_CHECK(outT.scalar_type() == at::kFloat && outT.dim() == 2 && outT.stride(1) == 1 && outT.size(1) == w.cols,
              "half_gemm_xtp_acc: outT: expected float32 [d, N] with contiguous rows");
  TORCH_CHECK(0 <= j0 && j0 <= j1 && j1 <= w.cols, "half_gemm_xtp_acc: columns ", j0, "..", j1);
  if (j1 == j0) return;
  const int64_t d = outT.size(0);
  if (w.path == HalfPath::kUpcast) {
    outT.narrow(1, j0, j1 - j0).addmm_(w.xT, w.p32.narrow(1, j0, j1 - j0), 1.0, alpha);
    return;
  }
  const float scale = static_cast<float>(alpha) * std::ldexp(1.f, -w.chunk_exp);
  if (w.path == HalfPath::kMkl) {
    const at::Tensor& pc = w.col_is_plain ? w.plain : w.colform;
    TORCH_CHECK(pc.defined() && w.xT.defined() && w.xT.size(0) == w.rows && w.xT.size(1) == d,
                "half_gemm_xtp_acc: weights or rows missing");
    mkl_gemm(w.dtype, true, false, d, j1 - j0, w.rows, scale, w.xT.const_data_ptr(), w.xT.stride(0),
             u16(pc) + j0, w.cols, 1.f, outT.data_ptr<float>() + j0, outT.stride(0));
    return;
  }
  TORCH_CHECK(w.colform.defined(), "half_gemm_xtp_acc: weights rounded without `col`");
  TORCH_CHECK(w.xT.defined() && w.xT.size(0) == d && w.xT.size(1) == w.rows + (w.rows & 1),
              "half_gemm_xtp_acc: rows not prepared for this chunk");
  TORCH_CHECK(j0 % kHalfBlockN == 0, "half_gemm_xtp_acc: j0 must be a multiple of ", kHalfBlockN, ", got ", j0);
  const int64_t r_pad = w.rows + (w.rows & 1);
  PackedHalf pb;   // the chunk's columns j0..j1 of P as a packed B (k = rows, n = j1 - j0)
  pb.path = w.path;
  pb.dtype = w.dtype;
  pb.n = j1 - j0;
  pb.k = w.rows;
  pb.k_pad = r_pad;
  pb.data = w.colform.narrow(0, (j0 / kHalfBlockN) * r_pad * kHalfBlockN,
                             ((j1 - j0 + kHalfBlockN - 1) / kHalfBlockN) * r_pad * kHalfBlockN);
  with_half_type(w.dtype, [&](auto tag) {
    using H = decltype(tag);
    const H* A = w.xT.const_data_ptr<H>();
    float* po = outT.data_ptr<float>() + j0;
    if (scale == 1.f) {
      brg_blocks<H>(pb, d, A, r_pad, po, outT.stride(0), true);
      return;
    }
    // alpha != 1 or a float16 chunk scale: the product in float32 scratch, then scaled and added.
    float* pt = ensure(w.tmp, d * pb.n, at::kFloat).data_ptr<float>();
    brg_blocks<H>(pb, d, A, r_pad, pt, pb.n, false);
    for (int64_t i = 0; i < d; ++i) {
      float* o = po + i * outT.stride(0);
      const float* s = pt + i * pb.n;
#pragma omp simd
      for (int64_t c = 0; c < pb.n; ++c) o[c] += scale * s[c];
    }
  });
}

void half_gemm_release() {
  if (!t_brgemm_used) return;
  t_brgemm_used = false;
#if DRRHO_BRGEMM_BF16 || DRRHO_BRGEMM_F16
  at::native::cpublas::brgemm_release();
#endif
}

// ---------------------------------------------------------------------------------------------
// The choice.

namespace {

// The CPU's instruction-set flags (Linux: /proc/cpuinfo); empty when unknown.
const std::vector<std::string>& cpu_flags() {
  static const std::vector<std::string> flags = [] {
    std::vector<std::string> out;
    FILE* f = std::fopen("/proc/cpuinfo", "r");
    if (f == nullptr) return out;
    char line[8192];
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      if (std::strncmp(line, "flags", 5) != 0) continue;
      const char* colon = std::strchr(line, ':');
      std::istringstream words(colon != nullptr ? colon + 1 : "");
      for (std::string w; words >> w;) out.push_back(w);
      break;
    }
    std::fclose(f);
    return out;
  }();
  return flags;
}

bool has_flag(const char* name) {
  const auto& f = cpu_flags();
  return std::find(f.begin(), f.end(), name) != f.end();
}

// Whether the CPU has native dot products of `dtype` (bfloat16: avx512_bf16 or AMX-BF16; float16:
// avx512_fp16 or AMX-FP16); unknown flags count as yes (the timed self-test decides).
bool native_half_dot(at::ScalarType dtype, std::string* which) {
  if (cpu_flags().empty()) {
    *which = "CPU flags unknown";
    return true;
  }
  const char* names[2] = {dtype == at::kBFloat16 ? "avx512_bf16" : "avx512_fp16",
                          dtype == at::kBFloat16 ? "amx_bf16" : "amx_fp16"};
  std::string found;
  for (const char* n : names) {
    if (has_flag(n)) found += (found.empty() ? "" : ", ") + std::string(n);
  }
  *which = found.empty() ? std::string("the CPU has neither ") + names[0] + " nor " + names[1] : "the CPU has " + found;
  return !found.empty();
}

std::string first_line(const c10::Error& e) {
  std::string s = e.what_without_backtrace();
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// The self-test: a small problem with an exact answer (small integers), through the same code as the
// kernels (packing, column blocks with a tail, accumulate, an odd K and an odd row count, both weighted
// products with column ranges split at a multiple of 64, alpha != 1). True when exact.
bool exact_self_test(HalfPath path, at::ScalarType dtype) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t M = 7, N = 80, K = 37, D = 70;
  at::Tensor ai = at::arange(M * K, f64).view({M, K}).remainder(5).sub(2);
  at::Tensor bi = at::arange(N * K, f64).view({N, K}).mul(3).remainder(7).sub(3);
  at::Tensor vi = at::arange(N * D, f64).view({N, D}).mul(5).remainder(9).sub(4);
  at::Tensor a = ai.to(dtype), b = bi.to(dtype), v = vi.to(dtype);
  HalfWorker w;
  w.path = path;
  w.dtype = dtype;
  PackedHalf pb = PackedHalf::for_nt(path, b, 1.0), pn = PackedHalf::for_nt(path, b, -2.0);
  PackedHalf pv = PackedHalf::for_nn(path, v);
  at::Tensor out = at::empty({M, N}, f64.dtype(at::kFloat));
  half_gemm_nt(out, a, pb, false, w);
  half_gemm_nt(out, a, pn, true, w);   // a b^T - 2 a b^T
  const at::Tensor want = ai.matmul(bi.t()).neg();
  bool ok = at::equal(out.to(at::kDouble), want);
  // Weighted: P = the scores' magnitudes (integers), P v and x^T P.
  at::Tensor P = want.abs().to(at::kFloat).contiguous();
  half_round_weights(P, true, true, w);
  at::Tensor pvo = at::empty({M, D}, f64.dtype(at::kFloat));
  half_gemm_pv(pvo, w, pv);
  ok = ok && at::equal(pvo.to(at::kDouble), P.to(at::kDouble).matmul(vi));
  at::Tensor x = at::arange(M * D, f64).view({M, D}).remainder(3).sub(1);
  const at::Tensor xh = x.to(dtype);
  at::Tensor accT = at::zeros({D, N}, f64.dtype(at::kFloat));
  half_prepare_rows(xh, w);
  half_gemm_xtp_acc(accT, w, 0, 64, 1.0);
  half_gemm_xtp_acc(accT, w, 64, N, 2.0);
  at::Tensor want_t = x.t().matmul(P.to(at::kDouble));
  want_t.narrow(1, 64, N - 64).mul_(2.0);
  ok = ok && at::equal(accT.to(at::kDouble), want_t);
  half_gemm_release();
  return ok;
}

// A candidate's usability: compiled in, enabled, and exact on the self-test.
HalfCandidate check_candidate(HalfPath path, at::ScalarType dtype) {
  HalfCandidate c;
  c.name = half_path_name(path);
  std::ostringstream why;
  if (path == HalfPath::kBrgemm) {
    const bool compiled = dtype == at::kBFloat16 ? DRRHO_BRGEMM_BF16 : DRRHO_BRGEMM_F16;
    if (!compiled) {
      c.note = std::string("not built: this libtorch's ATen/native/CPUBlas.h has no ") + dtype_name(dtype) +
               " brgemm (or DRRHO_NO_BRGEMM)";
      return c;
    }
    if (!at::globalContext().userEnabledMkldnn()) {
      c.note = "torch.backends.mkldnn is disabled";
      return c;
    }
#if DRRHO_BRGEMM_BF16 || DRRHO_BRGEMM_F16
    why << "could_pack(" << dtype_name(dtype) << ") = " << (at::native::cpublas::could_pack(dtype) ? "true" : "false")
        << "; ";
#endif
  } else if (path == HalfPath::kMkl) {
    if (!mkl_has(dtype)) {
      c.note = DRRHO_MKL_HALF ? std::string("libtorch exports no ") +
                                    (dtype == at::kBFloat16 ? "cblas_gemm_bf16bf16f32" : "cblas_gemm_f16f16f32") +
                                    " (MKL)"
                              : std::string("not built: MKL's half GEMMs are looked up on x86-64 Linux with a "
                                            "libtorch built with MKL only (or DRRHO_NO_MKL_HALF)");
      return c;
    }
  }
  try {
    c.usable = exact_self_test(path, dtype);
    why << (c.usable ? "self-test exact" : "self-test gave wrong results");
  } catch (const c10::Error& e) {
    half_gemm_release();
    why << "self-test raised: " << first_line(e);
  } catch (const std::exception& e) {
    half_gemm_release();
    why << "self-test raised: " << e.what();
  }
  c.note = why.str();
  return c;
}

// The timed self-test: every thread one representative chunk (R = 256 rows, N = 1024 columns, d = 512):
// scores with a reference (two products), the weights' rounding, P v and x^T P, as the kernels do them.
// Deterministic inputs (no random generator is touched).
class SpeedTest {
 public:
  SpeedTest(at::ScalarType dtype) : dtype_(dtype), T_(std::max<int64_t>(1, at::get_num_threads())) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    auto rows = [&](int64_t n, double c) {
      at::Tensor m = at::sin(at::arange(n * K_, f32).mul(c)).view({n, K_});
      return (m / m.norm(2, 1, true)).to(dtype_).contiguous();
    };
    a_ = rows(T_ * R_, 0.7311), ar_ = rows(T_ * R_, 0.4129);
    b_ = rows(N_, 0.9173), br_ = rows(N_, 0.3337), v_ = rows(N_, 0.5711);
    a32_ = a_.to(at::kFloat), ar32_ = ar_.to(at::kFloat);
    for (int64_t t = 0; t < T_; ++t) {
      S_.push_back(at::empty({R_, N_}, f32));
      out_.push_back(at::empty({R_, K_}, f32));
      acc_.push_back(at::zeros({N_, K_}, f32));   // upcast: d cols [N, d]; half paths: [d, N]
    }
  }

  void prepare(HalfPath path) {
    Prepared& p = prep_[static_cast<int>(path)];
    p.nt = PackedHalf::for_nt(path, b_, 1.0);
    p.ntr = PackedHalf::for_nt(path, br_, -1.0);
    p.nn = PackedHalf::for_nn(path, v_);
    p.workers.assign(static_cast<size_t>(T_), HalfWorker{});
    for (auto& w : p.workers) w.path = path, w.dtype = dtype_;
  }

  double run(HalfPath path) {
    Prepared& p = prep_[static_cast<int>(path)];
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, T_, 1, [&](int64_t w0, int64_t w1) {
      at::AutoDispatchBelowADInplaceOrView guard;
      for (int64_t w = w0; w < w1; ++w) body(path, p, w);
      half_gemm_release();
    });
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

 private:
  struct Prepared {
    PackedHalf nt, ntr, nn;
    std::vector<HalfWorker> workers;
  };

  void body(HalfPath path, Prepared& p, int64_t w) {
    at::Tensor& S = S_[static_cast<size_t>(w)];
    at::Tensor& out = out_[static_cast<size_t>(w)];
    at::Tensor& acc = acc_[static_cast<size_t>(w)];
    if (path == HalfPath::kUpcast) {   // exactly what fused_loss.cpp does with upcast inputs
      const at::Tensor a = a32_.narrow(0, w * R_, R_), ar = ar32_.narrow(0, w * R_, R_);
      at::mm_out(S, a, p.nt.data.t());
      S.addmm_(ar, p.ntr.data.t());   // (alpha -1 folded into the upcast copy)
      at::mm_out(out, S, p.nn.data);
      acc.addmm_(S.t(), a);
      return;
    }
    HalfWorker& hw = p.workers[static_cast<size_t>(w)];
    const at::Tensor a = a_.narrow(0, w * R_, R_), ar = ar_.narrow(0, w * R_, R_);
    half_gemm_nt(S, a, p.nt, false, hw);
    half_gemm_nt(S, ar, p.ntr, true, hw);
    half_round_weights(S, true, true, hw);
    half_gemm_pv(out, hw, p.nn);
    half_prepare_rows(a, hw);
    at::Tensor accT = acc.view({K_, N_});
    half_gemm_xtp_acc(accT, hw, 0, N_, 1.0);
  }

  static constexpr int64_t R_ = 256, N_ = 1024, K_ = 512;
  at::ScalarType dtype_;
  int64_t T_;
  at::Tensor a_, ar_, b_, br_, v_, a32_, ar32_;
  std::vector<at::Tensor> S_, out_, acc_;
  Prepared prep_[4];
};

std::string lower_trimmed(const char* s) {
  std::string out;
  for (const char* c = s; *c; ++c) {
    if (!std::isspace(static_cast<unsigned char>(*c))) out += static_cast<char>(std::tolower(*c));
  }
  return out;
}

std::string ms(double s) {
  std::ostringstream o;
  o.precision(3);
  o << s * 1e3 << " ms";
  return o.str();
}

HalfGemmChoice decide(at::ScalarType dtype, const char* env) {
  HalfGemmChoice c;
  c.dtype = dtype_name(dtype);
  for (const auto& f : cpu_flags()) {
    if (f == "avx2" || f.rfind("avx512", 0) == 0 || f.rfind("amx", 0) == 0 || f == "avx_vnni" || f == "f16c") {
      c.cpu_flags.push_back(f);
    }
  }
  c.mode = env == nullptr ? "auto" : lower_trimmed(env);
  if (c.mode.empty()) c.mode = "auto";
  const std::string& mode = c.mode;
  const std::string tag = std::string(kEnv) + "=" + mode;
  if (mode != "auto" && mode != "timed" && mode != "on" && mode != "off" && mode != "brgemm" && mode != "mkl" &&
      mode != "emulate") {
    c.error = true;
    c.reason = std::string(kEnv) + ": expected auto, on, off, brgemm, mkl, emulate or timed, got '" + env + "'";
    return c;
  }
  // timed: auto without the CPU-flag filter (every candidate that passes its self-test is timed; tests).
  const bool timed = mode == "timed" || mode == "auto";
  if (mode == "off") {
    c.reason = tag + ": inputs upcast to float32 (float32 tile products)";
    return c;
  }
  if (mode == "emulate") {
    HalfCandidate e = check_candidate(HalfPath::kEmulate, dtype);
    c.candidates.push_back(e);
    if (e.usable) {
      c.path = HalfPath::kEmulate;
      c.reason = tag + ": the brgemm path's packing, blocking and scaling with a scalar product (for tests; slow)";
    } else {
      c.error = true;
      c.reason = tag + ": the emulated brgemm path failed its self-test (" + e.note + ")";
    }
    return c;
  }
  std::vector<HalfPath> order;
  if (timed || mode == "on" || mode == "brgemm") order.push_back(HalfPath::kBrgemm);
  if (timed || mode == "on" || mode == "mkl") order.push_back(HalfPath::kMkl);
  std::vector<HalfPath> usable;
  for (HalfPath p : order) {
    c.candidates.push_back(check_candidate(p, dtype));
    HalfCandidate& k = c.candidates.back();
    if (!k.usable) continue;
    // auto: MKL only where the CPU has native half dot products; elsewhere it converts to float32 inside
    // and is at best as fast as the float32 products, so a timed draw between them would only add noise.
    // (brgemm checks the CPU itself: it runs only with AMX.)
    std::string which;
    if (mode == "auto" && p == HalfPath::kMkl && !native_half_dot(dtype, &which)) {
      k.note += "; not timed: " + which + " (MKL converts to float32 inside)";
      continue;
    }
    usable.push_back(p);
  }
  auto notes = [&] {
    std::string s;
    for (const auto& k : c.candidates) s += (s.empty() ? "" : "; ") + k.name + ": " + k.note;
    return s;
  };
  if (!timed) {
    if (usable.empty()) {
      c.error = true;
      c.reason = tag + ": no " + std::string(c.dtype) + " tile product with float32 accumulation runs on this CPU (" +
                 notes() + "). Use auto (which falls back to float32 tiles) or off.";
    } else {
      c.path = usable.front();
      c.reason = tag + ": " + half_path_name(c.path) + " forced (" + notes() + ")";
    }
    return c;
  }
  if (usable.empty()) {
    c.reason = mode + ": upcast to float32: no half-precision tile product that can be faster runs here (" + notes() + ")";
    return c;
  }
  // Time the usable candidates against the upcast path, interleaved, best of 3 after a warm-up.
  try {
    SpeedTest test(dtype);
    std::vector<HalfPath> paths{HalfPath::kUpcast};
    paths.insert(paths.end(), usable.begin(), usable.end());
    std::vector<double> best(paths.size(), 1e30);
    for (HalfPath p : paths) test.prepare(p);
    for (int round = -1; round < 3; ++round) {
      for (size_t i = 0; i < paths.size(); ++i) {
        const double t = test.run(paths[i]);
        if (round >= 0) best[i] = std::min(best[i], t);
      }
    }
    c.upcast_seconds = best[0];
    size_t win = 0;
    for (size_t i = 1; i < paths.size(); ++i) {
      for (auto& k : c.candidates) {
        if (k.name == half_path_name(paths[i])) k.seconds = best[i];
      }
      if (best[i] <= kFasterBy * best[0] && (win == 0 || best[i] < best[win])) win = i;
    }
    std::string timing = "self-test, one 256 x 1024 x 512 chunk per thread: upcast " + ms(best[0]);
    for (size_t i = 1; i < paths.size(); ++i) timing += std::string(", ") + half_path_name(paths[i]) + " " + ms(best[i]);
    if (win > 0) {
      c.path = paths[win];
      c.reason = mode + ": " + half_path_name(c.path) + " (" + timing + "; " + notes() + ")";
    } else {
      c.reason = mode + ": upcast to float32: no usable half-precision product is faster (" + timing +
                 "; a candidate must take <= 0.9x the upcast time; " + notes() + ")";
    }
  } catch (const c10::Error& e) {
    half_gemm_release();
    c.path = HalfPath::kUpcast;
    c.reason = mode + ": upcast to float32: the timed self-test raised: " + first_line(e);
  }
  return c;
}

struct Slot {
  std::mutex lock;
  bool decided = false;
  HalfGemmChoice choice;
};
Slot g_slots[2];

Slot& slot_of(at::ScalarType dtype) {
  TORCH_CHECK(is_half(dtype), "half_gemm: expected bfloat16 or float16, got ", dtype);
  return g_slots[dtype == at::kBFloat16 ? 0 : 1];
}

}  // namespace

HalfGemmChoice half_gemm_choice(at::ScalarType dtype) {
  Slot& s = slot_of(dtype);
  std::lock_guard<std::mutex> guard(s.lock);
  if (!s.decided) {
    at::AutoDispatchBelowADInplaceOrView below;
    s.choice = decide(dtype, std::getenv(kEnv));
    s.decided = true;
  }
  return s.choice;
}

HalfGemmChoice half_gemm_redecide(at::ScalarType dtype, const std::string& mode) {
  Slot& s = slot_of(dtype);
  std::lock_guard<std::mutex> guard(s.lock);
  at::AutoDispatchBelowADInplaceOrView below;
  s.choice = mode.empty() ? decide(dtype, std::getenv(kEnv)) : decide(dtype, mode.c_str());
  s.decided = true;
  return s.choice;
}

HalfPath half_gemm_path(at::ScalarType dtype) {
  if (!is_half(dtype)) return HalfPath::kUpcast;
  const HalfGemmChoice c = half_gemm_choice(dtype);
  TORCH_CHECK(!c.error, c.reason);
  if (c.path == HalfPath::kBrgemm && !at::globalContext().userEnabledMkldnn()) {
    TORCH_CHECK(c.mode == "auto" || c.mode == "timed", kEnv, "=", c.mode,
                ": brgemm needs torch.backends.mkldnn, which is now disabled");
    return HalfPath::kUpcast;
  }
  return c.path;
}

}  // namespace drrho::cpu
