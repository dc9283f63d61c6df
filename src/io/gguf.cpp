#include "io/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include "core/dtype.h"
#include "core/error.h"

namespace zimage {

namespace {

constexpr uint32_t kMagic = 0x46554747u;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;               // GGML_MAX_DIMS

// GGUF metadata value types (gguf.md).
enum : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

size_t scalar_bytes(uint32_t t) {
  switch (t) {
    case kU8:
    case kI8:
    case kBool: return 1;
    case kU16:
    case kI16: return 2;
    case kU32:
    case kI32:
    case kF32: return 4;
    case kU64:
    case kI64:
    case kF64: return 8;
    default: return 0;
  }
}

// A bounds-checked little-endian cursor over the file's bytes.
struct Cursor {
  const uint8_t* p;
  size_t size, pos = 0;
  const std::string& path;

  void need(uint64_t n, const char* what) const {
    if (n > size - pos)
      throw Error(ErrorKind::Format, path + ": truncated GGUF (" + what + " at byte " + std::to_string(pos) +
                                         " runs past the end of the " + std::to_string(size) + "-byte file)");
  }
  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string string(const char* what) {
    uint64_t n = read<uint64_t>(what);
    if (n > GgufFile::kMaxStringBytes)
      throw Error(ErrorKind::Format, path + ": GGUF " + what + " of " + std::to_string(n) + " bytes is too long");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(p + pos), size_t(n));
    pos += size_t(n);
    return s;
  }
  void skip(uint64_t n, const char* what) {
    need(n, what);
    pos += size_t(n);
  }
};

std::string scalar_text(Cursor& c, uint32_t t) {
  switch (t) {
    case kU8: return std::to_string(c.read<uint8_t>("value"));
    case kI8: return std::to_string(c.read<int8_t>("value"));
    case kU16: return std::to_string(c.read<uint16_t>("value"));
    case kI16: return std::to_string(c.read<int16_t>("value"));
    case kU32: return std::to_string(c.read<uint32_t>("value"));
    case kI32: return std::to_string(c.read<int32_t>("value"));
    case kF32: return std::to_string(c.read<float>("value"));
    case kBool: return c.read<uint8_t>("value") ? "true" : "false";
    case kU64: return std::to_string(c.read<uint64_t>("value"));
    case kI64: return std::to_string(c.read<int64_t>("value"));
    case kF64: return std::to_string(c.read<double>("value"));
    case kString: return c.string("string value");
    default: return "";
  }
}

float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// K-quants: super-blocks of 256 values (QK_K) in sub-blocks of 16 or 32 with their own quantized scales.
// Every value is (d * sub_scale) * q - (dmin * sub_min), each product in float, as ggml computes it.
// Values run in two halves of 128; inside a half, quant bytes are shared by several groups of values
// (Q2_K/Q3_K: four 2-bit fields of one byte go to four groups of 32 values).

// Q2_K {u8 scales[16] (low 4 bits scale, high 4 bits min); u8 qs[64]; d; dmin}.
void dequantize_q2_k(const uint8_t* blk, float* y) {
  const uint8_t *scales = blk, *qs = blk + 16;
  const float d = h2f(blk + 80), dmin = h2f(blk + 82);
  for (int half = 0; half < 2; ++half)
    for (int g = 0; g < 4; ++g)            // bit pair 2g of each byte
      for (int sub = 0; sub < 2; ++sub) {  // 16 values per scale
        const uint8_t sc = scales[half * 8 + g * 2 + sub];
        const float dl = d * float(sc & 0xf), ml = dmin * float(sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * float((qs[half * 32 + sub * 16 + l] >> (2 * g)) & 3) - ml;
      }
}

// Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12] (sixteen 6-bit signed scales, +32); d}. The 3rd bit
// of value (half, g, sub, l) is bit half*4 + g of hmask[sub*16 + l]; when it is clear, 4 is subtracted.
void dequantize_q3_k(const uint8_t* blk, float* y) {
  const uint8_t *hmask = blk, *qs = blk + 32, *sc = blk + 96;
  const float d = h2f(blk + 108);
  for (int half = 0; half < 2; ++half)
    for (int g = 0; g < 4; ++g)
      for (int sub = 0; sub < 2; ++sub) {
        const int j = half * 8 + g * 2 + sub;
        const int low = j < 8 ? sc[j] & 0xf : sc[j - 8] >> 4;
        const int high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        const float dl = d * float((low | (high << 4)) - 32);
        for (int l = 0; l < 16; ++l) {
          const int q = (qs[half * 32 + sub * 16 + l] >> (2 * g)) & 3;
          const int h = (hmask[sub * 16 + l] >> (half * 4 + g)) & 1;
          *y++ = dl * float(q - (h ? 0 : 4));
        }
      }
}

// Eight 6-bit (scale, min) pairs packed in 12 bytes (Q4_K, Q5_K): pairs 0..3 in the low 6 bits of
// bytes 0..3 / 4..7; pairs 4..7 take their low 4 bits from bytes 8..11 and their top 2 from the top
// bits of bytes 0..3 / 4..7.
void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K {d; dmin; u8 scales[12]; u8 qs[128]} and Q5_K {d; dmin; scales[12]; u8 qh[32]; u8 qs[128]}:
// four chunks of 64 values, each the low then the high nibbles of 32 bytes; Q5_K's 5th bit of value
// (chunk c, nibble hi, l) is bit 2c + hi of qh[l].
void dequantize_q45_k(const uint8_t* blk, float* y, bool q5) {
  const float d = h2f(blk), dmin = h2f(blk + 2);
  const uint8_t* scales = blk + 4;
  const uint8_t* qh = blk + 16;
  const uint8_t* qs = blk + (q5 ? 48 : 16);
  for (int c = 0; c < 4; ++c)
    for (int hi = 0; hi < 2; ++hi) {
      int sc, m;
      scale_min_k4(2 * c + hi, scales, &sc, &m);
      const float dl = d * float(sc), ml = dmin * float(m);
      for (int l = 0; l < 32; ++l) {
        int q = hi ? qs[32 * c + l] >> 4 : qs[32 * c + l] & 0xf;
        if (q5 && ((qh[l] >> (2 * c + hi)) & 1)) q += 16;
        *y++ = dl * float(q) - ml;
      }
    }
}

// Q6_K {u8 ql[128]; u8 qh[64]; int8 scales[16]; d}: per half of 128 values, four quarters of 32; quarter
// k takes the low (k < 2) or high nibble of ql[64*half + 32*(k%2) + l] and bits 2k..2k+1 of
// qh[32*half + l], minus 32; its scale is scales[8*half + 2k + l/16].
void dequantize_q6_k(const uint8_t* blk, float* y) {
  const uint8_t *ql = blk, *qh = blk + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
  const float d = h2f(blk + 208);
  for (int half = 0; half < 2; ++half)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo = ql[64 * half + 32 * (k % 2) + l];
        const int q = ((k < 2 ? lo & 0xf : lo >> 4) | (((qh[32 * half + l] >> (2 * k)) & 3) << 4)) - 32;
        *y++ = d * float(scales[8 * half + 2 * k + l / 16]) * float(q);
      }
}

// ---- quantizers (ggml-quants.c's reference versions, written from their description) ----

// ggml's nearest_int: round half to even (it adds 1.5 * 2^23 in float arithmetic).
int nearest_int(float f) { return int(std::nearbyint(f)); }

void put_f16(uint8_t* p, float v) {
  const uint16_t h = f32_to_f16(v);
  std::memcpy(p, &h, 2);
}

// Q8_0 {d; int8 qs[32]}: d = amax / 127, q = roundf(x * (1 / d)) with the float d (not its fp16 rounding).
void quantize_q8_0(const float* x, uint8_t* blk) {
  float amax = 0;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(blk, d);
  for (int j = 0; j < 32; ++j) blk[2 + j] = uint8_t(int8_t(std::round(x[j] * id)));
}

// ggml's make_qkx2_quants for Q4_K (nmax 15, squared error): L = round((x - min) / scale) in 0..nmax for the
// (scale, min <= 0) of least weighted squared error among the first guess (min(x, 0), max(x) spanning
// 0..nmax) and the least-squares fits to the rounding at nstep + 1 candidate scales
// (nmax + rmin + rdelta * is) / (max - min). Returns the scale; *neg_min = -min.
float fit_scale_min(const float* x, const float* w, uint8_t* L, float* neg_min, int nmax, float rmin, float rdelta,
                    int nstep) {
  constexpr int n = 32;
  float lo = x[0], hi = x[0], sum_w = w[0], sum_x = w[0] * x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo) {
    std::fill(L, L + n, uint8_t(0));
    *neg_min = -lo;
    return 0;
  }
  float iscale = float(nmax) / (hi - lo), scale = 1 / iscale, best_error = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = uint8_t(std::clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax));
    const float diff = scale * float(L[i]) + lo - x[i];
    best_error += w[i] * (diff * diff);
  }
  uint8_t aux[n];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * float(is) + float(nmax)) / (hi - lo);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      aux[i] = uint8_t(std::clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax));
      const float l = float(aux[i]);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (det <= 0) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det, this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (this_min > 0) {
      this_min = 0;
      this_scale = sum_xl / sum_l2;
    }
    float error = 0;
    for (int i = 0; i < n; ++i) {
      const float diff = this_scale * float(aux[i]) + this_min - x[i];
      error += w[i] * (diff * diff);
    }
    if (error < best_error) {
      std::copy(aux, aux + n, L);
      best_error = error;
      scale = this_scale;
      lo = this_min;
    }
  }
  *neg_min = -lo;
  return scale;
}

