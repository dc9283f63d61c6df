// safetensors: the weight file format of diffusers and transformers checkpoints.
// Layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// then the tensor bytes. Files are memory-mapped and tensors returned as zero-copy host views.
// Everything read is validated; a violation is an Error naming the file and the tensor. Files come from
// strangers (LoRAs, fine-tunes): the header's size, its tensor count and each tensor's bytes are bounded.
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
  size_t size_bytes() const { return map_bytes_; }
  // Brings bytes [offset, offset + len) of the file into memory: read from disk if they are not in the
  // page cache, and mapped into this process, so that later reads of them take no page fault. Blocks.
  void prefetch(size_t offset, size_t len) const;

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
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

  // Starts reading every file into memory on background threads (SafetensorsFile::prefetch over
  // 64 MiB pieces) and returns at once: the gets that follow find their bytes resident and mapped.
  // Several threads keep a cold disk's queue full and take the page faults of a warm page cache in
  // parallel. The threads stop when the last copy of this Checkpoint goes away. Idempotent.
  void prefetch();

 private:
  class Prefetch;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
  std::string description_;              // the folder or file, for error messages
  std::shared_ptr<Prefetch> prefetch_;
};

// Writes tensors (host, contiguous) in name order with an optional __metadata__ map.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// One tensor of a checkpoint to write; its bytes are asked for when its turn comes.
struct CheckpointEntry {
  std::string name;
  DType dtype;
  Shape shape;
  size_t nbytes() const { return size_t(shape_numel(shape)) * dtype_size(dtype); }
};

struct WrittenCheckpoint {
  std::vector<std::string> files;  // file names inside the folder: the shards, then the index if any
  uint64_t total_bytes = 0;        // tensor bytes (the index's metadata.total_size)
};

// Writes `entries` into `dir` as diffusers and transformers save a checkpoint: split in order into
// shards of at most `max_shard_bytes` of tensor data (a larger tensor gets a shard of its own), each
// `<stem>-0000k-of-0000n.safetensors` (tensors in name order inside, __metadata__ {"format": "pt"}),
// plus `<stem>.safetensors.index.json` with metadata.total_size and weight_map; a checkpoint that fits
// one shard is `<stem>.safetensors` alone. `tensor(entry)` gives each tensor's bytes (a contiguous host
// tensor of the entry's dtype and shape) just before they are written, so memory holds one tensor at a
// time whatever the checkpoint's size. Each file is written under a temporary name and renamed when
// complete; a failed write (disk full, ...) is an Io error naming the file.
WrittenCheckpoint write_checkpoint(const std::string& dir, const std::string& stem,
                                   const std::vector<CheckpointEntry>& entries, uint64_t max_shard_bytes,
                                   const std::function<Tensor(const CheckpointEntry&)>& tensor);

}  // namespace zimage
