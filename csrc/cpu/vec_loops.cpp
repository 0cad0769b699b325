// Inner loops of the CPU kernels (declared in vec_loops.h), written as plain loops that the
// compiler vectorizes (`omp simd`), compiled for three instruction sets with function
// multiversioning: the dynamic loader picks the best clone for the CPU once (ifunc).
//
// This file includes no torch header on purpose: only the functions below are compiled for
// AVX-512/AVX2, so no inline function shared with libtorch can end up with instructions the CPU
// lacks.
//
// exp: the loops need an exponential that vectorizes (a call to libm's expf does not without
// -ffast-math). `vexp` is the classic range reduction e^x = 2^n e^r, n = round(x / ln 2),
// r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two parts so that r is exact), e^r by its Taylor
// polynomial (degree 7 in float: truncation < 6e-9; degree 13 in double: < 5e-18), and 2^n built
// from its exponent bits. Inputs below the smallest normal result give 0, above the largest
// finite give +inf, NaN stays NaN. Accuracy: a few ulp (tests/test_cpp.py checks it).
#include "vec_loops.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    !defined(DRRHO_NO_MULTIVERSION)
#define DRRHO_MULTIVERSION 1
#define DRRHO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DRRHO_MULTIVERSION 0
#define DRRHO_CLONES
#endif

#define DRRHO_INLINE inline __attribute__((always_inline))

namespace drrho::cpu {
namespace {

template <typename T>
struct ExpConst;

template <>
struct ExpConst<float> {
  using Bits = int32_t;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;        // exact in 9 bits: n * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440054690583e-4f;
  static constexpr float shift = 12582912.0f;          // 1.5 * 2^23: x + shift rounds x to an integer
  static constexpr Bits shift_bits = 0x4B400000;       // bits of `shift`
  static constexpr int mantissa = 23;
  static constexpr Bits bias = 127;
  static constexpr float lo = -87.0f;                  // exp(lo) > FLT_MIN
  static constexpr float hi = 88.0f;                   // exp(hi) < FLT_MAX
  static constexpr int degree = 7;
};

template <>
struct ExpConst<double> {
  using Bits = int64_t;
  static constexpr double log2e = 1.44269504088896340736;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;   // 32 significant bits
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double shift = 6755399441055744.0;            // 1.5 * 2^52
  static constexpr Bits shift_bits = 0x4338000000000000LL;
  static constexpr int mantissa = 52;
  static constexpr Bits bias = 1023;
  static constexpr double lo = -708.0;
  static constexpr double hi = 709.0;
  static constexpr int degree = 13;
};

template <typename T, int D>
constexpr std::array<T, D + 1> taylor_coefficients() {
  std::array<T, D + 1> c{};
  T inv_factorial = T(1);
  for (int k = 0; k <= D; ++k) {
    c[k] = inv_factorial;
    inv_factorial /= T(k + 1);
  }
  return c;
}

template <typename T>
DRRHO_INLINE T vexp(T x) {
  using C = ExpConst<T>;
  using Bits = typename C::Bits;
  // Clamp without std::min/max so that NaN passes through (comparisons with NaN are false).
  T xc = x < C::lo ? C::lo : x;
  xc = xc > C::hi ? C::hi : xc;
  const T t = xc * C::log2e + C::shift;
  const T n = t - C::shift;                       // round(x / ln 2)
  const T r = (xc - n * C::ln2_hi) - n * C::ln2_lo;
  // Taylor polynomial of e^r, Horner form, coefficients 1/k!.
  static constexpr auto c = taylor_coefficients<T, C::degree>();
  T p = c[C::degree];
  for (int k = C::degree - 1; k >= 0; --k) p = p * r + c[k];
  const Bits nbits = std::bit_cast<Bits>(t) - C::shift_bits;       // n as an integer
  const T two_n = std::bit_cast<T>(static_cast<Bits>((nbits + C::bias) << C::mantissa));
  T y = p * two_n;
  y = x < C::lo ? T(0) : y;
  y = x > C::hi ? std::numeric_limits<T>::infinity() : y;
  return y;
}

template <typename T>
DRRHO_INLINE T seg_max_impl(const T* s, int64_t n, T row_max, T* col_max) {
  T m = row_max;
  if (col_max != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < n; ++k) {
      const T v = s[k];
      m = v > m ? v : m;
      col_max[k] = v > col_max[k] ? v : col_max[k];
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < n; ++k) {
      const T v = s[k];
      m = v > m ? v : m;
    }
  }
  return m;
}

template <typename T>
DRRHO_INLINE void seg_sums_impl(const T* s, const T* v, int64_t n, T row_scale, T row_m, T row_top, T* row_e,
                                T* row_f, const T* col_m, const T* col_scale, const T* col_top, T* col_e, T* col_f) {
  T e_sum = T(0), f_sum = T(0);
  if (col_e != nullptr && v != nullptr) {
#pragma omp simd reduction(+ : e_sum, f_sum)
    for (int64_t k = 0; k < n; ++k) {
      const T d = (s[k] - row_m) * row_scale;
      const T e = vexp(d - row_top);
      e_sum += e;
      f_sum += e * v[k];
      const T c = (s[k] - col_m[k]) * col_scale[k];
      const T f = vexp(c - col_top[k]);
      col_e[k] += f;
      col_f[k] += f * v[k];
    }
  } else if (col_e != nullptr) {
#pragma omp simd reduction(+ : e_sum, f_sum)
    for (int64_t k = 0; k < n; ++k) {
      const T d = (s[k] - row_m) * row_scale;
      const T e = vexp(d - row_top);
      e_sum += e;
      f_sum += e * d;
      const T c = (s[k] - col_m[k]) * col_scale[k];
      const T f = vexp(c - col_top[k]);
      col_e[k] += f;
      col_f[k] += f * c;
    }
  } else if (v != nullptr) {
#pragma omp simd reduction(+ : e_sum, f_sum)
    for (int64_t k = 0; k < n; ++k) {
      const T e = vexp((s[k] - row_m) * row_scale - row_top);
      e_sum += e;
      f_sum += e * v[k];
    }
  } else {
#pragma omp simd reduction(+ : e_sum, f_sum)
    for (int64_t k = 0; k < n; ++k) {
      const T d = (s[k] - row_m) * row_scale;
      const T e = vexp(d - row_top);
      e_sum += e;
      f_sum += e * d;
    }
  }
  *row_e += e_sum;
  *row_f += f_sum;
}

template <typename T>
DRRHO_INLINE void seg_weights_impl(T* p, int64_t n, T row_scale, T row_m, T row_norm, T row_gain, const T* col_m,
                                   const T* col_scale, const T* col_norm, const T* col_gain) {
  if (col_norm != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const T v = p[k];
      p[k] = row_gain * vexp((v - row_m) * row_scale - row_norm) +
             col_gain[k] * vexp((v - col_m[k]) * col_scale[k] - col_norm[k]);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) p[k] = row_gain * vexp((p[k] - row_m) * row_scale - row_norm);
  }
}