// Q4_K {d; dmin; scales[12]; qs[128]} of 256 values: eight sub-blocks of 32, each fitted with weights
// sqrt(mean(x^2)) + |x|; their scales and mins quantized to 6 bits against d = max scale / 63 and
// dmin = max min / 63 (packed as scale_min_k4 reads them); then every value requantized against the
// stored (fp16-rounded) sub-block scale and min.
void quantize_q4_k(const float* x, uint8_t* blk) {
  float scales[8], mins[8], w[32];
  uint8_t L[256];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_min(xs, w, L + 32 * j, &mins[j], 15, -1.0f, 0.1f, 20);
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f, inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  uint8_t* sc = blk + 4;
  std::memset(sc, 0, 12);
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = uint8_t(std::min(63, nearest_int(inv_scale * scales[j])));
    const uint8_t lm = uint8_t(std::min(63, nearest_int(inv_min * mins[j])));
    if (j < 4) {
      sc[j] = ls;
      sc[j + 4] = lm;
    } else {
      sc[j + 4] = uint8_t((ls & 0xf) | ((lm & 0xf) << 4));
      sc[j - 4] |= uint8_t((ls >> 4) << 6);
      sc[j] |= uint8_t((lm >> 4) << 6);
    }
  }
  put_f16(blk, max_scale / 63.0f);
  put_f16(blk + 2, max_min / 63.0f);
  const float d = h2f(blk), dmin = h2f(blk + 2);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    scale_min_k4(j, sc, &s, &m);
    const float dl = d * float(s);
    if (dl == 0) continue;  // keeps the fit's quants, as ggml does
    const float ml = dmin * float(m);
    for (int l = 0; l < 32; ++l) L[32 * j + l] = uint8_t(std::clamp(nearest_int((x[32 * j + l] + ml) / dl), 0, 15));
  }
  uint8_t* qs = blk + 16;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) qs[32 * c + l] = uint8_t(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

}  // namespace

