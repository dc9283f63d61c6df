// The tensors of one checkpoint file (or folder) under the names they are stored by, before any layout
// is applied: a safetensors checkpoint or a GGUF file. Shapes are in PyTorch order (GGUF's reversed).
// A GGUF tensor in a block format is dequantized to float32 by read() and served as its blocks by
// read_blocks(); every other tensor keeps its stored dtype (FP8 included: its scale is the layout's
// business, see checkpoint_layout.h).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace zimage {

class StoredTensors {
 public:
  virtual ~StoredTensors() = default;
  virtual std::vector<std::string> names() const = 0;  // sorted
  virtual bool has(const std::string& name) const = 0;
  virtual Shape shape(const std::string& name) const = 0;
  virtual DType dtype(const std::string& name) const = 0;  // what read() returns
  virtual Tensor read(const std::string& name) const = 0;  // a host tensor
  // A tensor stored in a GGUF block format as its blocks (U8 [rows, row bytes], its ggml type and shape),
  // in the file's memory; nullopt for every other tensor.
  virtual std::optional<StoredWeight> read_blocks(const std::string&) const { return std::nullopt; }
  virtual std::string describe() const = 0;
  // A header entry (safetensors __metadata__, GGUF scalar metadata); "" when absent.
  virtual std::string metadata(const std::string& key) const = 0;
  virtual void prefetch() {}
};

// A safetensors file or folder (sharded or not).
std::shared_ptr<StoredTensors> stored_safetensors(Checkpoint ckpt);
// A .gguf file (io/gguf.h).
std::shared_ptr<StoredTensors> stored_gguf(const std::string& path);
// `path` by its content: GGUF magic, else safetensors; a folder is a safetensors checkpoint folder.
std::shared_ptr<StoredTensors> open_stored_tensors(const std::string& path);

}  // namespace zimage