template <typename T>
DRRHO_INLINE void seg_distill_impl(T* p, const T* y, const T* z, int64_t n, T t_d, T row_scale, T row_lse_q,
                                   T row_lse_p, T row_gain, const T* col_scale, const T* col_lse_q,
                                   const T* col_lse_p, const T* col_gain) {
  if (col_gain != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const T zt = z[k] * t_d;
      p[k] += row_gain * (vexp(y[k] * row_scale - row_lse_q) - vexp(zt - row_lse_p)) +
              col_gain[k] * (vexp(y[k] * col_scale[k] - col_lse_q[k]) - vexp(zt - col_lse_p[k]));
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      p[k] += row_gain * (vexp(y[k] * row_scale - row_lse_q) - vexp(z[k] * t_d - row_lse_p));
    }
  }
}

template <typename T>
DRRHO_INLINE T dot_impl(const T* a, const T* b, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

template <typename T>
DRRHO_INLINE void axpy_impl(T* g, const T* partner, int64_t n, T w) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) g[k] -= w * partner[k];
}

template <typename T>
DRRHO_INLINE void exp_array_impl(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = vexp(x[k]);
}

}  // namespace

DRRHO_CLONES float seg_max(const float* s, int64_t n, float row_max, float* col_max) {
  return seg_max_impl(s, n, row_max, col_max);
}
DRRHO_CLONES double seg_max(const double* s, int64_t n, double row_max, double* col_max) {
  return seg_max_impl(s, n, row_max, col_max);
}

// Each loop for float and double (the accumulation dtypes), one clone set per instruction set.
#define DRRHO_BOTH(DECL) DECL(float) DECL(double)

#define DRRHO_SEG_SUMS(T)                                                                                     \
  DRRHO_CLONES void seg_sums(const T* s, const T* v, int64_t n, T row_scale, T row_m, T row_top, T* row_e,    \
                             T* row_f, const T* col_m, const T* col_scale, const T* col_top, T* col_e,        \
                             T* col_f) {                                                                      \
    seg_sums_impl(s, v, n, row_scale, row_m, row_top, row_e, row_f, col_m, col_scale, col_top, col_e, col_f); \
  }