bool ggml_block_layout(uint32_t type, int64_t* block_elems, int64_t* block_bytes) {
  int64_t e = 0, b = 0;
  switch (GgmlType(type)) {
    case GgmlType::F32: e = 1, b = 4; break;
    case GgmlType::F16: e = 1, b = 2; break;
    case GgmlType::BF16: e = 1, b = 2; break;
    case GgmlType::Q4_0: e = 32, b = 18; break;
    case GgmlType::Q4_1: e = 32, b = 20; break;
    case GgmlType::Q5_0: e = 32, b = 22; break;
    case GgmlType::Q5_1: e = 32, b = 24; break;
    case GgmlType::Q8_0: e = 32, b = 34; break;
    case GgmlType::Q2_K: e = 256, b = 84; break;
    case GgmlType::Q3_K: e = 256, b = 110; break;
    case GgmlType::Q4_K: e = 256, b = 144; break;
    case GgmlType::Q5_K: e = 256, b = 176; break;
    case GgmlType::Q6_K: e = 256, b = 210; break;
    default: return false;
  }
  *block_elems = e;
  *block_bytes = b;
  return true;
}

const char* ggml_type_name(uint32_t type) {
  switch (GgmlType(type)) {
    case GgmlType::F32: return "f32";
    case GgmlType::F16: return "f16";
    case GgmlType::BF16: return "bf16";
    case GgmlType::Q4_0: return "q4_0";
    case GgmlType::Q4_1: return "q4_1";
    case GgmlType::Q5_0: return "q5_0";
    case GgmlType::Q5_1: return "q5_1";
    case GgmlType::Q8_0: return "q8_0";
    case GgmlType::Q2_K: return "q2_k";
    case GgmlType::Q3_K: return "q3_k";
    case GgmlType::Q4_K: return "q4_k";
    case GgmlType::Q5_K: return "q5_k";
    case GgmlType::Q6_K: return "q6_k";
  }
  return "unknown";
}

