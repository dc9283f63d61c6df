#include "server/lora_library.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"

namespace zimage::server {

namespace fs = std::filesystem;

LoraLibrary::LoraLibrary(std::string dir, std::vector<WeightSpec> specs, size_t capacity)
    : dir_(std::move(dir)), specs_(std::move(specs)), capacity_(std::max<size_t>(capacity, 1)) {
  ZI_CHECK(fs::is_directory(dir_), ErrorKind::NotFound, "--lora-dir " + dir_ + " is not a folder");
  for (const auto& e : fs::directory_iterator(dir_))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") names_.push_back(e.path().stem().string());
  std::sort(names_.begin(), names_.end());
}

std::vector<ScaledLora> LoraLibrary::resolve(const std::vector<LoraRef>& refs) {
  std::vector<ScaledLora> out;
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& ref : refs) {
    ZI_CHECK(std::binary_search(names_.begin(), names_.end(), ref.name), ErrorKind::NotFound,
             "unknown LoRA adapter '" + ref.name + "' (GET /v1/models lists the adapters)");
    auto it = std::find_if(loaded_.begin(), loaded_.end(), [&](const auto& a) { return a->name == ref.name; });
    std::shared_ptr<const LoraAdapter> a;
    if (it != loaded_.end()) {
      a = *it;
      loaded_.erase(it);
    } else {
      a = std::make_shared<const LoraAdapter>(
          load_lora((fs::path(dir_) / (ref.name + ".safetensors")).string(), specs_));
    }
    loaded_.push_front(a);
    if (loaded_.size() > capacity_) loaded_.pop_back();
    out.push_back({a, ref.scale});
  }
  return out;
}

}  // namespace zimage::server
