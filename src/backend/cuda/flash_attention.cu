// The fallback attention kernel: FlashAttention-2 on the tensor cores (mma.sync m16n8k16 bf16 -> f32) for the
// shapes cuDNN's fused SDPA does not take here: the text encoder (causal, GQA). Also the row softmax of the
// GEMM attention that wide non-causal heads (the VAE mid-block's d = 512) take (attention.cpp). Reference:
// CpuBackend::attention (src/backend/cpu/cpu_backend.cpp).
//
// Math, per item b, query head h (kv head h / (hq/hkv)), query i:
//   valid keys j: j < key_len[b] (and j <= i when causal)
//   out[b, i, h, :] = sum_j softmax_j(scale * q_i . k_j) v_j          (float32 softmax and accumulation)
// The queries and the keys may come from two packed buffers (ring attention's blocks, flash_attention_lse), which
// then also writes lse[b, i, h] = log sum_j exp(scale * q_i . k_j), for merging partial results.
// Work: 4 * B * Hq * S * S * D FLOPs (about half of it with the causal mask): 5.9e9 for the text encoder on a
// 100-token prompt (32 query heads of 128, 36 layers), half of it masked. Compute-bound: every K/V tile read from L2 is
// used by a whole block of queries (32 or 64 FLOPs per byte), so the bound is the mma.sync rate; not yet measured.
//
// Structure: one block per (query tile, head, item). Each warp owns 16 query rows and a slice of the head dim
// (kSplit slices; one for d <= 128, four of 128 for d = 512 so that each warp's output stays in registers):
//   S_w = Q[rows, slice] K[tile, slice]^T       partial scores; slices summed through shared memory
//   online softmax over the key tiles in float32 (running max m and sum l per row, base-2 exponentials)
//   O[rows, slice] += P V[tile, slice]            P rounded to bf16, O in float32 registers
// K and V tiles are double-buffered with cp.async; rows past the sequence and columns past d are zero-filled,
// so any d that is a multiple of 8 runs on the next supported width (16, 32, 64, 128, 256, 512).
#include <algorithm>
#include <cstdint>

#include "backend/cuda/attention.h"

