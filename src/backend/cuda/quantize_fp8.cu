// Rows of bf16 activations quantized to FP8 e4m3 with one float32 scale each: the A operand of the W8A8
// GEMMs (Backend::quantize_fp8_rows). Reference: quantize_fp8_row (backend.cpp), which this equals bit for
// bit: s = max|x| / 448 (1 for a row of zeros) and q = e4m3(x / s) (e4m3_code, bf16_vec.cuh). The norms that
// feed FP8 linears write the same codes themselves (norms.cu); this kernel serves the other inputs.
//
// One block per row. Memory bound: per value 2 bytes read twice (the second pass over a row of <= 20 KB is
// served from L1/L2), 1 byte written, ~3 FLOPs. The DiT's inputs at 1024^2 (4224 rows x 3840 or 10240)
// move 49-130 MB per call: ~10-30 us at H200's 4.8 TB/s.
#include <cstdint>

#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kThreads = 256;

// kW values per access: 8 (16-byte loads, 8-byte stores) when k is a multiple of 8, else 1.
template <int kW>
__global__ void quantize_rows_e4m3(const bf16* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                   int64_t k) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const bf16* xr = x + row * k;
  quantize_row_e4m3<kW>(k, [&](int64_t i, float (&f)[kW]) { unpack<kW>(load_vec<kW>(xr + i), f); }, q + row * k,
                        scale + row, red);
}

}  // namespace

void quantize_rows_e4m3(const bf16* x, uint8_t* q, float* scale, int64_t rows, int64_t k, cudaStream_t stream) {
  if (rows == 0) return;
  const bool vec = k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 8 == 0;
  if (vec) quantize_rows_e4m3<8><<<unsigned(rows), kThreads, 0, stream>>>(x, q, scale, k);
  else quantize_rows_e4m3<1><<<unsigned(rows), kThreads, 0, stream>>>(x, q, scale, k);
  ZI_CUDA_CHECK(cudaGetLastError());
}

}  // namespace zimage::cuda
