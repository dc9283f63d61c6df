// The GGUF reader: block dequantization against a per-element reference written from ggml's block
// layouts (ggml-common.h), on hand-built blocks; header validation on hand-built files.
#include "io/gguf.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"
#include "core/error.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;
using zimage::testing::golden_path;

namespace {

// Value i of a row of `type`, computed element by element: find the block and the position in it, read
// that position's quant and the block's scale (and min).
float reference_value(uint32_t type, const std::vector<uint8_t>& row, int64_t i) {
  const int64_t b = i / 32, j = i % 32;
  auto f16 = [&](size_t at) {
    uint16_t h;
    std::memcpy(&h, &row[at], 2);
    return f16_to_f32(h);
  };
  auto nibble = [&](size_t qs) {  // values 0..15 hold low nibbles, 16..31 high nibbles of byte j % 16
    uint8_t byte = row[qs + size_t(j % 16)];
    return j < 16 ? byte & 0xf : byte >> 4;
  };
  auto high_bit = [&](size_t qh) {  // bit j of the little-endian u32 at qh
    return (row[qh + size_t(j / 8)] >> (j % 8)) & 1;
  };
  switch (GgmlType(type)) {
    case GgmlType::Q8_0: {
      const size_t at = size_t(b * 34);
      return float(int8_t(row[at + 2 + size_t(j)])) * f16(at);
    }
    case GgmlType::Q4_0: {
      const size_t at = size_t(b * 18);
      return float(nibble(at + 2) - 8) * f16(at);
    }
    case GgmlType::Q4_1: {
      const size_t at = size_t(b * 20);
      return float(nibble(at + 4)) * f16(at) + f16(at + 2);
    }
    case GgmlType::Q5_0: {
      const size_t at = size_t(b * 22);
      return float((nibble(at + 6) | (high_bit(at + 2) << 4)) - 16) * f16(at);
    }
    case GgmlType::Q5_1: {
      const size_t at = size_t(b * 24);
      return float(nibble(at + 8) | (high_bit(at + 4) << 4)) * f16(at) + f16(at + 2);
    }
    default: break;
  }
  // K-quants: super-blocks of 256; `w` is the position inside one.
  const int64_t sb = i / 256, w = i % 256, half = w / 128, in_half = w % 128;
  switch (GgmlType(type)) {
    case GgmlType::Q2_K: {  // {scales[16]; qs[64]; d; dmin}; group g = bit pair, 16 values per scale
      const size_t at = size_t(sb * 84);
      const int64_t g = in_half / 32, sub = (in_half % 32) / 16, l = in_half % 16;
      const uint8_t sc = row[at + size_t(half * 8 + g * 2 + sub)];
      const int q = (row[at + 16 + size_t(half * 32 + sub * 16 + l)] >> (2 * g)) & 3;
      return f16(at + 80) * float(sc & 0xf) * float(q) - f16(at + 82) * float(sc >> 4);
    }
    case GgmlType::Q3_K: {  // {hmask[32]; qs[64]; scales[12]; d}
      const size_t at = size_t(sb * 110);
      const int64_t g = in_half / 32, sub = (in_half % 32) / 16, l = in_half % 16, j = half * 8 + g * 2 + sub;
      const uint8_t* sc = &row[at + 96];
      const int scale = ((j < 8 ? sc[j] & 0xf : sc[j - 8] >> 4) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
      const int q = (row[at + 32 + size_t(half * 32 + sub * 16 + l)] >> (2 * g)) & 3;
      const int h = (row[at + size_t(sub * 16 + l)] >> (half * 4 + g)) & 1;
      return f16(at + 108) * float(scale) * float(q - (h ? 0 : 4));
    }
    case GgmlType::Q4_K:
    case GgmlType::Q5_K: {  // {d; dmin; scales[12]; [qh[32];] qs[128]}
      const bool q5 = GgmlType(type) == GgmlType::Q5_K;
      const size_t at = size_t(sb * (q5 ? 176 : 144));
      const int64_t c = w / 64, hi = (w % 64) / 32, l = w % 32, j = 2 * c + hi;
      const uint8_t* p = &row[at + 4];
      const int sc = j < 4 ? p[j] & 63 : (p[j + 4] & 0xf) | ((p[j - 4] >> 6) << 4);
      const int m = j < 4 ? p[j + 4] & 63 : (p[j + 4] >> 4) | ((p[j] >> 6) << 4);
      const uint8_t byte = row[at + (q5 ? 48 : 16) + size_t(32 * c + l)];
      int q = hi ? byte >> 4 : byte & 0xf;
      if (q5) q += 16 * ((row[at + 16 + size_t(l)] >> j) & 1);
      return f16(at) * float(sc) * float(q) - f16(at + 2) * float(m);
    }
    case GgmlType::Q6_K: {  // {ql[128]; qh[64]; int8 scales[16]; d}
      const size_t at = size_t(sb * 210);
      const int64_t k = in_half / 32, l = in_half % 32;
      const uint8_t lo = row[at + size_t(64 * half + 32 * (k % 2) + l)];
      const int q =
          ((k < 2 ? lo & 0xf : lo >> 4) | (((row[at + 128 + size_t(32 * half + l)] >> (2 * k)) & 3) << 4)) - 32;
      return f16(at + 208) * float(int8_t(row[at + 192 + size_t(8 * half + 2 * k + l / 16)])) * float(q);
    }
    default: ADD_FAILURE() << "no reference for type " << type; return 0;
  }
}

// A GGUF v3 file: metadata (string values only), then tensors (name, ne, type, bytes).
struct GgufTensorSpec {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type;
  std::vector<uint8_t> bytes;
};

std::vector<uint8_t> make_gguf(const std::vector<std::pair<std::string, std::string>>& kv,
                               const std::vector<GgufTensorSpec>& tensors, uint32_t version = 3) {
  std::vector<uint8_t> out;
  auto put = [&](const void* p, size_t n) { out.insert(out.end(), (const uint8_t*)p, (const uint8_t*)p + n); };
  auto u32 = [&](uint32_t v) { put(&v, 4); };
  auto u64 = [&](uint64_t v) { put(&v, 8); };
  auto str = [&](const std::string& s) {
    u64(s.size());
    put(s.data(), s.size());
  };
  put("GGUF", 4);
  u32(version);
  u64(tensors.size());
  u64(kv.size());
  for (const auto& [k, v] : kv) {
    str(k);
    u32(8);
    str(v);
  }
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    str(t.name);
    u32(uint32_t(t.ne.size()));
    for (uint64_t n : t.ne) u64(n);
    u32(t.type);
    u64(offset);
    offset += (t.bytes.size() + 31) / 32 * 32;
  }
  while (out.size() % 32) out.push_back(0);
  for (const auto& t : tensors) {
    put(t.bytes.data(), t.bytes.size());
    while (out.size() % 32) out.push_back(0);
  }
  return out;
}

// Random blocks whose fp16 scales are finite.
std::vector<uint8_t> random_blocks(uint32_t type, int64_t n, uint32_t seed) {
  int64_t be = 0, bb = 0;
  EXPECT_TRUE(ggml_block_layout(type, &be, &bb));
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(size_t(n / be * bb));
  for (auto& b : bytes) b = uint8_t(rng());
  const auto [d_at, m_at] = zimage::testing::ggml_scale_fields(type);
  for (int64_t b = 0; b < n / be; ++b) {
    uint16_t d = f32_to_f16(std::ldexp(float(rng() % 1000 + 1), -12)), m = f32_to_f16(-float(rng() % 100) / 64);
    std::memcpy(&bytes[size_t(b * bb + d_at)], &d, 2);
    if (m_at >= 0) std::memcpy(&bytes[size_t(b * bb + m_at)], &m, 2);
  }
  return bytes;
}

}  // namespace