#define DRRHO_SEG_DISTILL(T)                                                                                  \
  DRRHO_CLONES void seg_distill(T* p, const T* y, const T* z, int64_t n, T t_d, T row_scale, T row_lse_q,    \
                                T row_lse_p, T row_gain, const T* col_scale, const T* col_lse_q,               \
                                const T* col_lse_p, const T* col_gain) {                                       \
    seg_distill_impl(p, y, z, n, t_d, row_scale, row_lse_q, row_lse_p, row_gain, col_scale, col_lse_q,        \
                     col_lse_p, col_gain);                                                                     \
  }
#define DRRHO_SEG_WEIGHTS(T)                                                                                  \
  DRRHO_CLONES void seg_weights(T* p, int64_t n, T row_scale, T row_m, T row_norm, T row_gain, const T* col_m, \
                                const T* col_scale, const T* col_norm, const T* col_gain) {                   \
    seg_weights_impl(p, n, row_scale, row_m, row_norm, row_gain, col_m, col_scale, col_norm, col_gain);      \
  }
#define DRRHO_DOT(T) \
  DRRHO_CLONES T dot(const T* a, const T* b, int64_t n) { return dot_impl(a, b, n); }
#define DRRHO_AXPY(T) \
  DRRHO_CLONES void axpy_rows(T* g, const T* partner, int64_t n, T w) { axpy_impl(g, partner, n, w); }

DRRHO_BOTH(DRRHO_SEG_SUMS)
DRRHO_BOTH(DRRHO_SEG_DISTILL)
DRRHO_BOTH(DRRHO_SEG_WEIGHTS)
DRRHO_BOTH(DRRHO_DOT)
DRRHO_BOTH(DRRHO_AXPY)

DRRHO_CLONES void exp_array(const float* x, float* y, int64_t n) { exp_array_impl(x, y, n); }
DRRHO_CLONES void exp_array(const double* x, double* y, int64_t n) { exp_array_impl(x, y, n); }

// ---------------------------------------------------------------------------------------------
// float32 -> bfloat16 / float16 (half_gemm.cpp's rounding of weights).

namespace {

DRRHO_INLINE uint16_t to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

// IEEE half from float, branch free (the algorithm of FP16's fp16_ieee_from_fp32_value, as in
// c10::detail): overflow to inf, subnormals and ties to even by float arithmetic.
DRRHO_INLINE uint16_t to_f16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const float af = f < 0.f ? -f : f;
  float base = (af * scale_to_inf) * scale_to_zero;
  const uint32_t w = std::bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = std::bit_cast<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = std::bit_cast<uint32_t>(base);
  const uint32_t exp_bits = (b >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = b & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <bool BF16>
DRRHO_INLINE uint16_t to_half(float f) {
  if constexpr (BF16) {
    return to_bf16(f);
  } else {
    return to_f16(f);
  }
}

template <bool BF16>
DRRHO_INLINE void round_row_impl(const float* __restrict src, uint16_t* __restrict dst, int64_t n, float scale) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = to_half<BF16>(src[k] * scale);
}

template <bool BF16>
DRRHO_INLINE void round_pair_impl(const float* __restrict a, const float* __restrict b, uint16_t* __restrict dst,
                                  int64_t n, float scale) {
  if (b == nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      dst[2 * k] = to_half<BF16>(a[k] * scale);
      dst[2 * k + 1] = 0;
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      dst[2 * k] = to_half<BF16>(a[k] * scale);
      dst[2 * k + 1] = to_half<BF16>(b[k] * scale);
    }
  }
}

}  // namespace

DRRHO_CLONES void round_half_row(bool bf16, const float* src, uint16_t* dst, int64_t n, float scale) {
  if (bf16) {
    round_row_impl<true>(src, dst, n, scale);
  } else {
    round_row_impl<false>(src, dst, n, scale);
  }
}

DRRHO_CLONES void round_half_pair(bool bf16, const float* a, const float* b, uint16_t* dst, int64_t n, float scale) {
  if (bf16) {
    round_pair_impl<true>(a, b, dst, n, scale);
  } else {
    round_pair_impl<false>(a, b, dst, n, scale);
  }
}

DRRHO_CLONES float abs_max(const float* src, int64_t n) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) {
    const float v = src[k] < 0.f ? -src[k] : src[k];
    m = v > m ? v : m;
  }
  return m;
}

const char* simd_level() {
#if DRRHO_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "default";
}

}  // namespace drrho::cpu