// Block layouts (ggml-common.h), 32 values per block, d and m fp16:
//   Q8_0 {d; int8 qs[32]}                 y = d * q
//   Q4_0 {d; u8 qs[16]}                   y[j] = d * (lo4(qs[j]) - 8), y[j+16] = d * (hi4(qs[j]) - 8)
//   Q4_1 {d; m; u8 qs[16]}                y = d * q + m, q as in Q4_0 without the -8
//   Q5_0 {d; u32 qh; u8 qs[16]}           Q4_0's nibbles with bit j (j+16) of qh as their 5th bit, -16
//   Q5_1 {d; m; u32 qh; u8 qs[16]}        the same without -16, y = d * q + m
void ggml_dequantize(uint32_t type, const uint8_t* src, float* dst, int64_t n) {
  switch (GgmlType(type)) {
    case GgmlType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case GgmlType::F16: convert_to_f32(DType::F16, src, dst, size_t(n)); return;
    case GgmlType::BF16: convert_to_f32(DType::BF16, src, dst, size_t(n)); return;
    case GgmlType::Q8_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 34, dst += 32) {
        const float d = h2f(src);
        for (int j = 0; j < 32; ++j) dst[j] = float(int8_t(src[2 + j])) * d;
      }
      return;
    case GgmlType::Q4_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 18, dst += 32) {
        const float d = h2f(src);
        const uint8_t* qs = src + 2;
        for (int j = 0; j < 16; ++j) {
          dst[j] = float(int(qs[j] & 0xf) - 8) * d;
          dst[j + 16] = float(int(qs[j] >> 4) - 8) * d;
        }
      }
      return;
    case GgmlType::Q4_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 20, dst += 32) {
        const float d = h2f(src), m = h2f(src + 2);
        const uint8_t* qs = src + 4;
        for (int j = 0; j < 16; ++j) {
          dst[j] = float(qs[j] & 0xf) * d + m;
          dst[j + 16] = float(qs[j] >> 4) * d + m;
        }
      }
      return;
    case GgmlType::Q5_0:
    case GgmlType::Q5_1: {
      const bool q51 = GgmlType(type) == GgmlType::Q5_1;
      const int64_t bytes = q51 ? 24 : 22;
      for (int64_t b = 0; b < n / 32; ++b, src += bytes, dst += 32) {
        const float d = h2f(src), m = q51 ? h2f(src + 2) : 0.0f;
        const uint8_t* p = src + (q51 ? 4 : 2);
        uint32_t qh;
        std::memcpy(&qh, p, 4);
        const uint8_t* qs = p + 4;
        const int offset = q51 ? 0 : 16;
        for (int j = 0; j < 16; ++j) {
          const int x0 = int((qs[j] & 0xf) | (((qh >> j) & 1u) << 4)) - offset;
          const int x1 = int((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - offset;
          dst[j] = q51 ? float(x0) * d + m : float(x0) * d;
          dst[j + 16] = q51 ? float(x1) * d + m : float(x1) * d;
        }
      }
      return;
    }
    case GgmlType::Q2_K:
      for (int64_t b = 0; b < n / 256; ++b, src += 84) dequantize_q2_k(src, dst + b * 256);
      return;
    case GgmlType::Q3_K:
      for (int64_t b = 0; b < n / 256; ++b, src += 110) dequantize_q3_k(src, dst + b * 256);
      return;
    case GgmlType::Q4_K:
    case GgmlType::Q5_K: {
      const bool q5 = GgmlType(type) == GgmlType::Q5_K;
      for (int64_t b = 0; b < n / 256; ++b, src += q5 ? 176 : 144) dequantize_q45_k(src, dst + b * 256, q5);
      return;
    }
    case GgmlType::Q6_K:
      for (int64_t b = 0; b < n / 256; ++b, src += 210) dequantize_q6_k(src, dst + b * 256);
      return;
    default: break;
  }
  throw Error(ErrorKind::Internal, std::string("ggml_dequantize: unsupported type ") + ggml_type_name(type));
}