TEST(Gguf, BlockFormatsMatchThePerElementReference) {
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K,
                     GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K}) {
    const int64_t n = 256 * 3;
    std::vector<uint8_t> row = random_blocks(uint32_t(t), n, uint32_t(t) + 1);
    std::vector<float> out(static_cast<size_t>(n));
    ggml_dequantize(uint32_t(t), row.data(), out.data(), n);
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(out[size_t(i)], reference_value(uint32_t(t), row, i)) << ggml_type_name(uint32_t(t)) << " value " << i;
  }
}

TEST(Gguf, HandComputedBlocks) {
  // Q8_0: d = 0.5, q = -3 -> -1.5. Q4_0: d = 2, low nibble 0xA of byte 0 -> (10 - 8) * 2 = 4, its high
  // nibble 0x1 (value 16) -> (1 - 8) * 2 = -14. Q5_1: d = 1, m = -0.5, byte 0 = 0x0F, qh bit 0 set -> 31 - 0.5.
  std::vector<uint8_t> q8(34, 0), q4(18, 0), q51(24, 0);
  uint16_t half = f32_to_f16(0.5f), two = f32_to_f16(2.0f), one = f32_to_f16(1.0f), mhalf = f32_to_f16(-0.5f);
  std::memcpy(q8.data(), &half, 2);
  q8[2] = uint8_t(int8_t(-3));
  std::memcpy(q4.data(), &two, 2);
  q4[2] = 0x1A;
  std::memcpy(q51.data(), &one, 2);
  std::memcpy(q51.data() + 2, &mhalf, 2);
  q51[4] = 1;
  q51[8] = 0x0F;
  float out[32];
  ggml_dequantize(uint32_t(GgmlType::Q8_0), q8.data(), out, 32);
  EXPECT_EQ(out[0], -1.5f);
  EXPECT_EQ(out[1], 0.0f);
  ggml_dequantize(uint32_t(GgmlType::Q4_0), q4.data(), out, 32);
  EXPECT_EQ(out[0], 4.0f);
  EXPECT_EQ(out[16], -14.0f);
  EXPECT_EQ(out[1], -16.0f);
  ggml_dequantize(uint32_t(GgmlType::Q5_1), q51.data(), out, 32);
  EXPECT_EQ(out[0], 30.5f);
  EXPECT_EQ(out[16], -0.5f);
}

