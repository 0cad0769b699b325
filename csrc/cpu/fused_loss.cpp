// DRRho-CLIP fused forward and backward on CPU tensors (SPEC.md; the op pair: drrho_kernels/ops.py).
//
// Math (per anchor row i, column j, positive column p(i) = offset + i excluded by index):
//
//   S^I_ij = <x_i, T_j> - <xr_i, Tr_j>,   S^T_ij = <t_i, X_j> - <tr_i, Xr_j>,   m_i = <x_i,t_i> - <xr_i,tr_i>
//   d_ij   = s_i (S_ij - m_i)            (s_i = scale[k, i], the anchor's scale in its direction k)
//   forward:  M_i = max_j d_ij,  E_i = sum_j exp(d_ij - M_i),  F_i = sum_j exp(d_ij - M_i) d_ij
//             returned as stats [2, 3, B]; the epilogue (new u, weights) is drrho_kernels/_math.py
//   backward: w_ij = exp(s_i (S_ij - m_i) - norm_i),  P^x_ij = gain^I_i w^I_ij + [fold] gain^T_j w^T_{j,i}
//             d x_i = sum_j P^x_ij T_j - partner_i t_i      partner_i = sum_k gain^k_i wsum^k_i
//             d t_i = sum_j P^t_ij X_j - partner_i x_i
//             d T_j = sum_i gain^I_i w^I_ij x_i,  d X_j = sum_i gain^T_i w^T_ij t_i   (column_grads)
//
// Tiling: rows are processed in chunks of R rows, R x N about `chunk_bytes` (4 MiB) per worker, so
// no [B, N] matrix is ever held. The chunks are handed out dynamically to one worker per thread
// (see run_chunks): a worker computes its chunk's similarity with one or two ATen GEMMs (mm, then
// addmm for the reference), single-threaded, and then, on the same core, a single fused pass does
// all the exp/reduction work of the chunk with the multiversioned SIMD loops of vec_loops.cpp; the
// backward's weighted products are two more GEMMs on the chunk.
//
// Single process (columns_are_rows: X = x, T = t): S^T = (S^I)^T, so one similarity chunk serves
// both directions. The forward reduces each chunk along rows (image anchors) and along columns
// (text anchors: column j of the chunk is text anchor j over image columns i); the backward forms
// P = G^I W^I + (G^T W^T)^T once and gives d x_c = P_c t and d t += P_c^T x_c. Six GEMM-sized products per
// step (2 forward, 2 recomputed, 2 weighted), the floor.
//
// Half inputs (bfloat16, float16): where half_gemm.h chose a half-precision path for the dtype (once per
// process), the products read the inputs in their dtype with float32 accumulation and float32 output;
// the backward's weights are rounded to the dtype for the two weighted products, and the column-sum
// gradients accumulate transposed ([d, n], blocks of 64 columns). Otherwise (the upcast path) the
// inputs are converted to float32 once and everything is the float32 computation. Either way every
// exponential, statistic and sum is float32.
//
// Reproducibility: row statistics and row gradients are computed by one worker in a fixed order.
// Sums over rows (the text anchors' statistics in one process, d t in one process, the column
// gradients) add the chunks' contributions in the order the workers finish them, so with more
// than one thread they are reproducible to rounding, not bitwise.
#include "fused_loss.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <ctime>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "half_gemm.h"
#include "vec_loops.h"