void ggml_quantize(uint32_t type, const float* src, uint8_t* dst, int64_t n) {
  switch (GgmlType(type)) {
    case GgmlType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case GgmlType::F16: convert_from_f32(DType::F16, src, dst, size_t(n)); return;
    case GgmlType::BF16: convert_from_f32(DType::BF16, src, dst, size_t(n)); return;
    case GgmlType::Q8_0:
      for (int64_t b = 0; b < n / 32; ++b) quantize_q8_0(src + b * 32, dst + b * 34);
      return;
    case GgmlType::Q4_K:
      for (int64_t b = 0; b < n / 256; ++b) quantize_q4_k(src + b * 256, dst + b * 144);
      return;
    default: break;
  }
  throw Error(ErrorKind::InvalidArgument,
              std::string("no quantizer for ggml type ") + ggml_type_name(type) + " (f32, f16, bf16, q8_0, q4_k)");
}

std::shared_ptr<GgufFile> GgufFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    throw Error(e == ENOENT ? ErrorKind::NotFound : ErrorKind::Io, path + ": cannot open: " + std::strerror(e));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorKind::Io, path + ": not a regular file");
  }
  size_t size = size_t(st.st_size);
  if (size < 24) {
    ::close(fd);
    throw Error(ErrorKind::Format,
                path + ": truncated GGUF (" + std::to_string(size) + " bytes, the header alone is 24)");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw Error(ErrorKind::Io, path + ": mmap failed: " + std::strerror(errno));
  std::shared_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->map_ = map;
  f->map_bytes_ = size;
  f->parse(static_cast<const uint8_t*>(map), size);
  return f;
}

std::shared_ptr<GgufFile> GgufFile::from_bytes(std::vector<uint8_t> bytes, const std::string& name) {
  std::shared_ptr<GgufFile> f(new GgufFile());
  f->path_ = name;
  f->bytes_ = std::move(bytes);
  f->parse(f->bytes_.data(), f->bytes_.size());
  return f;
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(map_, map_bytes_);
}

