// Row-wise normalizations of the DiT and the text encoder: RMSNorm (optionally modulated by
// (1 + scale[b])), the gated residual RMSNorm of the DiT blocks, and the modulated LayerNorm of the
// final layer. CPU references: the same-named ops of src/backend/cpu/cpu_backend.cpp.
//
// One block per row of d values. Each thread keeps its share of the row in registers (kVpt packed
// vectors of kW bf16), so the row is read from memory once and written once; statistics in float32.
// Real rows: d = 3840 (DiT), 2560 (Qwen3); the tiny test model has d = 16..64.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

// kW values of an optional per-channel vector (weights, scales, gates); `dflt` when p is null.
template <int kW>
__device__ __forceinline__ void load_or(const bf16* p, int64_t off, float dflt, float (&f)[kW]) {
  if (p) {
    unpack<kW>(load_vec<kW>(p + off), f);
  } else {
#pragma unroll
    for (int k = 0; k < kW; ++k) f[k] = dflt;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32), returned to every thread. `red` holds 32 floats;
// the leading barrier lets consecutive calls reuse it.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? red[lane] : 0.0f;
  return warp_sum(v);
}

enum class RowNorm {
  Rms,            // dst = src * rsqrt(mean(src^2) + eps) * w * (1 + mod[b])
  GatedResidual,  // dst += tanh(mod[b]) * (src * rsqrt(mean(src^2) + eps) * w) (+ extra)   (mod null: factor 1)
  GatedResidualThenRms,  // GatedResidual, then dst2 = Rms of the updated dst with w2 and mod2
  LayerNorm,      // dst = (src - mean) * rsqrt(var + eps) * (1 + mod[b])          (no affine)
};

struct RowNormArgs {
  const bf16* src;  // [rows, d] the values normalized
  const bf16* w;    // [d] RMSNorm weight or null (unused by LayerNorm)
  const bf16* mod;  // [batch, d] scale (Rms, LayerNorm) or gate (GatedResidual), or null
  bf16* dst;        // [rows, d] output; GatedResidual: the residual stream, read and updated in place
  int64_t rows;     // batch * seq
  int64_t seq;      // rows per batch item: row r uses mod row r / seq
  int64_t d;
  float eps;
  const bf16* w2 = nullptr;    // GatedResidualThenRms: the next RMSNorm's weight [d]
  const bf16* mod2 = nullptr;  // and its scale [batch, d] or null
  bf16* dst2 = nullptr;        // and its output [rows, d]
  const bf16* extra = nullptr;  // GatedResidual*: [rows, d] added to the updated residual, or null
  // Rms and GatedResidualThenRms: the normalized output as FP8 e4m3 codes [rows, d] with a float32 scale per
  // row (the input of an FP8 linear) instead of bf16 in dst / dst2: the bf16 values dst would hold,
  // quantized as quantize_rows_e4m3 quantizes them.
  uint8_t* q = nullptr;
  float* q_scale = nullptr;
};

// A row held in registers (kVpt vectors of kW bf16 per thread, vector j of the row at thread j % blockDim.x,
// slot j / blockDim.x) written as e4m3 codes with its scale: quantize_rows_e4m3's arithmetic.
template <int kW, int kVpt>
__device__ __forceinline__ void write_e4m3_row(const BfVec<kW> (&vals)[kVpt], int64_t nvec, uint8_t* q, float* scale,
                                               float* red) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVpt; ++i) {
    if (threadIdx.x + int64_t(i) * blockDim.x >= nvec) continue;
    float f[kW];
    unpack<kW>(vals[i], f);
#pragma unroll
    for (int k = 0; k < kW; ++k) amax = fmaxf(amax, fabsf(f[k]));
  }
  const float s = e4m3_row_scale(block_max(amax, red));
  if (threadIdx.x == 0) *scale = s;
#pragma unroll
  for (int i = 0; i < kVpt; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j >= nvec) continue;
    float f[kW];
    unpack<kW>(vals[i], f);
    store_e4m3<kW>(q + j * kW, f, s);
  }
}

constexpr int kTargetThreads = 128;  // threads per row while kVpt < kMaxVpt
constexpr int kMaxVpt = 8;
constexpr int kMaxThreadsAtMaxVpt = 256;  // so d <= 8 * 8 * 256 = 16384 on the 16-byte path