TEST(Gguf, HandComputedKQuantBlocks) {
  // Q4_K: d = 1, dmin = 0.5, pair 0 = (scale 3, min 2), value 0 has q = 5: 3 * 5 - 0.5 * 2 = 14; value 32
  // (pair 1: scale 0, min 0) is 0. Q6_K: d = 0.25, scales[0] = 4, ql[0] = 0x05, qh[0] = 0b10 -> q = 37 - 32.
  std::vector<uint8_t> q4k(144, 0), q6k(210, 0);
  uint16_t one = f32_to_f16(1.0f), half = f32_to_f16(0.5f), quarter = f32_to_f16(0.25f);
  std::memcpy(q4k.data(), &one, 2);
  std::memcpy(q4k.data() + 2, &half, 2);
  q4k[4] = 3;
  q4k[8] = 2;
  q4k[16] = 0x05;
  q6k[0] = 0x05;
  q6k[128] = 0x02;
  q6k[192] = 4;
  std::memcpy(q6k.data() + 208, &quarter, 2);
  float out[256];
  ggml_dequantize(uint32_t(GgmlType::Q4_K), q4k.data(), out, 256);
  EXPECT_EQ(out[0], 14.0f);
  EXPECT_EQ(out[1], -1.0f);
  EXPECT_EQ(out[32], 0.0f);
  ggml_dequantize(uint32_t(GgmlType::Q6_K), q6k.data(), out, 256);
  EXPECT_EQ(out[0], 5.0f);
  EXPECT_EQ(out[1], -32.0f);  // q = 0 - 32, scale 4, d 0.25
}

