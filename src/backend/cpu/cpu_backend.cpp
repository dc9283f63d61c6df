// The float32 reference backend: every op of backend.h written plainly; linear layers and attention through
// gemm_fixed_order.h (batch-invariant), convolution GEMMs through OpenBLAS.
// Weights of any dtype are upcast to float32 at upload. Loops that BLAS does not cover run on
// parallel_for (src/core/parallel.h).
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>

#include "backend/backend.h"
#include "backend/cpu/gemm_fixed_order.h"
#include "core/error.h"
#include "core/parallel.h"

namespace zimage {

namespace {

int64_t rows_of(const Tensor& t) { return t.numel() / t.dim(-1); }

void check_f32(const Tensor& t, const char* op) {
  ZI_CHECK(t.dtype() == DType::F32 && t.device() == Device::Host && t.is_contiguous(), ErrorKind::Internal,
           std::string(op) + ": cpu backend expects contiguous host f32 tensors, got " + dtype_name(t.dtype()) +
               " " + shape_str(t.shape()));
}

float rms_inv(const float* x, int64_t d, float eps) {
  double ss = 0;
  for (int64_t i = 0; i < d; ++i) ss += double(x[i]) * x[i];
  return float(1.0 / std::sqrt(ss / double(d) + double(eps)));
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu (float32, " + std::to_string(num_threads()) + " threads)"; }
  DType activation_dtype() const override { return DType::F32; }

  Tensor empty(const Shape& shape, DType dtype) override { return Tensor::empty(shape, dtype); }

  Tensor upload(const Tensor& host, DType dtype) override {
    ZI_ASSERT(host.device() == Device::Host);
    Tensor c = host.is_contiguous() ? host : host.clone();
    return c.to_dtype(dtype);
  }
  Tensor to_host_f32(const Tensor& t) override { return t.to_f32(); }
  Tensor to_host_u8(const Tensor& t) override {
    ZI_ASSERT(dtype_size(t.dtype()) == 1 && t.is_contiguous());
    Tensor out = Tensor::empty(t.shape(), DType::U8);
    std::memcpy(out.data(), t.data(), t.nbytes());
    return out;
  }
  Tensor cast(const Tensor& x, DType dtype) override { return x.to_dtype(dtype); }
  // Per call, like the device backends, so the CPU runs (and tests) the path the GPU runs; the float32
  // result is the reference itself, so a quantized model's outputs equal dequantizing at load.
  Tensor dequantize(const StoredWeight& w) override { return dequantize_on_host(w); }

  Tensor linear(const Tensor& x, const Tensor& w, const Tensor* bias) override {
    check_f32(x, "linear");
    check_f32(w, "linear");
    int64_t k = x.dim(-1), n = w.dim(0), m = rows_of(x);
    ZI_CHECK(w.ndim() == 2 && w.dim(1) == k, ErrorKind::Internal,
             "linear: x " + shape_str(x.shape()) + " does not match weight " + shape_str(w.shape()));
    Shape out_shape = x.shape();
    out_shape.back() = n;
    Tensor y = Tensor::empty(out_shape, DType::F32);
    if (bias) {
      check_f32(*bias, "linear bias");
      ZI_ASSERT(bias->numel() == n);
    }
    // Not BLAS: a row's bits must not depend on the other rows of the call (batch invariance).
    linear_fixed_order(x.f32(), m, k, w.f32(), n, bias ? bias->f32() : nullptr, y.f32());
    return y;
  }

  // The reference of the W8A8 path: the quantization written once (quantize_fp8_row), the GEMM on the exact
  // float32 values of the e4m3 codes through the fixed-order kernel, then the two scales.
  Fp8Rows quantize_fp8_rows(const Tensor& x) override {
    check_f32(x, "quantize_fp8_rows");
    const int64_t k = x.dim(-1), r = rows_of(x);
    Fp8Rows out{Tensor::empty(x.shape(), DType::F8E4M3), Tensor::empty({r}, DType::F32)};
    parallel_for(r, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        out.scale.f32()[i] = quantize_fp8_row(x.f32() + i * k, k, out.q.data_as<uint8_t>() + i * k);
    });
    return out;
  }