void GgufFile::parse(const uint8_t* bytes, size_t size) {
  Cursor c{bytes, size, 0, path_};
  if (c.read<uint32_t>("magic") != kMagic)
    throw Error(ErrorKind::Format, path_ + ": not a GGUF file (no 'GGUF' magic)");
  version_ = c.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3)
    throw Error(ErrorKind::Format,
                path_ + ": GGUF version " + std::to_string(version_) + " is not supported (2 and 3 are)");
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  if (n_tensors > kMaxTensors || n_kv > kMaxMetadata)
    throw Error(ErrorKind::Format, path_ + ": GGUF header claims " + std::to_string(n_tensors) + " tensors and " +
                                       std::to_string(n_kv) + " metadata entries, more than this reader accepts");
  uint64_t alignment = 32;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.string("metadata key");
    const uint32_t t = c.read<uint32_t>("metadata type");
    if (t == kArray) {
      const uint32_t et = c.read<uint32_t>("array type");
      const uint64_t n = c.read<uint64_t>("array length");
      if (n > kMaxArrayElems) throw Error(ErrorKind::Format, path_ + ": GGUF array '" + key + "' is too long");
      if (et == kString) {
        for (uint64_t j = 0; j < n; ++j) c.skip(c.read<uint64_t>("array string"), "array string");
      } else if (size_t b = scalar_bytes(et)) {
        c.skip(n * b, "array");
      } else {
        throw Error(ErrorKind::Format,
                    path_ + ": GGUF array '" + key + "' has unknown element type " + std::to_string(et));
      }
      continue;
    }
    if (t != kString && scalar_bytes(t) == 0)
      throw Error(ErrorKind::Format, path_ + ": GGUF metadata '" + key + "' has unknown type " + std::to_string(t));
    if (key == "general.alignment") {
      if (t != kU32) throw Error(ErrorKind::Format, path_ + ": general.alignment must be a u32");
      alignment = c.read<uint32_t>("alignment");
      if (alignment == 0 || (alignment & (alignment - 1)) || alignment > 65536)
        throw Error(ErrorKind::Format,
                    path_ + ": general.alignment " + std::to_string(alignment) + " is not a power of two up to 65536");
      metadata_[key] = std::to_string(alignment);
      continue;
    }
    metadata_[key] = scalar_text(c, t);
  }
  std::vector<GgufTensorInfo> infos;
  infos.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo ti;
    ti.name = c.string("tensor name");
    const uint32_t nd = c.read<uint32_t>("tensor dims");
    if (nd < 1 || nd > kMaxDims)
      throw Error(ErrorKind::Format,
                  path_ + ": tensor '" + ti.name + "' has " + std::to_string(nd) + " dimensions (1 to 4 allowed)");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t ne = c.read<uint64_t>("tensor dim");
      if (ne == 0 || ne > (uint64_t(1) << 40) || numel > (uint64_t(1) << 40) / ne)
        throw Error(ErrorKind::Format,
                    path_ + ": tensor '" + ti.name + "' has an impossible dimension " + std::to_string(ne));
      numel *= ne;
      ti.ne.push_back(int64_t(ne));
    }
    ti.type = c.read<uint32_t>("tensor type");
    ti.offset = c.read<uint64_t>("tensor offset");
    int64_t be = 0, bb = 0;
    if (!ggml_block_layout(ti.type, &be, &bb))
      throw Error(ErrorKind::Format, path_ + ": tensor '" + ti.name + "' has ggml type " + std::to_string(ti.type) +
                                         " (" + ggml_type_name(ti.type) + "), which this reader cannot dequantize");
    if (ti.ne[0] % be != 0)
      throw Error(ErrorKind::Format, path_ + ": tensor '" + ti.name + "' rows of " + std::to_string(ti.ne[0]) +
                                         " values are not a whole number of " + ggml_type_name(ti.type) +
                                         " blocks of " + std::to_string(be));
    ti.nbytes = numel / uint64_t(be) * uint64_t(bb);
    if (ti.nbytes > kMaxTensorBytes) throw Error(ErrorKind::Format, path_ + ": tensor '" + ti.name + "' is too large");
    if (ti.offset % alignment != 0)
      throw Error(ErrorKind::Format, path_ + ": tensor '" + ti.name + "' offset " + std::to_string(ti.offset) +
                                         " is not a multiple of the alignment " + std::to_string(alignment));
    infos.push_back(std::move(ti));
  }
  const uint64_t data_start = (uint64_t(c.pos) + alignment - 1) / alignment * alignment;
  if (data_start > size && n_tensors > 0)
    throw Error(ErrorKind::Format, path_ + ": truncated GGUF (the data section starts past the end of the file)");
  const uint64_t data_size = data_start <= size ? size - data_start : 0;
  data_ = bytes + (data_start <= size ? data_start : size);
  for (auto& ti : infos) {
    if (ti.offset > data_size || ti.nbytes > data_size - ti.offset)
      throw Error(ErrorKind::Format, path_ + ": truncated GGUF: tensor '" + ti.name + "' needs bytes " +
                                         std::to_string(ti.offset) + ".." + std::to_string(ti.offset + ti.nbytes) +
                                         " of a data section of " + std::to_string(data_size));
    std::string name = ti.name;
    if (!tensors_.emplace(name, std::move(ti)).second)
      throw Error(ErrorKind::Format, path_ + ": tensor '" + name + "' appears twice");
  }
}

std::string GgufFile::metadata_string(const std::string& key, const std::string& fallback) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? fallback : it->second;
}