TEST(Gguf, ReadsTensorsInPyTorchOrderAndMetadata) {
  std::vector<uint8_t> q = random_blocks(uint32_t(GgmlType::Q8_0), 64 * 3, 9);
  std::vector<uint8_t> f(4 * 5 * 4);
  for (size_t i = 0; i < 20; ++i) {
    float v = float(i);
    std::memcpy(&f[i * 4], &v, 4);
  }
  auto file = GgufFile::from_bytes(make_gguf({{"general.architecture", "lumina2"}},
                                             {{"w", {64, 3}, uint32_t(GgmlType::Q8_0), q}, {"b", {5, 4}, 0, f}}),
                                   "t.gguf");
  EXPECT_EQ(file->version(), 3u);
  EXPECT_EQ(file->metadata_string("general.architecture"), "lumina2");
  Tensor w = file->get("w");
  EXPECT_EQ(w.shape(), (Shape{3, 64}));
  std::vector<float> ref(64 * 3);
  ggml_dequantize(uint32_t(GgmlType::Q8_0), q.data(), ref.data(), 64 * 3);
  EXPECT_EQ(w.to_vector(), ref);
  Tensor b = file->get("b");
  EXPECT_EQ(b.shape(), (Shape{4, 5}));
  EXPECT_EQ(b.to_vector()[7], 7.0f);
}

TEST(Gguf, GoldenFilesOpen) {
  for (const char* f : {"z_image_dit_q8_0.gguf", "z_image_dit_q4_0.gguf"}) {
    auto file = GgufFile::open(golden_path(std::string("wave3/formats/") + f));
    EXPECT_EQ(file->metadata_string("general.architecture"), "lumina2") << f;
    EXPECT_EQ(file->get("layers.0.attention.qkv.weight").shape(), (Shape{192, 64})) << f;
  }
}

TEST(Gguf, BadFilesAreFormatErrorsNamingTheFile) {
  std::vector<uint8_t> q = random_blocks(uint32_t(GgmlType::Q8_0), 64, 3);
  auto good = make_gguf({}, {{"w", {64, 1}, uint32_t(GgmlType::Q8_0), q}});
  auto bad = [&](std::vector<uint8_t> bytes, std::initializer_list<std::string> what) {
    expect_error([&] { GgufFile::from_bytes(bytes, "bad.gguf"); }, ErrorKind::Format, what);
  };
  bad({'G', 'G', 'U'}, {"bad.gguf", "truncated"});
  bad({'N', 'O', 'P', 'E', 3, 0, 0, 0}, {"bad.gguf", "magic"});
  bad(make_gguf({}, {}, 1), {"bad.gguf", "version 1"});
  bad(std::vector<uint8_t>(good.begin(), good.end() - 40), {"bad.gguf", "truncated GGUF", "'w'"});
  bad(make_gguf({}, {{"w", {64, 1}, 99, q}}), {"bad.gguf", "'w'", "type 99"});
  bad(make_gguf({}, {{"w", {48, 1}, uint32_t(GgmlType::Q8_0), q}}), {"bad.gguf", "'w'", "whole number"});
  bad(make_gguf({}, {{"w", {uint64_t(1) << 39, uint64_t(1) << 39}, 0, q}}), {"bad.gguf", "'w'", "dimension"});
  bad(make_gguf({}, {{"w", {64, 1, 1, 1, 1}, 0, q}}), {"bad.gguf", "'w'", "dimensions"});
  // A tensor count far beyond the file: refused before anything is allocated.
  auto huge = good;
  uint64_t n = uint64_t(1) << 60;
  std::memcpy(&huge[8], &n, 8);
  bad(huge, {"bad.gguf", "tensors"});
}

TEST(GgufQuantize, Q8_0HandComputedBlock) {
  // amax 127 -> d = 1 exactly (stored fp16 0x3c00); q = round(x) with halves away from zero.
  std::vector<float> x(32, 0.0f);
  x[0] = 127, x[1] = -127, x[2] = 63.5f, x[3] = -0.5f, x[4] = 0.4f, x[5] = 2.5f;
  std::vector<uint8_t> b(34);
  ggml_quantize(uint32_t(GgmlType::Q8_0), x.data(), b.data(), 32);
  uint16_t d;
  std::memcpy(&d, b.data(), 2);
  EXPECT_EQ(d, 0x3c00);
  const int want[] = {127, -127, 64, -1, 0, 3};
  for (int j = 0; j < 6; ++j) EXPECT_EQ(int(int8_t(b[2 + size_t(j)])), want[j]) << j;
  // An all-zero block: d = 0 and zero quants, no division by zero.
  std::vector<float> zero(32, 0.0f);
  ggml_quantize(uint32_t(GgmlType::Q8_0), zero.data(), b.data(), 32);
  for (uint8_t v : b) EXPECT_EQ(v, 0);
}