  Tensor linear_fp8(const Fp8Rows& x, const StoredWeight& w, const Tensor* bias) override {
    ZI_ASSERT(x.q.dtype() == DType::F8E4M3 && w.data.dtype() == DType::F8E4M3 && w.scale.dtype() == DType::F32);
    const int64_t k = x.q.dim(-1), n = w.shape[0], m = rows_of(x.q);
    ZI_CHECK(w.shape[1] == k && w.scale.numel() == n && x.scale.numel() == m, ErrorKind::Internal,
             "linear_fp8: x " + shape_str(x.q.shape()) + " does not match weight " + shape_str(w.shape));
    if (bias) {
      check_f32(*bias, "linear_fp8 bias");
      ZI_ASSERT(bias->numel() == n);
    }
    const Tensor xv = x.q.to_f32(), wv = w.data.to_f32();  // e4m3 -> float32 is exact
    Shape out_shape = x.q.shape();
    out_shape.back() = n;
    Tensor y = Tensor::empty(out_shape, DType::F32);
    linear_fixed_order(xv.f32(), m, k, wv.f32(), n, nullptr, y.f32());
    const float *sx = x.scale.f32(), *sw = w.scale.f32(), *b = bias ? bias->f32() : nullptr;
    parallel_for(m, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        for (int64_t j = 0; j < n; ++j) {
          float& v = y.f32()[i * n + j];
          v = v * sx[i] * sw[j];
          if (b) v += b[j];
        }
    });
    return y;
  }

