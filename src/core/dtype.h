// Element types and exact conversions between the 16/8-bit float formats and float32.
// All narrowing conversions round to nearest, ties to even (as PyTorch and the CUDA intrinsics do).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace zimage {

enum class DType : uint8_t { F32, F64, BF16, F16, F8E4M3, I64, I32, U8, F8E5M2 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "f32", "bf16", ...
// safetensors spelling ("F32", "F64", "BF16", "F16", "F8_E4M3", "I64", "I32", "U8", "F8_E5M2"); nullopt when unknown.
std::optional<DType> dtype_from_safetensors(std::string_view s);
const char* dtype_to_safetensors(DType t);

float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
// FP8 e4m3 "fn" (no infinities, 0x7f/0xff = NaN, max 448); out-of-range values saturate to ±448.
float f8e4m3_to_f32(uint8_t v);
uint8_t f32_to_f8e4m3(float f);
// FP8 e5m2 (IEEE-like: the top byte of a float16, with infinities and NaNs).
float f8e5m2_to_f32(uint8_t v);
uint8_t f32_to_f8e5m2(float f);

// Convert n elements of type `from` at src to float32 at dst (any float/int type).
void convert_to_f32(DType from, const void* src, float* dst, size_t n);
// Convert n float32 values to type `to` (float types, I64, I32 and U8 by rounding toward zero after clamping).
void convert_from_f32(DType to, const float* src, void* dst, size_t n);

}  // namespace zimage
