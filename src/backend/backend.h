// The op interface that the model code (Qwen3 text encoder, Z-Image DiT, VAE) is written against.
// Each backend implements every op: `cpu/` in float32 as the reference, `cuda/` in bf16 as the fast path.
// The ops are chosen so that the fused kernels of the fast path are single calls here (packed QKV with
// in-place QK-norm + RoPE, gated residual + RMSNorm, SwiGLU on a packed w1|w3 output, CFG + Euler step),
// and the CPU versions of those ops are their references.
//
// Conventions: activations are contiguous row-major tensors owned by the backend (device memory for
// CUDA). "Rows" are the leading dims flattened: a [B, S, D] tensor has B*S rows of D. Images are NHWC.
// Ops ending in '_' modify their first argument in place.
#pragma once

#include <functional>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace zimage {

enum class RopeStyle {
  HalfSplit,    // GPT-NeoX / Qwen: rotate x[i] with x[i + D/2]
  Interleaved,  // Z-Image DiT: rotate pairs (x[2m], x[2m+1]) as complex numbers
};

struct Conv2dParams {
  int stride = 1;
  int pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  static Conv2dParams same(int k) { return {1, k / 2, k / 2, k / 2, k / 2}; }
};

struct OpTime {
  std::string op;  // op name (GEMMs with their weight shape)
  int64_t calls = 0;
  double ms = 0;  // device time
};

// A weight in the form a checkpoint stores it (DESIGN.md §1), on the host or on a backend:
//   FP8: data F8E4M3 / F8E5M2 [rows, cols]; scale f32 [1] (per tensor) or [rows] (per row), or undefined
//     (plain FP8, the values themselves);
//   GGUF blocks: data U8 [rows, cols / block_elems * block_bytes] in ggml type `ggml_type` (io/gguf.h);
//   otherwise: data in its float dtype.
struct StoredWeight {
  Tensor data;
  Tensor scale;
  uint32_t ggml_type = 0;  // with U8 data
  Shape shape;             // the values' shape, [rows, cols] for the quantized forms
  bool blocks() const { return data.dtype() == DType::U8; }
  bool quantized() const { return blocks() || data.dtype() == DType::F8E4M3 || data.dtype() == DType::F8E5M2; }
};

// The values of a host StoredWeight in float32: FP8 value x scale (one rounding), ggml's block
// dequantization (ggml_dequantize, io/gguf.h), other dtypes widened. The reference of Backend::dequantize.
Tensor dequantize_on_host(const StoredWeight& w);

// One row of quantize_fp8_rows (the reference of every backend's, and the weights' per-output-channel
// quantization): writes the k e4m3 codes of x / s to q and returns s = max|x| / 448 (1 for zeros).
float quantize_fp8_row(const float* x, int64_t k, uint8_t* q);
// A host float32 matrix [rows, cols] as an FP8 StoredWeight: quantize_fp8_row per row (one scale per output
// channel), rows in parallel.
StoredWeight quantize_fp8_weight(const Tensor& values);

struct MemoryStats {
  size_t in_use = 0, peak = 0, cached = 0;  // bytes of device memory held by the engine
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;        // "cpu (float32, 8 threads)", "cuda:0 NVIDIA H200 (bf16)"
  virtual DType activation_dtype() const = 0;  // dtype of activations and weights on this backend

