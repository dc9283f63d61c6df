#include "model/weights/stored_tensors.h"

#include <filesystem>

#include "core/error.h"
#include "io/gguf.h"

namespace zimage {

namespace {

class SafetensorsTensors final : public StoredTensors {
 public:
  explicit SafetensorsTensors(Checkpoint ckpt) : ckpt_(std::move(ckpt)) {}
  std::vector<std::string> names() const override { return ckpt_.names(); }
  bool has(const std::string& name) const override { return ckpt_.has(name); }
  Shape shape(const std::string& name) const override { return entry(name).shape; }
  DType dtype(const std::string& name) const override { return entry(name).dtype; }
  Tensor read(const std::string& name) const override { return ckpt_.get(name); }
  std::string describe() const override { return ckpt_.description(); }
  std::string metadata(const std::string& key) const override {
    for (const auto& f : ckpt_.files())
      if (auto it = f->metadata().find(key); it != f->metadata().end()) return it->second;
    return "";
  }
  void prefetch() override { ckpt_.prefetch(); }

 private:
  const SafetensorsEntry& entry(const std::string& name) const {
    for (const auto& f : ckpt_.files()) {
      auto it = f->entries().find(name);
      if (it != f->entries().end()) return it->second;
    }
    throw Error(ErrorKind::NotFound, ckpt_.description() + ": missing tensor '" + name + "'");
  }
  Checkpoint ckpt_;
};

// GGUF's shapes reversed. city96's ComfyUI-GGUF records the PyTorch shape of a tensor it had to reshape
// as an array `comfy.gguf.orig_shape.<name>`; no Z-Image tensor needs that (all are 1-D or 2-D), and a
// reshaped tensor would fail the models' shape check with its name.
class GgufTensors final : public StoredTensors {
 public:
  explicit GgufTensors(std::shared_ptr<GgufFile> f) : f_(std::move(f)) {}
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [name, _] : f_->tensors()) out.push_back(name);
    return out;
  }
  bool has(const std::string& name) const override { return f_->has(name); }
  Shape shape(const std::string& name) const override { return info(name).shape(); }
  DType dtype(const std::string& name) const override {
    const uint32_t t = info(name).type;
    return GgmlType(t) == GgmlType::F16 ? DType::F16 : GgmlType(t) == GgmlType::BF16 ? DType::BF16 : DType::F32;
  }
  Tensor read(const std::string& name) const override { return f_->get(name); }
  std::optional<StoredWeight> read_blocks(const std::string& name) const override {
    const GgufTensorInfo& ti = info(name);
    const GgmlType t = GgmlType(ti.type);
    if (t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16) return std::nullopt;
    StoredWeight w;
    w.shape = ti.shape();
    const int64_t rows = shape_numel(w.shape) / w.shape.back();
    // Read-only mapped bytes: nothing writes through this tensor (uploads copy it).
    w.data = Tensor::wrap(const_cast<uint8_t*>(f_->bytes(name)), {rows, int64_t(ti.nbytes) / rows}, DType::U8,
                          Device::Host, f_);
    w.ggml_type = ti.type;
    return w;
  }
  std::string describe() const override { return f_->path(); }
  std::string metadata(const std::string& key) const override { return f_->metadata_string(key); }

 private:
  const GgufTensorInfo& info(const std::string& name) const {
    auto it = f_->tensors().find(name);
    if (it == f_->tensors().end()) throw Error(ErrorKind::NotFound, f_->path() + ": missing tensor '" + name + "'");
    return it->second;
  }
  std::shared_ptr<GgufFile> f_;
};

}  // namespace

std::shared_ptr<StoredTensors> stored_safetensors(Checkpoint ckpt) {
  return std::make_shared<SafetensorsTensors>(std::move(ckpt));
}

std::shared_ptr<StoredTensors> stored_gguf(const std::string& path) {
  return std::make_shared<GgufTensors>(GgufFile::open(path));
}

std::shared_ptr<StoredTensors> open_stored_tensors(const std::string& path) {
  namespace fs = std::filesystem;
  if (fs::is_directory(path)) return stored_safetensors(Checkpoint::open_dir(path));
  if (!fs::exists(path)) throw Error(ErrorKind::NotFound, "checkpoint file '" + path + "' does not exist");
  if (is_gguf_file(path)) return stored_gguf(path);
  return stored_safetensors(Checkpoint::open_file(path));
}

}  // namespace zimage