namespace zimage::cuda {

namespace {

// ---- tile shapes ----
// kHeadDim: padded head dim; kSplit: warps sharing one 16-row query slice (each owns kHeadDim / kSplit columns);
// kRowGroups: 16-row query slices per block; kBlockK: keys per tile.
template <int kHeadDim_, int kSplit_, int kRowGroups_, int kBlockK_>
struct FlashConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kSplit = kSplit_;
  static constexpr int kRowGroups = kRowGroups_;
  static constexpr int kBlockK = kBlockK_;
  static constexpr int kWarpDim = kHeadDim / kSplit;  // head-dim columns per warp
  static constexpr int kWarps = kRowGroups * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockQ = kRowGroups * 16;
  static constexpr int kRow = kHeadDim + 8;  // shared-memory row stride in elements: +16 bytes keeps ldmatrix
                                             // (8 rows of 16 bytes) free of bank conflicts
  static constexpr int kQBytes = kBlockQ * kRow * 2;
  static constexpr int kTileBytes = kBlockK * kRow * 2;  // one K or V tile (one pipeline stage)
  static constexpr int kScoreRegs = kBlockK / 2;         // float scores per thread: 16 rows x kBlockK / 32 lanes
  static constexpr int kRedBytes = kSplit == 1 ? 0 : kWarps * kScoreRegs * 32 * 4;
  static constexpr int kSmemBytes = kQBytes + 4 * kTileBytes + kRedBytes;  // Q, 2 stages of K and of V, partials
  static_assert(kWarpDim % 16 == 0 && kBlockK % 16 == 0, "mma tiles are 16 wide");
};

// d <= 128: 4 warps x 16 queries, 64 keys a tile (85 KB of shared memory at d = 128).
template <int D>
using SmallHead = FlashConfig<D, 1, 4, 64>;
// d = 256: two warps per query slice, 64 queries, 32 keys a tile (115 KB).
using Head256 = FlashConfig<256, 2, 4, 32>;
// d = 512 (VAE): four warps per query slice, 32 queries, 32 keys a tile (178.5 KB).
using Head512 = FlashConfig<512, 4, 2, 32>;

// ---- PTX wrappers ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; writes zeros instead when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives matrix i:
// lane l holds (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans (rows 2(l%4), 2(l%4)+1, column l/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] b[16x8], bf16 in, f32 accumulate. With g = lane/4, t = lane%4:
//   a: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   c: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

// Rows [row0, row0 + ROWS) of a [rows, ld] bf16 matrix, columns [0, kHeadDim), into shared memory with row
// stride kRow. Rows >= rows_valid and columns >= d are zero-filled.
template <class C, int ROWS>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int64_t ld, int row0, int rows_valid, int d) {
  constexpr int kChunks = C::kHeadDim / 8;  // 16-byte chunks per row
#pragma unroll 4
  for (int c = threadIdx.x; c < ROWS * kChunks; c += C::kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < rows_valid && col < d;
    const bf16* g = valid ? src + int64_t(row0 + r) * ld + col : src;
    cp_async16(dst + r * C::kRow + col, g, valid);
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    flash_attention_kernel(const bf16* __restrict__ q_qkv, const bf16* __restrict__ kv_qkv, bf16* __restrict__ out,
                           float* __restrict__ lse, int seq, int kv_seq, int hq, int hkv, int d, float scale_log2,
                           bool causal, const int32_t* __restrict__ key_len) {
  constexpr int kBlockQ = C::kBlockQ, kBlockK = C::kBlockK, kWarpDim = C::kWarpDim, kRow = C::kRow;
  constexpr int kKSteps = kWarpDim / 16;   // k-steps of Q K^T over this warp's head-dim slice
  constexpr int kKeyTiles = kBlockK / 8;   // n-tiles of the scores
  constexpr int kDimTiles = kWarpDim / 8;  // n-tiles of the output

  extern __shared__ __align__(16) unsigned char smem[];
  bf16* s_q = reinterpret_cast<bf16*>(smem);
  bf16* s_k = reinterpret_cast<bf16*>(smem + C::kQBytes);                      // 2 stages
  bf16* s_v = reinterpret_cast<bf16*>(smem + C::kQBytes + 2 * C::kTileBytes);  // 2 stages
  float* s_red = reinterpret_cast<float*>(smem + C::kQBytes + 4 * C::kTileBytes);

  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kBlockQ;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_group = warp / C::kSplit, split = warp % C::kSplit;
  const int g = lane / 4, t4 = lane % 4;
  const int col0 = split * kWarpDim;       // this warp's first head-dim column
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: which 8x8 matrix this lane addresses, and which row

  const int kv_head = h / (hq / hkv);
  const int64_t width = int64_t(hq + 2 * hkv) * d;  // packed qkv row
  const bf16* q_item = q_qkv + int64_t(b) * seq * width;     // the queries' rows
  const bf16* kv_item = kv_qkv + int64_t(b) * kv_seq * width;  // the keys' and values' rows
  const bf16* q_src = q_item + int64_t(h) * d;
  const bf16* k_src = kv_item + int64_t(hq + kv_head) * d;
  const bf16* v_src = kv_item + int64_t(hq + hkv + kv_head) * d;

  const int kv_len = min(max(key_len[b], 0), kv_seq);
  // Keys at or past kv_end are masked for every query of this block (padding, or causal past the last query).
  const int kv_end = causal ? min(kv_len, q0 + kBlockQ) : kv_len;
  const int tiles = (kv_end + kBlockK - 1) / kBlockK;

  load_tile<C, kBlockQ>(s_q, q_src, width, q0, seq, d);
  cp_async_commit();
  if (tiles > 0) {
    load_tile<C, kBlockK>(s_k, k_src, width, 0, kv_end, d);
    load_tile<C, kBlockK>(s_v, v_src, width, 0, kv_end, d);
  }
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (the first K/V tile may still be in flight)
  __syncthreads();

  // This warp's 16 query rows over its head-dim slice, as A fragments: matrices (rows 0-7 | 8-15) x
  // (dims 0-7 | 8-15) ordered a[0] .. a[3].
  uint32_t q_frag[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
    ldmatrix_x4(q_frag[ks], s_q + (row_group * 16 + (mi & 1) * 8 + mr) * kRow + col0 + ks * 16 + (mi >> 1) * 8);
  float o[kDimTiles][4];
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};        // running max (log2 units) of rows g and g + 8
  float l[2] = {0.0f, 0.0f};                  // this thread's part of the running sums
  const int q_row = q0 + row_group * 16 + g;  // query index of rows g (and q_row + 8)

  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) {  // prefetch the next tile into the other stage
      const int stage = (tile + 1) & 1;
      load_tile<C, kBlockK>(s_k + stage * kBlockK * kRow, k_src, width, (tile + 1) * kBlockK, kv_end, d);
      load_tile<C, kBlockK>(s_v + stage * kBlockK * kRow, v_src, width, (tile + 1) * kBlockK, kv_end, d);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch has landed (this thread's copies)
    __syncthreads();     // ... and every thread's

    const bf16* k_tile = s_k + (tile & 1) * kBlockK * kRow;
    const bf16* v_tile = s_v + (tile & 1) * kBlockK * kRow;

    // S = Q K^T over this warp's columns. B[k][n] = K[key n][dim k]: matrices (keys 0-7 | 8-15) x (dims 0-7 | 8-15)
    // ordered b0, b1 of key n-tile 2p, then b0, b1 of 2p + 1.
    float s[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int p = 0; p < kKeyTiles / 2; ++p) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + (p * 16 + (mi >> 1) * 8 + mr) * kRow + col0 + ks * 16 + (mi & 1) * 8);
        mma_bf16(s[2 * p], q_frag[ks], kb[0], kb[1]);
        mma_bf16(s[2 * p + 1], q_frag[ks], kb[2], kb[3]);
      }
    }
    if constexpr (C::kSplit > 1) {  // sum the partial scores of the warps sharing these rows
      float* mine = s_red + (row_group * C::kSplit + split) * C::kScoreRegs * 32;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(n * 4 + e) * 32 + lane] = s[n][e];
      __syncthreads();
      const float* group = s_red + row_group * C::kSplit * C::kScoreRegs * 32;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < C::kSplit; ++w) sum += group[(w * C::kScoreRegs + n * 4 + e) * 32 + lane];
          s[n][e] = sum;
        }
      // The next tile rewrites s_red only after the __syncthreads that ends this iteration.
    }

    // Scale to log2 units, mask, and take the row maxima (rows are spread over the 4 lanes of a quad).
    const int key0 = tile * kBlockK + 2 * t4;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + n * 8 + (e & 1), qi = q_row + (e >> 1) * 8;
        const bool masked = key >= kv_len || (causal && key > qi);
        s[n][e] = masked ? -INFINITY : s[n][e] * scale_log2;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
      }
    float base[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      base[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing valid yet: exp2(-inf - 0) = 0, not NaN
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = m_new;
    }
    float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - base[e >> 1]);
        row_sum[e >> 1] += s[n][e];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + row_sum[r];
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // O += P V. The score accumulators of key n-tiles 2j, 2j + 1 are exactly the A fragment of keys 16j..16j+15.
    // B[k][n] = V[key k][dim n], read transposed: matrices (keys 0-7 | 8-15) x (dims 0-7 | 8-15) ordered b0, b1
    // of dim n-tile 2p, then b0, b1 of 2p + 1.