namespace drrho::cpu {
namespace {

constexpr int64_t kDefaultChunkBytes = int64_t(4) << 20;   // one worker's [R, N] chunk: 4 MiB
constexpr int64_t kDefaultColBlock = 256;                  // R x 256 floats = 256 KiB at R = 256: L2
constexpr int64_t kDefaultSpreadRows = 64;                 // smallest chunk made to spread work over threads
constexpr int64_t kMinChunkRows = 128;                     // thinner GEMMs lose MKL efficiency (measured:
                                                           // B = N = 16384, d = 512: 42/64 rows 14-16 s,
                                                           // 128 rows 11.8 s, 256 rows 11.2 s per step)

std::atomic<int64_t> g_chunk_bytes{0};                     // 0: automatic (see chunk_rows)
std::atomic<int64_t> g_col_block{kDefaultColBlock};
std::atomic<int64_t> g_spread_rows{kDefaultSpreadRows};

// Optional phase timing (set_profiling): thread CPU time spent in each phase, summed over workers.
enum Phase { kSimilarityGemm, kForwardPass, kBackwardPass, kWeightedGemm, kPhaseCount };
constexpr const char* kPhaseNames[kPhaseCount] = {"similarity_gemm", "forward_exp_pass", "backward_exp_pass",
                                                  "weighted_gemm"};
std::atomic<bool> g_profiling{false};
std::atomic<int64_t> g_phase_ns[kPhaseCount];

// CPU time of the calling thread (wall time where POSIX thread clocks are missing): a worker that
// the OS suspends does not count as busy.
int64_t thread_ns() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

class PhaseTimer {
 public:
  explicit PhaseTimer(Phase phase) : phase_(phase), on_(g_profiling.load(std::memory_order_relaxed)) {
    if (on_) start_ = thread_ns();
  }
  ~PhaseTimer() {
    if (on_) g_phase_ns[phase_].fetch_add(thread_ns() - start_, std::memory_order_relaxed);
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  Phase phase_;
  bool on_;
  int64_t start_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Argument checks. The public API validates everything before calling the op (same messages for
// every backend); these guard direct calls of the op and name the argument.

void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, ": expected a 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              ": expected a floating dtype, got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  check_matrix(op, name, t);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, op, ": ", name, ": expected shape (", rows, ", ",
              cols, "), got ", t.sizes());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, ": expected shape (", n, "), got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              ": expected a floating dtype, got ", t.scalar_type());
}

struct Shapes {
  int64_t B, N, d, dr;
  bool ref;
};

Shapes check_embeddings(const char* op, const at::Tensor& img, const at::Tensor& txt,
                        const at::Tensor& img_all, const at::Tensor& txt_all, const OptTensor& ref_img,
                        const OptTensor& ref_txt, const OptTensor& ref_img_all,
                        const OptTensor& ref_txt_all, int64_t offset, bool columns_are_rows) {
  check_matrix(op, "img", img);
  const int64_t B = img.size(0), d = img.size(1);
  check_shape(op, "txt", txt, B, d);
  TORCH_CHECK(txt.scalar_type() == img.scalar_type(), op, ": txt: expected dtype ", img.scalar_type(),
              " (the dtype of img), got ", txt.scalar_type());
  check_matrix(op, "img_all", img_all);
  const int64_t N = img_all.size(0);
  check_shape(op, "img_all", img_all, N, d);
  check_shape(op, "txt_all", txt_all, N, d);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"img_all", &img_all},
                                {"txt_all", &txt_all}}) {
    TORCH_CHECK(t->scalar_type() == img.scalar_type(), op, ": ", name, ": expected dtype ",
                img.scalar_type(), " (the dtype of img), got ", t->scalar_type());
  }
  TORCH_CHECK((0 <= offset && offset <= N - B) || offset == N, op, ": offset: expected 0 <= offset <= N - B = ",
              N - B, " (N = ", N, " columns, B = ", B, " rows), or N (no row is a column), got ", offset);
  TORCH_CHECK(!columns_are_rows || (N == B && offset == 0), op,
              ": columns_are_rows: expected img_all of the shape of img (N = B, offset = 0), got N = ", N,
              ", B = ", B, ", offset = ", offset);
  TORCH_CHECK(ref_img.has_value() == ref_txt.has_value(), op,
              ": ref_img and ref_txt: expected both or neither");
  TORCH_CHECK(ref_img_all.has_value() == ref_img.has_value() && ref_txt_all.has_value() == ref_img.has_value(),
              op, ": ref_img_all and ref_txt_all: expected tensors exactly when ref_img and ref_txt are given");
  int64_t dr = 0;
  if (ref_img.has_value()) {
    check_matrix(op, "ref_img", *ref_img);
    dr = ref_img->size(1);
    check_shape(op, "ref_img", *ref_img, B, dr);
    check_shape(op, "ref_txt", *ref_txt, B, dr);
    check_shape(op, "ref_img_all", *ref_img_all, N, dr);
    check_shape(op, "ref_txt_all", *ref_txt_all, N, dr);
  }
  return {B, N, d, dr, ref_img.has_value()};
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// Inputs in the accumulation dtype, contiguous (no copy when they already are), detached (the
// kernels' ATen calls are plain computations, also on the worker threads).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.detach().to(acc).contiguous(); }

at::Tensor opt_acc(const OptTensor& t, at::ScalarType acc) {
  return t.has_value() ? as_acc(*t, acc) : at::Tensor();
}

// Rows per chunk: as many as fit in chunk_bytes (automatic, the default: 4 MiB but at least
// kMinChunkRows rows, so above N = 8192 columns a chunk grows linearly in N rather than starving the
// GEMMs; set explicitly: exactly that), and no more than it takes to give every thread two chunks, as
// long as chunks keep at least spread_rows rows.
int64_t chunk_rows(int64_t B, int64_t N, int64_t elem_size) {
  const int64_t per_row = std::max<int64_t>(1, N) * elem_size;
  const int64_t chunk_bytes = g_chunk_bytes.load();
  const int64_t fit = chunk_bytes > 0 ? chunk_bytes / per_row
                                      : std::max<int64_t>(kDefaultChunkBytes / per_row, kMinChunkRows);
  int64_t rows = std::clamp<int64_t>(fit, 1, std::max<int64_t>(B, 1));
  const int64_t spread = g_spread_rows.load();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (spread > 0 && threads > 1) {
    const int64_t balanced = std::max<int64_t>(spread, (B + 2 * threads - 1) / (2 * threads));
    rows = std::min(rows, balanced);
  }
  return rows;
}

// Online statistics of a set of entries: max, sum exp(d - max), sum exp(d - max) d. An empty set has
// e == 0 (a non-empty one has e >= 1: its maximum contributes exp(0)).
template <typename T>
struct Stats {
  T top, e, f;
};

template <typename T>
void merge_into(T& top, T& e, T& f, T top2, T e2, T f2) {
  if (e2 == T(0)) return;
  if (e == T(0)) {
    top = top2, e = e2, f = f2;
    return;
  }
  const T m = std::max(top, top2);
  const T a = std::exp(top - m), b = std::exp(top2 - m);
  e = e * a + e2 * b;
  f = f * a + f2 * b;
  top = m;
}

// The similarity chunk S = rows cols^T - ref_rows ref_cols^T into `out` [R, N].
void similarity(at::Tensor& out, const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& ref_rows,
                const at::Tensor& ref_cols) {
  PhaseTimer timer(kSimilarityGemm);
  at::mm_out(out, rows, cols.t());
  if (ref_rows.defined()) out.addmm_(ref_rows, ref_cols.t(), /*beta=*/1, /*alpha=*/-1);
}

at::Tensor rows_of(const at::Tensor& t, int64_t r0, int64_t rows) {
  return t.defined() ? t.narrow(0, r0, rows) : t;
}

// The rows' own similarities <a_i, b_i>.
template <typename T>
void pair_dots(const at::Tensor& a, const at::Tensor& b, T* out) {
  const int64_t B = a.size(0), d = a.size(1);
  const T* pa = a.data_ptr<T>();
  const T* pb = b.data_ptr<T>();
  at::parallel_for(0, B, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = dot(pa + i * d, pb + i * d, d);
  });
}

// Work distribution. The row chunks are handed out dynamically (an atomic counter) to `workers`
// workers, one per thread, in a single parallel region per pass: each worker runs a chunk's GEMMs
// itself (the BLAS runs single-threaded inside a parallel region) and then the chunk's fused
// exp/reduction pass, on the same core, with no barrier between chunks. A thread that is slowed
// down (other processes on the machine) simply takes fewer chunks. With one worker (one thread, or
// one chunk) the body runs on the calling thread and its ATen calls and at::parallel_for loops use
// all threads.
int64_t worker_count(int64_t n_chunks) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
}

template <typename F>
void run_chunks(int64_t n_chunks, int64_t workers, const F& body) {
  if (workers <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) body(c, int64_t(0));
    half_gemm_release();   // brgemm's hardware context of this thread (no-op when none was used)
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    // Thread-local dispatch state is not inherited by the pool's threads: set it here too.
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) body(c, w);
    }
    half_gemm_release();
  });
}

// out [n, d] += alpha P^T a (P [r, n], a [r, d]) from several workers at once: the rows of `out` are
// split in blocks, each with a lock; a worker updates the blocks in its own rotation and skips a
// busy block for later, so workers rarely wait. (The order in which chunks reach a block then
// depends on timing: with more than one worker the sums are reproducible to rounding, not bitwise.)
// `transposed` (the half-precision products): the target is outT [d, n], its columns split in blocks
// that start at multiples of `align`, updated by add_with's function.
class LockedAccumulator {
 public:
  LockedAccumulator(at::Tensor out, int64_t workers, int64_t align = 1, bool transposed = false)
      : out_(std::move(out)), workers_(std::max<int64_t>(1, workers)), align_(std::max<int64_t>(1, align)) {
    n_ = transposed ? out_.size(1) : out_.size(0);
    blocks_ = workers_ == 1 ? 1 : std::clamp<int64_t>(4 * workers_, 1, std::max<int64_t>(1, n_ / 64));
    locks_ = std::make_unique<std::mutex[]>(static_cast<size_t>(blocks_));
  }

  at::Tensor& target() { return out_; }

