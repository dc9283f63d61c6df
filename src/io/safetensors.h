// safetensors: the weight file format of diffusers and transformers checkpoints.
// Layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// then the tensor bytes. Files are memory-mapped and tensors returned as zero-copy host views.
// Everything read is validated; a violation is an Error naming the file and the tensor. Files come from
// strangers (LoRAs, fine-tunes): the header's size, its tensor count and each tensor's bytes are bounded.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace zimage {

struct SafetensorsEntry {
  DType dtype;
  Shape shape;
  size_t begin = 0;  // byte range inside the data section
  size_t end = 0;
};

class SafetensorsFile {
 public:
  // Largest header accepted (the reference implementation uses the same bound).
  static constexpr size_t kMaxHeaderBytes = 100u << 20;
  // More tensors in one file than any released checkpoint has (Qwen3-4B: 398; the largest MoE shards:
  // a few thousand), far fewer than a 100 MB header could list.
  static constexpr size_t kMaxTensors = 1u << 17;
  // 64 GiB: eight times the largest single tensor of a released model (a 256k x 16k bf16 embedding).
  static constexpr uint64_t kMaxTensorBytes = uint64_t(1) << 36;

  static std::shared_ptr<SafetensorsFile> open(const std::string& path);  // memory-mapped
  // The same parsing and checks over a whole file held in memory; `name` stands for the path in errors.
  static std::shared_ptr<SafetensorsFile> from_bytes(std::vector<uint8_t> bytes, const std::string& name);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  // A host view into the file's bytes (keeps them alive). A tensor whose bytes are not aligned to its
  // element size (legal: nothing in the format pads the header or the offsets) is copied to aligned
  // memory instead. Throws NotFound naming the file.
  Tensor get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  void parse(const unsigned char* bytes, size_t size);  // the header of the whole file `bytes`
  std::string path_;
  void* map_ = nullptr;  // open(): the mapping
  size_t map_bytes_ = 0;
  std::vector<uint8_t> bytes_;  // from_bytes(): the file
  const char* data_ = nullptr;  // start of the data section
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  std::weak_ptr<SafetensorsFile> self_;
};

// A checkpoint made of one or more safetensors files: either a sharded one described by an
// `*.safetensors.index.json` (weight_map: tensor name -> shard file), or a single file.
class Checkpoint {
 public:
  // `dir` holds either exactly one *.safetensors.index.json or safetensors files (all are read).
  static Checkpoint open_dir(const std::string& dir);
  static Checkpoint open_file(const std::string& path);
  static Checkpoint open_index(const std::string& index_path);

  bool has(const std::string& name) const { return where_.count(name) != 0; }
  Tensor get(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& description() const { return description_; }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
  std::string description_;              // the folder or file, for error messages
};

// Writes tensors (host, contiguous) in name order with an optional __metadata__ map.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace zimage