// Bytes: Rms and LayerNorm read 2*d and write 2*d per row; GatedResidual reads 4*d (src and the
// residual; 6*d with a ControlNet's extra, which saves a separate add's 6*d) and writes 2*d; GatedResidualThenRms writes 2*d more and saves the next norm's read of the
// residual (and a launch). w and mod ([batch, d]) stay in L1/L2. Memory bound at ~4.2 TB/s (H200):
// the DiT's 2 x 4128 rows of 3840 move 127 MB in ~30 us (Rms) and 190 MB in ~45 us (GatedResidual).
// Math per row: two block reductions at most (LayerNorm's mean, then its centred sum of squares from
// registers, as the reference's two passes), one for RMSNorm. With FP8 output (q): one more (the row's
// max |value|), and d bytes of codes written instead of 2*d of bf16.
template <RowNorm kKind, int kW, int kVpt>
__global__ void __launch_bounds__(kVpt < kMaxVpt ? kTargetThreads : kMaxThreadsAtMaxVpt)
    row_norm_kernel(RowNormArgs a) {
  constexpr bool kThenRms = kKind == RowNorm::GatedResidualThenRms;
  constexpr bool kResidual = kKind == RowNorm::GatedResidual || kThenRms;
  __shared__ float red[32];
  const int64_t nvec = a.d / kW;
  const float inv_d = 1.0f / float(a.d);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const bf16* src = a.src + row * a.d;
    bf16* dst = a.dst ? a.dst + row * a.d : nullptr;  // null: Rms with FP8 output
    // All loads of the row first (several 16-byte loads in flight per thread), residual included.
    BfVec<kW> v[kVpt], res[kResidual ? kVpt : 1];
#pragma unroll
    for (int i = 0; i < kVpt; ++i) {
      const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
      v[i].raw = {};
      if (j < nvec) v[i] = load_vec<kW>(src + j * kW);
      if constexpr (kResidual) {
        res[i].raw = {};
        if (j < nvec) res[i] = load_vec<kW>(dst + j * kW);
      }
    }
    float acc = 0.0f;  // sum of x (LayerNorm) or of x^2 (RMSNorm); out-of-row slots hold zeros
#pragma unroll
    for (int i = 0; i < kVpt; ++i) {
      float f[kW];
      unpack<kW>(v[i], f);
#pragma unroll
      for (int k = 0; k < kW; ++k) acc += kKind == RowNorm::LayerNorm ? f[k] : f[k] * f[k];
    }
    float mean = 0.0f, inv;
    if constexpr (kKind == RowNorm::LayerNorm) {
      mean = block_sum(acc, red) * inv_d;
      float sq = 0.0f;
#pragma unroll
      for (int i = 0; i < kVpt; ++i) {
        const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
        if (j < nvec) {
          float f[kW];
          unpack<kW>(v[i], f);
#pragma unroll
          for (int k = 0; k < kW; ++k) sq += (f[k] - mean) * (f[k] - mean);
        }
      }
      inv = rsqrtf(block_sum(sq, red) * inv_d + a.eps);
    } else {
      inv = rsqrtf(block_sum(acc, red) * inv_d + a.eps);
    }
    const bf16* mod = a.mod ? a.mod + (row / a.seq) * a.d : nullptr;
#pragma unroll
    for (int i = 0; i < kVpt; ++i) {
      const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
      if (j >= nvec) continue;
      const int64_t off = j * kW;
      float x[kW], m[kW], o[kW];
      unpack<kW>(v[i], x);
      load_or<kW>(mod, off, 0.0f, m);
      if constexpr (kKind == RowNorm::LayerNorm) {
#pragma unroll
        for (int k = 0; k < kW; ++k) o[k] = (x[k] - mean) * inv * (1.0f + m[k]);
      } else {
        float w[kW];
        load_or<kW>(a.w, off, 1.0f, w);
        if constexpr (kKind == RowNorm::Rms) {
#pragma unroll
          for (int k = 0; k < kW; ++k) o[k] = x[k] * inv * w[k] * (1.0f + m[k]);
          if (a.q) {  // kept (rounded to bf16) for the quantization below
            v[i] = pack<kW>(o);
            continue;
          }
        } else {
          float r[kW];
          unpack<kW>(res[i], r);
#pragma unroll
          for (int k = 0; k < kW; ++k) o[k] = r[k] + (mod ? tanhf(m[k]) : 1.0f) * (x[k] * inv * w[k]);
          if (a.extra) {
            float e[kW];
            unpack<kW>(load_vec<kW>(a.extra + row * a.d + off), e);
#pragma unroll
            for (int k = 0; k < kW; ++k) o[k] += e[k];
          }
        }
      }
      store_vec<kW>(dst + off, o);
      if constexpr (kThenRms) res[i] = pack<kW>(o);  // the stored (bf16) residual is what the next norm reads
    }
    if constexpr (kKind == RowNorm::Rms)
      if (a.q) write_e4m3_row<kW, kVpt>(v, nvec, a.q + row * a.d, a.q_scale + row, red);
    if constexpr (kThenRms) {
      float sq = 0.0f;
#pragma unroll
      for (int i = 0; i < kVpt; ++i) {
        const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
        if (j >= nvec) continue;
        float f[kW];
        unpack<kW>(res[i], f);
#pragma unroll
        for (int k = 0; k < kW; ++k) sq += f[k] * f[k];
      }
      const float inv2 = rsqrtf(block_sum(sq, red) * inv_d + a.eps);
      const bf16* mod2 = a.mod2 ? a.mod2 + (row / a.seq) * a.d : nullptr;
      bf16* dst2 = a.q ? nullptr : a.dst2 + row * a.d;
#pragma unroll
      for (int i = 0; i < kVpt; ++i) {
        const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
        if (j >= nvec) continue;
        const int64_t off = j * kW;
        float x[kW], w[kW], m[kW], o[kW];
        unpack<kW>(res[i], x);
        load_or<kW>(a.w2, off, 1.0f, w);
        load_or<kW>(mod2, off, 0.0f, m);
#pragma unroll
        for (int k = 0; k < kW; ++k) o[k] = x[k] * inv2 * w[k] * (1.0f + m[k]);
        if (a.q) res[i] = pack<kW>(o);  // kept (rounded to bf16) for the quantization below
        else store_vec<kW>(dst2 + off, o);
      }
      if (a.q) write_e4m3_row<kW, kVpt>(res, nvec, a.q + row * a.d, a.q_scale + row, red);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <RowNorm kKind, int kW>
void launch_row_norm_w(const RowNormArgs& a, int vpt, int threads, cudaStream_t stream) {
  const unsigned grid = unsigned(std::min<int64_t>(a.rows, INT32_MAX));
  switch (vpt) {
    case 1: row_norm_kernel<kKind, kW, 1><<<grid, threads, 0, stream>>>(a); break;
    case 2: row_norm_kernel<kKind, kW, 2><<<grid, threads, 0, stream>>>(a); break;
    case 4: row_norm_kernel<kKind, kW, 4><<<grid, threads, 0, stream>>>(a); break;
    default: row_norm_kernel<kKind, kW, kMaxVpt><<<grid, threads, 0, stream>>>(a); break;
  }
  ZI_CUDA_LAUNCH_CHECK();
}

// Picks the vector width (16-byte when d % 8 == 0 and every pointer is 16-byte aligned), then the
// fewest vectors per thread that keep the block at <= 128 threads (3840 -> 4 x 8 values x 120 threads).
template <RowNorm kKind>
void launch_row_norm(const RowNormArgs& a, const char* op, cudaStream_t stream) {
  if (a.rows <= 0 || a.d <= 0) return;
  const bool wide = a.d % 8 == 0 && aligned16(a.src) && aligned16(a.w) && aligned16(a.mod) && aligned16(a.dst) &&
                    aligned16(a.w2) && aligned16(a.mod2) && aligned16(a.dst2) && aligned16(a.extra) &&
                    aligned16(a.q);
  const int64_t nvec = wide ? a.d / 8 : a.d;
  int vpt = 1;
  while (vpt < kMaxVpt && (nvec + vpt - 1) / vpt > kTargetThreads) vpt *= 2;
  const int64_t threads = ((nvec + vpt - 1) / vpt + 31) / 32 * 32;
  const int64_t max_threads = vpt < kMaxVpt ? kTargetThreads : kMaxThreadsAtMaxVpt;
  ZI_CHECK(threads <= max_threads, ErrorKind::InvalidArgument,
           std::string(op) + ": rows of " + std::to_string(a.d) + " values are longer than the CUDA kernel supports (" +
               std::to_string(8 * kMaxVpt * kMaxThreadsAtMaxVpt) + " when a multiple of 8, else " +
               std::to_string(kMaxVpt * kMaxThreadsAtMaxVpt) + ")");
  if (wide)
    launch_row_norm_w<kKind, 8>(a, vpt, int(threads), stream);
  else
    launch_row_norm_w<kKind, 1>(a, vpt, int(threads), stream);
}

}  // namespace

void rms_norm(const bf16* x, const bf16* w, bf16* y, int64_t rows, int64_t d, float eps, cudaStream_t stream) {
  launch_row_norm<RowNorm::Rms>({x, w, nullptr, y, rows, std::max<int64_t>(rows, 1), d, eps}, "rms_norm", stream);
}

void modulated_rms_norm(const bf16* x, const bf16* w, const bf16* scale, bf16* y, int64_t batch, int64_t seq, int64_t d,
                        float eps, cudaStream_t stream) {
  launch_row_norm<RowNorm::Rms>({x, w, scale, y, batch * seq, seq, d, eps}, "modulated_rms_norm", stream);
}

void gated_residual_rms_norm(bf16* x, const bf16* y, const bf16* w, const bf16* gate, const bf16* extra, int64_t batch,
                             int64_t seq, int64_t d, float eps, cudaStream_t stream) {
  RowNormArgs a{y, w, gate, x, batch * seq, seq, d, eps};
  a.extra = extra;
  launch_row_norm<RowNorm::GatedResidual>(a, "gated_residual_rms_norm", stream);
}

void modulated_rms_norm_e4m3(const bf16* x, const bf16* w, const bf16* scale, uint8_t* q, float* q_scale, int64_t batch,
                             int64_t seq, int64_t d, float eps, cudaStream_t stream) {
  RowNormArgs a{x, w, scale, nullptr, batch * seq, seq, d, eps};
  a.q = q;
  a.q_scale = q_scale;
  launch_row_norm<RowNorm::Rms>(a, "modulated_rms_norm_fp8", stream);
}

void gated_residual_then_rms_norm_e4m3(bf16* x, const bf16* y, const bf16* w, const bf16* gate, const bf16* extra,
                                       const bf16* w_next, const bf16* scale_next, uint8_t* q, float* q_scale,
                                       int64_t batch, int64_t seq, int64_t d, float eps, cudaStream_t stream) {
  RowNormArgs a{y, w, gate, x, batch * seq, seq, d, eps};
  a.extra = extra;
  a.w2 = w_next;
  a.mod2 = scale_next;
  a.q = q;
  a.q_scale = q_scale;
  launch_row_norm<RowNorm::GatedResidualThenRms>(a, "gated_residual_then_rms_norm_fp8_", stream);
}

void gated_residual_then_rms_norm(bf16* x, const bf16* y, const bf16* w, const bf16* gate, const bf16* extra,
                                  const bf16* w_next, const bf16* scale_next, bf16* out, int64_t batch, int64_t seq,
                                  int64_t d, float eps, cudaStream_t stream) {
  RowNormArgs a{y, w, gate, x, batch * seq, seq, d, eps};
  a.extra = extra;
  a.w2 = w_next;
  a.mod2 = scale_next;
  a.dst2 = out;
  launch_row_norm<RowNorm::GatedResidualThenRms>(a, "gated_residual_then_rms_norm", stream);
}

void modulated_layer_norm(const bf16* x, const bf16* scale, bf16* y, int64_t batch, int64_t seq, int64_t d, float eps,
                          cudaStream_t stream) {
  launch_row_norm<RowNorm::LayerNorm>({x, nullptr, scale, y, batch * seq, seq, d, eps}, "modulated_layer_norm", stream);
}

}  // namespace zimage::cuda