  // ---- memory ----
  virtual Tensor empty(const Shape& shape, DType dtype) = 0;
  // Copy a host tensor (any float dtype) to the backend, converting to `dtype`.
  virtual Tensor upload(const Tensor& host, DType dtype) = 0;
  Tensor upload(const Tensor& host) { return upload(host, activation_dtype()); }
  // Host matrices [n_i, K] stacked along rows into one backend tensor [sum n_i, K] of `dtype`: the
  // load-time packing of to_q|to_k|to_v and w1|w3. By default stacked on the host, then uploaded; a
  // device backend copies each part straight into its rows (no host copy of the packed matrix).
  virtual Tensor upload_rows(const std::vector<Tensor>& parts, DType dtype);
  // Copy a backend tensor to a host float32 tensor (waits for pending work).
  virtual Tensor to_host_f32(const Tensor& t) = 0;
  // Copy a backend tensor of bytes (uint8, or FP8 codes) to the host as uint8.
  virtual Tensor to_host_u8(const Tensor& t) = 0;
  virtual Tensor cast(const Tensor& x, DType dtype) = 0;
  virtual void synchronize() {}
  // The device queue the ops run on (a cudaStream_t for CUDA; null on the CPU): collectives between
  // GPUs are queued there, in order with the ops (parallel/nccl_communicator.cpp).
  virtual void* native_stream() { return nullptr; }
  virtual MemoryStats memory_stats() const { return {}; }  // device backends only
  virtual void reset_peak_memory() {}

  // ---- timing ----
  // A point in the backend's queue of work (a CUDA event; the host clock on the CPU). Taking a mark
  // never waits for the device; elapsed_ms waits until `to` has been reached.
  using Mark = std::shared_ptr<void>;
  virtual Mark mark();
  virtual double elapsed_ms(const Mark& from, const Mark& to);
  virtual void wait(const Mark&) {}  // until the work queued before the mark is done
  // Per-op device time while profiling is on (CUDA only; one event pair per op call).
  virtual void set_op_profiling(bool) {}
  virtual std::vector<OpTime> take_op_profile() { return {}; }  // aggregated since the last call

  // ---- linear algebra ----
  // y[rows, N] = x[rows, K] · w[N, K]^T (+ bias[N]). x may have any leading dims; y keeps them.
  virtual Tensor linear(const Tensor& x, const Tensor& w, const Tensor* bias = nullptr) = 0;

  // ---- quantized weights ----
  // A backend StoredWeight as a [rows, cols] tensor of the activation dtype: dequantize_on_host's float32
  // values rounded once to that dtype. Linear's apply() calls it right before the GEMM, so only one
  // layer's weight exists dequantized at a time.
  virtual Tensor dequantize(const StoredWeight& w) = 0;