  void add(const at::Tensor& P, const at::Tensor& a, double alpha, int64_t worker) {
    add_with(worker, [&](int64_t j0, int64_t j1) {
      out_.narrow(0, j0, j1 - j0).addmm_(P.narrow(1, j0, j1 - j0).t(), a, /*beta=*/1, /*alpha=*/alpha);
    });
  }

  // update(j0, j1) for every block [j0, j1) of the target, each under its lock.
  template <typename F>
  void add_with(int64_t worker, const F& update) {
    std::vector<char> done(static_cast<size_t>(blocks_), 0);
    int64_t left = blocks_;
    const int64_t start = (worker % workers_) * blocks_ / workers_;
    while (left > 0) {
      bool progress = false;
      for (int64_t k = 0; k < blocks_; ++k) {
        const int64_t b = (start + k) % blocks_;
        if (done[b]) continue;
        std::unique_lock<std::mutex> lock(locks_[b], std::try_to_lock);
        if (!lock.owns_lock()) continue;
        run_block(b, update);
        done[b] = 1, --left, progress = true;
      }
      if (!progress) {   // every remaining block is busy: wait for one
        int64_t b = 0;
        while (done[b]) ++b;
        std::lock_guard<std::mutex> lock(locks_[b]);
        run_block(b, update);
        done[b] = 1, --left;
      }
    }
  }

 private:
  int64_t bound(int64_t b) const { return b >= blocks_ ? n_ : (b * n_ / blocks_) / align_ * align_; }

  template <typename F>
  void run_block(int64_t b, const F& update) {
    const int64_t j0 = bound(b), j1 = bound(b + 1);
    if (j1 > j0) update(j0, j1);
  }

  at::Tensor out_;
  int64_t workers_, align_, n_ = 0, blocks_ = 1;
  std::unique_ptr<std::mutex[]> locks_;
};

// The half-precision tile products of one direction (half_gemm.h): its anchor rows (and the reference's)
// in the input dtype, its columns packed once per step for the scores (the reference's with the factor
// `ref_alpha`: -1 when the two products accumulate into S = y - z, 1 when z is kept apart) and, with
// `values`, for the weighted product P cols.
struct HalfDirection {
  at::Tensor rows, ref_rows;
  PackedHalf cols, ref_cols, values;
};

HalfDirection half_direction(HalfPath path, const at::Tensor& rows, const OptTensor& ref_rows, const at::Tensor& cols,
                             const OptTensor& ref_cols, double ref_alpha, bool values) {
  HalfDirection h;
  h.rows = rows.detach().contiguous();
  h.cols = PackedHalf::for_nt(path, cols.detach(), 1.0);
  if (ref_rows.has_value()) {
    h.ref_rows = ref_rows->detach().contiguous();
    h.ref_cols = PackedHalf::for_nt(path, ref_cols->detach(), ref_alpha);
  }
  if (values) h.values = PackedHalf::for_nn(path, cols.detach());
  return h;
}

std::vector<HalfWorker> half_workers(HalfPath path, at::ScalarType dtype, int64_t workers) {
  std::vector<HalfWorker> out(static_cast<size_t>(workers));
  for (HalfWorker& w : out) w.path = path, w.dtype = dtype;
  return out;
}