#pragma unroll
    for (int j = 0; j < kBlockK / 16; ++j) {
      const uint32_t a[4] = {pack_bf16(s[2 * j][0], s[2 * j][1]), pack_bf16(s[2 * j][2], s[2 * j][3]),
                             pack_bf16(s[2 * j + 1][0], s[2 * j + 1][1]), pack_bf16(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int p = 0; p < kDimTiles / 2; ++p) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_tile + (j * 16 + (mi & 1) * 8 + mr) * kRow + col0 + p * 16 + (mi >> 1) * 8);
        mma_bf16(o[2 * p], a, vb[0], vb[1]);
        mma_bf16(o[2 * p + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
  }
  // Ring attention's partial: the natural log of the row's sum of exponentials (m and l are in log2 units).
  if (lse && split == 0 && t4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = q_row + r * 8;
      if (qi < seq) lse[(int64_t(b) * seq + qi) * hq + h] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * 0.6931471805599453f
                                                                         : -INFINITY;
    }
  }
  // out [B, S, Hq, d]; each 8-column n-tile lies wholly inside or outside d (d is a multiple of 8).
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) {
    const int col = col0 + n * 8;
    if (col >= d) continue;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = q_row + r * 8;
      if (qi >= seq) continue;
      __nv_bfloat162 v = __floats2bfloat162_rn(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
      *reinterpret_cast<__nv_bfloat162*>(out + ((int64_t(b) * seq + qi) * hq + h) * d + col + 2 * t4) = v;
    }
  }
}

