// y = alpha * x w^T (+ bias) in float32, written so that every output element is summed in one fixed order
// whatever the number of rows and wherever its row sits: the CPU backend's linear layers and attention.
//
// Why not BLAS: OpenBLAS picks kernels, tiles and thread splits by the row count m, so a row's result
// depends on how many rows share the call (seen on AMD EPYC with OPENBLAS_CORETYPE=Haswell: an image
// generated in a batch differed by one level from the same request alone). The engine promises batch
// invariance, so here y[i][j] = dot(x_i, w_j) over 8 float32 lanes (lane l sums the products at
// k = l, l+8, l+16, ... in order, the last partial group zero-padded), the lanes added in a fixed tree,
// then times alpha, then plus bias[j]. IEEE mul and add only, never fused: the same bits on every x86-64
// host, in the baseline and the AVX2 copy of the kernel, and at every tile position.
//
// Cost: 2mnk FLOPs; tiles of 4 rows x 2 columns reuse each loaded vector of x twice and of w four times.
#pragma once

#include <cstdint>

namespace zimage {

// Row-major x [m, k] (rows ldx apart), w [n, k] (rows ldw apart), y [m, n] (rows ldy apart); bias [n] or
// null. Single-threaded.
void gemm_nt_fixed_order(int64_t m, int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, const float* w,
                         int64_t ldw, const float* bias, float* y, int64_t ldy);

// The same for contiguous x [m, k], w [n, k], y [m, n], alpha 1, split over the thread pool.
void linear_fixed_order(const float* x, int64_t m, int64_t k, const float* w, int64_t n, const float* bias, float* y);

}  // namespace zimage