// The forward's fused pass over one chunk S [rows, N] (rows r0 .. r0 + rows of the batch): for every
// row anchor, its online statistics over all columns but its positive (written to row_*, complete);
// with `col_*` given (columns_are_rows), also every column anchor's statistics over the chunk's rows
// (merged into col_*). The exponent is d = scale (S - m) with the anchor's scale and m; F sums e d, or
// e V with values V [rows, N] given. Work is split in column blocks of a fixed width: a block owns its
// columns (the column statistics need no synchronisation) and leaves per-row partials, merged in
// block order, so the result does not depend on how blocks are spread over threads. Inside a worker
// the at::parallel_for loops below run serially; on the calling thread they use all threads.
// Scales are positive: d increases with S, so the maxima of S give the maxima of d.
template <typename T>
void chunk_stats(const T* S, const T* V, int64_t rows, int64_t N, int64_t r0, int64_t offset, const T* row_m,
                 const T* col_m, const T* row_scale, const T* col_scale, T* row_top, T* row_e, T* row_f,
                 T* col_top, T* col_e, T* col_f) {
  PhaseTimer timer(kForwardPass);
  const bool cols = col_top != nullptr;
  const int64_t block = std::max<int64_t>(1, g_col_block.load());
  const int64_t nblk = (N + block - 1) / block;
  std::vector<Stats<T>> partial(static_cast<size_t>(nblk * rows));
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> cmax(cols ? block : 0), ctop(cols ? block : 0), ce(cols ? block : 0),
        cf(cols ? block : 0), rmax(rows);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * block, c1 = std::min(N, c0 + block), w = c1 - c0;
      if (cols) std::fill(cmax.begin(), cmax.begin() + w, kNegInf<T>);
      // The (up to two) segments of row i inside [c0, c1) that exclude its positive column p (p >= N:
      // the rows are not among the columns, nothing is excluded).
      auto segments = [&](int64_t i, auto&& fn) {
        const int64_t p = offset + r0 + i;
        if (p > c0) fn(i, c0, std::min(p, c1));
        const int64_t start = std::max(p + 1, c0);
        if (start < c1) fn(i, start, c1);
      };
      // Pass 1: maxima of S.
      for (int64_t i = 0; i < rows; ++i) {
        T m = kNegInf<T>;
        segments(i, [&](int64_t, int64_t a, int64_t z) {
          m = seg_max(S + i * N + a, z - a, m, cols ? cmax.data() + (a - c0) : nullptr);
        });
        rmax[i] = m;
      }
      if (cols) {
        for (int64_t k = 0; k < w; ++k) {
          ctop[k] = cmax[k] == kNegInf<T> ? kNegInf<T> : (cmax[k] - col_m[c0 + k]) * col_scale[c0 + k];
          ce[k] = T(0);
          cf[k] = T(0);
        }
      }
      // Pass 2: the exponential sums, rows and columns in one sweep over the block.
      for (int64_t i = 0; i < rows; ++i) {
        const T rm = row_m[r0 + i], rs = row_scale[r0 + i];
        const T top = rmax[i] == kNegInf<T> ? kNegInf<T> : (rmax[i] - rm) * rs;
        T e = T(0), f = T(0);
        segments(i, [&](int64_t, int64_t a, int64_t z) {
          const int64_t k = a - c0;
          seg_sums(S + i * N + a, V != nullptr ? V + i * N + a : nullptr, z - a, rs, rm, top, &e, &f,
                   cols ? col_m + a : nullptr, cols ? col_scale + a : nullptr, cols ? ctop.data() + k : nullptr,
                   cols ? ce.data() + k : nullptr, cols ? cf.data() + k : nullptr);
        });
        partial[static_cast<size_t>(b * rows + i)] = {top, e, f};
      }
      if (cols) {
        for (int64_t k = 0; k < w; ++k) {
          merge_into(col_top[c0 + k], col_e[c0 + k], col_f[c0 + k], ctop[k], ce[k], cf[k]);
        }
      }
    }
  });
  for (int64_t i = 0; i < rows; ++i) {
    T top = kNegInf<T>, e = T(0), f = T(0);
    for (int64_t b = 0; b < nblk; ++b) {
      const auto& p = partial[static_cast<size_t>(b * rows + i)];
      merge_into(top, e, f, p.top, p.e, p.f);
    }
    row_top[r0 + i] = top, row_e[r0 + i] = e, row_f[r0 + i] = f;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: stats [2, K, B] (direction, statistic, anchor; drrho_kernels/_inputs.py STATS), margin [B],
// positives [2, B]. K = 3: the DRRho statistics of S = y - z. K = 12 (with_distill or with_alone): also the
// target's (y, scale s), the teacher's (z, scale t_d, values y) and the reference's (z, scale s), each
// over the negatives, with the pair's own y_i or z_i as the shift. y and z stay apart in two buffers
// (the same two products as S = y - z needs).

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(
    const Shapes& sh, at::ScalarType acc, const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all,
    const at::Tensor& txt_all, const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all,
    const OptTensor& ref_txt_all, const at::Tensor& scale, int64_t offset, bool columns_are_rows, double distill_scale,
    bool extras) {
  const int64_t B = sh.B, N = sh.N;
  const int64_t K = extras ? 12 : 3;
  const auto opts = img.options().dtype(acc);
  // Half inputs: tile products in the input dtype with float32 accumulation where that path was chosen
  // (half_gemm.h), else (upcast) the float32 products on the inputs converted once.
  const HalfPath hp = std::is_same_v<T, float> ? half_gemm_path(img.scalar_type()) : HalfPath::kUpcast;
  const bool half = hp != HalfPath::kUpcast;
  const at::Tensor x = as_acc(img, acc), t = as_acc(txt, acc);
  const at::Tensor xr = opt_acc(ref_img, acc), tr = opt_acc(ref_txt, acc);
  // Single process: the columns are the rows (same values), use the rows' buffers. (Half path: the
  // products read the inputs themselves; no float32 columns.)
  const at::Tensor X = columns_are_rows ? x : half ? at::Tensor() : as_acc(img_all, acc);
  const at::Tensor Tc = columns_are_rows ? t : half ? at::Tensor() : as_acc(txt_all, acc);
  const at::Tensor Xr = columns_are_rows ? xr : half ? at::Tensor() : opt_acc(ref_img_all, acc);
  const at::Tensor Tr = columns_are_rows ? tr : half ? at::Tensor() : opt_acc(ref_txt_all, acc);
  const at::Tensor sc = as_acc(scale, acc);
  const T* s_dir[2] = {sc.data_ptr<T>(), sc.data_ptr<T>() + B};
  const bool ref = sh.ref;
  const std::vector<T> teacher(static_cast<size_t>(std::max(B, N)), static_cast<T>(distill_scale));

  at::Tensor positives = at::zeros({2, B}, opts);
  T* py = positives.data_ptr<T>();
  T* pz = py + B;
  pair_dots<T>(x, t, py);
  if (ref) pair_dots<T>(xr, tr, pz);
  at::Tensor margin = positives[0] - positives[1];
  const T* pm = margin.data_ptr<T>();

  at::Tensor stats = at::zeros({2, K, B}, opts);
  T* base = stats.data_ptr<T>();
  auto stat_rows = [&](int64_t dir, int64_t group) { return base + (dir * K + 3 * group) * B; };
  // The statistic groups: (shift, scale of the rows, values, source: 0 = S, 1 = y, 2 = z).
  struct Group {
    const T* shift;
    bool teacher_scale;
    bool values_y;
    int source;
  };
  std::vector<Group> groups{{pm, false, false, 0}};
  if (extras) {
    groups.push_back({py, false, false, 1});
    if (ref) {
      groups.push_back({pz, true, true, 2});
      groups.push_back({pz, false, false, 2});
    }
  }
  const int64_t G = static_cast<int64_t>(groups.size());

  const int64_t R = chunk_rows(B, N, sizeof(T));
  const int64_t n_chunks = (B + R - 1) / R;
  const int64_t workers = worker_count(n_chunks);
  const bool split = extras && ref;       // y and z apart (else one buffer: S, or y without a reference)
  std::vector<at::Tensor> buffers(static_cast<size_t>(workers)), zbuffers(static_cast<size_t>(workers));
  HalfDirection hdir[2];
  std::vector<HalfWorker> hworkers;
  if (half) {
    const double ref_alpha = split ? 1.0 : -1.0;
    hdir[0] = half_direction(hp, img, ref_img, columns_are_rows ? txt : txt_all, columns_are_rows ? ref_txt : ref_txt_all,
                             ref_alpha, false);
    if (!columns_are_rows) hdir[1] = half_direction(hp, txt, ref_txt, img_all, ref_img_all, ref_alpha, false);
    hworkers = half_workers(hp, img.scalar_type(), workers);
  }
  // Single process: each worker's column (text anchor) statistics over the chunks it took, per group.
  std::vector<std::vector<T>> col_stats(static_cast<size_t>(columns_are_rows ? workers : 0));
  auto direction = [&](int64_t dir, const at::Tensor& rows_t, const at::Tensor& cols_t, const at::Tensor& rref,
                       const at::Tensor& cref, int64_t r0, int64_t rows, int64_t w) {
    at::Tensor& yb = buffers[static_cast<size_t>(w)];
    if (!yb.defined()) yb = at::empty({R, N}, opts);
    at::Tensor Y = yb.narrow(0, 0, rows);
    at::Tensor Z;
    if (split) {
      at::Tensor& zb = zbuffers[static_cast<size_t>(w)];
      if (!zb.defined()) zb = at::empty({R, N}, opts);
      Z = zb.narrow(0, 0, rows);
    }
    if (half) {
      PhaseTimer timer(kSimilarityGemm);
      const HalfDirection& h = hdir[dir];
      HalfWorker& hw = hworkers[static_cast<size_t>(w)];
      half_gemm_nt(Y, h.rows.narrow(0, r0, rows), h.cols, false, hw);
      if (split) {
        half_gemm_nt(Z, h.ref_rows.narrow(0, r0, rows), h.ref_cols, false, hw);
      } else if (ref && !extras) {
        half_gemm_nt(Y, h.ref_rows.narrow(0, r0, rows), h.ref_cols, true, hw);   // S = y - z
      }
    } else if (split) {
      PhaseTimer timer(kSimilarityGemm);
      at::mm_out(Y, rows_of(rows_t, r0, rows), cols_t.t());
      at::mm_out(Z, rows_of(rref, r0, rows), cref.t());
    } else {
      similarity(Y, rows_of(rows_t, r0, rows), cols_t, extras ? at::Tensor() : rows_of(rref, r0, rows), cref);
    }
    const bool cols = columns_are_rows;
    std::vector<T> unused;
    auto& cs = cols ? col_stats[static_cast<size_t>(w)] : unused;
    if (cols && cs.empty()) {
      cs.assign(static_cast<size_t>(3 * G * N), T(0));
      for (int64_t g = 0; g < G; ++g) std::fill(cs.begin() + 3 * g * N, cs.begin() + (3 * g + 1) * N, kNegInf<T>);
    }
    // the extra groups first (they read y and z), then S = y - z in y's buffer for the DRRho group
    for (int64_t g = G - 1; g >= 0; --g) {
      const Group& grp = groups[static_cast<size_t>(g)];
      if (g == 0 && split) Y.sub_(Z);
      const T* src = grp.source == 2 ? Z.data_ptr<T>() : Y.data_ptr<T>();
      const T* row_scale = grp.teacher_scale ? teacher.data() : s_dir[dir];
      const T* col_scale = grp.teacher_scale ? teacher.data() : s_dir[1 - dir];
      T* rs = stat_rows(dir, g);
      T* cg = cols ? cs.data() + 3 * g * N : nullptr;
      chunk_stats<T>(src, grp.values_y ? Y.data_ptr<T>() : nullptr, rows, N, r0, offset, grp.shift, grp.shift,
                     row_scale, col_scale, rs, rs + B, rs + 2 * B, cg, cols ? cg + N : nullptr,
                     cols ? cg + 2 * N : nullptr);
    }
  };
  run_chunks(n_chunks, workers, [&](int64_t c, int64_t w) {
    const int64_t r0 = c * R, rows = std::min(R, B - r0);
    // Image anchors against text columns: y = x_c T^T, z = xr_c Tr^T.
    direction(0, x, Tc, xr, Tr, r0, rows, w);
    // One process: column j of the chunk is text anchor j over image columns i (S^T = (S^I)^T); else
    // the text anchors against the image columns.
    if (!columns_are_rows) direction(1, t, X, tr, Xr, r0, rows, w);
  });
  buffers.clear();
  zbuffers.clear();
  if (columns_are_rows) {   // the text anchors' statistics: the workers' column statistics merged
    at::parallel_for(0, N, 512, [&](int64_t j0, int64_t j1) {
      for (int64_t g = 0; g < G; ++g) {
        T* out = stat_rows(1, g);
        for (int64_t j = j0; j < j1; ++j) {
          T top = kNegInf<T>, e = T(0), f = T(0);
          for (const auto& cs : col_stats) {
            if (!cs.empty()) merge_into(top, e, f, cs[3 * g * N + j], cs[(3 * g + 1) * N + j], cs[(3 * g + 2) * N + j]);
          }
          out[j] = top, out[B + j] = e, out[2 * B + j] = f;
        }
      }
    });
  }
  return {stats, margin, positives};
}

// ---------------------------------------------------------------------------------------------
// Backward.

// One anchor set's weight description: w_ij = gain_i exp(scale_i (S_ij - margin_i) - norm_i), and
// with distillation dgain_i (exp(scale_i y_ij - lse_q_i) - exp(t_d z_ij - lse_p_i)).
template <typename T>
struct AnchorWeights {
  const T *scale, *margin, *norm, *gain;
  const T *lse_q = nullptr, *lse_p = nullptr, *dgain = nullptr;
};

// The weights of one chunk, in place: S [rows, N] becomes P_ij = row weight of anchor r0 + i
// + [col.norm] the column anchor j's weight, with the positives set to 0; then, with distillation
// (y, z given), the distillation weights of the row anchor and [col.dgain] of the column anchor, over
// every column, the positive included.
template <typename T>
void chunk_weights(T* S, const T* y, const T* z, T t_d, int64_t rows, int64_t N, int64_t r0, int64_t offset,
                   const AnchorWeights<T>& row, const AnchorWeights<T>& col) {
  PhaseTimer timer(kBackwardPass);
  at::parallel_for(0, rows, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* p = S + i * N;
      const int64_t r = r0 + i;
      seg_weights(p, N, row.scale[r], row.margin[r], row.norm[r], row.gain[r], col.margin, col.scale, col.norm,
                  col.gain);
      if (offset + r < N) p[offset + r] = T(0);
      if (y != nullptr && row.dgain != nullptr) {
        seg_distill(p, y + i * N, z + i * N, N, t_d, row.scale[r], row.lse_q[r], row.lse_p[r], row.dgain[r],
                    col.scale, col.lse_q, col.lse_p, col.dgain);
      }
    }
  });
}