template <class C>
void launch(const bf16* qkv, const bf16* kv, bf16* out, float* lse, int64_t batch, int64_t seq, int64_t kv_seq, int hq,
            int hkv, int d, float scale, bool causal, const int32_t* key_len, cudaStream_t stream) {
  auto kernel = flash_attention_kernel<C>;
  if (C::kSmemBytes > 48 * 1024)  // per launch, as it is per device; cheap, and allowed during graph capture
    ZI_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  const dim3 grid(grid_for(seq, C::kBlockQ), unsigned(hq), unsigned(batch));
  const float scale_log2 = scale * 1.4426950408889634f;  // softmax via exp2: e^(s x) = 2^(s log2(e) x)
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(qkv, kv, out, lse, int(seq), int(kv_seq), hq, hkv, d, scale_log2,
                                                       causal, key_len);
  ZI_CUDA_LAUNCH_CHECK();
}

// Lengths passed as kernel arguments: no host staging buffer, so the write is stream-ordered and is recorded
// with its values when a CUDA graph is captured.
constexpr int kLengthsPerLaunch = 256;
struct Lengths {
  int32_t v[kLengthsPerLaunch];
};

__global__ void write_lengths_kernel(int32_t* q_len, int32_t* kv_len, int n, int32_t seq, Lengths kv) {
  const int i = threadIdx.x;
  if (i >= n) return;
  if (q_len) q_len[i] = seq;
  kv_len[i] = kv.v[i];
}

}  // namespace

namespace {

void dispatch(const bf16* qkv, const bf16* kv, bf16* out, float* lse, int64_t batch, int64_t seq, int64_t kv_seq, int hq,
              int hkv, int d, float scale, bool causal, const int32_t* key_len, cudaStream_t stream) {
  ZI_ASSERT(batch >= 1 && seq >= 1 && seq <= INT32_MAX && kv_seq >= 1 && kv_seq <= INT32_MAX && hq >= 1 && hkv >= 1 &&
            hq % hkv == 0);
  ZI_ASSERT(d >= 8 && d <= 512 && d % 8 == 0);
  // cp.async moves 16-byte chunks: row starts and head offsets are multiples of 8 elements when d is.
  ZI_ASSERT(reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(kv) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(out) % 4 == 0);
  if (d <= 16)
    launch<SmallHead<16>>(qkv, kv, out, lse, batch, seq, kv_seq, hq, hkv, d, scale, causal, key_len, stream);
  else if (d <= 32)
    launch<SmallHead<32>>(qkv, kv, out, lse, batch, seq, kv_seq, hq, hkv, d, scale, causal, key_len, stream);
  else if (d <= 64)
    launch<SmallHead<64>>(qkv, kv, out, lse, batch, seq, kv_seq, hq, hkv, d, scale, causal, key_len, stream);
  else if (d <= 128)
    launch<SmallHead<128>>(qkv, kv, out, lse, batch, seq, kv_seq, hq, hkv, d, scale, causal, key_len, stream);
  else if (d <= 256)
    launch<Head256>(qkv, kv, out, lse, batch, seq, kv_seq, hq, hkv, d, scale, causal, key_len, stream);
  else
    launch<Head512>(qkv, kv, out, lse, batch, seq, kv_seq, hq, hkv, d, scale, causal, key_len, stream);
}

}  // namespace