Tensor GgufFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(ErrorKind::NotFound, path_ + ": no tensor '" + name + "'");
  const GgufTensorInfo& ti = it->second;
  const uint8_t* src = data_ + ti.offset;
  const Shape shape = ti.shape();
  const int64_t n = shape_numel(shape);
  if (GgmlType(ti.type) == GgmlType::F16 || GgmlType(ti.type) == GgmlType::BF16) {
    Tensor t = Tensor::empty(shape, GgmlType(ti.type) == GgmlType::F16 ? DType::F16 : DType::BF16);
    std::memcpy(t.data(), src, size_t(ti.nbytes));
    return t;
  }
  Tensor t = Tensor::empty(shape, DType::F32);
  ggml_dequantize(ti.type, src, t.f32(), n);
  return t;
}

const uint8_t* GgufFile::bytes(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(ErrorKind::NotFound, path_ + ": no tensor '" + name + "'");
  return data_ + it->second.offset;
}

uint64_t GgufEntry::nbytes() const {
  int64_t be = 0, bb = 0;
  ZI_CHECK(ggml_block_layout(type, &be, &bb) && !shape.empty() && shape.back() % be == 0, ErrorKind::InvalidArgument,
           "GGUF tensor '" + name + "' of shape " + shape_str(shape) + " cannot be stored as " + ggml_type_name(type));
  return uint64_t(shape_numel(shape) / be * bb);
}

void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<GgufEntry>& entries, const std::function<Tensor(const GgufEntry&)>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error(ErrorKind::Io, path + ": cannot create the GGUF file");
  uint64_t written = 0;
  auto put = [&](const void* p, size_t n) {
    f.write(static_cast<const char*>(p), std::streamsize(n));
    written += n;
  };
  auto u32 = [&](uint32_t v) { put(&v, 4); };
  auto u64 = [&](uint64_t v) { put(&v, 8); };
  auto str = [&](const std::string& s) {
    u64(s.size());
    put(s.data(), s.size());
  };
  auto pad = [&] {
    static const char zeros[32] = {};
    put(zeros, size_t((32 - written % 32) % 32));
  };
  u32(kMagic);
  u32(3);
  u64(entries.size());
  u64(metadata.size());
  for (const auto& [k, v] : metadata) {
    str(k);
    u32(v.is_number ? kU32 : kString);
    if (v.is_number) u32(v.number);
    else str(v.text);
  }
  uint64_t offset = 0;
  for (const auto& e : entries) {
    ZI_CHECK(!e.shape.empty() && e.shape.size() <= size_t(kMaxDims), ErrorKind::InvalidArgument,
             "GGUF tensor '" + e.name + "' has shape " + shape_str(e.shape) + " (1 to 4 dimensions)");
    str(e.name);
    u32(uint32_t(e.shape.size()));
    for (auto d = e.shape.rbegin(); d != e.shape.rend(); ++d) u64(uint64_t(*d));
    u32(e.type);
    u64(offset);
    offset += (e.nbytes() + 31) / 32 * 32;
  }
  pad();
  for (const auto& e : entries) {
    Tensor t = bytes(e);
    ZI_ASSERT(t.device() == Device::Host && t.is_contiguous());
    ZI_CHECK(t.nbytes() == e.nbytes(), ErrorKind::Internal,
             "write_gguf: tensor '" + e.name + "' came as " + std::to_string(t.nbytes()) + " bytes, its " +
                 ggml_type_name(e.type) + " blocks take " + std::to_string(e.nbytes()));
    put(t.data(), t.nbytes());
    pad();
    if (!f) break;
  }
  f.close();
  if (!f) throw Error(ErrorKind::Io, path + ": cannot write the GGUF file (disk full?)");
}

void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<std::pair<std::string, Tensor>>& tensors) {
  std::vector<GgufEntry> entries;
  for (const auto& [name, t] : tensors) {
    ZI_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16, ErrorKind::InvalidArgument,
             "write_gguf: tensor '" + name + "' is " + dtype_name(t.dtype()) + " (f32, f16 or bf16 only)");
    const GgmlType type = t.dtype() == DType::F32   ? GgmlType::F32
                          : t.dtype() == DType::F16 ? GgmlType::F16
                                                    : GgmlType::BF16;
    entries.push_back({name, t.shape(), uint32_t(type)});
  }
  size_t next = 0;
  write_gguf(path, metadata, entries, [&](const GgufEntry&) {
    const Tensor& t = tensors[next++].second;
    return t.is_contiguous() ? t : t.clone();
  });
}

bool is_gguf_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

}  // namespace zimage
