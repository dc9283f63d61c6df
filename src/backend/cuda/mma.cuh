// Tensor-core helpers shared by the hand-written kernels (flash attention, skinny GEMM): mma.sync
// m16n8k16 with bf16 inputs and float32 accumulation, and packing two floats into a bf16 pair.
#pragma once

#include <cstdint>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

// c[16x8] += a[16x16] b[16x8], bf16 in, f32 accumulate. With g = lane/4, t = lane%4:
//   a: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   c: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// Not volatile: a pure function of its operands, so the compiler may schedule loads around it.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace zimage::cuda
