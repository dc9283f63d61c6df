#include "core/dtype.h"

#include <array>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace zimage {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F8E4M3: return 1;
    case DType::I64: return 8;
    case DType::I32: return 4;
    case DType::U8: return 1;
    case DType::F8E5M2: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::F8E4M3: return "f8e4m3";
    case DType::I64: return "i64";
    case DType::I32: return "i32";
    case DType::U8: return "u8";
    case DType::F8E5M2: return "f8e5m2";
  }
  return "?";
}

std::optional<DType> dtype_from_safetensors(std::string_view s) {
  if (s == "F32") return DType::F32;
  if (s == "F64") return DType::F64;
  if (s == "BF16") return DType::BF16;
  if (s == "F16") return DType::F16;
  if (s == "F8_E4M3") return DType::F8E4M3;
  if (s == "I64") return DType::I64;
  if (s == "I32") return DType::I32;
  if (s == "U8") return DType::U8;
  if (s == "F8_E5M2") return DType::F8E5M2;
  return std::nullopt;
}

const char* dtype_to_safetensors(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8E4M3: return "F8_E4M3";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
    case DType::F8E5M2: return "F8_E5M2";
  }
  return "?";
}

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float bf16_to_f32(uint16_t h) { return float_of(uint32_t(h) << 16); }

uint16_t f32_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN, keep sign
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);                          // nearest, ties to even
  return uint16_t((u + rounding) >> 16);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return float_of(sign);
    float v = std::ldexp(float(man), -24);  // subnormal: man * 2^-24, exact in float32
    return sign ? -v : v;
  }
  return float_of(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t f32_to_f16(float f) {
  uint32_t u = bits_of(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (au >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (au < 0x38800000u) {
    // Result is subnormal (or zero) in f16: value / 2^-24 rounded to nearest even integer.
    float a = float_of(au);
    float scaled = a * 16777216.0f;  // exact (power of two)
    float r = std::nearbyint(scaled);  // default rounding mode: ties to even
    return uint16_t(sign | uint16_t(r));
  }
  // Normal: rebias exponent, round mantissa from 23 to 10 bits, ties to even (carry into exponent is correct).
  uint32_t rounding = 0xfffu + ((au >> 13) & 1u);
  uint32_t v = (au - (112u << 23) + rounding) >> 13;
  return uint16_t(sign | v);
}

float f8e4m3_to_f32(uint8_t v) {
  uint32_t sign = v & 0x80u;
  uint32_t exp = (v >> 3) & 0xfu;
  uint32_t man = v & 0x7u;
  if (exp == 0xf && man == 0x7) return std::nanf("");
  float r = exp == 0 ? std::ldexp(float(man), -9) : std::ldexp(float(8 + man), int(exp) - 10);
  return sign ? -r : r;
}

uint8_t f32_to_f8e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return uint8_t(sign | 0x7e);  // saturate to the largest finite value
  // Find the representable neighbours: smallest normal is 2^-6, subnormal step 2^-9.
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp_unbiased = e - 1;
  if (exp_unbiased < -6) exp_unbiased = -6;  // subnormal range shares the 2^-9 step
  float step = std::ldexp(1.0f, exp_unbiased - 3);
  float q = std::nearbyint(a / step);  // ties to even
  float r = q * step;
  if (r >= 448.0f) return uint8_t(sign | 0x7e);
  if (r == 0) return sign;
  int re;
  std::frexp(r, &re);
  int rexp = re - 1;
  if (rexp < -6) return uint8_t(sign | uint8_t(r / std::ldexp(1.0f, -9)));  // subnormal
  uint8_t man = uint8_t(std::ldexp(r, -rexp) * 8.0f - 8.0f);
  return uint8_t(sign | uint8_t((rexp + 7) << 3) | man);
}

float f8e5m2_to_f32(uint8_t v) { return f16_to_f32(uint16_t(v << 8)); }

uint8_t f32_to_f8e5m2(float f) {
  // Round float16 to its top byte, ties to even (a NaN keeps a mantissa bit, so it stays NaN).
  uint16_t h = f32_to_f16(f);
  if ((h & 0x7c00u) == 0x7c00u) return uint8_t((h >> 8) | ((h & 0x3ffu) ? 0x02u : 0u));
  uint16_t rounding = uint16_t(0x7fu + ((h >> 8) & 1u));
  return uint8_t((h + rounding) >> 8);
}

void convert_to_f32(DType from, const void* src, float* dst, size_t n) {
  switch (from) {
    case DType::F32:
      if (n) std::memcpy(dst, src, n * 4);  // an empty tensor has no data pointer, and memcpy(nullptr) is UB
      return;
    case DType::F64: {
      auto s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::BF16: {
      auto s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      auto s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8E4M3:
    case DType::F8E5M2: {
      // All 256 values of each FP8 format, from the scalar conversions: a lookup per value (an FP8 DiT
      // dequantizes its weights on every call on the CPU backend).
      static const auto tables = [] {
        std::array<std::array<float, 256>, 2> t{};
        for (int v = 0; v < 256; ++v) {
          t[0][size_t(v)] = f8e4m3_to_f32(uint8_t(v));
          t[1][size_t(v)] = f8e5m2_to_f32(uint8_t(v));
        }
        return t;
      }();
      const auto& table = tables[from == DType::F8E4M3 ? 0 : 1];
      auto s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    case DType::I64: {
      auto s = static_cast<const int64_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::I32: {
      auto s = static_cast<const int32_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::U8: {
      auto s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
  }
}

void convert_from_f32(DType to, const float* src, void* dst, size_t n) {
  switch (to) {
    case DType::F32:
      if (n) std::memcpy(dst, src, n * 4);  // an empty tensor has no data pointer, and memcpy(nullptr) is UB
      return;
    case DType::F64: {
      auto d = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = src[i];
      return;
    }
    case DType::BF16: {
      auto d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      auto d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::F8E4M3: {
      auto d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f8e4m3(src[i]);
      return;
    }
    case DType::F8E5M2: {
      auto d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f8e5m2(src[i]);
      return;
    }
    case DType::I64: {
      auto d = static_cast<int64_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = int64_t(src[i]);
      return;
    }
    case DType::I32: {
      auto d = static_cast<int32_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = int32_t(src[i]);
      return;
    }
    case DType::U8: {
      auto d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = uint8_t(std::fmin(255.0f, std::fmax(0.0f, src[i])));
      return;
    }
  }
}

}  // namespace zimage
