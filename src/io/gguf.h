// GGUF (ggml's single-file format, versions 2 and 3; ggml-org/ggml docs/gguf.md), read-only.
// Layout, all little-endian: "GGUF", u32 version, u64 tensor count, u64 metadata count; the metadata
// key/value pairs (string = u64 length + bytes; typed scalars, strings, arrays); per tensor its name,
// u32 n_dims, u64 ne[n_dims] (ne[0] is the innermost, contiguous dimension), u32 ggml type and u64
// offset into the data section, which starts at the next multiple of `general.alignment` (default 32).
// Files come from strangers: every count, length, dimension and byte range is bounded and checked, and
// a violation is a Format error naming the file (and the tensor).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace zimage {

// ggml_type values (ggml.h) of the formats this reader dequantizes.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
};

// Elements per block and bytes per block of a known type; false for a type this reader does not know.
bool ggml_block_layout(uint32_t type, int64_t* block_elems, int64_t* block_bytes);
const char* ggml_type_name(uint32_t type);  // "q8_0", ... or "unknown"

// n values of `type` (n a multiple of its block size) from `src` as float32, exactly as ggml's
// dequantize_row_* computes them (fp16 scales widened to float, then one multiply (and add) per value,
// each rounded on its own: no fused multiply-add, so a GPU kernel can reproduce every bit).
void ggml_dequantize(uint32_t type, const uint8_t* src, float* dst, int64_t n);

// n float32 values (n a multiple of the block size) into `type`'s blocks at `dst`, as ggml's reference
// quantizers (quantize_row_*_ref, the ones llama-quantize uses without an importance matrix) do:
//   F32, F16, BF16: converted, round to nearest even;
//   Q8_0: d = max|x| / 127 per block of 32, q = round(x / d) (half away from zero), d stored as fp16;
//   Q4_K: per sub-block of 32 a (scale, min) fitted by ggml's make_qkx2_quants search, both quantized
//         to 6 bits against the super-block's fp16 d and dmin, then q = nearest((x + min) / scale) in 0..15.
// Other types: InvalidArgument.
void ggml_quantize(uint32_t type, const float* src, uint8_t* dst, int64_t n);

struct GgufTensorInfo {
  std::string name;
  uint32_t type = 0;
  std::vector<int64_t> ne;  // ggml order: ne[0] innermost
  uint64_t offset = 0;      // into the data section
  uint64_t nbytes = 0;
  Shape shape() const { return Shape(ne.rbegin(), ne.rend()); }  // PyTorch order
};

class GgufFile {
 public:
  static constexpr uint64_t kMaxTensors = 1u << 17;
  static constexpr uint64_t kMaxMetadata = 1u << 20;     // key/value pairs
  static constexpr uint64_t kMaxStringBytes = 1u << 24;  // one key or string value
  static constexpr uint64_t kMaxArrayElems = 1u << 26;   // one array (a vocabulary has ~150k strings)
  static constexpr uint64_t kMaxTensorBytes = uint64_t(1) << 36;

  static std::shared_ptr<GgufFile> open(const std::string& path);  // memory-mapped
  static std::shared_ptr<GgufFile> from_bytes(std::vector<uint8_t> bytes, const std::string& name);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  const std::map<std::string, GgufTensorInfo>& tensors() const { return tensors_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // Scalar metadata as text (numbers printed, booleans "true"/"false"); arrays are skipped.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::string metadata_string(const std::string& key, const std::string& fallback = "") const;
  // Tensor `name` as a host tensor in PyTorch order: F32 as is, F16/BF16 as stored, block formats
  // dequantized to float32. NotFound naming the file if there is no such tensor.
  Tensor get(const std::string& name) const;
  // The stored bytes of tensor `name` (in the file's memory; valid while the file is open).
  const uint8_t* bytes(const std::string& name) const;

 private:
  GgufFile() = default;
  void parse(const uint8_t* bytes, size_t size);
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::vector<uint8_t> bytes_;
  const uint8_t* data_ = nullptr;  // the data section
  uint32_t version_ = 0;
  std::map<std::string, GgufTensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A metadata value of a written file: a string or a u32 (general.quantization_version, general.file_type).
struct GgufValue {
  std::string text;
  uint32_t number = 0;
  bool is_number = false;
  GgufValue(std::string s) : text(std::move(s)) {}  // NOLINT: implicit, so {"key", "value"} reads as written
  GgufValue(const char* s) : text(s) {}             // NOLINT
  GgufValue(uint32_t n) : number(n), is_number(true) {}  // NOLINT
};

// One tensor of a GGUF file to write: its PyTorch-order shape and ggml type; its bytes are asked for
// when its turn comes.
struct GgufEntry {
  std::string name;
  Shape shape;
  uint32_t type = 0;
  uint64_t nbytes() const;  // of `type`'s blocks; shape[-1] must be a multiple of the block size
};

// Writes a GGUF v3 file, 32-byte alignment, tensors in the given order: the header from `entries`, then
// each tensor's bytes from `bytes(entry)` (a host U8 tensor of exactly entry.nbytes() bytes, or a tensor
// of the entry's F32/F16/BF16 dtype), one at a time, so memory holds one tensor. Io error naming the
// file when it cannot be written.
void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<GgufEntry>& entries, const std::function<Tensor(const GgufEntry&)>& bytes);
// The same for unquantized host tensors (F32, F16 or BF16), kept as they are.
void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<std::pair<std::string, Tensor>>& tensors);

// True when the file at `path` starts with the GGUF magic.
bool is_gguf_file(const std::string& path);

}  // namespace zimage
