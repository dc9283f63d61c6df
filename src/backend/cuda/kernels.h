// Launchers of the CUDA backend's own kernels (bf16 activations, float32 math inside). Each has the
// CPU reference of the same name in src/backend/cpu/cpu_backend.cpp; the GPU tests compare the two
// through the Backend interface. All launchers are asynchronous on `stream`; shapes as in backend.h.
#pragma once

#include <cstdint>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

// ---- layout and elementwise (elementwise.cu) ----
void cast_f32_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t stream);
void cast_bf16_to_f32(const bf16* x, float* y, int64_t n, cudaStream_t stream);
// out[i] = src[idx[i]] (rows of row_bytes bytes; row_bytes a multiple of 2), idx[i] = -1 -> zero row.
// idx is a device array of `rows` int32.
void gather_rows(const void* src, const int32_t* idx, void* out, int64_t rows, int64_t row_bytes, cudaStream_t stream);
// Ring attention: out, lse (the attention of some keys) merged in place with out_b, lse_b (of other keys):
// out [slots, d], lse [slots] float32, as Backend::merge_attention_.
void merge_attention(bf16* out, float* lse, const bf16* out_b, const float* lse_b, int64_t slots, int64_t d,
                     cudaStream_t stream);
void add_inplace(bf16* x, const bf16* y, int64_t n, cudaStream_t stream);
void silu(const bf16* x, bf16* y, int64_t n, cudaStream_t stream);
// x [rows, 2f] -> y [rows, f] = silu(x[:, :f]) * x[:, f:]
void swiglu(const bf16* x, bf16* y, int64_t rows, int64_t f, cudaStream_t stream);
void scale_shift(const bf16* x, bf16* y, int64_t n, float scale, float shift, cudaStream_t stream);
void clamp(const bf16* x, bf16* y, int64_t n, float lo, float hi, cudaStream_t stream);  // min(max(x, lo), hi)
// latent [c, h, w] <-> tokens [(h/p)*(w/p), p*p*c] (features ordered ph, pw, c)
void patchify(const bf16* latent, bf16* tokens, int c, int h, int w, int p, cudaStream_t stream);
void unpatchify(const bf16* tokens, bf16* latent, int c, int h, int w, int p, cudaStream_t stream);
void nchw_to_nhwc(const bf16* x, bf16* y, int64_t n, int64_t c, int64_t h, int64_t w, cudaStream_t stream);
void nhwc_to_nchw(const bf16* x, bf16* y, int64_t n, int64_t h, int64_t w, int64_t c, cudaStream_t stream);
void upsample_nearest2x(const bf16* x, bf16* y, int64_t n, int64_t h, int64_t w, int64_t c, cudaStream_t stream);
// uint8 round-half-even(clamp(x/2 + 0.5, 0, 1) * 255)
void image_to_u8(const bf16* x, uint8_t* y, int64_t n, cudaStream_t stream);
void u8_to_image(const uint8_t* x, bf16* y, int64_t n, cudaStream_t stream);
// *count += the number of NaN/Inf elements of x[n] (count on the device; the caller zeroes it once).
void count_non_finite_f32(const float* x, int64_t n, int* count, cudaStream_t stream);
void count_non_finite_bf16(const bf16* x, int64_t n, int* count, cudaStream_t stream);
// latents [batch, per_item] f32; model_out [batch or 2*batch, per_item] f32 (positives first).
// pred = pos + g*(pos - neg) when guidance > 0 (else pos); with guidance, if cfg_norm > 0 and ‖pred‖ > cfg_norm*‖pos‖
// (per item) pred is scaled down to that norm; latents += dt * (-pred).
void cfg_euler_step(float* latents, const float* model_out, int64_t batch, int64_t per_item, float guidance,
                    float cfg_norm, float dt, cudaStream_t stream);

// ---- FP8 activations (quantize_fp8.cu); reference: quantize_fp8_row (backend.cpp) ----
// x [rows, k] -> q [rows, k] e4m3 codes and scale [rows]: Backend::quantize_fp8_rows.
void quantize_rows_e4m3(const bf16* x, uint8_t* q, float* scale, int64_t rows, int64_t k, cudaStream_t stream);
// The producers of FP8 linears' inputs writing codes and scales instead of bf16 (Backend::*_fp8; the bf16
// values they would write, quantized as above): swiglu (elementwise.cu) and the norms (norms.cu).
void swiglu_e4m3(const bf16* x, uint8_t* q, float* scale, int64_t rows, int64_t f, cudaStream_t stream);
void modulated_rms_norm_e4m3(const bf16* x, const bf16* w, const bf16* scale, uint8_t* q, float* q_scale, int64_t batch,
                             int64_t seq, int64_t d, float eps, cudaStream_t stream);