void flash_attention(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d, float scale,
                     bool causal, const int32_t* key_len, cudaStream_t stream) {
  dispatch(qkv, qkv, out, nullptr, batch, seq, seq, hq, hkv, d, scale, causal, key_len, stream);
}

void flash_attention_lse(const bf16* q_rows, const bf16* kv_rows, bf16* out, float* lse, int64_t batch, int64_t q_seq,
                         int64_t kv_seq, int heads, int d, float scale, const int32_t* key_len, cudaStream_t stream) {
  dispatch(q_rows, kv_rows, out, lse, batch, q_seq, kv_seq, heads, heads, d, scale, /*causal=*/false, key_len, stream);
}

namespace {

// Row softmax for the GEMM attention (attention.cpp): one block per row of the float32 scores, an online
// pass for the row's max and sum, then a second pass (mostly L2 hits) writing exp(s - max) / sum in bf16.
// Reads 8 bytes and writes 2 per score: memory bound (the VAE at 2048^2: 65536^2 scores, 43 GB moved,
// ~10 ms at ~4.2 TB/s).
constexpr int kSoftmaxThreads = 1024;

__device__ __forceinline__ void combine(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  l = (m == -INFINITY ? 0.0f : l * __expf(m - mx)) + (m2 == -INFINITY ? 0.0f : l2 * __expf(m2 - mx));
  m = mx;
}

__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_kernel(const float* __restrict__ s, bf16* __restrict__ p, int64_t n, int64_t ld) {
  const float* row = s + int64_t(blockIdx.x) * ld;
  bf16* out = p + int64_t(blockIdx.x) * ld;
  float m = -INFINITY, l = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) combine(m, l, row[i], 1.0f);
  for (int off = 16; off > 0; off >>= 1)
    combine(m, l, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, l, off));
  __shared__ float wm[32], wl[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) wm[warp] = m, wl[warp] = l;
  __syncthreads();
  m = lane < int(blockDim.x / 32) ? wm[lane] : -INFINITY;
  l = lane < int(blockDim.x / 32) ? wl[lane] : 0.0f;
  for (int off = 16; off > 0; off >>= 1)
    combine(m, l, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, l, off));
  const float inv = 1.0f / l;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = __float2bfloat16(__expf(row[i] - m) * inv);
}

}  // namespace

void softmax_rows_to_bf16(const float* s, bf16* p, int64_t rows, int64_t n, int64_t ld, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return;
  ZI_ASSERT(rows <= INT32_MAX);
  softmax_rows_kernel<<<unsigned(rows), kSoftmaxThreads, 0, stream>>>(s, p, n, ld);
  ZI_CUDA_LAUNCH_CHECK();
}

void write_sequence_lengths(const std::vector<int>& key_len, int64_t seq, int32_t* q_len, int32_t* kv_len,
                            cudaStream_t stream) {
  for (size_t first = 0; first < key_len.size(); first += kLengthsPerLaunch) {
    const int n = int(std::min<size_t>(kLengthsPerLaunch, key_len.size() - first));
    Lengths kv{};
    for (int i = 0; i < n; ++i) kv.v[i] = key_len[first + size_t(i)];
    write_lengths_kernel<<<1, kLengthsPerLaunch, 0, stream>>>(q_len ? q_len + first : nullptr, kv_len + first, n,
                                                              int32_t(seq), kv);
    ZI_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace zimage::cuda