TEST(GgufQuantize, Q4_KHandComputedSuperBlock) {
  // Every sub-block holds 0..15 twice: the first fit (min 0, scale 1) is exact, so the search keeps it.
  // Sub-block scales quantize to 63 against d = fp16(1/63), mins to 0 (dmin = 0), and every value
  // requantizes to itself: nibble = x, dequantized d * 63 * x.
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[size_t(i)] = float(i % 16);
  std::vector<uint8_t> b(144);
  ggml_quantize(uint32_t(GgmlType::Q4_K), x.data(), b.data(), 256);
  uint16_t d, dmin;
  std::memcpy(&d, b.data(), 2);
  std::memcpy(&dmin, b.data() + 2, 2);
  EXPECT_EQ(d, f32_to_f16(1.0f / 63));
  EXPECT_EQ(dmin, 0);
  // Pairs 0..3: scale 63 in bytes 0..3 (their top bits: pairs 4..7's scale bits 4..5, 3), min 0 in 4..7;
  // pairs 4..7: low scale bits 15 and min 0 in bytes 8..11.
  for (int j = 0; j < 4; ++j) EXPECT_EQ(b[4 + size_t(j)], 0xff) << "byte " << j;
  for (int j = 4; j < 8; ++j) EXPECT_EQ(b[4 + size_t(j)], 0x00) << "byte " << j;
  for (int j = 8; j < 12; ++j) EXPECT_EQ(b[4 + size_t(j)], 0x0f) << "byte " << j;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) EXPECT_EQ(b[16 + size_t(32 * c + l)], (l % 16) | ((l % 16) << 4));
  std::vector<float> y(256);
  ggml_dequantize(uint32_t(GgmlType::Q4_K), b.data(), y.data(), 256);
  const float step = f16_to_f32(d) * 63;
  for (int i = 0; i < 256; ++i) ASSERT_EQ(y[size_t(i)], step * float(i % 16)) << i;
}

TEST(GgufQuantize, RoundTripsWithinTheFormatsStep) {
  // Gaussian weights with a few outliers, as a DiT's. Q8_0: |x - y| <= d / 2 per block, d = amax / 127
  // (plus the fp16 rounding of d, relative 2^-11, times |q| <= 127). Q4_K: see below; the whole within
  // 10% rms.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  const int64_t n = 256 * 64;
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = normal(rng);
  for (int k = 0; k < 16; ++k) x[size_t(rng() % n)] *= 20;
  std::vector<uint8_t> q8(size_t(n / 32 * 34)), q4(size_t(n / 256 * 144));
  std::vector<float> y(static_cast<size_t>(n));
  ggml_quantize(uint32_t(GgmlType::Q8_0), x.data(), q8.data(), n);
  ggml_dequantize(uint32_t(GgmlType::Q8_0), q8.data(), y.data(), n);
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[size_t(b * 32 + j)]));
    const float d = amax / 127;
    for (int j = 0; j < 32; ++j) {
      const size_t i = size_t(b * 32 + j);
      ASSERT_LE(std::fabs(x[i] - y[i]), d / 2 + 127 * d * 0x1p-11f) << "q8_0 value " << i;
    }
  }
  ggml_quantize(uint32_t(GgmlType::Q4_K), x.data(), q4.data(), n);
  ggml_dequantize(uint32_t(GgmlType::Q4_K), q4.data(), y.data(), n);
  // Q4_K: a value is within one step of its sub-block's range / 15, plus the 6-bit quantization of the
  // sub-block's scale and min against the super-block's largest (each off by up to half of 1/63 of it,
  // times up to 15 quants): range of the super-block / 63.
  double err2 = 0, ref2 = 0;
  for (int64_t sb = 0; sb < n / 256; ++sb) {
    float sb_lo = 0, sb_hi = 0;
    for (int j = 0; j < 256; ++j) {
      sb_lo = std::min(sb_lo, x[size_t(sb * 256 + j)]);
      sb_hi = std::max(sb_hi, x[size_t(sb * 256 + j)]);
    }
    for (int64_t s = sb * 8; s < sb * 8 + 8; ++s) {
      float lo = 0, hi = 0;
      for (int j = 0; j < 32; ++j) lo = std::min(lo, x[size_t(s * 32 + j)]), hi = std::max(hi, x[size_t(s * 32 + j)]);
      const float bound = (hi - lo) / 15 + (sb_hi - sb_lo) / 63;
      for (int j = 0; j < 32; ++j) {
        const size_t i = size_t(s * 32 + j);
        ASSERT_LE(std::fabs(x[i] - y[i]), bound) << "q4_k value " << i;
        err2 += double(x[i] - y[i]) * (x[i] - y[i]);
        ref2 += double(x[i]) * x[i];
      }
    }
  }
  EXPECT_LE(std::sqrt(err2 / ref2), 0.10);
  std::printf("q4_k relative rms error %.4f\n", std::sqrt(err2 / ref2));
}