void gated_residual_then_rms_norm_e4m3(bf16* x, const bf16* y, const bf16* w, const bf16* gate, const bf16* extra,
                                       const bf16* w_next, const bf16* scale_next, uint8_t* q, float* q_scale,
                                       int64_t batch, int64_t seq, int64_t d, float eps, cudaStream_t stream);

// ---- quantized weights (dequantize.cu); reference: dequantize_on_host (backend.cpp) ----
// y[n] = the n values of ggml blocks q of type ggml_type (io/gguf.h's GgmlType: Q4_0 .. Q6_K), n a multiple
// of the block size.
void dequantize_ggml_to_bf16(uint32_t ggml_type, const uint8_t* q, bf16* y, int64_t n, cudaStream_t stream);
// y[rows, cols] = fp8 q (e4m3, or e5m2) x scale: scale_count 1 (per tensor), rows (per row) or 0 (none).
void dequantize_fp8_to_bf16(bool e5m2, const uint8_t* q, const float* scale, int64_t scale_count, bf16* y,
                            int64_t rows, int64_t cols, cudaStream_t stream);

// ---- latents from images (latent_sampling.cu) ----
// out[n] f32 = (mean + exp(0.5 * logvar) * eps - shift) * scale (the VAE posterior's draw in DiT latent space).
void gaussian_sample_bf16(const bf16* mean, const bf16* logvar, const float* eps, float* out, int64_t n, float shift,
                          float scale, cudaStream_t stream);
void gaussian_sample_f32(const float* mean, const float* logvar, const float* eps, float* out, int64_t n, float shift,
                         float scale, cudaStream_t stream);
// In place on x [b, c, hw] f32: noised = sigma*noise + (1 - sigma)*init; x = noised without a mask, else
// (1 - m)*noised + m*x with m = mask[b, hw] (broadcast over c).
void flow_match_blend(float* x, const float* init, const float* noise, const float* mask, int64_t b, int64_t c,
                      int64_t hw, float sigma, cudaStream_t stream);

// [n, dim] bf16 = [cos(t_i * f_k) | sin(t_i * f_k)], f_k = exp(-ln(max_period) * k / (dim/2)); t: n device floats.
void timestep_embedding(const float* t, float t_scale, bf16* y, int64_t n, int dim, float max_period,
                        cudaStream_t stream);

// ---- normalization (norms.cu) ----
// Row-wise over the last dim d. w may be null (no affine).
void rms_norm(const bf16* x, const bf16* w, bf16* y, int64_t rows, int64_t d, float eps, cudaStream_t stream);
// x, y [batch, seq, d]; y = rms_norm(x) * w * (1 + scale[b]) with scale [batch, d] (null: no modulation).
void modulated_rms_norm(const bf16* x, const bf16* w, const bf16* scale, bf16* y, int64_t batch, int64_t seq, int64_t d,
                        float eps, cudaStream_t stream);
// x [batch, seq, d] += tanh(gate[b]) * rms_norm(y) * w (gate null: x += rms_norm(y) * w), then
// x += extra [batch, seq, d] (null: nothing; a ControlNet's output), rounded to bf16 once.
void gated_residual_rms_norm(bf16* x, const bf16* y, const bf16* w, const bf16* gate, const bf16* extra, int64_t batch,
                             int64_t seq, int64_t d, float eps, cudaStream_t stream);
// The same, then out = rms_norm(x) * w_next * (1 + scale_next[b]) of the updated x, in one pass over the rows.
void gated_residual_then_rms_norm(bf16* x, const bf16* y, const bf16* w, const bf16* gate, const bf16* extra,
                                  const bf16* w_next, const bf16* scale_next, bf16* out, int64_t batch, int64_t seq,
                                  int64_t d, float eps, cudaStream_t stream);
// y = layer_norm(x) (no affine) * (1 + scale[b])
void modulated_layer_norm(const bf16* x, const bf16* scale, bf16* y, int64_t batch, int64_t seq, int64_t d, float eps,
                          cudaStream_t stream);
// NHWC [n, hw, c], affine w, b [c]; optional SiLU.
void group_norm_nhwc(const bf16* x, const bf16* w, const bf16* b, bf16* y, int64_t n, int64_t hw, int64_t c, int groups,
                     float eps, bool silu, cudaStream_t stream);
// In place on qkv [rows, (hq + 2*hkv) * d]: RMSNorm of each q head (weights qw [d]) and k head (kw [d]),
// then RoPE with cos, sin [rows, d/2] float32; interleaved pairs (2m, 2m+1) or half-split (m, m + d/2).
void qk_norm_rope(bf16* qkv, int64_t rows, int hq, int hkv, int d, const bf16* qw, const bf16* kw, float eps,
                  const float* cos, const float* sin, bool interleaved, cudaStream_t stream);

}  // namespace zimage::cuda