  using Backend::gather_rows;
  Tensor gather_rows(const Tensor& src, const Tensor& index) override {
    ZI_ASSERT(src.device() == Device::Host && src.is_contiguous());
    ZI_ASSERT(index.dtype() == DType::I32 && index.device() == Device::Host && index.is_contiguous());
    int64_t d = src.dim(-1), r = rows_of(src), n = index.numel();
    size_t row_bytes = size_t(d) * dtype_size(src.dtype());
    Tensor out = Tensor::empty({n, d}, src.dtype());
    auto* o = static_cast<char*>(out.data());
    const auto* s = static_cast<const char*>(src.data());
    const int32_t* idx = index.data_as<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      ZI_ASSERT(idx[i] >= -1 && idx[i] < r);
      if (idx[i] < 0) std::memset(o + i * row_bytes, 0, row_bytes);
      else std::memcpy(o + i * row_bytes, s + size_t(idx[i]) * row_bytes, row_bytes);
    }
    return out;
  }

  Tensor concat_rows(const Tensor& a, const Tensor& b) override {
    ZI_ASSERT(a.dim(-1) == b.dim(-1) && a.dtype() == b.dtype() && a.is_contiguous() && b.is_contiguous());
    int64_t d = a.dim(-1);
    Tensor out = Tensor::empty({rows_of(a) + rows_of(b), d}, a.dtype());
    std::memcpy(out.data(), a.data(), a.nbytes());
    std::memcpy(static_cast<char*>(out.data()) + a.nbytes(), b.data(), b.nbytes());
    return out;
  }

  Tensor slice_cols(const Tensor& x, int64_t start, int64_t len) override {
    check_f32(x, "slice_cols");
    int64_t n = x.dim(-1), r = rows_of(x);
    ZI_ASSERT(start >= 0 && len >= 0 && start + len <= n);
    Shape s = x.shape();
    s.back() = len;
    Tensor out = Tensor::empty(s, DType::F32);
    for (int64_t i = 0; i < r; ++i) std::memcpy(out.f32() + i * len, x.f32() + i * n + start, size_t(len) * 4);
    return out;
  }

  Tensor rms_norm(const Tensor& x, const Tensor* w, float eps) override {
    check_f32(x, "rms_norm");
    int64_t d = x.dim(-1), r = rows_of(x);
    const float* wp = w ? w->f32() : nullptr;
    if (w) ZI_ASSERT(w->numel() == d);
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    parallel_for(r, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* xr = xp + i * d;
        float* yr = yp + i * d;
        float inv = rms_inv(xr, d, eps);
        for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * inv * (wp ? wp[j] : 1.0f);
      }
    });
    return y;
  }

  Tensor modulated_rms_norm(const Tensor& x, const Tensor& w, const Tensor* scale, float eps) override {
    check_f32(x, "modulated_rms_norm");
    ZI_ASSERT(x.ndim() == 3);
    int64_t bsz = x.dim(0), s = x.dim(1), d = x.dim(2);
    if (scale) ZI_ASSERT(scale->numel() == bsz * d);
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const float *xp = x.f32(), *wp = w.f32();
    const float* sp = scale ? scale->f32() : nullptr;
    float* yp = y.f32();
    parallel_for(bsz * s, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* xr = xp + i * d;
        const float* sr = sp ? sp + (i / s) * d : nullptr;
        float* yr = yp + i * d;
        float inv = rms_inv(xr, d, eps);
        for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * inv * wp[j] * (sr ? 1.0f + sr[j] : 1.0f);
      }
    });
    return y;
  }

  void gated_residual_rms_norm_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate, float eps,
                                const Tensor* extra) override {
    check_f32(x, "gated_residual_rms_norm_");
    check_f32(y, "gated_residual_rms_norm_");
    ZI_ASSERT(x.ndim() == 3 && x.shape() == y.shape());
    int64_t bsz = x.dim(0), s = x.dim(1), d = x.dim(2);
    if (gate) ZI_ASSERT(gate->numel() == bsz * d);
    if (extra) {
      check_f32(*extra, "gated_residual_rms_norm_");
      ZI_ASSERT(extra->shape() == x.shape());
    }
    float* xp = x.f32();
    const float *yp = y.f32(), *wp = w.f32();
    const float* gp = gate ? gate->f32() : nullptr;
    const float* ep = extra ? extra->f32() : nullptr;
    parallel_for(bsz * s, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* yr = yp + i * d;
        const float* gr = gp ? gp + (i / s) * d : nullptr;
        float* xr = xp + i * d;
        float inv = rms_inv(yr, d, eps);
        for (int64_t j = 0; j < d; ++j) xr[j] += (gr ? std::tanh(gr[j]) : 1.0f) * (yr[j] * inv * wp[j]);
        if (ep)
          for (int64_t j = 0; j < d; ++j) xr[j] += ep[i * d + j];
      }
    });
  }

  Tensor modulated_layer_norm(const Tensor& x, const Tensor& scale, float eps) override {
    check_f32(x, "modulated_layer_norm");
    ZI_ASSERT(x.ndim() == 3 && scale.numel() == x.dim(0) * x.dim(2));
    int64_t bsz = x.dim(0), s = x.dim(1), d = x.dim(2);
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const float *xp = x.f32(), *sp = scale.f32();
    float* yp = y.f32();
    parallel_for(bsz * s, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* xr = xp + i * d;
        const float* sr = sp + (i / s) * d;
        float* yr = yp + i * d;
        double mean = 0, var = 0;
        for (int64_t j = 0; j < d; ++j) mean += xr[j];
        mean /= double(d);
        for (int64_t j = 0; j < d; ++j) var += (xr[j] - mean) * (xr[j] - mean);
        float inv = float(1.0 / std::sqrt(var / double(d) + double(eps)));
        for (int64_t j = 0; j < d; ++j) yr[j] = float(xr[j] - mean) * inv * (1.0f + sr[j]);
      }
    });
    return y;
  }

  Tensor group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, float eps, bool silu) override {
    check_f32(x, "group_norm");
    ZI_ASSERT(x.ndim() == 4);
    int64_t n = x.dim(0), hw = x.dim(1) * x.dim(2), c = x.dim(3);
    ZI_CHECK(c % groups == 0, ErrorKind::Internal, "group_norm: channels not divisible by groups");
    int64_t cg = c / groups;
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const float *xp = x.f32(), *wp = w.f32(), *bp = b.f32();
    float* yp = y.f32();
    parallel_for(n * groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t ng = lo; ng < hi; ++ng) {
        int64_t img = ng / groups, g = ng % groups;
        const float* base = xp + img * hw * c + g * cg;
        double sum = 0, sq = 0;
        for (int64_t p = 0; p < hw; ++p)
          for (int64_t j = 0; j < cg; ++j) {
            double v = base[p * c + j];
            sum += v;
            sq += v * v;
          }
        double cnt = double(hw * cg), mean = sum / cnt, var = std::max(0.0, sq / cnt - mean * mean);
        float inv = float(1.0 / std::sqrt(var + double(eps)));
        float* out = yp + img * hw * c + g * cg;
        for (int64_t p = 0; p < hw; ++p)
          for (int64_t j = 0; j < cg; ++j) {
            float v = float(base[p * c + j] - mean) * inv * wp[g * cg + j] + bp[g * cg + j];
            out[p * c + j] = silu ? v / (1.0f + std::exp(-v)) : v;
          }
      }
    });
    return y;
  }

  void qk_norm_rope_(Tensor& qkv, int hq, int hkv, int d, const Tensor& q_w, const Tensor& k_w, float eps,
                     const Tensor& cos, const Tensor& sin, RopeStyle style) override {
    check_f32(qkv, "qk_norm_rope_");
    int64_t width = int64_t(hq + 2 * hkv) * d, rows = rows_of(qkv);
    ZI_ASSERT(qkv.dim(-1) == width && cos.numel() == rows * d / 2 && sin.numel() == rows * d / 2);
    float* p = qkv.f32();
    const float *cp = cos.f32(), *sp = sin.f32(), *qw = q_w.f32(), *kw = k_w.f32();
    int half = d / 2;
    parallel_for(rows, 8, [&](int64_t lo, int64_t hi) {
      std::vector<float> tmp(static_cast<size_t>(d));
      for (int64_t r = lo; r < hi; ++r) {
        const float* cr = cp + r * half;
        const float* sr = sp + r * half;
        for (int h = 0; h < hq + hkv; ++h) {
          float* x = p + r * width + int64_t(h) * d;
          const float* wv = h < hq ? qw : kw;
          float inv = rms_inv(x, d, eps);
          for (int j = 0; j < d; ++j) tmp[size_t(j)] = x[j] * inv * wv[j];
          for (int m = 0; m < half; ++m) {
            int i0 = style == RopeStyle::Interleaved ? 2 * m : m;
            int i1 = style == RopeStyle::Interleaved ? 2 * m + 1 : m + half;
            float a = tmp[size_t(i0)], b = tmp[size_t(i1)];
            x[i0] = a * cr[m] - b * sr[m];
            x[i1] = b * cr[m] + a * sr[m];
          }
        }
      }
    });
  }

  Tensor attention(const Tensor& qkv, int hq, int hkv, int d, float scale, bool causal,
                   const std::vector<int>& key_len) override {
    check_f32(qkv, "attention");
    ZI_ASSERT(qkv.ndim() == 3 && hq % hkv == 0);
    int64_t bsz = qkv.dim(0), s = qkv.dim(1), width = int64_t(hq + 2 * hkv) * d;
    ZI_ASSERT(qkv.dim(2) == width && int64_t(key_len.size()) == bsz);
    Tensor out = Tensor::empty({bsz, s, int64_t(hq) * d}, DType::F32);
    const float* p = qkv.f32();
    float* o = out.f32();
    const int64_t kChunk = 256;  // queries per score block: bounds the scores buffer to kChunk x S
    int64_t chunks = (s + kChunk - 1) / kChunk;
    // Parallel over (item, head, query block). The fixed-order GEMMs keep a query's output independent
    // of the block it falls in, which depends on the batch's padded length s.
    parallel_for(bsz * hq * chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores(size_t(kChunk * s)), v_t(size_t(d * s));
      for (int64_t job = lo; job < hi; ++job) {
        int64_t b = job / (hq * chunks), h = (job / chunks) % hq, c = job % chunks;
        int64_t q0 = c * kChunk, nq = std::min(kChunk, s - q0);
        int64_t kv_head = h / (hq / hkv);
        int64_t nk = key_len[size_t(b)];
        ZI_ASSERT(nk > 0 && nk <= s);
        const float* q = p + (b * s + q0) * width + h * d;
        const float* k = p + b * s * width + (int64_t(hq) + kv_head) * d;
        const float* v = p + b * s * width + (int64_t(hq + hkv) + kv_head) * d;
        gemm_nt_fixed_order(nq, nk, d, scale, q, width, k, width, nullptr, scores.data(), nk);
        for (int64_t i = 0; i < nq; ++i) {
          float* row = scores.data() + i * nk;
          int64_t valid = causal ? std::min(nk, q0 + i + 1) : nk;
          float mx = -INFINITY;
          for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, row[j]);
          double sum = 0;
          for (int64_t j = 0; j < valid; ++j) {
            row[j] = std::exp(row[j] - mx);
            sum += row[j];
          }
          float inv = float(1.0 / sum);
          for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
          for (int64_t j = valid; j < nk; ++j) row[j] = 0.0f;
        }
        for (int64_t j = 0; j < nk; ++j)  // V^T [d, nk]: the second product in x w^T form too
          for (int64_t e = 0; e < d; ++e) v_t[size_t(e * nk + j)] = v[j * width + e];
        gemm_nt_fixed_order(nq, d, nk, 1.0f, scores.data(), nk, v_t.data(), nk, nullptr,
                            o + (b * s + q0) * int64_t(hq) * d + h * d, int64_t(hq) * d);
      }
    });
    return out;
  }

  Tensor attention_with_lse(const Tensor& q_rows, const Tensor& kv_rows, int heads, int d, float scale,
                            const std::vector<int>& key_len, Tensor& lse) override {
    check_f32(q_rows, "attention_with_lse");
    check_f32(kv_rows, "attention_with_lse");
    const int64_t bsz = q_rows.dim(0), sq = q_rows.dim(1), sk = kv_rows.dim(1), width = 3 * int64_t(heads) * d;
    ZI_ASSERT(q_rows.ndim() == 3 && kv_rows.ndim() == 3 && kv_rows.dim(0) == bsz && q_rows.dim(2) == width &&
              kv_rows.dim(2) == width && int64_t(key_len.size()) == bsz);
    Tensor out = Tensor::zeros({bsz, sq, int64_t(heads) * d}, DType::F32);
    lse = Tensor::empty({bsz, sq, heads}, DType::F32);
    const float *qp = q_rows.f32(), *kp = kv_rows.f32();
    float *o = out.f32(), *lp = lse.f32();
    const int64_t kChunk = 256;  // queries per score block, as attention()
    const int64_t chunks = (sq + kChunk - 1) / kChunk;
    parallel_for(bsz * heads * chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores(size_t(kChunk * sk)), v_t(size_t(d * sk));
      for (int64_t job = lo; job < hi; ++job) {
        const int64_t b = job / (heads * chunks), h = (job / chunks) % heads, c = job % chunks;
        const int64_t q0 = c * kChunk, nq = std::min(kChunk, sq - q0), nk = key_len[size_t(b)];
        ZI_ASSERT(nk >= 0 && nk <= sk);
        if (nk == 0) {
          for (int64_t i = 0; i < nq; ++i) lp[((b * sq) + q0 + i) * heads + h] = -INFINITY;
          continue;
        }
        const float* q = qp + (b * sq + q0) * width + h * d;
        const float* k = kp + b * sk * width + (int64_t(heads) + h) * d;
        const float* v = kp + b * sk * width + (2 * int64_t(heads) + h) * d;
        gemm_nt_fixed_order(nq, nk, d, scale, q, width, k, width, nullptr, scores.data(), nk);
        for (int64_t i = 0; i < nq; ++i) {
          float* row = scores.data() + i * nk;
          float mx = -INFINITY;
          for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, row[j]);
          double sum = 0;
          for (int64_t j = 0; j < nk; ++j) {
            row[j] = std::exp(row[j] - mx);
            sum += row[j];
          }
          const float inv = float(1.0 / sum);
          for (int64_t j = 0; j < nk; ++j) row[j] *= inv;
          lp[(b * sq + q0 + i) * heads + h] = mx + float(std::log(sum));
        }
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t e = 0; e < d; ++e) v_t[size_t(e * nk + j)] = v[j * width + e];
        gemm_nt_fixed_order(nq, d, nk, 1.0f, scores.data(), nk, v_t.data(), nk, nullptr,
                            o + (b * sq + q0) * int64_t(heads) * d + h * d, int64_t(heads) * d);
      }
    });
    return out;
  }

  void merge_attention_(Tensor& out, Tensor& lse, const Tensor& out_b, const Tensor& lse_b) override {
    check_f32(out, "merge_attention_");
    check_f32(out_b, "merge_attention_");
    ZI_ASSERT(out.shape() == out_b.shape() && lse.shape() == lse_b.shape() && lse.dtype() == DType::F32 &&
              out.numel() % lse.numel() == 0);
    const int64_t slots = lse.numel(), d = out.numel() / slots;
    float *o = out.f32(), *l = lse.f32();
    const float *ob = out_b.f32(), *lb = lse_b.f32();
    for (int64_t i = 0; i < slots; ++i) {
      const float m = std::max(l[i], lb[i]);
      if (m == -INFINITY) continue;
      const float wa = std::exp(l[i] - m), wb = std::exp(lb[i] - m), inv = 1.0f / (wa + wb);
      for (int64_t e = 0; e < d; ++e) o[i * d + e] = (wa * o[i * d + e] + wb * ob[i * d + e]) * inv;
      l[i] = m + std::log(wa + wb);
    }
  }

  void add_(Tensor& x, const Tensor& y) override {
    check_f32(x, "add_");
    check_f32(y, "add_");
    ZI_ASSERT(x.numel() == y.numel());
    float* xp = x.f32();
    const float* yp = y.f32();
    for (int64_t i = 0; i < x.numel(); ++i) xp[i] += yp[i];
  }

  Tensor silu(const Tensor& x) override {
    check_f32(x, "silu");
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    for (int64_t i = 0; i < x.numel(); ++i) yp[i] = xp[i] / (1.0f + std::exp(-xp[i]));
    return y;
  }

  Tensor swiglu(const Tensor& x) override {
    check_f32(x, "swiglu");
    int64_t f2 = x.dim(-1), f = f2 / 2, r = rows_of(x);
    ZI_ASSERT(f2 % 2 == 0);
    Shape s = x.shape();
    s.back() = f;
    Tensor y = Tensor::empty(s, DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    parallel_for(r, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        for (int64_t j = 0; j < f; ++j) {
          float g = xp[i * f2 + j];
          yp[i * f + j] = g / (1.0f + std::exp(-g)) * xp[i * f2 + f + j];
        }
    });
    return y;
  }

  Tensor scale_shift(const Tensor& x, float scale, float shift) override {
    check_f32(x, "scale_shift");
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    for (int64_t i = 0; i < x.numel(); ++i) yp[i] = xp[i] * scale + shift;
    return y;
  }

  Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, const Conv2dParams& p) override {
    check_f32(x, "conv2d");
    check_f32(w, "conv2d");
    ZI_ASSERT(x.ndim() == 4 && w.ndim() == 4 && w.dim(3) == x.dim(3));
    int64_t n = x.dim(0), h = x.dim(1), wd = x.dim(2), c = x.dim(3);
    int64_t o = w.dim(0), kh = w.dim(1), kw = w.dim(2);
    int64_t ho = (h + p.pad_top + p.pad_bottom - kh) / p.stride + 1;
    int64_t wo = (wd + p.pad_left + p.pad_right - kw) / p.stride + 1;
    ZI_ASSERT(ho > 0 && wo > 0);
    Tensor y = Tensor::empty({n, ho, wo, o}, DType::F32);
    int64_t kdim = kh * kw * c;
    const float* xp = x.f32();
    float* yp = y.f32();
    // im2col in tiles of output pixels, then [tile, kdim] x [o, kdim]^T: bounds the column buffer. BLAS
    // is batch-invariant here: every image runs the same calls, whose shapes depend on its size only.
    const int64_t kTile = std::max<int64_t>(64, (int64_t(8) << 20) / std::max<int64_t>(kdim, 1));
    std::vector<float> col;
    for (int64_t img = 0; img < n; ++img) {
      const float* xi = xp + img * h * wd * c;
      float* yi = yp + img * ho * wo * o;
      for (int64_t t0 = 0; t0 < ho * wo; t0 += kTile) {
        int64_t tn = std::min(kTile, ho * wo - t0);
        col.resize(size_t(tn * kdim));
        parallel_for(tn, 16, [&](int64_t lo, int64_t hi) {
          for (int64_t t = lo; t < hi; ++t) {
            int64_t oy = (t0 + t) / wo, ox = (t0 + t) % wo;
            float* dst = col.data() + t * kdim;
            for (int64_t ky = 0; ky < kh; ++ky)
              for (int64_t kx = 0; kx < kw; ++kx, dst += c) {
                int64_t iy = oy * p.stride + ky - p.pad_top, ix = ox * p.stride + kx - p.pad_left;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) std::memset(dst, 0, size_t(c) * 4);
                else std::memcpy(dst, xi + (iy * wd + ix) * c, size_t(c) * 4);
              }
          }
        });
        float* yt = yi + t0 * o;
        if (bias)
          for (int64_t t = 0; t < tn; ++t) std::memcpy(yt + t * o, bias->f32(), size_t(o) * 4);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(tn), int(o), int(kdim), 1.0f, col.data(), int(kdim),
                    w.f32(), int(kdim), bias ? 1.0f : 0.0f, yt, int(o));
      }
    }
    return y;
  }

  Tensor upsample_nearest2x(const Tensor& x) override {
    check_f32(x, "upsample_nearest2x");
    int64_t n = x.dim(0), h = x.dim(1), w = x.dim(2), c = x.dim(3);
    Tensor y = Tensor::empty({n, 2 * h, 2 * w, c}, DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    parallel_for(n * 2 * h, 4, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        int64_t img = r / (2 * h), oy = r % (2 * h);
        const float* src = xp + (img * h + oy / 2) * w * c;
        float* dst = yp + r * 2 * w * c;
        for (int64_t ox = 0; ox < 2 * w; ++ox) std::memcpy(dst + ox * c, src + (ox / 2) * c, size_t(c) * 4);
      }
    });
    return y;
  }

  Tensor nchw_to_nhwc(const Tensor& x) override {
    check_f32(x, "nchw_to_nhwc");
    int64_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
    Tensor y = Tensor::empty({n, h, w, c}, DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t p = 0; p < h * w; ++p) yp[(i * h * w + p) * c + ch] = xp[(i * c + ch) * h * w + p];
    return y;
  }

  Tensor nhwc_to_nchw(const Tensor& x) override {
    check_f32(x, "nhwc_to_nchw");
    int64_t n = x.dim(0), h = x.dim(1), w = x.dim(2), c = x.dim(3);
    Tensor y = Tensor::empty({n, c, h, w}, DType::F32);
    const float* xp = x.f32();
    float* yp = y.f32();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t p = 0; p < h * w; ++p) yp[(i * c + ch) * h * w + p] = xp[(i * h * w + p) * c + ch];
    return y;
  }

  Tensor image_to_u8(const Tensor& x) override {
    check_f32(x, "image_to_u8");
    Tensor y = Tensor::empty(x.shape(), DType::U8);
    const float* xp = x.f32();
    auto* yp = y.data_as<uint8_t>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      // NaN maps to 0, as on the GPU (converting a NaN to an integer is undefined).
      const float v = std::isnan(xp[i]) ? 0.0f : std::clamp(xp[i] / 2.0f + 0.5f, 0.0f, 1.0f) * 255.0f;
      yp[i] = uint8_t(std::nearbyint(v));  // default rounding mode: ties to even, as numpy's round
    }
    return y;
  }

  Tensor u8_to_image(const Tensor& x) override {
    ZI_ASSERT(x.dtype() == DType::U8 && x.device() == Device::Host && x.is_contiguous());
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    const auto* xp = x.data_as<uint8_t>();
    float* yp = y.f32();
    for (int64_t i = 0; i < x.numel(); ++i) yp[i] = 2.0f * (float(xp[i]) / 255.0f) - 1.0f;
    return y;
  }

  Tensor patchify(const Tensor& latent, int p) override {
    check_f32(latent, "patchify");
    ZI_ASSERT(latent.ndim() == 3);
    int64_t c = latent.dim(0), h = latent.dim(1), w = latent.dim(2), gh = h / p, gw = w / p;
    ZI_ASSERT(h % p == 0 && w % p == 0);
    Tensor y = Tensor::empty({gh * gw, int64_t(p) * p * c}, DType::F32);
    const float* lp = latent.f32();
    float* yp = y.f32();
    for (int64_t i = 0; i < gh; ++i)
      for (int64_t j = 0; j < gw; ++j) {
        float* tok = yp + (i * gw + j) * p * p * c;
        for (int py = 0; py < p; ++py)
          for (int px = 0; px < p; ++px)
            for (int64_t ch = 0; ch < c; ++ch)
              tok[(py * p + px) * c + ch] = lp[(ch * h + i * p + py) * w + j * p + px];
      }
    return y;
  }

  Tensor unpatchify(const Tensor& tokens, int c, int h, int w, int p) override {
    check_f32(tokens, "unpatchify");
    int64_t gh = h / p, gw = w / p;
    ZI_ASSERT(tokens.dim(-1) == int64_t(p) * p * c && rows_of(tokens) >= gh * gw);
    Tensor y = Tensor::empty({c, h, w}, DType::F32);
    const float* tp = tokens.f32();
    float* yp = y.f32();
    for (int64_t i = 0; i < gh; ++i)
      for (int64_t j = 0; j < gw; ++j) {
        const float* tok = tp + (i * gw + j) * p * p * c;
        for (int py = 0; py < p; ++py)
          for (int px = 0; px < p; ++px)
            for (int64_t ch = 0; ch < c; ++ch)
              yp[(ch * h + i * p + py) * w + j * p + px] = tok[(py * p + px) * c + ch];
      }
    return y;
  }

  Tensor timestep_embedding(const Tensor& t, float t_scale, int dim, float max_period) override {
    check_f32(t, "timestep_embedding");
    int half = dim / 2;
    Tensor out = Tensor::zeros({t.numel(), dim}, DType::F32);
    // Float32 arithmetic in torch's order: freqs = exp(-ln(P) * k / half), args = (t * t_scale) * freqs.
    float neg_log = float(-std::log(double(max_period)));
    for (int64_t i = 0; i < t.numel(); ++i)
      for (int k = 0; k < half; ++k) {
        float freq = std::exp(neg_log * float(k) / float(half));
        float arg = (t.f32()[i] * t_scale) * freq;
        out.f32()[i * dim + k] = float(std::cos(double(arg)));
        out.f32()[i * dim + half + k] = float(std::sin(double(arg)));
      }
    return out;
  }

  void cfg_euler_step_(Tensor& latents, const Tensor& model_out, float guidance, float cfg_norm,
                       float dt) override {
    check_f32(latents, "cfg_euler_step_");
    check_f32(model_out, "cfg_euler_step_");
    int64_t b = latents.dim(0), per = latents.numel() / b;
    bool cfg = guidance > 0;
    ZI_ASSERT(model_out.numel() == (cfg ? 2 : 1) * latents.numel());
    float* lp = latents.f32();
    const float* mp = model_out.f32();
    std::vector<float> pred(static_cast<size_t>(per));
    for (int64_t i = 0; i < b; ++i) {
      const float* pos = mp + i * per;
      if (cfg) {
        const float* neg = mp + (b + i) * per;
        for (int64_t j = 0; j < per; ++j) pred[size_t(j)] = pos[j] + guidance * (pos[j] - neg[j]);
        if (cfg_norm > 0) {
          double np = 0, nn = 0;
          for (int64_t j = 0; j < per; ++j) {
            np += double(pos[j]) * pos[j];
            nn += double(pred[size_t(j)]) * pred[size_t(j)];
          }
          float n_pos = float(std::sqrt(np)), n_new = float(std::sqrt(nn));
          float max_norm = n_pos * cfg_norm;
          if (n_new > max_norm)
            for (auto& v : pred) v *= max_norm / n_new;
        }
      } else {
        std::memcpy(pred.data(), pos, size_t(per) * 4);
      }
      float* l = lp + i * per;
      for (int64_t j = 0; j < per; ++j) l[j] += dt * -pred[size_t(j)];
    }
  }

  Tensor clamp(const Tensor& x, float lo, float hi) override {
    check_f32(x, "clamp");
    Tensor y = Tensor::empty(x.shape(), DType::F32);
    for (int64_t i = 0; i < x.numel(); ++i) y.f32()[i] = std::min(std::max(x.f32()[i], lo), hi);
    return y;
  }

  Tensor gaussian_sample(const Tensor& mean, const Tensor& logvar, const Tensor& eps, float shift,
                         float scale) override {
    check_f32(mean, "gaussian_sample");
    check_f32(logvar, "gaussian_sample");
    check_f32(eps, "gaussian_sample");
    ZI_ASSERT(mean.shape() == logvar.shape() && mean.shape() == eps.shape());
    Tensor y = Tensor::empty(mean.shape(), DType::F32);
    for (int64_t i = 0; i < y.numel(); ++i) {
      const float std_dev = std::exp(0.5f * logvar.f32()[i]);
      y.f32()[i] = (mean.f32()[i] + std_dev * eps.f32()[i] - shift) * scale;
    }
    return y;
  }

  void flow_match_blend_(Tensor& x, const Tensor& init, const Tensor& noise, const Tensor* mask, float sigma) override {
    check_f32(x, "flow_match_blend_");
    check_f32(init, "flow_match_blend_");
    check_f32(noise, "flow_match_blend_");
    ZI_ASSERT(x.ndim() == 4 && x.shape() == init.shape() && x.shape() == noise.shape());
    const int64_t b = x.dim(0), c = x.dim(1), hw = x.dim(2) * x.dim(3);
    if (mask) {
      check_f32(*mask, "flow_match_blend_");
      ZI_ASSERT(mask->numel() == b * hw);
    }
    float* xp = x.f32();
    for (int64_t n = 0; n < b; ++n)
      for (int64_t k = 0; k < c; ++k)
        for (int64_t p = 0; p < hw; ++p) {
          const int64_t i = (n * c + k) * hw + p;
          const float noised = sigma * noise.f32()[i] + (1.0f - sigma) * init.f32()[i];
          if (!mask) {
            xp[i] = noised;
          } else {
            const float m = mask->f32()[n * hw + p];
            xp[i] = (1.0f - m) * noised + m * xp[i];
          }
        }
  }

  void count_non_finite(const Tensor& x, Tensor& counts, int64_t slot) override {
    check_f32(x, "count_non_finite");
    ZI_ASSERT(counts.dtype() == DType::I32 && slot >= 0 && slot < counts.numel());
    const float* xp = x.f32();
    int64_t n = 0;
    for (int64_t i = 0; i < x.numel(); ++i) n += std::isfinite(xp[i]) ? 0 : 1;
    int32_t& c = counts.data_as<int32_t>()[slot];
    c = int32_t(std::min<int64_t>(int64_t(c) + n, INT32_MAX));
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace zimage