  // ---- FP8 linears (W8A8 e4m3, --quantization fp8) ----
  // Rows of x [rows, K] (any leading dims) quantized to e4m3 with one float32 scale each:
  //   s = max_k |x[k]| / 448 (1 for a row of zeros),  q[k] = e4m3(x[k] / s)  (float32 division, round to
  //   nearest even, saturating at +-448). q keeps x's shape.
  struct Fp8Rows {
    Tensor q;      // F8E4M3, x's shape
    Tensor scale;  // f32 [rows]
  };
  virtual Fp8Rows quantize_fp8_rows(const Tensor& x) = 0;
  // y [rows, N] = (sum_k q_x[k] q_w[n, k]) * s_x[row] * s_w[n] (+ bias[n]), in the activation dtype: x from
  // quantize_fp8_rows, w an F8E4M3 StoredWeight [N, K] with a float32 scale per row. Every product of two
  // e4m3 values is exact in float32; the sums are float32 (their order is the backend's).
  virtual Tensor linear_fp8(const Fp8Rows& x, const StoredWeight& w, const Tensor* bias = nullptr) = 0;
  // The producers of FP8 linears' inputs: the op, then quantize_fp8_rows of its output, in one pass on a device
  // (no activation-dtype output is written). The composition is the reference and the default.
  virtual Fp8Rows modulated_rms_norm_fp8(const Tensor& x, const Tensor& w, const Tensor* scale, float eps) {
    return quantize_fp8_rows(modulated_rms_norm(x, w, scale, eps));
  }
  virtual Fp8Rows gated_residual_then_rms_norm_fp8_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate,
                                                    const Tensor& w_next, const Tensor* scale_next, float eps,
                                                    const Tensor* extra = nullptr) {
    return quantize_fp8_rows(gated_residual_then_rms_norm_(x, y, w, gate, w_next, scale_next, eps, extra));
  }
  virtual Fp8Rows swiglu_fp8(const Tensor& x) { return quantize_fp8_rows(swiglu(x)); }

  // ---- row gathers ----
  // out[i] = src[idx[i]] (rows of src, any leading dims flattened); idx[i] = -1 gives a zero row.
  // Builds padded sequences, concatenations and embedding lookups in one pass. idx: an int32 tensor of
  // this backend (a layout's row maps are uploaded once and reused by every step).
  virtual Tensor gather_rows(const Tensor& src, const Tensor& idx) = 0;
  // The same with host indices (checked against src here), uploaded for this call.
  Tensor gather_rows(const Tensor& src, const std::vector<int32_t>& idx);
  Tensor upload_i32(const std::vector<int32_t>& values);
  // Rows of a and then rows of b (same row width).
  virtual Tensor concat_rows(const Tensor& a, const Tensor& b) = 0;
  // Columns [start, start+len) of a [rows, N] tensor, as a new contiguous tensor.
  virtual Tensor slice_cols(const Tensor& x, int64_t start, int64_t len) = 0;

  // ---- normalization ----
  // RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * w (w optional).
  virtual Tensor rms_norm(const Tensor& x, const Tensor* w, float eps) = 0;
  // x [B, S, D] -> rms_norm(x, w) * (1 + scale[b]) with scale [B, D] (no scale: plain rms_norm).
  virtual Tensor modulated_rms_norm(const Tensor& x, const Tensor& w, const Tensor* scale, float eps) = 0;
  // x [B, S, D] += tanh(gate[b]) * rms_norm(y, w) with gate [B, D] (no gate: x += rms_norm(y, w)), then
  // x += extra [B, S, D] when given (a ControlNet's output added after a DiT layer), as (x + g n) + e.
  virtual void gated_residual_rms_norm_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate, float eps,
                                        const Tensor* extra = nullptr) = 0;
  // gated_residual_rms_norm_(x, y, w, gate, extra), then modulated_rms_norm(x, w_next, scale_next) of the
  // updated x: a DiT block's residual and the next norm in one pass (this composition is the reference).
  virtual Tensor gated_residual_then_rms_norm_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate,
                                               const Tensor& w_next, const Tensor* scale_next, float eps,
                                               const Tensor* extra = nullptr) {
    gated_residual_rms_norm_(x, y, w, gate, eps, extra);
    return modulated_rms_norm(x, w_next, scale_next, eps);
  }
  // x [B, S, D] -> layer_norm(x) (no affine) * (1 + scale[b]) with scale [B, D].
  virtual Tensor modulated_layer_norm(const Tensor& x, const Tensor& scale, float eps) = 0;
  // GroupNorm over an NHWC image [N, H, W, C] with affine w, b [C]; optionally followed by SiLU.
  virtual Tensor group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, float eps,
                            bool silu) = 0;

  // ---- attention ----
  // In place on a packed projection qkv [rows, (Hq + 2*Hkv) * D] (q heads, then k heads, then v heads):
  // RMSNorm over each q and k head (weights q_w, k_w [D]), then RoPE with per-row tables cos, sin
  // [rows, D/2] (float32). v is untouched.
  virtual void qk_norm_rope_(Tensor& qkv, int hq, int hkv, int d, const Tensor& q_w, const Tensor& k_w, float eps,
                             const Tensor& cos, const Tensor& sin, RopeStyle style) = 0;
  // Softmax attention over a packed qkv [B, S, (Hq + 2*Hkv) * D]; returns [B, S, Hq * D].
  // Item b attends to keys [0, key_len[b]) only (key padding); `causal` adds the causal mask.
  // Query heads share kv heads in groups of Hq/Hkv (GQA).
  virtual Tensor attention(const Tensor& qkv, int hq, int hkv, int d, float scale, bool causal,
                           const std::vector<int>& key_len) = 0;
  // Ring attention's part (parallel/usp_attention.h): the queries of q_rows against the keys and values of
  // kv_rows, both packed as attention() takes them ([B, Sq, 3*H*D] and [B, Sk, 3*H*D], H heads, no GQA),
  // item b attending keys [0, key_len[b]) (0 allowed). Returns out [B, Sq, H*D] and lse [B, Sq, H] float32,
  // lse = log sum_j exp(scale q.k_j) (-inf, and out 0, where no key is valid).
  virtual Tensor attention_with_lse(const Tensor& q_rows, const Tensor& kv_rows, int heads, int d, float scale,
                                    const std::vector<int>& key_len, Tensor& lse) = 0;
  // Two partial attentions of the same queries over disjoint keys merged into the attention over both, in
  // place on out [B, S, H*D] and lse [B, S, H] (float32 math): with m = max(lse, lse_b) (m = -inf: out stays),
  //   out = (e^(lse-m) out + e^(lse_b-m) out_b) / (e^(lse-m) + e^(lse_b-m)),  lse = m + log(that sum).
  virtual void merge_attention_(Tensor& out, Tensor& lse, const Tensor& out_b, const Tensor& lse_b) = 0;

  // ---- elementwise ----
  virtual void add_(Tensor& x, const Tensor& y) = 0;  // x += y (same shape)
  virtual Tensor silu(const Tensor& x) = 0;
  // x [rows, 2F] (w1 x | w3 x) -> silu(x[:, :F]) * x[:, F:]  [rows, F]
  virtual Tensor swiglu(const Tensor& x) = 0;
  virtual Tensor scale_shift(const Tensor& x, float scale, float shift) = 0;  // x * scale + shift

  // ---- images (NHWC) ----
  // w [O, kh, kw, C] (NHWC filter order), bias [O]. x [N, H, W, C] -> [N, Ho, Wo, O].
  virtual Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, const Conv2dParams& p) = 0;
  virtual Tensor upsample_nearest2x(const Tensor& x) = 0;  // [N, H, W, C] -> [N, 2H, 2W, C]
  virtual Tensor nchw_to_nhwc(const Tensor& x) = 0;
  virtual Tensor nhwc_to_nchw(const Tensor& x) = 0;
  // [N, H, W, 3] in [-1, 1] -> uint8 round(clamp(x/2 + 0.5, 0, 1) * 255), ties to even (numpy's round).
  virtual Tensor image_to_u8(const Tensor& x) = 0;
  // uint8 [N, H, W, 3] -> activation dtype 2 * (x / 255) - 1 in float32 arithmetic (diffusers' normalize of
  // numpy's float32(x) / 255): the init images of image to image go up as bytes, 4x less than float32.
  virtual Tensor u8_to_image(const Tensor& x) = 0;

  // ---- DiT token layout ----
  // latent [C, H, W] -> tokens [(H/p)*(W/p), p*p*C], tokens row-major over (H/p, W/p), features (ph, pw, c).
  virtual Tensor patchify(const Tensor& latent, int p) = 0;
  // tokens [>= (H/p)*(W/p), p*p*C] (extra rows ignored) -> latent [C, H, W].
  virtual Tensor unpatchify(const Tensor& tokens, int c, int h, int w, int p) = 0;

  // ---- time conditioning ----
  // Sinusoidal features of diffusers' TimestepEmbedder for each t_i * t_scale, t a float32 [N] tensor of
  // this backend (read on the device: a recorded graph replays with new t): [N, dim] in the activation
  // dtype, [cos(a*f_k) | sin(a*f_k)] with a = t_i * t_scale, f_k = exp(-ln(max_period) * k / (dim/2)),
  // float32 math.
  virtual Tensor timestep_embedding(const Tensor& t, float t_scale, int dim, float max_period) = 0;

  // ---- sampler ----
  // One flow-match Euler step with classifier-free guidance, in float32:
  //   pred = pos + g * (pos - neg) (g > 0; else pred = pos), optionally renormalized so that
  //   ‖pred‖ <= cfg_norm * ‖pos‖ per sample (cfg_norm > 0), then latents += dt * (-pred).
  // latents [B, ...] f32; model_out [B or 2B, ...] with the positives first.
  virtual void cfg_euler_step_(Tensor& latents, const Tensor& model_out, float guidance, float cfg_norm,
                               float dt) = 0;

  // ---- latents from images (image-to-image, inpainting) ----
  // y = min(max(x, lo), hi) elementwise, same dtype as x (the VAE encoder's logvar clamp).
  virtual Tensor clamp(const Tensor& x, float lo, float hi) = 0;
  // A draw of diffusers' DiagonalGaussianDistribution taken into the DiT's latent space, float32 math:
  //   out = (mean + exp(0.5 * logvar) * eps - shift) * scale
  // mean, logvar [B, C, h, w] (activation dtype or f32), eps [B, C, h, w] f32 (the host generator's draw);
  // out f32. shift 0, scale 1 gives the raw sample (what diffusers' retrieve_latents returns).
  virtual Tensor gaussian_sample(const Tensor& mean, const Tensor& logvar, const Tensor& eps, float shift,
                                 float scale) = 0;
  // Flow-match noising of clean latents (diffusers' scale_noise), optionally kept only outside a mask
  // (the inpaint blend after each step), float32, in place on x [B, C, h, w]:
  //   n = sigma * noise + (1 - sigma) * init          (init, noise [B, C, h, w] f32)
  //   x = n                                           (mask null: image-to-image's start latents)
  //   x = (1 - m) * n + m * x                         (mask [B, 1, h, w] f32, broadcast over C)
  virtual void flow_match_blend_(Tensor& x, const Tensor& init, const Tensor& noise, const Tensor* mask,
                                 float sigma) = 0;

  // ---- numerical guards ----
  // counts[slot] += the number of NaN and Inf elements of x (float32 or the activation dtype); counts is
  // an int32 tensor of this backend. Queued like every op: a caller reads the counts once, when the
  // work is done, so the guard costs no synchronization.
  virtual void count_non_finite(const Tensor& x, Tensor& counts, int64_t slot) = 0;

  // ---- recorded op sequences ----
  // make_graph(fn) returns a callable that computes fn(inputs). On CUDA the first call runs fn (ops
  // choose their algorithms, buffers and workspaces), the second records what fn queues into a CUDA
  // graph, and later calls copy their inputs into the graph's and replay it: one launch instead of one
  // per op. fn must be the same sequence of ops for inputs of the same shapes and use only this
  // backend's device tensors: no host-to-device copies (upload, host-index gather_rows), no reads back,
  // no collectives. Each call returns a new tensor. Backends without graphs (CPU), and CUDA while op
  // profiling is on, run fn on every call.
  using GraphFn = std::function<Tensor(const std::vector<Tensor>&)>;
  class Graph {
   public:
    virtual ~Graph() = default;
    virtual Tensor operator()(const std::vector<Tensor>& inputs) = 0;
    virtual bool recorded() const { return false; }  // replays a recorded graph
  };
  virtual std::unique_ptr<Graph> make_graph(GraphFn fn);
};

// Graphs by a key (the shapes they were made for), most recently used first, at most `capacity`: each
// recorded graph holds device memory, and a model sees many shapes over time.
class GraphCache {
 public:
  explicit GraphCache(size_t capacity) : capacity_(capacity) {}
  // The graph for `key`; made by make() when missing (dropping the least recently used beyond capacity).
  Backend::Graph& get(const std::vector<int64_t>& key, const std::function<std::unique_ptr<Backend::Graph>()>& make);

 private:
  size_t capacity_;
  std::list<std::pair<std::vector<int64_t>, std::unique_ptr<Backend::Graph>>> entries_;
};

std::unique_ptr<Backend> make_cpu_backend();

// CUDA GPUs usable by this build (0 when it has no CUDA backend, no driver or no GPU).
int cuda_device_count();
// Throws InvalidArgument when this build has no CUDA backend or the device does not exist.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

}  // namespace zimage