TEST(GgufQuantize, StreamedWriterReadsBack) {
  // Quantized and plain tensors written one at a time; the reader gets the same bytes and shapes.
  std::vector<float> x(256 * 2);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(float(i));
  std::vector<uint8_t> q4(2 * 144), q8(16 * 34);
  ggml_quantize(uint32_t(GgmlType::Q4_K), x.data(), q4.data(), 512);
  ggml_quantize(uint32_t(GgmlType::Q8_0), x.data(), q8.data(), 512);
  const std::string path = zimage::testing::temp_path("streamed.gguf");
  std::vector<GgufEntry> entries = {{"a.weight", {2, 256}, uint32_t(GgmlType::Q4_K)},
                                    {"b.weight", {4, 128}, uint32_t(GgmlType::Q8_0)},
                                    {"c.bias", {3}, uint32_t(GgmlType::F32)}};
  write_gguf(path, {{"general.architecture", "lumina2"}, {"general.quantization_version", 2u}}, entries,
             [&](const GgufEntry& e) {
               if (e.name == "c.bias") return Tensor::from_f32({3}, {1, 2, 3});
               const auto& bytes = e.name == "a.weight" ? q4 : q8;
               Tensor t = Tensor::empty({int64_t(bytes.size())}, DType::U8);
               std::memcpy(t.data(), bytes.data(), bytes.size());
               return t;
             });
  auto f = GgufFile::open(path);
  EXPECT_EQ(f->metadata_string("general.architecture"), "lumina2");
  EXPECT_EQ(f->metadata_string("general.quantization_version"), "2");
  EXPECT_EQ(f->tensors().at("a.weight").shape(), (Shape{2, 256}));
  EXPECT_EQ(f->tensors().at("b.weight").shape(), (Shape{4, 128}));
  EXPECT_EQ(std::memcmp(f->bytes("a.weight"), q4.data(), q4.size()), 0);
  EXPECT_EQ(std::memcmp(f->bytes("b.weight"), q8.data(), q8.size()), 0);
  EXPECT_EQ(f->get("c.bias").to_vector(), (std::vector<float>{1, 2, 3}));
  // A tensor whose bytes do not match its type's size is an error naming it.
  expect_error(
      [&] {
        write_gguf(path, {}, {{"bad.weight", {1, 64}, uint32_t(GgmlType::Q8_0)}},
                   [](const GgufEntry&) { return Tensor::zeros({10}, DType::U8); });
      },
      ErrorKind::Internal, {"bad.weight", "q8_0"});
  expect_error([&] { GgufEntry{"odd.weight", {2, 100}, uint32_t(GgmlType::Q4_K)}.nbytes(); },
               ErrorKind::InvalidArgument, {"odd.weight", "q4_k"});
}