// g_i -= partner_i * a_i for rows r0 .. r0 + rows.
template <typename T>
void subtract_partner(at::Tensor& g, const at::Tensor& a, const T* partner, int64_t r0, int64_t rows) {
  const int64_t d = g.size(1);
  T* pg = g.data_ptr<T>();
  const T* pa = a.data_ptr<T>();
  at::parallel_for(r0, r0 + rows, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) axpy_rows(pg + i * d, pa + i * d, d, partner[i]);
  });
}

// A gradient in the layout torch.empty_like(like) has (what the fake implementation promises).
at::Tensor like_input(const at::Tensor& grad, const at::Tensor& like) {
  if (like.is_contiguous()) return grad.to(like.scalar_type());
  at::Tensor out = at::empty_like(like);
  out.copy_(grad);
  return out;
}

// One direction of the general backward: anchors `rows` against columns `cols`.
template <typename T>
struct Direction {
  const at::Tensor &rows, &ref_rows, &cols, &ref_cols;
  AnchorWeights<T> weights, fold;
  at::Tensor& out;
  LockedAccumulator* out_cols;
};

const at::Tensor* opt_ptr(const OptTensor& t) { return t.has_value() ? &*t : nullptr; }

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const Shapes& sh, at::ScalarType acc, const at::Tensor& gain, const OptTensor& col_gain, const OptTensor& dgain,
    const OptTensor& col_dgain, const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all,
    const at::Tensor& txt_all, const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all,
    const OptTensor& ref_txt_all, const at::Tensor& scale, int64_t offset, bool columns_are_rows, double distill_scale,
    const at::Tensor& log_norm, const at::Tensor& wsum, const at::Tensor& margin, const OptTensor& col_scale,
    const OptTensor& col_log_norm, const OptTensor& col_margin, const OptTensor& lse_q, const OptTensor& lse_p,
    const OptTensor& col_lse_q, const OptTensor& col_lse_p, bool column_grads) {
  const int64_t B = sh.B, N = sh.N, d = sh.d;
  const auto opts = img.options().dtype(acc);
  const bool fold = columns_are_rows || col_log_norm.has_value();
  const bool distill = dgain.has_value();
  const T t_d = static_cast<T>(distill_scale);
  column_grads = column_grads && !columns_are_rows;

  const at::Tensor x = as_acc(img, acc), t = as_acc(txt, acc);
  const at::Tensor xr = opt_acc(ref_img, acc), tr = opt_acc(ref_txt, acc);
  const at::Tensor sc = as_acc(scale, acc), nu = as_acc(log_norm, acc), g = as_acc(gain, acc);
  const at::Tensor m = as_acc(margin, acc);
  const at::Tensor partner = (g * as_acc(wsum, acc)).sum(0).contiguous();   // sum_k gain_k wsum_k per row
  const T* pp = partner.data_ptr<T>();
  const at::Tensor dg = opt_acc(dgain, acc), lq = opt_acc(lse_q, acc), lp = opt_acc(lse_p, acc);
  // The anchors' weights per direction (k = 0: image anchors, 1: text anchors), rows and the fold's columns.
  auto anchors = [&](const at::Tensor& s, const at::Tensor& n, const at::Tensor& gg, const at::Tensor& mm,
                     const at::Tensor& q, const at::Tensor& p, const at::Tensor& dgg, int64_t k, int64_t len) {
    AnchorWeights<T> a{s.data_ptr<T>() + k * len, mm.data_ptr<T>(), n.data_ptr<T>() + k * len,
                       gg.data_ptr<T>() + k * len};
    if (dgg.defined()) {
      a.lse_q = q.data_ptr<T>() + k * len, a.lse_p = p.data_ptr<T>() + k * len, a.dgain = dgg.data_ptr<T>() + k * len;
    }
    return a;
  };
  const AnchorWeights<T> row_w[2] = {anchors(sc, nu, g, m, lq, lp, dg, 0, B), anchors(sc, nu, g, m, lq, lp, dg, 1, B)};
  at::Tensor csc, cnu, cg, cm, clq, clp, cdg;
  AnchorWeights<T> col_w[2] = {{nullptr, nullptr, nullptr, nullptr}, {nullptr, nullptr, nullptr, nullptr}};
  if (columns_are_rows) {
    col_w[0] = row_w[0], col_w[1] = row_w[1];
  } else if (fold) {
    csc = as_acc(*col_scale, acc), cnu = as_acc(*col_log_norm, acc), cg = as_acc(*col_gain, acc);
    cm = as_acc(*col_margin, acc);
    if (distill) clq = as_acc(*col_lse_q, acc), clp = as_acc(*col_lse_p, acc), cdg = as_acc(*col_dgain, acc);
    col_w[0] = anchors(csc, cnu, cg, cm, clq, clp, cdg, 0, N), col_w[1] = anchors(csc, cnu, cg, cm, clq, clp, cdg, 1, N);
  }
  const AnchorWeights<T> none{nullptr, nullptr, nullptr, nullptr};

  const int64_t R = chunk_rows(B, N, sizeof(T));
  const int64_t n_chunks = (B + R - 1) / R;
  const int64_t workers = worker_count(n_chunks);
  std::vector<at::Tensor> buffers(static_cast<size_t>(workers)), spares(static_cast<size_t>(workers)),
      ybuf(static_cast<size_t>(workers)), zbuf(static_cast<size_t>(workers));
  auto buffer_of = [&](std::vector<at::Tensor>& pool, int64_t w, int64_t rows) {
    at::Tensor& b = pool[static_cast<size_t>(w)];
    if (!b.defined()) b = at::empty({R, N}, opts);
    return b.narrow(0, 0, rows);
  };
  // Half inputs on a half-precision path (half_gemm.h): the products read the inputs in their dtype (the
  // columns packed once here); the column-sum gradients accumulate transposed ([d, n], blocks of 64).
  const HalfPath hp = std::is_same_v<T, float> ? half_gemm_path(img.scalar_type()) : HalfPath::kUpcast;
  const bool half = hp != HalfPath::kUpcast;
  HalfDirection hdir[2];
  std::vector<HalfWorker> hworkers;
  if (half) {
    const double ref_alpha = distill ? 1.0 : -1.0;   // distillation keeps y and z apart
    hdir[0] = half_direction(hp, img, ref_img, columns_are_rows ? txt : txt_all, columns_are_rows ? ref_txt : ref_txt_all,
                             ref_alpha, true);
    if (!columns_are_rows) hdir[1] = half_direction(hp, txt, ref_txt, img_all, ref_img_all, ref_alpha, true);
    hworkers = half_workers(hp, img.scalar_type(), workers);
  }
  // The chunk's S (and, with distillation, y and z apart: two products, as S alone needs).
  auto scores = [&](at::Tensor& P, const at::Tensor& rc, const at::Tensor& cols, const at::Tensor& rref,
                    const at::Tensor& cref, int64_t r0, int64_t rows, int64_t w,
                    int k) -> std::pair<const T*, const T*> {
    if (!distill) {
      if (half) {
        PhaseTimer timer(kSimilarityGemm);
        const HalfDirection& h = hdir[k];
        HalfWorker& hw = hworkers[static_cast<size_t>(w)];
        half_gemm_nt(P, h.rows.narrow(0, r0, rows), h.cols, false, hw);
        if (h.ref_rows.defined()) half_gemm_nt(P, h.ref_rows.narrow(0, r0, rows), h.ref_cols, true, hw);
      } else {
        similarity(P, rc, cols, rows_of(rref, r0, rows), cref);
      }
      return {nullptr, nullptr};
    }
    at::Tensor Y = buffer_of(ybuf, w, rows), Z = buffer_of(zbuf, w, rows);
    {
      PhaseTimer timer(kSimilarityGemm);
      if (half) {
        const HalfDirection& h = hdir[k];
        HalfWorker& hw = hworkers[static_cast<size_t>(w)];
        half_gemm_nt(Y, h.rows.narrow(0, r0, rows), h.cols, false, hw);
        half_gemm_nt(Z, h.ref_rows.narrow(0, r0, rows), h.ref_cols, false, hw);
      } else {
        at::mm_out(Y, rc, cols.t());
        at::mm_out(Z, rows_of(rref, r0, rows), cref.t());
      }
    }
    at::sub_out(P, Y, Z);
    return {Y.data_ptr<T>(), Z.data_ptr<T>()};
  };
  // d cols += P^T rows of chunk rows r0 .. r0 + rows (P: this worker's weights, already rounded on the
  // half path, with `col`).
  auto add_columns = [&](LockedAccumulator& acc, const at::Tensor& P, const at::Tensor& rc, int64_t k, int64_t r0,
                         int64_t rows, int64_t w) {
    if (!half) {
      acc.add(P, rc, 1.0, w);
      return;
    }
    HalfWorker& hw = hworkers[static_cast<size_t>(w)];
    half_prepare_rows(hdir[k].rows.narrow(0, r0, rows), hw);
    acc.add_with(w, [&](int64_t j0, int64_t j1) { half_gemm_xtp_acc(acc.target(), hw, j0, j1, 1.0); });
  };
  // A column-sum gradient's accumulator: [n, d] (float32 products), or [d, n] (half path).
  auto column_target = [&](int64_t n) { return half ? at::zeros({d, n}, opts) : at::zeros({n, d}, opts); };
  auto untranspose = [&](const at::Tensor& target) { return half ? target.t().contiguous() : target; };
  const int64_t align = half ? kHalfBlockN : 1;
  at::Tensor d_img = at::empty({B, d}, opts);
  at::Tensor d_txt, d_img_all, d_txt_all;

  if (columns_are_rows) {
    // P = G^I W^I + (G^T W^T)^T (+ distillation) on each chunk of S = S^I; d x_c = P_c t, d t += P_c^T x_c.
    LockedAccumulator dt(column_target(B), workers, align, half);
    run_chunks(n_chunks, workers, [&](int64_t c, int64_t w) {
      const int64_t r0 = c * R, rows = std::min(R, B - r0);
      at::Tensor P = buffer_of(buffers, w, rows);
      const at::Tensor xc = x.narrow(0, r0, rows);
      const auto [py, pz] = scores(P, xc, t, xr, tr, r0, rows, w, 0);
      chunk_weights<T>(P.data_ptr<T>(), py, pz, t_d, rows, N, r0, offset, row_w[0], col_w[1]);
      {
        PhaseTimer timer(kWeightedGemm);
        at::Tensor dx = d_img.narrow(0, r0, rows);
        if (half) {
          HalfWorker& hw = hworkers[static_cast<size_t>(w)];
          half_round_weights(P, true, true, hw);
          half_gemm_pv(dx, hw, hdir[0].values);
        } else {
          at::mm_out(dx, P, t);
        }
        subtract_partner<T>(d_img, t, pp, r0, rows);
        add_columns(dt, P, xc, 0, r0, rows, w);
      }
    });
    d_txt = untranspose(dt.target());
    subtract_partner<T>(d_txt, x, pp, 0, B);
  } else {
    // Two similarity matrices; each direction's weighted product, plus the column gradients.
    const at::Tensor X = half ? at::Tensor() : as_acc(img_all, acc), Tc = half ? at::Tensor() : as_acc(txt_all, acc);
    const at::Tensor Xr = half ? at::Tensor() : opt_acc(ref_img_all, acc);
    const at::Tensor Tr = half ? at::Tensor() : opt_acc(ref_txt_all, acc);
    d_txt = at::empty({B, d}, opts);
    std::optional<LockedAccumulator> dX, dT;
    if (column_grads) {
      dX.emplace(column_target(N), workers, align, half);
      dT.emplace(column_target(N), workers, align, half);
    }
    // Direction I folds the text column anchors (col_w[1]), direction T the image ones (col_w[0]).
    const Direction<T> dirs[2] = {{x, xr, Tc, Tr, row_w[0], fold ? col_w[1] : none, d_img, column_grads ? &*dT : nullptr},
                                  {t, tr, X, Xr, row_w[1], fold ? col_w[0] : none, d_txt, column_grads ? &*dX : nullptr}};
    run_chunks(n_chunks, workers, [&](int64_t c, int64_t w) {
      const int64_t r0 = c * R, rows = std::min(R, B - r0);
      for (int k = 0; k < 2; ++k) {
        const Direction<T>& dir = dirs[k];
        at::Tensor P = buffer_of(buffers, w, rows);
        const at::Tensor rc = dir.rows.narrow(0, r0, rows);
        const auto [py, pz] = scores(P, rc, dir.cols, dir.ref_rows, dir.ref_cols, r0, rows, w, k);
        bool rounded = false;   // half path: P already rounded for the weighted product below
        if (dir.out_cols != nullptr) {
          // With fold, the columns get this direction's anchors' weights only: keep a copy of S.
          at::Tensor Q;
          if (fold) {
            Q = buffer_of(spares, w, rows);
            Q.copy_(P);
          }
          chunk_weights<T>(P.data_ptr<T>(), py, pz, t_d, rows, N, r0, offset, dir.weights, none);
          {
            PhaseTimer timer(kWeightedGemm);
            if (half) {
              rounded = !fold;   // without fold the same P serves P cols below
              half_round_weights(P, rounded, true, hworkers[static_cast<size_t>(w)]);
            }
            add_columns(*dir.out_cols, P, rc, k, r0, rows, w);   // d cols_j += sum_i P_ij rows_i
          }
          if (fold) {
            chunk_weights<T>(Q.data_ptr<T>(), py, pz, t_d, rows, N, r0, offset, dir.weights, dir.fold);
            P = Q;
          }
        } else {
          chunk_weights<T>(P.data_ptr<T>(), py, pz, t_d, rows, N, r0, offset, dir.weights, dir.fold);
        }
        PhaseTimer timer(kWeightedGemm);
        at::Tensor out = dir.out.narrow(0, r0, rows);
        if (half) {
          HalfWorker& hw = hworkers[static_cast<size_t>(w)];
          if (!rounded) half_round_weights(P, true, false, hw);
          half_gemm_pv(out, hw, hdir[k].values);
        } else {
          at::mm_out(out, P, dir.cols);
        }
      }
      subtract_partner<T>(d_img, t, pp, r0, rows);
      subtract_partner<T>(d_txt, x, pp, r0, rows);
    });
    if (column_grads) {
      d_img_all = untranspose(dX->target());
      d_txt_all = untranspose(dT->target());
    }
  }
  buffers.clear();
  spares.clear();
  if (column_grads) {
    return {like_input(d_img, img), like_input(d_txt, txt), like_input(d_img_all, img_all),
            like_input(d_txt_all, txt_all)};
  }
  return {like_input(d_img, img), like_input(d_txt, txt), img.new_empty({0, d}), txt.new_empty({0, d})};
}

