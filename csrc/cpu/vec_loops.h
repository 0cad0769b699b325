// Inner loops of the CPU kernels: one row segment of a similarity chunk at a time.
//
// Plain C++ over raw pointers (no torch headers), compiled once per instruction set through
// GCC/Clang function multiversioning (see vec_loops.cpp), so that one binary uses AVX-512 where the
// CPU has it and still runs on any x86-64. Everything is declared for float and double; the
// accumulation dtype of the kernels is one of the two.
//
// Notation (SPEC.md, docs/DESIGN.md): a row segment holds S_ij for one anchor row i and a range of
// columns j; d = s (S - m), with m the anchor's margin <x_i, t_i> - <xr_i, tr_i>.
#pragma once

#include <cstdint>

namespace drrho::cpu {

// Running maxima of one row segment s[0:n]: returns max_k s[k] (or `row_max` if larger), and, when
// `col_max` is not null, updates col_max[k] = max(col_max[k], s[k]).
float seg_max(const float* s, int64_t n, float row_max, float* col_max);
double seg_max(const double* s, int64_t n, double row_max, double* col_max);

// Online log-sum-exp sums of one row segment, with the shifts fixed by the max pass:
//   row anchor:  d = (s[k] - row_m) * row_scale,          e = exp(d - row_top),    E += e,  F += e d
//   column k:    c = (s[k] - col_m[k]) * col_scale[k],   f = exp(c - col_top[k]),  col_e[k] += f, col_f[k] += f c
// (the column part only when col_e is not null; with values v, F sums e v[k] instead of e d, and the
// columns f v[k]). E and F are added to *row_e, *row_f.
void seg_sums(const float* s, const float* v, int64_t n, float row_scale, float row_m, float row_top, float* row_e,
              float* row_f, const float* col_m, const float* col_scale, const float* col_top, float* col_e,
              float* col_f);
void seg_sums(const double* s, const double* v, int64_t n, double row_scale, double row_m, double row_top,
              double* row_e, double* row_f, const double* col_m, const double* col_scale, const double* col_top,
              double* col_e, double* col_f);

// Distillation weights added to one row, over every column (SPEC 2.2):
//   p[k] += row_gain (exp(row_scale y[k] - row_lse_q) - exp(t_d z[k] - row_lse_p))
//         + col_gain[k] (exp(col_scale[k] y[k] - col_lse_q[k]) - exp(t_d z[k] - col_lse_p[k]))   (when col_gain)
void seg_distill(float* p, const float* y, const float* z, int64_t n, float t_d, float row_scale, float row_lse_q,
                 float row_lse_p, float row_gain, const float* col_scale, const float* col_lse_q,
                 const float* col_lse_p, const float* col_gain);
void seg_distill(double* p, const double* y, const double* z, int64_t n, double t_d, double row_scale,
                 double row_lse_q, double row_lse_p, double row_gain, const double* col_scale,
                 const double* col_lse_q, const double* col_lse_p, const double* col_gain);

// Backward weights of one row, in place:
//   p[k] = row_gain exp((p[k] - row_m) row_scale - row_norm)
//        + col_gain[k] exp((p[k] - col_m[k]) col_scale[k] - col_norm[k])   (the second term only when col_norm
//                                                                            is not null)
void seg_weights(float* p, int64_t n, float row_scale, float row_m, float row_norm, float row_gain,
                 const float* col_m, const float* col_scale, const float* col_norm, const float* col_gain);
void seg_weights(double* p, int64_t n, double row_scale, double row_m, double row_norm, double row_gain,
                 const double* col_m, const double* col_scale, const double* col_norm, const double* col_gain);

// sum_k a[k] b[k]
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

// g[k] -= w partner[k]
void axpy_rows(float* g, const float* partner, int64_t n, float w);
void axpy_rows(double* g, const double* partner, int64_t n, double w);

// exp through the same code as the loops (for tests of its accuracy), n values.
void exp_array(const float* x, float* y, int64_t n);
void exp_array(const double* x, double* y, int64_t n);

// float32 -> bfloat16 / float16 bits (round to nearest even; NaN stays NaN, float16 overflows to inf),
// for the half-precision tile products (half_gemm.cpp). Each value is multiplied by `scale` (a power of
// two: exact) first.
//   round_half_row:   dst[k] = half(src[k] scale), n values
//   round_half_pair:  dst[2 k] = half(a[k] scale), dst[2 k + 1] = half(b[k] scale) (b null: 0): one VNNI
//                     row pair
void round_half_row(bool bf16, const float* src, uint16_t* dst, int64_t n, float scale);
void round_half_pair(bool bf16, const float* a, const float* b, uint16_t* dst, int64_t n, float scale);
// max_k |src[k]| (NaN ignored)
float abs_max(const float* src, int64_t n);

// The instruction set the multiversioned loops run with on this CPU: "avx512", "avx2" or "default".
const char* simd_level();

}  // namespace drrho::cpu
