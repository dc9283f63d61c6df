#include "backend/cpu/gemm_fixed_order.h"

#include <algorithm>
#include <cstring>

#include "core/parallel.h"

namespace zimage {

namespace {

// Eight float32 lanes (GCC/Clang vector extension): two SSE registers on a baseline x86-64 build, one
// AVX register in the AVX2 copy; IEEE mul and add lane by lane either way (this file is compiled with
// -ffp-contract=off, so no FMA rounds differently).
typedef float Lanes __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
// Output tile: 4 rows x 2 columns = 8 accumulators + 6 loaded vectors fit AVX2's 16 registers.
constexpr int kRows = 4, kCols = 2;
// Work item of the thread pool in linear_fixed_order: 64 rows x 64 columns of outputs.
constexpr int64_t kTaskRows = 64, kTaskCols = 64;

struct Operands {
  int64_t k;
  float alpha;
  const float* x;
  int64_t ldx;
  const float* w;
  int64_t ldw;
  const float* bias;
  float* y;
  int64_t ldy;
};

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Lanes load_partial(const float* p, int64_t len) {
  Lanes v = {};
  std::memcpy(&v, p, size_t(len) * sizeof(float));
  return v;
}

inline float sum_lanes(Lanes a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

// The R x C outputs at row r, column c.
template <int R, int C>
[[gnu::always_inline]] inline void tile(const Operands& o, int64_t r, int64_t c) {
  const float* x = o.x + r * o.ldx;
  const float* w = o.w + c * o.ldw;
  Lanes acc[R][C] = {};
  int64_t kk = 0;
  for (; kk + kLanes <= o.k; kk += kLanes) {
    Lanes xv[R], wv[C];
    for (int i = 0; i < R; ++i) xv[i] = load(x + i * o.ldx + kk);
    for (int j = 0; j < C; ++j) wv[j] = load(w + j * o.ldw + kk);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] += xv[i] * wv[j];
  }
  if (kk < o.k) {
    Lanes xv[R], wv[C];
    for (int i = 0; i < R; ++i) xv[i] = load_partial(x + i * o.ldx + kk, o.k - kk);
    for (int j = 0; j < C; ++j) wv[j] = load_partial(w + j * o.ldw + kk, o.k - kk);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] += xv[i] * wv[j];
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) {
      float s = o.alpha * sum_lanes(acc[i][j]);
      o.y[(r + i) * o.ldy + c + j] = o.bias ? s + o.bias[c + j] : s;
    }
}

// Rows [r0, r1) x columns [c0, c1): full tiles, then the edges with narrower tiles of the same arithmetic.
template <int R>
[[gnu::always_inline]] inline void row_tiles(const Operands& o, int64_t r, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + kCols <= c1; c += kCols) tile<R, kCols>(o, r, c);
  for (; c < c1; ++c) tile<R, 1>(o, r, c);
}

[[gnu::always_inline]] inline void block(const Operands& o, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) row_tiles<kRows>(o, r, c0, c1);
  for (; r < r1; ++r) row_tiles<1>(o, r, c0, c1);
}

void block_baseline(const Operands& o, int64_t r0, int64_t r1, int64_t c0, int64_t c1) { block(o, r0, r1, c0, c1); }

#if defined(__x86_64__)
[[gnu::target("avx2")]] void block_avx2(const Operands& o, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  block(o, r0, r1, c0, c1);
}
#endif

using BlockFn = void (*)(const Operands&, int64_t, int64_t, int64_t, int64_t);

BlockFn block_fn() {
#if defined(__x86_64__)
  static const BlockFn fn = __builtin_cpu_supports("avx2") ? &block_avx2 : &block_baseline;
  return fn;
#else
  return &block_baseline;
#endif
}

}  // namespace

void gemm_nt_fixed_order(int64_t m, int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, const float* w,
                         int64_t ldw, const float* bias, float* y, int64_t ldy) {
  block_fn()(Operands{k, alpha, x, ldx, w, ldw, bias, y, ldy}, 0, m, 0, n);
}

void linear_fixed_order(const float* x, int64_t m, int64_t k, const float* w, int64_t n, const float* bias, float* y) {
  const Operands o{k, 1.0f, x, k, w, k, bias, y, n};
  const BlockFn run = block_fn();
  const int64_t row_tasks = (m + kTaskRows - 1) / kTaskRows, col_tasks = (n + kTaskCols - 1) / kTaskCols;
  parallel_for(row_tasks * col_tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int64_t r0 = (t / col_tasks) * kTaskRows, c0 = (t % col_tasks) * kTaskCols;
      run(o, r0, std::min(r0 + kTaskRows, m), c0, std::min(c0 + kTaskCols, n));
    }
  });
}

}  // namespace zimage