at::ScalarType acc_dtype(const at::Tensor& img) {
  return img.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_directions(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == 2 && t.size(1) == n, op, ": ", name, ": expected shape (2, ", n,
              ") (direction, anchor), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, ": expected a floating dtype, got ",
              t.scalar_type());
}

}  // namespace

std::vector<std::string> tile_scalar_names() {
  return {"offset", "columns_are_rows", "distill_scale", "with_distill", "with_alone"};
}

TileScalars TileScalars::parse(const char* op, c10::ArrayRef<double> s) {
  TORCH_CHECK(s.size() == 5, op, ": scalars: expected 5 values (", c10::Join(", ", tile_scalar_names()),
              "), got ", s.size());
  return {static_cast<int64_t>(s[0]), s[1] != 0.0, s[2], s[3] != 0.0, s[4] != 0.0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_fwd(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all, const at::Tensor& txt_all,
    const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all, const OptTensor& ref_txt_all,
    const at::Tensor& scale, c10::ArrayRef<double> scalars) {
  constexpr const char* op = "drrho::cpp_fwd";
  const TileScalars sc = TileScalars::parse(op, scalars);
  const int64_t offset = sc.offset;
  const bool columns_are_rows = sc.columns_are_rows;
  const double distill_scale = sc.distill_scale;
  const bool with_distill = sc.with_distill, with_alone = sc.with_alone;
  const Shapes sh = check_embeddings(op, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all,
                                     ref_txt_all, offset, columns_are_rows);
  check_directions(op, "scale", scale, sh.B);
  TORCH_CHECK(distill_scale > 0, op, ": distill_scale: expected a value > 0, got ", distill_scale);
  // Nested ATen calls (mm, addmm) are plain computations: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType acc = acc_dtype(img);
  const bool extras = with_distill || with_alone;
  if (sh.B == 0) {   // nothing to reduce: empty per-row outputs
    const auto opts = img.options().dtype(acc);
    return {at::empty({2, extras ? 12 : 3, 0}, opts), at::empty({0}, opts), at::empty({2, 0}, opts)};
  }
  if (acc == at::kDouble) {
    return fwd_impl<double>(sh, acc, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, scale,
                            offset, columns_are_rows, distill_scale, extras);
  }
  return fwd_impl<float>(sh, acc, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, scale,
                         offset, columns_are_rows, distill_scale, extras);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bwd(
    const at::Tensor& gain, const OptTensor& col_gain, const OptTensor& dgain, const OptTensor& col_dgain,
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& img_all, const at::Tensor& txt_all,
    const OptTensor& ref_img, const OptTensor& ref_txt, const OptTensor& ref_img_all, const OptTensor& ref_txt_all,
    const at::Tensor& scale, c10::ArrayRef<double> scalars, const at::Tensor& log_norm, const at::Tensor& wsum,
    const at::Tensor& margin, const OptTensor& col_scale, const OptTensor& col_log_norm, const OptTensor& col_margin,
    const OptTensor& lse_q, const OptTensor& lse_p, const OptTensor& col_lse_q, const OptTensor& col_lse_p,
    bool column_grads) {
  constexpr const char* op = "drrho::cpp_bwd";
  // The backward reads the distillation from dgain: with_distill / with_alone only shape the forward.
  const TileScalars sc = TileScalars::parse(op, scalars);
  const int64_t offset = sc.offset;
  const bool columns_are_rows = sc.columns_are_rows;
  const double distill_scale = sc.distill_scale;
  const Shapes sh = check_embeddings(op, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all,
                                     ref_txt_all, offset, columns_are_rows);
  check_directions(op, "gain", gain, sh.B);
  check_directions(op, "scale", scale, sh.B);
  check_directions(op, "log_norm", log_norm, sh.B);
  check_directions(op, "wsum", wsum, sh.B);
  check_vector(op, "margin", margin, sh.B);
  const bool fold = col_log_norm.has_value();
  TORCH_CHECK(col_gain.has_value() == fold && col_scale.has_value() == fold && col_margin.has_value() == fold, op,
              ": col_gain, col_scale, col_log_norm and col_margin: expected all four or none");
  if (fold) {
    check_directions(op, "col_gain", *col_gain, sh.N);
    check_directions(op, "col_scale", *col_scale, sh.N);
    check_directions(op, "col_log_norm", *col_log_norm, sh.N);
    check_vector(op, "col_margin", *col_margin, sh.N);
  }
  const bool distill = dgain.has_value();
  TORCH_CHECK(!distill || (sh.ref && lse_q.has_value() && lse_p.has_value()), op,
              ": dgain: expected lse_q, lse_p and a reference model with it");
  TORCH_CHECK(!(distill && fold) || (col_dgain.has_value() && col_lse_q.has_value() && col_lse_p.has_value()), op,
              ": col_dgain, col_lse_q and col_lse_p: expected with dgain and a fold's columns");
  if (distill) {
    check_directions(op, "dgain", *dgain, sh.B);
    check_directions(op, "lse_q", *lse_q, sh.B);
    check_directions(op, "lse_p", *lse_p, sh.B);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType acc = acc_dtype(img);
  if (sh.B == 0) {   // no anchors: every gradient is zero
    auto cols = column_grads && !columns_are_rows ? std::pair{at::zeros_like(img_all), at::zeros_like(txt_all)}
                                                   : std::pair{img.new_empty({0, sh.d}), txt.new_empty({0, sh.d})};
    return {at::empty_like(img), at::empty_like(txt), cols.first, cols.second};
  }
  if (acc == at::kDouble) {
    return bwd_impl<double>(sh, acc, gain, col_gain, dgain, col_dgain, img, txt, img_all, txt_all, ref_img, ref_txt,
                            ref_img_all, ref_txt_all, scale, offset, columns_are_rows, distill_scale, log_norm, wsum,
                            margin, col_scale, col_log_norm, col_margin, lse_q, lse_p, col_lse_q, col_lse_p,
                            column_grads);
  }
  return bwd_impl<float>(sh, acc, gain, col_gain, dgain, col_dgain, img, txt, img_all, txt_all, ref_img, ref_txt,
                         ref_img_all, ref_txt_all, scale, offset, columns_are_rows, distill_scale, log_norm, wsum,
                         margin, col_scale, col_log_norm, col_margin, lse_q, lse_p, col_lse_q, col_lse_p,
                         column_grads);
}

void set_profiling(bool enabled) { g_profiling.store(enabled); }

std::vector<std::pair<std::string, double>> read_profile(bool reset) {
  std::vector<std::pair<std::string, double>> out;
  for (int p = 0; p < kPhaseCount; ++p) {
    const int64_t ns = reset ? g_phase_ns[p].exchange(0) : g_phase_ns[p].load();
    out.emplace_back(kPhaseNames[p], static_cast<double>(ns) * 1e-9);
  }
  return out;
}

Tiling default_tiling() { return {0, kDefaultColBlock, kDefaultSpreadRows}; }

Tiling get_tiling() { return {g_chunk_bytes.load(), g_col_block.load(), g_spread_rows.load()}; }

void set_tiling(int64_t chunk_bytes, int64_t col_block, int64_t spread_rows) {
  TORCH_CHECK(chunk_bytes >= 0, "set_tiling: chunk_bytes: expected >= 0 (0: default), got ", chunk_bytes);
  TORCH_CHECK(col_block >= 0, "set_tiling: col_block: expected >= 0 (0: default), got ", col_block);
  TORCH_CHECK(spread_rows >= -1, "set_tiling: spread_rows: expected >= -1 (0: default, -1: off), got ",
              spread_rows);
  g_chunk_bytes.store(chunk_bytes);                         // 0: automatic
  g_col_block.store(col_block == 0 ? kDefaultColBlock : col_block);
  g_spread_rows.store(spread_rows == 0 ? kDefaultSpreadRows : std::max<int64_t>(spread_rows, 0));
}

}  // namespace drrho::cpu
